//! Where a message leaves: a `NotificationCommand` is rendered in the subscriber's language
//! and delivered on each of their channels; every attempt publishes a `DeliveryReceipt`.
use std::collections::{HashSet, VecDeque};

use topup_domain::{mask_contact, SubscriberId};
use topup_kafka::{decode, now_timestamp, Input, Output, Processor, Refusal};
use topup_proto::topics;
use topup_proto::v1::{ChannelKind, DeliveryReceipt, DeliveryStatus, NotificationCommand};

use crate::channel::{Channel, ChannelError, Delivery};
use crate::metrics::{self, count};
use crate::templates::render;

/// How many recent notification ids are remembered to drop duplicates.
const DEDUP_WINDOW: usize = 100_000;

/// The notifier's processor.
pub struct Notifier<C> {
    channel: C,
    recent: HashSet<String>,
    order: VecDeque<String>,
}

impl<C: Channel> Notifier<C> {
    /// A notifier delivering through `channel`.
    pub fn new(channel: C) -> Self {
        Self { channel, recent: HashSet::new(), order: VecDeque::new() }
    }

    /// Remembers `id`; false when it was seen within the window.
    fn first_time(&mut self, id: &str) -> bool {
        if self.recent.contains(id) {
            return false;
        }
        self.recent.insert(id.to_string());
        self.order.push_back(id.to_string());
        if self.order.len() > DEDUP_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
        true
    }
}

fn receipt(
    n: &NotificationCommand,
    channel: ChannelKind,
    status: DeliveryStatus,
    destination: String,
    detail: String,
) -> DeliveryReceipt {
    DeliveryReceipt {
        notification_id: n.notification_id.clone(),
        subscriber_id: n.subscriber_id.clone(),
        kind: n.kind,
        channel: channel as i32,
        status: status as i32,
        attempt: 1,
        destination,
        detail,
        locale: n.locale.clone(),
        at: Some(now_timestamp()),
    }
}

impl<C: Channel> Processor for Notifier<C> {
    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        let notification: NotificationCommand =
            decode(input, |n: &NotificationCommand| &n.subscriber_id)?;
        SubscriberId::parse(&notification.subscriber_id)?;
        if notification.notification_id.is_empty() {
            return Err(Refusal::new("notification_id: is required"));
        }
        let key = notification.subscriber_id.as_str();
        if !self.first_time(&notification.notification_id) {
            count(&metrics::SUPPRESSED);
            let r = receipt(
                &notification,
                ChannelKind::Unspecified,
                DeliveryStatus::Suppressed,
                String::new(),
                "duplicate notification id".into(),
            );
            out.push(Output::message(topics::DELIVERIES, key, &r));
            return Ok(());
        }
        if notification.channels.is_empty() {
            count(&metrics::SUPPRESSED);
            let r = receipt(
                &notification,
                ChannelKind::Unspecified,
                DeliveryStatus::Suppressed,
                String::new(),
                "subscriber has no notification channel".into(),
            );
            out.push(Output::message(topics::DELIVERIES, key, &r));
            return Ok(());
        }
        let rendered = render(&notification);
        for channel in &notification.channels {
            let kind = ChannelKind::try_from(channel.kind).unwrap_or(ChannelKind::Unspecified);
            let masked = mask_contact(&channel.address);
            let delivery = Delivery {
                kind,
                address: &channel.address,
                masked: &masked,
                subscriber_id: key,
                locale: rendered.locale,
                text: &rendered.text,
            };
            let (status, detail) = match self.channel.deliver(&delivery).await {
                Ok(()) => {
                    count(&metrics::DELIVERED);
                    (DeliveryStatus::Delivered, String::new())
                }
                Err(error @ (ChannelError::Transient(_) | ChannelError::Permanent(_))) => {
                    count(&metrics::FAILED);
                    tracing::warn!(subscriber = key, destination = %masked, %error, "delivery failed");
                    (DeliveryStatus::Failed, error.to_string())
                }
            };
            let r = receipt(&notification, kind, status, masked.clone(), detail);
            out.push(Output::message(topics::DELIVERIES, key, &r));
        }
        Ok(())
    }
}
