//! The evaluator's counters (read by the all-in-one summary) and its exported metrics.
use std::sync::atomic::{AtomicU64, Ordering};

/// Balance events consumed (stale ones included).
pub static BALANCE_EVENTS: AtomicU64 = AtomicU64::new(0);
/// Top-up commands issued.
pub static COMMANDS_ISSUED: AtomicU64 = AtomicU64::new(0);
/// Notification commands issued.
pub static NOTIFICATIONS_ISSUED: AtomicU64 = AtomicU64::new(0);
/// Records sent to the dead-letter topic.
pub static DEAD_LETTERS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Metrics served on `/metrics` and exported over OTLP.
pub(crate) struct Exported {
    /// `topup_topups_issued_total`.
    pub(crate) topups_issued: topup_kafka::ops::LabeledCounter,
    /// `topup_topups_reissued_total`: commands issued again after waiting too long for a
    /// result.
    pub(crate) topups_reissued: topup_kafka::ops::LabeledCounter,
    /// `topup_credits_overdue_total`: charged top-ups the carrier did not credit in time.
    pub(crate) credits_overdue: topup_kafka::ops::LabeledCounter,
    /// `topup_command_latency_seconds`: balance observed → command issued.
    pub(crate) command_latency: topup_kafka::ops::LatencyHistogram,
}

pub(crate) fn exported() -> &'static Exported {
    static EXPORTED: std::sync::OnceLock<Exported> = std::sync::OnceLock::new();
    EXPORTED.get_or_init(|| Exported {
        topups_issued: topup_kafka::ops::LabeledCounter::new(
            "topups_issued",
            "Top-up commands issued",
        ),
        topups_reissued: topup_kafka::ops::LabeledCounter::new(
            "topups_reissued",
            "Top-up commands issued again under the same id after waiting too long for a result",
        ),
        credits_overdue: topup_kafka::ops::LabeledCounter::new(
            "credits_overdue",
            "Charged top-ups whose credit by the carrier was not seen within the deadline",
        ),
        command_latency: topup_kafka::ops::LatencyHistogram::new(
            "command_latency_seconds",
            "From the balance's observed_at to the top-up command",
        ),
    })
}
