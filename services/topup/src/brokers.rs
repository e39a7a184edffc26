//! Brokers on demand, for the tests and the benchmark: Apache Kafka (KRaft) started by
//! `scripts/kafka` from the Maven Central cache — one combined node, or a controller and
//! three brokers — and stopped when dropped, or when this process is gone (the script's
//! watchdog follows it); or librdkafka's mock cluster in this process (quicker, not a
//! conformant broker: docs/guarantees.md). Every topic of the platform is created.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::embedded::EmbeddedKafka;
use anyhow::{bail, Context};
use topup_kafka::{KafkaArgs, TopicSpec};

/// `scripts/kafka` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka")
}

/// Which kind of Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// librdkafka's mock cluster, in this process.
    Mock,
    /// Apache Kafka, one combined node.
    Apache,
    /// Apache Kafka, a controller and three brokers (replication 3).
    Apache3,
}

/// A running Kafka; dropping it stops it.
pub enum Brokers {
    /// Apache Kafka nodes started by `scripts/kafka`.
    Apache(ApacheKafka),
    /// librdkafka's mock cluster (3 brokers), in this process.
    Mock(EmbeddedKafka),
}

impl Brokers {
    /// Starts `kind` with every topic of the platform (`partitions` each).
    pub fn start(kind: BrokerKind, partitions: i32) -> anyhow::Result<Self> {
        let nodes = match kind {
            BrokerKind::Mock => return Ok(Self::Mock(EmbeddedKafka::start(partitions)?)),
            BrokerKind::Apache => 1,
            BrokerKind::Apache3 => 3,
        };
        let kafka = ApacheKafka::start(nodes)?;
        kafka.create_topics(&TopicSpec::all(partitions))?;
        leaders_elected(&kafka.kafka_args(), partitions)?;
        Ok(Self::Apache(kafka))
    }

    /// Creates one more topic (not compacted).
    pub fn create_topic(&self, name: &'static str, partitions: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => {
                kafka.create_topics(&[TopicSpec { name, partitions, compacted: false }])
            }
            Self::Mock(mock) => Ok(mock.cluster().create_topic(name, partitions, 3)?),
        }
    }

    /// Client settings for it (the mock's workarounds on for the mock only).
    pub fn kafka_args(&self) -> KafkaArgs {
        match self {
            Self::Apache(kafka) => kafka.kafka_args(),
            Self::Mock(mock) => mock.kafka_args(),
        }
    }

    /// `true` on the mock cluster.
    pub fn is_mock(&self) -> bool {
        matches!(self, Self::Mock(_))
    }

    /// Ids of the brokers that can be taken down.
    pub fn brokers(&self) -> Vec<i32> {
        match self {
            Self::Apache(kafka) if kafka.nodes == 1 => vec![1],
            Self::Apache(_) => vec![1, 2, 3],
            Self::Mock(_) => (1..=crate::embedded::BROKERS).collect(),
        }
    }

    /// Takes broker `id` down: SIGKILL of its JVM on Apache Kafka.
    pub fn broker_down(&self, id: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => kafka.script(&["kill", "--node", &id.to_string()]),
            Self::Mock(mock) => Ok(mock.cluster().broker_down(id)?),
        }
    }

    /// Makes broker `id` unreachable without closing its connections: SIGSTOP of its JVM
    /// (it answers nothing until [`Brokers::broker_resume`]); down, on the mock cluster.
    pub fn broker_pause(&self, id: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => kafka.signal(id, "-STOP"),
            Self::Mock(mock) => Ok(mock.cluster().broker_down(id)?),
        }
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn broker_resume(&self, id: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => kafka.signal(id, "-CONT"),
            Self::Mock(mock) => Ok(mock.cluster().broker_up(id)?),
        }
    }

    /// The broker that coordinates consumer group `group` now: the leader of its partition
    /// of `__consumer_offsets`.
    /// (On the mock cluster, broker 1: its coordinators are not looked up.)
    pub fn group_coordinator(&self, group: &str) -> anyhow::Result<i32> {
        match self {
            Self::Apache(kafka) => coordinator(&kafka.kafka_args(), "__consumer_offsets", group),
            Self::Mock(_) => Ok(1),
        }
    }

    /// The broker that coordinates the transactions of `transactional_id` now: the leader of
    /// its partition of `__transaction_state`.
    /// (On the mock cluster, broker 2.)
    pub fn transaction_coordinator(&self, transactional_id: &str) -> anyhow::Result<i32> {
        match self {
            Self::Apache(kafka) => {
                coordinator(&kafka.kafka_args(), "__transaction_state", transactional_id)
            }
            Self::Mock(_) => Ok(2),
        }
    }

    /// Whether broker `id` leads any partition now (on the mock cluster: never asked, false).
    pub fn leads_any(&self, id: i32) -> anyhow::Result<bool> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let Self::Apache(kafka) = self else { return Ok(false) };
        let consumer: BaseConsumer = kafka.kafka_args().reader().create()?;
        let metadata = consumer.fetch_metadata(None, std::time::Duration::from_secs(5))?;
        Ok(metadata.topics().iter().flat_map(|t| t.partitions()).any(|p| p.leader() == id))
    }

    /// Brings broker `id` back (the same node, its data kept).
    pub fn broker_up(&self, id: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => kafka.script(&["restart", "--node", &id.to_string()]),
            Self::Mock(mock) => Ok(mock.cluster().broker_up(id)?),
        }
    }
}

/// Apache Kafka nodes of one test, in a directory of their own.
pub struct ApacheKafka {
    dir: PathBuf,
    /// `host:port,...` of the brokers.
    pub bootstrap: String,
    nodes: u32,
}

impl ApacheKafka {
    /// Starts `nodes` (1, or 3 brokers and a controller) and waits until they are ready.
    pub fn start(nodes: u32) -> anyhow::Result<Self> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("topup-kafka-{}-{n}", std::process::id()));
        let started = Instant::now();
        let output = Command::new(script())
            .args(["start", "--nodes", &nodes.to_string(), "--timeout", "150"])
            .arg("--dir")
            .arg(&dir)
            .args(["--watch-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script().display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("Apache Kafka did not start ({}):\n{stderr}", output.status);
        }
        let bootstrap = String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("bootstrap.servers=").map(str::to_string))
            .context("scripts/kafka start printed no bootstrap.servers")?;
        tracing::info!(%bootstrap, nodes, secs = started.elapsed().as_secs_f64(), "Apache Kafka ready");
        Ok(Self { dir, bootstrap, nodes })
    }

    /// Client settings for these brokers.
    pub fn kafka_args(&self) -> KafkaArgs {
        KafkaArgs::new(self.bootstrap.clone())
    }

    /// Creates `specs`, replicated on every broker.
    fn create_topics(&self, specs: &[TopicSpec]) -> anyhow::Result<()> {
        let kafka = self.kafka_args();
        let replication = if self.nodes == 1 { 1 } else { 3 };
        // Its own runtime on its own thread: the caller may be inside a runtime already.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime =
                        tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    runtime.block_on(topup_kafka::create_topics(&kafka, specs, replication))?;
                    anyhow::Ok(())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("creating the topics panicked"))?
        })
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to node `id`'s JVM.
    fn signal(&self, id: i32, signal: &str) -> anyhow::Result<()> {
        let pid_file = self.dir.join(format!("node-{id}.pid"));
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        let status = Command::new("kill").arg(signal).arg(pid.trim()).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {} failed: {status}", pid.trim());
        Ok(())
    }

    fn script(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(script())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script().display()))?;
        if !output.status.success() {
            bail!(
                "scripts/kafka {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// The leader of the partition of coordinator topic `topic` that `key` maps to: Kafka's
/// `Utils.abs(key.hashCode()) % partitions` (GroupCoordinatorService and
/// TransactionStateManager `partitionFor`), with Java's `String.hashCode`.
fn coordinator(kafka: &KafkaArgs, topic: &str, key: &str) -> anyhow::Result<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let java_hash =
        key.encode_utf16().fold(0i32, |h, unit| h.wrapping_mul(31).wrapping_add(i32::from(unit)));
    let consumer: BaseConsumer = kafka.reader().create()?;
    let metadata = consumer.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions())
        .filter(|p| !p.is_empty())
        .with_context(|| format!("{topic} has no partitions yet"))?;
    let index = if java_hash == i32::MIN { 0 } else { java_hash.abs() } as usize % partitions.len();
    let partition = partitions
        .iter()
        .find(|p| p.id() as usize == index)
        .with_context(|| format!("{topic}/{index} not in the metadata"))?;
    anyhow::ensure!(partition.leader() >= 0, "{topic}/{index} has no leader");
    Ok(partition.leader())
}

/// Waits until every partition of every topic answers an offset query (has a leader): a
/// topic just created can answer "not leader" for a moment.
fn leaders_elected(kafka: &KafkaArgs, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka.reader().create()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    for spec in TopicSpec::all(partitions) {
        for partition in 0..partitions {
            loop {
                match consumer.fetch_watermarks(
                    spec.name,
                    partition,
                    std::time::Duration::from_secs(5),
                ) {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(topic = spec.name, partition, error = %e, "no leader yet");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) => bail!("{}/{partition} has no leader after 60 s: {e}", spec.name),
                }
            }
        }
    }
    Ok(())
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        if let Err(e) = self.script(&["stop"]) {
            tracing::warn!(error = %e, "stopping Apache Kafka");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
