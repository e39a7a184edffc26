//! `topup-soak`: a few minutes of everything at once, then the ledger. The three services
//! run as child processes against the embedded mock cluster, a real HTTP payment gateway
//! (declines, 5xx storms, slow answers), a real SMTP server and SMS/push provider (flapping),
//! while subscribers keep arriving and dropping below their thresholds, a service is killed
//! with SIGKILL every `--kill-every-secs`, a broker goes down and back every
//! `--broker-every-secs`, and hostile records are mixed into the stream. At the end it
//! prints a summary table and exits non-zero if any needed top-up was charged other than
//! exactly once.
//!
//! `cargo run --release -p topup-tests --bin topup-soak -- --minutes 3`
use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use topup_proto::topics;
use topup_proto::v1::{
    DeliveryReceipt, DeliveryStatus, RuleState, TopUpCommand, TopUpResult, TopUpStatus,
};
use topup_proto::Message as _;
use topup_tests::gateway_server::GatewayServer;
use topup_tests::smtp_sink::SmtpSink;
use topup_tests::webhook_server::WebhookServer;
use topup_tests::{rule, Platform};

/// A few minutes of load, crashes, broker outages, flaky outside systems and poison.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// How long to run.
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// New subscribers per second (each drops below its threshold once).
    #[arg(long, default_value_t = 20)]
    subscribers_per_sec: u64,
    /// Seconds between two kills (the services take turns).
    #[arg(long, default_value_t = 20)]
    kill_every_secs: u64,
    /// Seconds between two broker outages (2 s each, the brokers take turns).
    #[arg(long, default_value_t = 30)]
    broker_every_secs: u64,
}

#[derive(Clone, Copy, Debug)]
enum Service {
    Evaluator,
    PaymentWorker,
    Notifier,
}

struct Outside {
    gateway: GatewayServer,
    smtp: SmtpSink,
    webhooks: WebhookServer,
}

fn spawn(
    service: Service,
    platform: &Platform,
    outside: &Outside,
) -> anyhow::Result<tokio::process::Child> {
    // The child binaries are built beside this one (same package).
    let name = match service {
        Service::Evaluator => "evaluator_child",
        Service::PaymentWorker => "payment_worker_child",
        Service::Notifier => "notifier_child",
    };
    let program = std::env::current_exe()?.with_file_name(name);
    topup_tests::child_command(program)
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("KAFKA_SESSION_TIMEOUT_MS", platform.kafka.session_timeout_ms.to_string())
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", platform.kafka.transaction_timeout_ms.to_string())
        .env("PAYMENT_GATEWAY", "http")
        .env("PAYMENT_GATEWAY_URL", &outside.gateway.url)
        .env("PAYMENT_GATEWAY_SECRET", topup_tests::gateway_server::SECRET)
        .env("PAYMENT_GATEWAY_TIMEOUT_MS", "1000")
        .env("PAYMENT_INITIAL_BACKOFF_MS", "200")
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_PORT", outside.smtp.port.to_string())
        .env("SMTP_TLS", "none")
        .env("SMS_WEBHOOK_URL", format!("{}/sms", outside.webhooks.base))
        .env("PUSH_WEBHOOK_URL", format!("{}/push", outside.webhooks.base))
        .env("WEBHOOK_SECRET", topup_tests::webhook_server::SECRET)
        .env("DELIVERY_INITIAL_BACKOFF_MS", "200")
        .env("QUIET_HOURS", "off")
        .env("RUST_LOG", std::env::var("SOAK_CHILD_LOG").unwrap_or_else(|_| "error".into()))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {service:?}"))
}

/// For subscribers without a command: where their records are, what the evaluator's
/// changelog says about them and how far its group has committed, so a lost top-up can be
/// traced to the record, the state or the offsets.
async fn post_mortem(platform: &Platform, missing: &[&str]) -> anyhow::Result<()> {
    use topup_proto::evaluator::v1::SubscriberState;
    if missing.is_empty() {
        return Ok(());
    }
    let kafka = platform.kafka.clone();
    let wanted: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        for topic in [topics::BALANCE, topics::RULES, topics::EVALUATOR_STATE] {
            for partition in 0..topup_tests::PARTITIONS {
                let records =
                    topup_kafka::read_partition_to_end(&kafka, topic, partition, Duration::from_secs(60))?;
                for r in records {
                    let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).to_string();
                    // The subscriber's own key, and the evaluator's "<id> rule" key.
                    let subscriber = key.strip_suffix(" rule").unwrap_or(&key);
                    if !wanted.iter().any(|w| subscriber == w.as_str()) {
                        continue;
                    }
                    let payload = r.payload.as_deref().unwrap_or_default();
                    let what = match topic {
                        topics::BALANCE => topup_proto::v1::BalanceUpdated::decode(payload)
                            .map(|b| format!("seq {} amount {:?}", b.sequence, b.balance.map(|m| m.amount_minor)))
                            .unwrap_or_else(|e| e.to_string()),
                        topics::EVALUATOR_STATE if key.ends_with(" rule") => {
                            format!("rule record, {} bytes", payload.len())
                        }
                        topics::EVALUATOR_STATE => SubscriberState::decode(payload)
                            .map(|s| format!(
                                "balance seq {} armed {} in_flight {:?} awaiting_credit {} issued {}",
                                s.balance_sequence, s.armed, s.in_flight.map(|f| (f.cause_sequence, f.cause_topic, f.cause_offset)), s.awaiting_credit, s.commands_issued
                            ))
                            .unwrap_or_else(|e| e.to_string()),
                        _ => format!("{} bytes", payload.len()),
                    };
                    eprintln!("  {key} {topic}/{partition}@{} ts {:?}: {what}", r.offset, r.timestamp_ms);
                }
            }
        }
        let consumer: BaseConsumer = kafka.group_consumer("topup-evaluator").create()?;
        let mut list = rdkafka::TopicPartitionList::new();
        for topic in [topics::BALANCE, topics::RULES, topics::RESULTS] {
            for partition in 0..topup_tests::PARTITIONS {
                list.add_partition(topic, partition);
            }
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
        for e in committed.elements() {
            eprintln!("  committed topup-evaluator {}/{}: {:?}", e.topic(), e.partition(), e.offset());
        }
        Ok(())
    })
    .await?
}

/// The token of subscriber `n`: most approve, some decline, some storm, some are slow.
fn token(n: u64) -> &'static str {
    match n % 10 {
        7 => "tok_decline",
        8 => "tok_storm2",
        9 => "tok_slow",
        _ => "tok_ok",
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let outside = Outside {
        gateway: GatewayServer::start().await?,
        smtp: SmtpSink::start().await?,
        webhooks: WebhookServer::start().await?,
    };
    // Every subscriber's SMS goes to the same test number: its first 300 messages fail.
    outside.webhooks.flaky("+86 13812345678", 300);
    let cluster = Platform::three_brokers()?;
    let platform = &cluster;
    let services = [Service::Evaluator, Service::PaymentWorker, Service::Notifier];
    let mut children = Vec::new();
    for service in services {
        children.push(spawn(service, platform, &outside)?);
    }

    let started = Instant::now();
    let length = Duration::from_secs_f64(cli.minutes * 60.0);
    let (mut subscribers, mut kills, mut outages, mut poison) = (0u64, Vec::new(), 0u32, 0u32);
    let (mut next_kill, mut next_outage) = (cli.kill_every_secs, cli.broker_every_secs);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut pending_low: Vec<String> = Vec::new();
    eprintln!("soaking for {:.1} minutes...", cli.minutes);
    while started.elapsed() < length {
        second.tick().await;
        let now = started.elapsed().as_secs();
        // Last second's subscribers drop below their threshold; new ones arrive, above it.
        // Published concurrently: the platform, not this loop, should be the bottleneck.
        let lows = std::mem::take(&mut pending_low);
        futures::future::try_join_all(lows.iter().map(|id| async move {
            platform.publish_balance(id, 500, 2).await?;
            platform.publish_balance(id, 450, 3).await
        }))
        .await?;
        let mut arrivals = Vec::new();
        for _ in 0..cli.subscribers_per_sec {
            let id = format!("soak-{subscribers:06}");
            let mut their_rule = rule(&id, token(subscribers), RuleState::Active);
            if subscribers % 2 == 0 {
                // Half also want e-mail; every tenth mailbox answers 451 twice first.
                let address = format!("{id}@example.com");
                if subscribers % 10 == 0 {
                    outside.smtp.flaky(&address, 2);
                }
                their_rule.channels.push(topup_proto::v1::NotificationChannel {
                    kind: topup_proto::v1::ChannelKind::Email as i32,
                    address,
                });
            }
            arrivals.push((id.clone(), their_rule));
            pending_low.push(id);
            subscribers += 1;
        }
        futures::future::try_join_all(arrivals.into_iter().map(|(id, their_rule)| async move {
            platform.publish_rule(their_rule).await?;
            platform.publish_balance(&id, 1500, 1).await
        }))
        .await?;
        // Poison: garbage and a key that is not the subscriber.
        platform.publish_raw(topics::BALANCE, "soak-poison", &[0xff, 0x01, 0x02]).await?;
        platform.publish_raw(topics::COMMANDS, "soak-poison", b"not a command").await?;
        poison += 2;
        if now >= next_kill {
            let victim = kills.len() % services.len();
            children[victim].kill().await?;
            children[victim] = spawn(services[victim], platform, &outside)?;
            kills.push(services[victim]);
            next_kill += cli.kill_every_secs;
        }
        if now >= next_outage {
            let broker = (outages % 3) as i32 + 1;
            platform.kafka_cluster.broker_down(broker)?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            platform.kafka_cluster.broker_up(broker)?;
            outages += 1;
            next_outage += cli.broker_every_secs;
        }
    }
    for id in pending_low.drain(..) {
        platform.publish_balance(&id, 500, 2).await?;
        platform.publish_balance(&id, 450, 3).await?;
    }
    let streamed = started.elapsed().as_secs_f64();
    eprintln!("stream done after {streamed:.0} s; draining...");
    let drained = Instant::now();
    // Each wait gives up after a minute; a backlog (the notifier delivers one message after
    // the other) may need several.
    let groups: [(&str, &[&'static str]); 5] = [
        ("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS]),
        ("topup-payment-worker", &[topics::COMMANDS]),
        ("topup-payment-worker-retries", &[topics::PAYMENT_RETRIES]),
        ("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS]),
        ("topup-notifier", &[topics::NOTIFICATIONS]),
    ];
    for (group, inputs) in groups {
        let mut attempts = 0;
        while let Err(e) = platform.wait_caught_up(group, inputs).await {
            attempts += 1;
            eprintln!("{e}; waiting on");
            anyhow::ensure!(attempts < 10, "{group} did not catch up in 10 minutes");
        }
    }
    let drain_secs = drained.elapsed().as_secs_f64();

    // The ledger.
    let (commands, _) = platform.read_decodable::<TopUpCommand>(topics::COMMANDS).await?;
    let results = platform.read_all::<TopUpResult>(topics::RESULTS).await?;
    let receipts = platform.read_all::<DeliveryReceipt>(topics::DELIVERIES).await?;
    let dead = platform.read_all::<topup_proto::v1::DeadLetter>(topics::DLQ).await?;
    // Charges per top-up, across every key and method: what the subscriber's statement shows.
    let charges = outside.gateway.charges_by_command();
    let mut by_subscriber: BTreeMap<String, Vec<&TopUpCommand>> = BTreeMap::new();
    for c in &commands {
        by_subscriber.entry(c.subscriber_id.clone()).or_default().push(c);
    }
    let mut results_by_command: HashMap<&str, Vec<&TopUpResult>> = HashMap::new();
    for r in &results {
        results_by_command.entry(r.command_id.as_str()).or_default().push(r);
    }
    let mut problems = Vec::new();
    let (mut succeeded, mut failed, mut repeated, mut repeated_commands) = (0, 0, 0, 0);
    for n in 0..subscribers {
        let id = format!("soak-{n:06}");
        let Some(theirs) = by_subscriber.get(&id) else {
            problems.push(format!("{id}: no command"));
            continue;
        };
        let command = theirs[0];
        // One top-up is one command id; on the mock cluster the record itself may repeat
        // (it shows records of transactions a killed service never committed).
        if theirs.iter().any(|c| c.command_id != command.command_id) {
            problems.push(format!("{id}: {} different commands", theirs.len()));
        }
        repeated_commands += theirs.len() - 1;
        let Some(answers) = results_by_command.get(command.command_id.as_str()) else {
            problems.push(format!("{id}: no result"));
            continue;
        };
        repeated += answers.len() - 1;
        let charged = charges.get(&command.command_id).copied().unwrap_or(0);
        if token(n) == "tok_decline" {
            failed += 1;
            if charged != 0 || answers.iter().any(|r| r.status != TopUpStatus::Failed as i32) {
                problems.push(format!("{id}: declined card charged {charged} times or not failed"));
            }
        } else {
            succeeded += 1;
            if charged != 1 || answers.iter().any(|r| r.status != TopUpStatus::Succeeded as i32) {
                problems.push(format!("{id}: charged {charged} times, results {answers:?}"));
            }
        }
    }
    let status_count =
        |status: DeliveryStatus| receipts.iter().filter(|r| r.status == status as i32).count();

    println!("\n| soak | |\n|---|---:|");
    println!("| duration | {streamed:.0} s (+ {drain_secs:.0} s to drain) |");
    println!("| subscribers (one top-up needed each) | {subscribers} |");
    println!("| balance events | {} |", subscribers * 3);
    println!("| services killed with SIGKILL | {} ({kills:?}) |", kills.len());
    println!("| broker outages (2 s) | {outages} |");
    println!("| hostile records / dead letters | {poison} / {} |", dead.len());
    println!(
        "| commands (records; repeated by the mock's replay) | {} ({repeated_commands}) |",
        commands.len()
    );
    println!("| top-ups succeeded / failed (declined) | {succeeded} / {failed} |");
    println!("| top-ups charged | {} |", charges.len());
    println!("| results repeated (mock-cluster replay) | {repeated} |");
    println!(
        "| deliveries: delivered / failed attempts / undeliverable | {} / {} / {} |",
        status_count(DeliveryStatus::Delivered),
        status_count(DeliveryStatus::Failed),
        status_count(DeliveryStatus::Undeliverable)
    );
    println!(
        "| e-mails received / SMS+push accepted | {} / {} |",
        outside.smtp.mails().len(),
        outside.webhooks.accepted().len()
    );
    println!("| ledger problems | {} |", problems.len());
    for child in &mut children {
        child.kill().await?;
    }
    if !problems.is_empty() {
        for p in problems.iter().take(20) {
            eprintln!("  {p}");
        }
        let missing: Vec<&str> =
            problems.iter().filter_map(|p| p.strip_suffix(": no command")).take(10).collect();
        if let Err(e) = post_mortem(platform, &missing).await {
            eprintln!("post-mortem failed: {e:#}");
        }
        anyhow::bail!("{} subscribers were not charged exactly as needed", problems.len());
    }
    if dead.len() < poison as usize {
        anyhow::bail!("{poison} hostile records but only {} dead letters", dead.len());
    }
    Ok(())
}
