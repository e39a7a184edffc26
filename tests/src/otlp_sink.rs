//! An OpenTelemetry collector for tests: receives OTLP/HTTP (protobuf) on a random loopback
//! port — `POST /v1/traces` and `POST /v1/metrics`, as a service sends them when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` points here — and keeps what it decoded.
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::bail;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message;
use tokio::sync::Notify;

use crate::WAIT;

/// A span as received, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Trace id, lower-case hex.
    pub trace_id: String,
    /// Span id, lower-case hex.
    pub span_id: String,
    /// Parent span id, lower-case hex (empty for a root).
    pub parent_span_id: String,
    /// Its string, integer and boolean attributes, as text.
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// The attribute `key`, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A metric data point as received, flattened: (service, metric name, value as text).
pub type ReceivedPoint = (String, String, String);

#[derive(Default)]
struct Book {
    spans: Vec<ReceivedSpan>,
    points: Vec<ReceivedPoint>,
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

/// The running collector.
pub struct OtlpSink {
    /// What to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn service_of(attributes: &[KeyValue]) -> String {
    attributes.iter().find(|kv| kv.key == "service.name").map(text).unwrap_or_default()
}

async fn traces(State(shared): State<Shared>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut book = shared.book();
    for resource_spans in request.resource_spans {
        let service =
            resource_spans.resource.as_ref().map(|r| service_of(&r.attributes)).unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                book.spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                });
            }
        }
    }
    drop(book);
    shared.arrived.notify_waiters();
    StatusCode::OK
}

async fn metrics(State(shared): State<Shared>, body: Bytes) -> StatusCode {
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    let Ok(request) = ExportMetricsServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut book = shared.book();
    for resource_metrics in request.resource_metrics {
        let service = resource_metrics
            .resource
            .as_ref()
            .map(|r| service_of(&r.attributes))
            .unwrap_or_default();
        for scope in resource_metrics.scope_metrics {
            for metric in scope.metrics {
                let number =
                    |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match p.value {
                        Some(number_data_point::Value::AsInt(i)) => i.to_string(),
                        Some(number_data_point::Value::AsDouble(d)) => d.to_string(),
                        None => String::new(),
                    };
                let values: Vec<String> = match &metric.data {
                    Some(metric::Data::Sum(sum)) => sum.data_points.iter().map(number).collect(),
                    Some(metric::Data::Gauge(gauge)) => {
                        gauge.data_points.iter().map(number).collect()
                    }
                    // A histogram's value here is its count.
                    Some(metric::Data::Histogram(histogram)) => {
                        histogram.data_points.iter().map(|p| p.count.to_string()).collect()
                    }
                    _ => Vec::new(),
                };
                for value in values {
                    book.points.push((service.clone(), metric.name.clone(), value));
                }
            }
        }
    }
    drop(book);
    shared.arrived.notify_waiters();
    StatusCode::OK
}

impl OtlpSink {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Shared::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .route("/v1/metrics", axum::routing::post(metrics))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test OTLP sink stopped");
            }
        });
        Ok(Self { endpoint, shared, task })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.book().spans.clone()
    }

    /// Every metric data point received so far.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.shared.book().points.clone()
    }

    /// Waits (at most [`WAIT`]) until what was received satisfies `done`.
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[ReceivedSpan], &[ReceivedPoint]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.shared.arrived.notified();
            {
                let book = self.shared.book();
                if done(&book.spans, &book.points) {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("the OTLP sink did not receive {what} within {WAIT:?}");
            }
        }
    }
}
