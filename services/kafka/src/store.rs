//! Per-partition state kept in a changelog topic, Kafka Streams' way: each change is a
//! record keyed by the subscriber, written to the same partition number as the input that
//! caused it and in the same transaction; on assignment a partition's state is rebuilt by
//! reading its changelog partition to the end.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::{read_partition_to_end, KafkaArgs, Output, Result};

/// How long restoring one partition's state may take.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// Turns a changelog value back into state; an error names what is wrong.
pub type DecodeState<T> = fn(&[u8]) -> std::result::Result<T, String>;

/// State per input partition, then per subscriber id.
pub struct StateStore<T> {
    kafka: KafkaArgs,
    changelog: &'static str,
    decode: DecodeState<T>,
    partitions: HashMap<i32, HashMap<String, T>>,
}

impl<T> StateStore<T> {
    /// An empty store backed by `changelog`.
    pub fn new(kafka: KafkaArgs, changelog: &'static str, decode: DecodeState<T>) -> Self {
        Self { kafka, changelog, decode, partitions: HashMap::new() }
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
                match record.payload.as_deref().map(self.decode) {
                    None => {
                        states.remove(key);
                    }
                    Some(Ok(state)) => {
                        states.insert(key.to_string(), state);
                    }
                    Some(Err(error)) => tracing::error!(
                        topic, partition, offset = record.offset, %error,
                        "unreadable state record skipped"
                    ),
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

    /// The changelog record of `key`'s new state, on the partition of its input.
    pub fn record(&self, partition: i32, key: &str, state: &impl prost::Message) -> Output {
        let mut record = Output::message(self.changelog, key, state);
        record.partition = Some(partition);
        record
    }
}
