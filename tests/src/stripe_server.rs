//! A stateful Stripe for the card connector's tests, in front of Stripe's own `stripe-mock`.
//!
//! `stripe-mock` (Stripe's official mock, a Go module `scripts/test` installs) checks every
//! request against Stripe's OpenAPI specification: parameter names, types, the API version
//! (`-strict-version-check`) and the key. It answers from fixed fixtures, so outcomes come
//! from this server: each request is first forwarded to `stripe-mock`, and one it refuses
//! is answered with its error and counted in [`StripeServer::shape_errors`]; then this
//! server answers as Stripe would, keeping each idempotency key's first answer (and
//! replaying it), charging a key at most once, and finding PaymentIntents by metadata — a
//! key's first search finds nothing, as Stripe's search lags behind its writes.
//!
//! Outcomes by payment method, Stripe's test payment methods where Stripe has one:
//!
//! | payment method | answer |
//! |---|---|
//! | `pm_card_chargeDeclined` | 402 `card_declined` / `generic_decline` |
//! | `pm_card_chargeDeclinedInsufficientFunds` | 402 `card_declined` / `insufficient_funds` |
//! | `pm_card_chargeDeclinedExpiredCard` | 402 `expired_card` |
//! | `pm_card_authenticationRequired` | 402 `authentication_required`, the intent `requires_payment_method` |
//! | `pm_test_lost` | charges, and the answer is a 500 (Stripe keeps and replays it) |
//! | `pm_test_busy<N>` | 429 for the first N requests (not kept), then charged |
//! | any other | charged: 200 `succeeded` |
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// The secret key the tests configure (stripe-mock takes any test-mode key).
pub const SECRET_KEY: &str = "sk_test_topup";

/// Where `scripts/test` installs stripe-mock, unless `TOPUP_STRIPE_MOCK` names it.
fn stripe_mock_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TOPUP_STRIPE_MOCK") {
        return Ok(PathBuf::from(path));
    }
    let cache = std::env::var_os("TOPUP_CACHE_DIR").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(|d| PathBuf::from(d).join("topup"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/topup")))
    });
    let version = include_str!("../../scripts/stripe-mock.version").trim();
    let path = cache.unwrap_or_default().join(format!("stripe-mock-{version}/stripe-mock"));
    if !path.exists() {
        bail!(
            "stripe-mock is not installed at {}: scripts/test installs it (go install \
             github.com/stripe/stripe-mock@{version}), or set TOPUP_STRIPE_MOCK",
            path.display()
        );
    }
    Ok(path)
}

/// stripe-mock, on a free loopback port, killed when dropped.
struct StripeMock {
    url: String,
    _child: tokio::process::Child,
}

impl StripeMock {
    async fn start() -> anyhow::Result<Self> {
        let binary = stripe_mock_binary()?;
        // It serves HTTPS too (on 12112 unless told): a port of its own for that as well,
        // both held until both are chosen.
        let (a, b) = (
            std::net::TcpListener::bind("127.0.0.1:0")?,
            std::net::TcpListener::bind("127.0.0.1:0")?,
        );
        let (port, tls_port) = (a.local_addr()?.port(), b.local_addr()?.port());
        drop((a, b));
        let log = tempfile::Builder::new().prefix("stripe-mock-").suffix(".log").tempfile()?;
        let (log, log_path) = log.keep()?;
        let child = crate::child_command(&binary)
            .args(["-http-addr", &format!("127.0.0.1:{port}")])
            .args(["-https-addr", &format!("127.0.0.1:{tls_port}"), "-strict-version-check"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut child = child;
        loop {
            tick.tick().await;
            if let Some(exit) = child.try_wait()? {
                bail!(
                    "stripe-mock exited ({exit}) before it answered; its log: {}",
                    log_path.display()
                );
            }
            let answered = client.get(format!("{url}/v1/customers")).bearer_auth(SECRET_KEY);
            if answered.send().await.is_ok() {
                return Ok(Self { url, _child: child });
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "stripe-mock did not answer on {url} in 30 s; its log: {}",
                    log_path.display()
                );
            }
        }
    }
}

/// A key's first request (its parameters) and the answer Stripe keeps for it.
type Kept = (Vec<(String, String)>, StatusCode, Value);

#[derive(Debug, Default)]
struct Ledger {
    /// First answer per idempotency key, with the parameters it was given.
    answers: HashMap<String, Kept>,
    /// Charges made per key, per top-up (command id) and per subscriber.
    charges: HashMap<String, u32>,
    by_command: HashMap<String, u32>,
    by_subscriber: HashMap<String, u32>,
    /// PaymentIntents created, for the search.
    intents: Vec<Value>,
    /// Requests per key, and 429s still to give per key.
    requests: HashMap<String, u32>,
    busy_given: HashMap<String, u32>,
    /// Searches received, and the keys searched once (the first search of a key finds
    /// nothing, as Stripe's search lags behind its writes).
    searches: u32,
    searched: std::collections::HashSet<String>,
    /// What stripe-mock refused, and requests without our headers.
    shape_errors: Vec<String>,
}

struct Shared {
    ledger: Mutex<Ledger>,
    mock: StripeMock,
    client: reqwest::Client,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the request to stripe-mock; its refusal, if it refuses.
    async fn validate(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Option<(StatusCode, Value)> {
        let mut request =
            self.client.request(method, format!("{}{path_and_query}", self.mock.url)).body(body);
        for name in ["authorization", "stripe-version", "content-type", "idempotency-key"] {
            if let Some(value) = headers.get(name) {
                request = request.header(name, value.as_bytes());
            }
        }
        let problem = match request.send().await {
            Ok(response) if response.status().is_success() => return None,
            Ok(response) => {
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), body)
            }
            Err(e) => (StatusCode::BAD_GATEWAY, json!({"error": {"message": e.to_string()}})),
        };
        self.lock().shape_errors.push(format!("{path_and_query}: {}", problem.1));
        Some(problem)
    }
}

/// The running server.
pub struct StripeServer {
    /// The API base to configure as `STRIPE_API_URL`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StripeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StripeServer {
    /// Starts stripe-mock and this server on free loopback ports.
    pub async fn start() -> anyhow::Result<Self> {
        let mock = StripeMock::start().await?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let shared = Arc::new(Shared { ledger: Mutex::default(), mock, client });
        let app = axum::Router::new()
            .route("/v1/payment_intents", axum::routing::post(create))
            .route("/v1/payment_intents/search", axum::routing::get(search))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test Stripe stopped");
            }
        });
        Ok(Self { url, shared, task })
    }

    fn ledger<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&self.shared.lock())
    }

    /// Charges made per idempotency key.
    pub fn charges(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.charges.clone())
    }

    /// Charges made per top-up (command id), across all its keys.
    pub fn charges_by_command(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.by_command.clone())
    }

    /// Charges made per subscriber.
    pub fn charges_by_subscriber(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.by_subscriber.clone())
    }

    /// Requests received for `key`.
    pub fn requests(&self, key: &str) -> u32 {
        self.ledger(|l| l.requests.get(key).copied().unwrap_or(0))
    }

    /// Searches received.
    pub fn searches(&self) -> u32 {
        self.ledger(|l| l.searches)
    }

    /// Requests stripe-mock refused (or that lacked a header Stripe needs here).
    pub fn shape_errors(&self) -> Vec<String> {
        self.ledger(|l| l.shape_errors.clone())
    }
}

fn answer(status: StatusCode, body: &Value) -> Response {
    (status, axum::Json(body.clone())).into_response()
}

fn card_error(code: &str, decline_code: Option<&str>, intent: &Value) -> Value {
    json!({"error": {
        "type": "card_error",
        "code": code,
        "decline_code": decline_code,
        "message": format!("test card: {code}"),
        "payment_intent": intent,
    }})
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some((status, error)) =
        shared.validate(reqwest::Method::POST, "/v1/payment_intents", &headers, body.clone()).await
    {
        return answer(status, &error);
    }
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        shared.lock().shape_errors.push("a charge without an Idempotency-Key".into());
        return answer(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"type": "invalid_request_error"}}),
        );
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let param = |name: &str| {
        params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let mut ledger = shared.lock();
    *ledger.requests.entry(key.to_string()).or_default() += 1;
    if let Some((first, status, saved)) = ledger.answers.get(key) {
        if *first != params {
            let error = json!({"error": {"type": "idempotency_error",
                "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}});
            return answer(StatusCode::BAD_REQUEST, &error);
        }
        return answer(*status, saved);
    }
    let method = param("payment_method");
    if let Some(busy) = method.strip_prefix("pm_test_busy") {
        let given = ledger.busy_given.entry(key.to_string()).or_default();
        if *given < busy.parse().unwrap_or(0) {
            *given += 1;
            // Rate limited before it started: not kept for the key.
            let error = json!({"error": {"type": "invalid_request_error", "code": "rate_limit"}});
            return answer(StatusCode::TOO_MANY_REQUESTS, &error);
        }
    }
    let id = format!("pi_test_{}", ledger.intents.len() + 1);
    let metadata: serde_json::Map<String, Value> = params
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((name.to_string(), Value::String(v.clone())))
        })
        .collect();
    let mut intent = json!({
        "id": id, "object": "payment_intent",
        "amount": param("amount").parse::<i64>().unwrap_or(0),
        "currency": param("currency"), "customer": param("customer"),
        "payment_method": method, "metadata": metadata, "status": "succeeded",
        "last_payment_error": null,
    });
    let refused = |code: &str, decline: Option<&str>, intent: &mut Value| {
        intent["status"] = json!("requires_payment_method");
        intent["last_payment_error"] =
            json!({"type": "card_error", "code": code, "decline_code": decline});
        (StatusCode::PAYMENT_REQUIRED, card_error(code, decline, intent))
    };
    let (status, body) = match method.as_str() {
        "pm_card_chargeDeclined" => refused("card_declined", Some("generic_decline"), &mut intent),
        "pm_card_chargeDeclinedInsufficientFunds" => {
            refused("card_declined", Some("insufficient_funds"), &mut intent)
        }
        "pm_card_chargeDeclinedExpiredCard" => refused("expired_card", None, &mut intent),
        "pm_card_authenticationRequired" => {
            refused("authentication_required", Some("authentication_required"), &mut intent)
        }
        _ => {
            *ledger.charges.entry(key.to_string()).or_default() += 1;
            *ledger.by_command.entry(param("metadata[command_id]")).or_default() += 1;
            *ledger.by_subscriber.entry(param("metadata[subscriber_id]")).or_default() += 1;
            if method == "pm_test_lost" {
                let error = json!({"error": {"type": "api_error", "message": "test: answer lost"}});
                (StatusCode::INTERNAL_SERVER_ERROR, error)
            } else {
                (StatusCode::OK, intent.clone())
            }
        }
    };
    ledger.intents.push(intent);
    ledger.answers.insert(key.to_string(), (params, status, body.clone()));
    answer(status, &body)
}

/// `metadata['name']:'value'` (with `\'` and `\\` escapes) → (name, value).
fn metadata_clause(query: &str) -> Option<(String, String)> {
    let rest = query.trim().strip_prefix("metadata['")?;
    let (name, rest) = rest.split_once("']:'")?;
    let quoted = rest.strip_suffix('\'')?;
    let mut value = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        value.push(if c == '\\' { chars.next()? } else { c });
    }
    Some((name.to_string(), value))
}

async fn search(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    let path = format!("/v1/payment_intents/search?{raw}");
    if let Some((status, error)) =
        shared.validate(reqwest::Method::GET, &path, &headers, Bytes::new()).await
    {
        return answer(status, &error);
    }
    let query = form_urlencoded::parse(raw.as_bytes())
        .find(|(k, _)| k == "query")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let Some((name, value)) = metadata_clause(&query) else {
        let message = format!("this test server understands one metadata clause, not {query:?}");
        shared.lock().shape_errors.push(message.clone());
        let error = json!({"error": {"type": "invalid_request_error", "message": message}});
        return answer(StatusCode::BAD_REQUEST, &error);
    };
    let mut ledger = shared.lock();
    ledger.searches += 1;
    let lagging = ledger.searched.insert(value.clone());
    let data: Vec<Value> = ledger
        .intents
        .iter()
        .filter(|intent| !lagging && intent["metadata"][&name].as_str() == Some(value.as_str()))
        .cloned()
        .collect();
    answer(
        StatusCode::OK,
        &json!({"object": "search_result", "data": data, "has_more": false,
                "url": "/v1/payment_intents/search"}),
    )
}
