//! Alipay agreement deduction (商家扣款): `alipay.trade.pay` with the subscriber's signed
//! agreement (`agreement_params.agreement_no`, product `GENERAL_WITHHOLDING`), through the
//! open platform gateway, RSA2-signed both ways.
//!
//! ```text
//! POST {gateway}            (https://openapi.alipay.com/gateway.do)
//! Content-Type: application/x-www-form-urlencoded;charset=utf-8
//!
//! app_id=…&method=alipay.trade.pay&format=JSON&charset=utf-8&sign_type=RSA2
//! &timestamp=2026-12-03 18:00:00&version=1.0&biz_content={"out_trade_no":"t…",
//! "total_amount":"50.00","subject":"…","product_code":"GENERAL_WITHHOLDING",
//! "agreement_params":{"agreement_no":"…"}}&sign=…
//! ```
//!
//! - **Our signature** ([`sign_content`]): every parameter but `sign` (empty ones left
//!   out), sorted by name, joined as `k=v&…` with raw values; SHA256withRSA with the
//!   merchant's private key, base64. The timestamp is Beijing time.
//! - **Alipay's signature** on the answer: over the exact text of the
//!   `alipay_trade_pay_response` value ([`response_part`]), checked with Alipay's public
//!   key. An answer whose signature does not verify is not believed: the outcome is unknown
//!   and the status query (also verified) decides.
//! - **`out_trade_no`** is derived from the idempotency key ([`out_trade_no`]): Alipay
//!   takes at most 64 letters, digits and `_`, and never pays one twice.
//!
//! How answers are read ([`classify`]): `10000` approved; `10003`, `20000`,
//! `ACQ.SYSTEM_ERROR`, `ACQ.TRADE_HAS_SUCCESS` unknown (the query settles them);
//! `ACQ.BUYER_BALANCE_NOT_ENOUGH` and the bank-card one: insufficient funds; the agreement
//! gone (`ACQ.AGREEMENT_NOT_EXIST`, `…_INVALID`, `…_STATUS_NOT_NORMAL`): agreement ended;
//! the agreement's limits (`ACQ.CYCLE_PAY_*_EXCEED`): limit exceeded; the definite
//! declines of [`DECLINES`]: declined; any other `40004` (`ACQ.CONTEXT_INCONSISTENT`, a
//! trade under this number with other content): unknown; `40001`/`40002`/`40006` (our request or our credentials), signed: not
//! processed. An answer without Alipay's signature (Alipay sends a bad-signature refusal so)
//! or with one that does not verify proves nothing: unknown.
use std::time::Duration;

use base64::Engine as _;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use topup_proto::v1::{FailureReason, PaymentMethodKind};

use super::{send, ChargeOutcome, ChargeRequest, ChargeStatus, PaymentGateway, Unanswered};

/// The one currency Alipay deducts in here.
const CNY: &str = "CNY";

/// Where and how to reach Alipay.
#[derive(Debug, Clone)]
pub struct AlipayConfig {
    /// `https://openapi.alipay.com/gateway.do`, or a test server.
    pub gateway_url: String,
    /// The merchant application's id.
    pub app_id: String,
    /// The application's private key (PEM, PKCS#1 or PKCS#8, or the bare base64 Alipay's
    /// key tool writes).
    pub private_key: RsaPrivateKey,
    /// Alipay's public key, which signs its answers.
    pub alipay_public_key: RsaPublicKey,
    /// Shown to the subscriber on the Alipay bill.
    pub subject: String,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// The DER inside a PEM text or a bare base64 body (any line width).
fn der_of(text: &str) -> Option<Vec<u8>> {
    let body: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("-----"))
        .flat_map(|line| line.split_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Reads a key the way Alipay's tools and SDKs hand them out: PEM or its bare base64 body,
/// PKCS#8 or PKCS#1.
pub fn private_key(text: &str) -> Result<RsaPrivateKey, String> {
    let der = der_of(text).ok_or("a private key must be PEM or base64")?;
    RsaPrivateKey::from_pkcs8_der(&der)
        .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
        .map_err(|_| "not an RSA private key (PEM PKCS#1 or PKCS#8, or its base64 body)".into())
}

/// Reads Alipay's public key: PEM or its bare base64 body, SubjectPublicKeyInfo or PKCS#1.
pub fn public_key(text: &str) -> Result<RsaPublicKey, String> {
    let der = der_of(text).ok_or("a public key must be PEM or base64")?;
    RsaPublicKey::from_public_key_der(&der)
        .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
        .map_err(|_| "not an RSA public key (PEM, or its base64 body)".into())
}

/// The string Alipay signs: parameters but `sign`, non-empty, sorted, `k=v` joined by `&`.
pub fn sign_content(params: &[(String, String)]) -> String {
    let mut kept: Vec<&(String, String)> =
        params.iter().filter(|(k, v)| k != "sign" && !v.is_empty()).collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    kept.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// SHA256withRSA, base64.
pub fn rsa2_sign(key: &RsaPrivateKey, content: &str) -> String {
    let signature = SigningKey::<Sha256>::new(key.clone()).sign(content.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
}

/// Whether `signature` (base64) is `key`'s SHA256withRSA over `content`.
pub fn rsa2_verify(key: &RsaPublicKey, content: &str, signature: &str) -> bool {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let Ok(signature) = Signature::try_from(bytes.as_slice()) else { return false };
    VerifyingKey::<Sha256>::new(key.clone()).verify(content.as_bytes(), &signature).is_ok()
}

/// The raw text of `"<name>":{…}` in an answer, and its `sign`: the signed part is the
/// object exactly as sent, so it is cut out of the text, not re-serialised.
pub fn response_part<'a>(body: &'a str, name: &str) -> Option<(&'a str, Option<String>)> {
    let start = body.find(&format!("\"{name}\""))? + name.len() + 2;
    let rest = body[start..].trim_start().strip_prefix(':')?.trim_start();
    let offset = body.len() - rest.len();
    // The object ends where its braces balance (strings may hold braces).
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut end = None;
    for (i, c) in rest.char_indices() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '{') => depth += 1,
            (false, _, '}') => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    end = Some(i + 1);
                    break;
                }
            }
            _ => {}
        }
    }
    let part = &body[offset..offset + end?];
    let sign = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("sign").and_then(Value::as_str).map(str::to_string));
    Some((part, sign))
}

/// Alipay's order number for our idempotency key: `t` and 32 hex digits of its SHA-256.
pub fn out_trade_no(idempotency_key: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    format!("t{}", hex::encode(&digest[..16]))
}

/// The Alipay connector. Clones share one connection pool.
#[derive(Debug, Clone)]
pub struct AlipayAgreements {
    client: reqwest::Client,
    config: std::sync::Arc<AlipayConfig>,
}

/// What one verified answer said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `10000`, `40004`, …
    pub code: String,
    /// `ACQ.…`
    pub sub_code: String,
    /// For operators.
    pub sub_msg: String,
    /// Alipay's trade number.
    pub trade_no: String,
    /// For queries: `TRADE_SUCCESS`, `WAIT_BUYER_PAY`, …
    pub trade_status: String,
}

impl Answer {
    fn of(part: &Value) -> Self {
        let text = |name: &str| part.get(name).and_then(Value::as_str).unwrap_or_default();
        Self {
            code: text("code").into(),
            sub_code: text("sub_code").into(),
            sub_msg: text("sub_msg").chars().take(200).collect(),
            trade_no: text("trade_no").into(),
            trade_status: text("trade_status").into(),
        }
    }

    fn detail(&self) -> String {
        format!("alipay {} {}: {}", self.code, self.sub_code, self.sub_msg)
    }
}

/// Business failures of `alipay.trade.pay` that are definite: nothing was paid under the
/// order number, and another method may be tried.
const DECLINES: &[&str] = &[
    "ACQ.TRADE_HAS_CLOSE",
    "ACQ.BUYER_ENABLE_STATUS_FORBID",
    "ACQ.BUYER_SELLER_EQUAL",
    "ACQ.PAYMENT_REQUEST_HAS_RISK",
    "ACQ.NO_PAYMENT_INSTRUMENTS_AVAILABLE",
    "ACQ.BEYOND_PAY_RESTRICTION",
    "ACQ.BEYOND_PER_RECEIPT_RESTRICTION",
    "ACQ.ERROR_BALANCE_PAYMENT_DISABLE",
    "ACQ.PAYMENT_FAIL",
];

/// Reads a verified answer to `alipay.trade.pay`.
pub fn classify(answer: &Answer) -> ChargeOutcome {
    let detail = answer.detail();
    let refused = |reason| ChargeOutcome::Refused { reason, detail: detail.clone() };
    match (answer.code.as_str(), answer.sub_code.as_str()) {
        ("10000", _) if !answer.trade_no.is_empty() => {
            ChargeOutcome::Approved { reference: answer.trade_no.clone() }
        }
        // Waiting for the payer, the service unsure, or paid before under this number:
        // the query says which.
        ("10000" | "10003" | "20000", _) => ChargeOutcome::Unknown { detail },
        ("40004", "ACQ.SYSTEM_ERROR" | "ACQ.TRADE_HAS_SUCCESS") => {
            ChargeOutcome::Unknown { detail }
        }
        ("40004", "ACQ.BUYER_BALANCE_NOT_ENOUGH" | "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH") => {
            refused(FailureReason::InsufficientFunds)
        }
        (
            "40004",
            "ACQ.AGREEMENT_NOT_EXIST" | "ACQ.AGREEMENT_INVALID" | "ACQ.AGREEMENT_STATUS_NOT_NORMAL",
        ) => refused(FailureReason::AgreementEnded),
        ("40004", code) if code.starts_with("ACQ.CYCLE_PAY_") && code.ends_with("_EXCEED") => {
            refused(FailureReason::LimitExceeded)
        }
        ("40004", code) if DECLINES.contains(&code) => refused(FailureReason::Declined),
        // Any other business failure may concern a trade that exists under this number
        // (`ACQ.CONTEXT_INCONSISTENT`, say): unknown, the query decides.
        // Missing or invalid parameters (a bad signature among them), no permission:
        // nothing was processed.
        ("40001" | "40002" | "40006", _) => {
            tracing::error!(%detail, "Alipay refused the request itself: check ALIPAY_APP_ID and the keys");
            ChargeOutcome::Unavailable { detail }
        }
        _ => ChargeOutcome::Unknown { detail },
    }
}

/// Reads a verified answer to `alipay.trade.query`.
pub fn classify_query(answer: &Answer) -> ChargeStatus {
    match (answer.code.as_str(), answer.sub_code.as_str(), answer.trade_status.as_str()) {
        ("10000", _, "TRADE_SUCCESS" | "TRADE_FINISHED") if !answer.trade_no.is_empty() => {
            ChargeStatus::Approved { reference: answer.trade_no.clone() }
        }
        ("10000", _, "TRADE_CLOSED") => {
            ChargeStatus::Refused { reason: FailureReason::Declined, detail: answer.detail() }
        }
        ("40004", "ACQ.TRADE_NOT_EXIST", _) => ChargeStatus::NotFound,
        _ => ChargeStatus::Unknown { detail: answer.detail() },
    }
}

impl AlipayAgreements {
    /// A connector for `config`.
    pub fn new(config: AlipayConfig) -> Result<Self, reqwest::Error> {
        let client = super::client(config.timeout)?;
        Ok(Self { client, config: std::sync::Arc::new(config) })
    }

    /// The signed parameters of a call to `method` with `biz_content`.
    pub fn signed_params(&self, method: &str, biz_content: &Value) -> Vec<(String, String)> {
        let now = chrono::Utc::now().with_timezone(&chrono_tz::Asia::Shanghai);
        let mut params: Vec<(String, String)> = [
            ("app_id", self.config.app_id.clone()),
            ("method", method.to_string()),
            ("format", "JSON".to_string()),
            ("charset", "utf-8".to_string()),
            ("sign_type", "RSA2".to_string()),
            ("timestamp", now.format("%Y-%m-%d %H:%M:%S").to_string()),
            ("version", "1.0".to_string()),
            ("biz_content", biz_content.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let sign = rsa2_sign(&self.config.private_key, &sign_content(&params));
        params.push(("sign".into(), sign));
        params
    }

    /// Calls `method`; the answer only if Alipay's signature on it verifies.
    async fn call(&self, method: &str, biz_content: &Value) -> Result<Answer, Unanswered> {
        let params = self.signed_params(method, biz_content);
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
        let request = self
            .client
            .post(&self.config.gateway_url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(body);
        let (status, body) = send(request, "alipay").await?;
        let body = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(Unanswered::Lost(format!("alipay http {status}")));
        }
        let name = format!("{}_response", method.replace('.', "_"));
        let Some((part, Some(sign))) = response_part(&body, &name) else {
            // Alipay leaves the signature off when it refused us before it trusted the
            // request (our signature, an unknown app). Unsigned, it proves nothing: the
            // outcome stays unknown (never "not processed", which would let the next
            // method be charged), and the status query, signed, decides.
            let unsigned = response_part(&body, &name)
                .or_else(|| response_part(&body, "error_response"))
                .and_then(|(part, _)| serde_json::from_str::<Value>(part).ok())
                .map(|part| Answer::of(&part).detail())
                .unwrap_or_default();
            tracing::error!(method, answer = %unsigned, "an unsigned answer from Alipay: check ALIPAY_APP_ID and ALIPAY_PRIVATE_KEY_FILE");
            return Err(Unanswered::Lost(format!("an unsigned answer from alipay: {unsigned}")));
        };
        if !rsa2_verify(&self.config.alipay_public_key, part, &sign) {
            tracing::error!(method, "Alipay's signature on an answer does not verify: not believed (check ALIPAY_PUBLIC_KEY_FILE)");
            return Err(Unanswered::Lost(
                "alipay answer with a signature that does not verify".into(),
            ));
        }
        match serde_json::from_str::<Value>(part) {
            Ok(value) => Ok(Answer::of(&value)),
            Err(e) => Err(Unanswered::Lost(format!("alipay answer unreadable: {e}"))),
        }
    }
}

impl PaymentGateway for AlipayAgreements {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        if request.amount.currency.to_string() != CNY {
            return ChargeOutcome::Refused {
                reason: FailureReason::CurrencyMismatch,
                detail: format!("alipay deducts CNY, not {}", request.amount.currency),
            };
        }
        let biz = json!({
            "out_trade_no": out_trade_no(&request.idempotency_key),
            "total_amount": request.amount.decimal(),
            "subject": self.config.subject,
            "product_code": "GENERAL_WITHHOLDING",
            "agreement_params": {"agreement_no": request.token},
        });
        match self.call("alipay.trade.pay", &biz).await {
            Ok(answer) => classify(&answer),
            Err(unanswered) => unanswered.into(),
        }
    }

    async fn status(&self, idempotency_key: &str, _kind: PaymentMethodKind) -> ChargeStatus {
        let biz = json!({"out_trade_no": out_trade_no(idempotency_key)});
        match self.call("alipay.trade.query", &biz).await {
            Ok(answer) => classify_query(&answer),
            Err(unanswered) => unanswered.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: &str, sub_code: &str) -> Answer {
        Answer {
            code: code.into(),
            sub_code: sub_code.into(),
            sub_msg: String::new(),
            trade_no: String::new(),
            trade_status: String::new(),
        }
    }

    #[test]
    fn the_signed_content_is_sorted_without_sign_and_empty_values() {
        let params: Vec<(String, String)> =
            [("method", "m"), ("sign", "s"), ("app_id", "1"), ("x", "")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(sign_content(&params), "app_id=1&method=m");
    }

    #[test]
    fn the_signed_part_is_cut_from_the_text_as_sent() {
        let body = r#"{"alipay_trade_pay_response":{"code":"10000","msg":"Success","s":"a}\"{"} ,"sign":"SIG"}"#;
        let (part, sign) = response_part(body, "alipay_trade_pay_response").unwrap();
        assert_eq!(part, r#"{"code":"10000","msg":"Success","s":"a}\"{"}"#);
        assert_eq!(sign.as_deref(), Some("SIG"));
        assert!(response_part("{}", "alipay_trade_pay_response").is_none());
    }

    #[test]
    fn order_numbers_fit_alipay_and_follow_the_key() {
        let a = out_trade_no("topup-6f1c-pm-3f9a");
        assert_eq!(a.len(), 33);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(a, out_trade_no("topup-6f1c-pm-3f9a"));
        assert_ne!(a, out_trade_no("topup-6f1c-pm-3f9b"));
    }

    #[test]
    fn answers_are_sorted_into_the_three_classes() {
        let approved = Answer { trade_no: "2026…".into(), ..answer("10000", "") };
        assert_eq!(classify(&approved), ChargeOutcome::Approved { reference: "2026…".into() });
        for (code, sub, reason) in [
            ("40004", "ACQ.BUYER_BALANCE_NOT_ENOUGH", FailureReason::InsufficientFunds),
            ("40004", "ACQ.AGREEMENT_STATUS_NOT_NORMAL", FailureReason::AgreementEnded),
            ("40004", "ACQ.AGREEMENT_NOT_EXIST", FailureReason::AgreementEnded),
            ("40004", "ACQ.CYCLE_PAY_SINGLE_FEE_EXCEED", FailureReason::LimitExceeded),
            ("40004", "ACQ.TRADE_HAS_CLOSE", FailureReason::Declined),
        ] {
            assert!(
                matches!(classify(&answer(code, sub)), ChargeOutcome::Refused { reason: r, .. } if r == reason),
                "{sub}"
            );
        }
        for (code, sub) in [
            ("10000", ""),
            ("10003", ""),
            ("20000", ""),
            ("40004", "ACQ.SYSTEM_ERROR"),
            ("40004", "ACQ.TRADE_HAS_SUCCESS"),
        ] {
            assert!(
                matches!(classify(&answer(code, sub)), ChargeOutcome::Unknown { .. }),
                "{code} {sub}"
            );
        }
        assert!(matches!(
            classify(&answer("40002", "isv.invalid-signature")),
            ChargeOutcome::Unavailable { .. }
        ));
        let paid = Answer {
            trade_no: "2026…".into(),
            trade_status: "TRADE_SUCCESS".into(),
            ..answer("10000", "")
        };
        assert!(matches!(classify_query(&paid), ChargeStatus::Approved { .. }));
        assert_eq!(classify_query(&answer("40004", "ACQ.TRADE_NOT_EXIST")), ChargeStatus::NotFound);
        let waiting = Answer { trade_status: "WAIT_BUYER_PAY".into(), ..answer("10000", "") };
        assert!(matches!(classify_query(&waiting), ChargeStatus::Unknown { .. }));
    }
}
