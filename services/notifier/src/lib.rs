//! Notifier worker: consumes `NotificationCommand`s, decides with its [`policy`] whether and
//! when each goes out, renders it from the [`templates`] in the subscriber's language,
//! delivers it on a [`channel`], and publishes a `DeliveryReceipt` per attempt — in the
//! transaction that commits the input offset and the subscriber's delivery history.

pub mod channel;
pub mod metrics;
pub mod notifier;
pub mod policy;
pub mod templates;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use topup_domain::CodeKey;
use topup_kafka::{run_pipeline, KafkaArgs, PipelineSpec};
use topup_proto::topics;

pub use channel::{
    Channel, Channels, Console, NoConsole, Smtp, SmtpConfig, SmtpTls, Webhook, WebhookConfig,
};
pub use notifier::Notifier;
pub use policy::{Policy, QuietHours, QuietHoursSetting, RateLimits, RetrySchedule};

/// `topup-notifier` settings; `--help` lists them with their environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Health and metrics endpoints.
    #[command(flatten)]
    pub ops: topup_kafka::OpsArgs,

    /// Consumer group of all notifier instances.
    #[arg(long = "notifier-group", env = "NOTIFIER_GROUP", default_value = "topup-notifier")]
    pub group_id: String,

    /// Transactional id prefix; unique per instance (derived from host and pid by default).
    #[arg(long = "notifier-transactional-id", env = "NOTIFIER_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Notifications processed per transaction.
    #[arg(long = "notifier-max-batch", env = "NOTIFIER_MAX_BATCH", default_value_t = 200)]
    pub max_batch: usize,

    /// SMTP server for e-mail (without it, see NOTIFIER_PRINT_UNCONFIGURED).
    #[arg(long, env = "SMTP_HOST")]
    pub smtp_host: Option<String>,

    /// SMTP port (587 for STARTTLS, 465 for TLS, 1025 for a mail catcher).
    #[arg(long, env = "SMTP_PORT", default_value_t = 587)]
    pub smtp_port: u16,

    /// SMTP connection protection.
    #[arg(long, env = "SMTP_TLS", value_enum, default_value_t = SmtpTls::Starttls)]
    pub smtp_tls: SmtpTls,

    /// SMTP user name (with SMTP_PASSWORD), when the server wants authentication.
    #[arg(long, env = "SMTP_USERNAME")]
    pub smtp_username: Option<String>,

    /// SMTP password.
    #[arg(long, env = "SMTP_PASSWORD", hide_env_values = true, value_parser = topup_kafka::parse_secret)]
    pub smtp_password: Option<SecretString>,

    /// Sender of the e-mails.
    #[arg(long, env = "SMTP_FROM", default_value = "Auto top-up <topup@localhost>")]
    pub smtp_from: String,

    /// SMS webhook endpoint (without it, see NOTIFIER_PRINT_UNCONFIGURED; hidden in
    /// `--help`: a provider's URL may carry a token).
    #[arg(long, env = "SMS_WEBHOOK_URL", hide_env_values = true)]
    pub sms_webhook_url: Option<String>,

    /// Push webhook endpoint (without it, see NOTIFIER_PRINT_UNCONFIGURED; hidden in
    /// `--help`: a provider's URL may carry a token).
    #[arg(long, env = "PUSH_WEBHOOK_URL", hide_env_values = true)]
    pub push_webhook_url: Option<String>,

    /// HMAC-SHA256 secret signing the webhook requests (prefer the file).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, value_parser = topup_kafka::parse_secret)]
    pub webhook_secret: Option<SecretString>,

    /// File holding the webhook signing secret.
    #[arg(long, env = "WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Print on standard output what has no provider here: e-mail without SMTP_HOST, SMS
    /// without SMS_WEBHOOK_URL, push without PUSH_WEBHOOK_URL, and the console channel
    /// kind. Off, the notifier refuses to start while e-mail, SMS or push has no provider,
    /// and a console-kind delivery fails. For demos and local runs: the text printed
    /// includes confirmation codes.
    #[arg(long = "notifier-print-unconfigured", env = "NOTIFIER_PRINT_UNCONFIGURED")]
    pub print_unconfigured: bool,

    /// Longest wait for an SMTP server or a webhook, in milliseconds.
    #[arg(long, env = "CHANNEL_TIMEOUT_MS", default_value_t = 5_000)]
    pub channel_timeout_ms: u64,

    /// Local hours (in the time zone of the subscriber's locale) when non-urgent messages
    /// are held until the end; "off" sends at any hour.
    #[arg(long, env = "QUIET_HOURS", default_value = "22:00-08:00")]
    pub quiet_hours: QuietHoursSetting,

    /// Rate limits per subscriber and kind, KIND=N/PERIOD separated by commas; urgent
    /// messages are never limited.
    #[arg(
        long,
        env = "NOTIFIER_RATE_LIMITS",
        default_value = DEFAULT_RATE_LIMITS
    )]
    pub rate_limits: RateLimits,

    /// Attempts per channel for transient failures.
    #[arg(long, env = "DELIVERY_MAX_ATTEMPTS", default_value_t = 5)]
    pub delivery_max_attempts: u32,

    /// Wait before the first delivery retry, in milliseconds; doubles for each further one.
    #[arg(long, env = "DELIVERY_INITIAL_BACKOFF_MS", default_value_t = 1_000)]
    pub delivery_initial_backoff_ms: u64,

    /// Longest wait between delivery attempts, in milliseconds.
    #[arg(long, env = "DELIVERY_MAX_BACKOFF_MS", default_value_t = 60_000)]
    pub delivery_max_backoff_ms: u64,

    /// How long notification ids are remembered to drop replays, in hours.
    #[arg(long, env = "DEDUP_WINDOW_HOURS", default_value_t = 72)]
    pub dedup_window_hours: u64,

    /// Subscribers delivered to at once within a batch (each subscriber's messages stay in
    /// order).
    #[arg(long = "notifier-concurrency", env = "NOTIFIER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// Key shared with topup-api to open confirmation codes (64 hex digits); without it,
    /// confirmation-code notifications go to the DLQ.
    #[arg(long, env = "CONFIRMATION_CODE_KEY", hide_env_values = true, value_parser = CodeKey::from_hex)]
    pub confirmation_code_key: Option<CodeKey>,

    /// File holding CONFIRMATION_CODE_KEY (a mounted secret).
    #[arg(long, env = "CONFIRMATION_CODE_KEY_FILE")]
    pub confirmation_code_key_file: Option<PathBuf>,
}

const DEFAULT_RATE_LIMITS: &str =
    "LOW_BALANCE=1/24h,CAP_REACHED=1/24h,PAYMENT_METHOD_PROBLEM=1/24h";

impl Config {
    /// Defaults, connected to `kafka`: no provider and no printing, so [`Config::channels`]
    /// refuses until one of them is set; tests and the embedded demo hand their
    /// [`Channels`] to [`run`].
    pub fn new(kafka: KafkaArgs) -> Self {
        Self { kafka, ..topup_kafka::clap_defaults() }
    }

    /// The confirmation-code key, from the value or the file.
    pub fn code_key(&self) -> anyhow::Result<Option<CodeKey>> {
        match (&self.confirmation_code_key, &self.confirmation_code_key_file) {
            (Some(key), _) => Ok(Some(key.clone())),
            (None, Some(path)) => {
                let text = topup_kafka::read_secret_file(path, "CONFIRMATION_CODE_KEY_FILE")
                    .map_err(anyhow::Error::msg)?;
                Ok(Some(CodeKey::from_hex(text.expose_secret())?))
            }
            (None, None) => Ok(None),
        }
    }

    /// The delivery policy these settings describe.
    pub fn policy(&self) -> Policy {
        Policy {
            rate_limits: self.rate_limits.0.clone(),
            quiet_hours: self.quiet_hours.0,
            retry: RetrySchedule {
                max_attempts: self.delivery_max_attempts.max(1),
                initial_backoff: Duration::from_millis(self.delivery_initial_backoff_ms),
                max_backoff: Duration::from_millis(
                    self.delivery_max_backoff_ms.max(self.delivery_initial_backoff_ms),
                ),
            },
            dedup_window: Duration::from_secs(self.dedup_window_hours * 3600),
            max_remembered: 500,
        }
    }

    /// The channels these settings describe: SMTP and webhooks where configured. A kind
    /// without a provider is refused unless [`Config::print_unconfigured`] says to print
    /// it: any rule may name any kind, and a subscriber's messages must not end up in the
    /// logs because a variable was forgotten.
    pub fn channels(&self) -> anyhow::Result<Channels> {
        let timeout = Duration::from_millis(self.channel_timeout_ms.max(1));
        let email = match &self.smtp_host {
            None => None,
            Some(host) => Some(Smtp::new(&SmtpConfig {
                host: host.clone(),
                port: self.smtp_port,
                tls: self.smtp_tls,
                credentials: match (&self.smtp_username, &self.smtp_password) {
                    (Some(user), Some(password)) => Some((user.clone(), password.clone())),
                    (None, None) => None,
                    _ => anyhow::bail!("SMTP_USERNAME and SMTP_PASSWORD go together"),
                },
                from: self.smtp_from.clone(),
                timeout,
            })?),
        };
        let webhook = |url: &Option<String>| -> anyhow::Result<Option<Webhook>> {
            let Some(url) = url else { return Ok(None) };
            let secret = topup_kafka::secret_or_file(
                self.webhook_secret.as_ref(),
                self.webhook_secret_file.as_deref(),
                "WEBHOOK_SECRET",
            )
            .map_err(anyhow::Error::msg)?
            .context("a webhook URL needs WEBHOOK_SECRET or WEBHOOK_SECRET_FILE")?;
            Ok(Some(Webhook::new(WebhookConfig { url: url.clone(), secret, timeout })?))
        };
        let channels = Channels {
            email,
            sms: webhook(&self.sms_webhook_url)?,
            push: webhook(&self.push_webhook_url)?,
        };
        let unconfigured: Vec<&str> = [
            (channels.email.is_none(), "e-mail (SMTP_HOST)"),
            (channels.sms.is_none(), "SMS (SMS_WEBHOOK_URL)"),
            (channels.push.is_none(), "push (PUSH_WEBHOOK_URL)"),
        ]
        .into_iter()
        .filter_map(|(missing, kind)| missing.then_some(kind))
        .collect();
        if !unconfigured.is_empty() && !self.print_unconfigured {
            anyhow::bail!(
                "no provider for {}: configure one for each kind, or set \
                 NOTIFIER_PRINT_UNCONFIGURED=true (--notifier-print-unconfigured) to print \
                 those messages on standard output (demos and local runs only)",
                unconfigured.join(", ")
            );
        }
        Ok(channels)
    }
}

/// The `topup-notifier` command line: parse, log, run until Ctrl-C or SIGTERM.
pub async fn main_from_args() -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    #[command(
        version,
        about = "Notifier: notification commands -> messages in the subscriber's language"
    )]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }
    let cli = <Cli as clap::Parser>::parse();
    // Before anything starts: a kind without a provider stops the notifier here.
    let channels = cli.config.channels()?;
    let shutdown = topup_kafka::start_service(&cli.config.ops, "topup-notifier")
        .map_err(anyhow::Error::msg)?;
    let print = cli.config.print_unconfigured;
    tracing::info!(
        channels = %channels.describe(),
        print_unconfigured = print,
        "notifier channels"
    );
    let ran = if print {
        run(cli.config, channels, shutdown).await
    } else {
        run(cli.config, channels.without_console(), shutdown).await
    };
    topup_kafka::finish_service().await;
    ran?;
    Ok(())
}

/// Runs the notifier, delivering through `channel`, until `shutdown` is cancelled.
pub async fn run<C: Channel + Clone>(
    config: Config,
    channel: C,
    shutdown: CancellationToken,
) -> topup_kafka::Result<()> {
    let policy = config.policy();
    let spec = PipelineSpec {
        service: "topup-notifier",
        group_id: config.group_id.clone(),
        transactional_id: config
            .transactional_id
            .clone()
            .unwrap_or_else(|| topup_kafka::instance_id("topup-notifier")),
        inputs: vec![topics::NOTIFICATIONS],
        max_batch: config.max_batch,
        // Held and retried messages go out within this of being due.
        tick_every: Some(Duration::from_millis(200)),
        kafka: config.kafka.clone(),
    };
    let key = config.code_key().map_err(|e| topup_kafka::Error::Config(format!("{e:#}")))?;
    let concurrency = config.concurrency;
    run_pipeline(
        spec,
        || {
            Notifier::new(channel.clone(), policy.clone())
                .with_code_key(key.clone())
                .with_concurrency(concurrency)
        },
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(config: &Config) -> String {
        config.channels().err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    // In a runtime: the SMTP transport may start its connection pool.
    #[tokio::test]
    async fn a_kind_without_a_provider_is_refused_naming_its_variable_and_the_flag() {
        let mut config = Config::new(KafkaArgs::new("localhost:9092"));
        config.smtp_host = Some("127.0.0.1".into());
        config.smtp_tls = SmtpTls::None;
        let error = refusal(&config);
        for expected in ["SMS_WEBHOOK_URL", "PUSH_WEBHOOK_URL", "NOTIFIER_PRINT_UNCONFIGURED"] {
            assert!(error.contains(expected), "{expected} not in {error:?}");
        }
        assert!(!error.contains("SMTP_HOST"), "e-mail has a provider: {error:?}");
    }

    #[test]
    fn kinds_without_a_provider_are_printed_only_when_asked_for() {
        let config =
            Config { print_unconfigured: true, ..Config::new(KafkaArgs::new("localhost:9092")) };
        assert!(config.channels().is_ok());
    }

    // In a runtime: the SMTP transport may start its connection pool.
    #[tokio::test]
    async fn every_kind_with_a_provider_starts_without_printing() {
        let mut config = Config::new(KafkaArgs::new("localhost:9092"));
        config.smtp_host = Some("127.0.0.1".into());
        config.smtp_tls = SmtpTls::None;
        config.sms_webhook_url = Some("http://127.0.0.1:9/sms".into());
        config.push_webhook_url = Some("http://127.0.0.1:9/push".into());
        config.webhook_secret = Some(SecretString::from("webhook-secret".to_string()));
        let channels = config.channels().map_err(|e| format!("{e:#}"));
        assert!(channels.is_ok(), "{channels:?}");
    }
}
