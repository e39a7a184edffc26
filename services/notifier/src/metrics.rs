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

/// Labels of delivery receipts.
/// Counts a receipt in `topup_notification_deliveries_total{channel,status}`: `channel` is
/// `email`, `sms`, `push`, `console`, or `none` (suppressed, held, undeliverable); `status`
/// is `delivered`, `failed`, `suppressed`, `deferred` or `undeliverable`.
pub(crate) fn receipt(
    channel: topup_proto::v1::ChannelKind,
    status: topup_proto::v1::DeliveryStatus,
) {
    static COUNTER: std::sync::OnceLock<topup_kafka::ops::LabeledCounter> =
        std::sync::OnceLock::new();
    let counter = COUNTER.get_or_init(|| {
        topup_kafka::ops::LabeledCounter::new(
            "notification_deliveries",
            "Delivery receipts, by channel and status",
        )
    });
    let channel = match channel {
        topup_proto::v1::ChannelKind::Unspecified => "none".to_string(),
        other => other.as_str_name().trim_start_matches("CHANNEL_KIND_").to_ascii_lowercase(),
    };
    let status = status.as_str_name().trim_start_matches("DELIVERY_STATUS_").to_ascii_lowercase();
    counter.inc(&[("channel", &channel), ("status", &status)]);
}
