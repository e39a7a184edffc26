//! The console channel: prints the message on standard output, one readable line each.
use std::io::Write;

use super::{Channel, ChannelError, Delivery};

/// Prints notifications to stdout.
#[derive(Debug, Clone, Default)]
pub struct Console;

impl Channel for Console {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        let line = format!(
            "  ✉ {} [{} {}] {}\n",
            delivery.subscriber_id,
            delivery.kind.as_str_name().trim_start_matches("CHANNEL_KIND_").to_lowercase(),
            delivery.masked,
            delivery.text
        );
        std::io::stdout()
            .lock()
            .write_all(line.as_bytes())
            .map_err(|e| ChannelError::Transient(e.to_string()))
    }
}
