//! Payment worker: consumes `TopUpCommand`s, charges through a [`gateway`], publishes one
//! `TopUpResult` and one notification per command, in the transaction that commits the
//! command's offset. A replay reaches the gateway with the same idempotency key.
//!
//! Two lanes run side by side: the command lane (`topup.commands.v1`) and the retry lane
//! (`topup.payment-retries.v1`, charges parked after a transient error); see [`worker`].

pub mod gateway;
pub mod metrics;
pub mod reason;
pub mod rules;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use topup_kafka::{run_pipeline, KafkaArgs, PipelineSpec};
use topup_proto::topics;

pub use gateway::{
    AlipayAgreements, AlipayConfig, AnyGateway, HttpGateway, HttpGatewayConfig, PaymentGateway,
    Rails, Sandbox, StripeCards, StripeConfig,
};
pub use rules::RuleView;
pub use worker::{CommandAges, Limits, PaymentWorker, RetryPolicy};

/// Which gateway charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GatewayKind {
    /// The deterministic sandbox: test tokens decide the outcome, no money moves.
    Sandbox,
    /// The HTTP gateway client (`--payment-gateway-url`, signed with the shared secret).
    Http,
}

/// Which gateway charges Alipay methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlipayRail {
    /// The `--payment-gateway`, like every other kind.
    Gateway,
    /// Alipay's open platform, agreement deduction (`--alipay-*`).
    Alipay,
}

/// Which gateway charges cards and debit cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CardRail {
    /// The `--payment-gateway`, like every other kind.
    Gateway,
    /// Stripe's PaymentIntents, off-session (`--stripe-*`).
    Stripe,
}

/// `topup-payment-worker` settings; `--help` lists them with their environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Health and metrics endpoints.
    #[command(flatten)]
    pub ops: topup_kafka::OpsArgs,

    /// Consumer group of all payment worker instances (the retry lane uses
    /// "<group>-retries").
    #[arg(long = "payment-group", env = "PAYMENT_GROUP", default_value = "topup-payment-worker")]
    pub group_id: String,

    /// Transactional id prefix; unique per instance (derived from host and pid by default).
    #[arg(long = "payment-transactional-id", env = "PAYMENT_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Which gateway charges; required, so that a worker never charges through the
    /// sandbox (or a real provider) by accident.
    #[arg(long = "payment-gateway", env = "PAYMENT_GATEWAY", value_enum)]
    pub gateway: Option<GatewayKind>,

    /// Charge endpoint of the HTTP gateway, e.g. https://pay.example.com/v1/charges
    /// (hidden in `--help`: a URL may carry credentials).
    #[arg(long = "payment-gateway-url", env = "PAYMENT_GATEWAY_URL", hide_env_values = true)]
    pub gateway_url: Option<String>,

    /// HMAC-SHA256 signing secret shared with the HTTP gateway (prefer the file).
    #[arg(long = "payment-gateway-secret", env = "PAYMENT_GATEWAY_SECRET", hide_env_values = true, value_parser = topup_kafka::parse_secret)]
    pub gateway_secret: Option<SecretString>,

    /// File holding the signing secret (a mounted Kubernetes Secret, say).
    #[arg(long = "payment-gateway-secret-file", env = "PAYMENT_GATEWAY_SECRET_FILE")]
    pub gateway_secret_file: Option<PathBuf>,

    /// Which gateway charges cards and debit cards: `gateway` (the --payment-gateway) or
    /// `stripe`.
    #[arg(long, env = "CARD_RAIL", value_enum, default_value_t = CardRail::Gateway)]
    pub card_rail: CardRail,

    /// Stripe's API address (a test server's in tests; hidden in `--help` like every URL).
    #[arg(
        long,
        env = "STRIPE_API_URL",
        hide_env_values = true,
        default_value = "https://api.stripe.com"
    )]
    pub stripe_api_url: String,

    /// File holding the Stripe secret (or restricted) key, `sk_live_…` / `rk_live_…`.
    #[arg(long, env = "STRIPE_SECRET_KEY_FILE")]
    pub stripe_secret_key_file: Option<PathBuf>,

    /// The Stripe secret key itself (prefer the file).
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true, value_parser = topup_kafka::parse_secret)]
    pub stripe_secret_key: Option<SecretString>,

    /// The API version the requests are written for, sent as `Stripe-Version`.
    #[arg(long, env = "STRIPE_API_VERSION", default_value = gateway::stripe::API_VERSION)]
    pub stripe_api_version: String,

    /// Which gateway charges Alipay methods: `gateway` (the --payment-gateway) or `alipay`.
    #[arg(long, env = "ALIPAY_RAIL", value_enum, default_value_t = AlipayRail::Gateway)]
    pub alipay_rail: AlipayRail,

    /// Alipay's open platform gateway (a test server's in tests).
    #[arg(
        long,
        env = "ALIPAY_GATEWAY_URL",
        hide_env_values = true,
        default_value = "https://openapi.alipay.com/gateway.do"
    )]
    pub alipay_gateway_url: String,

    /// The merchant application's id on Alipay's open platform.
    #[arg(long, env = "ALIPAY_APP_ID")]
    pub alipay_app_id: Option<String>,

    /// File holding the application's RSA private key (PEM PKCS#1 or PKCS#8, or the bare
    /// base64 of Alipay's key tool).
    #[arg(long, env = "ALIPAY_PRIVATE_KEY_FILE")]
    pub alipay_private_key_file: Option<PathBuf>,

    /// File holding Alipay's public key (from the open platform's console), which signs its
    /// answers.
    #[arg(long, env = "ALIPAY_PUBLIC_KEY_FILE")]
    pub alipay_public_key_file: Option<PathBuf>,

    /// The order title on the subscriber's Alipay bill.
    #[arg(long, env = "ALIPAY_SUBJECT", default_value = "Mobile auto top-up")]
    pub alipay_subject: String,

    /// Longest wait for one gateway answer, in milliseconds; a timeout is a transient
    /// failure, retried later with the same idempotency key.
    #[arg(
        long = "payment-gateway-timeout-ms",
        env = "PAYMENT_GATEWAY_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub gateway_timeout_ms: u64,

    /// Largest single charge accepted, in minor units, whatever the command says.
    #[arg(long, env = "MAX_SINGLE_CHARGE_MINOR", default_value_t = 100_000)]
    pub max_single_charge_minor: i64,

    /// Attempts per payment method for transient gateway errors.
    #[arg(long = "payment-max-attempts", env = "PAYMENT_MAX_ATTEMPTS", default_value_t = 6)]
    pub max_attempts: u32,

    /// Wait before the first retry, in milliseconds; doubles for each further one.
    #[arg(
        long = "payment-initial-backoff-ms",
        env = "PAYMENT_INITIAL_BACKOFF_MS",
        default_value_t = 500
    )]
    pub initial_backoff_ms: u64,

    /// Longest wait between two attempts, in milliseconds.
    #[arg(
        long = "payment-max-backoff-ms",
        env = "PAYMENT_MAX_BACKOFF_MS",
        default_value_t = 10_000
    )]
    pub max_backoff_ms: u64,

    /// No retry is scheduled later than this many seconds after a command arrived.
    #[arg(
        long = "payment-retry-deadline-secs",
        env = "PAYMENT_RETRY_DEADLINE_SECS",
        default_value_t = 300
    )]
    pub retry_deadline_secs: u64,

    /// The longest a command may wait before it is charged, per payment rail
    /// (`kind=seconds`, `*` for the rest): older commands are cancelled, not charged.
    #[arg(
        long = "payment-max-command-age",
        env = "PAYMENT_MAX_COMMAND_AGE",
        default_value_t = CommandAges::default(),
        value_parser = CommandAges::parse
    )]
    pub max_command_age: CommandAges,

    /// How long the gateway remembers an idempotency key, in seconds: an unknown outcome is
    /// resolved only by status lookup once the key is near the end of it.
    #[arg(
        long = "payment-gateway-key-retention-secs",
        env = "PAYMENT_GATEWAY_KEY_RETENTION_SECS",
        default_value_t = 86_400
    )]
    pub key_retention_secs: u64,

    /// Keys that open sealed payment tokens (`id:hex[,id:hex…]`, the API's
    /// PAYMENT_TOKEN_KEYS). Without them a sealed token cannot be charged (that method is
    /// refused); clear tokens from before sealing are charged as they are.
    #[arg(long, env = "PAYMENT_TOKEN_KEYS", hide_env_values = true, value_parser = topup_domain::TokenKeys::parse)]
    pub token_keys: Option<topup_domain::TokenKeys>,

    /// File holding PAYMENT_TOKEN_KEYS.
    #[arg(long, env = "PAYMENT_TOKEN_KEYS_FILE")]
    pub token_keys_file: Option<PathBuf>,

    /// Subscribers charged at once within a batch.
    #[arg(long = "payment-concurrency", env = "PAYMENT_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,

    /// Commands processed per transaction.
    #[arg(long = "payment-max-batch", env = "PAYMENT_MAX_BATCH", default_value_t = 100)]
    pub max_batch: usize,
}

impl Config {
    /// Defaults, connected to `kafka`. No gateway is chosen ([`Config::gateway()`] refuses
    /// until one is); tests and the embedded demo hand theirs to [`run`].
    pub fn new(kafka: KafkaArgs) -> Self {
        Self { kafka, ..topup_kafka::clap_defaults() }
    }

    /// The keys that open sealed tokens, if any are given.
    pub fn token_keys(&self) -> anyhow::Result<Option<topup_domain::TokenKeys>> {
        match (&self.token_keys, &self.token_keys_file) {
            (Some(keys), _) => Ok(Some(keys.clone())),
            (None, Some(path)) => {
                let text = topup_kafka::read_secret_file(path, "PAYMENT_TOKEN_KEYS_FILE")
                    .map_err(anyhow::Error::msg)?;
                Ok(Some(topup_domain::TokenKeys::parse(secrecy::ExposeSecret::expose_secret(
                    &text,
                ))?))
            }
            (None, None) => Ok(None),
        }
    }

    /// The retry schedule these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms.max(self.initial_backoff_ms)),
            deadline: Duration::from_secs(self.retry_deadline_secs),
        }
    }

    /// The configured gateways: the default, and the card rail's when it has its own.
    pub fn gateway(&self) -> anyhow::Result<Rails> {
        let default = self.default_gateway()?;
        let cards = match self.card_rail {
            CardRail::Gateway => None,
            CardRail::Stripe => Some(AnyGateway::Stripe(self.stripe()?)),
        };
        let alipay = match self.alipay_rail {
            AlipayRail::Gateway => None,
            AlipayRail::Alipay => Some(AnyGateway::Alipay(self.alipay()?)),
        };
        Ok(Rails { default, cards, alipay })
    }

    /// The Alipay connector these settings describe.
    fn alipay(&self) -> anyhow::Result<AlipayAgreements> {
        let app_id =
            self.alipay_app_id.clone().context("ALIPAY_RAIL=alipay needs ALIPAY_APP_ID")?;
        let read = |path: &Option<PathBuf>, variable: &str| -> anyhow::Result<String> {
            let path =
                path.as_deref().with_context(|| format!("ALIPAY_RAIL=alipay needs {variable}"))?;
            let text = topup_kafka::read_secret_file(path, variable).map_err(anyhow::Error::msg)?;
            Ok(secrecy::ExposeSecret::expose_secret(&text).to_string())
        };
        let private_key = gateway::alipay::private_key(&read(
            &self.alipay_private_key_file,
            "ALIPAY_PRIVATE_KEY_FILE",
        )?)
        .map_err(|e| anyhow::anyhow!("ALIPAY_PRIVATE_KEY_FILE: {e}"))?;
        let alipay_public_key = gateway::alipay::public_key(&read(
            &self.alipay_public_key_file,
            "ALIPAY_PUBLIC_KEY_FILE",
        )?)
        .map_err(|e| anyhow::anyhow!("ALIPAY_PUBLIC_KEY_FILE: {e}"))?;
        AlipayAgreements::new(AlipayConfig {
            gateway_url: self.alipay_gateway_url.clone(),
            app_id,
            private_key,
            alipay_public_key,
            subject: self.alipay_subject.clone(),
            timeout: Duration::from_millis(self.gateway_timeout_ms.max(1)),
        })
        .context("building the Alipay client")
    }

    /// The Stripe card connector these settings describe.
    fn stripe(&self) -> anyhow::Result<StripeCards> {
        let secret_key = topup_kafka::secret_or_file(
            self.stripe_secret_key.as_ref(),
            self.stripe_secret_key_file.as_deref(),
            "STRIPE_SECRET_KEY",
        )
        .map_err(anyhow::Error::msg)?
        .context("CARD_RAIL=stripe needs the secret key: STRIPE_SECRET_KEY_FILE")?;
        StripeCards::new(StripeConfig {
            api_base: self.stripe_api_url.clone(),
            secret_key,
            api_version: self.stripe_api_version.clone(),
            timeout: Duration::from_millis(self.gateway_timeout_ms.max(1)),
        })
        .context("building the Stripe client")
    }

    /// The default gateway; none chosen is refused (the worker fails closed), and an HTTP
    /// gateway needs a URL and a secret.
    fn default_gateway(&self) -> anyhow::Result<AnyGateway> {
        let Some(kind) = self.gateway else {
            anyhow::bail!(
                "no payment gateway chosen: set PAYMENT_GATEWAY (--payment-gateway) to `http` \
                 (the provider at PAYMENT_GATEWAY_URL) or `sandbox` (test tokens decide, no \
                 money moves)"
            );
        };
        match kind {
            GatewayKind::Sandbox => Ok(AnyGateway::Sandbox(Sandbox::new())),
            GatewayKind::Http => {
                let url = self.gateway_url.clone().context(
                    "--payment-gateway=http needs --payment-gateway-url (PAYMENT_GATEWAY_URL)",
                )?;
                let secret = topup_kafka::secret_or_file(
                    self.gateway_secret.as_ref(),
                    self.gateway_secret_file.as_deref(),
                    "PAYMENT_GATEWAY_SECRET",
                )
                .map_err(anyhow::Error::msg)?
                .context(
                    "--payment-gateway=http needs a signing secret: PAYMENT_GATEWAY_SECRET or --payment-gateway-secret-file",
                )?;
                let gateway = HttpGateway::new(HttpGatewayConfig {
                    url,
                    secret,
                    timeout: Duration::from_millis(self.gateway_timeout_ms.max(1)),
                })
                .context("building the HTTP gateway client")?;
                Ok(AnyGateway::Http(gateway))
            }
        }
    }
}

/// The `topup-payment-worker` command line: parse, log, run until Ctrl-C or SIGTERM.
pub async fn main_from_args() -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    #[command(version, about = "Payment worker: top-up commands -> charges -> results")]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }
    let cli = <Cli as clap::Parser>::parse();
    // Before anything starts: without a usable gateway the worker does not start at all.
    let gateway = cli.config.gateway()?;
    let shutdown = topup_kafka::start_service(&cli.config.ops, "topup-payment-worker")
        .map_err(anyhow::Error::msg)?;
    let ran = run(cli.config, gateway, shutdown).await;
    topup_kafka::finish_service().await;
    ran?;
    Ok(())
}

/// Runs both lanes of the payment worker against `gateway` until `shutdown` is cancelled.
pub async fn run<G: PaymentGateway + Clone>(
    config: Config,
    gateway: G,
    shutdown: CancellationToken,
) -> topup_kafka::Result<()> {
    let transactional_id = config
        .transactional_id
        .clone()
        .unwrap_or_else(|| topup_kafka::instance_id("topup-payment-worker"));
    let lane = |inputs, group_id: String, transactional_id: String| PipelineSpec {
        service: "topup-payment-worker",
        group_id,
        transactional_id,
        inputs,
        max_batch: config.max_batch,
        tick_every: None,
        kafka: config.kafka.clone(),
    };
    let commands = lane(vec![topics::COMMANDS], config.group_id.clone(), transactional_id.clone());
    let retries = lane(
        vec![topics::PAYMENT_RETRIES],
        format!("{}-retries", config.group_id),
        format!("{transactional_id}-retries"),
    );
    let (retry, concurrency) = (config.retry_policy(), config.concurrency);
    let tokens = config.token_keys().map_err(|e| topup_kafka::Error::Config(format!("{e:#}")))?;
    if tokens.is_none() {
        tracing::warn!("PAYMENT_TOKEN_KEYS is not set: sealed payment tokens cannot be charged");
    }
    let limits = Limits {
        max_single_charge_minor: config.max_single_charge_minor,
        max_command_age: config.max_command_age.clone(),
        key_retention: Duration::from_secs(config.key_retention_secs.max(1)),
    };
    // One view of the rules for both lanes of this instance.
    let rules = RuleView::start(&config.kafka, shutdown.clone());
    let worker = || {
        PaymentWorker::new(gateway.clone(), retry, limits.clone(), rules.clone(), concurrency)
            .with_token_keys(tokens.clone())
    };
    let (a, b) = tokio::join!(
        run_pipeline(commands, worker, shutdown.clone()),
        run_pipeline(retries, worker, shutdown.clone()),
    );
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(config: &Config) -> String {
        config.gateway().err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    #[test]
    fn without_a_chosen_gateway_the_worker_refuses_naming_the_variable_and_the_choices() {
        let error = refusal(&Config::new(KafkaArgs::new("localhost:9092")));
        for expected in ["PAYMENT_GATEWAY", "`http`", "`sandbox`"] {
            assert!(error.contains(expected), "{expected} not in {error:?}");
        }
    }

    #[test]
    fn command_ages_read_back_what_they_show() {
        let ages = CommandAges::parse("card=900,wechat_pay=86400,*=600").unwrap();
        assert_eq!(ages.to_string(), "card=900,wechat_pay=86400,*=600");
        assert_eq!(CommandAges::parse(&ages.to_string()).unwrap(), ages);
        // The default, as --help shows it.
        assert_eq!(Config::new(KafkaArgs::new("b:9092")).max_command_age.to_string(), "*=1800");
    }

    #[test]
    fn an_explicitly_chosen_sandbox_is_accepted() {
        let config =
            Config { gateway: Some(GatewayKind::Sandbox), ..Config::new(KafkaArgs::new("k:9092")) };
        assert!(matches!(
            config.gateway(),
            Ok(Rails { default: AnyGateway::Sandbox(_), cards: None, alipay: None })
        ));
    }

    #[test]
    fn the_stripe_card_rail_needs_its_key() {
        let config = Config {
            gateway: Some(GatewayKind::Sandbox),
            card_rail: CardRail::Stripe,
            ..Config::new(KafkaArgs::new("k:9092"))
        };
        assert!(refusal(&config).contains("STRIPE_SECRET_KEY_FILE"), "{}", refusal(&config));
        let config = Config { stripe_secret_key: Some("sk_test_1".to_string().into()), ..config };
        assert!(matches!(
            config.gateway(),
            Ok(Rails {
                default: AnyGateway::Sandbox(_),
                cards: Some(AnyGateway::Stripe(_)),
                alipay: None
            })
        ));
    }
}
