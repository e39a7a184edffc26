//! Faults during a stream of thousands of balance events: partition leaders taken down and
//! brought back, the group and transaction coordinators killed, a broker unreachable for
//! longer than the transaction timeout, evaluators scaled 1 → 3 → 1, and every service
//! killed with SIGKILL at random points and restarted. The
//! ledger at the end — commands per subscriber, results per command, charges per
//! idempotency key at the gateway — shows exactly one top-up (one command id) and exactly
//! one charge per needed top-up, none missing.
use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;
use topup_kafka::KafkaArgs;
use topup_proto::v1::{DeadLetter, RuleState, TopUpCommand, TopUpResult, TopUpStatus};
use topup_proto::{topics, Message};
use topup_tests::gateway_server::{GatewayServer, SECRET};
use topup_tests::{balance, rule, Platform, WAIT};

/// Every subscriber's balances: one drop below the 10.00 threshold (sequence 2), then it
/// stays low. Exactly one top-up each is needed.
const BALANCES: [i64; 4] = [1500, 500, 600, 550];

fn subscribers(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sub-{i:05}")).collect()
}

/// The stream, round by round (all subscribers' first balance, then their second, ...).
fn stream(subs: &[String]) -> Vec<(String, i64, u64)> {
    let mut events = Vec::new();
    for (round, amount) in BALANCES.iter().enumerate() {
        for s in subs {
            events.push((s.clone(), *amount, round as u64 + 1));
        }
    }
    events
}

async fn publish(
    producer: &FutureProducer,
    subscriber: &str,
    amount: i64,
    sequence: u64,
) -> anyhow::Result<()> {
    let event = balance(subscriber, amount, sequence);
    producer
        .send(
            FutureRecord::to(topics::BALANCE).key(subscriber).payload(&event.encode_to_vec()),
            WAIT,
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("publish: {e}"))?;
    Ok(())
}

async fn wait_all_caught_up(platform: &Platform) -> anyhow::Result<()> {
    platform
        .wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS])
        .await?;
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;
    platform.wait_caught_up("topup-payment-worker-retries", &[topics::PAYMENT_RETRIES]).await?;
    // Results feed back into the evaluator: once more, now that the payment worker is done.
    platform
        .wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS])
        .await?;
    platform.wait_caught_up("topup-notifier", &[topics::NOTIFICATIONS]).await
}

/// The ledger: one command per subscriber, at least one result per command and all of them
/// succeeded, and `charges` (per idempotency key) exactly one per command.
async fn assert_ledger(
    platform: &Platform,
    subs: &[String],
    // Charges per top-up (command id), across every key and method.
    charges: &HashMap<String, u32>,
) -> anyhow::Result<()> {
    let mut commands: BTreeMap<String, Vec<TopUpCommand>> = BTreeMap::new();
    for c in platform.read_all::<TopUpCommand>(topics::COMMANDS).await? {
        commands.entry(c.subscriber_id.clone()).or_default().push(c);
    }
    let mut results: BTreeMap<String, Vec<TopUpResult>> = BTreeMap::new();
    for r in platform.read_all::<TopUpResult>(topics::RESULTS).await? {
        results.entry(r.command_id.clone()).or_default().push(r);
    }
    let (mut duplicated_results, mut repeated_commands) = (0, 0);
    for s in subs {
        let theirs = commands.get(s).with_context(|| format!("{s}: no top-up command"))?;
        let command = &theirs[0];
        // One top-up: one command id. The mock cluster shows consumers the records of
        // transactions a killed service never committed (it ignores read_committed), so the
        // same command may appear again when the restarted service re-issues it.
        assert!(
            theirs.iter().all(|c| c.command_id == command.command_id),
            "{s}: two top-ups: {theirs:?}"
        );
        repeated_commands += theirs.len() - 1;
        // Caused by the drop (sequence 2) — or by a later low balance when the rule reached
        // the evaluator after the drop (topics are not ordered with each other, and an
        // outage can hold one back): a rule activated while low fires at once.
        assert!(
            (2..=4).contains(&command.cause_sequence),
            "{s}: caused by {}",
            command.cause_sequence
        );
        let answered =
            results.get(&command.command_id).with_context(|| format!("{s}: no result"))?;
        assert!(
            answered.iter().all(|r| r.status == TopUpStatus::Succeeded as i32),
            "{s}: {answered:?}"
        );
        duplicated_results += answered.len() - 1;
        assert_eq!(charges.get(&command.command_id), Some(&1), "{s}: charged exactly once");
    }
    assert_eq!(commands.len(), subs.len(), "no command for anyone else");
    assert_eq!(charges.len(), subs.len(), "no charge for anything else: {}", charges.len());
    let per_subscriber = commands.values().filter(|c| charges.get(&c[0].command_id) == Some(&1));
    assert_eq!(per_subscriber.count(), subs.len(), "one charge per subscriber");
    // On the mock cluster a killed service's unfinished transaction stays visible and a
    // crash between a committed transaction and the plain offset commit replays a batch
    // (docs/guarantees.md): records may repeat there; the charge is made once.
    println!("repeated after crashes: {repeated_commands} commands, {duplicated_results} results");
    // Apache Kafka honours read_committed: what a killed service never committed is never
    // seen, so not one record repeats. Only the mock cluster may show repeats.
    if !platform.kafka_cluster.is_mock() {
        assert_eq!(repeated_commands, 0, "one TopUpCommand record per top-up");
        assert_eq!(duplicated_results, 0, "one TopUpResult record per command");
        let (letters, _) = platform.read_decodable::<DeadLetter>(topics::DLQ).await?;
        let mut seen = std::collections::HashSet::new();
        let repeated = letters
            .iter()
            .filter(|d| !seen.insert((d.source_topic.clone(), d.source_partition, d.source_offset)))
            .count();
        assert_eq!(repeated, 0, "no dead letter written twice");
    }
    Ok(())
}

/// Publishes `events` in the background; the receiver counts how many are published, so
/// that faults start at points of the stream, not at times.
fn publish_in_background(
    platform: &Platform,
    events: Vec<(String, i64, u64)>,
) -> (tokio::task::JoinHandle<anyhow::Result<()>>, tokio::sync::watch::Receiver<usize>) {
    let kafka: KafkaArgs = platform.kafka.clone();
    let (published, progress) = tokio::sync::watch::channel(0usize);
    let publisher = tokio::spawn(async move {
        let producer: FutureProducer = kafka.producer().create()?;
        for (n, (s, amount, sequence)) in events.into_iter().enumerate() {
            publish(&producer, &s, amount, sequence).await?;
            published.send_replace(n + 1);
        }
        anyhow::Ok(())
    });
    (publisher, progress)
}

async fn published(
    progress: &mut tokio::sync::watch::Receiver<usize>,
    point: usize,
) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, progress.wait_for(|n| *n >= point))
        .await
        .context("the publisher stalled")??;
    Ok(())
}

async fn finish_publishing(
    publisher: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .context("publisher stuck")???;
    Ok(())
}

/// The evaluator's transactional id in the tests that look up its coordinator.
const EVALUATOR_ID: &str = "topup-evaluator-test";

/// The three services in this process, the evaluator under [`EVALUATOR_ID`].
fn start_services(platform: &mut Platform) {
    let mut evaluator = topup_evaluator::Config::new(platform.kafka.clone());
    evaluator.transactional_id = Some(EVALUATOR_ID.into());
    platform.start_evaluator_with(evaluator);
    let payment = topup_payment_worker::Config::new(platform.kafka.clone());
    let sandbox = platform.gateway.clone();
    platform.start_payment_worker(payment, sandbox);
    let notifier = platform.notifier_config();
    platform.start_notifier(notifier, topup_notifier::Channels::console());
}

/// 300 subscribers with active rules, and their stream being published in the background.
async fn stream_started(platform: &Platform) -> anyhow::Result<Streaming> {
    let subs = subscribers(300);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_ok", RuleState::Active)).await?;
    }
    let events = stream(&subs);
    let total = events.len();
    let (publisher, progress) = publish_in_background(platform, events);
    Ok(Streaming { subs, total, publisher, progress })
}

struct Streaming {
    subs: Vec<String>,
    total: usize,
    publisher: tokio::task::JoinHandle<anyhow::Result<()>>,
    progress: tokio::sync::watch::Receiver<usize>,
}

impl Streaming {
    /// Waits until `fraction` of the stream is published.
    async fn at(&mut self, fraction: f64) -> anyhow::Result<()> {
        published(&mut self.progress, (self.total as f64 * fraction) as usize).await
    }

    /// The rest of the stream, then the ledger.
    async fn finish(self, platform: &Platform) -> anyhow::Result<()> {
        finish_publishing(self.publisher).await?;
        wait_all_caught_up(platform).await?;
        assert_ledger(platform, &self.subs, &platform.gateway.charges_by_command()).await
    }
}

/// Waits until the cluster has moved every partition `broker` led to the others: the
/// outage has been noticed (the controller fenced it) and the stream goes on without it.
async fn out_of_service(platform: &Platform, broker: i32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        match platform.kafka_cluster.leads_any(broker) {
            Ok(false) => return Ok(()),
            _ if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("broker {broker} still leads partitions after {WAIT:?}")
            }
            _ => {}
        }
    }
}

/// Takes `broker` down (SIGKILL) until the cluster has moved its partitions, then back.
async fn outage(platform: &Platform, broker: i32) -> anyhow::Result<()> {
    platform.kafka_cluster.broker_down(broker)?;
    out_of_service(platform, broker).await?;
    platform.kafka_cluster.broker_up(broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_leaders_down_and_back_during_a_stream_lose_and_duplicate_no_top_up(
) -> anyhow::Result<()> {
    let platform = Platform::start_on_three_brokers()?;
    let mut streaming = stream_started(&platform).await?;
    // Each broker in turn leads some partitions of every topic (and coordinates some
    // groups and transactions): take it down during the stream — after a quarter, a half,
    // three quarters of it — and bring it back.
    for broker in 1..=3 {
        streaming.at(f64::from(broker) / 4.0).await?;
        outage(&platform, broker).await?;
    }
    streaming.finish(&platform).await?;
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_group_and_the_transaction_coordinator_killed_during_a_stream_lose_and_duplicate_no_top_up(
) -> anyhow::Result<()> {
    let mut platform = Platform::three_brokers()?;
    start_services(&mut platform);
    let mut streaming = stream_started(&platform).await?;
    // A third into the stream the broker coordinating the evaluator's group is killed
    // (SIGKILL) and restarted; at two thirds the one coordinating its transactions (looked
    // up then: coordinators move when a broker goes).
    streaming.at(1.0 / 3.0).await?;
    let group = platform.kafka_cluster.group_coordinator("topup-evaluator")?;
    outage(&platform, group).await?;
    streaming.at(2.0 / 3.0).await?;
    let transactions = platform.kafka_cluster.transaction_coordinator(EVALUATOR_ID)?;
    outage(&platform, transactions).await?;
    println!(
        "killed broker {group} (group coordinator), then broker {transactions} (transactions)"
    );
    streaming.finish(&platform).await?;
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_unreachable_for_longer_than_the_transaction_timeout_loses_and_duplicates_no_top_up(
) -> anyhow::Result<()> {
    let mut platform = Platform::three_brokers()?;
    start_services(&mut platform);
    let mut streaming = stream_started(&platform).await?;
    // The broker coordinating the evaluator's transactions stops answering (SIGSTOP: its
    // connections stay open, nothing comes back) until the controller has fenced it and
    // another broker coordinates the evaluator's transactions, and at least for the
    // transaction timeout: the new coordinator aborts the open transaction, whose producer
    // is fenced; then it answers again.
    streaming.at(1.0 / 3.0).await?;
    let paused = platform.kafka_cluster.transaction_coordinator(EVALUATOR_ID)?;
    platform.kafka_cluster.broker_pause(paused)?;
    let timeout = Duration::from_millis(u64::from(platform.kafka.transaction_timeout_ms));
    let paused_at = tokio::time::Instant::now();
    out_of_service(&platform, paused).await?;
    let deadline = paused_at + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        let moved = platform
            .kafka_cluster
            .transaction_coordinator(EVALUATOR_ID)
            .is_ok_and(|now| now != paused);
        if moved && paused_at.elapsed() > timeout {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the evaluator's transactions still coordinated by broker {paused} after {WAIT:?}"
        );
    }
    platform.kafka_cluster.broker_resume(paused)?;
    println!("broker {paused} unreachable for {:?}", paused_at.elapsed());
    streaming.finish(&platform).await?;
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evaluators_scaled_from_one_to_three_and_back_during_a_stream_lose_and_duplicate_no_top_up(
) -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    start_services(&mut platform);
    let subs = subscribers(600);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_ok", RuleState::Active)).await?;
    }
    let events = stream(&subs);
    let third = events.len() / 3;
    let mut events = events.into_iter();
    let mut publish_next = |n: usize| {
        let part: Vec<_> = events.by_ref().take(n).collect();
        let platform = &platform;
        async move {
            for (s, amount, sequence) in part {
                platform.publish_balance(&s, amount, sequence).await?;
            }
            anyhow::Ok(())
        }
    };
    // A third of the stream on one evaluator, the next third with two more (the group's
    // partitions spread over three, each taking a state it restores), the last third on
    // the first one again after the other two stopped (SIGTERM-like: their shutdown token).
    publish_next(third).await?;
    let added = platform.shutdown.child_token();
    let mut extra = Vec::new();
    for _ in 0..2 {
        let config = topup_evaluator::Config::new(platform.kafka.clone());
        extra.push(tokio::spawn(topup_evaluator::run(config, added.clone())));
    }
    platform.wait_group_members("topup-evaluator", 3).await?;
    publish_next(third).await?;
    added.cancel();
    for evaluator in extra {
        tokio::time::timeout(WAIT, evaluator).await.context("an evaluator did not stop")???;
    }
    platform.wait_group_members("topup-evaluator", 1).await?;
    publish_next(usize::MAX).await?;
    wait_all_caught_up(&platform).await?;
    assert_ledger(&platform, &subs, &platform.gateway.charges_by_command()).await?;
    platform.stop().await
}

#[derive(Clone, Copy, Debug)]
enum Service {
    Evaluator,
    PaymentWorker,
    Notifier,
}

fn spawn(
    service: Service,
    platform: &Platform,
    gateway: &str,
) -> anyhow::Result<tokio::process::Child> {
    let program = match service {
        Service::Evaluator => env!("CARGO_BIN_EXE_evaluator_child"),
        Service::PaymentWorker => env!("CARGO_BIN_EXE_payment_worker_child"),
        Service::Notifier => env!("CARGO_BIN_EXE_notifier_child"),
    };
    topup_tests::child_command(program)
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("KAFKA_SESSION_TIMEOUT_MS", platform.kafka.session_timeout_ms.to_string())
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", platform.kafka.transaction_timeout_ms.to_string())
        // Each restart is the same instance (a StatefulSet's pod): it finds its state
        // store where it left it and replays only the changelog's tail.
        .env("STATE_DIR", platform.state_dir.path())
        .env("EVALUATOR_TRANSACTIONAL_ID", "evaluator-child")
        .env("PAYMENT_TRANSACTIONAL_ID", "payment-worker-child")
        .env("NOTIFIER_TRANSACTIONAL_ID", "notifier-child")
        .env("PAYMENT_GATEWAY", "http")
        .env("PAYMENT_GATEWAY_URL", gateway)
        .env("PAYMENT_GATEWAY_SECRET", SECRET)
        .env("PAYMENT_GATEWAY_TIMEOUT_MS", "2000")
        .env("PAYMENT_INITIAL_BACKOFF_MS", "100")
        .env("QUIET_HOURS", "off")
        // No SMTP server or webhooks here: the notifier prints (to /dev/null).
        .env("NOTIFIER_PRINT_UNCONFIGURED", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {service:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_killed_at_random_points_charges_each_needed_top_up_exactly_once(
) -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let platform = Platform::cluster()?;
    let services = [Service::Evaluator, Service::PaymentWorker, Service::Notifier];
    let mut children = Vec::new();
    for service in services {
        children.push(spawn(service, &platform, &gateway.url)?);
    }
    let subs = subscribers(800);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_ok", RuleState::Active)).await?;
    }
    // 3,200 balance events. After a random number of them (200 to 599, from a seeded
    // xorshift), the next service in turn is killed with SIGKILL wherever it is and started
    // again: each service at least twice.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut kills = Vec::new();
    let mut next_kill = 200 + next_random() % 400;
    for (n, (s, amount, sequence)) in stream(&subs).into_iter().enumerate() {
        platform.publish_balance(&s, amount, sequence).await?;
        if n as u64 == next_kill {
            let victim = kills.len() % services.len();
            children[victim].kill().await?;
            children[victim] = spawn(services[victim], &platform, &gateway.url)?;
            kills.push(services[victim]);
            next_kill += 200 + next_random() % 400;
        }
    }
    println!("killed and restarted: {kills:?}");
    assert!(kills.len() >= 6);
    wait_all_caught_up(&platform).await?;
    assert_ledger(&platform, &subs, &gateway.charges_by_command()).await?;
    assert_eq!(gateway.bad_signatures(), 0);
    for child in &mut children {
        child.kill().await?;
    }
    Ok(())
}
