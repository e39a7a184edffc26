//! Notification channels behind one trait; one file per implementation.
mod console;

use std::future::Future;

pub use console::Console;
use topup_proto::v1::ChannelKind;

/// A message ready to go out.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
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
    /// The text.
    pub text: &'a str,
}

/// Why a delivery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// May work if tried again.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// Will not work for this address.
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
