//! What happens by the calendar rather than by a balance: the monthly top-up (once per month,
//! even across an evaluator restart), reminders for payment methods about to expire, and
//! expired methods skipped by the payment worker with a word to the subscriber.
use std::collections::BTreeSet;

use tokio_util::sync::CancellationToken;
use topup_domain::YearMonth;
use topup_proto::topics;
use topup_proto::v1::{
    MonthlyTopUp, NotificationCommand, NotificationKind, PaymentMethod, PaymentMethodKind,
    RuleState, TopUpCommand, TopUpResult, TopUpStatus, TopUpTrigger,
};
use topup_tests::{cny, rule, Platform, WAIT};

/// Today's UTC day number and day of the month.
fn today() -> (i64, u32) {
    let day = topup_kafka::now_timestamp().seconds.div_euclid(86_400);
    (day, topup_domain::calendar::civil_from_days(day).2)
}

type Running = (CancellationToken, tokio::task::JoinHandle<topup_kafka::Result<()>>);

/// An evaluator looking at the calendar every 100 ms, stopped by its own token.
fn evaluator(platform: &Platform) -> Running {
    evaluator_with(platform, |_| {})
}

/// The same, with other settings too.
fn evaluator_with(
    platform: &Platform,
    configure: impl FnOnce(&mut topup_evaluator::Config),
) -> Running {
    let mut config = topup_evaluator::Config::new(platform.kafka.clone());
    config.tick_ms = 100;
    configure(&mut config);
    let stop = platform.shutdown.child_token();
    (stop.clone(), tokio::spawn(topup_evaluator::run(config, stop)))
}

fn monthly(subscriber: &str) -> topup_proto::v1::AutoTopUpRule {
    let mut r = rule(subscriber, "tok_approve_4242", RuleState::Active);
    r.monthly = Some(MonthlyTopUp { day_of_month: today().1, amount: Some(cny(3000)) });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_top_up_is_charged_once_a_month_even_across_a_restart() -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    platform.start_payment_worker(
        topup_payment_worker::Config::new(platform.kafka.clone()),
        platform.gateway.clone(),
    );
    let (stop, first) = evaluator(&platform);
    platform.publish_rule(monthly("sub-monthly-1")).await?;
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    let is_monthly = |who: &'static str| {
        move |c: &TopUpCommand| c.subscriber_id == who && c.trigger == TopUpTrigger::Monthly as i32
    };
    commands.wait_for("the monthly top-up", is_monthly("sub-monthly-1")).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("its result", |r| r.subscriber_id == "sub-monthly-1").await?;

    // A new evaluator restores the state (and looks at every subscriber again on its first
    // tick). A second subscriber's monthly top-up shows that it has ticked.
    stop.cancel();
    tokio::time::timeout(WAIT, first).await???;
    let (stop, second) = evaluator(&platform);
    platform.publish_rule(monthly("sub-monthly-2")).await?;
    commands
        .wait_for("the second subscriber's monthly top-up", is_monthly("sub-monthly-2"))
        .await?;
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;

    let ids: BTreeSet<String> = platform
        .read_all::<TopUpCommand>(topics::COMMANDS)
        .await?
        .into_iter()
        .filter(|c| c.subscriber_id == "sub-monthly-1")
        .map(|c| c.command_id)
        .collect();
    let period = YearMonth::of_day(today().0).to_string();
    let subscriber = topup_domain::SubscriberId::parse("sub-monthly-1")?;
    assert_eq!(ids, BTreeSet::from([topup_domain::monthly_command_id(&subscriber, &period)]));
    let result = platform
        .read_all::<TopUpResult>(topics::RESULTS)
        .await?
        .into_iter()
        .find(|r| r.subscriber_id == "sub-monthly-1")
        .ok_or_else(|| anyhow::anyhow!("no result"))?;
    assert_eq!(result.status, TopUpStatus::Succeeded as i32);
    assert_eq!(result.amount, Some(cny(3000)));
    assert_eq!(platform.gateway.charges().get(&result.idempotency_key), Some(&1), "charged once");
    // Stopped while Kafka is still there (it is not one of the platform's services).
    stop.cancel();
    tokio::time::timeout(WAIT, second).await???;
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_methods_are_reminded_once_and_expired_ones_skipped_with_a_word(
) -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    platform.start_payment_worker(
        topup_payment_worker::Config::new(platform.kafka.clone()),
        platform.gateway.clone(),
    );
    let (stop, running) = evaluator(&platform);
    let this_month = YearMonth::of_day(today().0).to_string();
    let mut r = rule("sub-cards", "tok_approve_4242", RuleState::Active);
    r.payment_methods = vec![
        PaymentMethod {
            method_id: Default::default(),
            token: "tok_approve_1111".into(),
            kind: PaymentMethodKind::Card as i32,
            label: "•••• 1111".into(),
            expires: "2020-01".into(),
            currency: "CNY".into(),
        },
        PaymentMethod {
            method_id: Default::default(),
            token: "tok_approve_4242".into(),
            kind: PaymentMethodKind::Card as i32,
            label: "•••• 4242".into(),
            expires: this_month.clone(),
            currency: "CNY".into(),
        },
    ];
    platform.publish_rule(r).await?;
    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let reminder = notifications
        .wait_for("the expiry reminder", |n| {
            n.subscriber_id == "sub-cards"
                && n.kind == NotificationKind::PaymentMethodExpiring as i32
        })
        .await?
        .clone();
    assert_eq!(reminder.parameters.get("method").map(String::as_str), Some("•••• 4242"));
    assert_eq!(reminder.parameters.get("expires"), Some(&this_month));

    // The balance falls: the expired card is skipped, the next one pays, and the subscriber
    // is told to update the expired one.
    platform.publish_balance("sub-cards", 800, 1).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("the result", |r| r.subscriber_id == "sub-cards").await?.clone();
    assert_eq!(result.status, TopUpStatus::Succeeded as i32);
    let charged = topup_domain::payment_method_id(
        topup_proto::v1::PaymentMethodKind::Card as i32,
        "tok_approve_4242",
    );
    assert_eq!(
        result.payment_method.map(|m| m.method_id),
        Some(charged),
        "by its id, not its token"
    );
    let charges = platform.gateway.charges();
    assert_eq!(charges.get(&result.idempotency_key), Some(&1), "the second card's key");
    let expired = topup_domain::method_idempotency_key(
        &topup_domain::idempotency_key(&result.command_id),
        &topup_domain::payment_method_id(PaymentMethodKind::Card as i32, "tok_approve_1111"),
    );
    assert_eq!(charges.get(&expired), None, "the expired card is not tried");
    assert_eq!(platform.gateway.charges_by_command().get(&result.command_id), Some(&1));
    let problem = notifications
        .wait_for("the expired-card notice", |n| {
            n.subscriber_id == "sub-cards"
                && n.kind == NotificationKind::PaymentMethodProblem as i32
        })
        .await?
        .clone();
    assert_eq!(problem.parameters.get("reason").map(String::as_str), Some("card_expired"));
    assert_eq!(problem.parameters.get("method").map(String::as_str), Some("•••• 1111"));

    // Once: after more ticks (the evaluator has processed the balance and the result since),
    // still one reminder id.
    platform
        .wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS])
        .await?;
    let reminders: BTreeSet<String> = platform
        .read_all::<NotificationCommand>(topics::NOTIFICATIONS)
        .await?
        .into_iter()
        .filter(|n| n.kind == NotificationKind::PaymentMethodExpiring as i32)
        .map(|n| n.notification_id)
        .collect();
    assert_eq!(reminders.len(), 1);
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    platform.stop().await
}

/// A top-up whose command goes unanswered (no payment worker yet) is issued again under the
/// same id once the reissue period has passed; when a payment worker comes, the subscriber
/// is charged once, however many times the command was issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_left_without_a_result_is_issued_again_and_charged_once() -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    let (stop, running) = evaluator_with(&platform, |config| config.reissue_after_secs = 1);
    platform.publish_rule(rule("sub-unanswered", "tok_approve_4242", RuleState::Active)).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    platform.publish_balance("sub-unanswered", 1500, 1).await?;
    platform.publish_balance("sub-unanswered", 500, 2).await?;

    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    let theirs = |c: &TopUpCommand| c.subscriber_id == "sub-unanswered";
    commands.wait_for_count("the command and its reissue", 2, theirs).await?;
    let ids: BTreeSet<&str> =
        commands.seen.iter().filter(|c| theirs(c)).map(|c| c.command_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "one top-up, one id: {ids:?}");

    platform.start_payment_worker(
        topup_payment_worker::Config::new(platform.kafka.clone()),
        platform.gateway.clone(),
    );
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result =
        results.wait_for("the result", |r| r.subscriber_id == "sub-unanswered").await?.clone();
    assert_eq!(result.status, TopUpStatus::Succeeded as i32);
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;
    platform.wait_caught_up("topup-payment-worker-retries", &[topics::PAYMENT_RETRIES]).await?;
    let all = platform.read_all::<TopUpCommand>(topics::COMMANDS).await?;
    assert!(all.iter().filter(|c| theirs(c)).all(|c| ids.contains(c.command_id.as_str())));
    assert_eq!(platform.gateway.charges().get(&result.idempotency_key), Some(&1), "charged once");
    stop.cancel();
    tokio::time::timeout(WAIT, running).await???;
    platform.stop().await
}
