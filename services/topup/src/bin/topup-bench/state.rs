//! Phase 6, the evaluator's state at scale: the evaluator's own task (decide, the changelog,
//! the on-disk store with its bounded cache) fed realistic subscribers in this process, no
//! broker involved, so that the process's resident memory is the evaluator's alone:
//! resident bytes at 1 and 10 million subscribers, changelog bytes per balance event, the
//! tick's cost. Then, on Apache Kafka, restores of a changelog holding a million
//! subscribers: cold (no local store) and checkpointed (the store of the instance that
//! wrote it, and a tail written since).
use std::collections::{BTreeSet, HashMap};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use topup::brokers::{BrokerKind, Brokers};
use topup_evaluator::{Evaluator, Settings};
use topup_kafka::{Input, KafkaArgs, Output, StoreConfig, Task};
use topup_proto::v1::{
    auto_top_up_rule::TopUp, AutoTopUpRule, ChannelKind, Money, NotificationChannel, PaymentMethod,
    PaymentMethodKind, RuleState, RuleUpdated,
};
use topup_proto::{topics, Message};

use super::{balance, current_rss_bytes, subscriber, Sender, PARTITIONS};

/// Subscribers processed per batch (the pipeline's batch size).
const BATCH: u64 = 500;

#[derive(Debug, Serialize, Default)]
pub(crate) struct StateFigures {
    /// Resident memory at each size.
    pub points: Vec<StatePoint>,
    /// Changelog bytes (keys and values) written per balance event: on average, for an
    /// event that issues a top-up, for one that decides nothing.
    pub changelog_bytes_per_balance_event: f64,
    pub changelog_bytes_per_top_up_event: f64,
    pub changelog_bytes_per_quiet_event: f64,
    /// Restores on Apache Kafka of a changelog with `restore_subscribers` subscribers.
    pub restore_subscribers: u64,
    pub cold_restore_s: f64,
    pub checkpointed_restore_s: f64,
    pub checkpointed_tail_records: u64,
    /// An evaluator process killed and started again: seconds until the tail written since
    /// was processed, on the killed process's store and on none.
    pub restarted_restore_s: f64,
    pub restarted_cold_restore_s: f64,
    pub cache_entries_per_partition: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct StatePoint {
    pub subscribers: u64,
    pub resident_mib: f64,
    pub bytes_per_subscriber: f64,
    pub bytes_per_added_subscriber: f64,
    /// One tick over every partition with nothing due, in milliseconds.
    pub tick_ms: f64,
}

/// A rule as a real subscriber has one: its own threshold and amount, two payment methods
/// (a card and an Alipay account, tokens distinct per subscriber), two channels.
pub(crate) fn realistic_rule(n: u64, id: &str) -> AutoTopUpRule {
    let cny = |minor: i64| Money { currency: "CNY".into(), amount_minor: minor };
    AutoTopUpRule {
        subscriber_id: id.into(),
        threshold: Some(cny(1000 + (n % 40) as i64 * 100)),
        top_up: Some(TopUp::Amount(cny(5000 + (n % 5) as i64 * 1000))),
        payment_methods: vec![
            PaymentMethod {
                method_id: format!("pm-card-{n}"),
                token: format!("tok_card_{n:012}"),
                kind: PaymentMethodKind::Card as i32,
                label: format!("•••• {:04}", n % 10_000),
                expires: "2029-12".into(),
                currency: "CNY".into(),
            },
            PaymentMethod {
                method_id: format!("pm-alipay-{n}"),
                token: format!("tok_alipay_{n:012}"),
                kind: PaymentMethodKind::Alipay as i32,
                label: format!("alipay: 13*******{:02}", n % 100),
                expires: String::new(),
                currency: "CNY".into(),
            },
        ],
        state: RuleState::Active as i32,
        locale: "zh-CN".into(),
        channels: vec![
            NotificationChannel { kind: ChannelKind::Sms as i32, address: format!("+86139{n:08}") },
            NotificationChannel {
                kind: ChannelKind::Email as i32,
                address: format!("{id}@example.com"),
            },
        ],
        max_topups_per_day: 3,
        max_amount_per_month: Some(cny(50_000)),
        carrier_id: "bench".into(),
        ..Default::default()
    }
}

fn input(topic: &str, offset: i64, key: &str, payload: Vec<u8>) -> Input {
    // The partition the Java client's partitioner would choose does not matter here; spread
    // the subscribers evenly.
    let partition = (offset % i64::from(PARTITIONS)) as i32;
    Input {
        topic: topic.into(),
        partition,
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(payload),
        timestamp_ms: None,
        headers: Vec::new(),
    }
}

/// Runs subscribers `from..to` through `task`: a rule each, then a balance above its
/// threshold; answers the changelog records written.
async fn feed(
    task: &mut Task<Evaluator>,
    from: u64,
    to: u64,
    mut each: impl FnMut(&Output),
) -> anyhow::Result<()> {
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        let mut batch = Vec::with_capacity(2 * (end - start) as usize);
        for n in start..end {
            let id = subscriber(n);
            let update = RuleUpdated { rule: Some(realistic_rule(n, &id)), updated_at: None };
            batch.push(input(topics::RULES, n as i64, &id, update.encode_to_vec()));
        }
        for n in start..end {
            let id = subscriber(n);
            batch.push(input(topics::BALANCE, n as i64, &id, balance(&id, 9_000, 1)));
        }
        commit(task, &batch, &mut each).await?;
        start = end;
    }
    Ok(())
}

/// A balance event of `amount(n)` at `sequence` for each subscriber `n` of `range`.
async fn balances(
    task: &mut Task<Evaluator>,
    range: std::ops::Range<u64>,
    amount: impl Fn(u64) -> i64,
    sequence: u64,
    each: &mut impl FnMut(&Output),
) -> anyhow::Result<()> {
    let mut start = range.start;
    while start < range.end {
        let end = (start + BATCH).min(range.end);
        let batch: Vec<Input> = (start..end)
            .map(|n| {
                let id = subscriber(n);
                input(topics::BALANCE, n as i64, &id, balance(&id, amount(n), sequence))
            })
            .collect();
        commit(task, &batch, each).await?;
        start = end;
    }
    Ok(())
}

/// Processes `batch` and takes it as committed, the changelog records at made-up offsets.
async fn commit(
    task: &mut Task<Evaluator>,
    batch: &[Input],
    each: &mut impl FnMut(&Output),
) -> anyhow::Result<()> {
    let mut last = HashMap::new();
    for answer in task.process(batch).await? {
        let outputs = answer.map_err(|refusal| anyhow::anyhow!("refused: {refusal}"))?;
        for output in outputs.iter().filter(|o| o.topic == topics::EVALUATOR_STATE) {
            each(output);
            *last.entry(output.partition.unwrap_or(0)).or_insert(0i64) += 1;
        }
    }
    task.committed(&last)?;
    Ok(())
}

fn evaluator_task(store: StoreConfig, instance: &str) -> Task<Evaluator> {
    Task::new(Evaluator::new(KafkaArgs::new("unused:9092"), Settings::default()))
        .with_store(store, instance)
}

fn store_config(dir: &std::path::Path) -> StoreConfig {
    let defaults = KafkaArgs::new("unused:9092").store();
    StoreConfig { dir: Some(dir.to_path_buf()), ..defaults }
}

/// Resident memory at `sizes` subscribers, changelog bytes per balance event, tick cost.
pub(crate) async fn at_scale(sizes: &[u64]) -> anyhow::Result<StateFigures> {
    let dir = tempfile::tempdir()?;
    let config = store_config(dir.path());
    let mut figures =
        StateFigures { cache_entries_per_partition: config.cache_entries, ..Default::default() };
    let mut task = evaluator_task(config, "bench-memory");
    let partitions: BTreeSet<i32> = (0..PARTITIONS).collect();
    // Open every partition's store before the first figure.
    for &partition in &partitions {
        task.restore_one(partition, "none", None)?;
    }
    let (mut done, base) = (0u64, current_rss_bytes());
    let mut last_rss = base;
    for &size in sizes {
        let started = Instant::now();
        feed(&mut task, done, size, |_| {}).await?;
        let rss = current_rss_bytes();
        let tick = Instant::now();
        let due = task.tick(SystemTime::now()).await?;
        let tick_ms = tick.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(due.is_empty(), "nothing is due in this phase");
        figures.points.push(StatePoint {
            subscribers: size,
            resident_mib: rss as f64 / f64::from(1 << 20),
            bytes_per_subscriber: rss.saturating_sub(base) as f64 / size as f64,
            bytes_per_added_subscriber: rss.saturating_sub(last_rss) as f64 / (size - done) as f64,
            tick_ms,
        });
        eprintln!(
            "state: {size} subscribers in {:.0} s, {:.0} MiB resident, tick {tick_ms:.2} ms",
            started.elapsed().as_secs_f64(),
            rss as f64 / f64::from(1 << 20)
        );
        (done, last_rss) = (size, rss);
    }
    // Changelog bytes per balance event: a further balance for a sample of subscribers
    // (below their threshold every other time, so decisions are made too).
    // Bytes are counted apart for the events that issue a top-up (even subscribers) and
    // those that decide nothing (odd ones).
    let (mut bytes, sample) = ([0usize; 2], done.min(100_000));
    let amount = |n: u64| if n.is_multiple_of(2) { 500 } else { 8_000 };
    balances(&mut task, 0..sample, amount, 2, &mut |o| {
        let n: u64 = String::from_utf8_lossy(&o.key)
            .chars()
            .filter(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        bytes[(n % 2) as usize] += o.key.len() + o.payload.as_ref().map_or(0, Vec::len)
    })
    .await?;
    let half = (sample / 2).max(1) as f64;
    figures.changelog_bytes_per_balance_event = (bytes[0] + bytes[1]) as f64 / sample.max(1) as f64;
    figures.changelog_bytes_per_top_up_event = bytes[0] as f64 / half;
    figures.changelog_bytes_per_quiet_event = bytes[1] as f64 / half;
    Ok(figures)
}

/// Restores of a changelog holding `subscribers` on `kind`: cold, then checkpointed after a
/// tail of `tail` subscribers' balance events.
pub(crate) async fn restores(
    kind: BrokerKind,
    subscribers: u64,
    tail: u64,
    figures: &mut StateFigures,
) -> anyhow::Result<()> {
    let brokers = Brokers::start(kind, PARTITIONS)?;
    let kafka: KafkaArgs = brokers.kafka_args();
    let producer: Sender = kafka.producer().create()?;
    let dir = tempfile::tempdir()?;
    let partitions: BTreeSet<i32> = (0..PARTITIONS).collect();
    // The writer: its store in `dir`, its changelog records sent to the broker.
    let mut writer = evaluator_task(store_config(dir.path()), "bench-writer");
    let mut failed = None;
    let mut forward = |o: &Output| {
        let key = String::from_utf8_lossy(&o.key).into_owned();
        let sent = send_to(&producer, o.partition.unwrap_or(0), &key, o.payload.as_deref());
        if let Err(e) = sent {
            failed.get_or_insert(e);
        }
    };
    feed(&mut writer, 0, subscribers, &mut forward).await?;
    if let Some(error) = failed.take() {
        return Err(error);
    }
    rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(120))?;

    let cold_dir = tempfile::tempdir()?;
    let mut cold = evaluator_task(store_config(cold_dir.path()), "bench-cold");
    let started = Instant::now();
    cold.assign(&kafka, &partitions).await?;
    figures.cold_restore_s = started.elapsed().as_secs_f64();
    eprintln!(
        "state: cold restore of {subscribers} subscribers in {:.1} s",
        figures.cold_restore_s
    );
    drop(cold);

    // The same instance again (its store checkpointed at the end), after a tail the writer
    // wrote since: a balance event each for `tail` subscribers.
    let mut forward = |o: &Output| {
        let key = String::from_utf8_lossy(&o.key).into_owned();
        let sent = send_to(&producer, o.partition.unwrap_or(0), &key, o.payload.as_deref());
        if let Err(e) = sent {
            failed.get_or_insert(e);
        }
    };
    balances(&mut writer, 0..tail, |_| 8_000, 2, &mut forward).await?;
    if let Some(error) = failed.take() {
        return Err(error);
    }
    rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(60))?;
    let mut again = evaluator_task(store_config(cold_dir.path()), "bench-cold");
    let started = Instant::now();
    again.assign(&kafka, &partitions).await?;
    figures.checkpointed_restore_s = started.elapsed().as_secs_f64();
    figures.checkpointed_tail_records = tail;
    figures.restore_subscribers = subscribers;
    eprintln!(
        "state: checkpointed restore ({tail} records since) in {:.2} s",
        figures.checkpointed_restore_s
    );
    Ok(())
}

fn send_to(
    producer: &Sender,
    partition: i32,
    key: &str,
    payload: Option<&[u8]>,
) -> anyhow::Result<()> {
    let mut record = rdkafka::producer::BaseRecord::<str, [u8]>::to(topics::EVALUATOR_STATE)
        .key(key)
        .partition(partition);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                record = back;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}
