//! Process plumbing every binary shares: logging and the shutdown signal.
use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

/// Log lines on stderr: readable on a terminal — one line per thing that happened, time
/// since start, colours — and JSON objects elsewhere (containers), unless `LOG_FORMAT` says
/// `text` or `json`. `RUST_LOG` filters (default `info`, Kafka client chatter at `warn`).
/// With a tracer provider installed (see [`crate::telemetry`]), the pipeline's spans are
/// exported through the OpenTelemetry bridge; they are never written as log lines. Only
/// the first call in a process counts.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, Layer, Registry};

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    // The spans of the trace are for the exporter; as log lines they would only prefix
    // every line with their attributes.
    let not_trace = filter_fn(|meta| meta.target() != crate::telemetry::SPAN_TARGET);
    let terminal = std::io::stderr().is_terminal();
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !terminal,
    };
    let lines: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(filter.and(not_trace))
            .boxed()
    } else {
        fmt::layer()
            .compact()
            .with_target(false)
            .with_timer(fmt::time::uptime())
            .with_ansi(terminal)
            .with_writer(std::io::stderr)
            .with_filter(filter.and(not_trace))
            .boxed()
    };
    let spans = crate::telemetry::tracer().map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|meta| meta.target() == crate::telemetry::SPAN_TARGET))
    });
    let _ = Registry::default().with(lines).with(spans).try_init();
}

/// A token cancelled on Ctrl-C or SIGTERM: services finish their batch and stop.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        // Ctrl-C at a terminal.
                        _ = tokio::signal::ctrl_c() => {}
                        // SIGTERM from a container runtime.
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested; finishing the current batch");
        cancel.cancel();
    });
    token
}

/// A transactional id unique to this instance: `<service>-<host>-<pid>`, and `-<n>` after
/// it for the second and later instances of `service` in one process (tests, the embedded
/// demo). New with every process: a restarted instance does not fence its predecessor (its
/// open transaction is aborted after the transaction timeout); give it a stable id
/// (`*_TRANSACTIONAL_ID`) for that (docs/kafka.md, "Instance identity").
pub fn instance_id(service: &str) -> String {
    static STARTED: std::sync::Mutex<BTreeMap<String, u32>> =
        std::sync::Mutex::new(BTreeMap::new());
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let n = STARTED.lock().map_or(0, |mut started| {
        let n = started.entry(service.to_string()).or_default();
        *n += 1;
        *n - 1
    });
    match n {
        0 => format!("{service}-{host}-{}", std::process::id()),
        n => format!("{service}-{host}-{}-{n}", std::process::id()),
    }
}

/// What every service binary does before its work: logging, OpenTelemetry export when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`service` is its `service.name`), the shutdown
/// signal, and the health and metrics endpoints when `ops` asks for them. Returns the
/// shutdown token; an unusable telemetry setting is an error naming the variable.
pub fn start_service(ops: &crate::OpsArgs, service: &str) -> Result<CancellationToken, String> {
    // Export first: the bridge for spans is part of the logging subscriber.
    crate::telemetry::init(service)?;
    init_logging();
    let shutdown = shutdown_on_signal();
    crate::spawn_ops(ops, &shutdown);
    Ok(shutdown)
}

/// What every service binary does after its work: sends the spans and metrics still
/// buffered.
pub async fn finish_service() {
    let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown).await;
}
