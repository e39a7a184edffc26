//! `topup-bench`: throughput of the evaluator against a raw Kafka baseline, in the same run,
//! on the embedded mock cluster. The baseline is the same transactional pipeline
//! (`topup_kafka::run_pipeline`, same settings, same batch size) with no business logic:
//! one output record per input record.
//!
//! `cargo run --release --bin topup-bench -- --events 200000 --subscribers 10000`
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use topup::embedded::EmbeddedKafka;
use topup::simulator::rule_for;
use topup_kafka::{run_pipeline, Input, KafkaArgs, Output, PipelineSpec, Processor, Refusal};
use topup_proto::v1::{BalanceUpdated, Money, RuleUpdated};
use topup_proto::{topics, Message};

const PARTITIONS: i32 = 4;
const SINK: &str = "bench.sink.v1";

/// Evaluator throughput against a raw consume → transactional produce baseline.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Balance events to process.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Subscribers the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    subscribers: u64,
    /// Records per transaction, for both.
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
}

/// The baseline's processor: forwards every record, decides nothing.
struct Forward;

impl Processor for Forward {
    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        out.push(Output {
            topic: SINK,
            partition: None,
            key: input.key.clone().unwrap_or_default(),
            payload: input.payload.clone(),
            headers: Vec::new(),
        });
        Ok(())
    }
}

fn preload(kafka: &KafkaArgs, cli: &Cli) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = kafka.producer().create()?;
    let send = |topic: &str, key: &str, payload: Vec<u8>| -> anyhow::Result<()> {
        loop {
            match producer.send(BaseRecord::to(topic).key(key).payload(&payload)) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    producer.flush(Duration::from_millis(100))?;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    };
    for s in 0..cli.subscribers {
        let id = format!("sub-{s:07}");
        if let Some(rule) = rule_for(s as usize, &id) {
            send(
                topics::RULES,
                &id,
                RuleUpdated { rule: Some(rule), updated_at: None }.encode_to_vec(),
            )?;
        }
    }
    for n in 0..cli.events {
        let s = n % cli.subscribers;
        let sequence = n / cli.subscribers + 1;
        // Balances wander across the 10.00 threshold so the evaluator has work to do.
        let amount_minor = 500 + ((n * 7919) % 2000) as i64;
        let id = format!("sub-{s:07}");
        let event = BalanceUpdated {
            subscriber_id: id.clone(),
            carrier_id: "bench".into(),
            balance: Some(Money { currency: "CNY".into(), amount_minor }),
            sequence,
            observed_at: Some(topup_kafka::now_timestamp()),
            event_id: String::new(),
        };
        send(topics::BALANCE, &id, event.encode_to_vec())?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// Committed records of `group` over the balance topic, and whether it reached the end.
fn progress(kafka: &KafkaArgs, group: &str) -> anyhow::Result<(i64, bool)> {
    let consumer: BaseConsumer = kafka.group_consumer(group).create()?;
    let mut wanted = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        wanted.add_partition(topics::BALANCE, p);
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let (mut done, mut total) = (0, 0);
    for e in committed.elements() {
        let (_, high) =
            consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))?;
        done += match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        };
        total += high;
    }
    Ok((done, done >= total))
}

/// Runs one pipeline until it has consumed every balance event; returns events per second,
/// timed from its first commit (so the group join is not counted) to the last.
async fn measure<F>(kafka: &KafkaArgs, group: &str, start: F) -> anyhow::Result<f64>
where
    F: FnOnce(CancellationToken) -> tokio::task::JoinHandle<topup_kafka::Result<()>>,
{
    let stop = CancellationToken::new();
    let task = start(stop.clone());
    let mut first: Option<(Instant, i64)> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let rate = loop {
        every.tick().await;
        let (k, g) = (kafka.clone(), group.to_string());
        let (done, finished) = tokio::task::spawn_blocking(move || progress(&k, &g)).await??;
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        if finished {
            let (t0, d0) = first.unwrap_or((Instant::now(), 0));
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            break (done - d0) as f64 / secs;
        }
        anyhow::ensure!(Instant::now() < deadline, "{group} did not finish in 10 minutes");
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    Ok(rate)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    topup_kafka::init_logging();
    let embedded = EmbeddedKafka::start(PARTITIONS)?;
    embedded.cluster().create_topic(SINK, PARTITIONS, 3)?;
    let kafka = KafkaArgs::new(embedded.bootstrap_servers());
    let loaded = Instant::now();
    preload(&kafka, &cli)?;
    println!(
        "preloaded {} balance events for {} subscribers in {:.1} s",
        cli.events,
        cli.subscribers,
        loaded.elapsed().as_secs_f64()
    );

    let baseline_kafka = kafka.clone();
    let max_batch = cli.max_batch;
    let baseline = measure(&kafka, "bench-baseline", move |stop| {
        let spec = PipelineSpec {
            service: "bench-baseline",
            group_id: "bench-baseline".into(),
            transactional_id: "bench-baseline".into(),
            inputs: vec![topics::BALANCE],
            max_batch,
            tick_every: None,
            kafka: baseline_kafka,
        };
        tokio::spawn(run_pipeline(spec, || Forward, stop))
    })
    .await?;
    let mut config = topup_evaluator::Config::new(kafka.clone());
    config.group_id = "bench-evaluator".into();
    config.max_batch = cli.max_batch;
    let evaluator = measure(&kafka, "bench-evaluator", move |stop| {
        tokio::spawn(topup_evaluator::run(config, stop))
    })
    .await?;

    println!();
    println!("| pipeline | balance events/s |");
    println!("|---|---:|");
    println!("| raw baseline (consume → transactional produce) | {baseline:.0} |");
    println!("| evaluator | {evaluator:.0} |");
    println!("| evaluator / baseline | {:.2} |", evaluator / baseline.max(1.0));
    println!("\npeak resident memory of the whole process: {:.0} MiB", peak_rss_mib());
    drop(embedded);
    Ok(())
}
