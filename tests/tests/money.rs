//! Money over Kafka and a real HTTP gateway: an answer lost after the charge never leads to
//! a second charge on another method; an outcome that stays unknown becomes a top-up that
//! needs reconciliation (still in flight, caps kept, nobody told "failed") until an operator
//! settles it; a charge is made only while the rule is active, the method on it and the
//! command young enough — also for a pause written before the command, and for a charge
//! parked in the retry lane; a charged top-up the carrier never credits is raised.
//!
//! Every ledger here counts charges per top-up (command id) across all its keys, as the
//! subscriber's card statement would.
use std::collections::HashMap;

use topup_domain::{method_idempotency_key, payment_method_id};
use topup_proto::topics;
use topup_proto::v1::{
    AutoTopUpRule, FailureReason, NotificationCommand, NotificationKind, PaymentMethod,
    PaymentMethodKind, RuleState, TopUpCommand, TopUpResult, TopUpStatus,
};
use topup_tests::gateway_server::GatewayServer;
use topup_tests::{command, rule, Platform};

const PAYMENT_GROUP: &str = "topup-payment-worker";

fn card(token: &str) -> PaymentMethod {
    PaymentMethod {
        token: token.into(),
        kind: PaymentMethodKind::Card as i32,
        label: String::new(),
        expires: String::new(),
        currency: "CNY".into(),
        method_id: payment_method_id(PaymentMethodKind::Card as i32, token),
    }
}

/// An active rule charging `tokens` in order.
fn rule_with(subscriber: &str, tokens: &[&str], state: RuleState) -> AutoTopUpRule {
    let mut r = rule(subscriber, tokens[0], state);
    r.payment_methods = tokens.iter().map(|t| card(t)).collect();
    r
}

fn key_of(command: &TopUpCommand, token: &str) -> String {
    let id = payment_method_id(PaymentMethodKind::Card as i32, token);
    method_idempotency_key(&command.idempotency_key, &id)
}

fn status(result: &TopUpResult) -> TopUpStatus {
    TopUpStatus::try_from(result.status).unwrap_or(TopUpStatus::Unspecified)
}

fn reason(result: &TopUpResult) -> FailureReason {
    FailureReason::try_from(result.failure_reason).unwrap_or(FailureReason::Unspecified)
}

/// No top-up was charged more than once, across all its keys.
fn assert_at_most_one_charge_per_top_up(charges: &HashMap<String, u32>) {
    let twice: Vec<_> = charges.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "top-ups charged more than once: {twice:?}");
}

/// The old double-charge path: the first method's charge goes through at the gateway but
/// its answer never arrives (a 502 after the charge; a 200 that is not an approval), and a
/// second method is on the command. One charge, on the first method, found by asking the
/// gateway about its key; the second method is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_answer_never_moves_on_to_the_next_method() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let config = platform.http_payment_config(&gateway.url);
    platform.start_payment_worker(config.clone(), config.gateway()?);

    let cases = [("lost-1", "tok_lost_a"), ("unreadable-1", "tok_unreadable_a")];
    for (index, (id, token)) in cases.iter().enumerate() {
        let c = command(&format!("sub-{index}"), id, &[token, "tok_ok_fallback"]);
        platform.publish_command(&c, None).await?;
    }
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    for (index, (id, token)) in cases.iter().enumerate() {
        let result = results.wait_for(id, |r| r.command_id == *id).await?.clone();
        assert_eq!(status(&result), TopUpStatus::Succeeded, "{id}: {result:?}");
        let charged = payment_method_id(PaymentMethodKind::Card as i32, token);
        let named = result.payment_method.as_ref().map(|m| m.method_id.as_str());
        assert_eq!(named, Some(charged.as_str()));
        assert!(
            result.payment_method.as_ref().is_some_and(|m| m.token.is_empty()),
            "no token in a result"
        );
        let c = command(&format!("sub-{index}"), id, &[token, "tok_ok_fallback"]);
        assert_eq!(result.idempotency_key, key_of(&c, token), "the key names the method");
        assert!(gateway.lookups(&key_of(&c, token)) >= 1, "{id}: the gateway was asked");
        assert_eq!(gateway.requests(&key_of(&c, "tok_ok_fallback")), 0, "{id}: no fallback");
    }
    platform.wait_caught_up(PAYMENT_GROUP, &[topics::COMMANDS]).await?;
    let charges = gateway.charges_by_command();
    assert_at_most_one_charge_per_top_up(&charges);
    for (id, _) in cases {
        assert_eq!(charges.get(id), Some(&1), "{id} charged once");
    }
    platform.stop().await
}

/// A charge whose outcome the gateway never settles (`hang`: no answer, the lookup says
/// "pending") becomes a result that needs reconciliation at the retry deadline. The evaluator
/// keeps the top-up in flight (no second top-up on the next drop), the subscriber is not told
/// it failed, and the operator's settlement closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unresolved_charge_needs_reconciliation_and_stays_in_flight() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let mut config = platform.http_payment_config(&gateway.url);
    config.retry_deadline_secs = 3;
    platform.start_payment_worker(config.clone(), config.gateway()?);
    platform.start_evaluator();
    platform.publish_rule(rule_with("sub-rec", &["tok_hang", "tok_ok"], RuleState::Active)).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    platform.publish_balance("sub-rec", 500, 1).await?;

    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("the result", |r| r.subscriber_id == "sub-rec").await?.clone();
    assert_eq!(status(&result), TopUpStatus::NeedsReconciliation, "{result:?}");
    assert_eq!(reason(&result), FailureReason::OutcomeUnknown);
    assert_eq!(gateway.charges_by_command().len(), 0);

    // Still in flight: a new crossing (above, then below) issues nothing.
    platform.publish_balance("sub-rec", 2000, 2).await?;
    platform.publish_balance("sub-rec", 400, 3).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RESULTS]).await?;
    let commands = platform.read_all::<TopUpCommand>(topics::COMMANDS).await?;
    assert_eq!(commands.len(), 1, "one top-up in flight until it is settled");
    let notices = platform.read_all::<NotificationCommand>(topics::NOTIFICATIONS).await?;
    assert!(
        !notices.iter().any(|n| n.kind == NotificationKind::TopUpFailed as i32),
        "the subscriber is not told it failed: {notices:?}"
    );

    // Settled by hand, with the gateway's word that nothing was charged: closed, and the
    // next crossing tops up again.
    let settlement = TopUpResult {
        command_id: result.command_id.clone(),
        subscriber_id: "sub-rec".into(),
        status: TopUpStatus::Failed as i32,
        failure_reason: FailureReason::Declined as i32,
        settled_by: "ops:test: gateway books show no charge".into(),
        ..Default::default()
    };
    use topup_proto::Message as _;
    platform.publish_raw(topics::RESULTS, "sub-rec", &settlement.encode_to_vec()).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::RESULTS]).await?;
    platform.publish_balance("sub-rec", 2000, 4).await?;
    platform.publish_balance("sub-rec", 300, 5).await?;
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    commands.wait_for_count("a second top-up after the settlement", 2, |_| true).await?;
    platform.stop().await
}

/// (subscriber, methods as issued, the rule changed to, expected status and reason, the
/// token charged)
type Case<'a> =
    (&'a str, &'a [&'a str], AutoTopUpRule, TopUpStatus, FailureReason, Option<&'a str>);

/// Pause, delete or method removal between the command and the charge: no charge, a
/// cancelled result and a notice. The rule change is written before the command but the
/// command carries the older rule version — as when the evaluator read the balance before
/// the pause — and the worker starts only once all of it is on the topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_is_made_only_while_the_rule_allows_it() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let paused = rule_with("sub-pause", &["tok_ok"], RuleState::Paused);
    let deleted = rule_with("sub-delete", &["tok_ok"], RuleState::Deleted);
    let removed = rule_with("sub-removed", &["tok_other"], RuleState::Active);
    let fallback = rule_with("sub-fallback", &["tok_ok_b"], RuleState::Active);
    let cases: Vec<Case> = vec![
        (
            "sub-pause",
            &["tok_ok"],
            paused,
            TopUpStatus::Cancelled,
            FailureReason::RuleNotActive,
            None,
        ),
        (
            "sub-delete",
            &["tok_ok"],
            deleted,
            TopUpStatus::Cancelled,
            FailureReason::RuleNotActive,
            None,
        ),
        (
            "sub-removed",
            &["tok_ok"],
            removed,
            TopUpStatus::Cancelled,
            FailureReason::MethodRemoved,
            None,
        ),
        (
            "sub-fallback",
            &["tok_ok_a", "tok_ok_b"],
            fallback,
            TopUpStatus::Succeeded,
            FailureReason::Unspecified,
            Some("tok_ok_b"),
        ),
    ];
    for (subscriber, tokens, changed, ..) in &cases {
        platform.publish_rule(rule_with(subscriber, tokens, RuleState::Active)).await?;
        platform.publish_rule(changed.clone()).await?;
        let mut c = command(subscriber, &format!("cmd-{subscriber}"), tokens);
        // The version of the first rule: one more than its offset, 0 or later. The worker must
        // not take "no newer rule read yet" for "allowed": it reads up to the end first.
        c.rule_version = 1;
        c.payment_methods = tokens.iter().map(|t| card(t)).collect();
        platform.publish_command(&c, None).await?;
    }
    let expired = {
        let mut c = command("sub-old", "cmd-sub-old", &["tok_ok"]);
        c.issued_at = Some(topup_proto::Timestamp {
            seconds: topup_kafka::now_timestamp().seconds - 7200,
            nanos: 0,
        });
        c
    };
    platform.publish_command(&expired, None).await?;

    let config = platform.http_payment_config(&gateway.url);
    platform.start_payment_worker(config.clone(), config.gateway()?);
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    for (subscriber, tokens, _, want, why, charged) in &cases {
        let result =
            results.wait_for(subscriber, |r| r.subscriber_id == *subscriber).await?.clone();
        assert_eq!((status(&result), reason(&result)), (*want, *why), "{subscriber}: {result:?}");
        let c = command(subscriber, &format!("cmd-{subscriber}"), tokens);
        for token in tokens.iter() {
            let sent = gateway.requests(&key_of(&c, token));
            assert_eq!(sent, u32::from(Some(*token) == *charged), "{subscriber}: {token}");
        }
    }
    let old = results.wait_for("the old command", |r| r.subscriber_id == "sub-old").await?.clone();
    assert_eq!(
        (status(&old), reason(&old)),
        (TopUpStatus::Cancelled, FailureReason::CommandExpired)
    );
    let mut notices = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    notices
        .wait_for_count("cancellation notices", 4, |n| {
            n.kind == NotificationKind::TopUpCancelled as i32
        })
        .await?;
    assert_eq!(gateway.charges_by_subscriber().get("sub-fallback"), Some(&1));
    assert_eq!(gateway.charges_by_command().len(), 1, "only the fallback case charged");
    platform.stop().await
}

/// A charge parked in the retry lane (the gateway answers 503 eight times, then would
/// approve) is not charged once the rule is paused: the retry reads the pause and cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_retry_is_not_charged_after_a_pause() -> anyhow::Result<()> {
    let gateway = GatewayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let mut config = platform.http_payment_config(&gateway.url);
    config.max_attempts = 1_000;
    platform.start_payment_worker(config.clone(), config.gateway()?);
    // Approved on the 9th request: without the check at charge time, this is charged.
    let token = "tok_storm9";
    platform.publish_rule(rule_with("sub-parked", &[token], RuleState::Active)).await?;
    let mut c = command("sub-parked", "cmd-parked", &[token]);
    c.payment_methods = vec![card(token)];
    c.rule_version = 1;
    platform.publish_command(&c, None).await?;
    let key = key_of(&c, token);
    let deadline = tokio::time::Instant::now() + topup_tests::WAIT;
    let mut every = tokio::time::interval(std::time::Duration::from_millis(50));
    while gateway.requests(&key) < 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no retry reached the gateway");
        every.tick().await;
    }
    platform.publish_rule(rule_with("sub-parked", &[token], RuleState::Paused)).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("the result", |r| r.command_id == "cmd-parked").await?.clone();
    assert_eq!(
        (status(&result), reason(&result)),
        (TopUpStatus::Cancelled, FailureReason::RuleNotActive)
    );
    let sent = gateway.requests(&key);
    assert!(gateway.charges_by_command().is_empty());
    platform.stop().await?;
    assert_eq!(gateway.requests(&key), sent, "nothing sent after the cancellation");
    Ok(())
}

/// Charged, and the carrier never credits: after the credit deadline the subscriber (and
/// alerting, on the same topic) hears that the top-up is not credited yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charged_top_up_never_credited_is_raised() -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    let mut config = topup_evaluator::Config::new(platform.kafka.clone());
    config.tick_ms = 100;
    config.credit_deadline_secs = 5;
    platform.start_evaluator_with(config);
    let kafka = platform.kafka.clone();
    platform
        .start_payment_worker(topup_payment_worker::Config::new(kafka), platform.gateway.clone());
    platform.publish_rule(rule("sub-credit", "tok_ok", RuleState::Active)).await?;
    platform.publish_rule(rule("sub-credited", "tok_ok", RuleState::Active)).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    platform.publish_balance("sub-credit", 500, 1).await?;
    platform.publish_balance("sub-credited", 500, 1).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for_count("both charged", 2, |r| status(r) == TopUpStatus::Succeeded).await?;
    // The carrier credits one of them (a balance risen by the amount).
    platform.publish_balance("sub-credited", 5500, 2).await?;
    let mut notices = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let raised = notices
        .wait_for("the not-credited notice", |n| {
            n.kind == NotificationKind::TopUpNotCredited as i32
        })
        .await?
        .clone();
    assert_eq!(raised.subscriber_id, "sub-credit");
    assert!(raised.urgent);
    platform.wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RESULTS]).await?;
    let all = platform.read_all::<NotificationCommand>(topics::NOTIFICATIONS).await?;
    let not_credited: Vec<_> =
        all.iter().filter(|n| n.kind == NotificationKind::TopUpNotCredited as i32).collect();
    assert_eq!(not_credited.len(), 1, "only the uncredited one, once: {not_credited:?}");
    assert_at_most_one_charge_per_top_up(&platform.gateway.charges_by_command());
    platform.stop().await
}
