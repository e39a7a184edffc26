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
