//! `topup-bench`: the platform's speed, measured against a raw Kafka baseline in the same
//! run, on each kind of Kafka asked for (`--brokers mock,apache,apache3`, side by side:
//! the embedded mock cluster, Apache Kafka started by scripts/kafka). Each phase gets fresh
//! brokers:
//!
//! 1. **Evaluator alone vs raw baseline**: the same preloaded balance events through the
//!    raw baseline (the shared transactional loop, same settings and batch size, one
//!    output per input, no business logic) and through the evaluator.
//! 2. **Whole pipeline**: evaluator, payment worker (sandbox) and notifier (messages
//!    discarded), until every group has committed everything.
//! 3. **Latency at a steady rate**: balance events produced at `--rate` per second with
//!    `observed_at` = now; latency to the `TopUpCommand` and to the `TopUpResult`.
//! 4. **Recovery after a SIGKILL** (Apache Kafka only): an evaluator process killed in the
//!    middle of a stream and started again at once, with a new transactional id (a
//!    Deployment's new pod), the same one (a StatefulSet's pod), and the same one with static
//!    group membership; seconds from the kill until a command for a balance event published
//!    after it is visible to a read_committed reader.
//! 5. **Commit interval** (`--commit-intervals`, Apache Kafka only): the evaluator's
//!    throughput and the latency phase again for each interval.
//! 6. **State at scale** (`memory`): the evaluator's task with its on-disk store fed
//!    realistic subscribers (`--state-sizes`, 1 and 10 million): resident memory, changelog
//!    bytes per balance event, the tick's cost; and (`restore`, Apache Kafka only) restoring
//!    a changelog of `--restore-subscribers`: cold, and checkpointed after a tail; then an
//!    evaluator process killed with SIGKILL and started again, on its store and on none.
//! 7. **Embedded stores** (`stores`): redb (the one used) and fjall given a partition
//!    store's work for `--store-subscribers`, beside a map in memory.
//!
//! Prints the figures, writes them as JSON and the latency distribution as an SVG chart.
//!
//! `cargo run --release --bin topup-bench -- --events 200000 --subscribers 10000`
mod state;
mod stores;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use topup::brokers::{BrokerKind, Brokers};
use topup::simulator::rule_for;
use topup_kafka::{
    run_pipeline, Answer, Input, KafkaArgs, Output, PipelineSpec, Processor, Refusal,
};
use topup_notifier::channel::{Channel, ChannelError, Delivery};
use topup_proto::v1::{
    auto_top_up_rule::TopUp, AutoTopUpRule, BalanceUpdated, Money, PaymentMethod,
    PaymentMethodKind, RuleState, RuleUpdated, TopUpCommand, TopUpResult,
};
use topup_proto::{topics, Message};

const PARTITIONS: i32 = 4;
const SINK: &str = "bench.sink.v1";

/// Throughput, latency and memory of the platform against a raw Kafka baseline.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Balance events for the throughput phases.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Subscribers the throughput events are spread over.
    #[arg(long, default_value_t = 10_000)]
    subscribers: u64,
    /// Rounds of baseline and evaluator, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Records per transaction, for every pipeline.
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
    /// Balance events per second in the latency phase.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Length of the latency phase's measured stream, in seconds.
    #[arg(long, default_value_t = 15)]
    latency_secs: u64,
    /// Seconds of the latency phase's stream before it is measured.
    #[arg(long, default_value_t = 15)]
    warmup_secs: u64,
    /// Subscribers in the latency phase (each with an active rule).
    #[arg(long, default_value_t = 2_000)]
    latency_subscribers: u64,
    /// The Kafkas to measure on, side by side: mock (in this process), apache (one node),
    /// apache3 (a controller and three brokers), started by scripts/kafka.
    #[arg(long, value_delimiter = ',', default_value = "mock,apache")]
    brokers: Vec<BrokerKind>,
    /// Phases to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,recovery,commit-interval,restore,memory,stores"
    )]
    phases: Vec<Phase>,
    /// Subscriber counts at which the state phase reads resident memory.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    state_sizes: Vec<u64>,
    /// Subscribers in the stores phase's store.
    #[arg(long, default_value_t = 1_000_000)]
    store_subscribers: u64,
    /// Subscribers in the changelog the restore phase restores.
    #[arg(long, default_value_t = 1_000_000)]
    restore_subscribers: u64,
    /// Subscribers with a balance event written after the checkpoint, for the checkpointed
    /// restore.
    #[arg(long, default_value_t = 10_000)]
    restore_tail: u64,
    /// Every how many of a subscriber's balance events in the latency phase drops below
    /// its threshold (2: every other one).
    #[arg(long, default_value_t = 2)]
    drop_every: u64,
    /// Rounds of each recovery variant; medians are reported.
    #[arg(long, default_value_t = 2)]
    recovery_rounds: usize,
    /// Commit intervals (ms) compared in the commit-interval phase.
    #[arg(long, value_delimiter = ',', default_value = "0,5,20,100")]
    commit_intervals: Vec<u64>,
    /// Where the JSON figures and the chart go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Throughput,
    Latency,
    Recovery,
    CommitInterval,
    Restore,
    Memory,
    Stores,
}

/// The baseline's processor: forwards every record, decides nothing.
struct Forward;

impl Processor for Forward {
    type Event = ();
    type State = ();
    type Batch = ();

    fn decode(&self, input: &Input) -> Result<(String, ()), Refusal> {
        Ok((input.key_str().unwrap_or_default().to_string(), ()))
    }

    async fn begin_batch(&self, _batch: &[Input]) {}

    async fn process(&self, input: &Input, _: &(), _: &mut Option<()>, _: ()) -> Answer {
        Ok(vec![Output {
            topic: SINK,
            partition: None,
            key: input.key.clone().unwrap_or_default(),
            payload: input.payload.clone(),
            headers: Vec::new(),
        }])
    }
}

/// A notification channel that delivers into the void (the bench measures the platform).
#[derive(Clone)]
struct Discard;

impl Channel for Discard {
    async fn deliver(&self, _delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        Ok(())
    }
}

type Sender = ThreadedProducer<DefaultProducerContext>;

fn send(producer: &Sender, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<()> {
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(payload)) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => {
                // The queue is full: let the broker take some (a timeout here only means it
                // has not taken all of it yet), then send again.
                let _ = producer.flush(Duration::from_millis(100));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

fn subscriber(n: u64) -> String {
    format!("sub-{n:07}")
}

fn balance(id: &str, amount_minor: i64, sequence: u64) -> Vec<u8> {
    BalanceUpdated {
        credited_command_ids: Default::default(),
        subscriber_id: id.to_string(),
        carrier_id: "bench".into(),
        balance: Some(Money { currency: "CNY".into(), amount_minor }),
        sequence,
        observed_at: Some(topup_kafka::now_timestamp()),
        event_id: String::new(),
    }
    .encode_to_vec()
}

/// The simulator's mix of rules, then balances wandering across the 10.00 threshold.
fn preload(kafka: &KafkaArgs, cli: &Cli) -> anyhow::Result<()> {
    let producer: Sender = kafka.producer().create()?;
    for s in 0..cli.subscribers {
        let id = subscriber(s);
        if let Some(rule) = rule_for(s as usize, &id) {
            let update = RuleUpdated { rule: Some(rule), updated_at: None };
            send(&producer, topics::RULES, &id, &update.encode_to_vec())?;
        }
    }
    for n in 0..cli.events {
        let id = subscriber(n % cli.subscribers);
        let amount_minor = 500 + ((n * 7919) % 2000) as i64;
        send(
            &producer,
            topics::BALANCE,
            &id,
            &balance(&id, amount_minor, n / cli.subscribers + 1),
        )?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// Records of `topics` that `group` has not committed yet, read with one long-lived client.
struct Lag {
    consumer: BaseConsumer,
    wanted: TopicPartitionList,
    /// Apache Kafka: a transaction's commit marker follows its last record, so a group that
    /// has committed everything is one offset short of the end of a topic written in
    /// transactions.
    markers: bool,
}

/// Topics the services write in transactions.
const TRANSACTIONAL_TOPICS: [&str; 3] = [topics::COMMANDS, topics::NOTIFICATIONS, topics::RESULTS];

impl Lag {
    fn new(kafka: &KafkaArgs, group: &str, topics: &[&str]) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka.group_consumer(group).create()?;
        let mut wanted = TopicPartitionList::new();
        for topic in topics {
            for p in 0..PARTITIONS {
                wanted.add_partition(topic, p);
            }
        }
        Ok(Self { consumer, wanted, markers: !kafka.mock_cluster })
    }

    /// (committed, remaining) over every partition.
    fn read(&self) -> anyhow::Result<(i64, i64)> {
        let committed =
            self.consumer.committed_offsets(self.wanted.clone(), Duration::from_secs(10))?;
        let (mut done, mut left) = (0, 0);
        for e in committed.elements() {
            let (_, high) = self.consumer.fetch_watermarks(
                e.topic(),
                e.partition(),
                Duration::from_secs(10),
            )?;
            let at = match e.offset() {
                Offset::Offset(n) => n,
                _ => 0,
            };
            let marker = i64::from(self.markers && TRANSACTIONAL_TOPICS.contains(&e.topic()));
            done += at;
            left += (high - at - marker).max(0);
        }
        Ok((done, left))
    }
}

/// Waits until every `lags` has nothing left (twice in a row, as results feed back into
/// the evaluator), timing from the first commit of the first one. Returns seconds.
async fn until_caught_up(lags: Vec<Lag>) -> anyhow::Result<f64> {
    let lags = Arc::new(lags);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut started: Option<Instant> = None;
    let mut quiet = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = lags.clone();
        let readings = tokio::task::spawn_blocking(move || {
            l.iter().map(Lag::read).collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        if started.is_none() && readings[0].0 > 0 {
            started = Some(Instant::now());
        }
        let left: i64 = readings.iter().map(|r| r.1).sum();
        quiet = if started.is_some() && left == 0 { quiet + 1 } else { 0 };
        if quiet >= 2 {
            // The last reading found nothing left; the one before did too.
            return Ok(started.map_or(0.0, |t| t.elapsed().as_secs_f64()));
        }
        anyhow::ensure!(Instant::now() < deadline, "not caught up after 10 minutes: {readings:?}");
    }
}

fn spec(kafka: &KafkaArgs, name: &'static str, max_batch: usize) -> PipelineSpec {
    PipelineSpec {
        service: name,
        group_id: name.into(),
        transactional_id: name.into(),
        inputs: vec![topics::BALANCE],
        max_batch,
        tick_every: None,
        kafka: kafka.clone(),
    }
}

/// Starts the evaluator, the payment worker and the notifier on `kafka`.
fn start_all(kafka: &KafkaArgs, max_batch: usize, stop: &CancellationToken) {
    let mut evaluator = topup_evaluator::Config::new(kafka.clone());
    evaluator.max_batch = max_batch;
    let mut payment = topup_payment_worker::Config::new(kafka.clone());
    payment.max_batch = max_batch;
    let mut notifier = topup_notifier::Config::new(kafka.clone());
    notifier.max_batch = max_batch;
    notifier.quiet_hours = topup_notifier::QuietHoursSetting(None);
    tokio::spawn(topup_evaluator::run(evaluator, stop.clone()));
    tokio::spawn(topup_payment_worker::run(
        payment,
        topup_payment_worker::Sandbox::new(),
        stop.clone(),
    ));
    tokio::spawn(topup_notifier::run(notifier, Discard, stop.clone()));
}

fn pipeline_lags(kafka: &KafkaArgs) -> anyhow::Result<Vec<Lag>> {
    Ok(vec![
        Lag::new(kafka, "topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS])?,
        Lag::new(kafka, "topup-payment-worker", &[topics::COMMANDS])?,
        Lag::new(kafka, "topup-notifier", &[topics::NOTIFICATIONS])?,
    ])
}

#[derive(Debug, Serialize, Default)]
struct Percentiles {
    count: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn percentiles(sorted_ms: &[f64]) -> Percentiles {
    let at = |q: f64| {
        if sorted_ms.is_empty() {
            return 0.0;
        }
        let index = ((sorted_ms.len() as f64 * q).ceil() as usize).clamp(1, sorted_ms.len()) - 1;
        sorted_ms[index]
    };
    Percentiles {
        count: sorted_ms.len(),
        p50_ms: at(0.50),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
        max_ms: sorted_ms.last().copied().unwrap_or(0.0),
    }
}

fn ms_since(observed: Option<&topup_proto::Timestamp>) -> Option<f64> {
    let observed = topup_kafka::system_time(observed?);
    std::time::SystemTime::now().duration_since(observed).ok().map(|d| d.as_secs_f64() * 1e3)
}

fn latency_rule(id: &str) -> AutoTopUpRule {
    let cny = |minor| Money { currency: "CNY".into(), amount_minor: minor };
    AutoTopUpRule {
        subscriber_id: id.into(),
        threshold: Some(cny(1000)),
        top_up: Some(TopUp::Amount(cny(5000))),
        payment_methods: vec![PaymentMethod {
            method_id: Default::default(),
            token: "tok_bench_4242".into(),
            kind: PaymentMethodKind::Card as i32,
            label: "•••• 4242".into(),
            expires: String::new(),
            currency: "CNY".into(),
        }],
        state: RuleState::Active as i32,
        locale: "en".into(),
        channels: Vec::new(),
        max_topups_per_day: 0,
        max_amount_per_month: None,
        carrier_id: "bench".into(),
        monthly: None,
    }
}

#[derive(Debug, Serialize, Default)]
struct Latency {
    rate_per_s: u64,
    seconds: u64,
    events_sent: u64,
    achieved_rate_per_s: f64,
    to_command: Percentiles,
    to_result: Percentiles,
}

/// Phase 3: a steady stream; every other event of a subscriber drops below its threshold.
async fn latency(
    cli: &Cli,
    kind: BrokerKind,
    commit_interval_ms: u64,
) -> anyhow::Result<(Latency, Vec<f64>, Vec<f64>)> {
    let brokers = Brokers::start(kind, PARTITIONS)?;
    let kafka = KafkaArgs { commit_interval_ms, ..brokers.kafka_args() };
    let producer: Sender = kafka.producer().create()?;
    let subscribers = cli.latency_subscribers.max(1);
    for s in 0..subscribers {
        let id = subscriber(s);
        let update = RuleUpdated { rule: Some(latency_rule(&id)), updated_at: None };
        send(&producer, topics::RULES, &id, &update.encode_to_vec())?;
    }
    producer.flush(Duration::from_secs(30))?;
    let stop = CancellationToken::new();
    start_all(&kafka, cli.max_batch, &stop);
    until_caught_up(vec![Lag::new(&kafka, "topup-evaluator", &[topics::RULES])?]).await?;

    // Readers of commands and results, from the beginning (only this phase wrote them).
    // Readers of commands and results from the beginning (only this phase wrote them), each
    // polling on its own thread: the time a record is read is the time it became visible.
    let reader = |topic: &'static str| -> anyhow::Result<BaseConsumer> {
        // A group member, like the services: it reads the way they read.
        let consumer: BaseConsumer =
            kafka.group_consumer(&format!("bench-latency-{topic}")).create()?;
        consumer.subscribe(&[topic])?;
        // Joined and assigned before the first event is sent, so the join is not measured.
        let deadline = Instant::now() + Duration::from_secs(60);
        while consumer.assignment()?.count() == 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the latency reader of {topic} was never assigned"
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                anyhow::bail!("unexpected record on {topic} at offset {}", m.offset());
            }
        }
        Ok(consumer)
    };
    // Only what was observed after the warm-up counts (the broker's JIT and the services'
    // first transactions are slow for the first seconds).
    let measured_from = std::time::SystemTime::now() + Duration::from_secs(cli.warmup_secs);
    let collect = |consumer: BaseConsumer, to_command: bool, done: CancellationToken| {
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
            let mut samples = Vec::new();
            // After the stream the reader goes on to the end of every partition it holds: a
            // reader behind the pipeline would otherwise miss the last records (or all).
            let mut drain_until: Option<Instant> = None;
            loop {
                if drain_until.is_none() && done.is_cancelled() {
                    drain_until = Some(Instant::now() + Duration::from_secs(60));
                }
                if let Some(deadline) = drain_until {
                    if read_to_end(&consumer)? {
                        break;
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the latency reader did not reach the end of its partitions in 60 s"
                    );
                }
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(10)) else { continue };
                let payload = message.payload().unwrap_or_default();
                let observed = if to_command {
                    TopUpCommand::decode(payload).ok().and_then(|c| c.observed_at)
                } else {
                    TopUpResult::decode(payload).ok().and_then(|r| r.observed_at)
                };
                let after_warmup =
                    observed.as_ref().is_some_and(|o| topup_kafka::system_time(o) >= measured_from);
                if let (true, Some(ms)) = (after_warmup, ms_since(observed.as_ref())) {
                    samples.push(ms);
                }
            }
            Ok(samples)
        })
    };
    let done = CancellationToken::new();
    // The readers stop on every path out of here, an error too (the runtime waits for them).
    let _stop_readers = done.clone().drop_guard();
    let commands = collect(reader(topics::COMMANDS)?, true, done.clone());
    let results = collect(reader(topics::RESULTS)?, false, done.clone());

    // Produce at the rate, in 10 ms slices.
    let total = cli.rate * (cli.warmup_secs + cli.latency_secs);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut slice = tokio::time::interval(Duration::from_millis(10));
    while sent < total {
        slice.tick().await;
        let due = ((started.elapsed().as_secs_f64() * cli.rate as f64) as u64).min(total);
        while sent < due {
            let id = subscriber(sent % subscribers);
            let sequence = sent / subscribers + 1;
            let amount = if sequence % cli.drop_every.max(1) == 1 % cli.drop_every.max(1) {
                500
            } else {
                1500
            };
            send(&producer, topics::BALANCE, &id, &balance(&id, amount, sequence))?;
            sent += 1;
        }
        producer.poll(Duration::ZERO);
    }
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;
    until_caught_up(pipeline_lags(&kafka)?).await?;
    done.cancel();
    let mut to_command = commands.await??;
    let mut to_result = results.await??;
    stop.cancel();
    // A phase that measured nothing has no figure to print.
    anyhow::ensure!(
        !to_command.is_empty() && !to_result.is_empty(),
        "the latency phase measured nothing after its warm-up ({} commands, {} results read): \
         no figure is printed",
        to_command.len(),
        to_result.len()
    );
    to_command.sort_by(f64::total_cmp);
    to_result.sort_by(f64::total_cmp);
    let figures = Latency {
        rate_per_s: cli.rate,
        seconds: cli.latency_secs,
        events_sent: sent,
        achieved_rate_per_s: achieved,
        to_command: percentiles(&to_command),
        to_result: percentiles(&to_result),
    };
    Ok((figures, to_command, to_result))
}

/// Whether `consumer` has read everything committed on the partitions it holds. Their
/// writers are transactional, so the last offset of a partition is a commit marker, which
/// a position may or may not have stepped over: at the marker or past it is the end.
fn read_to_end(consumer: &BaseConsumer) -> anyhow::Result<bool> {
    let position = consumer.position()?;
    for element in position.elements() {
        let (_, high) = consumer.fetch_watermarks(
            element.topic(),
            element.partition(),
            Duration::from_secs(10),
        )?;
        let at = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        };
        if high > 0 && at + 1 < high {
            return Ok(false);
        }
    }
    Ok(true)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn current_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn chart(
    path: &std::path::Path,
    to_command: &[f64],
    to_result: &[f64],
    rate: u64,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = to_result.last().or(to_command.last()).copied().unwrap_or(1.0).max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency from observed_at, steady {rate} balance events/s"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max * 1.05, 0f64..100f64)?;
    chart.configure_mesh().x_desc("latency (ms)").y_desc("percentile").draw()?;
    let cdf = |samples: &[f64]| -> Vec<(f64, f64)> {
        let n = samples.len().max(1) as f64;
        samples.iter().enumerate().map(|(i, ms)| (*ms, (i + 1) as f64 * 100.0 / n)).collect()
    };
    chart
        .draw_series(LineSeries::new(cdf(to_command), &BLUE))?
        .label("to TopUpCommand")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(cdf(to_result), &RED))?
        .label("to TopUpResult")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct Figures {
    events: u64,
    subscribers: u64,
    max_batch: usize,
    brokers: Vec<BrokerFigures>,
    memory: Option<state::StateFigures>,
    stores: Option<Vec<stores::EngineFigures>>,
    peak_rss_mib: f64,
}

/// Phases 1–5 on one kind of Kafka.
#[derive(Debug, Serialize, Default)]
struct BrokerFigures {
    broker: String,
    baseline_events_per_s: f64,
    evaluator_events_per_s: f64,
    baseline_rounds: Vec<f64>,
    evaluator_rounds: Vec<f64>,
    evaluator_over_baseline: f64,
    pipeline_events_per_s: f64,
    latency: Latency,
    recovery: Vec<Recovery>,
    commit_intervals: Vec<CommitInterval>,
    restore: Option<state::StateFigures>,
}

/// Seconds from a SIGKILL of the evaluator to the first command for a later balance event.
#[derive(Debug, Serialize)]
struct Recovery {
    successor: &'static str,
    rounds_s: Vec<f64>,
    median_s: f64,
}

#[derive(Debug, Serialize)]
struct CommitInterval {
    interval_ms: u64,
    evaluator_events_per_s: f64,
    to_command: Percentiles,
}

/// One round of the baseline (`evaluator` false) or the evaluator over freshly preloaded
/// events on fresh brokers (the evaluator's changelog must start empty): events per second.
async fn throughput_round(
    cli: &Cli,
    kind: BrokerKind,
    evaluator: bool,
    commit_interval_ms: u64,
) -> anyhow::Result<f64> {
    let brokers = Brokers::start(kind, PARTITIONS)?;
    brokers.create_topic(SINK, PARTITIONS)?;
    let kafka = KafkaArgs { commit_interval_ms, ..brokers.kafka_args() };
    preload(&kafka, cli)?;
    let stop = CancellationToken::new();
    // The evaluator as deployed: its state in an on-disk store.
    let state_dir = tempfile::tempdir()?;
    let seconds = if evaluator {
        let kafka = KafkaArgs { state_dir: Some(state_dir.path().to_path_buf()), ..kafka.clone() };
        let mut config = topup_evaluator::Config::new(kafka.clone());
        config.group_id = "bench-evaluator".into();
        config.max_batch = cli.max_batch;
        tokio::spawn(topup_evaluator::run(config, stop.clone()));
        until_caught_up(vec![Lag::new(
            &kafka,
            "bench-evaluator",
            &[topics::BALANCE, topics::RULES],
        )?])
        .await?
    } else {
        tokio::spawn(run_pipeline(
            spec(&kafka, "bench-baseline", cli.max_batch),
            || Forward,
            stop.clone(),
        ));
        until_caught_up(vec![Lag::new(&kafka, "bench-baseline", &[topics::BALANCE])?]).await?
    };
    stop.cancel();
    Ok(cli.events as f64 / seconds.max(1e-3))
}

/// Phase 1: the raw baseline and the evaluator over the same preloaded events, alternating
/// rounds, medians reported (the machine is shared and noisy); phase 2: the whole pipeline;
/// phase 3: latency at a steady rate; phases 4 and 5 on Apache Kafka. Also returns the
/// latency samples for the chart.
async fn on_brokers(
    cli: &Cli,
    kind: BrokerKind,
) -> anyhow::Result<(BrokerFigures, Vec<f64>, Vec<f64>)> {
    let name = format!("{kind:?}").to_lowercase();
    let mut figures = BrokerFigures { broker: name.clone(), ..BrokerFigures::default() };
    if cli.phases.contains(&Phase::Throughput) {
        for round in 0..cli.rounds.max(1) {
            figures.baseline_rounds.push(throughput_round(cli, kind, false, 0).await?);
            figures.evaluator_rounds.push(throughput_round(cli, kind, true, 0).await?);
            eprintln!(
                "{name} round {round}: baseline {:.0}/s, evaluator {:.0}/s",
                figures.baseline_rounds[round], figures.evaluator_rounds[round]
            );
        }
        figures.baseline_events_per_s = median(&mut figures.baseline_rounds.clone());
        figures.evaluator_events_per_s = median(&mut figures.evaluator_rounds.clone());
        figures.evaluator_over_baseline =
            figures.evaluator_events_per_s / figures.baseline_events_per_s.max(1.0);

        let brokers = Brokers::start(kind, PARTITIONS)?;
        let kafka = brokers.kafka_args();
        preload(&kafka, cli)?;
        let stop = CancellationToken::new();
        start_all(&kafka, cli.max_batch, &stop);
        let seconds = until_caught_up(pipeline_lags(&kafka)?).await?;
        figures.pipeline_events_per_s = cli.events as f64 / seconds.max(1e-3);
        stop.cancel();
    }
    let (mut to_command, mut to_result) = (Vec::new(), Vec::new());
    if cli.phases.contains(&Phase::Latency) {
        (figures.latency, to_command, to_result) = latency(cli, kind, 0).await?;
    }
    if kind != BrokerKind::Mock && cli.phases.contains(&Phase::Recovery) {
        for successor in Successor::ALL {
            let mut rounds_s = Vec::new();
            for round in 0..cli.recovery_rounds.max(1) {
                let seconds = recovery(kind, successor).await?;
                eprintln!("{name} recovery, {}, round {round}: {seconds:.2} s", successor.name());
                rounds_s.push(seconds);
            }
            let median_s = median(&mut rounds_s.clone());
            figures.recovery.push(Recovery { successor: successor.name(), rounds_s, median_s });
        }
    }
    if kind != BrokerKind::Mock && cli.phases.contains(&Phase::Restore) {
        let mut restore = state::StateFigures::default();
        state::restores(kind, cli.restore_subscribers, cli.restore_tail, &mut restore).await?;
        restarts(kind, cli.restore_subscribers, cli.restore_tail, &mut restore).await?;
        figures.restore = Some(restore);
    }
    if kind != BrokerKind::Mock && cli.phases.contains(&Phase::CommitInterval) {
        for &interval_ms in &cli.commit_intervals {
            let evaluator_events_per_s = throughput_round(cli, kind, true, interval_ms).await?;
            let (latency, _, _) = latency(cli, kind, interval_ms).await?;
            eprintln!(
                "{name} commit interval {interval_ms} ms: evaluator {evaluator_events_per_s:.0}/s, \
                 p99 to command {:.1} ms",
                latency.to_command.p99_ms
            );
            figures.commit_intervals.push(CommitInterval {
                interval_ms,
                evaluator_events_per_s,
                to_command: latency.to_command,
            });
        }
    }
    Ok((figures, to_command, to_result))
}

/// How the killed evaluator's successor starts.
#[derive(Debug, Clone, Copy)]
enum Successor {
    /// A new transactional id, a dynamic group member (a Deployment's new pod).
    NewId,
    /// The same transactional id (a StatefulSet's pod), a dynamic group member.
    SameId,
    /// The same transactional id and static group membership under that id.
    SameIdStatic,
}

impl Successor {
    const ALL: [Self; 3] = [Self::NewId, Self::SameId, Self::SameIdStatic];

    fn name(self) -> &'static str {
        match self {
            Self::NewId => "new transactional id",
            Self::SameId => "same transactional id",
            Self::SameIdStatic => "same id + static membership",
        }
    }
}

/// The evaluator as a process of its own (this program, told by `TOPUP_BENCH_CHILD`), so it
/// can be killed with SIGKILL. Killed when dropped.
struct EvaluatorProcess(std::process::Child);

impl EvaluatorProcess {
    fn start(
        kafka: &KafkaArgs,
        transactional_id: &str,
        static_membership: bool,
    ) -> anyhow::Result<Self> {
        Self::start_on(kafka, transactional_id, static_membership, None)
    }

    /// With its local state stores in `state_dir` (none: in memory).
    fn start_on(
        kafka: &KafkaArgs,
        transactional_id: &str,
        static_membership: bool,
        state_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut command = std::process::Command::new(std::env::current_exe()?);
        if let Some(dir) = state_dir {
            command.env("STATE_DIR", dir);
        }
        let child = command
            .env("TOPUP_BENCH_CHILD", "evaluator")
            .env("KAFKA_BROKERS", &kafka.brokers)
            .env("EVALUATOR_TRANSACTIONAL_ID", transactional_id)
            .env("KAFKA_STATIC_MEMBERSHIP", static_membership.to_string())
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        Ok(Self(child))
    }
}

impl Drop for EvaluatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Phase 4: a stream of balance events, each for a subscriber not seen before and below
/// its threshold (so each one needs a command, and no payment worker is needed to clear
/// the in-flight top-up); the evaluator process is killed with SIGKILL two seconds into it
/// and its successor started at once. Returns the seconds from the kill until a command
/// caused by an event published after the kill is read (read_committed, as a group member).
async fn recovery(kind: BrokerKind, successor: Successor) -> anyhow::Result<f64> {
    const RATE: u64 = 200;
    const SUBSCRIBERS: u64 = RATE * 40;
    let brokers = Brokers::start(kind, PARTITIONS)?;
    let kafka = brokers.kafka_args();
    let producer: Sender = kafka.producer().create()?;
    for s in 0..SUBSCRIBERS {
        let id = subscriber(s);
        let update = RuleUpdated { rule: Some(latency_rule(&id)), updated_at: None };
        send(&producer, topics::RULES, &id, &update.encode_to_vec())?;
    }
    producer.flush(Duration::from_secs(30))?;
    let static_membership = matches!(successor, Successor::SameIdStatic);
    let first = EvaluatorProcess::start(&kafka, "bench-evaluator-1", static_membership)?;
    until_caught_up(vec![Lag::new(&kafka, "topup-evaluator", &[topics::RULES])?]).await?;

    let consumer: BaseConsumer = kafka.group_consumer("bench-recovery").create()?;
    consumer.subscribe(&[topics::COMMANDS])?;
    let killed_at: Arc<std::sync::Mutex<Option<std::time::SystemTime>>> = Arc::default();
    let done = CancellationToken::new();
    let _stop_reader = done.clone().drop_guard();
    let reader = {
        let (killed_at, done) = (killed_at.clone(), done.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<f64>> {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.is_cancelled() && Instant::now() < deadline {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(10)) else { continue };
                let command = TopUpCommand::decode(message.payload().unwrap_or_default())?;
                let Some(killed) = *killed_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?
                else {
                    continue;
                };
                let observed = command.observed_at.as_ref().map(topup_kafka::system_time);
                if observed.is_some_and(|o| o >= killed) {
                    return Ok(std::time::SystemTime::now()
                        .duration_since(killed)
                        .ok()
                        .map(|d| d.as_secs_f64()));
                }
            }
            Ok(None)
        })
    };
    let started = Instant::now();
    let mut slice = tokio::time::interval(Duration::from_millis(10));
    let (mut sent, mut first, mut second) = (0u64, Some(first), None);
    while sent < SUBSCRIBERS && !reader.is_finished() {
        slice.tick().await;
        let due = ((started.elapsed().as_secs_f64() * RATE as f64) as u64).min(SUBSCRIBERS);
        while sent < due {
            let id = subscriber(sent);
            send(&producer, topics::BALANCE, &id, &balance(&id, 500, 1))?;
            sent += 1;
        }
        producer.poll(Duration::ZERO);
        if first.is_some() && started.elapsed() >= Duration::from_secs(2) {
            let mut killed = first.take().context("the first evaluator")?;
            killed.0.kill()?;
            *killed_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))? =
                Some(std::time::SystemTime::now());
            let id = match successor {
                Successor::NewId => "bench-evaluator-2",
                Successor::SameId | Successor::SameIdStatic => "bench-evaluator-1",
            };
            second = Some(EvaluatorProcess::start(&kafka, id, static_membership)?);
        }
    }
    let recovered = tokio::time::timeout(Duration::from_secs(130), reader).await;
    done.cancel();
    drop(second);
    recovered
        .context("the recovery reader did not finish")???
        .context("no command for an event published after the kill within 2 minutes")
}

/// Phase 5's restarts: an evaluator process (the deployed shape: a store in `STATE_DIR`, one
/// transactional id, static membership) processes a rule and a balance event for each of
/// `subscribers`, is killed with SIGKILL, and `tail` balance events are published; then the
/// seconds from starting its successor until the group has processed the tail: on the
/// killed process's store, and on none (a cold restore).
async fn restarts(
    kind: BrokerKind,
    subscribers: u64,
    tail: u64,
    figures: &mut state::StateFigures,
) -> anyhow::Result<()> {
    const ID: &str = "bench-restart";
    let brokers = Brokers::start(kind, PARTITIONS)?;
    let kafka = brokers.kafka_args();
    let producer: Sender = kafka.producer().create()?;
    for n in 0..subscribers {
        let id = subscriber(n);
        let update = RuleUpdated { rule: Some(state::realistic_rule(n, &id)), updated_at: None };
        send(&producer, topics::RULES, &id, &update.encode_to_vec())?;
        send(&producer, topics::BALANCE, &id, &balance(&id, 9_000, 1))?;
    }
    producer.flush(Duration::from_secs(120))?;
    let dir = tempfile::tempdir()?;
    let lag = || Lag::new(&kafka, "topup-evaluator", &[topics::RULES, topics::BALANCE]);
    let started = Instant::now();
    let mut running = EvaluatorProcess::start_on(&kafka, ID, true, Some(dir.path()))?;
    until_caught_up(vec![lag()?]).await?;
    eprintln!(
        "state: an evaluator process took {subscribers} subscribers in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut sequence = 1;
    let mut restart = |state_dir: &std::path::Path| -> anyhow::Result<(EvaluatorProcess, Instant)> {
        sequence += 1;
        for n in 0..tail {
            let id = subscriber(n);
            send(&producer, topics::BALANCE, &id, &balance(&id, 8_000, sequence))?;
        }
        producer.flush(Duration::from_secs(60))?;
        let started = Instant::now();
        Ok((EvaluatorProcess::start_on(&kafka, ID, true, Some(state_dir))?, started))
    };
    running.0.kill()?;
    running.0.wait()?;
    let (successor, started) = restart(dir.path())?;
    running = successor;
    until_caught_up(vec![lag()?]).await?;
    figures.restarted_restore_s = started.elapsed().as_secs_f64();
    eprintln!(
        "state: killed and restarted on its store, the {tail} events since processed in {:.2} s",
        figures.restarted_restore_s
    );
    running.0.kill()?;
    running.0.wait()?;
    let empty = tempfile::tempdir()?;
    let (successor, started) = restart(empty.path())?;
    running = successor;
    until_caught_up(vec![lag()?]).await?;
    figures.restarted_cold_restore_s = started.elapsed().as_secs_f64();
    eprintln!(
        "state: killed and restarted without a store, the {tail} events since processed in {:.1} s",
        figures.restarted_cold_restore_s
    );
    drop(running);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var("TOPUP_BENCH_CHILD").as_deref() == Ok("evaluator") {
        // Phase 4's evaluator process.
        return topup_evaluator::main_from_args().await;
    }
    if std::env::var("TOPUP_BENCH_CHILD").as_deref() == Ok("store") {
        // Phase 7's store processes.
        return stores::child();
    }
    let cli = Cli::parse();
    topup_kafka::init_logging();
    // Apache Kafka with its full JIT (scripts/kafka's default, C1 only, starts tests faster
    // but serves load more slowly), unless told otherwise.
    if std::env::var_os("TOPUP_KAFKA_JVM_OPTS").is_none() {
        std::env::set_var("TOPUP_KAFKA_JVM_OPTS", "");
    }
    // The state phase first, in a process that has done nothing else yet: its resident
    // memory is the evaluator's task and what any process has.
    let memory = if cli.phases.contains(&Phase::Memory) {
        Some(state::at_scale(&cli.state_sizes).await?)
    } else {
        None
    };
    // Phases 1–3 on each broker kind, side by side.
    let mut by_broker = Vec::new();
    let mut charted = None;
    for kind in cli.brokers.clone() {
        let (figures, to_command, to_result) = on_brokers(&cli, kind).await?;
        if charted.is_none() || kind != BrokerKind::Mock {
            charted = Some((to_command, to_result));
        }
        by_broker.push(figures);
    }
    let peak = peak_rss_mib();
    let stores = if cli.phases.contains(&Phase::Stores) {
        Some(stores::compare(cli.store_subscribers)?)
    } else {
        None
    };

    let figures = Figures {
        events: cli.events,
        subscribers: cli.subscribers,
        max_batch: cli.max_batch,
        brokers: by_broker,
        memory,
        stores,
        peak_rss_mib: peak,
    };
    std::fs::create_dir_all(&cli.out)?;
    let json = cli.out.join("topup-bench.json");
    std::fs::write(&json, serde_json::to_string_pretty(&figures)?)?;
    let svg = cli.out.join("latency.svg");
    let (to_command, to_result) = charted.unwrap_or_default();
    chart(&svg, &to_command, &to_result, cli.rate)?;

    let f = &figures;
    let header: Vec<String> = f.brokers.iter().map(|b| b.broker.clone()).collect();
    let row = |name: &str, value: &dyn Fn(&BrokerFigures) -> String| {
        let cells: Vec<String> = f.brokers.iter().map(value).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    if cli.phases.contains(&Phase::Throughput) {
        println!(
            "\n{} balance events, {} subscribers, batches of {}:\n",
            f.events, f.subscribers, f.max_batch
        );
        println!("| balance events/s | {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(header.len()));
        row("raw baseline (consume → transactional produce), median", &|b| {
            format!("{:.0}", b.baseline_events_per_s)
        });
        row("evaluator alone, median", &|b| format!("{:.0}", b.evaluator_events_per_s));
        row("**evaluator / baseline**", &|b| format!("**{:.2}**", b.evaluator_over_baseline));
        row("whole pipeline (evaluator + payment worker + notifier)", &|b| {
            format!("{:.0}", b.pipeline_events_per_s)
        });
        row("rounds (baseline / evaluator)", &|b| {
            let r = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            format!("{} / {}", r(&b.baseline_rounds), r(&b.evaluator_rounds))
        });
    }
    if cli.phases.contains(&Phase::Latency) {
        println!(
            "\nlatency at a steady {} events/s for {} s, from observed_at (ms, p50 / p95 / p99 / max):\n",
            cli.rate, cli.latency_secs
        );
        println!("| to | {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(header.len()));
        let p = |p: &Percentiles| {
            format!("{:.1} / {:.1} / **{:.1}** / {:.1}", p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms)
        };
        row("TopUpCommand", &|b| p(&b.latency.to_command));
        row("TopUpResult", &|b| p(&b.latency.to_result));
        row("achieved rate /s", &|b| format!("{:.0}", b.latency.achieved_rate_per_s));
    }
    let apache: Vec<&BrokerFigures> = f.brokers.iter().filter(|b| !b.recovery.is_empty()).collect();
    if !apache.is_empty() {
        println!(
            "\nrecovery after a SIGKILL of the evaluator (s from the kill to the first command for a \
             later event; median of rounds):\n"
        );
        println!(
            "| successor | {} |",
            apache.iter().map(|b| b.broker.as_str()).collect::<Vec<_>>().join(" | ")
        );
        println!("|---|{}", "---:|".repeat(apache.len()));
        for (i, successor) in Successor::ALL.iter().enumerate() {
            let cells: Vec<String> = apache
                .iter()
                .map(|b| {
                    b.recovery.get(i).map_or("–".into(), |r| {
                        let rounds: Vec<String> =
                            r.rounds_s.iter().map(|x| format!("{x:.1}")).collect();
                        format!("**{:.1}** ({})", r.median_s, rounds.join(", "))
                    })
                })
                .collect();
            println!("| {} | {} |", successor.name(), cells.join(" | "));
        }
    }
    for b in f.brokers.iter().filter(|b| !b.commit_intervals.is_empty()) {
        println!(
            "\ncommit interval on {} (evaluator alone; latency at {} events/s, a drop every {}):\n",
            b.broker, cli.rate, cli.drop_every
        );
        println!("| commit interval | evaluator events/s | to TopUpCommand p50 / p99 ms |");
        println!("|---:|---:|---:|");
        for c in &b.commit_intervals {
            println!(
                "| {} ms | {:.0} | {:.1} / **{:.1}** |",
                c.interval_ms, c.evaluator_events_per_s, c.to_command.p50_ms, c.to_command.p99_ms
            );
        }
    }
    for b in &f.brokers {
        let Some(r) = &b.restore else { continue };
        println!(
            "\nrestore on {} of a changelog of {} subscribers (s):\n",
            b.broker, r.restore_subscribers
        );
        println!("| restore | seconds | seconds per million subscribers |");
        println!("|---|---:|---:|");
        let per_million = |s: f64| s * 1e6 / r.restore_subscribers.max(1) as f64;
        println!(
            "| cold (no local store) | {:.1} | {:.1} |",
            r.cold_restore_s,
            per_million(r.cold_restore_s)
        );
        println!(
            "| checkpointed, {} records written since | **{:.2}** | {:.2} |",
            r.checkpointed_tail_records,
            r.checkpointed_restore_s,
            per_million(r.checkpointed_restore_s)
        );
        println!(
            "| an evaluator process killed and started on its store: until the {} events since are processed | **{:.2}** | {:.2} |",
            r.checkpointed_tail_records,
            r.restarted_restore_s,
            per_million(r.restarted_restore_s)
        );
        println!(
            "| the same, started without a store | {:.1} | {:.1} |",
            r.restarted_cold_restore_s,
            per_million(r.restarted_cold_restore_s)
        );
    }
    if let Some(m) = &f.memory {
        println!(
            "\nevaluator state, on-disk store with {} parsed states cached per partition ({} partitions):\n",
            m.cache_entries_per_partition, PARTITIONS
        );
        println!("| subscribers | process resident MiB | bytes per subscriber | bytes per added subscriber | tick, nothing due (ms) |");
        println!("|---:|---:|---:|---:|---:|");
        for p in &m.points {
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.2} |",
                p.subscribers,
                p.resident_mib,
                p.bytes_per_subscriber,
                p.bytes_per_added_subscriber,
                p.tick_ms
            );
        }
        println!(
            "\nchangelog bytes per balance event (keys and values): {:.0} on average; {:.0} when \
             it issues a top-up, {:.0} when it decides nothing",
            m.changelog_bytes_per_balance_event,
            m.changelog_bytes_per_top_up_event,
            m.changelog_bytes_per_quiet_event
        );
    }
    if let Some(stores) = &f.stores {
        stores::print(stores);
    }
    println!(
        "peak resident memory of the throughput and latency phases (mock brokers included): {:.0} MiB",
        f.peak_rss_mib
    );
    println!("figures: {}  chart: {}", json.display(), svg.display());
    Ok(())
}
