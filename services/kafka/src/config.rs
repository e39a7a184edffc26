//! Kafka client settings, the same for the mock cluster and a real broker.
use rdkafka::ClientConfig;

use crate::clap_defaults;

/// The Java client's default partitioner: a subscriber's records land on the same partition
/// number whichever client (ours, a carrier's Java integration) produced them, which keeps
/// the evaluator's input topics co-partitioned.
const PARTITIONER: &str = "murmur2_random";

/// Connection settings shared by every service (`--help` lists them with defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port, comma-separated).
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,

    /// Consumer group session timeout. A crashed instance's partitions move to the others
    /// after this long.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,

    /// Transaction timeout: an abandoned transaction of a crashed instance is aborted by
    /// the broker after this long, which bounds how long read_committed readers wait.
    #[arg(long, env = "KAFKA_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000)]
    pub transaction_timeout_ms: u32,

    /// Longest wait, after a batch's first record, for more records before its transaction
    /// commits (up to the batch size). 0 commits what is buffered at once: the lowest
    /// latency; a few milliseconds more make fewer, larger transactions under load
    /// (docs/benchmarks.md has the trade measured).
    #[arg(long, env = "KAFKA_COMMIT_INTERVAL_MS", default_value_t = 0)]
    pub commit_interval_ms: u64,

    /// Extra librdkafka properties (`key=value`, comma-separated), e.g.
    /// `security.protocol=SASL_SSL,sasl.mechanism=PLAIN`.
    #[arg(
        long = "kafka-property",
        env = "KAFKA_PROPERTIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub properties: Vec<String>,

    /// The brokers are librdkafka's mock cluster (the embedded demo, quick local tests):
    /// switch on the workarounds for what it does not do — it stores no transactional
    /// offset commit (offsets are committed again, plainly) and shows records of
    /// transactions never committed (the evaluator issues the in-flight command again when
    /// the record that issued it is read again). Never needed on Apache Kafka.
    #[arg(long = "kafka-mock-cluster", env = "KAFKA_MOCK_CLUSTER")]
    pub mock_cluster: bool,

    /// Static group membership: each pipeline's consumer joins as `group.instance.id` =
    /// its transactional id. Use it with a stable instance id (a StatefulSet's pod name in
    /// `*_TRANSACTIONAL_ID`): an instance restarted within the session timeout gets its
    /// partitions back without a rebalance. A member that stops for good (scale-down) keeps
    /// its partitions until the session timeout, since static members do not leave the group.
    #[arg(long = "kafka-static-membership", env = "KAFKA_STATIC_MEMBERSHIP")]
    pub static_membership: bool,

    /// Directory for the pipelines' local state stores (one file per assigned partition,
    /// under a directory per instance). A restart then replays only the changelog's tail
    /// since the store's checkpoint. Unset, the stores are kept in memory and every
    /// assignment reads the whole changelog partition.
    #[arg(long = "state-dir", env = "STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// States kept parsed in memory per assigned partition (the rest are read from the
    /// store when needed): with a state directory, this and the page cache bound the
    /// memory whatever the subscriber count.
    #[arg(long = "state-cache-entries", env = "STATE_CACHE_ENTRIES", default_value_t = 20_000)]
    pub state_cache_entries: usize,

    /// Bytes of the store's page cache per assigned partition.
    #[arg(long = "state-page-cache-bytes", env = "STATE_PAGE_CACHE_BYTES", default_value_t = 16 << 20)]
    pub state_page_cache_bytes: usize,
}

impl KafkaArgs {
    /// Settings for `brokers` with every default.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), ..clap_defaults() }
    }

    /// Where the pipelines keep their state stores.
    pub fn store(&self) -> crate::StoreConfig {
        crate::StoreConfig {
            dir: self.state_dir.clone(),
            cache_entries: self.state_cache_entries,
            page_cache_bytes: self.state_page_cache_bytes,
        }
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // Reconnect within a second once a broker is back (librdkafka's default backs off up
        // to 10 s: measured here as stalls of several seconds after a broker restart).
        config.set("reconnect.backoff.max.ms", "1000");
        for property in &self.properties {
            if let Some((key, value)) = property.split_once('=') {
                config.set(key.trim(), value.trim());
            }
        }
        config
    }

    /// A group consumer that commits nothing by itself, reads only committed transactions
    /// and uses the range assignor: with co-partitioned topics, every member gets the same
    /// partition numbers of each topic it subscribes to.
    pub fn group_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("partition.assignment.strategy", "range")
            // The mock broker answers an empty fetch only when this runs out (a real
            // broker answers as soon as data arrives): keep it short for latency.
            .set("fetch.wait.max.ms", "10")
            .set("fetch.error.backoff.ms", "10")
            // Consumer lag per partition, for the metrics.
            .set("statistics.interval.ms", "10000")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (self.session_timeout_ms / 5).max(100).to_string());
        config
    }

    /// The consumer of a pipeline whose transactional id is `instance`: a group consumer,
    /// a static member named `instance` under [`KafkaArgs::static_membership`].
    pub fn pipeline_consumer(&self, group_id: &str, instance: &str) -> ClientConfig {
        let mut config = self.group_consumer(group_id);
        if self.static_membership {
            config.set("group.instance.id", instance);
        }
        config
    }

    /// A consumer outside any group, for reading partitions by hand (restores, tools).
    pub fn reader(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", "topup-reader")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.error.backoff.ms", "10")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        config
    }

    /// A transactional producer (idempotent, acks=all).
    pub fn transactional_producer(&self, transactional_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", self.transaction_timeout_ms.to_string())
            .set("partitioner", PARTITIONER)
            .set("linger.ms", "1");
        config
    }

    /// A plain idempotent producer, for tools and simulators outside the exactly-once loop.
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("partitioner", PARTITIONER)
            .set("linger.ms", "1");
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_definitions_and_not_from_the_environment() {
        // The variable set here must not reach the defaults (tests run with many set).
        std::env::set_var("KAFKA_SESSION_TIMEOUT_MS", "1");
        let kafka = KafkaArgs::new("b:9092");
        std::env::remove_var("KAFKA_SESSION_TIMEOUT_MS");
        assert_eq!(kafka.brokers, "b:9092");
        assert_eq!(kafka.session_timeout_ms, 10_000);
        assert_eq!(kafka.transaction_timeout_ms, 10_000);
        assert_eq!(kafka.commit_interval_ms, 0);
        assert!(kafka.properties.is_empty() && !kafka.mock_cluster && !kafka.static_membership);
    }
}
