//! The in-process Kafka: librdkafka's mock cluster, real Kafka protocol on loopback TCP,
//! with every topic created with the platform's partitioning.
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use topup_kafka::{create_topics_on_mock, KafkaArgs, TopicSpec};

/// Brokers of the embedded cluster (replication 3, like a small real cluster).
pub const BROKERS: i32 = 3;

/// A running mock cluster with the topics created. Dropping it stops it.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    /// Starts the cluster and creates every topic with `partitions` partitions.
    pub fn start(partitions: i32) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(BROKERS)?;
        create_topics_on_mock(&cluster, &TopicSpec::all(partitions), BROKERS)?;
        Ok(Self { cluster })
    }

    /// `host:port,...` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Client settings for this cluster, with the mock's workarounds switched on.
    pub fn kafka_args(&self) -> KafkaArgs {
        KafkaArgs { mock_cluster: true, ..KafkaArgs::new(self.bootstrap_servers()) }
    }

    /// The mock cluster, for fault injection.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
