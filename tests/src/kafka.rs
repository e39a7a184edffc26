//! The Kafka a test runs on. By default Apache Kafka: a KRaft broker of the test's own
//! (one combined node, or a controller and three brokers for the fault tests), started by
//! `scripts/kafka` from the Maven Central cache and stopped when the test ends — even a
//! test that crashes (the script's watchdog follows this process). With
//! `TOPUP_TEST_KAFKA=mock` it is librdkafka's mock cluster instead: quicker, for local runs,
//! but not a conformant broker (docs/guarantees.md).
//!
//! A broker per test, not one shared broker with names namespaced per test: every service
//! has fixed topic names, group ids and transactional ids, and the ledgers read whole
//! topics; a broker of its own keeps each scenario exactly as a deployment sees it. Measured
//! here: a single node is ready (a transaction committed and a group joined) in 8–12 s.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use topup::embedded::EmbeddedKafka;
use topup_kafka::{KafkaArgs, TopicSpec};

/// `scripts/kafka` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka")
}

/// Which broker the tests use (`TOPUP_TEST_KAFKA`).
fn use_mock() -> anyhow::Result<bool> {
    match std::env::var("TOPUP_TEST_KAFKA").as_deref() {
        Err(_) | Ok("") | Ok("apache") => Ok(false),
        Ok("mock") => Ok(true),
        Ok(other) => bail!("TOPUP_TEST_KAFKA={other:?}: use apache (the default) or mock"),
    }
}

/// A running Kafka for one test; dropping it stops it.
pub enum TestKafka {
    /// Apache Kafka nodes started by `scripts/kafka`.
    Apache(ApacheKafka),
    /// librdkafka's mock cluster (3 brokers), in this process.
    Mock(EmbeddedKafka),
}

impl TestKafka {
    /// A single broker (Apache) or the mock, with every topic (`partitions` each).
    pub fn start(partitions: i32) -> anyhow::Result<Self> {
        Self::start_nodes(partitions, 1)
    }

    /// Three brokers with replication 3 and `min.insync.replicas=2` (Apache), or the mock:
    /// for tests that take brokers down.
    pub fn start_cluster(partitions: i32) -> anyhow::Result<Self> {
        Self::start_nodes(partitions, 3)
    }

    fn start_nodes(partitions: i32, nodes: u32) -> anyhow::Result<Self> {
        if use_mock()? {
            return Ok(Self::Mock(EmbeddedKafka::start(partitions)?));
        }
        let kafka = ApacheKafka::start(nodes)?;
        kafka.create_topics(partitions)?;
        Ok(Self::Apache(kafka))
    }

    /// Client settings for it (the mock's workarounds on for the mock only).
    pub fn kafka_args(&self) -> KafkaArgs {
        match self {
            Self::Apache(kafka) => KafkaArgs::new(kafka.bootstrap.clone()),
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
            Self::Mock(_) => (1..=topup::embedded::BROKERS).collect(),
        }
    }

    /// Takes broker `id` down: SIGKILL of its JVM on Apache Kafka.
    pub fn broker_down(&self, id: i32) -> anyhow::Result<()> {
        match self {
            Self::Apache(kafka) => kafka.script(&["kill", "--node", &id.to_string()]),
            Self::Mock(mock) => Ok(mock.cluster().broker_down(id)?),
        }
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

    /// Creates every topic of the platform, replicated on every broker.
    fn create_topics(&self, partitions: i32) -> anyhow::Result<()> {
        let kafka = KafkaArgs::new(self.bootstrap.clone());
        let replication = if self.nodes == 1 { 1 } else { 3 };
        // Its own runtime on its own thread: the caller may be inside a runtime already.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime =
                        tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    runtime.block_on(topup_kafka::create_topics(
                        &kafka,
                        &TopicSpec::all(partitions),
                        replication,
                    ))?;
                    leaders_elected(&kafka, partitions)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("creating the topics panicked"))?
        })
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
