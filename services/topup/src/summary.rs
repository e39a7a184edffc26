//! The counters the all-in-one run reports when it stops.
use std::fmt;

/// What happened so far in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Balance events the evaluator consumed.
    pub events_in: u64,
    /// Top-up commands issued.
    pub topups_issued: u64,
    /// Top-ups charged.
    pub succeeded: u64,
    /// Top-ups that failed.
    pub failed: u64,
    /// Messages delivered to subscribers.
    pub notifications_sent: u64,
    /// Records dead-lettered by the services.
    pub dead_letters: u64,
}

impl Summary {
    /// Reads the counters `/metrics` serves.
    pub fn now() -> Self {
        let pipelines = topup_kafka::pipeline_metrics();
        let balances = [("service", "topup-evaluator"), ("topic", topup_proto::topics::BALANCE)];
        Self {
            events_in: pipelines.consumed.sum(&balances),
            topups_issued: topup_evaluator::metrics::topups_issued(),
            succeeded: topup_payment_worker::metrics::completed_with("succeeded"),
            failed: topup_payment_worker::metrics::completed_with("failed"),
            notifications_sent: topup_notifier::metrics::delivered(),
            dead_letters: pipelines.dead_letters.sum(&[]),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "── summary ─────────────────────────")?;
        writeln!(f, "  balance events in    {:>8}", self.events_in)?;
        writeln!(f, "  top-ups issued       {:>8}", self.topups_issued)?;
        writeln!(f, "  top-ups succeeded    {:>8}", self.succeeded)?;
        writeln!(f, "  top-ups failed       {:>8}", self.failed)?;
        writeln!(f, "  notifications sent   {:>8}", self.notifications_sent)?;
        write!(f, "  dead letters         {:>8}", self.dead_letters)
    }
}
