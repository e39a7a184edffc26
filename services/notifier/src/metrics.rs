//! The notifier's counters.
use std::sync::atomic::{AtomicU64, Ordering};

/// Messages delivered (one per channel).
pub static DELIVERED: AtomicU64 = AtomicU64::new(0);
/// Delivery attempts that failed.
pub static FAILED: AtomicU64 = AtomicU64::new(0);
/// Notifications not sent on purpose (duplicate, rate limit, no channel).
pub static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
/// Notifications held over quiet hours.
pub static DEFERRED: AtomicU64 = AtomicU64::new(0);
/// Notifications no channel could deliver.
pub static UNDELIVERABLE: AtomicU64 = AtomicU64::new(0);
/// Records dead-lettered.
pub static DEAD_LETTERS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
