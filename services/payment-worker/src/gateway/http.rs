//! The HTTP gateway client: one signed JSON request per charge attempt, to a payment
//! provider or to a bridge in front of one. The wire format (also in docs/payment-worker.md):
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
//! it twice. `429` and `503` mean "not processed, come back later"; any other answer that
//! is not one of these, a timeout, or a connection lost after the request was written means
//! the charge may have happened (unknown).
//!
//! The status lookup, asked after an unknown outcome, signed the same way over the key:
//!
//! ```text
//! GET {url}/{idempotency key}
//! X-Topup-Timestamp: <unix seconds>
//! X-Topup-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<idempotency key>")>
//! ```
//!
//! answers `200` with the charge's answer as above (`approved` / `declined`), `404` when
//! the gateway never received the key or refused it before processing (it must then never
//! process it later), and `409` or `{"status":"pending"}` while it is still processing. How
//! every answer is read is decided in one place each: [`classify`] and [`classify_status`].
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use topup_proto::v1::{FailureReason, PaymentMethodKind};

use super::{send, ChargeOutcome, ChargeRequest, ChargeStatus, PaymentGateway};

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
    /// Which top-up (one per command; several keys when methods fall back).
    #[serde(default)]
    pub command_id: String,
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

/// The answer body's detail for operators, at most 200 characters of its message.
fn detail_of(answer: &AnswerBody, status: StatusCode, what: &str) -> String {
    let message: String = answer.message.chars().take(200).collect();
    format!("{what} ({status}{}{message})", if message.is_empty() { "" } else { ": " })
}

/// The refusal reason of a decline code.
fn reason_of(code: &str) -> FailureReason {
    match code {
        "card_expired" | "expired_card" | "expired" => FailureReason::CardExpired,
        "insufficient_funds" | "insufficient_balance" => FailureReason::InsufficientFunds,
        _ => FailureReason::Declined,
    }
}

fn refusal_detail(answer: &AnswerBody, status: StatusCode) -> String {
    detail_of(answer, status, if answer.code.is_empty() { "declined" } else { &answer.code })
}

/// Reads a gateway's answer to a charge: approved, refused for good, not processed (try
/// again later), or unknown (money may have moved). Every status and code the client
/// understands is here.
pub fn classify(status: StatusCode, body: &[u8]) -> ChargeOutcome {
    let answer: AnswerBody = serde_json::from_slice(body).unwrap_or_default();
    let detail = |what: &str| detail_of(&answer, status, what);
    let refused = || ChargeOutcome::Refused {
        reason: reason_of(&answer.code),
        detail: refusal_detail(&answer, status),
    };
    match status.as_u16() {
        200..=299 => match answer.status.as_str() {
            "approved" | "succeeded" if !answer.reference.is_empty() => {
                ChargeOutcome::Approved { reference: answer.reference.clone() }
            }
            "declined" | "refused" | "failed" => refused(),
            // The gateway accepted the request but the answer is unreadable: money may have
            // moved. The key is asked about (and sent again) until the answer is definite.
            _ => ChargeOutcome::Unknown { detail: detail("unreadable approval") },
        },
        402 | 422 => refused(),
        // Our request was malformed: nothing was charged, and sending it again cannot help.
        400 => ChargeOutcome::Refused {
            reason: FailureReason::Declined,
            detail: detail("request refused as malformed"),
        },
        401 | 403 => {
            tracing::error!(%status, "the gateway refused our credentials: check the signing secret (PAYMENT_GATEWAY_SECRET)");
            ChargeOutcome::Unavailable { detail: detail("credentials refused") }
        }
        // Not processed (the protocol's promise): come back later.
        404 | 405 | 429 | 503 => ChargeOutcome::Unavailable { detail: detail("try again later") },
        // 409: a request with this key is still being processed; 408, 5xx and anything else:
        // the charge may or may not have happened.
        409 => ChargeOutcome::Unknown { detail: detail("still processing") },
        _ => ChargeOutcome::Unknown { detail: detail("no definite answer") },
    }
}

/// Reads a gateway's answer to a status lookup.
pub fn classify_status(status: StatusCode, body: &[u8]) -> ChargeStatus {
    let answer: AnswerBody = serde_json::from_slice(body).unwrap_or_default();
    match status.as_u16() {
        200..=299 => match answer.status.as_str() {
            "approved" | "succeeded" if !answer.reference.is_empty() => {
                ChargeStatus::Approved { reference: answer.reference.clone() }
            }
            "declined" | "refused" | "failed" => ChargeStatus::Refused {
                reason: reason_of(&answer.code),
                detail: refusal_detail(&answer, status),
            },
            _ => ChargeStatus::Unknown { detail: detail_of(&answer, status, "pending") },
        },
        402 | 422 => ChargeStatus::Refused {
            reason: reason_of(&answer.code),
            detail: refusal_detail(&answer, status),
        },
        404 => ChargeStatus::NotFound,
        _ => ChargeStatus::Unknown { detail: detail_of(&answer, status, "lookup failed") },
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
        let client = super::client(config.timeout)?;
        Ok(Self { client, config })
    }
}

impl PaymentGateway for HttpGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let body = ChargeBody {
            idempotency_key: request.idempotency_key.clone(),
            subscriber_id: request.subscriber_id.clone(),
            command_id: request.command_id.clone(),
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
            Err(e) => return ChargeOutcome::Unavailable { detail: format!("encoding: {e}") },
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signed = signature(self.config.secret.expose_secret().as_bytes(), timestamp, &body);
        let request = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, &request.idempotency_key)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signed)
            .body(body);
        match send(request, "the gateway").await {
            Ok((status, body)) => classify(status, &body),
            Err(unanswered) => unanswered.into(),
        }
    }

    async fn status(&self, idempotency_key: &str, _kind: PaymentMethodKind) -> ChargeStatus {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signed = signature(
            self.config.secret.expose_secret().as_bytes(),
            timestamp,
            idempotency_key.as_bytes(),
        );
        let url = format!("{}/{idempotency_key}", self.config.url.trim_end_matches('/'));
        let request = self
            .client
            .get(url)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signed);
        match send(request, "the gateway's status lookup").await {
            Ok((status, body)) => classify_status(status, &body),
            Err(unanswered) => unanswered.into(),
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
    fn answers_are_sorted_into_approved_refused_and_unknown() {
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
        for status in [401, 404, 429, 503] {
            assert!(matches!(outcome(status, ""), ChargeOutcome::Unavailable { .. }), "{status}");
        }
        for status in [408, 409, 500, 502, 504, 302] {
            assert!(matches!(outcome(status, ""), ChargeOutcome::Unknown { .. }), "{status}");
        }
        // An approval without a reference cannot be trusted; the same key is asked again.
        assert!(matches!(outcome(200, r#"{"status":"approved"}"#), ChargeOutcome::Unknown { .. }));
        assert!(matches!(outcome(200, "<html>"), ChargeOutcome::Unknown { .. }));
    }

    #[test]
    fn status_answers_are_sorted() {
        let status = |code: u16, body: &str| {
            classify_status(StatusCode::from_u16(code).unwrap(), body.as_bytes())
        };
        assert_eq!(
            status(200, r#"{"status":"approved","reference":"ch_1"}"#),
            ChargeStatus::Approved { reference: "ch_1".into() }
        );
        assert!(matches!(
            status(200, r#"{"status":"declined","code":"insufficient_funds"}"#),
            ChargeStatus::Refused { reason: FailureReason::InsufficientFunds, .. }
        ));
        assert_eq!(status(404, ""), ChargeStatus::NotFound);
        for (code, body) in [(409, ""), (200, r#"{"status":"pending"}"#), (500, ""), (401, "")] {
            assert!(matches!(status(code, body), ChargeStatus::Unknown { .. }), "{code} {body}");
        }
    }
}
