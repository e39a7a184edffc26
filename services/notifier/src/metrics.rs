//! The notifier's metric, declared once, and the event that logs and counts it: every
//! delivery receipt written (delivered, failed, suppressed, held, undeliverable).
use std::sync::OnceLock;

use topup_kafka::ops::LabeledCounter;
use topup_kafka::InternalEvent;
use topup_proto::v1::{ChannelKind, DeliveryStatus, NotificationCommand};

/// `topup_notification_deliveries_total{channel,status}`: `channel` is `email`, `sms`,
/// `push`, `console`, or `none` (suppressed, held, undeliverable); `status` is
/// `delivered`, `failed`, `suppressed`, `deferred` or `undeliverable`.
fn deliveries() -> &'static LabeledCounter {
    static COUNTER: OnceLock<LabeledCounter> = OnceLock::new();
    COUNTER.get_or_init(|| {
        LabeledCounter::new("notification_deliveries", "Delivery receipts, by channel and status")
    })
}

/// Messages delivered in this process so far (one per channel).
pub fn delivered() -> u64 {
    deliveries().sum(&[("status", "delivered")])
}

/// A delivery receipt was written: what became of one notification on one channel.
pub(crate) struct ReceiptWritten<'a> {
    pub(crate) notification: &'a NotificationCommand,
    pub(crate) channel: ChannelKind,
    pub(crate) status: DeliveryStatus,
    pub(crate) attempt: u32,
    /// Masked.
    pub(crate) destination: &'a str,
    pub(crate) detail: &'a str,
}

impl InternalEvent for ReceiptWritten<'_> {
    fn emit(self) {
        let channel = match self.channel {
            ChannelKind::Unspecified => "none".to_string(),
            other => other.as_str_name().trim_start_matches("CHANNEL_KIND_").to_ascii_lowercase(),
        };
        let status =
            self.status.as_str_name().trim_start_matches("DELIVERY_STATUS_").to_ascii_lowercase();
        deliveries().inc(&[("channel", &channel), ("status", &status)]);
        let n = self.notification;
        macro_rules! receipt {
            ($level:ident, $message:literal) => {
                tracing::$level!(
                    subscriber = %n.subscriber_id,
                    notification_id = %n.notification_id,
                    channel,
                    destination = self.destination,
                    attempt = self.attempt,
                    detail = self.detail,
                    $message
                )
            };
        }
        match self.status {
            DeliveryStatus::Delivered => receipt!(debug, "delivered"),
            DeliveryStatus::Failed => receipt!(warn, "delivery failed"),
            DeliveryStatus::Undeliverable => {
                receipt!(error, "every channel failed: the subscriber could not be told")
            }
            DeliveryStatus::Suppressed => receipt!(info, "notification suppressed"),
            DeliveryStatus::Deferred => receipt!(info, "notification held"),
            DeliveryStatus::Unspecified => receipt!(warn, "receipt without a status"),
        }
    }
}
