//! The top-up history: a consumer of `topup.commands.v1` and `topup.results.v1` writes one
//! row per top-up into the database, and of `topup.notifications.v1` what the subscriber was
//! told about each; of `topup.dlq.v1` the rules the evaluator refused (a rule's publication
//! then reads `rejected: <reason>`). At least once, and idempotent: a record read twice (a
//! restart, a replay) updates the same row to the same values.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;
use topup_kafka::KafkaArgs;
use topup_proto::topics;
use topup_proto::v1::{
    DeadLetter, FailureReason, NotificationCommand, NotificationKind, PaymentMethodKind,
    RuleUpdated, TopUpCommand, TopUpResult, TopUpStatus, TopUpTrigger,
};

use crate::store::{Db, TopUpRow};

fn millis(t: Option<&topup_proto::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos / 1_000_000)))
}

/// "card •••• 4242": the kind and the label, never the token.
pub fn masked_method(method: &topup_proto::v1::PaymentMethod) -> String {
    let kind = PaymentMethodKind::try_from(method.kind)
        .map(|k| k.as_str_name().trim_start_matches("PAYMENT_METHOD_KIND_").to_ascii_lowercase())
        .unwrap_or_else(|_| "method".into());
    let label = method.label.trim();
    let label =
        if !label.is_empty() && label.chars().all(|c| c.is_ascii_digit()) && label.len() <= 4 {
            format!("•••• {label}")
        } else {
            label.to_string()
        };
    if label.is_empty() {
        kind
    } else {
        format!("{kind} {label}")
    }
}

/// The history row a command makes.
pub fn command_row(command: &TopUpCommand) -> Option<TopUpRow> {
    let amount = command.amount.as_ref()?;
    Some(TopUpRow {
        command_id: command.command_id.clone(),
        subscriber_id: command.subscriber_id.clone(),
        amount_minor: amount.amount_minor,
        currency: amount.currency.clone(),
        status: "pending".into(),
        reason: String::new(),
        method: String::new(),
        trigger: match TopUpTrigger::try_from(command.trigger) {
            Ok(TopUpTrigger::Monthly) => "monthly".into(),
            _ => "threshold".into(),
        },
        cause_sequence: i64::try_from(command.cause_sequence).unwrap_or(i64::MAX),
        observed_at_ms: millis(command.observed_at.as_ref()),
        issued_at_ms: millis(command.issued_at.as_ref()),
        completed_at_ms: 0,
    })
}

/// The history row a result makes (or completes).
pub fn result_row(result: &TopUpResult) -> Option<TopUpRow> {
    let amount = result.amount.as_ref()?;
    let status = TopUpStatus::try_from(result.status).unwrap_or(TopUpStatus::Unspecified);
    let succeeded = status == TopUpStatus::Succeeded;
    let completed = millis(result.completed_at.as_ref());
    Some(TopUpRow {
        command_id: result.command_id.clone(),
        subscriber_id: result.subscriber_id.clone(),
        amount_minor: amount.amount_minor,
        currency: amount.currency.clone(),
        // A top-up awaiting reconciliation is not "failed": it may have been charged.
        status: match status {
            TopUpStatus::Succeeded => "succeeded",
            TopUpStatus::Cancelled => "cancelled",
            TopUpStatus::NeedsReconciliation => "pending",
            _ => "failed",
        }
        .into(),
        reason: if succeeded {
            String::new()
        } else {
            FailureReason::try_from(result.failure_reason)
                .map(|r| r.as_str_name().to_string())
                .unwrap_or_default()
        },
        method: result.payment_method.as_ref().map(masked_method).unwrap_or_default(),
        trigger: "threshold".into(),
        cause_sequence: 0,
        observed_at_ms: millis(result.observed_at.as_ref()),
        issued_at_ms: completed,
        completed_at_ms: completed,
    })
}

/// Writes one record into the database; `Ok(false)` when the record is not a usable
/// command or result (logged and skipped).
async fn apply(db: &Db, topic: &str, payload: &[u8]) -> Result<bool, sqlx::Error> {
    if topic == topics::DLQ {
        return rejected(db, payload).await;
    }
    if topic == topics::NOTIFICATIONS {
        let Ok(n) = NotificationCommand::decode(payload) else { return Ok(false) };
        if n.notification_id.is_empty() || n.subscriber_id.is_empty() {
            return Ok(false);
        }
        // Only notifications about a top-up belong to the history.
        if !n.command_id.is_empty() {
            let kind = NotificationKind::try_from(n.kind)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_default();
            db.record_notification(
                &n.notification_id,
                &n.subscriber_id,
                &n.command_id,
                &kind,
                millis(n.created_at.as_ref()),
            )
            .await?;
        }
        return Ok(true);
    }
    let row = match topic {
        topics::COMMANDS => TopUpCommand::decode(payload).ok().and_then(|c| command_row(&c)),
        topics::RESULTS => TopUpResult::decode(payload).ok().and_then(|r| result_row(&r)),
        _ => None,
    };
    let Some(row) = row.filter(|r| !r.command_id.is_empty() && !r.subscriber_id.is_empty()) else {
        return Ok(false);
    };
    if topic == topics::COMMANDS {
        db.record_command(&row).await?;
    } else {
        db.record_result(&row).await?;
    }
    Ok(true)
}

/// A dead letter: when it is the evaluator refusing a rule this API published, the rule's
/// publication becomes `rejected: <reason>` (unless it has changed since). Any other letter
/// is not the history's business.
async fn rejected(db: &Db, payload: &[u8]) -> Result<bool, sqlx::Error> {
    let Ok(letter) = DeadLetter::decode(payload) else { return Ok(false) };
    if letter.source_topic != topics::RULES
        || letter.service != "topup-evaluator"
        || letter.truncated
    {
        return Ok(true);
    }
    let Ok(update) = RuleUpdated::decode(letter.original_value.as_slice()) else {
        return Ok(true);
    };
    let (Some(rule), Some(at)) = (update.rule.as_ref(), update.updated_at.as_ref()) else {
        return Ok(true);
    };
    if db.reject_rule(&rule.subscriber_id, millis(Some(at)), &letter.reason).await? {
        tracing::warn!(
            subscriber = %rule.subscriber_id,
            reason = %letter.reason,
            "the evaluator refused a published rule; the rule before it stays in force"
        );
    }
    Ok(true)
}

/// Consumes commands and results into `db` until `shutdown`; `ready` is set while the
/// consumer has partitions.
pub async fn run(
    kafka: KafkaArgs,
    group: String,
    db: Db,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = kafka.group_consumer(&group).create()?;
    consumer.subscribe(&[topics::COMMANDS, topics::RESULTS, topics::NOTIFICATIONS, topics::DLQ])?;
    tracing::info!(%group, "materialising the top-up history");
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => received,
        };
        ready.store(
            consumer.assignment().map(|a| a.count() > 0).unwrap_or(false),
            Ordering::Relaxed,
        );
        let message = match message {
            Err(_) => continue,
            Ok(Err(error)) => {
                tracing::warn!(%error, "history consumer error");
                continue;
            }
            Ok(Ok(message)) => message,
        };
        ready.store(true, Ordering::Relaxed);
        let payload = message.payload().unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply(&db, message.topic(), payload).await {
                Ok(true) => break,
                Ok(false) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "not a usable top-up record; skipped in the history"
                    );
                    break;
                }
                Err(error) => {
                    // Never skip a top-up: wait for the database and try again.
                    tracing::error!(%error, "history: database write failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        if let Err(error) = consumer.commit_message(&message, CommitMode::Async) {
            tracing::warn!(%error, "history: offset commit failed (the record will be read again)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use topup_proto::v1::PaymentMethod;

    #[test]
    fn methods_are_shown_masked_and_never_with_their_token() {
        let card = PaymentMethod {
            token: "tok_secret".into(),
            kind: PaymentMethodKind::Card as i32,
            label: "4242".into(),
            ..Default::default()
        };
        assert_eq!(masked_method(&card), "card •••• 4242");
        let alipay = PaymentMethod {
            token: "tok_secret".into(),
            kind: PaymentMethodKind::Alipay as i32,
            label: "li***@qq.com".into(),
            ..Default::default()
        };
        assert_eq!(masked_method(&alipay), "alipay li***@qq.com");
        assert!(!masked_method(&card).contains("tok_"));
    }
}
