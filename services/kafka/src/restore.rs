//! Reading a partition to its end: a state store brought up to its changelog, and whole
//! partitions for tools.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::store::{now_seconds, PartitionStore, StoreBatch};
use crate::{Error, Input, KafkaArgs, Result};

/// Reads every committed record of `topic`/`partition` that exists now, in order. Waits for
/// open transactions of a crashed writer to be resolved (at most the transaction timeout),
/// up to `deadline`.
pub fn read_partition_to_end(
    kafka: &KafkaArgs,
    topic: &str,
    partition: i32,
    deadline: Duration,
) -> Result<Vec<Input>> {
    let consumer: BaseConsumer = kafka.reader().create()?;
    // The end to reach is the high watermark, not the last stable offset a read_committed
    // client is told: a writer's transaction still open (a killed instance's, until it is
    // aborted) holds the LSO back, and records other writers committed after it — this
    // service's own state of a moment ago — would be missed by a restore that stopped there.
    // Measured on Apache Kafka: the soak lost the rules of 15 subscribers that way.
    let mut uncommitted = kafka.reader();
    uncommitted.set("isolation.level", "read_uncommitted");
    let probe: BaseConsumer = uncommitted.create()?;
    let (_low, high) = probe.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let started = Instant::now();
    loop {
        // Control records (transaction markers) advance the position without a message, so
        // the position, not the count of messages, says when the end is reached.
        let position = consumer
            .position()?
            .find_partition(topic, partition)
            .map(|p| match p.offset() {
                Offset::Offset(n) => n,
                _ => 0,
            })
            .unwrap_or(0);
        if high == 0 || position >= high {
            return Ok(records);
        }
        if started.elapsed() > deadline {
            return Err(Error::Timeout(format!(
                "restoring {topic}/{partition}: at offset {position} of {high} after {deadline:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                records.push(Input::from_message(&message));
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
}

/// Changelog records applied to a store per redb transaction during a restore.
const RESTORE_BATCH: usize = 5_000;
/// How often a restore in progress says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A store checkpointed longer ago than this is rebuilt from the beginning: the changelog's
/// tombstones may have been compacted away since (`delete.retention.ms`, 24 h by default).
const CHECKPOINT_MAX_AGE_SECS: i64 = 12 * 3600;

/// Brings `store` up to the end of changelog `topic`/`partition`: replays the records after
/// its checkpoint, or all of them when it has none that can be trusted (none, older than
/// [`CHECKPOINT_MAX_AGE_SECS`], or outside the partition's offsets). Answers the keys (by
/// `owner`) whose records it applied and how many records it read. No deadline for the
/// whole: it gives up only when the partition stops moving, and reports its progress in the
/// log and in `topup_state_restore_remaining_records` (of `instance`).
pub(crate) fn restore_store(
    kafka: &KafkaArgs,
    store: &mut PartitionStore,
    (topic, partition): (&str, i32),
    owner: fn(&str) -> &str,
    instance: &str,
) -> Result<(HashSet<String>, u64)> {
    let started = Instant::now();
    let mut uncommitted = kafka.reader();
    uncommitted.set("isolation.level", "read_uncommitted");
    let probe: BaseConsumer = uncommitted.create()?;
    // See read_partition_to_end for why the high watermark.
    let (low, high) = probe.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let checkpoint = store.checkpoint()?;
    let from = match checkpoint {
        Some(c)
            if c.offset >= low
                && c.offset <= high
                && now_seconds().saturating_sub(c.at_seconds) <= CHECKPOINT_MAX_AGE_SECS =>
        {
            c.offset
        }
        _ => {
            if checkpoint.is_some() || !store.is_empty()? {
                tracing::info!(
                    topic,
                    partition,
                    ?checkpoint,
                    low,
                    high,
                    "local state not usable; rebuilt from the changelog"
                );
                store.wipe()?;
            }
            low
        }
    };
    let cold = checkpoint.is_none_or(|c| c.offset != from);
    let remaining = crate::ops::pipeline_metrics();
    let part = partition.to_string();
    let labels = [("topic", topic), ("partition", part.as_str()), ("instance_id", instance)];
    let mut touched = HashSet::new();
    let mut records = 0u64;
    if from < high {
        let consumer: BaseConsumer = kafka.reader().create()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
        consumer.assign(&assignment)?;
        // A read_committed reader waits at an open transaction for as long as the broker
        // takes to abort it (the transaction timeout): only a stall longer than that ends
        // the restore.
        let stall = Duration::from_millis(u64::from(kafka.transaction_timeout_ms) * 2)
            + Duration::from_secs(30);
        let mut batch = StoreBatch::default();
        let (mut moved, mut reported, mut last_position) = (Instant::now(), Instant::now(), from);
        // The consumer's position is asked for only when no record came or every
        // `RESTORE_BATCH` records (asking at every record halves the rate).
        let mut check = true;
        loop {
            if check {
                check = false;
                let position = position_of(&consumer, topic, partition)?.max(last_position);
                if position != last_position {
                    (last_position, moved) = (position, Instant::now());
                }
                if position >= high {
                    batch.checkpoint = Some(position);
                    store.apply(&batch)?;
                    break;
                }
                if moved.elapsed() > stall {
                    return Err(Error::Timeout(format!(
                        "restoring {topic}/{partition}: no progress at offset {position} of {high} for {stall:?}"
                    )));
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    tracing::info!(
                        topic,
                        partition,
                        records,
                        offset = position,
                        end = high,
                        seconds = started.elapsed().as_secs(),
                        "restoring state"
                    );
                }
                remaining.restore_remaining.set(&labels, high.saturating_sub(position));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    (last_position, moved) = (message.offset() + 1, Instant::now());
                    if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        touched.insert(owner(key).to_string());
                        let value = message.payload().map(<[u8]>::to_vec);
                        batch.records.push((key.to_string(), value));
                        records += 1;
                    }
                    if batch.records.len() >= RESTORE_BATCH {
                        batch.checkpoint = Some(last_position);
                        store.apply(&std::mem::take(&mut batch))?;
                        check = true;
                    }
                    // Control records (transaction markers) carry no message: only the
                    // position tells that the end is reached past the last one.
                    check |= last_position >= high;
                }
                Some(Err(e)) => return Err(e.into()),
                None => check = true,
            }
        }
    }
    store.sync()?;
    remaining.restore_remaining.set(&labels, 0);
    tracing::info!(
        topic,
        partition,
        records,
        from,
        end = high,
        cold,
        seconds = started.elapsed().as_secs_f64(),
        "state restored"
    );
    Ok((touched, records))
}

fn position_of(consumer: &BaseConsumer, topic: &str, partition: i32) -> Result<i64> {
    Ok(consumer
        .position()?
        .find_partition(topic, partition)
        .map(|p| match p.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        })
        .unwrap_or(0))
}
