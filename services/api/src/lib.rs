//! `topup-api`: the subscriber's front door. A subscriber (through the carrier's app) sets
//! up a rule as a draft, confirms it with a one-time code the notifier sends, activates,
//! pauses, resumes or deletes it, and reads the history of their top-ups. Rules go to
//! `topup.rules.v1` (protobuf); the API never talks to the evaluator. The history is
//! materialised from `topup.commands.v1` and `topup.results.v1` into SQLite (default) or
//! PostgreSQL. The OpenAPI document is `deploy/openapi.yaml`, served at `/openapi.yaml`.

pub mod auth;
mod contacts;
pub mod error;
pub mod history;
pub mod outbox;
mod routes;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use rdkafka::producer::FutureProducer;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use topup_domain::{CarrierLimits, CodeKey, TokenKeys};
use topup_kafka::KafkaArgs;

pub use auth::{issue, Role};
pub use store::Db;

/// The OpenAPI document, served at `/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../../deploy/openapi.yaml");

/// `topup-api` settings (`--help` lists them with their environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Where the API listens.
    #[arg(long = "api-addr", env = "API_ADDR", default_value = "127.0.0.1:8088")]
    pub addr: SocketAddr,

    /// sqlite://FILE?mode=rwc (created when missing) or postgres://USER:PASSWORD@HOST/DB
    /// (hidden in `--help`: it holds the password).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://topup-api.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,

    /// HS256 key that bearer tokens are signed with (at least 32 bytes).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true, value_parser = topup_kafka::parse_secret)]
    pub jwt_secret: Option<SecretString>,

    /// File holding API_JWT_SECRET (a mounted secret).
    #[arg(long, env = "API_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Key shared with the notifier: seals confirmation codes in records, keys their hashes
    /// (64 hex digits, e.g. `openssl rand -hex 32`).
    #[arg(long, env = "CONFIRMATION_CODE_KEY", hide_env_values = true, value_parser = CodeKey::from_hex)]
    pub code_key: Option<CodeKey>,

    /// File holding CONFIRMATION_CODE_KEY.
    #[arg(long, env = "CONFIRMATION_CODE_KEY_FILE")]
    pub code_key_file: Option<PathBuf>,

    /// Keys shared with the payment worker that seal payment tokens, `id:hex[,id:hex…]`
    /// (64 hex digits each; the first seals, every one opens: rotate by putting a new one
    /// first).
    #[arg(long, env = "PAYMENT_TOKEN_KEYS", hide_env_values = true, value_parser = TokenKeys::parse)]
    pub token_keys: Option<TokenKeys>,

    /// File holding PAYMENT_TOKEN_KEYS.
    #[arg(long, env = "PAYMENT_TOKEN_KEYS_FILE")]
    pub token_keys_file: Option<PathBuf>,

    /// Smallest and largest single top-up per carrier, minor units: `cmcc=1000-50000,*=100-100000`.
    #[arg(long, env = "CARRIER_LIMITS", default_value_t = CarrierLimits::default())]
    pub carrier_limits: CarrierLimits,

    /// How long a confirmation code works (0: codes expire at once; for tests).
    #[arg(long, env = "API_CODE_TTL_SECS", default_value_t = 600)]
    pub code_ttl_secs: u64,

    /// Wrong codes before the draft locks.
    #[arg(long, env = "API_CODE_MAX_ATTEMPTS", default_value_t = 5)]
    pub code_max_attempts: i64,

    /// How long a draft stays locked.
    #[arg(long, env = "API_CODE_LOCK_SECS", default_value_t = 900)]
    pub code_lock_secs: u64,

    /// Largest request body.
    #[arg(long, env = "API_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,

    /// Requests per minute per bearer.
    #[arg(long, env = "API_RATE_LIMIT_PER_MINUTE", default_value_t = 120)]
    pub rate_limit_per_minute: u32,

    /// How long a contact's verification code works, in seconds.
    #[arg(long, env = "API_CONTACT_CODE_TTL_SECS", default_value_t = 600)]
    pub contact_code_ttl_secs: u64,

    /// Codes (for contacts and drafts) sent per hour at most, per subscriber and per
    /// destination.
    #[arg(long, env = "API_CODES_PER_HOUR", default_value_t = 5)]
    pub codes_per_hour: i64,

    /// Codes sent per day at most, per subscriber and per destination.
    #[arg(long, env = "API_CODES_PER_DAY", default_value_t = 10)]
    pub codes_per_day: i64,

    /// Wrong codes per subscriber per 24 hours, across drafts and contacts, before every
    /// code is refused for the rest of the 24 hours.
    #[arg(long, env = "API_WRONG_CODES_PER_DAY", default_value_t = 10)]
    pub wrong_codes_per_day: i64,

    /// Accept the console channel in rules (the embedded demo; never for real
    /// subscribers: it prints their messages, codes included, where operators read).
    #[arg(long, env = "API_ALLOW_CONSOLE", default_value_t = false)]
    pub allow_console: bool,

    /// Consumer group of the history.
    #[arg(
        long = "api-history-group",
        env = "API_HISTORY_GROUP",
        default_value = "topup-api-history"
    )]
    pub history_group: String,
}

impl Config {
    /// Defaults, with `kafka`, the secrets and the database given.
    pub fn new(
        kafka: KafkaArgs,
        database_url: &str,
        jwt_secret: &str,
        code_key: CodeKey,
        token_keys: TokenKeys,
    ) -> Self {
        Self {
            kafka,
            database_url: database_url.to_string(),
            jwt_secret: Some(SecretString::from(jwt_secret.to_string())),
            code_key: Some(code_key),
            token_keys: Some(token_keys),
            ..topup_kafka::clap_defaults()
        }
    }

    fn jwt_secret(&self) -> anyhow::Result<Vec<u8>> {
        let secret = topup_kafka::secret_or_file(
            self.jwt_secret.as_ref(),
            self.jwt_secret_file.as_deref(),
            "API_JWT_SECRET",
        )
        .map_err(anyhow::Error::msg)?
        .context("API_JWT_SECRET (or API_JWT_SECRET_FILE) is required")?
        .expose_secret()
        .as_bytes()
        .to_vec();
        anyhow::ensure!(secret.len() >= 32, "API_JWT_SECRET must be at least 32 bytes");
        Ok(secret)
    }

    fn token_keys(&self) -> anyhow::Result<TokenKeys> {
        match (&self.token_keys, &self.token_keys_file) {
            (Some(keys), _) => Ok(keys.clone()),
            (None, Some(path)) => {
                let text = topup_kafka::read_secret_file(path, "PAYMENT_TOKEN_KEYS_FILE")
                    .map_err(anyhow::Error::msg)?;
                Ok(TokenKeys::parse(text.expose_secret())?)
            }
            (None, None) => anyhow::bail!(
                "PAYMENT_TOKEN_KEYS (or PAYMENT_TOKEN_KEYS_FILE) is required: payment tokens are \
                 sealed with it before they are stored or published"
            ),
        }
    }

    fn key(&self) -> anyhow::Result<CodeKey> {
        match (&self.code_key, &self.code_key_file) {
            (Some(key), _) => Ok(key.clone()),
            (None, Some(path)) => {
                let text = topup_kafka::read_secret_file(path, "CONFIRMATION_CODE_KEY_FILE")
                    .map_err(anyhow::Error::msg)?;
                Ok(CodeKey::from_hex(text.expose_secret())?)
            }
            (None, None) => {
                anyhow::bail!("CONFIRMATION_CODE_KEY (or CONFIRMATION_CODE_KEY_FILE) is required")
            }
        }
    }
}

/// Settings the handlers use.
#[derive(Debug, Clone)]
struct Settings {
    code_ttl: Duration,
    code_max_attempts: i64,
    code_lock: Duration,
    max_body_bytes: usize,
    contact_code_ttl: Duration,
    codes_per_hour: i64,
    codes_per_day: i64,
    wrong_codes_per_day: i64,
    allow_console: bool,
}

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    db: Db,
    gate: auth::Gate,
    producer: FutureProducer,
    outbox: Arc<outbox::Outbox>,
    code_key: CodeKey,
    token_keys: TokenKeys,
    limits: CarrierLimits,
    settings: Settings,
    history_ready: Arc<AtomicBool>,
}

/// A running API.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Ends when it stops.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn router(app: App) -> axum::Router {
    let max_body = app.settings.max_body_bytes;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { topup_kafka::ops::metrics_response() }))
        .route(
            "/openapi.yaml",
            get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
        )
        .route("/v1/subscribers/{subscriber}/draft", put(routes::put_draft).get(routes::get_draft))
        .route("/v1/subscribers/{subscriber}/draft/confirm", post(routes::confirm))
        .route(
            "/v1/subscribers/{subscriber}/contacts",
            post(contacts::add_contact).get(contacts::list_contacts),
        )
        .route("/v1/subscribers/{subscriber}/contacts/verify", post(contacts::verify_contact))
        .route(
            "/v1/subscribers/{subscriber}/rule",
            get(routes::get_rule).delete(routes::delete_rule),
        )
        .route("/v1/subscribers/{subscriber}/rule/{action}", post(routes::change_rule))
        .route("/v1/subscribers/{subscriber}/history", get(routes::history))
        .route("/v1/subscribers/{subscriber}/history.csv", get(routes::history_csv))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(app)
}

/// Counts every answer in `topup_api_requests_total{method,route,status}` (the route as
/// declared, `/v1/subscribers/{subscriber}/...`: no subscriber id in a label).
async fn count_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    static COUNTER: std::sync::OnceLock<topup_kafka::ops::LabeledCounter> =
        std::sync::OnceLock::new();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    COUNTER
        .get_or_init(|| {
            topup_kafka::ops::LabeledCounter::new(
                "api_requests",
                "API answers, by route and status",
            )
        })
        .inc(&[("method", &method), ("route", &route), ("status", &status)]);
    response
}

async fn readyz(axum::extract::State(app): axum::extract::State<App>) -> impl IntoResponse {
    let database = app.db.ping().await;
    let history = app.history_ready.load(Ordering::Relaxed);
    let status = if database && history { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, format!("database: {}\nhistory consumer: {}\n", ok(database), ok(history)))
}

fn ok(yes: bool) -> &'static str {
    if yes {
        "ready"
    } else {
        "not ready"
    }
}

/// Opens the database, starts the history consumer and serves the API on `config.addr`
/// (port 0: any free port) until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let jwt = config.jwt_secret()?;
    let code_key = config.key()?;
    let token_keys = config.token_keys()?;
    let db = Db::connect(&config.database_url).await?;
    let producer: FutureProducer = config.kafka.producer().create()?;
    let history_ready = Arc::new(AtomicBool::new(false));
    let gate = auth::Gate::new(&jwt, config.rate_limit_per_minute);
    let outbox = Arc::new(outbox::Outbox::default());
    let app = App {
        db: db.clone(),
        gate: gate.clone(),
        producer,
        outbox: outbox.clone(),
        code_key,
        token_keys,
        limits: config.carrier_limits.clone(),
        settings: Settings {
            code_ttl: Duration::from_secs(config.code_ttl_secs),
            code_max_attempts: config.code_max_attempts.max(1),
            code_lock: Duration::from_secs(config.code_lock_secs),
            max_body_bytes: config.max_body_bytes,
            contact_code_ttl: Duration::from_secs(config.contact_code_ttl_secs),
            codes_per_hour: config.codes_per_hour,
            codes_per_day: config.codes_per_day,
            wrong_codes_per_day: config.wrong_codes_per_day,
            allow_console: config.allow_console,
        },
        history_ready: history_ready.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("API_ADDR {}: cannot listen", config.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = db.kind, "topup-api listening");
    // Every task of this API in one set: aborting `Running::task` ends them all at once, as
    // a killed process would.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(history::run(
        config.kafka.clone(),
        config.history_group.clone(),
        db.clone(),
        history_ready,
        shutdown.clone(),
    ));
    let holder = topup_kafka::instance_id("topup-api");
    // Its own producer, whose sends are delivered or failed within 10 s of being queued
    // (see `outbox::relay_round` for why that matters).
    let relay_producer: FutureProducer =
        config.kafka.producer().set("message.timeout.ms", "10000").create()?;
    tasks.spawn(outbox::relay(db, relay_producer, outbox, holder, shutdown.clone()));
    let forget = shutdown.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = forget.cancelled() => break,
                _ = every.tick() => gate.forget_idle(),
            }
        }
        Ok(())
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await?;
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    });
    Ok(Running { addr, task })
}

/// The `topup-api` command line.
pub async fn main_from_args() -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    #[command(version, about = "Subscriber API: draft, confirm, activate rules; top-up history")]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }
    let cli = <Cli as clap::Parser>::parse();
    let shutdown = topup_kafka::start_service(&topup_kafka::OpsArgs::default(), "topup-api")
        .map_err(anyhow::Error::msg)?;
    let running = start(cli.config, shutdown).await?;
    let ran = running.task.await;
    topup_kafka::finish_service().await;
    ran??;
    Ok(())
}
