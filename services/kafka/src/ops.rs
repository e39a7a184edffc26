//! What an operator (or Kubernetes) asks a running service: is it alive (`/healthz`), is
//! it ready — every pipeline has its partitions assigned, their state restored and its
//! transactional producer initialised (`/readyz`) — and its metrics in the Prometheus
//! text format (`/metrics`), served on `HTTP_ADDR`.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// `--http-addr`, shared by every service.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OpsArgs {
    /// Where to serve /healthz, /readyz and /metrics, e.g. 0.0.0.0:8080; off when unset.
    #[arg(long = "http-addr", env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
}

/// Readiness of the pipelines of this process, by name.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pipelines: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    /// Records whether pipeline `name` can do its work now.
    pub fn set_ready(&self, name: &str, ready: bool) {
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), ready);
    }

    /// Ready when at least one pipeline is known and every one is ready.
    pub fn is_ready(&self) -> bool {
        let pipelines = self.pipelines.lock().unwrap_or_else(PoisonError::into_inner);
        !pipelines.is_empty() && pipelines.values().all(|ready| *ready)
    }

    /// Each pipeline and whether it is ready, for the /readyz body.
    pub fn describe(&self) -> String {
        let pipelines = self.pipelines.lock().unwrap_or_else(PoisonError::into_inner);
        pipelines
            .iter()
            .map(|(name, ready)| {
                format!("{name}: {}\n", if *ready { "ready" } else { "not ready" })
            })
            .collect()
    }
}

/// The process-wide health, set by the pipelines.
pub fn health() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

/// Label names and values of one series.
type Labels = Vec<(&'static str, String)>;

tokio::task_local! {
    /// The pipeline instance (its transactional id) whose task is counting.
    static INSTANCE: Arc<str>;
}

/// Runs `work` as pipeline instance `id`: every counter and histogram series it touches
/// carries `instance_id="<id>"`, so that two instances in one process (tests, the
/// all-in-one run) count apart. Sums over the label give the process's figure.
pub async fn as_instance<F: std::future::Future>(id: &str, work: F) -> F::Output {
    INSTANCE.scope(Arc::from(id), work).await
}

/// A series' labels as OpenTelemetry attributes.
fn otel_series(labels: &Labels) -> Vec<opentelemetry::KeyValue> {
    labels.iter().map(|(k, v)| opentelemetry::KeyValue::new(*k, v.clone())).collect()
}

/// `labels`, and the instance counting, if any.
fn series(labels: &[(&'static str, &str)]) -> Labels {
    let mut series = owned(labels);
    if let Ok(instance) = INSTANCE.try_with(Arc::clone) {
        series.push(("instance_id", instance.to_string()));
    }
    series
}

fn owned(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// A counter with labels: served on `/metrics` as `topup_<name>_total` and, when OTLP
/// export is on, recorded on the OpenTelemetry meter as `topup_<name>`. Its series can be
/// read back ([`LabeledCounter::sum`]): the all-in-one run's summary reads the counters
/// `/metrics` serves, not counters of its own.
pub struct LabeledCounter {
    prometheus: Family<Labels, Counter>,
    otel: opentelemetry::metrics::Counter<u64>,
    /// The series counted so far (each shares its value with the Prometheus family's).
    series: Mutex<BTreeMap<Labels, Counter>>,
}

impl LabeledCounter {
    /// Registers `topup_<name>`.
    pub fn new(name: &'static str, help: &'static str) -> Self {
        let prometheus = Family::<Labels, Counter>::default();
        register(name, help, prometheus.clone());
        let otel = crate::telemetry::meter()
            .u64_counter(format!("topup_{name}"))
            .with_description(help)
            .build();
        Self { prometheus, otel, series: Mutex::default() }
    }

    /// Adds one to the series of `labels`.
    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        self.inc_by(labels, 1);
    }

    /// Adds `n` to the series of `labels` (and of the instance counting, see
    /// [`as_instance`]).
    pub fn inc_by(&self, labels: &[(&'static str, &str)], n: u64) {
        let labels = series(labels);
        {
            let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(counter) = series.get(&labels) {
                counter.inc_by(n);
            } else {
                let counter = self.prometheus.get_or_create(&labels).clone();
                counter.inc_by(n);
                series.insert(labels.clone(), counter);
            }
        }
        if crate::telemetry::metrics_enabled() {
            self.otel.add(n, &otel_series(&labels));
        }
    }

    /// The sum of every series whose labels include all of `matching` (all series when
    /// `matching` is empty).
    pub fn sum(&self, matching: &[(&str, &str)]) -> u64 {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series
            .iter()
            .filter(|(labels, _)| {
                matching.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, counter)| counter.get())
            .sum()
    }
}

/// A gauge with labels (`/metrics` and OTLP, as [`LabeledCounter`]).
pub struct LabeledGauge {
    prometheus: Family<Labels, Gauge>,
    otel: opentelemetry::metrics::Gauge<i64>,
}

impl LabeledGauge {
    /// Registers `topup_<name>`.
    pub fn new(name: &'static str, help: &'static str) -> Self {
        let prometheus = Family::<Labels, Gauge>::default();
        register(name, help, prometheus.clone());
        let otel = crate::telemetry::meter()
            .i64_gauge(format!("topup_{name}"))
            .with_description(help)
            .build();
        Self { prometheus, otel }
    }

    /// Sets the series of `labels` to `value`.
    pub fn set(&self, labels: &[(&'static str, &str)], value: i64) {
        self.prometheus.get_or_create(&owned(labels)).set(value);
        if crate::telemetry::metrics_enabled() {
            self.otel.record(value, &otel_series(&owned(labels)));
        }
    }
}

/// A latency histogram in seconds, 5 ms to about 80 s (`/metrics` and OTLP, unit `s`).
pub struct LatencyHistogram {
    prometheus: Family<Labels, Histogram, fn() -> Histogram>,
    otel: opentelemetry::metrics::Histogram<f64>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

impl LatencyHistogram {
    /// Registers `topup_<name>` (a name ending in `_seconds`).
    pub fn new(name: &'static str, help: &'static str) -> Self {
        let prometheus = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        register(name, help, prometheus.clone());
        let otel = crate::telemetry::meter()
            .f64_histogram(format!("topup_{name}"))
            .with_description(help)
            .with_unit("s")
            .with_boundaries(latency_buckets().collect())
            .build();
        Self { prometheus, otel }
    }

    /// Records one latency (in the series of the instance counting, see [`as_instance`]).
    pub fn observe(&self, seconds: f64) {
        let labels = series(&[]);
        self.prometheus.get_or_create(&labels).observe(seconds);
        if crate::telemetry::metrics_enabled() {
            self.otel.record(seconds, &otel_series(&labels));
        }
    }
}

/// The metrics every pipeline keeps. Services register their own in [`registry`].
pub struct PipelineMetrics {
    /// `topup_records_consumed_total{service,topic}`.
    pub consumed: LabeledCounter,
    /// `topup_records_produced_total{service,topic}`.
    pub produced: LabeledCounter,
    /// `topup_dead_letters_total{service,topic,reason}` (topic = where the record came from,
    /// reason = [`crate::Refusal::class`]).
    pub dead_letters: LabeledCounter,
    /// `topup_dead_letters_unwritten_total{service,topic}`: refused records committed past
    /// without a dead letter, because the dead-letter topic refused even a bare one (each is
    /// logged with where it is and its SHA-256; it stays on its topic until retention).
    pub dead_letters_unwritten: LabeledCounter,
    /// `topup_consumer_lag_records{service,topic,partition}`.
    pub lag: LabeledGauge,
    /// `topup_state_restored_records_total{topic}`: changelog records read into local
    /// state stores.
    pub restored: LabeledCounter,
    /// `topup_state_restore_remaining_records{topic,partition}`: how far a restore in
    /// progress has still to read (0 once done).
    pub restore_remaining: LabeledGauge,
}

/// The process's metric registry (namespace `topup`).
pub fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::with_prefix("topup")))
}

/// The pipelines' metrics, registered on first use.
pub fn pipeline_metrics() -> &'static PipelineMetrics {
    static METRICS: OnceLock<PipelineMetrics> = OnceLock::new();
    METRICS.get_or_init(|| PipelineMetrics {
        consumed: LabeledCounter::new("records_consumed", "Records consumed, per topic"),
        produced: LabeledCounter::new("records_produced", "Records produced, per topic"),
        dead_letters: LabeledCounter::new(
            "dead_letters",
            "Records sent to the dead-letter topic, per source topic",
        ),
        dead_letters_unwritten: LabeledCounter::new(
            "dead_letters_unwritten",
            "Refused records passed without a dead letter: the dead-letter topic refused it",
        ),
        lag: LabeledGauge::new("consumer_lag_records", "Records not yet consumed, per partition"),
        restored: LabeledCounter::new(
            "state_restored_records",
            "Changelog records read into local state stores, per changelog topic",
        ),
        restore_remaining: LabeledGauge::new(
            "state_restore_remaining_records",
            "Changelog records a restore in progress has still to read, per partition",
        ),
    })
}

/// The metrics in the Prometheus text format.
pub fn render_metrics() -> String {
    let _ = pipeline_metrics();
    let mut text = String::new();
    let registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!(error = %e, "could not encode the metrics");
    }
    text
}

/// The `/metrics` answer: the metrics in the OpenMetrics text format.
pub fn metrics_response() -> axum::response::Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        render_metrics(),
    )
        .into_response()
}

/// Serves /healthz, /readyz and /metrics on `addr` until `shutdown`.
pub async fn serve_ops(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|| async {
                let status = if health().is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, health().describe())
            }),
        )
        .route("/metrics", get(|| async { metrics_response() }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Starts [`serve_ops`] in the background when `args` asks for it; a failure to bind is
/// logged, not fatal (the service does its work without the endpoints).
pub fn spawn_ops(args: &OpsArgs, shutdown: &CancellationToken) {
    if let Some(addr) = args.http_addr {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_ops(addr, shutdown).await {
                tracing::error!(%addr, error = %e, "could not serve /healthz, /readyz and /metrics");
            }
        });
    }
}

/// Buckets for end-to-end latencies in seconds: 5 ms to about 80 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

/// Seconds from `observed_at` to now (none when the time is missing or in the future).
pub fn seconds_since(observed_at: Option<&topup_proto::Timestamp>) -> Option<f64> {
    let observed = crate::system_time(observed_at?);
    std::time::SystemTime::now().duration_since(observed).ok().map(|d| d.as_secs_f64())
}

/// Registers a metric in the process registry.
pub fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    registry().lock().unwrap_or_else(PoisonError::into_inner).register(name, help, metric);
}

#[cfg(test)]
mod instance_tests {
    use super::*;

    #[tokio::test]
    async fn two_instances_in_one_process_count_apart() {
        let counter = LabeledCounter::new("test_instances", "Counted by two instances");
        as_instance("a", async { counter.inc(&[("kind", "x")]) }).await;
        as_instance("b", async {
            counter.inc(&[("kind", "x")]);
            counter.inc(&[("kind", "x")]);
        })
        .await;
        assert_eq!(counter.sum(&[("instance_id", "a")]), 1);
        assert_eq!(counter.sum(&[("instance_id", "b")]), 2);
        assert_eq!(counter.sum(&[("kind", "x")]), 3);
        let text = render_metrics();
        assert!(
            text.contains(r#"topup_test_instances_total{kind="x",instance_id="b"} 2"#),
            "{text}"
        );
    }
}
