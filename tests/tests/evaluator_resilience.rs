//! The evaluator under crashes, rebalances, and carriers' reordering: no command lost, none
//! duplicated, state carried over through the changelog.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;

use anyhow::Context;
use topup_proto::topics;
use topup_proto::v1::{RuleState, TopUpCommand};
use topup_tests::{rule, Platform, WAIT};

const GROUP: &str = "topup-evaluator";
const INPUTS: &[&str] = &[topics::BALANCE, topics::RULES, topics::RESULTS];

/// Balances every subscriber goes through. Without results, the first crossing (sequence 2)
/// leaves a top-up in flight, so the later crossing (sequence 5) must not fire — unless the
/// evaluator forgot its state.
const ROUNDS: [i64; 5] = [2000, 900, 800, 2000, 700];

fn subscribers(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sub-{i:04}")).collect()
}

async fn publish_round(platform: &Platform, subs: &[String], round: usize) -> anyhow::Result<()> {
    for s in subs {
        platform.publish_balance(s, ROUNDS[round], round as u64 + 1).await?;
    }
    Ok(())
}

/// The commands per subscriber: (causing sequence, command id). On Apache Kafka every
/// command record is distinct (read_committed hides what a killed instance never
/// committed). The mock cluster shows uncommitted records, so there the same command may
/// appear twice after a SIGKILL — one top-up all the same (the payment worker charges an id
/// once; docs/guarantees.md).
async fn commands_by_subscriber(
    platform: &Platform,
) -> anyhow::Result<BTreeMap<String, BTreeSet<(u64, String)>>> {
    let mut by_subscriber: BTreeMap<String, BTreeSet<(u64, String)>> = BTreeMap::new();
    for c in platform.read_all::<TopUpCommand>(topics::COMMANDS).await? {
        let (subscriber, id) = (c.subscriber_id.clone(), c.command_id.clone());
        let new = by_subscriber
            .entry(c.subscriber_id)
            .or_default()
            .insert((c.cause_sequence, c.command_id));
        anyhow::ensure!(
            new || platform.kafka_cluster.is_mock(),
            "{subscriber}: command {id} written twice on Apache Kafka"
        );
    }
    Ok(by_subscriber)
}

fn assert_one_command_each(subs: &[String], commands: &BTreeMap<String, BTreeSet<(u64, String)>>) {
    for s in subs {
        let sequences: Vec<u64> =
            commands.get(s).map(|c| c.iter().map(|(seq, _)| *seq).collect()).unwrap_or_default();
        assert_eq!(sequences, [2u64], "{s}: exactly one command id, for the first crossing");
    }
    assert_eq!(commands.len(), subs.len());
}

fn spawn_child(platform: &Platform) -> anyhow::Result<tokio::process::Child> {
    topup_tests::child_command(env!("CARGO_BIN_EXE_evaluator_child"))
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("KAFKA_SESSION_TIMEOUT_MS", platform.kafka.session_timeout_ms.to_string())
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", platform.kafka.transaction_timeout_ms.to_string())
        // The restarted evaluator is the same instance: it finds its state store where the
        // killed one left it (never ahead of what was committed) and replays the tail.
        .env("STATE_DIR", platform.state_dir.path())
        .env("EVALUATOR_TRANSACTIONAL_ID", "evaluator-child")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the evaluator child process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluator_killed_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let platform = Platform::cluster()?;
    let subs = subscribers(200);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_approve_4242", RuleState::Active)).await?;
    }
    // Half the subscribers cross the threshold before the kill (their top-up in flight must
    // be remembered), half only after it (their rule must be remembered).
    let (early, late) = subs.split_at(subs.len() / 2);
    let mut first = spawn_child(&platform)?;
    publish_round(&platform, &subs, 0).await?;
    publish_round(&platform, early, 1).await?;
    // Kill it (SIGKILL: no cleanup, an open transaction left behind) once it is under way.
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    commands.wait_for("some commands before the kill", |_| true).await?;
    first.start_kill()?;
    tokio::time::timeout(WAIT, first.wait()).await??;

    publish_round(&platform, late, 1).await?;
    for round in 2..ROUNDS.len() {
        publish_round(&platform, &subs, round).await?;
    }
    let mut second = spawn_child(&platform)?;
    platform.wait_caught_up(GROUP, INPUTS).await?;
    assert_one_command_each(&subs, &commands_by_subscriber(&platform).await?);
    second.start_kill()?;
    tokio::time::timeout(WAIT, second.wait()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_evaluators_leaves_the_other_carries_on_with_its_state(
) -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    let subs = subscribers(200);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_approve_4242", RuleState::Active)).await?;
    }
    platform.start_evaluator();
    let leaver = platform.shutdown.child_token();
    let leaving = tokio::spawn(topup_evaluator::run(
        topup_evaluator::Config::new(platform.kafka.clone()),
        leaver.clone(),
    ));
    let (early, late) = subs.split_at(subs.len() / 2);
    publish_round(&platform, &subs, 0).await?;
    publish_round(&platform, early, 1).await?;
    platform.wait_caught_up(GROUP, INPUTS).await?;

    leaver.cancel();
    tokio::time::timeout(WAIT, leaving).await???;
    publish_round(&platform, late, 1).await?;
    for round in 2..ROUNDS.len() {
        publish_round(&platform, &subs, round).await?;
    }
    platform.wait_caught_up(GROUP, INPUTS).await?;
    assert_one_command_each(&subs, &commands_by_subscriber(&platform).await?);
    platform.stop().await
}

/// Tiny deterministic shuffle (no randomness in tests that must not flake).
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    let mut x = seed.max(1);
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_and_duplicated_balances_give_exactly_the_commands_the_rules_call_for(
) -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    let subs = subscribers(50);
    platform.start_evaluator();
    for s in &subs {
        platform.publish_rule(rule(s, "tok_approve_4242", RuleState::Active)).await?;
    }
    // Rules first: records of different topics have no order between them.
    platform.wait_caught_up(GROUP, INPUTS).await?;
    // Each subscriber's history (sequence, balance), delivered shuffled with duplicates.
    let history: Vec<(u64, i64)> =
        vec![(1, 3000), (2, 2500), (3, 1500), (4, 950), (5, 400), (6, 5400), (7, 800)];
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (i, s) in subs.iter().enumerate() {
        let mut arrivals = history.clone();
        arrivals.extend(history.iter().step_by(2).copied());
        let arrivals = shuffled(&arrivals, i as u64 + 7);
        // The reference: apply only events newer than the newest seen; with no results, the
        // first below-threshold balance fires and the top-up stays in flight.
        let mut newest = 0;
        for &(sequence, minor) in &arrivals {
            platform.publish_balance(s, minor, sequence).await?;
            if sequence > newest {
                newest = sequence;
                if minor < 1000 && !expected.contains_key(s) {
                    expected.insert(s.clone(), vec![sequence]);
                }
            }
        }
    }
    platform.wait_caught_up(GROUP, INPUTS).await?;
    let sequences: BTreeMap<String, Vec<u64>> = commands_by_subscriber(&platform)
        .await?
        .into_iter()
        .map(|(s, commands)| (s, commands.into_iter().map(|(seq, _)| seq).collect()))
        .collect();
    assert_eq!(sequences, expected);
    platform.stop().await
}

/// An evaluator in this process as instance `instance` (its store in the platform's state
/// directory), and what stops it.
fn start_instance(
    platform: &Platform,
    instance: &str,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<topup_kafka::Result<()>>) {
    let mut config = topup_evaluator::Config::new(platform.kafka.clone());
    config.transactional_id = Some(instance.into());
    let stop = platform.shutdown.child_token();
    (stop.clone(), tokio::spawn(topup_evaluator::run(config, stop)))
}

/// Records the evaluator's changelog holds now (committed ones).
async fn changelog_records(platform: &Platform) -> anyhow::Result<u64> {
    let mut records = 0;
    for partition in 0..topup_tests::PARTITIONS {
        let kafka = platform.kafka.clone();
        let read = tokio::task::spawn_blocking(move || {
            topup_kafka::read_partition_to_end(&kafka, topics::EVALUATOR_STATE, partition, WAIT)
        })
        .await??;
        records += read.len() as u64;
    }
    Ok(records)
}

/// Checkpointed restore: the evaluator restarted as the same instance (its state directory
/// kept) reads only the changelog written since its store's checkpoint — nothing, after a
/// clean stop — while a new instance without a store reads all of it; either way every
/// subscriber's state carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_evaluator_reads_only_the_changelog_written_since_its_checkpoint(
) -> anyhow::Result<()> {
    let platform = Platform::cluster()?;
    let subs = subscribers(100);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_approve_4242", RuleState::Active)).await?;
    }
    let restored =
        |instance: &str| topup_kafka::pipeline_metrics().restored.sum(&[("instance_id", instance)]);
    let start = |instance: &str| start_instance(&platform, instance);
    let (early, late) = subs.split_at(subs.len() / 2);

    let (stop, running) = start("evaluator-kept");
    publish_round(&platform, &subs, 0).await?;
    publish_round(&platform, early, 1).await?;
    platform.wait_caught_up(GROUP, INPUTS).await?;
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    assert_eq!(restored("evaluator-kept"), 0, "the first start found an empty changelog");
    let written = changelog_records(&platform).await?;
    assert!(written >= 2 * subs.len() as u64, "a rule and a state each: {written}");

    let (stop, running) = start("evaluator-kept");
    publish_round(&platform, late, 1).await?;
    platform.wait_caught_up(GROUP, INPUTS).await?;
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    assert_eq!(restored("evaluator-kept"), 0, "stopped cleanly, its store was at the end");

    let written = changelog_records(&platform).await?;
    let (stop, running) = start("evaluator-new");
    for round in 2..ROUNDS.len() {
        publish_round(&platform, &subs, round).await?;
    }
    platform.wait_caught_up(GROUP, INPUTS).await?;
    assert_eq!(restored("evaluator-new"), written, "no store: the whole changelog");
    assert_one_command_each(&subs, &commands_by_subscriber(&platform).await?);
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    Ok(())
}

/// Sets the evaluator changelog's compaction so that it happens within seconds: segments
/// roll after 100 ms and any dirt is worth cleaning (the broker's cleaner looks every 15 s).
async fn compact_changelog_at_once(platform: &Platform) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        platform.kafka.producer().create()?;
    // AlterConfigs replaces the topic's whole configuration: every setting is given.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topics::EVALUATOR_STATE));
    for (key, value) in topup_kafka::COMPACTION {
        config = config.set(key, value);
    }
    let config = config.set("segment.ms", "100").set("min.cleanable.dirty.ratio", "0.01");
    for outcome in admin.alter_configs(&[config], &AdminOptions::new()).await? {
        outcome.map_err(|(_, code)| anyhow::anyhow!("altering the changelog: {code:?}"))?;
    }
    Ok(())
}

/// Compaction on the real broker: the changelog of busy subscribers is compacted while the
/// evaluator runs, and an evaluator restored from it without a store of its own (cold) has
/// every subscriber's state — its rule, and its balance sequence (a stale balance is still
/// recognised as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_restore_from_a_compacted_changelog_keeps_every_state() -> anyhow::Result<()> {
    let platform = Platform::cluster()?;
    if platform.kafka_cluster.is_mock() {
        println!("librdkafka's mock cluster does not compact: nothing to prove here");
        return Ok(());
    }
    compact_changelog_at_once(&platform).await?;
    let subs = subscribers(20);
    for s in &subs {
        platform.publish_rule(rule(s, "tok_approve_4242", RuleState::Active)).await?;
    }
    let start = |instance: &str| start_instance(&platform, instance);
    let (stop, running) = start("evaluator-busy");
    // Balances above the threshold, round after round, until the broker has compacted some
    // of the state records away.
    let written =
        || topup_kafka::pipeline_metrics().produced.sum(&[("topic", topics::EVALUATOR_STATE)]);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut sequence = 0u64;
    loop {
        sequence += 1;
        for s in &subs {
            platform.publish_balance(s, 2_000 + sequence as i64, sequence).await?;
        }
        platform.wait_caught_up(GROUP, INPUTS).await?;
        let (written, kept) = (written(), changelog_records(&platform).await?);
        if kept < written {
            println!("after {sequence} rounds: {kept} of {written} changelog records kept");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no compaction after {sequence} rounds ({written} records written)"
        );
    }
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;

    // While no evaluator runs: a stale balance below the threshold (must be ignored), then
    // a fresh one (must top up once).
    for s in &subs {
        platform.publish_balance(s, 500, sequence - 1).await?;
        platform.publish_balance(s, 500, sequence + 1).await?;
    }
    let (stop, running) = start("evaluator-cold");
    platform.wait_caught_up(GROUP, INPUTS).await?;
    let commands = commands_by_subscriber(&platform).await?;
    for s in &subs {
        let sequences: Vec<u64> =
            commands.get(s).map(|c| c.iter().map(|(seq, _)| *seq).collect()).unwrap_or_default();
        assert_eq!(sequences, [sequence + 1], "{s}: one top-up, for the fresh balance");
    }
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    Ok(())
}
