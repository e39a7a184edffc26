//! The evaluator's counters (read by the all-in-one summary; exported by telemetry later).
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
