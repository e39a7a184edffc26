//! The business part of a service, and the task that hosts it (Kafka Streams' processor and
//! stream task). A service says how a record becomes a key and an event, and what an event
//! does to that key's state; the [`Task`] owns the state of every assigned partition, hands
//! each record its key's state, puts it back on every path, undoes what a refused record
//! did to it, writes what changed to the changelog under the keys the processor derives,
//! and rebuilds it from the changelog on assignment.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::num::NonZeroUsize;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use lru::LruCache;

use crate::restore::restore_store;
use crate::store::{PartitionStore, StoreBatch, StoreConfig};
use crate::{Error, Input, KafkaArgs, Output, Refusal, Result};

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

    /// When [`Processor::on_due`] should run for this state (`None`: nothing is to come
    /// without an input record). Kept in an index with the state, so that a tick looks only
    /// at the keys that are due.
    fn due_at(&self, state: &Self::State, now: SystemTime) -> Option<SystemTime> {
        let _ = (state, now);
        None
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
}

/// A state's changelog: its topic (same partition count as the processor's inputs,
/// compacted), under which keys a change is written and how records fold back into states.
/// The local store (see [`crate::store`]) holds these same records under the same keys.
pub struct Changelog<S> {
    /// The compacted topic.
    pub topic: &'static str,
    /// The records that bring a key's state from `before` to `after`; none when nothing
    /// that is kept changed.
    pub records: fn(key: &str, before: Option<&S>, after: Option<&S>) -> Vec<StateRecord>,
    /// The changelog keys a key's state is written under, in the order `restore` folds them.
    pub keys: fn(key: &str) -> Vec<String>,
    /// The key whose state changelog key `changelog_key` holds (part of).
    pub owner: fn(changelog_key: &str) -> &str,
    /// Folds the record written under `changelog_key` into `key`'s state; an error names
    /// what is wrong with the record.
    pub restore: RestoreRecord<S>,
}

/// See [`Changelog::restore`].
pub type RestoreRecord<S> = fn(
    state: &mut Option<S>,
    key: &str,
    changelog_key: &str,
    value: &[u8],
) -> std::result::Result<(), String>;

impl<S: prost::Message + PartialEq + Default> Changelog<S> {
    /// A state kept whole under its key, as one protobuf message.
    pub const fn whole(topic: &'static str) -> Self {
        Self {
            topic,
            records: whole_state_records::<S>,
            keys: |key| vec![key.to_string()],
            owner: |changelog_key| changelog_key,
            restore: restore_whole::<S>,
        }
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
    state: &mut Option<T>,
    _key: &str,
    _changelog_key: &str,
    value: &[u8],
) -> std::result::Result<(), String> {
    *state = Some(T::decode(value).map_err(|e| e.to_string())?);
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

/// One key's records of a batch: their indexes in the batch and events.
type Jobs<E> = Vec<(usize, E)>;

/// Keys a tick looks at per partition, at most; the rest wait for the next tick.
const DUE_PER_TICK: usize = 10_000;

/// A processor and the state of the partitions assigned to it.
pub struct Task<P: Processor> {
    processor: P,
    partitions: HashMap<i32, Partition<P::State>>,
    retry: TransientRetry,
    store: StoreConfig,
    /// Whose stores these are (the pipeline's transactional id).
    instance: String,
}

/// One assigned partition's state: the store, the states read from it lately, and what work
/// not yet committed to Kafka changed.
struct Partition<S> {
    store: PartitionStore,
    cache: LruCache<String, Option<S>>,
    pending: HashMap<String, Option<S>>,
    batch: StoreBatch,
}

impl<S: Clone> Partition<S> {
    fn new(store: PartitionStore, cache_entries: usize) -> Self {
        let entries = NonZeroUsize::new(cache_entries).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            cache: LruCache::new(entries),
            pending: HashMap::new(),
            batch: StoreBatch::default(),
        }
    }

    /// `key`'s state: as uncommitted work left it, as cached, or as read from the store.
    fn load(&mut self, changelog: &Changelog<S>, partition: i32, key: &str) -> Option<S> {
        if let Some(state) = self.pending.get(key) {
            return state.clone();
        }
        if let Some(state) = self.cache.get(key) {
            return state.clone();
        }
        let state = self.read(changelog, partition, key);
        self.cache.put(key.to_string(), state.clone());
        state
    }

    /// `key`'s state as the store holds it.
    fn read(&self, changelog: &Changelog<S>, partition: i32, key: &str) -> Option<S> {
        let mut state = None;
        for changelog_key in (changelog.keys)(key) {
            let value = match self.store.get(&changelog_key) {
                Ok(Some(value)) => value,
                Ok(None) => continue,
                Err(error) => {
                    tracing::error!(topic = changelog.topic, partition, key, %error, "state store unreadable");
                    continue;
                }
            };
            if let Err(error) = (changelog.restore)(&mut state, key, &changelog_key, &value) {
                // The next change of that key replaces it.
                tracing::error!(topic = changelog.topic, partition, key = %changelog_key, %error, "unreadable state record skipped");
            }
        }
        state
    }
}

fn seconds_of(time: SystemTime) -> i64 {
    crate::timestamp_of(time).seconds
}

impl<P: Processor> Task<P> {
    /// A task with no partitions yet, its stores in memory.
    pub fn new(processor: P) -> Self {
        Self {
            processor,
            partitions: HashMap::new(),
            retry: TransientRetry::default(),
            store: StoreConfig { dir: None, cache_entries: 20_000, page_cache_bytes: 16 << 20 },
            instance: String::new(),
        }
    }

    /// Processes transient refusals again under `retry`.
    pub fn with_transient_retry(mut self, retry: TransientRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Keeps the partitions' stores as `store` says, as those of `instance`.
    pub fn with_store(mut self, store: StoreConfig, instance: &str) -> Self {
        self.store = store;
        self.instance = instance.to_string();
        self
    }

    /// The processor.
    pub fn processor(&self) -> &P {
        &self.processor
    }

    /// The state of `key` in `partition`, if it has one.
    pub fn state(&self, partition: i32, key: &str) -> Option<P::State> {
        let changelog = P::CHANGELOG?;
        let part = self.partitions.get(&partition)?;
        if let Some(state) = part.pending.get(key) {
            return state.clone();
        }
        if let Some(state) = part.cache.peek(key) {
            return state.clone();
        }
        part.read(&changelog, partition, key)
    }

    fn partition(&mut self, partition: i32) -> Result<&mut Partition<P::State>> {
        let changelog = P::CHANGELOG.map_or("", |c| c.topic);
        match self.partitions.entry(partition) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let store =
                    PartitionStore::open(&self.store, &self.instance, changelog, partition)?;
                Ok(entry.insert(Partition::new(store, self.store.cache_entries)))
            }
        }
    }

    fn load(&mut self, partition: i32, key: &str) -> Result<Option<P::State>> {
        let Some(changelog) = P::CHANGELOG else { return Ok(None) };
        Ok(self.partition(partition)?.load(&changelog, partition, key))
    }

    /// Keeps `after` as `key`'s state until the work is committed, with the changelog
    /// records of the change (answered, to be produced) and when the key comes due (not
    /// before `not_before`).
    fn put(
        &mut self,
        partition: i32,
        key: &str,
        before: Option<&P::State>,
        after: Option<P::State>,
        not_before: Option<i64>,
    ) -> Result<Vec<Output>> {
        let Some(changelog) = P::CHANGELOG else { return Ok(Vec::new()) };
        let records = (changelog.records)(key, before, after.as_ref());
        let now = SystemTime::now();
        let due = after
            .as_ref()
            .and_then(|state| self.processor.due_at(state, now))
            .map(|when| seconds_of(when).max(not_before.unwrap_or(i64::MIN)));
        let part = self.partition(partition)?;
        part.batch.records.extend(records.iter().cloned());
        part.batch.due.push((key.to_string(), due));
        part.pending.insert(key.to_string(), after);
        Ok(records
            .into_iter()
            .map(|(key, value)| Output {
                topic: changelog.topic,
                partition: Some(partition),
                key: key.into_bytes(),
                payload: value,
                headers: Vec::new(),
            })
            .collect())
    }

    /// The work answered since the last call is committed to Kafka, its changelog records
    /// at up to the offsets `delivered` (by partition): the stores take it, checkpointed.
    pub fn committed(&mut self, delivered: &HashMap<i32, i64>) -> Result<()> {
        for (partition, part) in &mut self.partitions {
            if part.batch.is_empty() && part.pending.is_empty() {
                continue;
            }
            let mut batch = std::mem::take(&mut part.batch);
            if !batch.records.is_empty() {
                batch.checkpoint = delivered.get(partition).map(|offset| offset + 1);
            }
            part.store.apply(&batch)?;
            for (key, state) in part.pending.drain() {
                part.cache.put(key, state);
            }
        }
        Ok(())
    }

    /// Brings the stores of newly assigned `partitions` up to the end of the changelog:
    /// from their checkpoint when they have one, from the beginning otherwise.
    pub async fn assign(&mut self, kafka: &KafkaArgs, partitions: &BTreeSet<i32>) -> Result<()> {
        let Some(changelog) = P::CHANGELOG else { return Ok(()) };
        for &partition in partitions {
            self.partitions.remove(&partition);
            let store =
                PartitionStore::open(&self.store, &self.instance, changelog.topic, partition)?;
            let (reader, instance) = (kafka.clone(), self.instance.clone());
            let (store, touched, records) = tokio::task::spawn_blocking(move || {
                let mut store = store;
                let at = (changelog.topic, partition);
                restore_store(&reader, &mut store, at, changelog.owner, &instance)
                    .map(|(touched, records)| (store, touched, records))
            })
            .await??;
            crate::ops::pipeline_metrics().restored.inc_by(&[("topic", changelog.topic)], records);
            let mut part = Partition::new(store, self.store.cache_entries);
            // The due index of every key the replay changed.
            let now = SystemTime::now();
            let mut due = StoreBatch::default();
            for key in touched {
                let when = part
                    .read(&changelog, partition, &key)
                    .and_then(|state| self.processor.due_at(&state, now))
                    .map(seconds_of);
                due.due.push((key, when));
            }
            part.store.apply(&due)?;
            self.partitions.insert(partition, part);
        }
        Ok(())
    }

    /// Writes one changelog record into `partition`'s store, as a restore does.
    pub fn restore_one(&mut self, partition: i32, key: &str, value: Option<&[u8]>) -> Result<()> {
        let Some(changelog) = P::CHANGELOG else { return Ok(()) };
        let part = self.partition(partition)?;
        let batch = StoreBatch {
            records: vec![(key.to_string(), value.map(<[u8]>::to_vec))],
            ..StoreBatch::default()
        };
        part.store.apply(&batch)?;
        part.cache.pop((changelog.owner)(key));
        Ok(())
    }

    /// Makes the stores durable when their last durable commit is a while ago (between
    /// batches: what a crash loses of a store is then at most that while's changelog, which
    /// a restart replays).
    pub fn sync_stores(&mut self) -> Result<()> {
        for part in self.partitions.values_mut() {
            part.store.sync_if_stale()?;
        }
        Ok(())
    }

    /// Closes the stores of revoked `partitions`.
    pub fn revoke(&mut self, partitions: &BTreeSet<i32>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    /// Processes a batch and answers, in input order, each record's outputs or refusal;
    /// the changelog records of what changed are part of the answers. Fails when a
    /// transient refusal outlasted its retries (nothing of the batch may be committed
    /// then) or a store cannot be read.
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
        let mut work = Vec::with_capacity(groups.len());
        for ((partition, key), jobs) in groups {
            let state = self.load(partition, &key)?;
            work.push((partition, key, state, jobs));
        }
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
            let records = self.put(partition, &key, before.as_ref(), state, None)?;
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
            // caller ends the incarnation, and the next one reads the stores again.
            return Err(Error::Transient(reason));
        }
        Ok(answers.into_iter().map(|a| a.unwrap_or_else(|| Ok(Vec::new()))).collect())
    }

    /// Runs [`Processor::on_due`] for the keys due at `now` (found in the due index, not by
    /// looking at every key); answers the outputs with the changelog records of what
    /// changed.
    pub async fn tick(&mut self, now: SystemTime) -> Result<Vec<Output>> {
        let second = seconds_of(now);
        let mut due = Vec::new();
        for (partition, part) in &self.partitions {
            for key in part.store.due_until(second, DUE_PER_TICK)? {
                due.push((*partition, key));
            }
        }
        let mut out = Vec::new();
        for (partition, key) in due {
            let mut state = self.load(partition, &key)?;
            let before = state.clone();
            let is_due = state
                .as_ref()
                .and_then(|s| self.processor.due_at(s, now))
                .is_some_and(|when| when <= now);
            if is_due {
                out.extend(self.processor.on_due(&key, &mut state, now).await);
            }
            // Not due again within this second, whatever the processor says (a key whose
            // work cannot be done yet must not be looked at on every tick).
            out.extend(self.put(partition, &key, before.as_ref(), state, Some(second + 1))?);
        }
        Ok(out)
    }
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
        const CHANGELOG: Option<Changelog<u32>> = Some(Changelog {
            topic: "counts",
            records: count_records,
            keys: |key| vec![key.to_string()],
            owner: |key| key,
            restore: restore_count,
        });

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

        fn due_at(&self, state: &u32, now: SystemTime) -> Option<SystemTime> {
            (*state >= 2).then_some(now)
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
        state: &mut Option<u32>,
        _key: &str,
        _changelog_key: &str,
        value: &[u8],
    ) -> std::result::Result<(), String> {
        *state = Some(String::from_utf8_lossy(value).parse().map_err(|_| "not a count")?);
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
        assert_eq!(task.state(0, "a"), Some(2));
        assert_eq!(task.state(0, "b"), Some(1));
        // Each key's changelog record once, with the key's last answer that was not refused.
        assert_eq!(changelog(&answers[0]), []);
        assert_eq!(changelog(&answers[2]), [("b".to_string(), Some("1".to_string()))]);
        assert_eq!(changelog(&answers[3]), [("a".to_string(), Some("2".to_string()))]);

        // Restored from those records, a task holds the same state.
        let mut restored = Task::new(Counter::healing_at(0));
        for answer in &answers {
            for (key, value) in changelog(answer) {
                restored.restore_one(0, &key, value.as_deref().map(str::as_bytes))?;
            }
        }
        assert_eq!((restored.state(0, "a"), restored.state(0, "b")), (Some(2), Some(1)));

        // A tick: the due key (a, at 2) is forgotten and tombstoned; b is not due.
        task.committed(&HashMap::new())?;
        let out = task.tick(SystemTime::now()).await?;
        let tombstoned: Vec<_> =
            out.iter().filter(|o| o.topic == "counts" && o.payload.is_none()).collect();
        assert_eq!(tombstoned.len(), 1);
        assert_eq!(tombstoned[0].key, b"a");
        assert_eq!((task.state(0, "a"), task.state(0, "b")), (None, Some(1)));
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
        assert_eq!(task.state(0, "a"), Some(2));

        // Never heals within the attempts: the batch fails, nothing of it is kept for the
        // key, and no dead letter is answered for it.
        let mut task = Task::new(Counter::healing_at(10)).with_transient_retry(quick());
        let failed = task.process(&[record(0, "a", "inc"), record(1, "a", "flaky")]).await;
        assert!(matches!(failed, Err(Error::Transient(_))), "{failed:?}");
        assert_eq!(task.processor().tried.load(Ordering::Relaxed), 3);
        Ok(())
    }
}
