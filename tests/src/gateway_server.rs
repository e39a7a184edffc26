//! A payment gateway speaking the HTTP wire format of `topup-payment-worker`, started by
//! the tests on a random loopback port. It checks every signature, keeps one answer per
//! idempotency key like a real provider, and counts the charges it makes per key — the
//! number the tests hold to at most one.
//!
//! | token contains | behaviour                                                        |
//! |----------------|------------------------------------------------------------------|
//! | `decline`      | 402 `card_declined`                                              |
//! | `expired`      | 402 `card_expired`                                               |
//! | `insufficient` | 402 `insufficient_funds`                                         |
//! | `storm<N>`     | 503 for the first N requests of a key, then approved             |
//! | `timeout`      | charges, then answers only after [`TIMEOUT_DELAY`] (the client gives up) |
//! | `lost`         | charges, then drops the connection without an answer, every time; the status lookup tells the truth |
//! | `unreadable`   | charges, answers 200 with a body that is not an approval, every time |
//! | `slow`         | approved after [`SLOW_DELAY`]                                    |
//! | `hang`         | never answers in time, and the status lookup says "pending" (409)   |
//! | `hold`         | charges, reports it on [`GatewayServer::held`], never answers     |
//! | otherwise      | approved                                                         |
//!
//! `GET /v1/charges/{key}` is the status lookup: 200 with the key's answer, 404 for a key
//! never charged, 409 while a `hang` request is pending; signed like a charge, over the key.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use topup_payment_worker::gateway::http::{
    signature, ChargeBody, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};

/// The signing secret the tests configure on both sides.
pub const SECRET: &str = "test-signing-secret";
/// How late a `timeout` token answers.
pub const TIMEOUT_DELAY: Duration = Duration::from_secs(3);
/// How late a `slow` token answers.
pub const SLOW_DELAY: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
struct Ledger {
    /// The settled answer per key: a repeated key gets it again, nothing new happens.
    answers: HashMap<String, (StatusCode, Value)>,
    /// Charges made per key.
    charges: HashMap<String, u32>,
    /// Charges made per top-up (command id) and per subscriber, across every key.
    by_command: HashMap<String, u32>,
    by_subscriber: HashMap<String, u32>,
    /// Keys of requests still being processed (`hang`).
    pending: std::collections::HashSet<String>,
    /// Status lookups received per key.
    lookups: HashMap<String, u32>,
    /// Requests received per key.
    requests: HashMap<String, u32>,
    /// Requests whose signature did not verify.
    bad_signatures: u32,
}

struct Shared {
    ledger: Mutex<Ledger>,
    held: mpsc::UnboundedSender<String>,
}

impl Shared {
    /// The ledger; a panicked handler cannot make it unreadable for the test.
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running gateway.
pub struct GatewayServer {
    /// Charge endpoint to configure as `--payment-gateway-url`.
    pub url: String,
    shared: Arc<Shared>,
    /// Idempotency keys of `hold` charges, as they are made.
    pub held: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GatewayServer {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let (tx, held) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared { ledger: Mutex::default(), held: tx });
        let app = axum::Router::new()
            .route("/v1/charges", axum::routing::post(charge))
            .route("/v1/charges/{key}", axum::routing::get(status))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/charges", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test gateway stopped");
            }
        });
        Ok(Self { url, shared, held, task })
    }

    fn ledger<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&self.shared.lock())
    }

    /// Charges made per idempotency key.
    pub fn charges(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.charges.clone())
    }

    /// Charges made per top-up (command id), across all its keys and methods.
    pub fn charges_by_command(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.by_command.clone())
    }

    /// Charges made per subscriber.
    pub fn charges_by_subscriber(&self) -> HashMap<String, u32> {
        self.ledger(|l| l.by_subscriber.clone())
    }

    /// Status lookups received for `key`.
    pub fn lookups(&self, key: &str) -> u32 {
        self.ledger(|l| l.lookups.get(key).copied().unwrap_or(0))
    }

    /// Requests received for `key`.
    pub fn requests(&self, key: &str) -> u32 {
        self.ledger(|l| l.requests.get(key).copied().unwrap_or(0))
    }

    /// Requests refused for a bad signature.
    pub fn bad_signatures(&self) -> u32 {
        self.ledger(|l| l.bad_signatures)
    }
}

fn storm_size(token: &str) -> Option<u32> {
    let rest = &token[token.find("storm")? + "storm".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

fn declined(code: &str) -> (StatusCode, Value) {
    (StatusCode::PAYMENT_REQUIRED, json!({"status": "declined", "code": code, "message": code}))
}

async fn charge(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let timestamp: u64 = header(&headers, TIMESTAMP_HEADER).parse().unwrap_or(0);
    if header(&headers, SIGNATURE_HEADER) != signature(SECRET.as_bytes(), timestamp, &body) {
        shared.lock().bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, Json(json!({"message": "bad signature"})))
            .into_response();
    }
    let Ok(request) = serde_json::from_slice::<ChargeBody>(&body) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "bad body"}))).into_response();
    };
    let key = request.idempotency_key.clone();
    if header(&headers, IDEMPOTENCY_HEADER) != key {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "key mismatch"}))).into_response();
    }
    let token = request.payment_method.token.as_str();
    let (answer, delay) = {
        let mut ledger = shared.lock();
        let seen = {
            let n = ledger.requests.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if let Some((status, body)) = ledger.answers.get(&key) {
            let delay = (token.contains("lost") || token.contains("unreadable")).then_some(LOST);
            ((*status, body.clone()), delay)
        } else if token.contains("hang") {
            ledger.pending.insert(key.clone());
            ((StatusCode::OK, json!({})), Some(Duration::from_secs(3600)))
        } else if storm_size(token).is_some_and(|n| seen <= n) {
            ((StatusCode::SERVICE_UNAVAILABLE, json!({"message": "storm"})), None)
        } else {
            let answer = if token.contains("decline") {
                declined("card_declined")
            } else if token.contains("expired") {
                declined("card_expired")
            } else if token.contains("insufficient") {
                declined("insufficient_funds")
            } else {
                *ledger.charges.entry(key.clone()).or_insert(0) += 1;
                *ledger.by_command.entry(request.command_id.clone()).or_insert(0) += 1;
                *ledger.by_subscriber.entry(request.subscriber_id.clone()).or_insert(0) += 1;
                (StatusCode::OK, json!({"status": "approved", "reference": format!("ch_{key}")}))
            };
            ledger.answers.insert(key.clone(), answer.clone());
            let delay = if token.contains("lost") || token.contains("unreadable") {
                Some(LOST)
            } else if token.contains("hold") {
                let _ = shared.held.send(key.clone());
                Some(Duration::from_secs(3600))
            } else if token.contains("timeout") {
                Some(TIMEOUT_DELAY)
            } else if token.contains("slow") {
                Some(SLOW_DELAY)
            } else {
                None
            };
            (answer, delay)
        }
    };
    match delay {
        // The charge is made; the answer never arrives. A body that is not the answer
        // stands for a lost one at the HTTP level: the client cannot read an approval.
        Some(LOST) if token.contains("unreadable") => {
            (StatusCode::OK, "<html>gateway maintenance</html>").into_response()
        }
        Some(LOST) => (StatusCode::BAD_GATEWAY, "upstream connection reset").into_response(),
        Some(delay) => {
            tokio::time::sleep(delay).await;
            (answer.0, Json(answer.1)).into_response()
        }
        None => (answer.0, Json(answer.1)).into_response(),
    }
}

/// Stands for "no answer arrives" in the charge handler.
const LOST: Duration = Duration::from_nanos(1);

async fn status(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(key): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let timestamp: u64 = header(&headers, TIMESTAMP_HEADER).parse().unwrap_or(0);
    if header(&headers, SIGNATURE_HEADER) != signature(SECRET.as_bytes(), timestamp, key.as_bytes())
    {
        shared.lock().bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, Json(json!({"message": "bad signature"})))
            .into_response();
    }
    let mut ledger = shared.lock();
    *ledger.lookups.entry(key.clone()).or_insert(0) += 1;
    if let Some((status, body)) = ledger.answers.get(&key) {
        return (*status, Json(body.clone())).into_response();
    }
    if ledger.pending.contains(&key) {
        return (StatusCode::CONFLICT, Json(json!({"status": "pending"}))).into_response();
    }
    (StatusCode::NOT_FOUND, Json(json!({"message": "no such charge"}))).into_response()
}
