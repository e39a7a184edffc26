//! An SMS/push provider for tests: receives the notifier's signed webhook requests on a
//! random loopback port, checks each signature, keeps what it accepted, and can be told to
//! fail some destinations (503 a number of times, or 400 for good).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::bail;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use topup_notifier::channel::WebhookBody;

use crate::WAIT;

/// The signing secret the tests configure on both sides.
pub const SECRET: &str = "test-webhook-secret";

/// A message the provider accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `Idempotency-Key` header.
    pub idempotency_key: String,
    /// The body.
    pub body: Arc<WebhookBody>,
}

#[derive(Default)]
struct Book {
    accepted: Vec<Received>,
    /// Destination → how many more requests to answer 503.
    flaky: HashMap<String, u32>,
    /// Destinations answered 400.
    dead: Vec<String>,
    /// Requests per destination, accepted or not.
    requests: HashMap<String, u32>,
    /// Destinations whose next request is answered only after this long.
    slow: HashMap<String, std::time::Duration>,
    /// Slow requests answered so far.
    slow_answered: u32,
    /// Messages accepted before the first slow request was answered.
    accepted_before_slow: u32,
    bad_signatures: u32,
}

#[derive(Clone, Default)]
struct Shared {
    book: Arc<Mutex<Book>>,
    arrived: Arc<Notify>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running provider.
pub struct WebhookServer {
    /// Base URL; SMS go to `{base}/sms`, push to `{base}/push`.
    pub base: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookServer {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Shared::default();
        let app = axum::Router::new()
            .route("/sms", axum::routing::post(receive))
            .route("/push", axum::routing::post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test webhook server stopped");
            }
        });
        Ok(Self { base, shared, task })
    }

    /// Answer the next `times` requests for `to` with 503.
    pub fn flaky(&self, to: &str, times: u32) {
        self.shared.book().flaky.insert(to.to_string(), times);
    }

    /// Answer the next request for `to` only after `delay` (a provider hanging for one
    /// number once).
    pub fn slow(&self, to: &str, delay: std::time::Duration) {
        self.shared.book().slow.insert(to.to_string(), delay);
    }

    /// Messages accepted before the first slow request was answered.
    pub fn accepted_before_slow(&self) -> u32 {
        self.shared.book().accepted_before_slow
    }

    /// Answer every request for `to` with 400.
    pub fn dead(&self, to: &str) {
        self.shared.book().dead.push(to.to_string());
    }

    /// Everything accepted so far.
    pub fn accepted(&self) -> Vec<Received> {
        self.shared.book().accepted.clone()
    }

    /// Requests received for `to`.
    pub fn requests(&self, to: &str) -> u32 {
        self.shared.book().requests.get(to).copied().unwrap_or(0)
    }

    /// Requests refused for a bad signature.
    pub fn bad_signatures(&self) -> u32 {
        self.shared.book().bad_signatures
    }

    /// Waits (at most [`WAIT`]) until a message for `to` was accepted.
    pub async fn wait_for(&self, to: &str) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.shared.arrived.notified();
            if let Some(found) = self.accepted().into_iter().find(|r| r.body.to == to) {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("no webhook message for {to} within {WAIT:?}");
            }
        }
    }
}

impl WebhookServer {
    /// Waits (at most [`WAIT`]) until `count` messages of `kind` were accepted for `to`, and
    /// returns them in arrival order.
    pub async fn wait_for_kind(
        &self,
        to: &str,
        kind: &str,
        count: usize,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.shared.arrived.notified();
            let found: Vec<Received> = self
                .accepted()
                .into_iter()
                .filter(|r| r.body.to == to && r.body.kind == kind)
                .collect();
            if found.len() >= count {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("{} of {count} {kind} messages for {to} within {WAIT:?}", found.len());
            }
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let timestamp: u64 = header(&headers, "x-topup-timestamp").parse().unwrap_or(0);
    let expected = topup_domain::request_signature(SECRET.as_bytes(), timestamp, &body);
    if header(&headers, "x-topup-signature") != expected {
        shared.book().bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(message) = serde_json::from_slice::<WebhookBody>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    // Slow once: the retry is answered at once.
    let delay = shared.book().slow.remove(&message.to);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
        shared.book().slow_answered += 1;
    }
    let mut book = shared.book();
    *book.requests.entry(message.to.clone()).or_insert(0) += 1;
    if delay.is_none() && book.slow_answered == 0 {
        book.accepted_before_slow += 1;
    }
    if book.dead.contains(&message.to) {
        return StatusCode::BAD_REQUEST;
    }
    if let Some(left) = book.flaky.get_mut(&message.to).filter(|n| **n > 0) {
        *left -= 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    book.accepted.push(Received {
        idempotency_key: header(&headers, "idempotency-key").to_string(),
        body: Arc::new(message),
    });
    drop(book);
    shared.arrived.notify_waiters();
    StatusCode::OK
}
