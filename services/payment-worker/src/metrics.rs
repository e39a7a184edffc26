//! The payment worker's counters.
use std::sync::atomic::{AtomicU64, Ordering};

/// Top-ups charged.
pub static SUCCEEDED: AtomicU64 = AtomicU64::new(0);
/// Top-ups that could not be charged.
pub static FAILED: AtomicU64 = AtomicU64::new(0);
/// Requests sent to the gateway.
pub static CHARGE_ATTEMPTS: AtomicU64 = AtomicU64::new(0);
/// Charges parked on the retry topic after a transient error.
pub static RETRIES_SCHEDULED: AtomicU64 = AtomicU64::new(0);
/// Top-ups not charged because they were no longer authorised.
pub static CANCELLED: AtomicU64 = AtomicU64::new(0);
/// Top-ups whose charge outcome stayed unknown past the deadline.
pub static NEEDS_RECONCILIATION: AtomicU64 = AtomicU64::new(0);
/// Status lookups sent to the gateway after an unknown outcome.
pub static STATUS_LOOKUPS: AtomicU64 = AtomicU64::new(0);
/// Commands dead-lettered.
pub static DEAD_LETTERS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Labels of completed top-ups.
/// Metrics served on `/metrics` and exported over OTLP.
pub(crate) struct Exported {
    /// `topup_topups_completed_total{status,reason}`: `status` is `succeeded`, `failed`,
    /// `cancelled` or `needs_reconciliation`, `reason` the failure reason code (`none` when
    /// it succeeded).
    pub(crate) completed: topup_kafka::ops::LabeledCounter,
    /// `topup_result_latency_seconds`: balance observed → top-up result.
    pub(crate) result_latency: topup_kafka::ops::LatencyHistogram,
}

pub(crate) fn exported() -> &'static Exported {
    static EXPORTED: std::sync::OnceLock<Exported> = std::sync::OnceLock::new();
    EXPORTED.get_or_init(|| Exported {
        completed: topup_kafka::ops::LabeledCounter::new(
            "topups_completed",
            "Top-ups answered, by status and reason",
        ),
        result_latency: topup_kafka::ops::LatencyHistogram::new(
            "result_latency_seconds",
            "From the balance's observed_at to the top-up result",
        ),
    })
}

pub(crate) fn completed(result: &topup_proto::v1::TopUpResult) {
    use topup_proto::v1::TopUpStatus;
    let status = match TopUpStatus::try_from(result.status) {
        Ok(TopUpStatus::Succeeded) => "succeeded",
        Ok(TopUpStatus::Cancelled) => "cancelled",
        Ok(TopUpStatus::NeedsReconciliation) => "needs_reconciliation",
        _ => "failed",
    };
    let reason = topup_proto::v1::FailureReason::try_from(result.failure_reason)
        .map_or("unknown", crate::worker::reason_code);
    let exported = exported();
    exported.completed.inc(&[
        ("status", status),
        ("reason", if status == "succeeded" { "none" } else { reason }),
    ]);
    if let Some(seconds) = topup_kafka::ops::seconds_since(result.observed_at.as_ref()) {
        exported.result_latency.observe(seconds);
    }
}
