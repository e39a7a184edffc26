//! The payment worker's metrics, declared once, and the events that log and count them.
use std::sync::OnceLock;

use topup_domain::{Money, SubscriberId};
use topup_kafka::ops::{LabeledCounter, LatencyHistogram};
use topup_kafka::InternalEvent;
use topup_proto::payment::v1::ChargeRetry;
use topup_proto::v1::{FailureReason, TopUpResult, TopUpStatus};

/// Metrics served on `/metrics` and exported over OTLP.
struct Metrics {
    /// `topup_topups_completed_total{status,reason}`: `status` is `succeeded`, `failed`,
    /// `cancelled` or `needs_reconciliation`, `reason` the failure reason code (`none` when
    /// it succeeded).
    completed: LabeledCounter,
    /// `topup_result_latency_seconds`: balance observed → top-up result.
    result_latency: LatencyHistogram,
    /// `topup_gateway_requests_total{request}`: `charge` or `status` (a lookup after an
    /// unknown outcome).
    gateway_requests: LabeledCounter,
    /// `topup_charges_parked_total{why}`: `gateway_unavailable`, `outcome_unknown` or
    /// `rules_behind`.
    parked: LabeledCounter,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        completed: LabeledCounter::new(
            "topups_completed",
            "Top-ups answered, by status and reason",
        ),
        result_latency: LatencyHistogram::new(
            "result_latency_seconds",
            "From the balance's observed_at to the top-up result",
        ),
        gateway_requests: LabeledCounter::new(
            "gateway_requests",
            "Requests sent to the payment gateway, by kind",
        ),
        parked: LabeledCounter::new(
            "charges_parked",
            "Charges parked on the retry topic, by why they wait",
        ),
    })
}

/// Top-ups answered in this process so far with `status` (`succeeded`, `failed`, ...).
pub fn completed_with(status: &str) -> u64 {
    metrics().completed.sum(&[("status", status)])
}

/// A command was answered with its one `TopUpResult` (or the settlement's).
pub(crate) struct TopUpAnswered<'a> {
    pub(crate) result: &'a TopUpResult,
}

impl InternalEvent for TopUpAnswered<'_> {
    fn emit(self) {
        let result = self.result;
        let status = TopUpStatus::try_from(result.status).unwrap_or(TopUpStatus::Unspecified);
        let reason =
            FailureReason::try_from(result.failure_reason).unwrap_or(FailureReason::Unspecified);
        let code = crate::reason::reason_code(reason);
        let label = match status {
            TopUpStatus::Succeeded => "succeeded",
            TopUpStatus::Cancelled => "cancelled",
            TopUpStatus::NeedsReconciliation => "needs_reconciliation",
            TopUpStatus::Failed | TopUpStatus::Unspecified => "failed",
        };
        let metrics = metrics();
        metrics.completed.inc(&[
            ("status", label),
            ("reason", if label == "succeeded" { "none" } else { code }),
        ]);
        if let Some(seconds) = topup_kafka::ops::seconds_since(result.observed_at.as_ref()) {
            metrics.result_latency.observe(seconds);
        }
        let amount = result.amount.as_ref().and_then(|a| Money::try_from(a).ok());
        let amount = amount.map(|m| m.to_string()).unwrap_or_default();
        let (subscriber, command_id) = (&result.subscriber_id, &result.command_id);
        match status {
            TopUpStatus::Succeeded => tracing::info!(
                subscriber,
                command_id,
                amount,
                attempts = result.attempts,
                "top-up charged"
            ),
            TopUpStatus::Cancelled => tracing::info!(
                subscriber,
                command_id,
                reason = code,
                detail = result.failure_detail,
                "top-up cancelled: nothing was charged"
            ),
            TopUpStatus::NeedsReconciliation => tracing::error!(
                subscriber,
                command_id,
                key = result.idempotency_key,
                detail = result.failure_detail,
                "charge outcome still unknown at the deadline: the top-up needs reconciliation"
            ),
            TopUpStatus::Failed | TopUpStatus::Unspecified => tracing::info!(
                subscriber,
                command_id,
                amount,
                reason = code,
                detail = result.failure_detail,
                "top-up failed"
            ),
        }
    }
}

/// A request went to the gateway.
pub(crate) struct GatewayAsked {
    /// `charge` or `status`.
    pub(crate) request: &'static str,
}

impl InternalEvent for GatewayAsked {
    fn emit(self) {
        metrics().gateway_requests.inc(&[("request", self.request)]);
    }
}

/// Why a charge waits on the retry topic (the `why` label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Parked {
    /// The gateway said it processed nothing; charged again after a backoff.
    GatewayUnavailable,
    /// Money may have moved; asked about with the same key after a backoff.
    OutcomeUnknown,
    /// The rule view has not read up to the command's rule yet.
    RulesBehind,
}

impl Parked {
    fn label(self) -> &'static str {
        match self {
            Self::GatewayUnavailable => "gateway_unavailable",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::RulesBehind => "rules_behind",
        }
    }
}

/// A charge was parked on the retry topic, to be charged (or asked about) when due.
pub(crate) struct ChargeParked<'a> {
    pub(crate) subscriber: &'a SubscriberId,
    pub(crate) retry: &'a ChargeRetry,
    pub(crate) why: Parked,
}

impl InternalEvent for ChargeParked<'_> {
    fn emit(self) {
        let why = self.why.label();
        metrics().parked.inc(&[("why", why)]);
        let result = self.retry.result_so_far.as_ref();
        tracing::info!(
            subscriber = %self.subscriber,
            command_id = self.retry.command.as_ref().map_or("", |c| c.command_id.as_str()),
            attempt = self.retry.attempts_on_method,
            why,
            detail = result.map_or("", |r| r.failure_detail.as_str()),
            "charge parked until it is due"
        );
    }
}
