//! A message to a subscriber, as a service decides it: what kind, about what, to which
//! route. [`Notice::build`] is the one place a `NotificationCommand` is assembled, and the
//! notification id is always derived from (subscriber, what it is about, kind), so that a
//! replay produces the same id and the notifier drops the second one.
use std::collections::HashMap;

use topup_proto::v1::{NotificationChannel, NotificationCommand, NotificationKind};
use topup_proto::Timestamp;

use crate::{notification_id, Money, SubscriberId};

/// A notification being put together; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    kind: NotificationKind,
    subscriber: SubscriberId,
    about: String,
    at: Timestamp,
    locale: String,
    channels: Vec<NotificationChannel>,
    urgent: bool,
    command_id: String,
    amount: Option<Money>,
    balance: Option<Money>,
    threshold: Option<Money>,
    parameters: HashMap<String, String>,
}

impl Notice {
    /// A `kind` notice to `subscriber` about `about` (a command id, the record that caused
    /// it, ...), decided at `at`; in English and on no channel until [`Notice::to`] says.
    pub fn new(
        kind: NotificationKind,
        subscriber: &SubscriberId,
        about: &str,
        at: Timestamp,
    ) -> Self {
        Self {
            kind,
            subscriber: subscriber.clone(),
            about: about.to_string(),
            at,
            locale: "en".into(),
            channels: Vec::new(),
            urgent: false,
            command_id: String::new(),
            amount: None,
            balance: None,
            threshold: None,
            parameters: HashMap::new(),
        }
    }

    /// In `locale`, on `channels` (the rule's or the command's).
    pub fn to(mut self, locale: &str, channels: &[NotificationChannel]) -> Self {
        self.locale = locale.to_string();
        self.channels = channels.to_vec();
        self
    }

    /// Sent whatever the hour and never rate-limited.
    pub fn urgent(mut self, urgent: bool) -> Self {
        self.urgent = urgent;
        self
    }

    /// About the top-up `command_id`.
    pub fn command(mut self, command_id: &str) -> Self {
        self.command_id = command_id.to_string();
        self
    }

    /// The top-up's amount.
    pub fn amount(mut self, amount: Option<Money>) -> Self {
        self.amount = amount;
        self
    }

    /// The subscriber's balance.
    pub fn balance(mut self, balance: Option<Money>) -> Self {
        self.balance = balance;
        self
    }

    /// The rule's threshold (or the reminder level).
    pub fn threshold(mut self, threshold: Option<Money>) -> Self {
        self.threshold = threshold;
        self
    }

    /// A template parameter.
    pub fn parameter(mut self, name: &str, value: impl Into<String>) -> Self {
        self.parameters.insert(name.to_string(), value.into());
        self
    }

    /// The wire message.
    pub fn build(self) -> NotificationCommand {
        NotificationCommand {
            notification_id: notification_id(
                &self.subscriber,
                &self.about,
                self.kind.as_str_name(),
            ),
            subscriber_id: self.subscriber.to_string(),
            kind: self.kind as i32,
            locale: self.locale,
            channels: self.channels,
            parameters: self.parameters,
            urgent: self.urgent,
            created_at: Some(self.at),
            command_id: self.command_id,
            amount: self.amount.map(Money::to_wire),
            balance: self.balance.map(Money::to_wire),
            threshold: self.threshold.map(Money::to_wire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Currency;

    #[test]
    fn a_notice_becomes_the_same_command_every_time() {
        let subscriber = SubscriberId::parse("sub-1").unwrap();
        let at = Timestamp { seconds: 1_764_000_000, nanos: 0 };
        let cny = Currency::parse("CNY").unwrap();
        let notice = Notice::new(NotificationKind::TopUpFailed, &subscriber, "cmd-1", at)
            .to("zh-CN", &[])
            .urgent(true)
            .command("cmd-1")
            .amount(Some(Money::new(cny, 5000)))
            .parameter("reason", "declined");
        let (a, b) = (notice.clone().build(), notice.build());
        assert_eq!(a, b);
        assert_eq!(
            a.notification_id,
            notification_id(&subscriber, "cmd-1", "NOTIFICATION_KIND_TOP_UP_FAILED")
        );
        assert_eq!(
            (a.locale.as_str(), a.urgent, a.kind),
            ("zh-CN", true, NotificationKind::TopUpFailed as i32)
        );
        assert_eq!(a.amount.map(|m| m.amount_minor), Some(5000));
        assert_eq!(a.parameters.get("reason").map(String::as_str), Some("declined"));
    }
}
