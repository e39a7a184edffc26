//! Per-partition state kept in a changelog topic, Kafka Streams' way: each change is a
//! record keyed by the subscriber, written to the same partition number as the input that
//! caused it and in the same transaction; on assignment a partition's state is rebuilt by
//! reading its changelog partition to the end. A state may be spread over several keys
//! (the evaluator writes a subscriber's rule apart from the rest): [`ApplyRecord`] folds
//! each record into the partition's states.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::{read_partition_to_end, KafkaArgs, Output, Result};

/// How long restoring one partition's state may take.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// Applies one changelog record (its key, and its value or `None` for a tombstone) to the
/// states of its partition; an error names what is wrong with the record.
pub type ApplyRecord<T> =
    fn(&mut HashMap<String, T>, &str, Option<&[u8]>) -> std::result::Result<(), String>;

/// The [`ApplyRecord`] of a changelog with one record per key: the value is the whole state.
pub fn apply_whole<T: prost::Message + Default>(
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

/// State per input partition, then per subscriber id.
pub struct StateStore<T> {
    kafka: KafkaArgs,
    changelog: &'static str,
    apply: ApplyRecord<T>,
    partitions: HashMap<i32, HashMap<String, T>>,
}

impl<T> StateStore<T> {
    /// An empty store backed by `changelog`.
    pub fn new(kafka: KafkaArgs, changelog: &'static str, apply: ApplyRecord<T>) -> Self {
        Self { kafka, changelog, apply, partitions: HashMap::new() }
    }

    /// Rebuilds the state of newly assigned `partitions` from the changelog. Unreadable
    /// records are logged and skipped (the next change of that subscriber replaces them).
    pub async fn restore(&mut self, partitions: &BTreeSet<i32>) -> Result<()> {
        for &partition in partitions {
            let (kafka, topic) = (self.kafka.clone(), self.changelog);
            let records = tokio::task::spawn_blocking(move || {
                read_partition_to_end(&kafka, topic, partition, RESTORE_DEADLINE)
            })
            .await??;
            let mut states = HashMap::new();
            for record in &records {
                let Some(key) = record.key_str() else { continue };
                if let Err(error) = (self.apply)(&mut states, key, record.payload.as_deref()) {
                    tracing::error!(
                        topic, partition, offset = record.offset, %error,
                        "unreadable state record skipped"
                    );
                }
            }
            tracing::info!(
                topic,
                partition,
                subscribers = states.len(),
                records = records.len(),
                "state restored"
            );
            self.partitions.insert(partition, states);
        }
        Ok(())
    }

    /// Forgets the state of revoked `partitions`.
    pub fn revoke(&mut self, partitions: &BTreeSet<i32>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    /// The states of one partition.
    pub fn partition_mut(&mut self, partition: i32) -> &mut HashMap<String, T> {
        self.partitions.entry(partition).or_default()
    }

    /// Every assigned partition's states.
    pub fn partitions_mut(&mut self) -> impl Iterator<Item = (i32, &mut HashMap<String, T>)> {
        self.partitions.iter_mut().map(|(p, states)| (*p, states))
    }

    /// The changelog record of `key`'s new state, already encoded.
    pub fn record_bytes(&self, partition: i32, key: &str, encoded: Vec<u8>) -> Output {
        Output {
            topic: self.changelog,
            partition: Some(partition),
            key: key.as_bytes().to_vec(),
            payload: Some(encoded),
            headers: Vec::new(),
        }
    }

    /// A tombstone for `key` in the changelog (the state is gone).
    pub fn tombstone(&self, partition: i32, key: &str) -> Output {
        let mut record = Output::tombstone(self.changelog, key);
        record.partition = Some(partition);
        record
    }

    /// The changelog record of `key`'s new state, on the partition of its input.
    pub fn record(&self, partition: i32, key: &str, state: &impl prost::Message) -> Output {
        let mut record = Output::message(self.changelog, key, state);
        record.partition = Some(partition);
        record
    }
}
