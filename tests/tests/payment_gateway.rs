//! The payment worker against a real HTTP gateway started by the test: every kind of
//! answer ends in exactly one result and at most one charge per command; limits refuse
//! before money moves; one subscriber's gateway outage does not hold back the others; a
//! worker killed between the charge and the commit charges once after its restart.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use topup_proto::topics;
use topup_proto::v1::{
    DeadLetter, FailureReason, NotificationCommand, NotificationKind, TopUpResult, TopUpStatus,
};
use topup_tests::gateway_server::GatewayServer;
use topup_tests::{charge_key, command, metric, Platform, WAIT};

const PAYMENT_GROUP: &str = "topup-payment-worker";
const RETRY_GROUP: &str = "topup-payment-worker-retries";

fn reason(result: &TopUpResult) -> FailureReason {
    FailureReason::try_from(result.failure_reason).unwrap_or(FailureReason::Unspecified)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_gateway_answer_ends_in_one_result_and_at_most_one_charge() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let config = platform.http_payment_config(&gateway.url);
    platform.start_payment_worker(config.clone(), config.gateway()?);

    // (command id, tokens in order, expected status, expected reason, requests to the key)
    let cases: &[(&str, &[&str], TopUpStatus, FailureReason)] = &[
        ("approve", &["tok_ok"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        ("decline", &["tok_decline"], TopUpStatus::Failed, FailureReason::Declined),
        ("expired", &["tok_expired"], TopUpStatus::Failed, FailureReason::CardExpired),
        ("broke", &["tok_insufficient"], TopUpStatus::Failed, FailureReason::InsufficientFunds),
        ("storm", &["tok_storm3"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        ("timeout", &["tok_timeout"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        ("slow", &["tok_slow"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        (
            "fallback",
            &["tok_expired", "tok_ok"],
            TopUpStatus::Succeeded,
            FailureReason::Unspecified,
        ),
        (
            "all-fail",
            &["tok_decline", "tok_expired"],
            TopUpStatus::Failed,
            FailureReason::CardExpired,
        ),
        // A storm longer than the retry budget (5 attempts): the method is unavailable.
        ("outage", &["tok_storm99"], TopUpStatus::Failed, FailureReason::GatewayUnavailable),
    ];
    for (index, (id, tokens, _, _)) in cases.iter().enumerate() {
        platform.publish_command(&command(&format!("sub-{index}"), id, tokens), None).await?;
    }
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    for (id, _, status, why) in cases {
        let result =
            results.wait_for(&format!("the result of {id}"), |r| r.command_id == *id).await?;
        assert_eq!(result.status, *status as i32, "{id}: {result:?}");
        assert_eq!(reason(result), *why, "{id}: {result:?}");
    }
    platform.wait_caught_up(PAYMENT_GROUP, &[topics::COMMANDS]).await?;
    platform.wait_caught_up(RETRY_GROUP, &[topics::PAYMENT_RETRIES]).await?;

    let by_command = platform.results_by_command().await?;
    for (id, _, _, _) in cases {
        assert_eq!(by_command.get(*id).map(Vec::len), Some(1), "exactly one result for {id}");
    }
    // Exactly one charge per succeeded top-up (across all its keys), on the key of the
    // method that worked, and none for the refusals.
    let expected: HashMap<String, u32> = ["approve", "storm", "timeout", "slow", "fallback"]
        .into_iter()
        .map(|id| (id.to_string(), 1))
        .collect();
    assert_eq!(gateway.charges_by_command(), expected);
    assert_eq!(gateway.charges().get(&charge_key("fallback", "tok_ok")), Some(&1));
    // The storm took 4 requests; the timed-out charge (its answer late: unknown) was settled
    // by asking the gateway about its key, not by charging again or moving on.
    assert_eq!(gateway.requests(&charge_key("storm", "tok_storm3")), 4);
    assert_eq!(by_command["storm"][0].attempts, 4);
    assert_eq!(gateway.requests(&charge_key("timeout", "tok_timeout")), 1);
    assert!(gateway.lookups(&charge_key("timeout", "tok_timeout")) >= 1);
    assert_eq!(
        gateway.requests(&charge_key("outage", "tok_storm99")),
        5,
        "the retry budget is 5 attempts"
    );
    assert_eq!(gateway.bad_signatures(), 0);
    let metrics = topup_kafka::ops::render_metrics();
    let completed = |status, reason| [("status", status), ("reason", reason)];
    let name = "topup_topups_completed_total";
    for (labels, value) in [
        (completed("failed", "card_expired"), 2.0),
        (completed("failed", "gateway_unavailable"), 1.0),
        (completed("succeeded", "none"), 5.0),
    ] {
        assert_eq!(metric(&metrics, name, &labels), value, "{labels:?} in:\n{metrics}");
    }
    assert_eq!(metric(&metrics, "topup_result_latency_seconds_count", &[]), 10.0, "{metrics}");

    // The subscriber hears what to fix.
    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let expired = notifications
        .wait_for("the failure notice of expired", |n| n.command_id == "expired")
        .await?;
    assert_eq!(expired.kind, NotificationKind::TopUpFailed as i32);
    assert!(expired.urgent);
    assert_eq!(expired.parameters.get("reason").map(String::as_str), Some("card_expired"));
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn safety_limits_refuse_before_any_money_moves() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let mut config = platform.http_payment_config(&gateway.url);
    config.max_single_charge_minor = 20_000;
    platform.start_payment_worker(config.clone(), config.gateway()?);

    let mut too_big = command("sub-big", "too-big", &["tok_ok"]);
    too_big.amount = Some(topup_tests::cny(20_001));
    let mut wrong_currency = command("sub-usd", "usd-card", &["tok_usd", "tok_cny"]);
    wrong_currency.payment_methods[0].currency = "USD".into();
    wrong_currency.payment_methods[1].currency = "CNY".into();
    let mut only_usd = command("sub-usd2", "only-usd", &["tok_usd"]);
    only_usd.payment_methods[0].currency = "USD".into();
    for c in [&too_big, &wrong_currency, &only_usd] {
        platform.publish_command(c, None).await?;
    }

    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let refused = results.wait_for("too-big", |r| r.command_id == "too-big").await?.clone();
    assert_eq!(reason(&refused), FailureReason::LimitExceeded);
    assert!(
        refused.failure_detail.contains("exceeds the single-charge limit of 200.00 CNY"),
        "{}",
        refused.failure_detail
    );
    let fallback = results.wait_for("usd-card", |r| r.command_id == "usd-card").await?.clone();
    assert_eq!(fallback.status, TopUpStatus::Succeeded as i32, "{fallback:?}");
    let mismatch = results.wait_for("only-usd", |r| r.command_id == "only-usd").await?.clone();
    assert_eq!(reason(&mismatch), FailureReason::CurrencyMismatch);

    // No request for the refused command or the mismatched method ever left the worker.
    assert_eq!(gateway.requests(&charge_key("too-big", "tok_ok")), 0);
    assert_eq!(gateway.requests(&charge_key("usd-card", "tok_usd")), 0);
    assert_eq!(gateway.requests(&charge_key("only-usd", "tok_usd")), 0);
    assert_eq!(gateway.charges().get(&charge_key("usd-card", "tok_cny")), Some(&1));
    assert_eq!(gateway.charges_by_command().len(), 1, "only usd-card charged");
    // The refused command is kept for operators, with the reason.
    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;
    let letter =
        dead.wait_for("the refused command", |d| d.source_topic == topics::COMMANDS).await?;
    assert!(letter.reason.contains("single-charge limit"), "{}", letter.reason);
    platform.stop().await
}

/// The bound docs/payment-worker.md states: another subscriber's top-up waits at most one gateway
/// timeout (1 s in tests) behind a subscriber whose gateway hangs, plus ordinary latency.
const OUTAGE_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_subscribers_gateway_outage_does_not_hold_back_the_others() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let mut config = platform.http_payment_config(&gateway.url);
    // The hanging charge's outcome is unknown: it is asked about until this deadline.
    config.retry_deadline_secs = 6;
    platform.start_payment_worker(config.clone(), config.gateway()?);
    // Warm up: the worker has joined its group and answered once.
    platform.publish_command(&command("sub-warm", "warm", &["tok_ok"]), Some(0)).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("warm-up", |r| r.command_id == "warm").await?;

    // The hanging subscriber goes first, then others on the same partition, one after the
    // other — the order in which a blocking worker would have to serve them.
    platform.publish_command(&command("sub-hang", "hang", &["tok_hang"]), Some(0)).await?;
    let mut published = Vec::new();
    for n in 0..20 {
        let id = format!("other-{n}");
        platform
            .publish_command(&command(&format!("sub-other-{n}"), &id, &["tok_ok"]), Some(0))
            .await?;
        published.push((id, Instant::now()));
    }
    let mut worst = Duration::ZERO;
    for (id, at) in &published {
        results.wait_for(id, |r| r.command_id == *id).await?;
        worst = worst.max(at.elapsed());
    }
    println!(
        "worst latency of the others behind a hanging gateway: {worst:?} (bound {OUTAGE_BOUND:?})"
    );
    assert!(worst <= OUTAGE_BOUND, "others waited {worst:?}, more than {OUTAGE_BOUND:?}");
    assert!(
        !results.seen.iter().any(|r| r.command_id == "hang"),
        "the hanging charge is still being retried while the others are done"
    );
    // The hanging charge may have gone through: never sent again while the gateway says
    // "pending", and at the deadline it needs reconciliation (not "failed").
    let hung = results.wait_for("hang", |r| r.command_id == "hang").await?;
    assert_eq!(hung.status, TopUpStatus::NeedsReconciliation as i32, "{hung:?}");
    assert_eq!(reason(hung), FailureReason::OutcomeUnknown);
    assert_eq!(hung.attempts, 1);
    assert!(gateway.lookups(&charge_key("hang", "tok_hang")) >= 1);
    platform.stop().await
}

fn spawn_worker(platform: &Platform, url: &str) -> anyhow::Result<tokio::process::Child> {
    topup_tests::child_command(env!("CARGO_BIN_EXE_payment_worker_child"))
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("KAFKA_SESSION_TIMEOUT_MS", platform.kafka.session_timeout_ms.to_string())
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", platform.kafka.transaction_timeout_ms.to_string())
        .env("PAYMENT_GATEWAY", "http")
        .env("PAYMENT_GATEWAY_URL", url)
        .env("PAYMENT_GATEWAY_SECRET", topup_tests::gateway_server::SECRET)
        // Long enough that the kill always lands while the worker waits for the answer.
        .env("PAYMENT_GATEWAY_TIMEOUT_MS", "30000")
        .env("PAYMENT_INITIAL_BACKOFF_MS", "100")
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the payment worker child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_between_charge_and_commit_charges_once_after_restart() -> anyhow::Result<()>
{
    let mut gateway = GatewayServer::start().await?;
    let platform = Platform::cluster()?;
    let mut child = spawn_worker(&platform, &gateway.url)?;
    platform.publish_command(&command("sub-1", "before", &["tok_ok"]), Some(0)).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("the first command", |r| r.command_id == "before").await?;

    // The gateway charges and holds its answer; the worker is killed before it commits.
    platform.publish_command(&command("sub-2", "held", &["tok_hold"]), Some(0)).await?;
    let key = tokio::time::timeout(WAIT, gateway.held.recv())
        .await
        .context("the held charge never reached the gateway")?
        .context("gateway stopped")?;
    assert_eq!(key, charge_key("held", "tok_hold"));
    child.kill().await?;
    child.wait().await?;
    assert_eq!(gateway.charges().get(&key), Some(&1), "the money moved before the kill");

    // The restarted worker replays the command with the same key and gets the first answer.
    let mut restarted = spawn_worker(&platform, &gateway.url)?;
    let result = results.wait_for("the held command", |r| r.command_id == "held").await?;
    assert_eq!(result.status, TopUpStatus::Succeeded as i32);
    platform.wait_caught_up(PAYMENT_GROUP, &[topics::COMMANDS]).await?;
    restarted.kill().await?;

    let by_command = platform.results_by_command().await?;
    assert_eq!(by_command.get("held").map(Vec::len), Some(1), "one result for the held command");
    assert_eq!(by_command.get("before").map(Vec::len), Some(1), "no replay of committed work");
    assert_eq!(gateway.charges_by_command().get("held"), Some(&1), "charged once");
    assert_eq!(gateway.requests(&key), 2, "asked again after the restart");
    Ok(())
}
