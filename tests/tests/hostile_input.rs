//! Poison and hostile input. Over Kafka: each kind of bad record lands in the dead-letter
//! topic with its reason, and the good record behind it is still processed. Without Kafka:
//! a property test feeds every processor (evaluator, payment worker, notifier) arbitrary
//! bytes and mutated valid records — each is answered or refused, never a panic.
use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use topup_kafka::{Input, KafkaArgs, Task};
use topup_notifier::channel::{Channel, ChannelError, Delivery};
use topup_proto::v1::{
    DeadLetter, NotificationCommand, NotificationKind, RuleUpdated, TopUpResult,
};
use topup_proto::{topics, Message};
use topup_tests::{balance, cny, command, rule, Platform};

/// (topic, key, value, what it is) for every kind of hostile record.
fn hostile_records() -> Vec<(&'static str, Option<String>, Vec<u8>, &'static str)> {
    let good = balance("sub-h", 800, 1).encode_to_vec();
    let mut future = balance("sub-h", 800, 2);
    future.observed_at = Some(topup_proto::Timestamp {
        seconds: topup_kafka::now_timestamp().seconds + 86_400,
        nanos: 0,
    });
    let mut overflowing = balance("sub-h", i64::MAX, 3);
    overflowing.balance =
        Some(topup_proto::v1::Money { currency: "CNY".into(), amount_minor: i64::MAX });
    let mut odd_currency = balance("sub-h", 800, 4);
    odd_currency.balance =
        Some(topup_proto::v1::Money { currency: "yuan".into(), amount_minor: 1 });
    let huge = balance(&"x".repeat(200_000), 800, 5);
    let mut unknown_state = rule("sub-h", "tok_ok", topup_proto::v1::RuleState::Active);
    unknown_state.state = 99;
    let mut negative_rule = rule("sub-h", "tok_ok", topup_proto::v1::RuleState::Active);
    negative_rule.top_up = Some(topup_proto::v1::auto_top_up_rule::TopUp::Amount(cny(-5000)));
    let mut negative_command = command("sub-h", "neg", &["tok_ok"]);
    negative_command.amount = Some(cny(-1));
    let mut no_id = command("sub-h", "", &["tok_ok"]);
    no_id.idempotency_key.clear();
    let unknown_kind = NotificationCommand {
        notification_id: "n-1".into(),
        subscriber_id: "sub-h".into(),
        kind: 42,
        ..Default::default()
    };
    let result_without_command =
        TopUpResult { subscriber_id: "sub-h".into(), ..Default::default() };
    let key = || Some("sub-h".to_string());
    vec![
        (topics::BALANCE, key(), good[..good.len() / 2].to_vec(), "truncated protobuf"),
        (topics::BALANCE, key(), vec![0xff; 40], "bytes that are not protobuf"),
        (
            topics::BALANCE,
            key(),
            RuleUpdated::default().encode_to_vec(),
            "a message of another type",
        ),
        (topics::BALANCE, None, good.clone(), "no key"),
        (
            topics::BALANCE,
            Some("sub-other".into()),
            good.clone(),
            "a key that is not the subscriber",
        ),
        (topics::BALANCE, key(), future.encode_to_vec(), "a balance from the future"),
        (topics::BALANCE, key(), overflowing.encode_to_vec(), "an overflowing amount"),
        (topics::BALANCE, key(), odd_currency.encode_to_vec(), "a currency that is no code"),
        (topics::BALANCE, Some("x".repeat(200_000)), huge.encode_to_vec(), "a huge subscriber id"),
        (topics::BALANCE, key(), Vec::new(), "an empty value"),
        (
            topics::RULES,
            key(),
            RuleUpdated { rule: Some(unknown_state), updated_at: None }.encode_to_vec(),
            "an unknown enum value",
        ),
        (
            topics::RULES,
            key(),
            RuleUpdated { rule: Some(negative_rule), updated_at: None }.encode_to_vec(),
            "a negative top-up amount",
        ),
        (topics::RESULTS, key(), result_without_command.encode_to_vec(), "a result for no command"),
        (topics::COMMANDS, key(), negative_command.encode_to_vec(), "a negative charge"),
        (topics::COMMANDS, key(), no_id.encode_to_vec(), "a command without ids"),
        (
            topics::NOTIFICATIONS,
            key(),
            unknown_kind.encode_to_vec(),
            "an unknown notification kind",
        ),
        (
            topics::NOTIFICATIONS,
            key(),
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
            "a length beyond the value",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_records_are_dead_lettered_with_a_reason_and_the_services_carry_on(
) -> anyhow::Result<()> {
    let platform = Platform::start()?;
    let records = hostile_records();
    for (topic, key, value, _) in &records {
        match key {
            Some(key) => platform.publish_raw(topic, key, value).await?,
            None => platform.publish_unkeyed(topic, value).await?,
        }
    }
    // Behind all of them, real work for a subscriber with a rule.
    platform.publish_rule(rule("sub-ok", "tok_ok", topup_proto::v1::RuleState::Active)).await?;
    platform.publish_balance("sub-ok", 800, 1).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("the good top-up", |r| r.subscriber_id == "sub-ok").await?;

    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;
    // The negative charge is answered with a failed result and also kept in the DLQ.
    dead.wait_for_count("every hostile record", records.len(), |_| true).await?;
    let mut by_topic: HashMap<String, usize> = HashMap::new();
    for letter in &dead.seen {
        assert!(!letter.reason.is_empty(), "a dead letter without a reason: {letter:?}");
        assert!(!letter.service.is_empty());
        *by_topic.entry(letter.source_topic.clone()).or_default() += 1;
    }
    for (topic, _, _, _) in &records {
        assert!(by_topic.contains_key(*topic), "nothing dead-lettered from {topic}");
    }
    let reasons: Vec<&str> = dead.seen.iter().map(|d| d.reason.as_str()).collect();
    for expected in [
        "value is not a valid",
        "has no UTF-8 key",
        "differs from subscriber_id",
        "ahead of the record's time",
        "is not a known notification kind",
        "128 allowed",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no reason mentions {expected:?}: {reasons:#?}"
        );
    }
    assert_eq!(
        dead.seen.len(),
        records.len(),
        "exactly one dead letter per hostile record: {reasons:#?}"
    );
    platform.stop().await
}

/// A channel that accepts everything.
#[derive(Clone)]
struct Discard;

impl Channel for Discard {
    async fn deliver(&self, _: &Delivery<'_>) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// Valid records of every input topic, to mutate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_as_large_as_the_balance_topic_accepts_is_dead_lettered_cut_to_fit_and_the_next_balance_is_processed(
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use sha2::Digest;
    let platform = Platform::start()?;
    platform.publish_rule(rule("sub-big", "tok_ok", topup_proto::v1::RuleState::Active)).await?;
    // The broker's default message.max.bytes is 1,048,588 per record batch: this record, with
    // its batch around it, is about as large as the topic accepts, and larger than what
    // librdkafka would send by default (message.max.bytes 1,000,000) — a dead letter that
    // copied all of it could never be written.
    let huge = vec![0xffu8; 1_048_000];
    let producer: FutureProducer =
        platform.kafka.producer().set("message.max.bytes", "2000000").create()?;
    producer
        .send(FutureRecord::to(topics::BALANCE).key("sub-big").payload(&huge), topup_tests::WAIT)
        .await
        .map_err(|(e, _)| anyhow::anyhow!("publishing the large record: {e}"))?;
    // The same subscriber's next balance is processed: the partition is not stuck.
    platform.publish_balance("sub-big", 800, 1).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("sub-big's top-up", |r| r.subscriber_id == "sub-big").await?;

    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;
    let letter = dead
        .wait_for("the large record's dead letter", |d| d.source_topic == topics::BALANCE)
        .await?
        .clone();
    assert!(letter.truncated, "cut to fit");
    assert_eq!(letter.original_value_size, huge.len() as u64);
    assert_eq!(letter.original_value.len(), topup_kafka::DEAD_LETTER_VALUE_BYTES);
    assert_eq!(letter.original_value[..], huge[..letter.original_value.len()]);
    let digest: String = sha2::Sha256::digest(&huge).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(letter.original_value_sha256, digest);
    assert_eq!(letter.original_key, b"sub-big");
    assert!(!letter.reason.is_empty());
    assert_eq!(dead.seen.len(), 1, "one dead letter: {:?}", dead.seen.len());
    platform.stop().await
}

/// Sets the dead-letter topic's `max.message.bytes` and waits until the broker applies it.
async fn limit_dead_letters_to(platform: &Platform, bytes: usize) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        platform.kafka.producer().create()?;
    let bytes = bytes.to_string();
    let config =
        AlterConfig::new(ResourceSpecifier::Topic(topics::DLQ)).set("max.message.bytes", &bytes);
    for outcome in admin.alter_configs(&[config], &AdminOptions::new()).await? {
        outcome.map_err(|(_, code)| anyhow::anyhow!("altering the dead-letter topic: {code:?}"))?;
    }
    let deadline = std::time::Instant::now() + topup_tests::WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        let described =
            admin.describe_configs(&[ResourceSpecifier::Topic(topics::DLQ)], &AdminOptions::new());
        let applied = described.await?.into_iter().flatten().any(|resource| {
            resource.get("max.message.bytes").and_then(|e| e.value.as_deref()) == Some(&bytes)
        });
        if applied {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "max.message.bytes not applied");
    }
}

/// A dead-letter topic that refuses letters (its `max.message.bytes` too small for them)
/// never stops a partition: a letter too large is written bare (where, why, size, SHA-256,
/// none of the bytes); when not even that fits, the record is passed without one, logged
/// and counted. Either way the same subscriber's next balance is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_topic_that_refuses_letters_never_stops_the_partition() -> anyhow::Result<()>
{
    use sha2::Digest;
    let platform = Platform::start()?;
    if platform.kafka_cluster.is_mock() {
        println!("librdkafka's mock cluster has no per-topic max.message.bytes: nothing to prove");
        return platform.stop().await;
    }
    for subscriber in ["sub-bare", "sub-none"] {
        let active = topup_proto::v1::RuleState::Active;
        platform.publish_rule(rule(subscriber, "tok_ok", active)).await?;
    }
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;

    // A letter copying 10,000 bytes does not fit in 2,000; a bare one does.
    limit_dead_letters_to(&platform, 2_000).await?;
    let garbage = vec![0xffu8; 10_000];
    platform.publish_raw(topics::BALANCE, "sub-bare", &garbage).await?;
    platform.publish_balance("sub-bare", 800, 1).await?;
    results.wait_for("sub-bare's top-up", |r| r.subscriber_id == "sub-bare").await?;
    let letter =
        dead.wait_for("the bare letter", |d| d.source_topic == topics::BALANCE).await?.clone();
    assert!(letter.original_value.is_empty() && letter.original_key.is_empty(), "{letter:?}");
    assert!(letter.truncated);
    assert_eq!(letter.original_value_size, garbage.len() as u64);
    let digest: String =
        sha2::Sha256::digest(&garbage).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(letter.original_value_sha256, digest);
    assert!(!letter.reason.is_empty());

    // Not even a bare letter fits in 150 bytes (a transaction's marker, about 80, still
    // does: with less the broker could not end a transaction that touched the topic, and
    // every producer writing to it would be stuck). The record is passed without a letter.
    limit_dead_letters_to(&platform, 150).await?;
    platform.publish_raw(topics::BALANCE, "sub-none", &garbage).await?;
    platform.publish_balance("sub-none", 800, 1).await?;
    results.wait_for("sub-none's top-up", |r| r.subscriber_id == "sub-none").await?;
    let metrics = topup_kafka::ops::render_metrics();
    let unwritten = [("service", "topup-evaluator"), ("topic", topics::BALANCE)];
    assert_eq!(
        topup_tests::metric(&metrics, "topup_dead_letters_unwritten_total", &unwritten),
        1.0,
        "{metrics}"
    );
    assert_eq!(dead.seen.len(), 1, "only the bare letter was written: {:?}", dead.seen);
    platform.stop().await
}

fn valid_values() -> Vec<(&'static str, Vec<u8>)> {
    let rule = rule("sub-f", "tok_ok", topup_proto::v1::RuleState::Active);
    vec![
        (topics::BALANCE, balance("sub-f", 800, 7).encode_to_vec()),
        (topics::RULES, RuleUpdated { rule: Some(rule), updated_at: None }.encode_to_vec()),
        (
            topics::RESULTS,
            TopUpResult {
                command_id: "c-1".into(),
                subscriber_id: "sub-f".into(),
                status: 1,
                amount: Some(cny(5000)),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (topics::COMMANDS, command("sub-f", "c-2", &["tok_ok", "tok_decline"]).encode_to_vec()),
        (
            topics::NOTIFICATIONS,
            NotificationCommand {
                notification_id: "n-f".into(),
                subscriber_id: "sub-f".into(),
                kind: NotificationKind::TopUpFailed as i32,
                locale: "zh-CN".into(),
                amount: Some(cny(5000)),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ]
}

fn input(topic: &str, key: Option<Vec<u8>>, payload: Vec<u8>) -> Input {
    Input {
        topic: topic.to_string(),
        partition: 0,
        offset: 0,
        key,
        payload: Some(payload),
        timestamp_ms: Some(1_764_000_000_000),
        headers: Vec::new(),
    }
}

/// A value: arbitrary bytes, or a valid record truncated, with bytes overwritten.
fn value() -> impl Strategy<Value = (usize, Vec<u8>)> {
    let topics = valid_values().len();
    prop_oneof![
        (0..topics, proptest::collection::vec(any::<u8>(), 0..256)),
        (0..topics, any::<usize>(), proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8))
            .prop_map(|(topic, cut, flips)| {
                let mut bytes = valid_values()[topic].1.clone();
                for (at, byte) in flips {
                    if !bytes.is_empty() {
                        let len = bytes.len();
                        bytes[at % len] = byte;
                    }
                }
                let keep = cut % (bytes.len() + 1);
                bytes.truncate(keep.max(bytes.len() / 2));
                (topic, bytes)
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_processor_answers_or_refuses_any_bytes_without_panicking(
        (topic_index, bytes) in value(),
        keyed in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let topic = valid_values()[topic_index].0;
        let key = keyed.then(|| b"sub-f".to_vec());
        let record = input(topic, key, bytes);
        let kafka = KafkaArgs::new("127.0.0.1:1");
        runtime.block_on(async {
            let batch = std::slice::from_ref(&record);
            let answers = match topic {
                topics::COMMANDS => {
                    let retry = topup_payment_worker::RetryPolicy {
                        max_attempts: 1,
                        initial_backoff: Duration::from_millis(1),
                        max_backoff: Duration::from_millis(1),
                        deadline: Duration::from_secs(1),
                    };
                    let limits = topup_payment_worker::Limits {
                        max_single_charge_minor: 100_000,
                        max_command_age: topup_payment_worker::CommandAges::default(),
                        key_retention: Duration::from_secs(86_400),
                    };
                    let rules = topup_payment_worker::RuleView::fixed(Default::default());
                    let worker = topup_payment_worker::PaymentWorker::new(
                        topup_payment_worker::Sandbox::new(), retry, limits, rules, 4);
                    Task::new(worker).process(batch).await
                }
                topics::NOTIFICATIONS => {
                    let policy = topup_notifier::Config::new(kafka.clone()).policy();
                    let notifier = topup_notifier::Notifier::new(Discard, policy);
                    Task::new(notifier).process(batch).await
                }
                _ => {
                    let evaluator = topup_evaluator::Evaluator::new(
                        kafka, topup_evaluator::Settings::default());
                    Task::new(evaluator).process(batch).await
                }
            };
            let answers = answers.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(answers.len(), 1);
            for answer in answers {
                if let Err(refusal) = answer {
                    prop_assert!(!refusal.to_string().is_empty(), "a refusal without a reason");
                    prop_assert!(!refusal.is_transient(), "bad bytes are not a passing problem");
                }
            }
            Ok(())
        })?;
    }
}
