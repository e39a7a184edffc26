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
/// Commands dead-lettered.
pub static DEAD_LETTERS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Labels of completed top-ups.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct Completed {
    /// `succeeded` or `failed`.
    pub(crate) status: &'static str,
    /// The failure reason code, `none` when it succeeded.
    pub(crate) reason: &'static str,
}

/// Metrics served on `/metrics`.
pub(crate) struct Exported {
    /// `topup_topups_completed_total{status,reason}`.
    pub(crate) completed: prometheus_client::metrics::family::Family<
        Completed,
        prometheus_client::metrics::counter::Counter,
    >,
    /// `topup_result_latency_seconds`: balance observed → top-up result.
    pub(crate) result_latency: prometheus_client::metrics::histogram::Histogram,
}

pub(crate) fn exported() -> &'static Exported {
    static EXPORTED: std::sync::OnceLock<Exported> = std::sync::OnceLock::new();
    EXPORTED.get_or_init(|| {
        let exported = Exported {
            completed: Default::default(),
            result_latency: prometheus_client::metrics::histogram::Histogram::new(
                topup_kafka::ops::latency_buckets(),
            ),
        };
        topup_kafka::ops::register(
            "topups_completed",
            "Top-ups answered, by status and reason",
            exported.completed.clone(),
        );
        topup_kafka::ops::register(
            "result_latency_seconds",
            "From the balance's observed_at to the top-up result",
            exported.result_latency.clone(),
        );
        exported
    })
}

/// Counts a final result.
pub(crate) fn completed(result: &topup_proto::v1::TopUpResult) {
    let succeeded = result.status == topup_proto::v1::TopUpStatus::Succeeded as i32;
    let reason = topup_proto::v1::FailureReason::try_from(result.failure_reason)
        .map_or("unknown", crate::worker::reason_code);
    let labels = Completed {
        status: if succeeded { "succeeded" } else { "failed" },
        reason: if succeeded { "none" } else { reason },
    };
    let exported = exported();
    exported.completed.get_or_create(&labels).inc();
    if let Some(seconds) = topup_kafka::ops::seconds_since(result.observed_at.as_ref()) {
        exported.result_latency.observe(seconds);
    }
}
