//! Cards (credit and debit) through Stripe's PaymentIntents API: a saved payment method
//! charged off-session, the way Stripe documents merchant-initiated payments.
//!
//! ```text
//! POST {api}/v1/payment_intents
//! Authorization: Bearer <secret key>
//! Idempotency-Key: <the command's key for this method>
//! Stripe-Version: <STRIPE_API_VERSION>
//! Content-Type: application/x-www-form-urlencoded
//!
//! amount=5000&currency=cny&customer=cus_…&payment_method=pm_…&confirm=true
//! &off_session=true&payment_method_types[]=card&metadata[topup_key]=<key>
//! &metadata[command_id]=…&metadata[subscriber_id]=…
//! ```
//!
//! A method's token is `<customer>/<payment method>` (`cus_…/pm_…`), as saved when the
//! card was set up for future use. Debit cards are cards here: Stripe charges them the
//! same way (`card.funding = debit`), UnionPay cards included.
//!
//! How answers are read ([`classify`]):
//!
//! | answer | class |
//! |---|---|
//! | 200, `status: succeeded` | approved, the PaymentIntent id is the reference |
//! | 200, `processing`, `requires_capture`, `requires_confirmation` | unknown: settled by the status lookup |
//! | 200, `requires_action` / 402 `authentication_required` | refused: the cardholder must authenticate |
//! | 402 `card_error` (`card_declined` with its `decline_code`, `expired_card`, …) | refused, reason from the codes |
//! | 400 `idempotency_error`, 409 (key in use), 424, 5xx, timeout, lost answer | unknown |
//! | 400 other (`resource_missing`: no such customer or card) | refused |
//! | 401, 403, 404, 429, never connected | not processed: try again later |
//!
//! Stripe keeps an idempotency key's first answer (a 402 or a 500 as well) and replays it
//! to a request with the same key; it charges a key once. A decline is therefore final for
//! its key, and the next method is tried. The status lookup searches PaymentIntents by the
//! `topup_key` metadata ([`classify_search`]); finding none proves nothing (search results
//! lag by up to a minute), so the outcome stays unknown until a search finds the intent or
//! the deadline sends the top-up to reconciliation.
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use topup_proto::v1::{FailureReason, PaymentMethodKind};

use super::{send, ChargeOutcome, ChargeRequest, ChargeStatus, PaymentGateway};

/// The API version the requests are written for (`Stripe-Version`); stripe-mock's bundled
/// specification in the tests is this version.
pub const API_VERSION: &str = "2026-08-26.dahlia";

/// The metadata key holding our idempotency key, searched by the status lookup.
pub const KEY_METADATA: &str = "topup_key";

/// Where and how to reach Stripe.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `https://api.stripe.com`, or a test server.
    pub api_base: String,
    /// The secret (or restricted) key.
    pub secret_key: SecretString,
    /// Sent as `Stripe-Version`.
    pub api_version: String,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// The Stripe card connector. Clones share one connection pool.
#[derive(Debug, Clone)]
pub struct StripeCards {
    client: reqwest::Client,
    config: StripeConfig,
}

/// Part of a PaymentIntent this connector reads.
#[derive(Debug, Default, Deserialize)]
pub struct Intent {
    /// `pi_…`.
    #[serde(default)]
    pub id: String,
    /// `succeeded`, `processing`, `requires_payment_method`, …
    #[serde(default)]
    pub status: String,
    /// Ours, as sent.
    #[serde(default)]
    pub metadata: std::collections::HashMap<String, String>,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_payment_error: Option<StripeError>,
}

/// Stripe's error object.
#[derive(Debug, Default, Deserialize)]
pub struct StripeError {
    /// `card_error`, `invalid_request_error`, `idempotency_error`, `api_error`, …
    #[serde(default, rename = "type")]
    pub kind: String,
    /// `card_declined`, `expired_card`, `authentication_required`, …
    #[serde(default)]
    pub code: Option<String>,
    /// The issuer's reason, under `card_declined`: `insufficient_funds`, `lost_card`, …
    #[serde(default)]
    pub decline_code: Option<String>,
    /// For operators.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: StripeError,
}

#[derive(Debug, Default, Deserialize)]
struct SearchBody {
    #[serde(default)]
    data: Vec<Intent>,
}

impl StripeError {
    fn code(&self) -> &str {
        self.code.as_deref().unwrap_or_default()
    }

    fn decline_code(&self) -> &str {
        self.decline_code.as_deref().unwrap_or_default()
    }

    /// The refusal reason of these codes.
    fn reason(&self) -> FailureReason {
        let codes = [self.code(), self.decline_code()];
        if codes.contains(&"authentication_required") {
            FailureReason::AuthenticationRequired
        } else if codes.contains(&"expired_card") {
            FailureReason::CardExpired
        } else if codes.contains(&"insufficient_funds") {
            FailureReason::InsufficientFunds
        } else {
            FailureReason::Declined
        }
    }

    /// `code/decline_code: message`, at most 200 characters of the message.
    fn detail(&self, status: StatusCode) -> String {
        let mut codes = self.code().to_string();
        if !self.decline_code().is_empty() {
            codes = format!("{codes}/{}", self.decline_code());
        }
        let message: String =
            self.message.as_deref().unwrap_or_default().chars().take(200).collect();
        format!("stripe {status} {} {codes}: {message}", self.kind)
    }
}

/// What a PaymentIntent's status says of its charge; `None` while it is not settled.
fn settled(intent: &Intent) -> Option<Result<String, (FailureReason, String)>> {
    match intent.status.as_str() {
        "succeeded" if !intent.id.is_empty() => Some(Ok(intent.id.clone())),
        "requires_action" => Some(Err((
            FailureReason::AuthenticationRequired,
            format!("stripe {}: the cardholder must authenticate", intent.id),
        ))),
        "requires_payment_method" | "canceled" => {
            let error = intent.last_payment_error.as_ref();
            let reason = error.map_or(FailureReason::Declined, StripeError::reason);
            let detail = error.map_or_else(
                || format!("stripe {}: {}", intent.id, intent.status),
                |e| e.detail(StatusCode::OK),
            );
            Some(Err((reason, detail)))
        }
        _ => None,
    }
}

/// Reads Stripe's answer to a PaymentIntent creation. Every status and code the connector
/// understands is here.
pub fn classify(status: StatusCode, body: &[u8]) -> ChargeOutcome {
    if status.is_success() {
        let Ok(intent) = serde_json::from_slice::<Intent>(body) else {
            return ChargeOutcome::Unknown { detail: format!("stripe {status}: unreadable") };
        };
        return match settled(&intent) {
            Some(Ok(reference)) => ChargeOutcome::Approved { reference },
            Some(Err((reason, detail))) => ChargeOutcome::Refused { reason, detail },
            // processing, requires_capture, requires_confirmation: not settled yet.
            None => ChargeOutcome::Unknown {
                detail: format!("stripe {} is {}", intent.id, intent.status),
            },
        };
    }
    let error = serde_json::from_slice::<ErrorBody>(body).unwrap_or_default().error;
    let detail = error.detail(status);
    match status.as_u16() {
        // Declined: Stripe keeps this answer for the key, so the next method is tried.
        402 => ChargeOutcome::Refused { reason: error.reason(), detail },
        // Same key, other parameters: a request with this key exists and may have charged.
        400 if error.kind == "idempotency_error" => ChargeOutcome::Unknown { detail },
        // No such customer or payment method, or a request Stripe cannot take: nothing
        // moved, and sending it again cannot help.
        400 => ChargeOutcome::Refused { reason: FailureReason::Declined, detail },
        401 | 403 => {
            tracing::error!(%status, "Stripe refused the secret key: check STRIPE_SECRET_KEY_FILE");
            ChargeOutcome::Unavailable { detail }
        }
        // Rate limited, or the endpoint is not there: not processed.
        404 | 429 => ChargeOutcome::Unavailable { detail },
        // 409: a request with this key is being processed; 424 (a dependency outside
        // Stripe failed) and 5xx: the charge may or may not have happened.
        _ => ChargeOutcome::Unknown { detail },
    }
}

/// Reads the answer to the status lookup (a search by [`KEY_METADATA`]) for `key`.
pub fn classify_search(status: StatusCode, body: &[u8], key: &str) -> ChargeStatus {
    if !status.is_success() {
        let error = serde_json::from_slice::<ErrorBody>(body).unwrap_or_default().error;
        return ChargeStatus::Unknown { detail: error.detail(status) };
    }
    let Ok(found) = serde_json::from_slice::<SearchBody>(body) else {
        return ChargeStatus::Unknown { detail: format!("stripe search {status}: unreadable") };
    };
    let mine = found
        .data
        .iter()
        .filter(|intent| intent.metadata.get(KEY_METADATA).map(String::as_str) == Some(key));
    // Every intent of the key is looked at: an approval anywhere wins, then one still
    // pending, then a refusal.
    let (mut pending, mut refused) = (None, None);
    for intent in mine {
        match settled(intent) {
            Some(Ok(reference)) => return ChargeStatus::Approved { reference },
            Some(Err((reason, detail))) => refused = Some(ChargeStatus::Refused { reason, detail }),
            None => pending = Some(format!("stripe {} is {}", intent.id, intent.status)),
        }
    }
    match (pending, refused) {
        (Some(detail), _) => ChargeStatus::Unknown { detail },
        (None, Some(refusal)) => refusal,
        // Not found proves nothing: search results lag by up to a minute, and the search
        // is not offered everywhere. Only a definite answer settles the key, else
        // reconciliation does; the next method is never tried on an empty search.
        (None, None) => ChargeStatus::Unknown {
            detail: format!("no PaymentIntent with {KEY_METADATA} {key} found (yet)"),
        },
    }
}

/// The customer and payment method of a token `cus_…/pm_…`.
fn customer_and_method(token: &str) -> Option<(&str, &str)> {
    let (customer, method) = token.split_once('/')?;
    let plain =
        |id: &str| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (plain(customer) && plain(method)).then_some((customer, method))
}

impl StripeCards {
    /// A connector for `config`.
    pub fn new(config: StripeConfig) -> Result<Self, reqwest::Error> {
        let client = super::client(config.timeout)?;
        Ok(Self { client, config })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.api_base.trim_end_matches('/'))
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .bearer_auth(self.config.secret_key.expose_secret())
            .header("Stripe-Version", &self.config.api_version)
    }
}

/// The form of a charge.
pub fn charge_form(request: &ChargeRequest, customer: &str, method: &str) -> Vec<(String, String)> {
    let pairs = [
        ("amount", request.amount.minor.to_string()),
        ("currency", request.amount.currency.to_string().to_ascii_lowercase()),
        ("customer", customer.to_string()),
        ("payment_method", method.to_string()),
        ("payment_method_types[]", "card".to_string()),
        ("confirm", "true".to_string()),
        ("off_session", "true".to_string()),
        ("metadata[topup_key]", request.idempotency_key.clone()),
        ("metadata[command_id]", request.command_id.clone()),
        ("metadata[subscriber_id]", request.subscriber_id.clone()),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

impl PaymentGateway for StripeCards {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let Some((customer, method)) = customer_and_method(&request.token) else {
            return ChargeOutcome::Refused {
                reason: FailureReason::NoPaymentMethod,
                detail: "the token is not a Stripe customer/payment method pair (cus_…/pm_…)"
                    .into(),
            };
        };
        let request = self
            .authorised(self.client.post(self.url("/v1/payment_intents")))
            .header("Idempotency-Key", &request.idempotency_key)
            .form(&charge_form(request, customer, method));
        match send(request, "stripe").await {
            Ok((status, body)) => classify(status, &body),
            Err(unanswered) => unanswered.into(),
        }
    }

    async fn status(&self, idempotency_key: &str, _kind: PaymentMethodKind) -> ChargeStatus {
        // Quotes and backslashes are escaped in a search string (an operator's command id
        // could hold one).
        let quoted = idempotency_key.replace('\\', "\\\\").replace('\'', "\\'");
        let query = format!("metadata['{KEY_METADATA}']:'{quoted}'");
        let request = self
            .authorised(self.client.get(self.url("/v1/payment_intents/search")))
            .query(&[("query", query.as_str())]);
        match send(request, "stripe").await {
            Ok((status, body)) => classify_search(status, &body, idempotency_key),
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

    fn card_error(code: &str, decline: &str) -> String {
        format!(
            r#"{{"error":{{"type":"card_error","code":"{code}","decline_code":"{decline}","message":"m"}}}}"#
        )
    }

    #[test]
    fn answers_are_sorted_into_the_three_classes() {
        assert_eq!(
            outcome(200, r#"{"id":"pi_1","status":"succeeded"}"#),
            ChargeOutcome::Approved { reference: "pi_1".into() }
        );
        for (code, decline, reason) in [
            ("card_declined", "insufficient_funds", FailureReason::InsufficientFunds),
            ("card_declined", "generic_decline", FailureReason::Declined),
            ("card_declined", "lost_card", FailureReason::Declined),
            ("expired_card", "", FailureReason::CardExpired),
            (
                "authentication_required",
                "authentication_required",
                FailureReason::AuthenticationRequired,
            ),
            ("processing_error", "", FailureReason::Declined),
        ] {
            match outcome(402, &card_error(code, decline)) {
                ChargeOutcome::Refused { reason: got, detail } => {
                    assert_eq!(got, reason, "{code}/{decline}");
                    assert!(detail.contains(code), "{detail}");
                }
                other => panic!("{code}/{decline}: {other:?}"),
            }
        }
        assert!(matches!(
            outcome(200, r#"{"id":"pi_2","status":"requires_action"}"#),
            ChargeOutcome::Refused { reason: FailureReason::AuthenticationRequired, .. }
        ));
        for body in [r#"{"id":"pi_3","status":"processing"}"#, "<html>"] {
            assert!(matches!(outcome(200, body), ChargeOutcome::Unknown { .. }), "{body}");
        }
        assert!(matches!(
            outcome(400, r#"{"error":{"type":"idempotency_error"}}"#),
            ChargeOutcome::Unknown { .. }
        ));
        assert!(matches!(
            outcome(400, r#"{"error":{"type":"invalid_request_error","code":"resource_missing"}}"#),
            ChargeOutcome::Refused { reason: FailureReason::Declined, .. }
        ));
        for status in [401, 403, 404, 429] {
            assert!(matches!(outcome(status, "{}"), ChargeOutcome::Unavailable { .. }), "{status}");
        }
        for status in [409, 424, 500, 502, 503] {
            assert!(matches!(outcome(status, "{}"), ChargeOutcome::Unknown { .. }), "{status}");
        }
    }

    #[test]
    fn the_search_finds_only_the_intent_of_its_key() {
        let search = |body: &str| classify_search(StatusCode::OK, body.as_bytes(), "k1");
        let intent = |key: &str, status: &str| {
            format!(r#"{{"id":"pi_{key}","status":"{status}","metadata":{{"topup_key":"{key}"}}}}"#)
        };
        // None found proves nothing (the search lags): never "not found".
        assert!(matches!(search(r#"{"data":[]}"#), ChargeStatus::Unknown { .. }));
        // stripe-mock's fixture, or anybody else's intent, is not ours.
        assert!(matches!(
            search(&format!(r#"{{"data":[{}]}}"#, intent("k2", "succeeded"))),
            ChargeStatus::Unknown { .. }
        ));
        // An approval wins over an earlier refusal of the same key.
        assert_eq!(
            search(&format!(
                r#"{{"data":[{},{}]}}"#,
                intent("k1", "requires_payment_method"),
                intent("k1", "succeeded")
            )),
            ChargeStatus::Approved { reference: "pi_k1".into() }
        );
        assert_eq!(
            search(&format!(r#"{{"data":[{}]}}"#, intent("k1", "succeeded"))),
            ChargeStatus::Approved { reference: "pi_k1".into() }
        );
        assert!(matches!(
            search(&format!(r#"{{"data":[{}]}}"#, intent("k1", "processing"))),
            ChargeStatus::Unknown { .. }
        ));
        assert!(matches!(
            classify_search(StatusCode::INTERNAL_SERVER_ERROR, b"{}", "k1"),
            ChargeStatus::Unknown { .. }
        ));
    }

    #[test]
    fn tokens_are_a_customer_and_a_payment_method() {
        assert_eq!(customer_and_method("cus_1/pm_2"), Some(("cus_1", "pm_2")));
        for token in ["pm_2", "cus_1/", "/pm_2", "cus_1/pm 2", "cus'/pm_2"] {
            assert_eq!(customer_and_method(token), None, "{token}");
        }
    }
}
