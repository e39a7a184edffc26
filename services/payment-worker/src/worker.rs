//! Where money moves. A `TopUpCommand` is checked against the worker's own safety limits,
//! then charged method by method. Each command ends in exactly one `TopUpResult` and a
//! notification, committed with the input's offset.
//!
//! A transient gateway error is not retried in place — that would hold back every other
//! subscriber on the partition. The command is parked instead as a `ChargeRetry` on
//! `topup.payment-retries.v1` (in the same transaction as the offset), and the retry lane —
//! a second pipeline over that topic — charges again once the backoff has passed, with the
//! same idempotency key. Within a batch, different subscribers are charged concurrently.
//!
//! Money rules (see `docs/payments.md`): an unknown outcome is never taken for a refusal —
//! it is resolved by asking the gateway about its key and sending the same key again, and
//! past the deadline it becomes a top-up that needs reconciliation; each method has its own
//! key, derived from the command's key and the method's stable id; and a charge is made
//! only while the rule (as read from `topup.rules.v1` by [`RuleView`]) is active and holds
//! the method, and the command is younger than its rail's bound.
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, SystemTime};

use topup_domain::{
    mask_token, method_idempotency_key, Currency, Money, Notice, SubscriberId, YearMonth,
};
use topup_kafka::{
    dead_letter, decode, now_timestamp, system_time, timestamp_of, Answer, Input, Output,
    Processor, Refusal,
};
use topup_proto::payment::v1::ChargeRetry;
use topup_proto::topics;
use topup_proto::v1::{
    FailureReason, NotificationCommand, NotificationKind, PaymentMethod, PaymentMethodKind,
    TopUpCommand, TopUpResult, TopUpStatus,
};

use crate::gateway::{ChargeOutcome, ChargeRequest, ChargeStatus, PaymentGateway};
use crate::metrics::{ChargeParked, GatewayAsked, Parked, TopUpAnswered};
use crate::reason::reason_code;
use crate::rules::{method_id_of, RuleView};

const SERVICE: &str = "topup-payment-worker";

/// A record of either lane, decoded.
pub enum Lane {
    /// A new command from the evaluator.
    Command(Box<TopUpCommand>),
    /// A charge parked for a retry.
    Retry(Box<ChargeRetry>),
}

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
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest single charge, in minor units.
    pub max_single_charge_minor: i64,
    /// How old a command may be when it is charged, per payment rail.
    pub max_command_age: CommandAges,
    /// How long the gateway remembers an idempotency key: an unknown outcome is resolved by
    /// sending the key again only well inside it, and by status lookup alone near its end.
    pub key_retention: Duration,
}

/// The longest a command may wait before it is charged, per payment method kind ("card",
/// "alipay", ...) with a default: a top-up asked for long ago is not what the subscriber
/// expects now. Written `card=900,wechat_pay=86400,*=1800`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandAges {
    default: Duration,
    by_kind: Vec<(PaymentMethodKind, Duration)>,
}

impl Default for CommandAges {
    /// 30 minutes for every rail.
    fn default() -> Self {
        Self { default: Duration::from_secs(1800), by_kind: Vec::new() }
    }
}

impl std::fmt::Display for CommandAges {
    /// `kind=seconds,...,*=seconds`, as [`CommandAges::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kind, age) in &self.by_kind {
            let name = kind.as_str_name().trim_start_matches("PAYMENT_METHOD_KIND_");
            write!(f, "{}={},", name.to_ascii_lowercase(), age.as_secs())?;
        }
        write!(f, "*={}", self.default.as_secs())
    }
}

impl CommandAges {
    /// Parses `kind=seconds,...,*=seconds`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut ages = Self::default();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (kind, secs) =
                entry.split_once('=').ok_or_else(|| format!("{entry:?}: expected kind=seconds"))?;
            let secs: u64 =
                secs.trim().parse().map_err(|_| format!("{entry:?}: {secs:?} is not seconds"))?;
            let age = Duration::from_secs(secs);
            if kind.trim() == "*" {
                ages.default = age;
                continue;
            }
            let name = format!("PAYMENT_METHOD_KIND_{}", kind.trim().to_ascii_uppercase());
            let kind = PaymentMethodKind::from_str_name(&name)
                .filter(|k| *k != PaymentMethodKind::Unspecified)
                .ok_or_else(|| format!("{entry:?}: {kind:?} is not a payment method kind"))?;
            ages.by_kind.push((kind, age));
        }
        Ok(ages)
    }

    /// The bound for a method of `kind`.
    pub fn for_kind(&self, kind: i32) -> Duration {
        self.by_kind.iter().find(|(k, _)| *k as i32 == kind).map_or(self.default, |(_, a)| *a)
    }
}

/// A command being charged, and how far it got.
struct Charge {
    command: TopUpCommand,
    subscriber: SubscriberId,
    amount: Money,
    method_index: usize,
    attempts_on_method: u32,
    deadline: SystemTime,
    /// The last attempt on the current method may have charged: it is resolved before
    /// anything else, and no other method is tried until it is.
    outcome_unknown: bool,
    /// When the current method's key was first sent.
    first_attempt_at: Option<SystemTime>,
    /// A command from before method ids (its methods carry none): charged under the keys it
    /// had then — `<command key>` for the first method, `<command key>-m<index>` after —
    /// so that a charge begun before an upgrade is never sent again under a new key.
    legacy_keys: bool,
    progress: Progress,
}

/// How far a charge got, in the worker's own terms. The `TopUpResult` is assembled from it
/// and the command in one place ([`Charge::result`]), when the command is answered or its
/// charge parked.
#[derive(Debug, Clone)]
struct Progress {
    /// The method being charged (the result names it).
    method: Option<PaymentMethod>,
    /// The idempotency key of the current method's charge (the command's before any).
    key: String,
    /// Charges sent so far, all methods together.
    attempts: u32,
    /// Why the last method did not pay (or, before any was tried, why none could).
    failure: (FailureReason, String),
    /// The gateway's reference, once a charge was approved.
    reference: Option<String>,
}

impl Progress {
    fn start(command: &TopUpCommand) -> Self {
        Self {
            method: None,
            key: command.idempotency_key.clone(),
            attempts: 0,
            failure: (FailureReason::NoPaymentMethod, "the command has no payment method".into()),
            reference: None,
        }
    }

    /// What a parked charge's `result_so_far` says (written by [`Charge::parked`]).
    fn of(result: &TopUpResult) -> Self {
        Self {
            // A record parked before results stopped naming tokens may hold one.
            method: result
                .payment_method
                .clone()
                .map(|method| PaymentMethod { token: String::new(), ..method }),
            key: result.idempotency_key.clone(),
            attempts: result.attempts,
            failure: (
                FailureReason::try_from(result.failure_reason)
                    .unwrap_or(FailureReason::Unspecified),
                result.failure_detail.clone(),
            ),
            reference: Some(result.gateway_reference.clone()).filter(|r| !r.is_empty()),
        }
    }
}

/// The answer to `command` after `progress`: `status`, and `completed_at` when it is final.
fn result_of(
    command: &TopUpCommand,
    amount: Money,
    progress: &Progress,
    status: TopUpStatus,
    completed_at: Option<topup_proto::Timestamp>,
) -> TopUpResult {
    let (reason, detail) = match status {
        TopUpStatus::Succeeded => (FailureReason::Unspecified, String::new()),
        _ => progress.failure.clone(),
    };
    TopUpResult {
        command_id: command.command_id.clone(),
        subscriber_id: command.subscriber_id.clone(),
        status: status as i32,
        amount: Some(amount.to_wire()),
        payment_method: progress.method.clone(),
        gateway_reference: progress.reference.clone().unwrap_or_default(),
        failure_reason: reason as i32,
        failure_detail: detail,
        idempotency_key: progress.key.clone(),
        attempts: progress.attempts,
        carrier_id: command.carrier_id.clone(),
        observed_at: command.observed_at,
        completed_at,
        // Set only by an operator's settlement (`topupctl settle`).
        ..Default::default()
    }
}

/// Where a charge stands after [`PaymentWorker::advance`].
enum Step {
    /// Definite (charged, refused, cancelled) or past resolving (needs reconciliation):
    /// answer the evaluator.
    Finished(Box<TopUpResult>),
    /// Charge (or ask about) the same method again later, from the retry lane.
    Later(Box<ChargeRetry>, Parked),
}

/// May the current method be charged now?
enum Authorised {
    Yes,
    /// The rule is paused or deleted: no charge at all.
    RuleNotActive,
    /// The method is no longer on the rule: try the next one.
    MethodRemoved,
    /// The command is older than its rail's bound.
    Expired,
    /// The rules are not read far enough to tell: ask again later.
    NotYet,
}

/// What a status lookup settled.
enum Resolution {
    Charged(String),
    Refused(FailureReason, String),
    /// Nothing moved: the gateway never processed the key.
    NotCharged,
    Unknown(String),
}

/// The clear token of `method` for `subscriber`: opened with `tokens` when it is sealed, as
/// it is when it is a clear one from before sealing. Never logged, never in a result.
fn clear_token(
    tokens: Option<&topup_domain::TokenKeys>,
    subscriber: &str,
    method: &PaymentMethod,
) -> Result<String, String> {
    if !topup_domain::is_sealed(&method.token) {
        return Ok(method.token.clone());
    }
    match tokens {
        Some(keys) => keys.open(subscriber, &method.token).map_err(|e| e.to_string()),
        None => Err("the payment token is sealed and PAYMENT_TOKEN_KEYS is not set".into()),
    }
}

/// The payment worker's processor, for both the command lane and the retry lane.
pub struct PaymentWorker<G> {
    gateway: G,
    retry: RetryPolicy,
    limits: Limits,
    rules: RuleView,
    /// Subscribers charged at once within one batch.
    concurrency: usize,
    /// What opens sealed payment tokens (`topup_domain::TokenKeys`); none: only clear ones
    /// can be charged.
    tokens: Option<topup_domain::TokenKeys>,
}

/// The longest a batch waits for the rule view to catch up before its charges are parked.
const RULES_CATCH_UP: Duration = Duration::from_secs(5);

impl<G: PaymentGateway> PaymentWorker<G> {
    /// A worker charging through `gateway`, at most `concurrency` subscribers at once,
    /// authorising each charge against `rules`.
    pub fn new(
        gateway: G,
        retry: RetryPolicy,
        limits: Limits,
        rules: RuleView,
        concurrency: usize,
    ) -> Self {
        Self { gateway, retry, limits, rules, concurrency: concurrency.max(1), tokens: None }
    }

    /// The keys that open sealed tokens.
    pub fn with_token_keys(mut self, tokens: Option<topup_domain::TokenKeys>) -> Self {
        self.tokens = tokens;
        self
    }

    /// One record of either lane, to what it produces. `rules_current`: the rule view has
    /// read every rule change committed before this batch.
    async fn handle(&self, input: &Input, lane: Lane, rules_current: bool) -> Answer {
        let charge = match lane {
            Lane::Retry(retry) => self.resume(*retry)?,
            Lane::Command(command) => match self.start(*command) {
                Ok(charge) => charge,
                Err(Unchargeable::Malformed(refusal)) => return Err(refusal),
                Err(Unchargeable::Refused { result, reason }) => {
                    // The evaluator waits for an answer to every command: refuse with a
                    // failed result, and keep the record in the dead-letter topic for operators.
                    tracing::warn!(command_id = %result.command_id, %reason, "command refused by a safety limit");
                    topup_kafka::emit(TopUpAnswered { result: &result });
                    let mut out =
                        vec![Output::message(topics::RESULTS, &result.subscriber_id, &*result)];
                    if let Some(notification) = notify(&result, None) {
                        out.push(Output::message(
                            topics::NOTIFICATIONS,
                            &result.subscriber_id,
                            &notification,
                        ));
                    }
                    out.push(dead_letter(input, SERVICE, &reason));
                    return Ok(out);
                }
            },
        };
        let subscriber = charge.subscriber.clone();
        let locale_channels = (charge.command.locale.clone(), charge.command.channels.clone());
        let command_id = charge.command.command_id.clone();
        let (step, expired) = self.advance(charge, rules_current).await;
        let mut out = match step {
            Step::Later(retry, why) => {
                topup_kafka::emit(ChargeParked { subscriber: &subscriber, retry: &retry, why });
                vec![Output::message(topics::PAYMENT_RETRIES, subscriber.as_str(), &*retry)]
            }
            Step::Finished(result) => {
                topup_kafka::emit(TopUpAnswered { result: &result });
                let mut out = vec![Output::message(topics::RESULTS, subscriber.as_str(), &*result)];
                if let Some(notification) = notify(&result, Some(locale_channels.clone())) {
                    out.push(Output::message(
                        topics::NOTIFICATIONS,
                        subscriber.as_str(),
                        &notification,
                    ));
                }
                out
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
        if command.command_id.is_empty() {
            return Err(Refusal::invalid("command_id", "is required").into());
        }
        if command.idempotency_key.is_empty() {
            return Err(Refusal::invalid("idempotency_key", "is required").into());
        }
        let amount = command
            .amount
            .as_ref()
            .ok_or_else(|| Refusal::invalid("amount", "is required"))
            .and_then(|a| Money::try_from(a).map_err(|e| Refusal::from(e.within("amount"))))?;
        let progress = Progress::start(&command);
        let refuse = |detail: String| {
            let progress = Progress {
                failure: (FailureReason::LimitExceeded, detail.clone()),
                ..progress.clone()
            };
            let result =
                result_of(&command, amount, &progress, TopUpStatus::Failed, Some(now_timestamp()));
            Unchargeable::Refused { result: Box::new(result), reason: detail }
        };
        if amount.minor <= 0 {
            return Err(refuse(format!("amount: must be positive, got {amount}")));
        }
        if amount.minor > self.limits.max_single_charge_minor {
            let limit = Money::new(amount.currency, self.limits.max_single_charge_minor);
            return Err(refuse(format!(
                "amount: {amount} exceeds the single-charge limit of {limit}"
            )));
        }
        Ok(Charge {
            legacy_keys: legacy_keys(&command),
            command,
            subscriber,
            amount,
            method_index: 0,
            attempts_on_method: 0,
            deadline: SystemTime::now() + self.retry.deadline,
            outcome_unknown: false,
            first_attempt_at: None,
            progress,
        })
    }

    /// A parked charge from the retry lane, once its backoff has passed.
    fn resume(&self, retry: ChargeRetry) -> Result<Charge, Refusal> {
        let command = retry.command.ok_or_else(|| Refusal::invalid("command", "is required"))?;
        let subscriber = SubscriberId::parse(&command.subscriber_id)?;
        let amount = command
            .amount
            .as_ref()
            .ok_or_else(|| Refusal::invalid("command.amount", "is required"))
            .and_then(|a| {
                Money::try_from(a).map_err(|e| Refusal::from(e.within("command.amount")))
            })?;
        let result = retry
            .result_so_far
            .as_ref()
            .ok_or_else(|| Refusal::invalid("result_so_far", "is required"))?;
        if usize::try_from(retry.method_index).map_or(true, |i| i >= command.payment_methods.len())
        {
            return Err(Refusal::invalid("method_index", "beyond the command's payment methods"));
        }
        // Parked before this version (no first attempt time): it was parked for any
        // transient error, timeouts included, so it may have charged: resolve it first.
        let parked_before_outcome_classes =
            retry.first_attempt_at.is_none() && retry.attempts_on_method > 0;
        Ok(Charge {
            subscriber,
            amount,
            method_index: usize::try_from(retry.method_index).unwrap_or(usize::MAX),
            attempts_on_method: retry.attempts_on_method,
            deadline: retry.deadline.as_ref().map_or_else(SystemTime::now, system_time),
            outcome_unknown: retry.outcome_unknown || parked_before_outcome_classes,
            legacy_keys: legacy_keys(&command),
            first_attempt_at: retry.first_attempt_at.as_ref().map(system_time),
            progress: Progress::of(result),
            command,
        })
    }

    /// May `charge`'s current method (`method_id`, of `kind`) be charged now: is the command
    /// young enough for its rail, the rule still active and the method still on it?
    fn authorise(&self, charge: &Charge, method_id: &str, kind: i32, current: bool) -> Authorised {
        if let Some(issued) = charge.command.issued_at.as_ref() {
            let age = SystemTime::now().duration_since(system_time(issued)).unwrap_or_default();
            if age > self.limits.max_command_age.for_kind(kind) {
                return Authorised::Expired;
            }
        }
        if !current {
            return Authorised::NotYet;
        }
        match self.rules.rule(charge.subscriber.as_str()) {
            // Not yet read up to the rule the command was issued under.
            Some(rule) if rule.version < charge.command.rule_version => Authorised::NotYet,
            Some(rule) if !rule.active => Authorised::RuleNotActive,
            Some(rule) if !rule.method_ids.iter().any(|id| id == method_id) => {
                Authorised::MethodRemoved
            }
            Some(_) => Authorised::Yes,
            None if charge.command.rule_version > 0 => Authorised::NotYet,
            // A command without a rule version (an operator's, or from before versions) for a
            // subscriber whose rule the topic does not hold: only the age bound applies.
            None => Authorised::Yes,
        }
    }

    /// Asks the gateway what became of `key`, sent before without a definite answer.
    async fn resolve(&self, charge: &Charge, key: &str, kind: i32) -> Resolution {
        topup_kafka::emit(GatewayAsked { request: "status" });
        let kind = PaymentMethodKind::try_from(kind).unwrap_or(PaymentMethodKind::Unspecified);
        match self.gateway.status(key, kind).await {
            ChargeStatus::Approved { reference } => Resolution::Charged(reference),
            ChargeStatus::Refused { reason, detail } => Resolution::Refused(reason, detail),
            ChargeStatus::NotFound if !self.past_retention(charge) => Resolution::NotCharged,
            // The gateway may have forgotten the key: "not found" proves nothing any more.
            ChargeStatus::NotFound => Resolution::Unknown(
                "the gateway no longer knows the key (past its retention)".into(),
            ),
            ChargeStatus::Unknown { detail } => Resolution::Unknown(detail),
        }
    }

    /// The current key was first sent longer ago than the gateway remembers keys.
    fn past_retention(&self, charge: &Charge) -> bool {
        charge.first_attempt_at.is_some_and(|first| {
            SystemTime::now().duration_since(first).unwrap_or_default() >= self.limits.key_retention
        })
    }

    /// The current key is near the end of the gateway's retention: sending it again could
    /// be taken as a new charge, so only a status lookup may resolve it.
    fn near_retention_end(&self, charge: &Charge) -> bool {
        let margin = self.limits.key_retention / 8;
        charge.first_attempt_at.is_some_and(|first| {
            SystemTime::now().duration_since(first).unwrap_or_default() + margin
                >= self.limits.key_retention
        })
    }

    /// Charges method after method from where `charge` stands, until one is approved, all
    /// are refused, the charge is no longer authorised, or an attempt must wait (a
    /// temporary refusal, an unknown outcome, rules not read far enough).
    /// Also returns the methods skipped because they have expired.
    async fn advance(&self, mut charge: Charge, rules_current: bool) -> (Step, Vec<PaymentMethod>) {
        let today = now_timestamp().seconds.div_euclid(86_400);
        let mut expired = Vec::new();
        while let Some(method) = charge.command.payment_methods.get(charge.method_index).cloned() {
            let method_id = method_id_of(&method);
            let key = if charge.legacy_keys {
                legacy_method_key(&charge.command.idempotency_key, charge.method_index)
            } else {
                method_idempotency_key(&charge.command.idempotency_key, &method_id)
            };
            // Results name the method by its id and label, never by its token.
            charge.progress.method = Some(PaymentMethod {
                token: String::new(),
                kind: method.kind,
                label: method.label.clone(),
                expires: method.expires.clone(),
                currency: method.currency.clone(),
                method_id: method_id.clone(),
            });
            charge.progress.key.clone_from(&key);
            if charge.outcome_unknown {
                // Money may have moved on this key: settle that before anything else.
                match self.resolve(&charge, &key, method.kind).await {
                    Resolution::Charged(reference) => {
                        charge.succeed(reference);
                        break;
                    }
                    Resolution::Refused(reason, detail) => {
                        charge.refused(reason, detail);
                        continue;
                    }
                    Resolution::NotCharged => {
                        charge.outcome_unknown = false;
                        if self.near_retention_end(&charge) {
                            charge.refused(
                                FailureReason::GatewayUnavailable,
                                "the gateway never processed the charge".into(),
                            );
                            continue;
                        }
                        // A first attempt after all: charged below, if still authorised.
                    }
                    Resolution::Unknown(detail) => {
                        return (self.later_or_reconcile(charge, detail), expired);
                    }
                }
            }
            if let Some(problem) = currency_mismatch(&method, charge.amount.currency) {
                charge.refused(FailureReason::CurrencyMismatch, problem);
                continue;
            }
            if let Some(problem) = expired_method(&method, today) {
                tracing::info!(subscriber = %charge.subscriber, method = %mask_token(&method.token), expires = %method.expires, "expired payment method skipped");
                charge.refused(FailureReason::CardExpired, problem);
                expired.push(method);
                continue;
            }
            match self.authorise(&charge, &method_id, method.kind, rules_current) {
                Authorised::Yes => {}
                Authorised::MethodRemoved => {
                    tracing::info!(subscriber = %charge.subscriber, method = %method_id, "payment method no longer on the rule: skipped");
                    charge.refused(
                        FailureReason::MethodRemoved,
                        format!("payment method {method_id} is no longer on the rule"),
                    );
                    continue;
                }
                Authorised::RuleNotActive => {
                    let detail = "the rule was paused or deleted before the charge".to_string();
                    return (charge.cancel(FailureReason::RuleNotActive, detail), expired);
                }
                Authorised::Expired => {
                    let detail = format!(
                        "the command waited longer than {:?} to be charged",
                        self.limits.max_command_age.for_kind(method.kind)
                    );
                    return (charge.cancel(FailureReason::CommandExpired, detail), expired);
                }
                Authorised::NotYet => return (self.wait_for_rules(charge), expired),
            }
            let token = match clear_token(
                self.tokens.as_ref(),
                &charge.command.subscriber_id,
                &method,
            ) {
                Ok(token) => token,
                Err(detail) => {
                    tracing::error!(subscriber = %charge.subscriber, method = %method_id, %detail, "payment token does not open: method skipped");
                    charge.refused(FailureReason::NoPaymentMethod, detail);
                    continue;
                }
            };
            let request = ChargeRequest {
                idempotency_key: key.clone(),
                token,
                kind: PaymentMethodKind::try_from(method.kind)
                    .unwrap_or(PaymentMethodKind::Unspecified),
                amount: charge.amount,
                subscriber_id: charge.command.subscriber_id.clone(),
                command_id: charge.command.command_id.clone(),
            };
            topup_kafka::emit(GatewayAsked { request: "charge" });
            let outcome = self.gateway.charge(&request).await;
            charge.progress.attempts += 1;
            charge.attempts_on_method += 1;
            charge.first_attempt_at.get_or_insert_with(SystemTime::now);
            match outcome {
                ChargeOutcome::Approved { reference } => {
                    charge.succeed(reference);
                    break;
                }
                ChargeOutcome::Refused { reason, detail } => {
                    tracing::info!(subscriber = %charge.subscriber, method = %mask_token(&method.token), reason = reason_code(reason), "payment method refused");
                    charge.refused(reason, detail);
                }
                ChargeOutcome::Unavailable { detail } => {
                    let wait = self.retry.backoff(charge.attempts_on_method, &key);
                    let not_before = SystemTime::now() + wait;
                    if charge.attempts_on_method < self.retry.max_attempts
                        && not_before <= charge.deadline
                    {
                        charge.progress.failure = (FailureReason::GatewayUnavailable, detail);
                        let parked = Box::new(charge.parked(not_before));
                        return (Step::Later(parked, Parked::GatewayUnavailable), expired);
                    }
                    // Nothing was processed (the gateway said so each time): the next
                    // method may be tried.
                    let attempts = charge.attempts_on_method;
                    charge.refused(
                        FailureReason::GatewayUnavailable,
                        format!("retries exhausted after {attempts} attempts: {detail}"),
                    );
                }
                ChargeOutcome::Unknown { detail } => {
                    tracing::warn!(subscriber = %charge.subscriber, method = %mask_token(&method.token), %detail, "charge outcome unknown: resolved with the same key, never another method");
                    charge.outcome_unknown = true;
                    return (self.later_or_reconcile(charge, detail), expired);
                }
            }
        }
        (Step::Finished(Box::new(charge.finish())), expired)
    }

    /// An unknown outcome asked about again after a backoff, or — past the deadline — a
    /// top-up that needs reconciliation: still in flight for the evaluator, its caps kept,
    /// and for operators to settle with the gateway's books.
    fn later_or_reconcile(&self, mut charge: Charge, detail: String) -> Step {
        let wait = self.retry.backoff(charge.attempts_on_method.max(1), &charge.progress.key);
        let not_before = SystemTime::now() + wait;
        if not_before <= charge.deadline {
            charge.progress.failure = (FailureReason::OutcomeUnknown, detail);
            return Step::Later(Box::new(charge.parked(not_before)), Parked::OutcomeUnknown);
        }
        charge.progress.failure = (
            FailureReason::OutcomeUnknown,
            format!("no definite answer before the deadline: {detail}"),
        );
        Step::Finished(Box::new(charge.answer(TopUpStatus::NeedsReconciliation)))
    }

    /// The rule view is behind: look again shortly (nothing was sent for this method yet,
    /// or the gateway said it never processed it). Past the deadline nothing has moved, and
    /// the top-up fails.
    fn wait_for_rules(&self, mut charge: Charge) -> Step {
        let not_before = SystemTime::now() + self.retry.initial_backoff.min(Duration::from_secs(1));
        if not_before <= charge.deadline {
            return Step::Later(Box::new(charge.parked(not_before)), Parked::RulesBehind);
        }
        charge.progress.failure = (
            FailureReason::GatewayUnavailable,
            "the rules could not be read far enough to authorise the charge".into(),
        );
        Step::Finished(Box::new(charge.answer(TopUpStatus::Failed)))
    }

    /// Waits until a parked charge is due (bounded by the longest backoff, in case a
    /// clock or a record is off).
    async fn wait_until_due(&self, retry: &ChargeRetry) {
        let Some(due) = retry.not_before else { return };
        let wait = system_time(&due)
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(self.retry.max_backoff);
        tokio::time::sleep(wait).await;
    }
}

impl Charge {
    /// The current method was refused (or skipped) for good: the next one.
    fn refused(&mut self, reason: FailureReason, detail: String) {
        self.progress.failure = (reason, detail);
        self.method_index += 1;
        self.attempts_on_method = 0;
        self.outcome_unknown = false;
        self.first_attempt_at = None;
    }

    fn succeed(&mut self, reference: String) {
        self.progress.reference = Some(reference);
    }

    /// No charge: the top-up is no longer authorised. Definite: nothing moved.
    fn cancel(mut self, reason: FailureReason, detail: String) -> Step {
        self.progress.failure = (reason, detail);
        Step::Finished(Box::new(self.answer(TopUpStatus::Cancelled)))
    }

    /// The retry record that resumes this charge at `not_before`.
    fn parked(self, not_before: SystemTime) -> ChargeRetry {
        let so_far =
            result_of(&self.command, self.amount, &self.progress, TopUpStatus::Failed, None);
        ChargeRetry {
            method_index: u32::try_from(self.method_index).unwrap_or(u32::MAX),
            attempts_on_method: self.attempts_on_method,
            not_before: Some(timestamp_of(not_before)),
            deadline: Some(timestamp_of(self.deadline)),
            result_so_far: Some(so_far),
            command: Some(self.command),
            outcome_unknown: self.outcome_unknown,
            first_attempt_at: self.first_attempt_at.map(timestamp_of),
        }
    }

    /// Every method was tried or skipped: charged, or (definitely nothing moved) failed —
    /// cancelled when the only obstacle was that the methods left the rule.
    fn finish(self) -> TopUpResult {
        let status = match (&self.progress.reference, self.progress.failure.0) {
            (Some(_), _) => TopUpStatus::Succeeded,
            (None, FailureReason::MethodRemoved) => TopUpStatus::Cancelled,
            (None, _) => TopUpStatus::Failed,
        };
        self.answer(status)
    }

    /// The final result: `status`, completed now.
    fn answer(&self, status: TopUpStatus) -> TopUpResult {
        result_of(&self.command, self.amount, &self.progress, status, Some(now_timestamp()))
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

/// A command from before method ids: none of its methods carries one.
fn legacy_keys(command: &TopUpCommand) -> bool {
    command.payment_methods.iter().all(|m| m.method_id.is_empty())
}

/// The key scheme before method ids: the command's key for the first method,
/// `<key>-m<index>` for the others.
fn legacy_method_key(command_key: &str, index: usize) -> String {
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
    let shown =
        if method.label.is_empty() { mask_token(&method.token) } else { method.label.clone() };
    let about = format!("{command_id}/expired/{}", mask_token(&method.token));
    Notice::new(NotificationKind::PaymentMethodProblem, subscriber, &about, now_timestamp())
        .to(locale, channels)
        .command(command_id)
        .parameter("method", shown)
        .parameter("reason", reason_code(FailureReason::CardExpired))
        .build()
}

/// The notification that tells the subscriber how their top-up went (and, when it
/// failed, what to fix). `route` is the command's locale and channels. None for a top-up
/// that needs reconciliation: the subscriber is not told it failed when it may not have.
fn notify(
    result: &TopUpResult,
    route: Option<(String, Vec<topup_proto::v1::NotificationChannel>)>,
) -> Option<NotificationCommand> {
    let status = TopUpStatus::try_from(result.status).unwrap_or(TopUpStatus::Unspecified);
    let kind = match status {
        TopUpStatus::Succeeded => NotificationKind::TopUpSucceeded,
        TopUpStatus::Failed => NotificationKind::TopUpFailed,
        TopUpStatus::Cancelled => NotificationKind::TopUpCancelled,
        TopUpStatus::NeedsReconciliation | TopUpStatus::Unspecified => return None,
    };
    let subscriber = SubscriberId::parse(&result.subscriber_id).ok()?;
    let (locale, channels) = route.unwrap_or_default();
    let amount = result.amount.as_ref().and_then(|a| Money::try_from(a).ok());
    let mut notice = Notice::new(kind, &subscriber, &result.command_id, now_timestamp())
        .to(&locale, &channels)
        // A failed top-up is what the subscriber most needs to hear: it ignores quiet hours.
        .urgent(status == TopUpStatus::Failed)
        .command(&result.command_id)
        .amount(amount);
    if let Some(method) = &result.payment_method {
        let shown =
            if method.label.is_empty() { mask_token(&method.token) } else { method.label.clone() };
        notice = notice.parameter("method", shown);
    }
    if status != TopUpStatus::Succeeded {
        let reason =
            FailureReason::try_from(result.failure_reason).unwrap_or(FailureReason::Unspecified);
        notice = notice.parameter("reason", reason_code(reason));
    }
    Some(notice.build())
}

impl<G: PaymentGateway> Processor for PaymentWorker<G> {
    type Event = Lane;
    /// Nothing is kept per subscriber (the rules are read by [`RuleView`]).
    type State = ();
    /// Whether the rule view has read every rule change committed before the batch.
    type Batch = bool;

    fn decode(&self, input: &Input) -> Result<(String, Lane), Refusal> {
        let lane = if input.topic == topics::PAYMENT_RETRIES {
            decode(input, |r: &ChargeRetry| r.command.as_ref().map_or("", |c| &c.subscriber_id))
                .map(|retry| Lane::Retry(Box::new(retry)))
        } else {
            decode(input, |c: &TopUpCommand| &c.subscriber_id)
                .map(|command| Lane::Command(Box::new(command)))
        }?;
        let subscriber = match &lane {
            Lane::Command(command) => command.subscriber_id.clone(),
            Lane::Retry(retry) => {
                retry.command.as_ref().map(|c| c.subscriber_id.clone()).unwrap_or_default()
            }
        };
        Ok((subscriber, lane))
    }

    /// Every rule change committed before now is read before any charge of the batch.
    async fn begin_batch(&self, batch: &[Input]) -> bool {
        if batch.iter().any(|i| i.topic != topics::PAYMENT_RETRIES) {
            self.rules.caught_up(RULES_CATCH_UP).await
        } else {
            false
        }
    }

    /// Subscribers are charged concurrently (up to `concurrency`), each subscriber's
    /// records in order: a gateway that is slow for one subscriber delays only that one.
    async fn process(
        &self,
        input: &Input,
        rules_current: &bool,
        _state: &mut Option<()>,
        lane: Lane,
    ) -> Answer {
        let current = match &lane {
            Lane::Retry(retry) => {
                self.wait_until_due(retry).await;
                // A parked charge waited: read the rules again up to now.
                self.rules.caught_up(RULES_CATCH_UP).await
            }
            Lane::Command(_) => *rules_current,
        };
        self.handle(input, lane, current).await
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_is_opened_to_charge_and_a_clear_one_from_before_is_charged_as_it_is() {
        let keys = topup_domain::TokenKeys::random("k1");
        let method = |token: String| PaymentMethod { token, ..Default::default() };
        let sealed = method(keys.seal("sub-1", "tok_approve_4242"));
        assert_eq!(clear_token(Some(&keys), "sub-1", &sealed).unwrap(), "tok_approve_4242");
        // Sealed for another subscriber, or no keys: that method cannot be charged.
        assert!(clear_token(Some(&keys), "sub-2", &sealed).is_err());
        let without = clear_token(None, "sub-1", &sealed).unwrap_err();
        assert!(without.contains("PAYMENT_TOKEN_KEYS"), "{without}");
        // A record written before tokens were sealed still works.
        let clear = method("tok_legacy_1".into());
        assert_eq!(clear_token(None, "sub-1", &clear).unwrap(), "tok_legacy_1");
    }
}
