//! SMS and push over an HTTP webhook (a provider's API or a bridge to one). One signed JSON
//! request per message, like the payment gateway's:
//!
//! ```text
//! POST {url}
//! Idempotency-Key: <notification_id>:<channel>
//! X-Topup-Timestamp: <unix seconds>
//! X-Topup-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
//!
//! {"notification_id":"…","subscriber_id":"…","channel":"sms","to":"+86 13812345678",
//!  "locale":"zh-CN","kind":"top_up_failed","title":"…","text":"…","urgent":true}
//! ```
//!
//! 2xx is delivered; 408, 425, 429 and 5xx (and timeouts) are worth a retry; any other
//! answer is permanent for this address.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use topup_domain::request_signature;

use super::{Channel, ChannelError, Delivery};

/// The request body.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookBody {
    /// Unique per notification; with `channel`, the idempotency key.
    pub notification_id: String,
    /// Whose.
    pub subscriber_id: String,
    /// `sms` or `push`.
    pub channel: String,
    /// Phone number or push token.
    pub to: String,
    /// Locale of the text.
    pub locale: String,
    /// `low_balance`, `top_up_failed`, ...
    pub kind: String,
    /// Push title (the e-mail subject's text).
    pub title: String,
    /// The message.
    pub text: String,
    /// Should bypass do-not-disturb where the provider can.
    pub urgent: bool,
}

/// Where to post and how to sign.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Endpoint.
    pub url: String,
    /// Signing secret shared with the receiver.
    pub secret: SecretString,
    /// Longest wait for an answer.
    pub timeout: Duration,
}

/// A webhook channel. Clones share the connection pool.
#[derive(Debug, Clone)]
pub struct Webhook {
    client: reqwest::Client,
    config: WebhookConfig,
}

impl Webhook {
    /// A channel posting to `config.url`.
    pub fn new(config: WebhookConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("topup-notifier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, config })
    }

    /// Where it posts, for logs: the URL's scheme, host and port only. Its path, query and
    /// user part are left out, for a provider's token is often put there.
    pub fn describe(&self) -> String {
        let origin = match reqwest::Url::parse(&self.config.url) {
            Ok(url) => {
                let rest = if url.path().len() > 1 || url.query().is_some() { "/…" } else { "" };
                format!("{}{rest}", url.origin().ascii_serialization())
            }
            Err(_) => "(an unparsable URL)".to_string(),
        };
        format!("webhook {origin}")
    }
}

fn lower_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

impl Channel for Webhook {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        let channel = lower_name(delivery.kind.as_str_name(), "CHANNEL_KIND_");
        let body = WebhookBody {
            notification_id: delivery.notification_id.to_string(),
            subscriber_id: delivery.subscriber_id.to_string(),
            channel: channel.clone(),
            to: delivery.address.to_string(),
            locale: delivery.locale.to_string(),
            kind: lower_name(delivery.notification.as_str_name(), "NOTIFICATION_KIND_"),
            title: delivery.subject.to_string(),
            text: delivery.text.to_string(),
            urgent: delivery.urgent,
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| ChannelError::Permanent(format!("encoding: {e}")))?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature =
            request_signature(self.config.secret.expose_secret().as_bytes(), timestamp, &body);
        let sent = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", format!("{}:{channel}", delivery.notification_id))
            .header("x-topup-timestamp", timestamp.to_string())
            .header("x-topup-signature", signature)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(ChannelError::Transient(format!(
                    "no answer within {:?}",
                    self.config.timeout
                )))
            }
            Err(e) => return Err(ChannelError::Transient(format!("unreachable: {e}"))),
        };
        let status = response.status();
        match status.as_u16() {
            200..=299 => Ok(()),
            408 | 425 | 429 | 500..=599 => {
                Err(ChannelError::Transient(format!("{channel} webhook answered {status}")))
            }
            _ => Err(ChannelError::Permanent(format!("{channel} webhook answered {status}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_shows_where_a_webhook_posts_but_not_a_token_in_its_url() {
        let webhook = |url: &str| {
            Webhook::new(WebhookConfig {
                url: url.to_string(),
                secret: "s".to_string().into(),
                timeout: Duration::from_secs(1),
            })
            .map(|w| w.describe())
        };
        let described =
            webhook("https://user:hunter2@sms.example.com:8443/send/hunter2?key=hunter2").unwrap();
        assert_eq!(described, "webhook https://sms.example.com:8443/…");
        assert_eq!(webhook("http://127.0.0.1:9000").unwrap(), "webhook http://127.0.0.1:9000");
    }
}
