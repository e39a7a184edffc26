//! Threshold evaluator: consumes balances, rules and results (co-partitioned by subscriber),
//! keeps each subscriber's state in a changelog, and issues top-up commands and
//! notifications — all inside one Kafka transaction per batch.
//!
//! Where to look: [`decide`] makes the decision (pure); [`processor`] moves records in and
//! out; [`changelog`] is where state is written, [`state`] its record format.

pub mod changelog;
pub mod decide;
pub mod metrics;
pub mod processor;
pub mod state;

use tokio_util::sync::CancellationToken;
use topup_kafka::{instance_id, run_pipeline, KafkaArgs, PipelineSpec};
use topup_proto::topics;

pub use decide::Settings;
pub use processor::Evaluator;

/// `topup-evaluator` settings; `--help` lists them with their environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Health and metrics endpoints.
    #[command(flatten)]
    pub ops: topup_kafka::OpsArgs,

    /// Consumer group of all evaluator instances.
    #[arg(long = "evaluator-group", env = "EVALUATOR_GROUP", default_value = "topup-evaluator")]
    pub group_id: String,

    /// Transactional id prefix; unique per instance (defaults to one derived from the host
    /// name and process id).
    #[arg(long = "evaluator-transactional-id", env = "EVALUATOR_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Most records processed per transaction.
    #[arg(long = "evaluator-max-batch", env = "EVALUATOR_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Low-balance reminder level, in minor units of the balance's currency, for
    /// subscribers without a rule.
    #[arg(long, env = "REMINDER_LEVEL_MINOR", default_value_t = 500)]
    pub reminder_level_minor: i64,

    /// How often monthly top-ups and payment-method expiry reminders are looked for (every
    /// subscriber once a UTC day, and those whose rule changed).
    #[arg(long, env = "EVALUATOR_TICK_MS", default_value_t = 10_000)]
    pub tick_ms: u64,

    /// Seconds a top-up may wait for its result before its command is issued again under
    /// the same id (charged at most once: same idempotency key); 0 never. Looked at on
    /// every tick.
    #[arg(long, env = "EVALUATOR_REISSUE_AFTER_SECS", default_value_t = 900)]
    pub reissue_after_secs: i64,

    /// Seconds after a charged top-up within which the carrier's credit must be seen (a
    /// balance that rises by the amount, or one listing the top-up in
    /// credited_command_ids); past it the subscriber and operators are told; 0 never.
    #[arg(long, env = "EVALUATOR_CREDIT_DEADLINE_SECS", default_value_t = 900)]
    pub credit_deadline_secs: i64,
}

impl Config {
    /// The defaults (the `default_value`s above), connected to `kafka`.
    pub fn new(kafka: KafkaArgs) -> Self {
        Self { kafka, ..topup_kafka::clap_defaults() }
    }

    /// The settings of the decision.
    pub fn settings(&self) -> Settings {
        Settings {
            reminder_level_minor: self.reminder_level_minor,
            reissue_after_secs: self.reissue_after_secs,
            credit_deadline_secs: self.credit_deadline_secs,
        }
    }
}

/// The `topup-evaluator` command line: parse, log, run until Ctrl-C or SIGTERM.
pub async fn main_from_args() -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    #[command(version, about = "Threshold evaluator: balances + rules -> top-up commands")]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }
    let cli = <Cli as clap::Parser>::parse();
    let shutdown = topup_kafka::start_service(&cli.config.ops, "topup-evaluator")
        .map_err(anyhow::Error::msg)?;
    let ran = run(cli.config, shutdown).await;
    topup_kafka::finish_service().await;
    ran?;
    Ok(())
}

/// Runs the evaluator until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> topup_kafka::Result<()> {
    let spec = PipelineSpec {
        service: "topup-evaluator",
        group_id: config.group_id.clone(),
        transactional_id: config
            .transactional_id
            .clone()
            .unwrap_or_else(|| instance_id("topup-evaluator")),
        inputs: vec![topics::BALANCE, topics::RULES, topics::RESULTS],
        max_batch: config.max_batch,
        tick_every: Some(std::time::Duration::from_millis(config.tick_ms.max(10))),
        kafka: config.kafka.clone(),
    };
    let settings = config.settings();
    run_pipeline(spec, || Evaluator::new(config.kafka.clone(), settings), shutdown).await
}
