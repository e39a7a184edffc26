//! OpenTelemetry: one trace follows a top-up across the services, because the W3C trace
//! context travels in Kafka record headers (`traceparent`, `tracestate`).
//!
//! Every record a pipeline processes gets a `process <topic>` span (kind consumer), a child
//! of the context in the record's headers; every record it produces gets a `send <topic>`
//! span (kind producer), a child of that, whose context goes into the produced record's
//! headers. Names and attributes follow the OpenTelemetry semantic conventions for
//! messaging (`messaging.system = kafka`, `messaging.destination.name`, ...).
//!
//! Spans are `tracing` spans, exported through the `tracing-opentelemetry` bridge: one
//! system for logs and spans (the log lines written while a record is processed become
//! events of its span). The bridge is part of the subscriber [`crate::init_logging`] builds,
//! so a tracer provider is installed before logging starts ([`init`] and
//! [`install_tracer_provider`] see to it).
//!
//! Export is OTLP over HTTP/protobuf when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other
//! standard `OTEL_*` variables apply: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_METRIC_EXPORT_INTERVAL`, ...). Without it no span is
//! recorded and nothing is sent, but a trace context that arrives in a record's headers is
//! still passed on to what the record causes.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::record::{Input, Output};

/// The environment variable that turns export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Name of the instrumentation scope of the spans and metrics.
const SCOPE: &str = "topup-kafka";

/// The `tracing` target of the pipeline's spans: exported, never written as log lines.
pub(crate) const SPAN_TARGET: &str = "topup::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);
static METRICS_ENABLED: AtomicBool = AtomicBool::new(false);

fn tracer_provider() -> &'static Mutex<Option<SdkTracerProvider>> {
    static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();
    PROVIDER.get_or_init(|| Mutex::new(None))
}

fn meter_provider() -> &'static Mutex<Option<SdkMeterProvider>> {
    static PROVIDER: OnceLock<Mutex<Option<SdkMeterProvider>>> = OnceLock::new();
    PROVIDER.get_or_init(|| Mutex::new(None))
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// Whether spans are recorded (a tracer provider is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether metrics are recorded for OTLP export (a meter provider is installed).
pub fn metrics_enabled() -> bool {
    METRICS_ENABLED.load(Ordering::Relaxed)
}

/// Starts OTLP export of traces and metrics when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
/// `service` is the `service.name` unless `OTEL_SERVICE_NAME` says otherwise. Returns
/// whether export was started. An unusable endpoint is an error that names the variable.
pub fn init(service: &str) -> Result<bool, String> {
    let endpoint = match std::env::var(OTLP_ENDPOINT_ENV) {
        Ok(endpoint) if !endpoint.trim().is_empty() => endpoint,
        _ => return Ok(false),
    };
    let resource = match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.is_empty() => Resource::builder().build(),
        _ => Resource::builder().with_service_name(service.to_string()).build(),
    };
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("{OTLP_ENDPOINT_ENV}={endpoint}: traces: {e}"))?;
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("{OTLP_ENDPOINT_ENV}={endpoint}: metrics: {e}"))?;
    install_tracer_provider(
        SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build(),
    );
    let meters =
        SdkMeterProvider::builder().with_periodic_exporter(metrics).with_resource(resource).build();
    install_meter_provider(meters);
    crate::init_logging();
    tracing::info!(%endpoint, "OpenTelemetry: exporting traces and metrics over OTLP/HTTP");
    Ok(true)
}

/// Records spans through `provider` from now on (used by [`init`], and by tests with an
/// in-memory exporter).
///
/// The provider must be installed before logging starts (its bridge is part of the
/// subscriber): this starts logging itself, so a later [`crate::init_logging`] changes
/// nothing.
pub fn install_tracer_provider(provider: SdkTracerProvider) {
    opentelemetry::global::set_tracer_provider(provider.clone());
    if let Ok(mut slot) = tracer_provider().lock() {
        *slot = Some(provider);
    }
    ENABLED.store(true, Ordering::Relaxed);
    crate::init_logging();
}

/// The tracer the `tracing` bridge records spans with, when a provider is installed.
pub(crate) fn tracer() -> Option<SdkTracer> {
    let slot = tracer_provider().lock().ok()?;
    slot.as_ref().map(|provider| provider.tracer(SCOPE))
}

/// Records metrics through `provider` from now on (instruments created from now on; the
/// services create theirs on first use, after [`init`]).
pub fn install_meter_provider(provider: SdkMeterProvider) {
    opentelemetry::global::set_meter_provider(provider.clone());
    if let Ok(mut slot) = meter_provider().lock() {
        *slot = Some(provider);
    }
    METRICS_ENABLED.store(true, Ordering::Relaxed);
}

/// Sends what is buffered and stops export; called when a service stops.
pub fn shutdown() {
    let tracer = tracer_provider().lock().ok().and_then(|mut slot| slot.take());
    if let Some(provider) = tracer {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(error) = provider.shutdown() {
            tracing::warn!(%error, "OpenTelemetry: traces not all exported at shutdown");
        }
    }
    let meter = meter_provider().lock().ok().and_then(|mut slot| slot.take());
    if let Some(provider) = meter {
        METRICS_ENABLED.store(false, Ordering::Relaxed);
        if let Err(error) = provider.shutdown() {
            tracing::warn!(%error, "OpenTelemetry: metrics not all exported at shutdown");
        }
    }
}

/// The meter the services' metrics are also recorded on (no-op unless export is on).
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter(SCOPE)
}

struct HeaderExtractor<'a>(&'a [(String, Vec<u8>)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut Vec<(String, Vec<u8>)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(key)) {
            Some(header) => header.1 = value.into_bytes(),
            None => self.0.push((key.to_string(), value.into_bytes())),
        }
    }
}

/// The trace context in a record's headers (an empty context when there is none).
pub fn extract(headers: &[(String, Vec<u8>)]) -> Context {
    if headers.is_empty() {
        return Context::new();
    }
    propagator().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s trace context into `headers` (nothing when `cx` has no valid span).
pub fn inject(cx: &Context, headers: &mut Vec<(String, Vec<u8>)>) {
    if cx.span().span_context().is_valid() {
        propagator().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// A record's span and the trace context what it causes is a child of.
pub(crate) struct Traced {
    /// Disabled when no tracer provider is installed.
    span: tracing::Span,
    /// The span's context; without a provider, the context in the record's headers, passed
    /// on as it came.
    cx: Context,
}

/// Starts the `process <topic>` span of `input`, consumed by `group`, as a child of the
/// context in its headers.
pub(crate) fn process_span(group: &str, input: &Input) -> Traced {
    let parent = extract(&input.headers);
    if !enabled() {
        return Traced { span: tracing::Span::none(), cx: parent };
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "process",
        otel.name = %format_args!("process {}", input.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %input.topic,
        messaging.destination.partition.id = %input.partition,
        messaging.consumer.group.name = group,
        messaging.kafka.offset = input.offset,
        messaging.kafka.message.key = tracing::field::Empty,
        messaging.message.body.size = tracing::field::Empty,
    );
    if let Some(key) = input.key_str() {
        span.record("messaging.kafka.message.key", key);
    }
    if let Some(payload) = &input.payload {
        span.record("messaging.message.body.size", payload.len() as i64);
    }
    // Before anything else: the parent can be set only while the span is not started.
    let _ = span.set_parent(parent);
    let cx = span.context();
    Traced { span, cx }
}

/// Marks the processing of a record as failed: it went to the dead-letter topic.
pub(crate) fn refused(traced: &Traced, reason: &str) {
    if enabled() {
        traced.span.set_attribute("error.type", "refused");
        traced.span.set_status(Status::error(reason.to_string()));
    }
}

/// Ends a record's span.
pub(crate) fn end(traced: Traced) {
    drop(traced);
}

/// Gives `output` its `send <topic>` span, a child of the record's, and puts the span's
/// trace context into the output's headers. Returns the span, to drop once sent.
pub(crate) fn send_span(traced: &Traced, output: &mut Output) -> tracing::Span {
    if !enabled() {
        inject(&traced.cx, &mut output.headers);
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: &traced.span,
        "send",
        otel.name = %format_args!("send {}", output.topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = output.topic,
        messaging.kafka.message.key = tracing::field::Empty,
        messaging.kafka.message.tombstone = tracing::field::Empty,
    );
    if let Ok(key) = std::str::from_utf8(&output.key) {
        span.record("messaging.kafka.message.key", key);
    }
    if output.payload.is_none() {
        span.record("messaging.kafka.message.tombstone", true);
    }
    inject(&span.context(), &mut output.headers);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_context_goes_into_headers_and_comes_back_out() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = vec![("traceparent".to_string(), traceparent.as_bytes().to_vec())];
        let cx = extract(&headers);
        assert!(cx.span().span_context().is_valid());
        let mut out = vec![("other".to_string(), b"kept".to_vec())];
        inject(&cx, &mut out);
        assert_eq!(out[0], ("other".to_string(), b"kept".to_vec()));
        assert_eq!(out[1], ("traceparent".to_string(), traceparent.as_bytes().to_vec()));
        // No context, no header; garbage is no context.
        let mut none = Vec::new();
        inject(&extract(&[]), &mut none);
        inject(&extract(&[("traceparent".into(), b"\xff-garbage".to_vec())]), &mut none);
        assert!(none.is_empty());
    }
}
