//! Where money moves: a `TopUpCommand` is checked against the worker's own safety limits,
//! charged method by method (retrying transient errors), and answered with exactly one
//! `TopUpResult` and a notification — committed with the command's offset.
use std::collections::HashMap;
use std::time::Duration;

use topup_domain::{mask_token, notification_id, Money, SubscriberId};
use topup_kafka::{decode, now_timestamp, Input, Output, Processor, Refusal};
use topup_proto::topics;
use topup_proto::v1::{
    FailureReason, NotificationCommand, NotificationKind, PaymentMethod, PaymentMethodKind,
    TopUpCommand, TopUpResult, TopUpStatus,
};

use crate::gateway::{ChargeOutcome, ChargeRequest, PaymentGateway};
use crate::metrics::{self, count};

/// Retry schedule for transient gateway errors, as data.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per payment method, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Limits the worker enforces whatever the evaluator says.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single charge, in minor units.
    pub max_single_charge_minor: i64,
}

/// The payment worker's processor.
pub struct PaymentWorker<G> {
    gateway: G,
    retry: RetryPolicy,
    limits: Limits,
}

impl<G: PaymentGateway> PaymentWorker<G> {
    /// A worker charging through `gateway`.
    pub fn new(gateway: G, retry: RetryPolicy, limits: Limits) -> Self {
        Self { gateway, retry, limits }
    }

    /// Charges one method, retrying transient errors with exponential backoff and jitter.
    async fn charge_method(&self, request: &ChargeRequest) -> (ChargeOutcome, u32) {
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            let outcome = self.gateway.charge(request).await;
            match outcome {
                ChargeOutcome::Transient { ref detail } if attempt < self.retry.max_attempts => {
                    tracing::warn!(attempt, %detail, "transient gateway error; retrying");
                    // Jitter from the key, so retries of many commands spread out.
                    let jitter = request.idempotency_key.bytes().map(u64::from).sum::<u64>() % 50;
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                other => return (other, attempt),
            }
        }
    }
}

/// Checks a command before any money moves.
fn validate(command: &TopUpCommand, limits: &Limits) -> Result<(SubscriberId, Money), Refusal> {
    let subscriber = SubscriberId::parse(&command.subscriber_id)?;
    if command.command_id.is_empty() || command.idempotency_key.is_empty() {
        return Err(Refusal::new("command_id and idempotency_key are required"));
    }
    let amount = command.amount.as_ref().ok_or_else(|| Refusal::new("amount: is required"))?;
    let amount = Money::try_from(amount).map_err(|e| e.within("amount"))?;
    if amount.minor <= 0 {
        return Err(Refusal::new(format!("amount: must be positive, got {amount}")));
    }
    if amount.minor > limits.max_single_charge_minor {
        return Err(Refusal::new(format!(
            "amount: {amount} exceeds the single-charge limit of {}",
            Money::new(amount.currency, limits.max_single_charge_minor)
        )));
    }
    Ok((subscriber, amount))
}

fn reason_code(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::Declined => "declined",
        FailureReason::CardExpired => "card_expired",
        FailureReason::InsufficientFunds => "insufficient_funds",
        FailureReason::GatewayUnavailable => "gateway_unavailable",
        FailureReason::LimitExceeded => "limit_exceeded",
        FailureReason::NoPaymentMethod => "no_payment_method",
        FailureReason::Unspecified => "unknown",
    }
}

impl<G: PaymentGateway> Processor for PaymentWorker<G> {
    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        let command: TopUpCommand = decode(input, |c: &TopUpCommand| &c.subscriber_id)
            .inspect_err(|_| count(&metrics::DEAD_LETTERS))?;
        let (subscriber, amount) =
            validate(&command, &self.limits).inspect_err(|_| count(&metrics::DEAD_LETTERS))?;

        let mut result = TopUpResult {
            command_id: command.command_id.clone(),
            subscriber_id: command.subscriber_id.clone(),
            status: TopUpStatus::Failed as i32,
            amount: Some(amount.to_wire()),
            failure_reason: FailureReason::NoPaymentMethod as i32,
            failure_detail: "the command has no payment method".into(),
            idempotency_key: command.idempotency_key.clone(),
            carrier_id: command.carrier_id.clone(),
            observed_at: command.observed_at,
            ..Default::default()
        };
        for (index, method) in command.payment_methods.iter().enumerate() {
            // Each method gets its own key: a gateway that saw the primary declined must not
            // answer the fallback with that same decline.
            let key = if index == 0 {
                command.idempotency_key.clone()
            } else {
                format!("{}-m{index}", command.idempotency_key)
            };
            let request = ChargeRequest {
                idempotency_key: key,
                token: method.token.clone(),
                kind: PaymentMethodKind::try_from(method.kind)
                    .unwrap_or(PaymentMethodKind::Unspecified),
                amount,
                subscriber_id: command.subscriber_id.clone(),
            };
            let (outcome, attempts) = self.charge_method(&request).await;
            result.attempts += attempts;
            result.payment_method = Some(PaymentMethod {
                token: method.token.clone(),
                kind: method.kind,
                label: method.label.clone(),
                expires: String::new(),
            });
            match outcome {
                ChargeOutcome::Approved { reference } => {
                    result.status = TopUpStatus::Succeeded as i32;
                    result.failure_reason = FailureReason::Unspecified as i32;
                    result.failure_detail.clear();
                    result.gateway_reference = reference;
                    break;
                }
                ChargeOutcome::Refused { reason, detail } => {
                    tracing::info!(subscriber = %subscriber, method = %mask_token(&method.token), reason = reason_code(reason), "payment method refused");
                    result.failure_reason = reason as i32;
                    result.failure_detail = detail;
                }
                ChargeOutcome::Transient { detail } => {
                    result.failure_reason = FailureReason::GatewayUnavailable as i32;
                    result.failure_detail = format!("retries exhausted: {detail}");
                }
            }
        }
        result.completed_at = Some(now_timestamp());

        let succeeded = result.status == TopUpStatus::Succeeded as i32;
        let kind = if succeeded {
            NotificationKind::TopUpSucceeded
        } else {
            NotificationKind::TopUpFailed
        };
        let mut parameters = HashMap::new();
        if let Some(method) = &result.payment_method {
            parameters.insert(
                "method".to_string(),
                if method.label.is_empty() {
                    mask_token(&method.token)
                } else {
                    method.label.clone()
                },
            );
        }
        if !succeeded {
            let reason = FailureReason::try_from(result.failure_reason)
                .unwrap_or(FailureReason::Unspecified);
            parameters.insert("reason".to_string(), reason_code(reason).to_string());
            count(&metrics::FAILED);
            tracing::info!(subscriber = %subscriber, command_id = %command.command_id, amount = %amount, reason = reason_code(reason), "top-up failed");
        } else {
            count(&metrics::SUCCEEDED);
            tracing::info!(subscriber = %subscriber, command_id = %command.command_id, amount = %amount, "top-up charged");
        }
        let notification = NotificationCommand {
            notification_id: notification_id(&subscriber, &command.command_id, kind.as_str_name()),
            subscriber_id: command.subscriber_id.clone(),
            kind: kind as i32,
            locale: command.locale.clone(),
            channels: command.channels.clone(),
            parameters,
            // A failed top-up is what the subscriber most needs to hear: it ignores quiet hours.
            urgent: !succeeded,
            created_at: Some(now_timestamp()),
            command_id: command.command_id.clone(),
            amount: Some(amount.to_wire()),
            balance: None,
            threshold: None,
        };
        out.push(Output::message(topics::RESULTS, &command.subscriber_id, &result));
        out.push(Output::message(topics::NOTIFICATIONS, &command.subscriber_id, &notification));
        Ok(())
    }
}
