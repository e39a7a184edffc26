//! The business part of a service, and the task that hosts it (Kafka Streams' processor and
//! stream task). A service says how a record becomes a key and an event, and what an event
//! does to that key's state; the [`Task`] owns the state of every assigned partition, hands
//! each record its key's state, puts it back on every path, undoes what a refused record
//! did to it, writes what changed to the changelog under the keys the processor derives,
//! and rebuilds it from the changelog on assignment.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use crate::{read_partition_to_end, Error, Input, KafkaArgs, Output, Refusal, Result};

/// How long restoring one partition's state may take.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// What one input record gives: its outputs, or why it was refused.
pub type Answer = std::result::Result<Vec<Output>, Refusal>;

/// A changelog record: the key it is written under and the value, `None` for a tombstone.
pub type StateRecord = (String, Option<Vec<u8>>);

/// The business part of a service. Records of one key are processed one after the other in
/// partition order; records of different keys may be processed at once (up to
/// [`Processor::concurrency`]), which is what a processor that waits on the outside world
/// (a gateway, a mail server) needs.
pub trait Processor: Send + Sync + 'static {
    /// What a record means once decoded and validated.
    type Event: Send;
    /// One key's state. A key with none is `None`; a processor that sets it to `None`
    /// forgets the key (its changelog records are tombstoned).
    type State: Clone + Send + Sync + 'static;
    /// Worked out once per batch before any of its records is processed.
    type Batch: Send + Sync;

    /// Where the state is kept; `None` for a processor without state.
    const CHANGELOG: Option<Changelog<Self::State>> = None;

    /// Decodes and validates a record into the key its state is kept under and the event.
    /// Pure: a refusal here sends the record to the dead-letter topic untouched.
    fn decode(&self, input: &Input) -> std::result::Result<(String, Self::Event), Refusal>;

    /// Works out what the whole batch needs (the payment worker: whether its view of the
    /// rules has caught up).
    fn begin_batch(&self, batch: &[Input]) -> impl Future<Output = Self::Batch> + Send;

    /// Applies `event` (from `input`) to its key's `state` and answers the records to
    /// produce. On a refusal the state is put back as it was before this call.
    fn process(
        &self,
        input: &Input,
        batch: &Self::Batch,
        state: &mut Option<Self::State>,
        event: Self::Event,
    ) -> impl Future<Output = Answer> + Send;

    /// Keys processed at once within a batch.
    fn concurrency(&self) -> usize {
        1
    }

    /// Whether [`Processor::on_due`] should run for this state at this tick.
    fn due(&self, state: &Self::State, now: SystemTime) -> bool {
        let _ = (state, now);
        false
    }

    /// What comes due for a key without an input record (a notification held over quiet
    /// hours, a top-up waiting too long for its result), with the state changes it makes.
    fn on_due(
        &self,
        key: &str,
        state: &mut Option<Self::State>,
        now: SystemTime,
    ) -> impl Future<Output = Vec<Output>> + Send {
        let _ = (key, state, now);
        async { Vec::new() }
    }

    /// Every due key of this tick was looked at.
    fn ticked(&self, now: SystemTime) {
        let _ = now;
    }

    /// Partitions were assigned (their state is restored by then).
    fn assigned(&self, partitions: &BTreeSet<i32>) {
        let _ = partitions;
    }
}

/// A state's changelog: its topic (same partition count as the processor's inputs,
/// compacted), under which keys a change is written and how records fold back into states.
pub struct Changelog<S> {
    /// The compacted topic.
    pub topic: &'static str,
    /// The records that bring a key's state from `before` to `after`; none when nothing
    /// that is kept changed.
    pub records: fn(key: &str, before: Option<&S>, after: Option<&S>) -> Vec<StateRecord>,
    /// Folds one record (its key and value, `None` for a tombstone) into the states of its
    /// partition; an error names what is wrong with the record.
    pub restore: RestoreRecord<S>,
}

/// See [`Changelog::restore`].
pub type RestoreRecord<S> = fn(
    states: &mut HashMap<String, S>,
    key: &str,
    value: Option<&[u8]>,
) -> std::result::Result<(), String>;

impl<S: prost::Message + PartialEq + Default> Changelog<S> {
    /// A state kept whole under its key, as one protobuf message.
    pub const fn whole(topic: &'static str) -> Self {
        Self { topic, records: whole_state_records::<S>, restore: restore_whole::<S> }
    }
}

fn whole_state_records<T: prost::Message + PartialEq>(
    key: &str,
    before: Option<&T>,
    after: Option<&T>,
) -> Vec<StateRecord> {
    if before == after {
        return Vec::new();
    }
    vec![(key.to_string(), after.map(prost::Message::encode_to_vec))]
}

fn restore_whole<T: prost::Message + Default>(
    states: &mut HashMap<String, T>,
    key: &str,
    value: Option<&[u8]>,
) -> std::result::Result<(), String> {
    match value {
        None => {
            states.remove(key);
        }
        Some(bytes) => {
            states.insert(key.to_string(), T::decode(bytes).map_err(|e| e.to_string())?);
        }
    }
    Ok(())
}

/// How a record refused as [`Refusal::Transient`] is processed again.
#[derive(Debug, Clone, Copy)]
pub struct TransientRetry {
    /// Attempts, the first included; past them the batch is given up (the pipeline's
    /// incarnation ends and the records are read again by the next one).
    pub attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub backoff: Duration,
}

impl Default for TransientRetry {
    fn default() -> Self {
        Self { attempts: 5, backoff: Duration::from_millis(100) }
    }
}

/// A processor and the state of the partitions assigned to it.
pub struct Task<P: Processor> {
    processor: P,
    partitions: HashMap<i32, HashMap<String, P::State>>,
    retry: TransientRetry,
}

/// One key's records of a batch: their indexes in the batch and events.
type Jobs<E> = Vec<(usize, E)>;

impl<P: Processor> Task<P> {
    /// A task with no partitions yet.
    pub fn new(processor: P) -> Self {
        Self { processor, partitions: HashMap::new(), retry: TransientRetry::default() }
    }

    /// Processes transient refusals again under `retry`.
    pub fn with_transient_retry(mut self, retry: TransientRetry) -> Self {
        self.retry = retry;
        self
    }

    /// The processor.
    pub fn processor(&self) -> &P {
        &self.processor
    }

    /// The state of `key` in `partition`, if it has one.
    pub fn state(&self, partition: i32, key: &str) -> Option<&P::State> {
        self.partitions.get(&partition)?.get(key)
    }

    /// Keys with state in every assigned partition.
    pub fn len(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }

    /// No key has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rebuilds the state of newly assigned `partitions` from the changelog. Unreadable
    /// records are logged and skipped (the next change of that key replaces them).
    pub async fn assign(&mut self, kafka: &KafkaArgs, partitions: &BTreeSet<i32>) -> Result<()> {
        if let Some(Changelog { topic, .. }) = P::CHANGELOG {
            for &partition in partitions {
                let reader = kafka.clone();
                let records = tokio::task::spawn_blocking(move || {
                    read_partition_to_end(&reader, topic, partition, RESTORE_DEADLINE)
                })
                .await??;
                for record in &records {
                    let Some(key) = record.key_str() else { continue };
                    self.restore(partition, key, record.payload.as_deref(), record.offset, topic);
                }
                let states = self.partitions.entry(partition).or_default().len();
                tracing::info!(
                    topic,
                    partition,
                    keys = states,
                    records = records.len(),
                    "state restored"
                );
            }
        }
        self.processor.assigned(partitions);
        Ok(())
    }

    /// Folds one changelog record into `partition`'s state, as a restore does.
    pub fn restore_one(&mut self, partition: i32, key: &str, value: Option<&[u8]>) {
        let topic = P::CHANGELOG.map_or("", |changelog| changelog.topic);
        self.restore(partition, key, value, -1, topic);
    }

    fn restore(
        &mut self,
        partition: i32,
        key: &str,
        value: Option<&[u8]>,
        offset: i64,
        topic: &str,
    ) {
        let Some(changelog) = P::CHANGELOG else { return };
        let states = self.partitions.entry(partition).or_default();
        if let Err(error) = (changelog.restore)(states, key, value) {
            tracing::error!(topic, partition, offset, %error, "unreadable state record skipped");
        }
    }

    /// Forgets the state of revoked `partitions`.
    pub fn revoke(&mut self, partitions: &BTreeSet<i32>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    /// Processes a batch and answers, in input order, each record's outputs or refusal;
    /// the changelog records of what changed are part of the answers. Fails only when a
    /// transient refusal outlasted its retries: nothing of the batch may be committed then.
    pub async fn process(&mut self, batch: &[Input]) -> Result<Vec<Answer>> {
        let mut answers: Vec<Option<Answer>> = vec![None; batch.len()];
        let mut groups: BTreeMap<(i32, String), Jobs<P::Event>> = BTreeMap::new();
        for (index, input) in batch.iter().enumerate() {
            match self.processor.decode(input) {
                Ok((key, event)) => {
                    groups.entry((input.partition, key)).or_default().push((index, event))
                }
                Err(refusal) => answers[index] = Some(Err(refusal)),
            }
        }
        let context = self.processor.begin_batch(batch).await;
        let work: Vec<_> = groups
            .into_iter()
            .map(|((partition, key), jobs)| {
                let state = self.partitions.entry(partition).or_default().remove(&key);
                (partition, key, state, jobs)
            })
            .collect();
        let (processor, retry, context) = (&self.processor, self.retry, &context);
        let done: Vec<_> = futures::stream::iter(work.into_iter().map(
            |(partition, key, state, jobs)| async move {
                let before = state.clone();
                let (state, answered) =
                    process_key(processor, retry, batch, context, state, jobs).await;
                (partition, key, before, state, answered)
            },
        ))
        .buffer_unordered(self.processor.concurrency().max(1))
        .collect()
        .await;
        let mut given_up = None;
        for (partition, key, before, state, answered) in done {
            let records = state_records::<P>(partition, &key, before.as_ref(), state.as_ref());
            let states = self.partitions.entry(partition).or_default();
            match state {
                Some(state) => {
                    states.insert(key.clone(), state);
                }
                None => {
                    states.remove(&key);
                }
            }
            let last_ok = answered.iter().rev().find(|(_, a)| a.is_ok()).map(|(i, _)| *i);
            for (index, answer) in answered {
                if let Err(Refusal::Transient(reason)) = &answer {
                    given_up = Some(reason.clone());
                }
                answers[index] = Some(answer);
            }
            if let Some(Some(Ok(outputs))) = last_ok.and_then(|index| answers.get_mut(index)) {
                outputs.extend(records);
            }
        }
        if let Some(reason) = given_up {
            // The state of this batch's keys is ahead of what will be committed: the
            // caller ends the incarnation, and the next one restores it.
            return Err(Error::Transient(reason));
        }
        Ok(answers.into_iter().map(|a| a.unwrap_or_else(|| Ok(Vec::new()))).collect())
    }

    /// Runs [`Processor::on_due`] for every key whose state is due at `now`; answers the
    /// outputs with the changelog records of what changed.
    pub async fn tick(&mut self, now: SystemTime) -> Vec<Output> {
        let mut due = Vec::new();
        for (partition, states) in &self.partitions {
            for (key, state) in states {
                if self.processor.due(state, now) {
                    due.push((*partition, key.clone()));
                }
            }
        }
        let mut out = Vec::new();
        for (partition, key) in due {
            let states = self.partitions.entry(partition).or_default();
            let mut state = states.remove(&key);
            let before = state.clone();
            out.extend(self.processor.on_due(&key, &mut state, now).await);
            out.extend(state_records::<P>(partition, &key, before.as_ref(), state.as_ref()));
            if let Some(state) = state {
                self.partitions.entry(partition).or_default().insert(key, state);
            }
        }
        self.processor.ticked(now);
        out
    }
}

/// The changelog records of `key`'s change, on the partition of its input.
fn state_records<P: Processor>(
    partition: i32,
    key: &str,
    before: Option<&P::State>,
    after: Option<&P::State>,
) -> Vec<Output> {
    let Some(changelog) = P::CHANGELOG else { return Vec::new() };
    (changelog.records)(key, before, after)
        .into_iter()
        .map(|(key, value)| Output {
            topic: changelog.topic,
            partition: Some(partition),
            key: key.into_bytes(),
            payload: value,
            headers: Vec::new(),
        })
        .collect()
}

/// One key's records of a batch, in order, from `state`: each is processed with the state
/// the one before left, a refused one leaves it as it was, a transient refusal is processed
/// again after a backoff. Answers the state at the end and each record's answer.
async fn process_key<P: Processor>(
    processor: &P,
    retry: TransientRetry,
    batch: &[Input],
    context: &P::Batch,
    mut state: Option<P::State>,
    jobs: Jobs<P::Event>,
) -> (Option<P::State>, Vec<(usize, Answer)>) {
    let mut answered = Vec::with_capacity(jobs.len());
    for (index, event) in jobs {
        let input = &batch[index];
        let mut event = Some(event);
        let mut wait = retry.backoff;
        let mut attempt = 1;
        let answer = loop {
            // The first attempt has the decoded event; an attempt again decodes it anew
            // (decoding is pure, and it worked the first time).
            let Some(next) = event.take().or_else(|| processor.decode(input).ok().map(|(_, e)| e))
            else {
                break Err(Refusal::Transient("the record no longer decodes".into()));
            };
            let kept = state.clone();
            let answer = processor.process(input, context, &mut state, next).await;
            if answer.is_err() {
                state = kept;
            }
            match answer {
                Err(Refusal::Transient(reason)) if attempt < retry.attempts => {
                    tracing::warn!(
                        topic = %input.topic,
                        partition = input.partition,
                        offset = input.offset,
                        attempt,
                        ?wait,
                        %reason,
                        "record cannot be processed yet; processed again after a backoff"
                    );
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
                answer => break answer,
            }
        };
        let stop = matches!(answer, Err(Refusal::Transient(_)));
        answered.push((index, answer));
        if stop {
            // The key's later records must not be processed before this one.
            break;
        }
    }
    (state, answered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts `inc` records per key. `bad` changes the state and then refuses (the task
    /// must undo the change); `flaky` fails transiently until it has been tried `heals_at`
    /// times.
    struct Counter {
        tried: AtomicU32,
        heals_at: u32,
    }

    impl Counter {
        fn healing_at(heals_at: u32) -> Self {
            Self { tried: AtomicU32::new(0), heals_at }
        }
    }

    impl Processor for Counter {
        type Event = String;
        type State = u32;
        type Batch = ();
        const CHANGELOG: Option<Changelog<u32>> =
            Some(Changelog { topic: "counts", records: count_records, restore: restore_count });

        fn decode(&self, input: &Input) -> std::result::Result<(String, String), Refusal> {
            let value = input.payload.as_deref().ok_or(Refusal::NoValue)?;
            let key = input.key_str().unwrap_or_default().to_string();
            Ok((key, String::from_utf8_lossy(value).into_owned()))
        }

        async fn begin_batch(&self, _batch: &[Input]) {}

        async fn process(
            &self,
            _input: &Input,
            _batch: &(),
            state: &mut Option<u32>,
            event: String,
        ) -> Answer {
            let count = state.get_or_insert(0);
            *count += 1;
            match event.as_str() {
                "bad" => Err(Refusal::invalid("value", "is bad")),
                "flaky" if self.tried.fetch_add(1, Ordering::Relaxed) + 1 < self.heals_at => {
                    Err(Refusal::Transient("not yet".into()))
                }
                _ => Ok(vec![Output::tombstone("out", "x")]),
            }
        }

        fn due(&self, state: &u32, _now: SystemTime) -> bool {
            *state >= 2
        }

        async fn on_due(
            &self,
            _key: &str,
            state: &mut Option<u32>,
            _now: SystemTime,
        ) -> Vec<Output> {
            *state = None;
            vec![Output::tombstone("out", "due")]
        }
    }

    fn count_records(key: &str, before: Option<&u32>, after: Option<&u32>) -> Vec<StateRecord> {
        if before == after {
            return Vec::new();
        }
        vec![(key.to_string(), after.map(|n| n.to_string().into_bytes()))]
    }

    fn restore_count(
        states: &mut HashMap<String, u32>,
        key: &str,
        value: Option<&[u8]>,
    ) -> std::result::Result<(), String> {
        match value {
            None => states.remove(key),
            Some(v) => states.insert(
                key.to_string(),
                String::from_utf8_lossy(v).parse().map_err(|_| "not a count")?,
            ),
        };
        Ok(())
    }

    fn record(offset: i64, key: &str, value: &str) -> Input {
        Input {
            topic: "in".into(),
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(value.as_bytes().to_vec()),
            timestamp_ms: None,
            headers: Vec::new(),
        }
    }

    fn changelog(answer: &Answer) -> Vec<(String, Option<String>)> {
        let outputs = answer.as_ref().map(Vec::as_slice).unwrap_or_default();
        outputs
            .iter()
            .filter(|o| o.topic == "counts")
            .map(|o| {
                let key = String::from_utf8_lossy(&o.key).into_owned();
                (key, o.payload.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()))
            })
            .collect()
    }

    fn quick() -> TransientRetry {
        TransientRetry { attempts: 3, backoff: Duration::from_millis(1) }
    }

    #[tokio::test]
    async fn a_refused_record_leaves_the_state_as_it_was_and_what_changed_is_written_once(
    ) -> std::result::Result<(), Error> {
        let mut task = Task::new(Counter::healing_at(0));
        let batch = [
            record(0, "a", "inc"),
            record(1, "a", "bad"),
            record(2, "b", "inc"),
            record(3, "a", "inc"),
            Input { payload: None, ..record(4, "b", "") },
        ];
        let answers = task.process(&batch).await?;
        assert_eq!(answers.len(), batch.len());
        assert!(matches!(answers[1], Err(Refusal::Invalid(_))), "{:?}", answers[1]);
        assert!(matches!(answers[4], Err(Refusal::NoValue)), "{:?}", answers[4]);
        // The refusal undid its increment: two incs for a, one for b.
        assert_eq!(task.state(0, "a"), Some(&2));
        assert_eq!(task.state(0, "b"), Some(&1));
        // Each key's changelog record once, with the key's last answer that was not refused.
        assert_eq!(changelog(&answers[0]), []);
        assert_eq!(changelog(&answers[2]), [("b".to_string(), Some("1".to_string()))]);
        assert_eq!(changelog(&answers[3]), [("a".to_string(), Some("2".to_string()))]);

        // Restored from those records, a task holds the same state.
        let mut restored = Task::new(Counter::healing_at(0));
        for answer in &answers {
            for (key, value) in changelog(answer) {
                restored.restore_one(0, &key, value.as_deref().map(str::as_bytes));
            }
        }
        assert_eq!((restored.state(0, "a"), restored.state(0, "b")), (Some(&2), Some(&1)));

        // A tick: the due key (a, at 2) is forgotten and tombstoned; b is not due.
        let out = task.tick(SystemTime::now()).await;
        let tombstoned: Vec<_> =
            out.iter().filter(|o| o.topic == "counts" && o.payload.is_none()).collect();
        assert_eq!(tombstoned.len(), 1);
        assert_eq!(tombstoned[0].key, b"a");
        assert_eq!((task.state(0, "a"), task.state(0, "b")), (None, Some(&1)));
        Ok(())
    }

    #[tokio::test]
    async fn a_transient_refusal_is_processed_again_from_the_state_before_it(
    ) -> std::result::Result<(), Error> {
        // Heals at the third attempt: the record is answered, counted once.
        let mut task = Task::new(Counter::healing_at(3)).with_transient_retry(quick());
        let answers = task.process(&[record(0, "a", "flaky"), record(1, "a", "inc")]).await?;
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(task.processor().tried.load(Ordering::Relaxed), 3);
        assert_eq!(task.state(0, "a"), Some(&2));

        // Never heals within the attempts: the batch fails, nothing of it is kept for the
        // key, and no dead letter is answered for it.
        let mut task = Task::new(Counter::healing_at(10)).with_transient_retry(quick());
        let failed = task.process(&[record(0, "a", "inc"), record(1, "a", "flaky")]).await;
        assert!(matches!(failed, Err(Error::Transient(_))), "{failed:?}");
        assert_eq!(task.processor().tried.load(Ordering::Relaxed), 3);
        Ok(())
    }
}
