//! The HTTP gateway client: one signed JSON request per charge attempt, to a payment
//! provider or to a bridge in front of one. The wire format (also in the README):
//!
//! ```text
//! POST {url}
//! Content-Type: application/json
//! Idempotency-Key: <the command's idempotency key, per payment method>
//! X-Topup-Timestamp: <unix seconds>
//! X-Topup-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
//!
//! {"idempotency_key":"topup-…","subscriber_id":"…",
//!  "amount":{"currency":"CNY","amount_minor":5000},
//!  "payment_method":{"token":"…","kind":"card"}}
//! ```
//!
//! The gateway answers `2xx {"status":"approved","reference":"…"}`, or a refusal
//! `402`/`422 {"status":"declined","code":"card_expired"|"insufficient_funds"|…,
//! "message":"…"}`. It must answer a repeated key with the first answer and never charge
//! it twice. How every other answer is read is decided in one place, [`classify`].
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use topup_proto::v1::{FailureReason, PaymentMethodKind};

use super::{ChargeOutcome, ChargeRequest, PaymentGateway};

/// Header carrying the signing time.
pub const TIMESTAMP_HEADER: &str = "x-topup-timestamp";
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-topup-signature";
/// Header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub use topup_domain::request_signature as signature;

/// The request body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChargeBody {
    /// Same as the `Idempotency-Key` header.
    pub idempotency_key: String,
    /// Whose top-up.
    pub subscriber_id: String,
    /// What to charge.
    pub amount: AmountBody,
    /// With what.
    pub payment_method: MethodBody,
}

/// An amount in minor units.
#[derive(Debug, Serialize, Deserialize)]
pub struct AmountBody {
    /// ISO 4217 code.
    pub currency: String,
    /// Minor units (fen, cents).
    pub amount_minor: i64,
}

/// A payment method as the gateway knows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MethodBody {
    /// The gateway's token.
    pub token: String,
    /// `card`, `debit_card`, `alipay`, `wechat_pay`, ...
    pub kind: String,
}

/// The response body (every field optional: gateways leave some out).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AnswerBody {
    /// `approved` or `declined`.
    #[serde(default)]
    pub status: String,
    /// The gateway's charge id, when approved.
    #[serde(default)]
    pub reference: String,
    /// Why it was declined: `card_expired`, `insufficient_funds`, ...
    #[serde(default)]
    pub code: String,
    /// For operators.
    #[serde(default)]
    pub message: String,
}

fn kind_name(kind: PaymentMethodKind) -> String {
    kind.as_str_name().trim_start_matches("PAYMENT_METHOD_KIND_").to_ascii_lowercase()
}

/// Reads a gateway answer: approved, refused for good, or worth another try with the same
/// key. Every status and code the client understands is here.
pub fn classify(status: StatusCode, body: &[u8]) -> ChargeOutcome {
    let answer: AnswerBody = serde_json::from_slice(body).unwrap_or_default();
    let detail = |what: &str| {
        let message: String = answer.message.chars().take(200).collect();
        format!("{what} ({status}{}{message})", if message.is_empty() { "" } else { ": " })
    };
    let refused = |reason| ChargeOutcome::Refused {
        reason,
        detail: detail(if answer.code.is_empty() { "declined" } else { &answer.code }),
    };
    let by_code = || match answer.code.as_str() {
        "card_expired" | "expired_card" | "expired" => FailureReason::CardExpired,
        "insufficient_funds" | "insufficient_balance" => FailureReason::InsufficientFunds,
        _ => FailureReason::Declined,
    };
    match status.as_u16() {
        200..=299 => match answer.status.as_str() {
            "approved" | "succeeded" if !answer.reference.is_empty() => {
                ChargeOutcome::Approved { reference: answer.reference.clone() }
            }
            "declined" | "refused" | "failed" => refused(by_code()),
            // Money may have moved but the answer is unreadable: asking again with the
            // same key is safe and gets a readable answer or the same charge.
            _ => ChargeOutcome::Transient { detail: detail("unreadable approval") },
        },
        402 | 422 => refused(by_code()),
        // Our request was malformed: sending it again cannot help.
        400 => refused(FailureReason::Declined),
        401 | 403 => {
            tracing::error!(%status, "the gateway refused our credentials: check the signing secret (PAYMENT_GATEWAY_SECRET)");
            ChargeOutcome::Transient { detail: detail("credentials refused") }
        }
        // 409: a request with this key is still being processed; 408/425/429: come back later.
        408 | 409 | 425 | 429 => ChargeOutcome::Transient { detail: detail("try again later") },
        500..=599 => ChargeOutcome::Transient { detail: detail("gateway error") },
        _ => ChargeOutcome::Transient { detail: detail("unexpected answer") },
    }
}

/// Where and how to reach the gateway.
#[derive(Debug, Clone)]
pub struct HttpGatewayConfig {
    /// The charge endpoint, e.g. `https://pay.example.com/v1/charges`.
    pub url: String,
    /// Signing secret shared with the gateway.
    pub secret: SecretString,
    /// Longest wait for one answer; a timeout is a transient failure.
    pub timeout: Duration,
}

/// The HTTP gateway client. Clones share one connection pool.
#[derive(Debug, Clone)]
pub struct HttpGateway {
    client: reqwest::Client,
    config: HttpGatewayConfig,
}

impl HttpGateway {
    /// A client for `config`.
    pub fn new(config: HttpGatewayConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("topup-payment-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, config })
    }
}

impl PaymentGateway for HttpGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let body = ChargeBody {
            idempotency_key: request.idempotency_key.clone(),
            subscriber_id: request.subscriber_id.clone(),
            amount: AmountBody {
                currency: request.amount.currency.to_string(),
                amount_minor: request.amount.minor,
            },
            payment_method: MethodBody {
                token: request.token.clone(),
                kind: kind_name(request.kind),
            },
        };
        let body = match serde_json::to_vec(&body) {
            Ok(body) => body,
            Err(e) => return ChargeOutcome::Transient { detail: format!("encoding: {e}") },
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signed = signature(self.config.secret.expose_secret().as_bytes(), timestamp, &body);
        let sent = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, &request.idempotency_key)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signed)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return ChargeOutcome::Transient {
                    detail: format!("no answer within {:?}", self.config.timeout),
                }
            }
            Err(e) => {
                return ChargeOutcome::Transient { detail: format!("gateway unreachable: {e}") }
            }
        };
        let status = response.status();
        match response.bytes().await {
            Ok(body) => classify(status, &body),
            Err(e) => ChargeOutcome::Transient { detail: format!("reading the answer: {e}") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: u16, body: &str) -> ChargeOutcome {
        classify(StatusCode::from_u16(status).unwrap(), body.as_bytes())
    }

    #[test]
    fn answers_are_sorted_into_approved_refused_and_transient() {
        assert_eq!(
            outcome(200, r#"{"status":"approved","reference":"ch_1"}"#),
            ChargeOutcome::Approved { reference: "ch_1".into() }
        );
        assert!(matches!(
            outcome(402, r#"{"status":"declined","code":"card_expired"}"#),
            ChargeOutcome::Refused { reason: FailureReason::CardExpired, .. }
        ));
        assert!(matches!(
            outcome(422, r#"{"code":"insufficient_funds"}"#),
            ChargeOutcome::Refused { reason: FailureReason::InsufficientFunds, .. }
        ));
        assert!(matches!(
            outcome(402, "not json"),
            ChargeOutcome::Refused { reason: FailureReason::Declined, .. }
        ));
        for status in [401, 404, 409, 429, 500, 503] {
            assert!(matches!(outcome(status, ""), ChargeOutcome::Transient { .. }), "{status}");
        }
        // An approval without a reference cannot be trusted; the same key is asked again.
        assert!(matches!(
            outcome(200, r#"{"status":"approved"}"#),
            ChargeOutcome::Transient { .. }
        ));
    }
}
