//! The topics of the platform and how they are created. Input topics of the evaluator
//! (balance, rules, results) must have the same partition count: they are co-partitioned.
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use topup_proto::topics;

use crate::{KafkaArgs, Result};

/// Partitions of every topic unless told otherwise.
pub const DEFAULT_PARTITIONS: i32 = 4;

/// How every compacted topic (the state changelogs, the rules) is compacted.
/// - `segment.ms` 1 h: the segment being written is never compacted, so with Kafka's
///   default of 7 days a changelog would grow with every balance event for a week; with an
///   hour it holds about one record per key plus the last hour's traffic.
/// - `delete.retention.ms` 24 h, stated rather than left to the broker's default: a local
///   state store checkpointed longer ago than half of it is rebuilt from the beginning
///   (a tombstone it had not read yet may have been compacted away since).
/// - `min.cleanable.dirty.ratio` 0.5 (Kafka's default), stated for the same reason.
pub const COMPACTION: [(&str, &str); 4] = [
    ("cleanup.policy", "compact"),
    ("segment.ms", "3600000"),
    ("delete.retention.ms", "86400000"),
    ("min.cleanable.dirty.ratio", "0.5"),
];

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: &'static str,
    /// Partition count (the same for every co-partitioned topic).
    pub partitions: i32,
    /// Compacted (state changelogs) rather than deleted by age.
    pub compacted: bool,
}

impl TopicSpec {
    /// All topics of the platform with `partitions` partitions each.
    pub fn all(partitions: i32) -> Vec<TopicSpec> {
        topics::ALL
            .iter()
            .map(|name| TopicSpec {
                name,
                partitions,
                compacted: matches!(
                    *name,
                    topics::EVALUATOR_STATE | topics::NOTIFIER_STATE | topics::RULES
                ),
            })
            .collect()
    }
}

/// Creates the topics on librdkafka's mock cluster (which has no CreateTopics API).
pub fn create_topics_on_mock(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    specs: &[TopicSpec],
    replication: i32,
) -> Result<()> {
    for spec in specs {
        cluster.create_topic(spec.name, spec.partitions, replication)?;
    }
    Ok(())
}

/// Creates the topics on a real cluster; topics that already exist are left alone.
pub async fn create_topics(kafka: &KafkaArgs, specs: &[TopicSpec], replication: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka.producer().create()?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            let topic =
                NewTopic::new(spec.name, spec.partitions, TopicReplication::Fixed(replication));
            if spec.compacted {
                COMPACTION.iter().fold(topic, |topic, (key, value)| topic.set(key, value))
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for outcome in admin.create_topics(&new_topics, &options).await? {
        match outcome {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::info!(topic = %name, "topic already exists")
            }
            Err((name, code)) => {
                return Err(crate::Error::Kafka(rdkafka::error::KafkaError::AdminOp(code)))
                    .inspect_err(
                        |_| tracing::error!(topic = %name, ?code, "could not create topic"),
                    )
            }
        }
    }
    Ok(())
}
