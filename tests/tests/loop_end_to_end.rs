//! The whole loop over the mock cluster: balance → evaluator → payment → notifier.
use topup_proto::topics;
use topup_proto::v1::{
    DeadLetter, DeliveryReceipt, DeliveryStatus, FailureReason, NotificationCommand,
    NotificationKind, RuleState, TopUpCommand, TopUpResult, TopUpStatus,
};
use topup_tests::{rule, Platform};

fn kind(n: &NotificationCommand) -> NotificationKind {
    NotificationKind::try_from(n.kind).unwrap_or(NotificationKind::Unspecified)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_below_threshold_gets_exactly_one_command_one_charge_and_notifications(
) -> anyhow::Result<()> {
    let platform = Platform::start()?;
    platform.publish_rule(rule("sub-a", "tok_approve_4242", RuleState::Active)).await?;
    // The rule first: records of different topics have no order between them, and a rule
    // that lands after the low balances fires at once for the latest (sequence 3, not 2).
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    platform.publish_balance("sub-a", 2000, 1).await?;
    platform.publish_balance("sub-a", 800, 2).await?; // crossing: fires
    platform.publish_balance("sub-a", 700, 3).await?; // still below, top-up in flight: nothing
    platform.publish_balance("sub-a", 700, 3).await?; // duplicate: nothing

    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("sub-a's result", |r| r.subscriber_id == "sub-a").await?.clone();
    assert_eq!(result.status, TopUpStatus::Succeeded as i32);
    assert_eq!(result.amount, Some(topup_tests::cny(5000)));

    // The carrier credits the top-up, then usage brings the balance down again: a new
    // crossing, a second command. Seeing it proves every earlier event was processed.
    platform.publish_balance("sub-a", 5700, 4).await?;
    platform.publish_balance("sub-a", 900, 5).await?;
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    commands
        .wait_for("the second crossing's command", |c| {
            c.subscriber_id == "sub-a" && c.cause_sequence == 5
        })
        .await?;
    let causes: Vec<u64> = platform
        .read_all::<TopUpCommand>(topics::COMMANDS)
        .await?
        .iter()
        .filter(|c| c.subscriber_id == "sub-a")
        .map(|c| c.cause_sequence)
        .collect();
    assert_eq!(
        causes,
        vec![2, 5],
        "one command per crossing, none for the stale or in-flight events"
    );
    assert_eq!(platform.gateway.charges().get(&result.idempotency_key), Some(&1));

    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    for expected in [
        NotificationKind::RuleActivated,
        NotificationKind::TopUpStarted,
        NotificationKind::TopUpSucceeded,
    ] {
        notifications
            .wait_for(expected.as_str_name(), |n| n.subscriber_id == "sub-a" && kind(n) == expected)
            .await?;
    }
    let mut deliveries = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    let delivered = deliveries
        .wait_for("the success message delivered", |d| {
            d.subscriber_id == "sub-a" && d.kind == NotificationKind::TopUpSucceeded as i32
        })
        .await?;
    assert_eq!(delivered.status, DeliveryStatus::Delivered as i32);
    assert_eq!(delivered.destination, "+86 138****5678", "contacts are masked in receipts");
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_gives_a_failed_result_and_an_urgent_failure_notification(
) -> anyhow::Result<()> {
    let platform = Platform::start()?;
    platform.publish_rule(rule("sub-d", "tok_decline_0002", RuleState::Active)).await?;
    platform.publish_balance("sub-d", 500, 1).await?;

    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("sub-d's result", |r| r.subscriber_id == "sub-d").await?.clone();
    assert_eq!(result.status, TopUpStatus::Failed as i32);
    assert_eq!(result.failure_reason, FailureReason::Declined as i32);
    assert!(platform.gateway.charges().is_empty(), "nothing was charged");

    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let failed = notifications
        .wait_for("the failure notification", |n| {
            n.subscriber_id == "sub-d" && kind(n) == NotificationKind::TopUpFailed
        })
        .await?;
    assert!(failed.urgent);
    assert_eq!(failed.parameters.get("reason").map(String::as_str), Some("declined"));
    let mut deliveries = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    deliveries
        .wait_for("the failure message delivered", |d| {
            d.subscriber_id == "sub-d"
                && d.kind == NotificationKind::TopUpFailed as i32
                && d.status == DeliveryStatus::Delivered as i32
        })
        .await?;
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_rule_or_with_a_paused_rule_nobody_is_charged() -> anyhow::Result<()> {
    let platform = Platform::start()?;
    platform.publish_rule(rule("sub-paused", "tok_approve_1111", RuleState::Paused)).await?;
    platform.publish_balance("sub-none", 300, 1).await?;
    platform.publish_balance("sub-paused", 300, 1).await?;

    // The reminder is committed in the same transaction as anything else that event caused,
    // so once it is visible, a command would be visible too.
    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    for subscriber in ["sub-none", "sub-paused"] {
        notifications
            .wait_for("a low-balance reminder", |n| {
                n.subscriber_id == subscriber && kind(n) == NotificationKind::LowBalance
            })
            .await?;
    }
    let commands = platform.read_all::<TopUpCommand>(topics::COMMANDS).await?;
    assert!(commands.is_empty(), "no command without an active rule: {commands:?}");

    // Activating the rule while the balance is already low fires at once.
    platform.publish_rule(rule("sub-paused", "tok_approve_1111", RuleState::Active)).await?;
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    let command =
        commands.wait_for("the command on activation", |c| c.subscriber_id == "sub-paused").await?;
    assert_eq!(command.cause_sequence, 1);
    assert!(platform
        .read_all::<TopUpCommand>(topics::COMMANDS)
        .await?
        .iter()
        .all(|c| c.subscriber_id != "sub-none"));
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_lands_in_the_dead_letter_topic_and_the_next_record_is_processed(
) -> anyhow::Result<()> {
    let platform = Platform::start()?;
    platform.publish_raw(topics::BALANCE, "sub-g", b"\xff\xfe not protobuf at all").await?;
    let mut invalid = rule("sub-g", "tok_approve_4242", RuleState::Active);
    invalid.threshold = Some(topup_tests::cny(-5));
    invalid.top_up = None;
    platform.publish_rule(invalid).await?;
    platform.publish_rule(rule("sub-g", "tok_approve_4242", RuleState::Active)).await?;
    platform.publish_balance("sub-g", 100, 1).await?;

    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;
    let letter = dead
        .wait_for("the garbage balance record", |d| d.source_topic == topics::BALANCE)
        .await?
        .clone();
    assert_eq!(letter.original_key, b"sub-g");
    assert_eq!(letter.original_value, b"\xff\xfe not protobuf at all");
    assert_eq!(letter.service, "topup-evaluator");
    assert!(letter.reason.contains("not a valid"), "{}", letter.reason);
    let refused_rule =
        dead.wait_for("the invalid rule", |d| d.source_topic == topics::RULES).await?;
    assert!(refused_rule.reason.starts_with("rule.top_up:"), "{}", refused_rule.reason);

    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    commands.wait_for("sub-g's command after the garbage", |c| c.subscriber_id == "sub-g").await?;
    platform.stop().await
}
