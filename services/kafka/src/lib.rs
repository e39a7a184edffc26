//! Kafka plumbing shared by every service: client settings, the topics and their
//! partitioning, and the transactional consume → process → produce loop that commits
//! input offsets and outputs together (exactly-once within Kafka), with dead-lettering.

mod config;
mod error;
mod event;
pub mod ops;
mod pipeline;
mod processor;
mod record;
mod refusal;
mod restore;
mod runtime;
mod settings;
mod store;
pub mod telemetry;
mod topics;

pub use config::KafkaArgs;
pub use error::{Error, Result};
pub use event::{emit, InternalEvent};
pub use ops::{health, pipeline_metrics, registry, spawn_ops, OpsArgs};
pub use pipeline::{run_pipeline, PipelineSpec};
pub use processor::{
    Answer, Changelog, Processor, RestoreRecord, StateRecord, Task, TransientRetry,
};
pub use record::{
    dead_letter, decode, now_timestamp, system_time, timestamp_of, Input, Output,
    DEAD_LETTER_VALUE_BYTES,
};
pub use refusal::Refusal;
pub use restore::read_partition_to_end;
pub use runtime::{finish_service, init_logging, instance_id, shutdown_on_signal, start_service};
pub use settings::{clap_defaults, parse_secret, read_secret_file, secret_or_file};
pub use store::StoreConfig;
pub use topics::{create_topics, create_topics_on_mock, TopicSpec, COMPACTION, DEFAULT_PARTITIONS};
