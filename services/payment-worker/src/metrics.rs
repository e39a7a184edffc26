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
