//! The counters the all-in-one run reports when it stops.
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;

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
    /// Records dead-lettered by the evaluator and the payment worker.
    pub dead_letters: u64,
}

impl Summary {
    /// Reads the services' counters.
    pub fn now() -> Self {
        Self {
            events_in: topup_evaluator::metrics::BALANCE_EVENTS.load(Relaxed),
            topups_issued: topup_evaluator::metrics::COMMANDS_ISSUED.load(Relaxed),
            succeeded: topup_payment_worker::metrics::SUCCEEDED.load(Relaxed),
            failed: topup_payment_worker::metrics::FAILED.load(Relaxed),
            notifications_sent: topup_notifier::metrics::DELIVERED.load(Relaxed),
            dead_letters: topup_evaluator::metrics::DEAD_LETTERS.load(Relaxed)
                + topup_payment_worker::metrics::DEAD_LETTERS.load(Relaxed),
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
