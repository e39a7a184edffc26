//! Notifier worker: consumes `NotificationCommand`s, renders them from the
//! [`templates`] in the subscriber's language, delivers them on a [`channel`], and publishes
//! a `DeliveryReceipt` per attempt, in the transaction that commits the input offset.

pub mod channel;
pub mod metrics;
pub mod notifier;
pub mod templates;

use tokio_util::sync::CancellationToken;
use topup_kafka::{run_pipeline, KafkaArgs, PipelineSpec};
use topup_proto::topics;

pub use channel::{Channel, Console};
pub use notifier::Notifier;

/// `topup-notifier` settings; `--help` lists them with their environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Consumer group of all notifier instances.
    #[arg(long = "notifier-group", env = "NOTIFIER_GROUP", default_value = "topup-notifier")]
    pub group_id: String,

    /// Transactional id prefix; unique per instance (derived from host and pid by default).
    #[arg(long = "notifier-transactional-id", env = "NOTIFIER_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Notifications processed per transaction.
    #[arg(long = "notifier-max-batch", env = "NOTIFIER_MAX_BATCH", default_value_t = 200)]
    pub max_batch: usize,
}

impl Config {
    /// Defaults, connected to `kafka`.
    pub fn new(kafka: KafkaArgs) -> Self {
        Self { kafka, group_id: "topup-notifier".into(), transactional_id: None, max_batch: 200 }
    }
}

/// Runs the notifier, delivering through `channel`, until `shutdown` is cancelled.
pub async fn run<C: Channel + Clone>(
    config: Config,
    channel: C,
    shutdown: CancellationToken,
) -> topup_kafka::Result<()> {
    let spec = PipelineSpec {
        service: "topup-notifier",
        group_id: config.group_id.clone(),
        transactional_id: config
            .transactional_id
            .clone()
            .unwrap_or_else(|| topup_kafka::instance_id("topup-notifier")),
        inputs: vec![topics::NOTIFICATIONS],
        max_batch: config.max_batch,
        tick_every: None,
        kafka: config.kafka.clone(),
    };
    run_pipeline(spec, || Notifier::new(channel.clone()), shutdown).await
}
