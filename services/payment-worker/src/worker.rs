//! Where money moves. A `TopUpCommand` is checked against the worker's own safety limits,
//! then charged method by method. Each command ends in exactly one `TopUpResult` and a
//! notification, committed with the input's offset.
//!
//! A transient gateway error is not retried in place — that would hold back every other
//! subscriber on the partition. The command is parked instead as a `ChargeRetry` on
//! `topup.payment-retries.v1` (in the same transaction as the offset), and the retry lane —
//! a second pipeline over that topic — charges again once the backoff has passed, with the
//! same idempotency key. Within a batch, different subscribers are charged concurrently.
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use topup_domain::{mask_token, notification_id, Currency, Money, SubscriberId, YearMonth};
use topup_kafka::{
    dead_letter, decode, now_timestamp, system_time, timestamp_of, Input, Output, Processor,
    Refusal,
};
use topup_proto::payment::v1::ChargeRetry;
use topup_proto::topics;
use topup_proto::v1::{
    FailureReason, NotificationCommand, NotificationKind, PaymentMethod, PaymentMethodKind,
    TopUpCommand, TopUpResult, TopUpStatus,
};

use crate::gateway::{ChargeOutcome, ChargeRequest, PaymentGateway};
use crate::metrics::{self, count};

const SERVICE: &str = "topup-payment-worker";

/// What one input record gives: its outputs, or why it was refused.
type Answer = Result<Vec<Output>, Refusal>;

/// Retry schedule for transient gateway errors, as data.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per payment method, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// No retry is scheduled later than this after the command first arrived.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempts` attempts on one method: doubling from `initial_backoff`,
    /// capped at `max_backoff`, its upper half jittered by the key so that retries of many
    /// commands spread out (the same key and attempt always wait the same).
    pub fn backoff(&self, attempts: u32, key: &str) -> Duration {
        let doublings = attempts.saturating_sub(1).min(20);
        let capped = self.initial_backoff.saturating_mul(1 << doublings).min(self.max_backoff);
        let half = capped / 2;
        let mut hasher = DefaultHasher::new();
        (key, attempts).hash(&mut hasher);
        let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(hasher.finish() % span)
    }
}

/// Limits the worker enforces whatever the evaluator says.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single charge, in minor units.
    pub max_single_charge_minor: i64,
}

/// A command being charged, and how far it got.
struct Charge {
    command: TopUpCommand,
    subscriber: SubscriberId,
    amount: Money,
    method_index: usize,
    attempts_on_method: u32,
    deadline: SystemTime,
    result: TopUpResult,
}

/// Where a charge stands after [`PaymentWorker::advance`].
enum Step {
    /// Charged, or every method failed: answer the evaluator.
    Finished(Box<TopUpResult>),
    /// Charge the same method again later, from the retry lane.
    Later(Box<ChargeRetry>),
}

/// The payment worker's processor, for both the command lane and the retry lane.
pub struct PaymentWorker<G> {
    gateway: G,
    retry: RetryPolicy,
    limits: Limits,
    /// Subscribers charged at once within one batch.
    concurrency: usize,
}

impl<G: PaymentGateway> PaymentWorker<G> {
    /// A worker charging through `gateway`, at most `concurrency` subscribers at once.
    pub fn new(gateway: G, retry: RetryPolicy, limits: Limits, concurrency: usize) -> Self {
        Self { gateway, retry, limits, concurrency: concurrency.max(1) }
    }

    /// One record of either lane, to what it produces.
    async fn handle(&self, input: &Input) -> Answer {
        let charge = if input.topic == topics::PAYMENT_RETRIES {
            let retry: ChargeRetry = decode(input, |r: &ChargeRetry| {
                r.command.as_ref().map_or("", |c| &c.subscriber_id)
            })
            .inspect_err(|_| count(&metrics::DEAD_LETTERS))?;
            self.resume(retry).inspect_err(|_| count(&metrics::DEAD_LETTERS))?
        } else {
            let command: TopUpCommand = decode(input, |c: &TopUpCommand| &c.subscriber_id)
                .inspect_err(|_| count(&metrics::DEAD_LETTERS))?;
            match self.start(command) {
                Ok(charge) => charge,
                Err(Unchargeable::Malformed(refusal)) => {
                    count(&metrics::DEAD_LETTERS);
                    return Err(refusal);
                }
                Err(Unchargeable::Refused { result, reason }) => {
                    // The evaluator waits for an answer to every command: refuse with a
                    // failed result, and keep the record in the dead-letter topic for operators.
                    count(&metrics::DEAD_LETTERS);
                    tracing::warn!(command_id = %result.command_id, %reason, "command refused by a safety limit");
                    metrics::completed(&result);
                    let notification = notify(&result, None);
                    return Ok(vec![
                        Output::message(topics::RESULTS, &result.subscriber_id, &*result),
                        Output::message(
                            topics::NOTIFICATIONS,
                            &result.subscriber_id,
                            &notification,
                        ),
                        dead_letter(input, SERVICE, &reason),
                    ]);
                }
            }
        };
        let subscriber = charge.subscriber.clone();
        let locale_channels = (charge.command.locale.clone(), charge.command.channels.clone());
        let command_id = charge.command.command_id.clone();
        let (step, expired) = self.advance(charge).await;
        let mut out = match step {
            Step::Later(retry) => {
                count(&metrics::RETRIES_SCHEDULED);
                vec![Output::message(topics::PAYMENT_RETRIES, subscriber.as_str(), &*retry)]
            }
            Step::Finished(result) => {
                metrics::completed(&result);
                let notification = notify(&result, Some(locale_channels.clone()));
                vec![
                    Output::message(topics::RESULTS, subscriber.as_str(), &*result),
                    Output::message(topics::NOTIFICATIONS, subscriber.as_str(), &notification),
                ]
            }
        };
        // An expired method was skipped: tell the subscriber to update it, whether or not
        // another method paid.
        for method in expired {
            let notification = expired_notice(&subscriber, &command_id, &method, &locale_channels);
            out.push(Output::message(topics::NOTIFICATIONS, subscriber.as_str(), &notification));
        }
        Ok(out)
    }

    /// A new command, checked before any money moves.
    fn start(&self, command: TopUpCommand) -> Result<Charge, Unchargeable> {
        let subscriber = SubscriberId::parse(&command.subscriber_id).map_err(Refusal::from)?;
        if command.command_id.is_empty() || command.idempotency_key.is_empty() {
            return Err(Refusal::new("command_id and idempotency_key are required").into());
        }
        let amount = command
            .amount
            .as_ref()
            .ok_or_else(|| Refusal::new("amount: is required"))
            .and_then(|a| Money::try_from(a).map_err(|e| Refusal::from(e.within("amount"))))?;
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
        let refuse = |mut result: TopUpResult, detail: String| {
            result.failure_reason = FailureReason::LimitExceeded as i32;
            result.failure_detail = detail.clone();
            result.completed_at = Some(now_timestamp());
            Unchargeable::Refused { result: Box::new(result), reason: detail }
        };
        if amount.minor <= 0 {
            return Err(refuse(result, format!("amount: must be positive, got {amount}")));
        }
        if amount.minor > self.limits.max_single_charge_minor {
            let limit = Money::new(amount.currency, self.limits.max_single_charge_minor);
            return Err(refuse(
                result,
                format!("amount: {amount} exceeds the single-charge limit of {limit}"),
            ));
        }
        result.attempts = 0;
        Ok(Charge {
            command,
            subscriber,
            amount,
            method_index: 0,
            attempts_on_method: 0,
            deadline: SystemTime::now() + self.retry.deadline,
            result,
        })
    }

    /// A parked charge from the retry lane, once its backoff has passed.
    fn resume(&self, retry: ChargeRetry) -> Result<Charge, Refusal> {
        let command = retry.command.ok_or_else(|| Refusal::new("command: is required"))?;
        let subscriber = SubscriberId::parse(&command.subscriber_id)?;
        let amount = command
            .amount
            .as_ref()
            .ok_or_else(|| Refusal::new("command.amount: is required"))
            .and_then(|a| {
                Money::try_from(a).map_err(|e| Refusal::from(e.within("command.amount")))
            })?;
        let result =
            retry.result_so_far.ok_or_else(|| Refusal::new("result_so_far: is required"))?;
        Ok(Charge {
            subscriber,
            amount,
            method_index: usize::try_from(retry.method_index).unwrap_or(usize::MAX),
            attempts_on_method: retry.attempts_on_method,
            deadline: retry.deadline.as_ref().map_or_else(SystemTime::now, system_time),
            result,
            command,
        })
    }

    /// Charges method after method from where `charge` stands, until one is approved, all
    /// have failed, or a transient error asks for a later attempt.
    /// Also returns the methods skipped because they have expired.
    async fn advance(&self, mut charge: Charge) -> (Step, Vec<PaymentMethod>) {
        let today = now_timestamp().seconds.div_euclid(86_400);
        let mut expired = Vec::new();
        while let Some(method) = charge.command.payment_methods.get(charge.method_index).cloned() {
            let index = charge.method_index;
            charge.result.payment_method = Some(PaymentMethod {
                token: method.token.clone(),
                kind: method.kind,
                label: method.label.clone(),
                expires: method.expires.clone(),
                currency: method.currency.clone(),
            });
            if let Some(problem) = currency_mismatch(&method, charge.amount.currency) {
                charge.result.failure_reason = FailureReason::CurrencyMismatch as i32;
                charge.result.failure_detail = problem;
                charge.next_method();
                continue;
            }
            if let Some(problem) = expired_method(&method, today) {
                tracing::info!(subscriber = %charge.subscriber, method = %mask_token(&method.token), expires = %method.expires, "expired payment method skipped");
                charge.result.failure_reason = FailureReason::CardExpired as i32;
                charge.result.failure_detail = problem;
                expired.push(method);
                charge.next_method();
                continue;
            }
            let request = ChargeRequest {
                idempotency_key: method_key(&charge.command.idempotency_key, index),
                token: method.token.clone(),
                kind: PaymentMethodKind::try_from(method.kind)
                    .unwrap_or(PaymentMethodKind::Unspecified),
                amount: charge.amount,
                subscriber_id: charge.command.subscriber_id.clone(),
            };
            count(&metrics::CHARGE_ATTEMPTS);
            let outcome = self.gateway.charge(&request).await;
            charge.result.attempts += 1;
            charge.attempts_on_method += 1;
            match outcome {
                ChargeOutcome::Approved { reference } => {
                    charge.result.status = TopUpStatus::Succeeded as i32;
                    charge.result.failure_reason = FailureReason::Unspecified as i32;
                    charge.result.failure_detail.clear();
                    charge.result.gateway_reference = reference;
                    break;
                }
                ChargeOutcome::Refused { reason, detail } => {
                    tracing::info!(subscriber = %charge.subscriber, method = %mask_token(&method.token), reason = reason_code(reason), "payment method refused");
                    charge.result.failure_reason = reason as i32;
                    charge.result.failure_detail = detail;
                    charge.next_method();
                }
                ChargeOutcome::Transient { detail } => {
                    let wait =
                        self.retry.backoff(charge.attempts_on_method, &request.idempotency_key);
                    let not_before = SystemTime::now() + wait;
                    if charge.attempts_on_method < self.retry.max_attempts
                        && not_before <= charge.deadline
                    {
                        tracing::info!(subscriber = %charge.subscriber, method = %mask_token(&method.token), attempt = charge.attempts_on_method, ?wait, %detail, "transient gateway error; retry parked");
                        charge.result.failure_reason = FailureReason::GatewayUnavailable as i32;
                        charge.result.failure_detail = detail;
                        return (
                            Step::Later(Box::new(ChargeRetry {
                                method_index: u32::try_from(index).unwrap_or(u32::MAX),
                                attempts_on_method: charge.attempts_on_method,
                                not_before: Some(timestamp_of(not_before)),
                                deadline: Some(timestamp_of(charge.deadline)),
                                result_so_far: Some(charge.result),
                                command: Some(charge.command),
                            })),
                            expired,
                        );
                    }
                    charge.result.failure_reason = FailureReason::GatewayUnavailable as i32;
                    charge.result.failure_detail = format!(
                        "retries exhausted after {} attempts: {detail}",
                        charge.attempts_on_method
                    );
                    charge.next_method();
                }
            }
        }
        charge.result.completed_at = Some(now_timestamp());
        let reason = FailureReason::try_from(charge.result.failure_reason)
            .unwrap_or(FailureReason::Unspecified);
        if charge.result.status == TopUpStatus::Succeeded as i32 {
            count(&metrics::SUCCEEDED);
            tracing::info!(subscriber = %charge.subscriber, command_id = %charge.command.command_id, amount = %charge.amount, attempts = charge.result.attempts, "top-up charged");
        } else {
            count(&metrics::FAILED);
            tracing::info!(subscriber = %charge.subscriber, command_id = %charge.command.command_id, amount = %charge.amount, reason = reason_code(reason), "top-up failed");
        }
        (Step::Finished(Box::new(charge.result)), expired)
    }

    /// Waits until a parked charge is due (bounded by the longest backoff, in case a
    /// clock or a record is off).
    async fn wait_until_due(&self, input: &Input) {
        if input.topic != topics::PAYMENT_RETRIES {
            return;
        }
        let Some(due) = input
            .payload
            .as_deref()
            .and_then(|p| <ChargeRetry as topup_proto::Message>::decode(p).ok())
            .and_then(|r| r.not_before)
        else {
            return;
        };
        let wait = system_time(&due)
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(self.retry.max_backoff);
        tokio::time::sleep(wait).await;
    }
}

impl Charge {
    fn next_method(&mut self) {
        self.method_index += 1;
        self.attempts_on_method = 0;
    }
}

/// Why a command is not charged at all.
enum Unchargeable {
    /// Not a command one can answer: dead-letter it.
    Malformed(Refusal),
    /// A valid command outside the safety limits: answer with this failed result.
    Refused { result: Box<TopUpResult>, reason: String },
}

impl From<Refusal> for Unchargeable {
    fn from(refusal: Refusal) -> Self {
        Self::Malformed(refusal)
    }
}

/// Each method gets its own key: a gateway that saw the primary declined must not answer
/// the fallback with that same decline. The primary's key is the command's key itself.
fn method_key(command_key: &str, index: usize) -> String {
    if index == 0 {
        command_key.to_string()
    } else {
        format!("{command_key}-m{index}")
    }
}

fn currency_mismatch(method: &PaymentMethod, charged: Currency) -> Option<String> {
    if method.currency.is_empty() || method.currency == charged.code() {
        return None;
    }
    Some(format!(
        "payment method {} charges in {:?}, the top-up is in {charged}",
        mask_token(&method.token),
        method.currency
    ))
}

/// Why `method` cannot be charged on UTC day `today` because it has expired, if it has.
fn expired_method(method: &PaymentMethod, today: i64) -> Option<String> {
    let expires = YearMonth::parse(&method.expires).ok()?;
    (expires.end_day() <= today).then(|| {
        format!("payment method {} expired at the end of {expires}", mask_token(&method.token))
    })
}

/// "Your payment method expired: update it", for a method skipped by `command_id`.
fn expired_notice(
    subscriber: &SubscriberId,
    command_id: &str,
    method: &PaymentMethod,
    (locale, channels): &(String, Vec<topup_proto::v1::NotificationChannel>),
) -> NotificationCommand {
    let kind = NotificationKind::PaymentMethodProblem;
    let shown =
        if method.label.is_empty() { mask_token(&method.token) } else { method.label.clone() };
    let about = format!("{command_id}/expired/{}", mask_token(&method.token));
    NotificationCommand {
        notification_id: notification_id(subscriber, &about, kind.as_str_name()),
        subscriber_id: subscriber.to_string(),
        kind: kind as i32,
        locale: locale.clone(),
        channels: channels.clone(),
        parameters: [
            ("method".to_string(), shown),
            ("reason".to_string(), reason_code(FailureReason::CardExpired).to_string()),
        ]
        .into(),
        urgent: false,
        created_at: Some(now_timestamp()),
        command_id: command_id.to_string(),
        amount: None,
        balance: None,
        threshold: None,
    }
}

/// Stable reason codes, as the notifier's templates and dashboards know them.
pub fn reason_code(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::Declined => "declined",
        FailureReason::CardExpired => "card_expired",
        FailureReason::InsufficientFunds => "insufficient_funds",
        FailureReason::GatewayUnavailable => "gateway_unavailable",
        FailureReason::LimitExceeded => "limit_exceeded",
        FailureReason::NoPaymentMethod => "no_payment_method",
        FailureReason::CurrencyMismatch => "currency_mismatch",
        FailureReason::Unspecified => "unknown",
    }
}

/// The notification that tells the subscriber how their top-up went (and, when it
/// failed, what to fix). `route` is the command's locale and channels.
fn notify(
    result: &TopUpResult,
    route: Option<(String, Vec<topup_proto::v1::NotificationChannel>)>,
) -> NotificationCommand {
    let succeeded = result.status == TopUpStatus::Succeeded as i32;
    let kind =
        if succeeded { NotificationKind::TopUpSucceeded } else { NotificationKind::TopUpFailed };
    let mut parameters = HashMap::new();
    if let Some(method) = &result.payment_method {
        let shown =
            if method.label.is_empty() { mask_token(&method.token) } else { method.label.clone() };
        parameters.insert("method".to_string(), shown);
    }
    if !succeeded {
        let reason =
            FailureReason::try_from(result.failure_reason).unwrap_or(FailureReason::Unspecified);
        parameters.insert("reason".to_string(), reason_code(reason).to_string());
    }
    let (locale, channels) = route.unwrap_or_default();
    let id = SubscriberId::parse(&result.subscriber_id)
        .map(|s| notification_id(&s, &result.command_id, kind.as_str_name()))
        .unwrap_or_default();
    NotificationCommand {
        notification_id: id,
        subscriber_id: result.subscriber_id.clone(),
        kind: kind as i32,
        locale,
        channels,
        parameters,
        // A failed top-up is what the subscriber most needs to hear: it ignores quiet hours.
        urgent: !succeeded,
        created_at: Some(now_timestamp()),
        command_id: result.command_id.clone(),
        amount: result.amount.clone(),
        balance: None,
        threshold: None,
    }
}

impl<G: PaymentGateway> Processor for PaymentWorker<G> {
    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        self.wait_until_due(input).await;
        out.extend(self.handle(input).await?);
        Ok(())
    }

    /// Subscribers are charged concurrently (up to `concurrency`), each subscriber's
    /// records in order: a gateway that is slow for one subscriber delays only that one.
    async fn process_batch(&mut self, batch: &[Input]) -> Vec<Answer> {
        let mut by_subscriber: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
        for (index, input) in batch.iter().enumerate() {
            by_subscriber.entry(input.key.as_deref().unwrap_or_default()).or_default().push(index);
        }
        let this = &*self;
        let answered: Vec<Vec<(usize, Answer)>> =
            futures::stream::iter(by_subscriber.into_values().map(|indices| async move {
                let mut answers = Vec::with_capacity(indices.len());
                for index in indices {
                    let input = &batch[index];
                    this.wait_until_due(input).await;
                    answers.push((index, this.handle(input).await));
                }
                answers
            }))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut answers: Vec<Option<Answer>> = vec![None; batch.len()];
        for (index, answer) in answered.into_iter().flatten() {
            answers[index] = Some(answer);
        }
        answers.into_iter().flatten().collect()
    }
}
