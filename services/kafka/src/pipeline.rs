//! The consume → process → produce loop every service runs. One batch of input records
//! is processed inside one Kafka transaction that also carries the batch's input offsets,
//! so outputs and progress are committed together or not at all (exactly-once within
//! Kafka). Shape after rust-rdkafka's `examples/at_least_once.rs` and
//! `tests/test_transactions.rs`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
    StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::processor::{Processor, Task};
use crate::record::{bare, dead_letter, Input, Output};
use crate::{Error, KafkaArgs, Result};

/// How much longer than its own timeout a transactional call may take before this side
/// stops waiting for it (see [`Txn::call`]).
const TXN_GRACE: Duration = Duration::from_secs(5);

/// How long closing an incarnation's clients is waited for before they are left to close in
/// the background.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What a pipeline consumes and as whom.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// Service name, used in dead letters and logs.
    pub service: &'static str,
    /// Consumer group.
    pub group_id: String,
    /// Transactional id, the same for every incarnation of this instance: a new producer
    /// fences the one before it (in this process, or a killed process's when the id is
    /// stable across restarts) and aborts its open transaction at once. Unique among live
    /// instances; also the consumer's `group.instance.id` under static membership.
    pub transactional_id: String,
    /// Topics consumed (co-partitioned when more than one).
    pub inputs: Vec<&'static str>,
    /// Most records processed in one transaction.
    pub max_batch: usize,
    /// How often the processor's due keys are looked at ([`Processor::due_at`]); `None`
    /// never.
    pub tick_every: Option<Duration>,
    /// Connection settings.
    pub kafka: KafkaArgs,
}

/// The producer of an incarnation: it remembers the offset of the last record delivered to
/// each partition of the processor's changelog, which becomes its stores' checkpoint once
/// the transaction has committed.
type BaseProducer = rdkafka::producer::BaseProducer<Deliveries>;

/// See [`BaseProducer`].
#[derive(Default)]
struct Deliveries {
    changelog: Option<&'static str>,
    last: Mutex<HashMap<i32, i64>>,
    /// The letters of this transaction the dead-letter topic refused: whose record each was
    /// for (`None` when that could not be read from it), and why.
    letter_refused: Mutex<Vec<(Option<RecordAt>, String)>>,
}

impl Deliveries {
    /// The last offset delivered per changelog partition since the last call.
    fn take(&self) -> HashMap<i32, i64> {
        std::mem::take(&mut *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn refuse_letter(&self, record: Option<RecordAt>, why: String) {
        self.letter_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((record, why));
    }

    /// The letters refused since the last call.
    fn take_letter_refusals(&self) -> Vec<(Option<RecordAt>, String)> {
        std::mem::take(
            &mut *self.letter_refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Whether `error`, for a record sent to the dead-letter topic, is about that record or that
/// topic (it would be refused again however often it is sent), not about the cluster's
/// health (timeouts, leaders moving: those pass, and the letter is sent again).
fn refuses_letter(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidRecord
                | Code::MessageBatchTooLarge
                | Code::PolicyViolation
                | Code::TopicAuthorizationFailed
        )
    )
}

/// How dead letters are written. A dead-letter topic that refuses a letter (larger than its
/// `max.message.bytes`, not authorised, against a policy) aborts the transaction of the
/// batch, and the batch would fail the same way for ever: the partition would be stuck. So
/// each time a transaction with a refused letter fails, the letters of the records refused
/// in that batch step down: whole (the record's bytes cut to fit), bare (where, why, sizes
/// and SHA-256, none of its bytes), none (the record is passed without a letter: logged
/// with where it is and its hash, counted in `topup_dead_letters_unwritten_total`; it stays
/// on its topic until retention). Kept per record (topic, partition, offset) across
/// incarnations, forgotten once the record's batch commits.
#[derive(Debug, Default)]
struct LetterForms(Mutex<HashMap<(String, i32, i64), Form>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Form {
    #[default]
    Whole,
    Bare,
    None,
}

type RecordAt = (String, i32, i64);

fn record_at(input: &Input) -> RecordAt {
    (input.topic.clone(), input.partition, input.offset)
}

impl LetterForms {
    fn forms(&self) -> std::sync::MutexGuard<'_, HashMap<RecordAt, Form>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a failed transaction in which `lettered` got letters: the records whose letter
    /// the dead-letter topic refused step down (all of `lettered`, should a refused letter
    /// not say whose it was).
    fn after_failure(&self, deliveries: &Deliveries, lettered: &[RecordAt], service: &str) {
        let refused = deliveries.take_letter_refusals();
        let Some((_, why)) = refused.first() else { return };
        let why = why.clone();
        let named: Vec<RecordAt> = refused.iter().filter_map(|(at, _)| at.clone()).collect();
        let stepping = if named.len() == refused.len() { &named[..] } else { lettered };
        let mut forms = self.forms();
        for at in stepping {
            let form = forms.entry(at.clone()).or_default();
            *form = if *form == Form::Whole { Form::Bare } else { Form::None };
            let next = if *form == Form::Bare { "a bare letter" } else { "no letter" };
            tracing::error!(
                service,
                %why,
                topic = %at.0,
                partition = at.1,
                offset = at.2,
                next,
                "the dead-letter topic refused a dead letter; the record is processed again with"
            );
        }
    }

    /// Once the batch of `lettered` has committed.
    fn committed(&self, lettered: &[RecordAt]) {
        let mut forms = self.forms();
        if !forms.is_empty() {
            for at in lettered {
                forms.remove(at);
            }
        }
    }

    /// `input`'s outputs with its letters in their form, and how many were left out (each
    /// logged).
    fn apply(
        &self,
        outputs: Vec<Output>,
        input: &Input,
        service: &'static str,
    ) -> (Vec<Output>, u64) {
        let form = {
            let forms = self.forms();
            if forms.is_empty() {
                return (outputs, 0);
            }
            forms.get(&record_at(input)).copied().unwrap_or_default()
        };
        match form {
            Form::Whole => (outputs, 0),
            Form::Bare => (outputs.into_iter().map(bare).collect(), 0),
            Form::None => {
                let (letters, rest): (Vec<_>, Vec<_>) =
                    outputs.into_iter().partition(|o| o.topic == topup_proto::topics::DLQ);
                for letter in &letters {
                    let sha256 = letter
                        .payload
                        .as_deref()
                        .and_then(|p| {
                            <topup_proto::v1::DeadLetter as prost::Message>::decode(p).ok()
                        })
                        .map(|l| l.original_value_sha256)
                        .unwrap_or_default();
                    tracing::error!(
                        service,
                        topic = %input.topic,
                        partition = input.partition,
                        offset = input.offset,
                        %sha256,
                        "the dead-letter topic refuses even a bare letter: the record is passed \
                         without one (it stays on its topic until retention)"
                    );
                }
                (rest, letters.len() as u64)
            }
        }
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let message = match result {
            Ok(message) => message,
            Err((error, message)) => {
                if message.topic() == topup_proto::topics::DLQ && refuses_letter(error) {
                    // Whose letter it was, from the letter itself.
                    let whose = message
                        .payload()
                        .and_then(|p| {
                            <topup_proto::v1::DeadLetter as prost::Message>::decode(p).ok()
                        })
                        .map(|l| (l.source_topic, l.source_partition, l.source_offset));
                    self.refuse_letter(whose, error.to_string());
                }
                return;
            }
        };
        if self.changelog != Some(message.topic()) {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let offset = last.entry(message.partition()).or_insert(-1);
        *offset = (*offset).max(message.offset());
    }
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(BTreeSet<i32>),
    Revoked(BTreeSet<i32>),
}

/// Records rebalances as they happen inside `poll`, so the loop can act on them between
/// records: restore state for new partitions, drop records of revoked ones.
#[derive(Default)]
struct RebalanceLog {
    events: Mutex<Vec<RebalanceEvent>>,
    /// For the lag gauge's labels.
    service: &'static str,
}

fn partitions_of(list: &TopicPartitionList) -> BTreeSet<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for RebalanceLog {
    /// librdkafka's statistics (every `statistics.interval.ms`): the consumer lag of each
    /// assigned partition, as a gauge.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = &crate::ops::pipeline_metrics().lag;
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                let partition = partition.to_string();
                let labels =
                    [("service", self.service), ("topic", topic), ("partition", &partition)];
                lag.set(&labels, p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(list) => RebalanceEvent::Assigned(partitions_of(list)),
            Rebalance::Revoke(list) => RebalanceEvent::Revoked(partitions_of(list)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }
}

impl RebalanceLog {
    fn take(&self) -> Vec<RebalanceEvent> {
        self.events.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default()
    }

    fn pending(&self) -> bool {
        self.events.lock().map(|e| !e.is_empty()).unwrap_or(false)
    }
}

/// Runs the pipeline until `shutdown` is cancelled. A Kafka failure ends only the current
/// incarnation: after a backoff a new consumer and producer start, and the processor
/// (made afresh by `make_processor`) rebuilds its state from its assigned partitions.
pub async fn run_pipeline<P, F>(
    spec: PipelineSpec,
    make_processor: F,
    shutdown: CancellationToken,
) -> Result<()>
where
    P: Processor,
    F: Fn() -> P,
{
    // What this instance counts is labelled with its transactional id (`instance_id`).
    let instance = spec.transactional_id.clone();
    crate::ops::as_instance(&instance, async move {
        let mut backoff = Duration::from_millis(500);
        let letters = LetterForms::default();
        for incarnation in 0u64.. {
            let task = Task::new(make_processor())
                .with_store(spec.kafka.store(), &spec.transactional_id);
            match run_incarnation(&spec, incarnation, task, &letters, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::error!(service = spec.service, %error, ?backoff, "pipeline failed; restarting");
                    tokio::select! {
                        // Shutting down while backing off: nothing is in flight, stop now.
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        Ok(())
    })
    .await
}

/// An incarnation's transactional producer, every blocking call of it bounded.
///
/// librdkafka's transactional calls take a timeout, and librdkafka 2.12 does not always keep
/// it: `send_offsets_to_transaction` waits for as long as the group coordinator is
/// unreachable (librdkafka issue #5456, the coordinator request's own timeout is never
/// checked). Measured here: after a mock broker was down for 2 s, an evaluator waited 5
/// minutes in that call, consuming nothing, until librdkafka's max.poll.interval.ms made the
/// consumer leave the group. So this side stops waiting after the call's timeout plus a
/// grace: the incarnation ends (its outputs were never committed, so its records are read
/// again by the next one), the stuck call keeps its thread and the producer until librdkafka
/// lets go, and nothing more is asked of that producer.
///
/// The calls run one after the other on a thread of the incarnation's own rather than on
/// tokio's blocking pool: a runtime waits for its blocking tasks when it shuts down, so a
/// call stuck there would also keep the process from exiting.
struct Txn {
    producer: Arc<BaseProducer>,
    /// Timeout given to each call; librdkafka caps it at `transaction.timeout.ms` anyway.
    timeout: Duration,
    calls: std::sync::mpsc::Sender<TxnCall>,
    /// A call was given up: every later one fails at once (it would queue behind it).
    given_up: std::sync::atomic::AtomicBool,
}

type TxnCall = Box<dyn FnOnce() + Send>;

impl Txn {
    fn new(producer: BaseProducer, kafka: &KafkaArgs) -> Result<Self> {
        let timeout = Duration::from_millis(u64::from(kafka.transaction_timeout_ms));
        let (calls, queue) = std::sync::mpsc::channel::<TxnCall>();
        // Ends when the `Txn` is dropped and the call at hand (if any) has returned.
        std::thread::Builder::new()
            .name("kafka-txn".into())
            .spawn(move || queue.into_iter().for_each(|call| call()))
            .map_err(|e| Error::Config(format!("cannot start a thread: {e}")))?;
        Ok(Self { producer: Arc::new(producer), timeout, calls, given_up: Default::default() })
    }

    /// Runs `f` on the transaction thread; gives up waiting after the call's timeout and a
    /// grace.
    async fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&BaseProducer, Duration) -> std::result::Result<T, KafkaError> + Send + 'static,
    ) -> Result<T> {
        let (producer, timeout) = (self.producer.clone(), self.timeout);
        let limit = timeout + TXN_GRACE;
        let given_up = || {
            self.given_up.store(true, std::sync::atomic::Ordering::Relaxed);
            Error::Timeout(format!(
                "{what} did not return within {limit:?}; this producer is given up"
            ))
        };
        if self.given_up.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Timeout(format!("{what}: this producer was given up")));
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.calls
            .send(Box::new(move || {
                let _ = answer.send(f(&producer, timeout));
            }))
            .map_err(|_| given_up())?;
        let asked = std::time::Instant::now();
        let answer = tokio::time::timeout(limit, answered).await;
        tracing::trace!(
            call = what,
            ms = asked.elapsed().as_secs_f64() * 1e3,
            "transactional call"
        );
        match answer {
            Ok(Ok(result)) => Ok(result?),
            // Too slow, or the thread is gone (a call before this one panicked).
            Ok(Err(_)) | Err(_) => Err(given_up()),
        }
    }

    /// Aborts the open transaction; a failure here changes nothing (the incarnation ends
    /// anyway, and the broker aborts what is left open after `transaction.timeout.ms`).
    /// Nothing is asked of a producer given up.
    async fn abort(&self) {
        if self.given_up.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(error) = self.call("abort_transaction", |p, t| p.abort_transaction(t)).await {
            tracing::warn!(%error, "aborting the transaction failed");
        }
    }

    /// Waits for every record sent to be acknowledged, then commits; aborts on failure.
    async fn finish(
        &self,
        offsets: Option<(TopicPartitionList, ConsumerGroupMetadata)>,
    ) -> Result<()> {
        let mut finished =
            self.call("delivery of the transaction's records", wait_for_deliveries).await;
        if let (Ok(()), Some((offsets, metadata))) = (&finished, offsets) {
            finished = self
                .call("send_offsets_to_transaction", move |p, t| {
                    p.send_offsets_to_transaction(&offsets, &metadata, t)
                })
                .await;
        }
        if finished.is_ok() {
            finished = self.call("commit_transaction", |p, t| p.commit_transaction(t)).await;
        }
        if finished.is_err() {
            self.abort().await;
        }
        finished
    }
}

async fn run_incarnation<P: Processor>(
    spec: &PipelineSpec,
    incarnation: u64,
    mut task: Task<P>,
    letters: &LetterForms,
    shutdown: &CancellationToken,
) -> Result<()> {
    // Ready again once partitions are assigned and restored (see `apply_rebalances`).
    crate::ops::health().set_ready(&spec.group_id, false);
    tracing::debug!(service = spec.service, incarnation, "pipeline incarnation starting");
    let consumer: StreamConsumer<RebalanceLog> = spec
        .kafka
        .pipeline_consumer(&spec.group_id, &spec.transactional_id)
        .create_with_context(RebalanceLog { service: spec.service, ..RebalanceLog::default() })?;
    let deliveries = Deliveries { changelog: P::CHANGELOG.map(|c| c.topic), ..Default::default() };
    let producer = spec
        .kafka
        .transactional_producer(&spec.transactional_id)
        .create_with_context(deliveries)?;
    let txn = Txn::new(producer, &spec.kafka)?;
    let clients = Clients(Some((consumer, txn)));
    let served = match &clients.0 {
        Some((consumer, txn)) => serve(spec, consumer, txn, &mut task, letters, shutdown).await,
        None => Ok(()),
    };
    if !clients.close().await {
        tracing::warn!(
            service = spec.service,
            "Kafka clients still closing; left to finish in the background"
        );
    }
    served
}

/// An incarnation's consumer and producer, closed on a thread of their own: closing a
/// client can block in librdkafka as long as a coordinator is unreachable (the consumer
/// leaves its group, the producer finishes what it has in flight), and that must stall
/// neither the next incarnation nor the process's exit. Also when the incarnation's future
/// is dropped rather than finished (a process giving up on its services at shutdown).
struct Clients(Option<(StreamConsumer<RebalanceLog>, Txn)>);

impl Clients {
    /// Closes them, waiting at most [`CLOSE_WAIT`]; false if they are still closing.
    async fn close(mut self) -> bool {
        let (closed, closing) = tokio::sync::oneshot::channel();
        let Some(clients) = self.0.take() else { return true };
        let closer = std::thread::Builder::new().name("kafka-close".into()).spawn(move || {
            drop(clients);
            let _ = closed.send(());
        });
        closer.is_ok() && tokio::time::timeout(CLOSE_WAIT, closing).await.is_ok()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if let Some(clients) = self.0.take() {
            let _ =
                std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(clients));
        }
    }
}

/// One incarnation's loop, until shutdown or a Kafka failure.
async fn serve<P: Processor>(
    spec: &PipelineSpec,
    consumer: &StreamConsumer<RebalanceLog>,
    txn: &Txn,
    task: &mut Task<P>,
    letters: &LetterForms,
    shutdown: &CancellationToken,
) -> Result<()> {
    txn.call("init_transactions", |p, t| p.init_transactions(t)).await?;
    consumer.subscribe(&spec.inputs)?;
    tracing::info!(service = spec.service, inputs = ?spec.inputs, group = %spec.group_id, "pipeline started");

    // Between batches, even when no record comes: act on rebalances (restore, readiness)
    // and run the processor's tick when it is due.
    let mut housekeeping = tokio::time::interval(
        spec.tick_every.unwrap_or(Duration::from_millis(200)).min(Duration::from_millis(200)),
    );
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            biased;
            // Between batches nothing is in flight: stopping here loses nothing.
            _ = shutdown.cancelled() => break,
            // Between batches too: the processor's state matches what is committed.
            _ = housekeeping.tick() => {
                // Partitions revoked meanwhile must not be acted on by this instance.
                apply_rebalances(spec, consumer, task).await?;
                task.sync_stores()?;
                if let Some(every) = spec.tick_every {
                    if last_tick.elapsed() >= every {
                        last_tick = tokio::time::Instant::now();
                        let out = task.tick(SystemTime::now()).await?;
                        if !out.is_empty() {
                            commit_outputs(txn, &out).await?;
                        }
                        task.committed(&txn.producer.context().take())?;
                    }
                }
                continue;
            }
            message = consumer.recv() => message.map(|m| Input::from_message(&m)),
        };
        let mut batch = match first {
            Ok(input) => vec![input],
            Err(error) => {
                tracing::warn!(service = spec.service, %error, "consumer error");
                continue;
            }
        };
        // Take what is already buffered, up to the batch size; under a commit interval,
        // wait that long after the first record for more.
        let linger_until =
            tokio::time::Instant::now() + Duration::from_millis(spec.kafka.commit_interval_ms);
        while batch.len() < spec.max_batch {
            if consumer.context().pending() {
                break;
            }
            let next = match consumer.recv().now_or_never() {
                None if tokio::time::Instant::now() < linger_until => {
                    tokio::time::timeout_at(linger_until, consumer.recv()).await.ok()
                }
                next => next,
            };
            match next {
                Some(Ok(message)) => batch.push(Input::from_message(&message)),
                Some(Err(error)) => {
                    tracing::warn!(service = spec.service, %error, "consumer error");
                    break;
                }
                None => break,
            }
        }
        if apply_rebalances(spec, consumer, task).await? {
            // A rebalance happened while the batch was read. Records read before it belong
            // to the old assignment: drop them, they are fetched again from the committed
            // offset by whoever owns their partition now. Keep only what came after.
            let owned = current_partitions(consumer)?;
            batch.retain(|input| owned.contains(&input.partition));
            if batch.is_empty() {
                continue;
            }
        }
        process_batch(spec, consumer, txn, task, letters, &batch).await?;
        tracing::debug!(service = spec.service, records = batch.len(), "batch committed");
    }
    tracing::info!(service = spec.service, "pipeline stopped");
    Ok(())
}

/// Acts on rebalances recorded since the last call (state restored or dropped); true if
/// any.
async fn apply_rebalances<P: Processor>(
    spec: &PipelineSpec,
    consumer: &StreamConsumer<RebalanceLog>,
    task: &mut Task<P>,
) -> Result<bool> {
    let events = consumer.context().take();
    let any = !events.is_empty();
    for event in events {
        match event {
            RebalanceEvent::Revoked(partitions) => {
                tracing::info!(service = spec.service, ?partitions, "partitions revoked");
                task.revoke(&partitions);
            }
            RebalanceEvent::Assigned(partitions) => {
                tracing::info!(service = spec.service, ?partitions, "partitions assigned");
                task.assign(&spec.kafka, &partitions).await?;
                crate::ops::health().set_ready(&spec.group_id, true);
            }
        }
    }
    Ok(any)
}

/// Produces `outputs` in a transaction of their own (no input offsets).
async fn commit_outputs(txn: &Txn, outputs: &[Output]) -> Result<()> {
    txn.producer.context().take();
    txn.producer.begin_transaction()?;
    for output in outputs {
        if let Err(error) = send(&txn.producer, output).await {
            txn.abort().await;
            return Err(error);
        }
    }
    txn.finish(None).await
}

fn current_partitions(consumer: &StreamConsumer<RebalanceLog>) -> Result<BTreeSet<i32>> {
    Ok(partitions_of(&consumer.assignment()?))
}

async fn process_batch<P: Processor>(
    spec: &PipelineSpec,
    consumer: &StreamConsumer<RebalanceLog>,
    txn: &Txn,
    task: &mut Task<P>,
    letters: &LetterForms,
    batch: &[Input],
) -> Result<()> {
    // The transaction opens only once the batch is processed: a processor that waits on a
    // gateway must not hold it open (the broker aborts transactions older than
    // transaction.timeout.ms).
    let spans: Vec<_> =
        batch.iter().map(|input| crate::telemetry::process_span(&spec.group_id, input)).collect();
    let answers = task.process(batch).await?;
    if answers.len() != batch.len() {
        // Committing past an unanswered record would lose it.
        return Err(Error::Processor(format!(
            "{} answered {} of {} records",
            spec.service,
            answers.len(),
            batch.len()
        )));
    }
    txn.producer.context().take();
    txn.producer.context().take_letter_refusals();
    txn.producer.begin_transaction()?;
    let mut offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    // Counted per batch, once it is committed.
    let mut consumed: BTreeMap<&str, u64> = BTreeMap::new();
    let mut produced: BTreeMap<&str, u64> = BTreeMap::new();
    let mut refused: BTreeMap<(&str, std::borrow::Cow<'static, str>), u64> = BTreeMap::new();
    // The records of this batch answered with a dead letter; letters left out, per topic.
    let mut lettered = Vec::new();
    let mut unwritten: BTreeMap<&str, u64> = BTreeMap::new();
    for ((input, answer), cx) in batch.iter().zip(answers).zip(spans) {
        *consumed.entry(input.topic.as_str()).or_default() += 1;
        let out = answer.unwrap_or_else(|refusal| {
            let reason = refusal.to_string();
            crate::telemetry::refused(&cx, &reason);
            *refused.entry((input.topic.as_str(), refusal.class())).or_default() += 1;
            tracing::warn!(
                service = spec.service,
                topic = %input.topic,
                partition = input.partition,
                offset = input.offset,
                %reason,
                "record refused; sent to the dead-letter topic"
            );
            vec![dead_letter(input, spec.service, &reason)]
        });
        if out.iter().any(|o| o.topic == topup_proto::topics::DLQ) {
            lettered.push(record_at(input));
        }
        let (out, left_out) = letters.apply(out, input, spec.service);
        if left_out > 0 {
            *unwritten.entry(input.topic.as_str()).or_default() += left_out;
        }
        for mut output in out {
            let sending = crate::telemetry::send_span(&cx, &mut output);
            let sent = send(&txn.producer, &output).await;
            drop(sending);
            if let Err(error) = sent {
                if let Error::Kafka(kafka) = &error {
                    if output.topic == topup_proto::topics::DLQ && refuses_letter(kafka) {
                        let whose = Some(record_at(input));
                        txn.producer.context().refuse_letter(whose, kafka.to_string());
                    }
                }
                // A letter refused earlier in the batch makes the transaction fail here, at a
                // later record: its delivery report says whose it was.
                let _ = txn.call("delivery reports", wait_for_deliveries).await;
                letters.after_failure(txn.producer.context(), &lettered, spec.service);
                txn.abort().await;
                return Err(error);
            }
            *produced.entry(output.topic).or_default() += 1;
        }
        crate::telemetry::end(cx);
        offsets.insert((input.topic.as_str(), input.partition), input.offset + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    let metadata = consumer
        .group_metadata()
        .ok_or_else(|| Error::Timeout("consumer has no group metadata yet".into()))?;
    // On failure the outputs are discarded and the offsets not advanced; the processor's
    // memory is now ahead of Kafka, so this incarnation ends and the next one restores it.
    if let Err(error) = txn.finish(Some((list.clone(), metadata))).await {
        letters.after_failure(txn.producer.context(), &lettered, spec.service);
        return Err(error);
    }
    letters.committed(&lettered);
    // Committed: the stores take the batch's state, checkpointed at its changelog records.
    task.committed(&txn.producer.context().take())?;
    // Counted before the offsets become visible to the group (tests wait on those).
    let metrics = crate::ops::pipeline_metrics();
    for (topic, n) in consumed {
        metrics.consumed.inc_by(&[("service", spec.service), ("topic", topic)], n);
    }
    for (topic, n) in produced {
        metrics.produced.inc_by(&[("service", spec.service), ("topic", topic)], n);
    }
    for (topic, n) in unwritten {
        metrics.dead_letters_unwritten.inc_by(&[("service", spec.service), ("topic", topic)], n);
    }
    for ((topic, class), n) in refused {
        let labels = [("service", spec.service), ("topic", topic), ("reason", class.as_ref())];
        metrics.dead_letters.inc_by(&labels, n);
    }
    // On the mock cluster only, the same offsets again as a plain commit: it acknowledges
    // the transactional offset commit but does not store it (rdkafka_mock_handlers.c,
    // TxnOffsetCommit), so without this a restarted consumer would start from the
    // beginning. On Apache Kafka the transaction committed them (docs/guarantees.md).
    if spec.kafka.mock_cluster {
        if let Err(error) = consumer.commit(&list, CommitMode::Async) {
            tracing::warn!(service = spec.service, %error, "plain offset commit failed");
        }
    }
    Ok(())
}

/// Serves delivery reports until every record sent is acknowledged. `commit_transaction`
/// flushes by itself, but with rust-rdkafka's `BaseProducer` (delivery reports as events)
/// its wait only ends on a 100 ms timer: measured here, every transaction took 100 ms
/// however small. Polling the reports without blocking ends the wait as soon as the
/// broker has acknowledged (1–5 ms per batch on the mock cluster).
fn wait_for_deliveries(
    producer: &BaseProducer,
    timeout: Duration,
) -> std::result::Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if std::time::Instant::now() > deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut));
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

async fn send(producer: &BaseProducer, output: &Output) -> Result<()> {
    let mut headers = OwnedHeaders::new();
    for (key, value) in &output.headers {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    loop {
        let mut record =
            BaseRecord::<[u8], [u8]>::to(output.topic).key(&output.key).headers(headers.clone());
        if let Some(payload) = &output.payload {
            record = record.payload(payload);
        }
        if let Some(partition) = output.partition {
            record = record.partition(partition);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // Backpressure: serve delivery reports to make room, then try again.
                producer.poll(Duration::from_millis(10));
                tokio::task::yield_now().await;
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::{MockCluster, MockCoordinator};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// librdkafka #5456 on the mock cluster: with the group's coordinator down,
    /// `send_offsets_to_transaction` does not keep its timeout. The pipeline stops waiting
    /// for it after the timeout and the grace, and goes on (the next incarnation).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transactional_call_stuck_in_librdkafka_is_given_up_after_its_timeout() -> TestResult
    {
        let cluster = MockCluster::new(3)?;
        cluster.create_topic("in", 1, 1)?;
        cluster.create_topic("out", 1, 1)?;
        for topic in ["in", "out"] {
            cluster.partition_leader(topic, 0, Some(1))?;
        }
        cluster.coordinator(MockCoordinator::Transaction("txn".into()), 1)?;
        cluster.coordinator(MockCoordinator::Group("group".into()), 3)?;
        let mut kafka = KafkaArgs::new(cluster.bootstrap_servers());
        kafka.transaction_timeout_ms = 2_000;
        let producer =
            kafka.transactional_producer("txn").create_with_context(Deliveries::default())?;
        let txn = Txn::new(producer, &kafka)?;
        txn.call("init_transactions", |p, t| p.init_transactions(t)).await?;
        txn.producer.begin_transaction()?;
        send(&txn.producer, &Output::tombstone("out", "key")).await?;
        txn.call("delivery", wait_for_deliveries).await?;
        let consumer: BaseConsumer = kafka.group_consumer("group").create()?;
        let metadata = consumer.group_metadata().ok_or("no group metadata")?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("in", 0, Offset::Offset(1))?;

        cluster.broker_down(3)?;
        let started = std::time::Instant::now();
        let sent = txn
            .call("send_offsets_to_transaction", move |p, t| {
                p.send_offsets_to_transaction(&offsets, &metadata, t)
            })
            .await;
        let waited = started.elapsed();
        cluster.broker_up(3)?;

        assert!(matches!(sent, Err(Error::Timeout(_))), "librdkafka answered: {sent:?}");
        let limit = Duration::from_millis(2_000) + TXN_GRACE;
        assert!(waited >= limit && waited < limit + Duration::from_secs(2), "waited {waited:?}");

        // Nothing more is asked of it: the abort and any later call do not queue behind the
        // stuck call (they would wait another timeout each).
        let started = std::time::Instant::now();
        txn.abort().await;
        let commit = txn.call("commit_transaction", |p, t| p.commit_transaction(t)).await;
        assert!(matches!(commit, Err(Error::Timeout(_))), "{commit:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        Ok(())
    }
}
