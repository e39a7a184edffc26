//! Notification channels behind one trait; one file per implementation. [`Channels`]
//! routes each delivery to the implementation configured for its kind (e-mail → SMTP,
//! SMS and push → their webhooks); a kind with nothing configured goes to the console,
//! unless [`Channels::without_console`] has made it a permanent failure.
mod console;
mod smtp;
mod webhook;

use std::future::Future;

pub use console::Console;
pub use smtp::{Smtp, SmtpConfig, SmtpTls};
use topup_proto::v1::{ChannelKind, NotificationKind};
pub use webhook::{Webhook, WebhookBody, WebhookConfig};

/// A message ready to go out on one channel.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// The notification's id; with the channel, the receiver's idempotency key.
    pub notification_id: &'a str,
    /// What it is about.
    pub notification: NotificationKind,
    /// SMS, e-mail, push, console.
    pub kind: ChannelKind,
    /// Unmasked contact (phone, e-mail, push token); never logged as is.
    pub address: &'a str,
    /// Masked contact, for logs and receipts.
    pub masked: &'a str,
    /// Whose.
    pub subscriber_id: &'a str,
    /// Locale of the text.
    pub locale: &'a str,
    /// E-mail subject / push title.
    pub subject: &'a str,
    /// The text.
    pub text: &'a str,
    /// Ignores quiet hours (a failed top-up).
    pub urgent: bool,
}

/// Why a delivery failed, sorted once into what a retry may fix and what it cannot.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// May work if tried again (timeout, 4xx SMTP reply, HTTP 5xx or 429).
    #[error("temporary failure: {0}")]
    Transient(String),
    /// Will not work for this address (5xx SMTP reply, HTTP 4xx, invalid address).
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// Something that delivers messages.
pub trait Channel: Send + Sync + 'static {
    /// Delivers one message.
    fn deliver(
        &self,
        delivery: &Delivery<'_>,
    ) -> impl Future<Output = Result<(), ChannelError>> + Send;
}

/// The channels a notifier delivers on, by kind.
#[derive(Debug, Clone, Default)]
pub struct Channels {
    /// E-mail; the console when `None`.
    pub email: Option<Smtp>,
    /// SMS; the console when `None`.
    pub sms: Option<Webhook>,
    /// Push; the console when `None`.
    pub push: Option<Webhook>,
}

impl Channels {
    /// Every kind on the console (the embedded default).
    pub fn console() -> Self {
        Self::default()
    }

    /// Whether `kind` has a provider of its own (the console is none: it only prints).
    pub fn provides(&self, kind: ChannelKind) -> bool {
        match kind {
            ChannelKind::Email => self.email.is_some(),
            ChannelKind::Sms => self.sms.is_some(),
            ChannelKind::Push => self.push.is_some(),
            ChannelKind::Console | ChannelKind::Unspecified => false,
        }
    }

    /// These channels with nothing printed: a delivery of a kind without a provider fails
    /// for good instead of going to standard output (the standalone notifier's unless
    /// `NOTIFIER_PRINT_UNCONFIGURED` is set).
    pub fn without_console(self) -> NoConsole {
        NoConsole(self)
    }

    /// One line per kind saying where it goes, for the startup log.
    pub fn describe(&self) -> String {
        format!(
            "e-mail: {}, SMS: {}, push: {}",
            self.email.as_ref().map_or("console".to_string(), Smtp::describe),
            self.sms.as_ref().map_or("console".to_string(), Webhook::describe),
            self.push.as_ref().map_or("console".to_string(), Webhook::describe),
        )
    }
}

impl Channel for Channels {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        match delivery.kind {
            ChannelKind::Email if self.email.is_some() => {
                if let Some(smtp) = &self.email {
                    return smtp.deliver(delivery).await;
                }
            }
            ChannelKind::Sms if self.sms.is_some() => {
                if let Some(sms) = &self.sms {
                    return sms.deliver(delivery).await;
                }
            }
            ChannelKind::Push if self.push.is_some() => {
                if let Some(push) = &self.push {
                    return push.deliver(delivery).await;
                }
            }
            _ => {}
        }
        Console.deliver(delivery).await
    }
}

/// [`Channels`] that never print: what has no provider is refused as a permanent failure,
/// so its receipt says why and, when no channel of the notification got through, the
/// `UNDELIVERABLE` receipt raises the alert — the message is never left in a log.
#[derive(Debug, Clone)]
pub struct NoConsole(Channels);

impl Channel for NoConsole {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        if !self.0.provides(delivery.kind) {
            let kind = delivery.kind.as_str_name().trim_start_matches("CHANNEL_KIND_");
            return Err(ChannelError::Permanent(format!(
                "no provider for {} here and printing is off (NOTIFIER_PRINT_UNCONFIGURED)",
                kind.to_lowercase()
            )));
        }
        self.0.deliver(delivery).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(kind: ChannelKind) -> Delivery<'static> {
        Delivery {
            notification_id: "n-1",
            notification: NotificationKind::ConfirmationCode,
            kind,
            address: "",
            masked: "",
            subscriber_id: "sub-1",
            locale: "en",
            subject: "Your code",
            text: "Your auto top-up confirmation code is 994409.",
            urgent: true,
        }
    }

    #[tokio::test]
    async fn without_the_console_a_kind_without_provider_fails_for_good_instead_of_printing() {
        let channels = Channels::console().without_console();
        let kinds = [ChannelKind::Console, ChannelKind::Sms, ChannelKind::Email, ChannelKind::Push];
        for kind in kinds {
            let refused = channels.deliver(&delivery(kind)).await;
            assert!(matches!(refused, Err(ChannelError::Permanent(_))), "{kind:?}: {refused:?}");
        }
    }
}
