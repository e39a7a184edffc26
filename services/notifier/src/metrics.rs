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
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct Deliveries {
    /// `email`, `sms`, `push`, `console`, or `none` (suppressed, held, undeliverable).
    pub(crate) channel: String,
    /// `delivered`, `failed`, `suppressed`, `deferred`, `undeliverable`.
    pub(crate) status: String,
}

/// `topup_notification_deliveries_total{channel,status}`: one per receipt.
pub(crate) fn receipt(
    channel: topup_proto::v1::ChannelKind,
    status: topup_proto::v1::DeliveryStatus,
) {
    static FAMILY: std::sync::OnceLock<
        prometheus_client::metrics::family::Family<
            Deliveries,
            prometheus_client::metrics::counter::Counter,
        >,
    > = std::sync::OnceLock::new();
    let family = FAMILY.get_or_init(|| {
        let family = prometheus_client::metrics::family::Family::default();
        topup_kafka::ops::register(
            "notification_deliveries",
            "Delivery receipts, by channel and status",
            family.clone(),
        );
        family
    });
    let channel = match channel {
        topup_proto::v1::ChannelKind::Unspecified => "none".to_string(),
        other => other.as_str_name().trim_start_matches("CHANNEL_KIND_").to_ascii_lowercase(),
    };
    let status = status.as_str_name().trim_start_matches("DELIVERY_STATUS_").to_ascii_lowercase();
    family.get_or_create(&Deliveries { channel, status }).inc();
}
