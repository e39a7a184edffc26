//! `topupctl`, the operator's CLI: publish a balance event or a rule (from flags or from
//! proto3 JSON), tail any topic decoded to JSON, show a subscriber's state as the services
//! keep it, replay dead letters to their source topic after a fix, and create the topics.
//! Every record it writes is protobuf, like everything else on the bus.
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use topup_domain::{Currency, Money};
use topup_evaluator::changelog::{keys_of as evaluator_keys, rule_key_subscriber};
use topup_kafka::{read_partition_to_end, KafkaArgs, TopicSpec};
use topup_proto::v1::{BalanceUpdated, DeadLetter, RuleUpdated};
use topup_proto::{topics, Message};

/// The operator's CLI for the auto top-up platform.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a BalanceUpdated, as a carrier integration would.
    PublishBalance {
        /// Subscriber id (also the record key).
        #[arg(long)]
        subscriber: String,
        /// The balance, in major units: "8.50".
        #[arg(long, allow_hyphen_values = true)]
        balance: String,
        /// ISO 4217 currency code.
        #[arg(long, default_value = "CNY")]
        currency: String,
        /// The carrier's per-subscriber sequence; must grow with every event.
        #[arg(long)]
        sequence: u64,
        /// Carrier id.
        #[arg(long, default_value = "topupctl")]
        carrier: String,
    },
    /// Publish a JSON message (proto3 JSON mapping) to a topic: a BalanceUpdated to
    /// carrier.balance.v1, a RuleUpdated to topup.rules.v1 (an AutoTopUpRule is wrapped), a
    /// TopUpResult to topup.results.v1 (to end a top-up stuck in flight once its outcome is
    /// known from the gateway; billing reads it too).
    Publish {
        /// carrier.balance.v1 or topup.rules.v1.
        #[arg(long)]
        topic: String,
        /// File with the JSON, or "-" for standard input.
        #[arg(long, default_value = "-")]
        json: String,
    },
    /// Settle a top-up with the gateway's word: one that needs reconciliation (its charge
    /// outcome stayed unknown) or is stuck in flight. Publishes its final TopUpResult:
    /// succeeded with the gateway's reference, or failed when the gateway's books show no
    /// charge. Billing and the evaluator read it like any result.
    Settle {
        /// Subscriber id.
        #[arg(long)]
        subscriber: String,
        /// The top-up's command id.
        #[arg(long)]
        command_id: String,
        /// The gateway charged it: its reference for the charge ("ch_123").
        #[arg(long, conflicts_with = "refused", required_unless_present = "refused")]
        approved: Option<String>,
        /// The gateway did not charge it: declined, insufficient_funds, card_expired, or
        /// not_found (the gateway never processed the key).
        #[arg(long)]
        refused: Option<String>,
        /// Who settles it and on what evidence from the gateway's books (kept on the result).
        #[arg(long)]
        evidence: String,
    },
    /// Print records of a topic as JSON lines (partition, offset, key, value).
    Tail {
        /// Any topic of the platform.
        topic: String,
        /// Start at the beginning instead of the end.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop after this long without a record, in seconds (0 = never).
        #[arg(long, default_value_t = 0)]
        idle_secs: u64,
    },
    /// Show a subscriber's state: the evaluator's (rule, balance, top-up in flight, caps)
    /// and the notifier's (delivery history, held messages), from their changelogs.
    State {
        /// Subscriber id.
        subscriber: String,
    },
    /// Send dead letters back to the topic they came from (after fixing what refused them).
    ReplayDlq {
        /// Only letters from this source topic.
        #[arg(long)]
        source_topic: Option<String>,
        /// Only letters whose reason contains this text.
        #[arg(long)]
        reason_contains: Option<String>,
        /// Only letters at or after this DLQ offset (per partition), to skip ones replayed before.
        #[arg(long, default_value_t = 0)]
        from_offset: i64,
        /// Print what would be replayed, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create every topic with the platform's partitioning and compaction (existing
    /// topics are left alone).
    CreateTopics {
        /// Partitions of every topic (balance, rules and results must be equal).
        #[arg(long, default_value_t = topup_kafka::DEFAULT_PARTITIONS)]
        partitions: i32,
        /// Replication factor.
        #[arg(long, default_value_t = 3)]
        replication: i32,
    },
}

/// The platform's topics and how to show their values.
fn to_json(topic: &str, key: &str, value: &[u8]) -> anyhow::Result<serde_json::Value> {
    use topup_proto::v1 as v;
    fn json<T: Message + Default + serde::Serialize>(
        bytes: &[u8],
    ) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::to_value(T::decode(bytes)?)?)
    }
    match topic {
        topics::BALANCE => json::<v::BalanceUpdated>(value),
        topics::RULES => json::<v::RuleUpdated>(value),
        topics::COMMANDS => json::<v::TopUpCommand>(value),
        topics::NOTIFICATIONS => json::<v::NotificationCommand>(value),
        topics::RESULTS => json::<v::TopUpResult>(value),
        topics::DELIVERIES => json::<v::DeliveryReceipt>(value),
        topics::DLQ => json::<v::DeadLetter>(value),
        topics::EVALUATOR_STATE if rule_key_subscriber(key).is_some() => {
            json::<v::AutoTopUpRule>(value)
        }
        topics::EVALUATOR_STATE => json::<topup_proto::evaluator::v1::SubscriberState>(value),
        topics::PAYMENT_RETRIES => json::<topup_proto::payment::v1::ChargeRetry>(value),
        topics::NOTIFIER_STATE => json::<topup_proto::notifier::v1::SubscriberDeliveries>(value),
        other => bail!("{other} is not a topic of the platform; known: {}", topics::ALL.join(", ")),
    }
}

/// Parses "8.50" in `currency`'s minor units, exactly (no floats).
pub fn parse_amount(text: &str, currency: Currency) -> anyhow::Result<Money> {
    let text = text.trim();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let exponent = currency.exponent() as usize;
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{text:?} is not an amount like 8.50");
    }
    if fraction.len() > exponent || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{text:?}: {currency} has {exponent} decimal places");
    }
    let padded = format!("{whole}{fraction:0<exponent$}");
    let minor: i64 = padded.parse().with_context(|| format!("{text:?} is too large"))?;
    Ok(Money::new(currency, if negative { -minor } else { minor }))
}

async fn send(kafka: &KafkaArgs, topic: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka.producer().create()?;
    let delivery = producer
        .send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| {
            anyhow::anyhow!("could not publish to {topic}: {e} (is KAFKA_BROKERS right?)")
        })?;
    eprintln!("published to {topic} partition {} offset {}", delivery.partition, delivery.offset);
    Ok(())
}

fn read_json(source: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if source == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(source).with_context(|| format!("reading {source}"))?;
    }
    Ok(text)
}

/// Every record of `topic`, all partitions, oldest first per partition.
fn read_topic(kafka: &KafkaArgs, topic: &str) -> anyhow::Result<Vec<topup_kafka::Input>> {
    let consumer: BaseConsumer = kafka.reader().create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        bail!("topic {topic} does not exist (create it with `topupctl create-topics`)");
    }
    let mut all = Vec::new();
    for partition in 0..partitions as i32 {
        all.extend(read_partition_to_end(kafka, topic, partition, Duration::from_secs(60))?);
    }
    Ok(all)
}

/// A result written by hand must carry the gateway's word: a reference for a charge, the
/// operator's evidence for "nothing was charged"; "needs reconciliation" is the worker's to
/// say, never an operator's.
fn check_settlement(result: &topup_proto::v1::TopUpResult) -> anyhow::Result<()> {
    use topup_proto::v1::TopUpStatus;
    topup_domain::TopUpOutcome::try_from(result)
        .map_err(|e| anyhow::anyhow!("this result would be refused: {e}"))?;
    match TopUpStatus::try_from(result.status) {
        Ok(TopUpStatus::Succeeded) if result.gateway_reference.is_empty() => {
            bail!("a succeeded result needs the gateway's reference (gatewayReference)")
        }
        Ok(TopUpStatus::Failed | TopUpStatus::Cancelled) if result.settled_by.trim().is_empty() => {
            bail!("a failed result needs settledBy: who says, from the gateway's books, that nothing was charged")
        }
        Ok(TopUpStatus::NeedsReconciliation) => {
            bail!("needs_reconciliation is reported by the payment worker, not by hand")
        }
        _ => Ok(()),
    }
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
    let kafka = cli.kafka;
    match cli.command {
        Command::PublishBalance { subscriber, balance, currency, sequence, carrier } => {
            let currency =
                Currency::parse(&currency).map_err(|e| anyhow::anyhow!("--currency: {e}"))?;
            let amount = parse_amount(&balance, currency).context("--balance")?;
            let event = BalanceUpdated {
                credited_command_ids: Default::default(),
                subscriber_id: subscriber.clone(),
                carrier_id: carrier,
                balance: Some(amount.to_wire()),
                sequence,
                observed_at: Some(topup_kafka::now_timestamp()),
                event_id: String::new(),
            };
            topup_domain::BalanceObservation::try_from(&event)
                .map_err(|e| anyhow::anyhow!("this event would be refused: {e}"))?;
            send(&kafka, topics::BALANCE, &subscriber, &event.encode_to_vec()).await
        }
        Command::Publish { topic, json } => {
            let text = read_json(&json)?;
            let (key, bytes) = match topic.as_str() {
                topics::BALANCE => {
                    let event: BalanceUpdated = serde_json::from_str(&text)
                        .context("not a BalanceUpdated in proto3 JSON")?;
                    topup_domain::BalanceObservation::try_from(&event)
                        .map_err(|e| anyhow::anyhow!("this event would be refused: {e}"))?;
                    (event.subscriber_id.clone(), event.encode_to_vec())
                }
                topics::RULES => {
                    let update: RuleUpdated = match serde_json::from_str::<RuleUpdated>(&text) {
                        Ok(update) if update.rule.is_some() => update,
                        _ => RuleUpdated {
                            rule: Some(serde_json::from_str(&text).context(
                                "neither a RuleUpdated nor an AutoTopUpRule in proto3 JSON",
                            )?),
                            updated_at: Some(topup_kafka::now_timestamp()),
                        },
                    };
                    let rule = update.rule.as_ref().context("rule: is required")?;
                    topup_domain::Rule::try_from(rule)
                        .map_err(|e| anyhow::anyhow!("this rule would be refused: {e}"))?;
                    (rule.subscriber_id.clone(), update.encode_to_vec())
                }
                topics::RESULTS => {
                    let result: topup_proto::v1::TopUpResult =
                        serde_json::from_str(&text).context("not a TopUpResult in proto3 JSON")?;
                    check_settlement(&result)?;
                    (result.subscriber_id.clone(), result.encode_to_vec())
                }
                other => bail!(
                    "publish writes {}, {} or {}; {other} is written by the services",
                    topics::BALANCE,
                    topics::RULES,
                    topics::RESULTS
                ),
            };
            send(&kafka, &topic, &key, &bytes).await
        }
        Command::Settle { subscriber, command_id, approved, refused, evidence } => {
            use topup_proto::v1::{FailureReason, TopUpResult, TopUpStatus};
            // What billing and the history need of the top-up (amount, method, key) comes
            // from the result that asked for reconciliation, when there is one.
            let (reader, id) = (kafka.clone(), command_id.clone());
            let earlier = tokio::task::spawn_blocking(move || read_topic(&reader, topics::RESULTS))
                .await??
                .into_iter()
                .filter_map(|r| TopUpResult::decode(r.payload.as_deref().unwrap_or_default()).ok())
                .rfind(|r| r.command_id == id)
                .unwrap_or_default();
            let mut result = TopUpResult {
                command_id,
                subscriber_id: subscriber.clone(),
                settled_by: evidence,
                completed_at: Some(topup_kafka::now_timestamp()),
                amount: earlier.amount,
                payment_method: earlier.payment_method,
                idempotency_key: earlier.idempotency_key,
                carrier_id: earlier.carrier_id,
                observed_at: earlier.observed_at,
                attempts: earlier.attempts,
                ..Default::default()
            };
            match (approved, refused) {
                (Some(reference), _) => {
                    result.status = TopUpStatus::Succeeded as i32;
                    result.gateway_reference = reference;
                }
                (None, Some(code)) => {
                    let reason = match code.as_str() {
                        "declined" => FailureReason::Declined,
                        "insufficient_funds" => FailureReason::InsufficientFunds,
                        "card_expired" => FailureReason::CardExpired,
                        "not_found" => FailureReason::GatewayUnavailable,
                        other => bail!(
                            "--refused {other:?}: one of declined, insufficient_funds, card_expired, not_found"
                        ),
                    };
                    result.status = TopUpStatus::Failed as i32;
                    result.failure_reason = reason as i32;
                    result.failure_detail = format!("settled by hand: the gateway says {code}");
                }
                (None, None) => bail!("--approved <reference> or --refused <code> is required"),
            }
            check_settlement(&result)?;
            send(&kafka, topics::RESULTS, &subscriber, &result.encode_to_vec()).await?;
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
            Ok(())
        }
        Command::Tail { topic, from_beginning, max, idle_secs } => {
            if !topics::ALL.contains(&topic.as_str()) {
                bail!("{topic} is not a topic of the platform; known: {}", topics::ALL.join(", "));
            }
            let consumer: BaseConsumer = kafka.reader().create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
            if partitions == 0 {
                bail!("topic {topic} does not exist");
            }
            let mut assignment = TopicPartitionList::new();
            for p in 0..partitions as i32 {
                let start = if from_beginning { Offset::Beginning } else { Offset::End };
                assignment.add_partition_offset(&topic, p, start)?;
            }
            consumer.assign(&assignment)?;
            let (mut seen, mut idle) = (0usize, std::time::Instant::now());
            while max.is_none_or(|m| seen < m) {
                if idle_secs > 0 && idle.elapsed() > Duration::from_secs(idle_secs) {
                    break;
                }
                let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
                let message = message?;
                idle = std::time::Instant::now();
                let key =
                    message.key().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                let value = match message.payload() {
                    None => serde_json::Value::Null,
                    Some(bytes) => to_json(&topic, &key, bytes)
                        .unwrap_or_else(|e| serde_json::json!({ "undecodable": e.to_string() })),
                };
                let line = serde_json::json!({
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "key": key,
                    "value": value,
                });
                writeln!(out, "{line}")?;
                seen += 1;
            }
            Ok(())
        }
        Command::State { subscriber } => {
            let mut found = serde_json::Map::new();
            for (topic, keys) in [
                (topics::EVALUATOR_STATE, evaluator_keys(&subscriber).to_vec()),
                (topics::NOTIFIER_STATE, vec![subscriber.clone()]),
            ] {
                for record in read_topic(&kafka, topic)? {
                    let Some(key) = record.key_str() else { continue };
                    if !keys.iter().any(|k| k == key) {
                        continue;
                    }
                    let name = format!("{topic} {key}");
                    let value = match record.payload.as_deref() {
                        None => serde_json::Value::Null,
                        Some(bytes) => to_json(topic, key, bytes)?,
                    };
                    found.insert(name, value);
                }
            }
            if found.is_empty() {
                bail!("no state for subscriber {subscriber:?} (no rule, balance or notification seen)");
            }
            writeln!(out, "{}", serde_json::to_string_pretty(&found)?)?;
            Ok(())
        }
        Command::ReplayDlq { source_topic, reason_contains, from_offset, dry_run } => {
            let producer: FutureProducer = kafka.producer().create()?;
            let mut replayed = 0;
            for record in read_topic(&kafka, topics::DLQ)? {
                if record.offset < from_offset {
                    continue;
                }
                let letter = DeadLetter::decode(record.payload.as_deref().unwrap_or_default())
                    .with_context(|| format!("DLQ offset {} is not a DeadLetter", record.offset))?;
                if source_topic.as_ref().is_some_and(|t| *t != letter.source_topic)
                    || reason_contains.as_ref().is_some_and(|r| !letter.reason.contains(r.as_str()))
                {
                    continue;
                }
                if letter.truncated {
                    // Only part of the record was kept: replaying it would publish garbage.
                    writeln!(
                        out,
                        "skipped dlq partition {} offset {}: cut to fit ({} value bytes of {}, \
                         sha256 {}); not replayable",
                        record.partition,
                        record.offset,
                        letter.original_value.len(),
                        letter.original_value_size,
                        letter.original_value_sha256
                    )?;
                    continue;
                }
                writeln!(
                    out,
                    "{} dlq partition {} offset {} -> {} (was {}/{}): {}",
                    if dry_run { "would replay" } else { "replaying" },
                    record.partition,
                    record.offset,
                    letter.source_topic,
                    letter.source_partition,
                    letter.source_offset,
                    letter.reason
                )?;
                if !dry_run {
                    let mut outgoing =
                        FutureRecord::to(&letter.source_topic).payload(&letter.original_value);
                    if !letter.original_key.is_empty() {
                        outgoing = outgoing.key(&letter.original_key);
                    }
                    producer.send(outgoing, Duration::from_secs(30)).await.map_err(|(e, _)| {
                        anyhow::anyhow!("replaying to {}: {e}", letter.source_topic)
                    })?;
                }
                replayed += 1;
            }
            writeln!(
                out,
                "{replayed} dead letters {}",
                if dry_run { "would be replayed" } else { "replayed" }
            )?;
            Ok(())
        }
        Command::CreateTopics { partitions, replication } => {
            if partitions < 1 || replication < 1 {
                bail!("--partitions and --replication must be at least 1");
            }
            topup_kafka::create_topics(&kafka, &TopicSpec::all(partitions), replication)
                .await
                .context(
                    "creating the topics (does the cluster allow it, and is KAFKA_BROKERS right?)",
                )?;
            for spec in TopicSpec::all(partitions) {
                writeln!(
                    out,
                    "{} partitions={} compacted={}",
                    spec.name, spec.partitions, spec.compacted
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly_in_minor_units() {
        let cny = Currency::parse("CNY").unwrap();
        assert_eq!(parse_amount("8.50", cny).unwrap().minor, 850);
        assert_eq!(parse_amount("8.5", cny).unwrap().minor, 850);
        assert_eq!(parse_amount("12", cny).unwrap().minor, 1200);
        assert_eq!(parse_amount("-0.01", cny).unwrap().minor, -1);
        assert!(parse_amount("8.505", cny).is_err());
        assert!(parse_amount("8,50", cny).is_err());
        assert!(parse_amount("", cny).is_err());
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(parse_amount("500", jpy).unwrap().minor, 500);
        assert!(parse_amount("5.5", jpy).is_err());
    }

    #[test]
    fn every_topic_of_the_platform_can_be_shown() {
        for topic in topics::ALL {
            assert!(to_json(topic, "k", &[]).is_ok(), "{topic}");
        }
        assert!(to_json("nope", "k", &[]).is_err());
    }
}
