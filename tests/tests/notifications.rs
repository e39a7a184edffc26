//! The notifier against a real SMTP server and a real HTTP provider started by the test:
//! messages arrive in the subscriber's language on every channel; a flapping channel is
//! retried; duplicates are never sent twice, even across a restart; a burst of low-balance
//! events gives one reminder; quiet hours hold what can wait and nothing urgent; when
//! every channel fails, alerting hears about it.
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use topup_notifier::{Channels, Smtp, SmtpConfig, SmtpTls, Webhook, WebhookConfig};
use topup_proto::topics;
use topup_proto::v1::{
    ChannelKind, DeliveryReceipt, DeliveryStatus, NotificationChannel, NotificationCommand,
    NotificationKind, RuleState,
};
use topup_proto::Message as _;
use topup_tests::smtp_sink::SmtpSink;
use topup_tests::webhook_server::{WebhookServer, SECRET};
use topup_tests::{cny, metric, rule, Platform, WAIT};

const NOTIFIER_GROUP: &str = "topup-notifier";

fn channels(sink: &SmtpSink, webhooks: &WebhookServer) -> anyhow::Result<Channels> {
    let webhook = |path: &str| {
        Webhook::new(WebhookConfig {
            url: format!("{}/{path}", webhooks.base),
            secret: SECRET.to_string().into(),
            timeout: Duration::from_secs(2),
        })
    };
    Ok(Channels {
        email: Some(Smtp::new(&SmtpConfig {
            host: "127.0.0.1".into(),
            port: sink.port,
            tls: SmtpTls::None,
            credentials: Some(("topup".into(), "mail-password".to_string().into())),
            from: "Auto top-up <topup@carrier.example>".into(),
            timeout: Duration::from_secs(2),
        })?),
        sms: Some(webhook("sms")?),
        push: Some(webhook("push")?),
    })
}

fn channel(kind: ChannelKind, address: &str) -> NotificationChannel {
    NotificationChannel { kind: kind as i32, address: address.into() }
}

fn notification(
    id: &str,
    subscriber: &str,
    kind: NotificationKind,
    locale: &str,
    channels: Vec<NotificationChannel>,
) -> NotificationCommand {
    NotificationCommand {
        notification_id: id.into(),
        subscriber_id: subscriber.into(),
        kind: kind as i32,
        locale: locale.into(),
        channels,
        parameters: HashMap::from([
            ("reason".to_string(), "card_expired".to_string()),
            ("method".to_string(), "•••• 4242".to_string()),
        ]),
        urgent: kind == NotificationKind::TopUpFailed,
        created_at: Some(topup_kafka::now_timestamp()),
        command_id: String::new(),
        amount: Some(cny(5000)),
        balance: Some(cny(850)),
        threshold: Some(cny(1000)),
    }
}

async fn publish(platform: &Platform, n: &NotificationCommand) -> anyhow::Result<()> {
    platform.publish_raw(topics::NOTIFICATIONS, &n.subscriber_id, &n.encode_to_vec()).await
}

/// Receipts of notification `id` read so far, as (channel, status, attempt).
fn receipts_of(seen: &[DeliveryReceipt], id: &str) -> Vec<(ChannelKind, DeliveryStatus, u32)> {
    seen.iter()
        .filter(|r| r.notification_id == id)
        .map(|r| {
            (
                ChannelKind::try_from(r.channel).unwrap_or(ChannelKind::Unspecified),
                DeliveryStatus::try_from(r.status).unwrap_or(DeliveryStatus::Unspecified),
                r.attempt,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_arrive_in_the_subscribers_language_on_every_channel() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    let mut platform = Platform::cluster()?;
    platform.start_notifier(platform.notifier_config(), channels(&sink, &webhooks)?);

    let failed = notification(
        "n-zh",
        "sub-zh",
        NotificationKind::TopUpFailed,
        "zh-CN",
        vec![
            channel(ChannelKind::Email, "li.lei@example.com"),
            channel(ChannelKind::Sms, "+86 13812345678"),
            channel(ChannelKind::Push, "fcm:device-token-0123456789"),
        ],
    );
    let low = notification(
        "n-en",
        "sub-en",
        NotificationKind::LowBalance,
        "en",
        vec![channel(ChannelKind::Email, "sam@example.com")],
    );
    publish(&platform, &failed).await?;
    publish(&platform, &low).await?;

    let mail = sink.wait_for("li.lei@example.com").await?;
    let (subject, text) = mail.subject_and_text();
    assert_eq!(subject, "请处理：自动充值失败");
    assert_eq!(text, "自动充值 ¥50.00 失败：银行卡已过期。请更新您的支付方式，以免停机。");
    assert_eq!(mail.user.as_deref(), Some("topup"), "the client authenticated");
    let sms = webhooks.wait_for("+86 13812345678").await?;
    assert_eq!(sms.body.text, text);
    assert_eq!((sms.body.channel.as_str(), sms.body.kind.as_str()), ("sms", "top_up_failed"));
    assert!(sms.body.urgent);
    assert_eq!(sms.idempotency_key, "n-zh:sms");
    let push = webhooks.wait_for("fcm:device-token-0123456789").await?;
    assert_eq!(push.body.title, subject);
    let (subject, text) = sink.wait_for("sam@example.com").await?.subject_and_text();
    assert_eq!(subject, "Your balance is low");
    assert!(text.starts_with("Your balance is ¥8.50, below ¥10.00."), "{text}");
    assert_eq!(webhooks.bad_signatures(), 0);

    // One receipt per channel, each with the destination masked.
    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    receipts
        .wait_for("the push receipt", |r| {
            r.notification_id == "n-zh" && r.channel == ChannelKind::Push as i32
        })
        .await?;
    receipts.wait_for("the receipt of n-en", |r| r.notification_id == "n-en").await?;
    let zh: Vec<&DeliveryReceipt> =
        receipts.seen.iter().filter(|r| r.notification_id == "n-zh").collect();
    assert_eq!(zh.len(), 3);
    assert!(zh.iter().all(|r| r.status == DeliveryStatus::Delivered as i32 && r.attempt == 1));
    let destinations: Vec<&str> = zh.iter().map(|r| r.destination.as_str()).collect();
    assert!(destinations.contains(&"li***@example.com"), "{destinations:?}");
    assert!(destinations.contains(&"+86 138****5678"), "{destinations:?}");
    assert!(destinations.iter().all(|d| !d.contains("13812345678") && !d.contains("0123456789")));
    let metrics = topup_kafka::ops::render_metrics();
    let delivered = |channel| [("channel", channel), ("status", "delivered")];
    let deliveries = "topup_notification_deliveries_total";
    assert_eq!(metric(&metrics, deliveries, &delivered("sms")), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, deliveries, &delivered("email")), 2.0, "{metrics}");
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_channel_is_retried_until_it_delivers() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    webhooks.flaky("+86 13900000001", 2);
    sink.flaky("flaky@example.com", 1);
    let mut platform = Platform::cluster()?;
    platform.start_notifier(platform.notifier_config(), channels(&sink, &webhooks)?);

    let n = notification(
        "n-flap",
        "sub-flap",
        NotificationKind::TopUpSucceeded,
        "en",
        vec![
            channel(ChannelKind::Sms, "+86 13900000001"),
            channel(ChannelKind::Email, "flaky@example.com"),
        ],
    );
    publish(&platform, &n).await?;
    webhooks.wait_for("+86 13900000001").await?;
    sink.wait_for("flaky@example.com").await?;

    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    receipts
        .wait_for("the SMS delivered on the third attempt", |r| {
            r.notification_id == "n-flap"
                && r.channel == ChannelKind::Sms as i32
                && r.status == DeliveryStatus::Delivered as i32
        })
        .await?;
    receipts
        .wait_for("the e-mail delivered", |r| {
            r.notification_id == "n-flap"
                && r.channel == ChannelKind::Email as i32
                && r.status == DeliveryStatus::Delivered as i32
        })
        .await?;
    let mut sms: Vec<_> = receipts_of(&receipts.seen, "n-flap")
        .into_iter()
        .filter(|(c, _, _)| *c == ChannelKind::Sms)
        .collect();
    sms.sort_by_key(|(_, _, attempt)| *attempt);
    assert_eq!(
        sms,
        vec![
            (ChannelKind::Sms, DeliveryStatus::Failed, 1),
            (ChannelKind::Sms, DeliveryStatus::Failed, 2),
            (ChannelKind::Sms, DeliveryStatus::Delivered, 3),
        ]
    );
    assert_eq!(webhooks.requests("+86 13900000001"), 3);
    assert_eq!(webhooks.accepted().len(), 1);
    assert_eq!(sink.temporary_failures(), 1);
    assert_eq!(sink.mails().len(), 1, "the e-mail was sent once, after the 451");
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_are_not_sent_twice_even_after_a_restart() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    let platform = Platform::cluster()?;
    let start = |stop: CancellationToken| -> anyhow::Result<_> {
        Ok(tokio::spawn(topup_notifier::run(
            platform.notifier_config(),
            channels(&sink, &webhooks)?,
            stop,
        )))
    };
    let n = notification(
        "n-dup",
        "sub-dup",
        NotificationKind::TopUpSucceeded,
        "en",
        vec![channel(ChannelKind::Email, "once@example.com")],
    );
    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    let suppressed = |r: &DeliveryReceipt| {
        r.notification_id == "n-dup" && r.status == DeliveryStatus::Suppressed as i32
    };

    let first_stop = CancellationToken::new();
    let first = start(first_stop.clone())?;
    publish(&platform, &n).await?;
    sink.wait_for("once@example.com").await?;
    publish(&platform, &n).await?;
    receipts.wait_for("the replay suppressed", suppressed).await?;
    first_stop.cancel();
    tokio::time::timeout(WAIT, first).await.context("the notifier did not stop")???;

    // A new notifier restores the history from the changelog and still knows the id.
    let second_stop = CancellationToken::new();
    let second = start(second_stop.clone())?;
    publish(&platform, &n).await?;
    receipts.wait_for_count("the second replay suppressed", 2, suppressed).await?;
    assert_eq!(sink.mails().len(), 1, "sent exactly once across the restart");
    second_stop.cancel();
    tokio::time::timeout(WAIT, second).await.context("the notifier did not stop")???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_low_balance_events_gives_one_reminder() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    let mut platform = Platform::cluster()?;
    platform.start_evaluator();
    platform.start_notifier(platform.notifier_config(), channels(&sink, &webhooks)?);

    // A paused rule: no top-up, but a reminder on every crossing of its 10.00 threshold.
    let subscriber = "sub-burst";
    platform.publish_rule(rule(subscriber, "tok_ok", RuleState::Paused)).await?;
    // The rule first (records of different topics have no order between them).
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    for sequence in 1..=100u64 {
        let balance = if sequence % 2 == 1 { 900 } else { 1100 };
        platform.publish_balance(subscriber, balance, sequence).await?;
    }
    platform.wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES]).await?;
    platform.wait_caught_up(NOTIFIER_GROUP, &[topics::NOTIFICATIONS]).await?;

    let reminders = platform
        .read_all::<NotificationCommand>(topics::NOTIFICATIONS)
        .await?
        .into_iter()
        .filter(|n| n.kind == NotificationKind::LowBalance as i32)
        .count();
    assert_eq!(reminders, 50, "the evaluator reminds on each of the 50 crossings");
    let delivered = webhooks.accepted();
    assert_eq!(delivered.len(), 1, "the notifier lets one reminder through: {delivered:?}");
    let receipts = platform.read_all::<DeliveryReceipt>(topics::DELIVERIES).await?;
    let limited = receipts
        .iter()
        .filter(|r| {
            r.status == DeliveryStatus::Suppressed as i32 && r.detail.starts_with("rate limited")
        })
        .count();
    assert_eq!(limited, 49);
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_channel_fails_alerting_gets_an_undeliverable_receipt() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    sink.bounce("gone@example.com");
    webhooks.flaky("+86 13700000000", 99);
    let mut platform = Platform::cluster()?;
    let mut config = platform.notifier_config();
    config.delivery_max_attempts = 3;
    platform.start_notifier(config, channels(&sink, &webhooks)?);

    let n = notification(
        "n-lost",
        "sub-lost",
        NotificationKind::TopUpFailed,
        "en",
        vec![
            channel(ChannelKind::Email, "gone@example.com"),
            channel(ChannelKind::Sms, "+86 13700000000"),
        ],
    );
    publish(&platform, &n).await?;
    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    receipts
        .wait_for("the undeliverable receipt", |r| {
            r.notification_id == "n-lost" && r.status == DeliveryStatus::Undeliverable as i32
        })
        .await?;
    let mut seen = receipts_of(&receipts.seen, "n-lost");
    seen.sort_by_key(|(c, _, attempt)| (*c as i32, *attempt));
    assert_eq!(
        seen,
        vec![
            (ChannelKind::Unspecified, DeliveryStatus::Undeliverable, 0),
            (ChannelKind::Sms, DeliveryStatus::Failed, 1),
            (ChannelKind::Sms, DeliveryStatus::Failed, 2),
            (ChannelKind::Sms, DeliveryStatus::Failed, 3),
            (ChannelKind::Email, DeliveryStatus::Failed, 1),
        ],
        "a permanent bounce is not retried, a transient failure is, up to the limit"
    );
    assert_eq!(webhooks.requests("+86 13700000000"), 3);
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_hours_hold_what_can_wait_and_nothing_urgent() -> anyhow::Result<()> {
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    let mut platform = Platform::cluster()?;
    let mut config = platform.notifier_config();
    // Quiet hours around now in UTC (the zone of locale "en"), whatever the hour of the run.
    let now = chrono::DateTime::<chrono::Utc>::from(SystemTime::now());
    let window = format!(
        "{}-{}",
        (now - chrono::Duration::hours(1)).format("%H:%M"),
        (now + chrono::Duration::hours(1)).format("%H:%M")
    );
    config.quiet_hours = window.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    platform.start_notifier(config, channels(&sink, &webhooks)?);

    let low = notification(
        "n-night-low",
        "sub-night",
        NotificationKind::LowBalance,
        "en",
        vec![channel(ChannelKind::Email, "sleeping@example.com")],
    );
    let failed = notification(
        "n-night-failed",
        "sub-night",
        NotificationKind::TopUpFailed,
        "en",
        vec![channel(ChannelKind::Email, "sleeping@example.com")],
    );
    publish(&platform, &low).await?;
    publish(&platform, &failed).await?;
    let mail = sink.wait_for("sleeping@example.com").await?;
    assert_eq!(mail.subject_and_text().0, "Action needed: auto top-up failed");
    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    let held = receipts
        .wait_for("the low-balance reminder held", |r| r.notification_id == "n-night-low")
        .await?;
    assert_eq!(held.status, DeliveryStatus::Deferred as i32);
    assert!(held.detail.starts_with("quiet hours in UTC: held until"), "{}", held.detail);
    platform.wait_caught_up(NOTIFIER_GROUP, &[topics::NOTIFICATIONS]).await?;
    assert_eq!(sink.mails().len(), 1, "only the urgent message went out at night");
    platform.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_hanging_for_one_subscriber_does_not_hold_back_the_others() -> anyhow::Result<()>
{
    use topup_kafka::{Input, Task};
    let (sink, webhooks) = (SmtpSink::start().await?, WebhookServer::start().await?);
    // The provider answers one number only after 1.5 s (within the notifier's 2 s timeout).
    webhooks.slow("+86 13900000000", Duration::from_millis(1500));
    // One batch, as the pipeline hands it over (a batch is what Kafka had buffered: built
    // here so that its content is known): the hanging number first, 20 others behind it,
    // on one partition.
    let sms = |to: &str| vec![channel(ChannelKind::Sms, to)];
    let mut notifications = vec![notification(
        "n-slow",
        "sub-a-slow",
        NotificationKind::TopUpFailed,
        "en",
        sms("+86 13900000000"),
    )];
    for i in 0..20 {
        let to = format!("+86 1380000{i:04}");
        let (id, subscriber) = (format!("n-{i}"), format!("sub-x{i}"));
        notifications.push(notification(
            &id,
            &subscriber,
            NotificationKind::TopUpFailed,
            "en",
            sms(&to),
        ));
    }
    let batch: Vec<Input> = notifications
        .iter()
        .enumerate()
        .map(|(offset, n)| Input {
            topic: topics::NOTIFICATIONS.to_string(),
            partition: 0,
            offset: offset as i64,
            key: Some(n.subscriber_id.clone().into_bytes()),
            payload: Some(n.encode_to_vec()),
            timestamp_ms: Some(topup_kafka::now_timestamp().seconds * 1000),
            headers: Vec::new(),
        })
        .collect();
    let platform = Platform::cluster()?;
    let config = platform.notifier_config();
    let notifier = topup_notifier::Notifier::new(channels(&sink, &webhooks)?, config.policy())
        .with_concurrency(config.concurrency);
    let mut task = Task::new(notifier);
    let answers = tokio::time::timeout(WAIT, task.process(&batch)).await??;
    assert_eq!(answers.len(), batch.len());
    for answer in &answers {
        assert!(answer.is_ok(), "{answer:?}");
    }
    // Every message went out, the others before the hanging one was answered.
    assert_eq!(webhooks.accepted().len(), 21);
    assert_eq!(webhooks.accepted_before_slow(), 20, "some waited for the hanging one");
    Ok(())
}
