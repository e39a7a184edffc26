//! Payment worker: consumes `TopUpCommand`s, charges through a [`gateway`], publishes one
//! `TopUpResult` and one notification per command, in the transaction that commits the
//! command's offset. A replay reaches the gateway with the same idempotency key.

pub mod gateway;
pub mod metrics;
pub mod worker;

use tokio_util::sync::CancellationToken;
use topup_kafka::{run_pipeline, KafkaArgs, PipelineSpec};
use topup_proto::topics;

pub use gateway::{PaymentGateway, Sandbox};
pub use worker::{Limits, PaymentWorker, RetryPolicy};

/// `topup-payment-worker` settings; `--help` lists them with their environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Consumer group of all payment worker instances.
    #[arg(long = "payment-group", env = "PAYMENT_GROUP", default_value = "topup-payment-worker")]
    pub group_id: String,

    /// Transactional id prefix; unique per instance (derived from host and pid by default).
    #[arg(long = "payment-transactional-id", env = "PAYMENT_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Largest single charge accepted, in minor units, whatever the command says.
    #[arg(long, env = "MAX_SINGLE_CHARGE_MINOR", default_value_t = 100_000)]
    pub max_single_charge_minor: i64,

    /// Attempts per payment method for transient gateway errors.
    #[arg(long, env = "PAYMENT_MAX_ATTEMPTS", default_value_t = 4)]
    pub max_attempts: u32,

    /// Commands processed per transaction.
    #[arg(long = "payment-max-batch", env = "PAYMENT_MAX_BATCH", default_value_t = 100)]
    pub max_batch: usize,
}

impl Config {
    /// Defaults, connected to `kafka`.
    pub fn new(kafka: KafkaArgs) -> Self {
        Self {
            kafka,
            group_id: "topup-payment-worker".into(),
            transactional_id: None,
            max_single_charge_minor: 100_000,
            max_attempts: 4,
            max_batch: 100,
        }
    }
}

/// Runs the payment worker against `gateway` until `shutdown` is cancelled.
pub async fn run<G: PaymentGateway + Clone>(
    config: Config,
    gateway: G,
    shutdown: CancellationToken,
) -> topup_kafka::Result<()> {
    let spec = PipelineSpec {
        service: "topup-payment-worker",
        group_id: config.group_id.clone(),
        transactional_id: config
            .transactional_id
            .clone()
            .unwrap_or_else(|| topup_kafka::instance_id("topup-payment-worker")),
        inputs: vec![topics::COMMANDS],
        max_batch: config.max_batch,
        kafka: config.kafka.clone(),
    };
    let retry = RetryPolicy { max_attempts: config.max_attempts.max(1), ..RetryPolicy::default() };
    let limits = Limits { max_single_charge_minor: config.max_single_charge_minor };
    run_pipeline(spec, || PaymentWorker::new(gateway.clone(), retry, limits), shutdown).await
}
