//! Test harness: the platform on a Kafka of its own (Apache Kafka by default, the mock
//! cluster with `TOPUP_TEST_KAFKA=mock`; see [`kafka`]), publishing helpers, and readers that
//! wait for records with a deadline (never a sleep).
pub mod alipay_server;
pub mod gateway_server;
pub mod kafka;
pub mod otlp_sink;
pub mod postgres;
pub mod smtp_sink;
pub mod stripe_server;
pub mod webhook_server;

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use topup_kafka::{read_partition_to_end, KafkaArgs};
use topup_proto::v1::{
    auto_top_up_rule::TopUp, AutoTopUpRule, BalanceUpdated, ChannelKind, FailureReason, Money,
    NotificationChannel, PaymentMethod, PaymentMethodKind, RuleState, RuleUpdated, TopUpCommand,
    TopUpResult, TopUpStatus,
};
use topup_proto::Message as _;

/// For the child binaries (`*_child`): started by [`child_command`], they exit as soon as
/// their stdin closes, i.e. when the test or the soak that started them is gone — even one
/// that crashed or was killed before it could kill them.
pub fn exit_with_parent() {
    if std::env::var_os(EXIT_WITH_PARENT).is_none() {
        return;
    }
    std::thread::spawn(|| {
        use std::io::Read;
        let mut buffer = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
        std::process::exit(1);
    });
}

const EXIT_WITH_PARENT: &str = "TOPUP_TEST_EXIT_WITH_PARENT";

/// A command for a child binary that dies with this process (see [`exit_with_parent`]) and
/// is killed when its handle is dropped.
pub fn child_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command.env(EXIT_WITH_PARENT, "1").stdin(std::process::Stdio::piped()).kill_on_drop(true);
    command
}

/// Partitions of every topic in tests.
pub const PARTITIONS: i32 = 4;

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The platform running on a Kafka of its own.
pub struct Platform {
    /// The brokers (dropped last).
    pub kafka_cluster: kafka::TestKafka,
    /// Connection settings for clients of the test.
    pub kafka: KafkaArgs,
    /// Stops the services.
    pub shutdown: CancellationToken,
    /// The services.
    pub services: JoinSet<topup_kafka::Result<()>>,
    /// The sandbox gateway, to count charges.
    pub gateway: topup_payment_worker::Sandbox,
    producer: FutureProducer,
    /// The services' state stores (`STATE_DIR`), one directory per instance.
    pub state_dir: tempfile::TempDir,
}

impl Platform {
    /// A broker with the topics, and nothing running yet.
    pub fn cluster() -> anyhow::Result<Self> {
        topup_kafka::init_logging();
        Self::on(kafka::TestKafka::start(kafka::kind(1)?, PARTITIONS)?)
    }

    /// Three brokers (replication 3, `min.insync.replicas=2`) with the topics, and nothing
    /// running yet: for tests that take brokers down.
    pub fn three_brokers() -> anyhow::Result<Self> {
        topup_kafka::init_logging();
        Self::on(kafka::TestKafka::start(kafka::kind(3)?, PARTITIONS)?)
    }

    fn on(kafka_cluster: kafka::TestKafka) -> anyhow::Result<Self> {
        let mut kafka = kafka_cluster.kafka_args();
        // Short timeouts, so restarts and rebalances in tests take seconds (docs/kafka.md).
        kafka.session_timeout_ms = 6_000;
        kafka.transaction_timeout_ms = 6_000;
        let state_dir = tempfile::tempdir()?;
        kafka.state_dir = Some(state_dir.path().to_path_buf());
        let producer = kafka.producer().create()?;
        Ok(Self {
            kafka_cluster,
            kafka,
            shutdown: CancellationToken::new(),
            services: JoinSet::new(),
            gateway: topup_payment_worker::Sandbox::new(),
            producer,
            state_dir,
        })
    }

    /// A broker with the evaluator, the payment worker and the notifier running.
    pub fn start() -> anyhow::Result<Self> {
        Self::cluster()?.with_services()
    }

    /// [`Platform::three_brokers`] with the evaluator, the payment worker and the notifier.
    pub fn start_on_three_brokers() -> anyhow::Result<Self> {
        Self::three_brokers()?.with_services()
    }

    fn with_services(self) -> anyhow::Result<Self> {
        let mut platform = self;
        platform.start_evaluator();
        let kafka = platform.kafka.clone();
        platform.services.spawn(topup_payment_worker::run(
            topup_payment_worker::Config::new(kafka.clone()),
            platform.gateway.clone(),
            platform.shutdown.clone(),
        ));
        let notifier = platform.notifier_config();
        platform.start_notifier(notifier, topup_notifier::Channels::console());
        Ok(platform)
    }

    /// Starts a payment worker with `config` and `gateway`.
    pub fn start_payment_worker<G>(&mut self, config: topup_payment_worker::Config, gateway: G)
    where
        G: topup_payment_worker::PaymentGateway + Clone,
    {
        self.services.spawn(topup_payment_worker::run(config, gateway, self.shutdown.clone()));
    }

    /// Payment worker settings for tests: the HTTP gateway at `url`, signed with the test
    /// secret, a 1 s timeout and fast retries.
    pub fn http_payment_config(&self, url: &str) -> topup_payment_worker::Config {
        let mut config = topup_payment_worker::Config::new(self.kafka.clone());
        config.gateway = Some(topup_payment_worker::GatewayKind::Http);
        config.gateway_url = Some(url.to_string());
        config.gateway_secret = Some(gateway_server::SECRET.to_string().into());
        config.gateway_timeout_ms = 1_000;
        config.initial_backoff_ms = 100;
        config.max_backoff_ms = 400;
        config.max_attempts = 5;
        config
    }

    /// Publishes a top-up command, to `partition` or by key.
    pub async fn publish_command(
        &self,
        command: &TopUpCommand,
        partition: Option<i32>,
    ) -> anyhow::Result<()> {
        let payload = command.encode_to_vec();
        let mut record = FutureRecord::to(topup_proto::topics::COMMANDS)
            .key(&command.subscriber_id)
            .payload(&payload);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        self.producer.send(record, WAIT).await.map_err(|(e, _)| anyhow::anyhow!("publish: {e}"))?;
        Ok(())
    }

    /// Notifier settings for tests: no quiet hours (tests run at any hour), fast retries.
    pub fn notifier_config(&self) -> topup_notifier::Config {
        let mut config = topup_notifier::Config::new(self.kafka.clone());
        config.quiet_hours = topup_notifier::QuietHoursSetting(None);
        config.delivery_initial_backoff_ms = 100;
        config.delivery_max_backoff_ms = 400;
        config.channel_timeout_ms = 2_000;
        config
    }

    /// Starts a notifier with `config`, delivering on `channels`.
    pub fn start_notifier(
        &mut self,
        config: topup_notifier::Config,
        channels: topup_notifier::Channels,
    ) {
        self.services.spawn(topup_notifier::run(config, channels, self.shutdown.clone()));
    }

    /// Starts (another) evaluator instance.
    pub fn start_evaluator(&mut self) {
        let config = topup_evaluator::Config::new(self.kafka.clone());
        self.start_evaluator_with(config);
    }

    /// Starts an evaluator instance with `config`.
    pub fn start_evaluator_with(&mut self, config: topup_evaluator::Config) {
        self.services.spawn(topup_evaluator::run(config, self.shutdown.clone()));
    }

    /// Stops every service and waits (bounded) for them.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, async {
            while let Some(joined) = self.services.join_next().await {
                joined??;
            }
            anyhow::Ok(())
        })
        .await
        .context("services did not stop in time")??;
        Ok(())
    }

    /// Publishes raw bytes.
    pub async fn publish_raw(&self, topic: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.producer
            .send(FutureRecord::to(topic).key(key).payload(value), WAIT)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("publish to {topic}: {e}"))?;
        Ok(())
    }

    /// Publishes raw bytes without a key.
    pub async fn publish_unkeyed(&self, topic: &str, value: &[u8]) -> anyhow::Result<()> {
        self.producer
            .send(FutureRecord::<(), [u8]>::to(topic).payload(value), WAIT)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("publish to {topic}: {e}"))?;
        Ok(())
    }

    /// Publishes a rule.
    pub async fn publish_rule(&self, rule: AutoTopUpRule) -> anyhow::Result<()> {
        let key = rule.subscriber_id.clone();
        let update = RuleUpdated { rule: Some(rule), updated_at: None };
        self.publish_raw(topup_proto::topics::RULES, &key, &update.encode_to_vec()).await
    }

    /// Publishes a balance in CNY fen.
    pub async fn publish_balance(
        &self,
        subscriber: &str,
        amount_minor: i64,
        sequence: u64,
    ) -> anyhow::Result<()> {
        let event = balance(subscriber, amount_minor, sequence);
        self.publish_raw(topup_proto::topics::BALANCE, subscriber, &event.encode_to_vec()).await
    }

    /// Waits until consumer group `group` has committed every record that exists now in
    /// `topics`, i.e. the service has processed (and committed the outputs of) all of it.
    pub async fn wait_caught_up(&self, group: &str, topics: &[&'static str]) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let (kafka, g, t) = (self.kafka.clone(), group.to_string(), topics.to_vec());
            let lagging =
                tokio::task::spawn_blocking(move || lagging_partitions(&kafka, &g, &t)).await?;
            match lagging {
                Ok(lagging) if lagging.is_empty() => return Ok(()),
                Ok(lagging) if tokio::time::Instant::now() > deadline => {
                    bail!("group {group} still behind after {WAIT:?}: {lagging:?}")
                }
                // A leader moving (a broker restarted, a coordinator loading): ask again.
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("group {group}: offsets unreadable after {WAIT:?}: {e:#}")
                }
                _ => {}
            }
        }
    }

    /// Waits until consumer group `group` is stable with `members` members, each with an
    /// assignment: a rebalance after instances joined or left has finished.
    pub async fn wait_group_members(&self, group: &str, members: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let (kafka, g) = (self.kafka.clone(), group.to_string());
            let seen = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, usize)> {
                let client: rdkafka::consumer::BaseConsumer = kafka.reader().create()?;
                let groups = client.fetch_group_list(Some(&g), Duration::from_secs(5))?;
                let Some(info) = groups.groups().first() else { return Ok((String::new(), 0)) };
                let assigned =
                    info.members().iter().filter(|m| m.assignment().is_some_and(|a| !a.is_empty()));
                Ok((info.state().to_string(), assigned.count()))
            })
            .await?;
            match seen {
                Ok((state, n)) if state == "Stable" && n == members => return Ok(()),
                Ok(seen) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "group {group} not stable with {members} members after {WAIT:?}: {seen:?}"
                    )
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("group {group} could not be described after {WAIT:?}: {e:#}")
                }
                _ => {}
            }
        }
    }

    /// A reader of `topic` from the beginning, committed records only.
    pub fn reader<T: topup_proto::Message + Default>(
        &self,
        topic: &'static str,
    ) -> anyhow::Result<Reader<T>> {
        Reader::new(&self.kafka, topic)
    }

    /// Every committed record of `topic` that exists now and decodes as `T` (hostile
    /// records mixed in are skipped), and how many did not.
    pub async fn read_decodable<T: topup_proto::Message + Default>(
        &self,
        topic: &'static str,
    ) -> anyhow::Result<(Vec<T>, usize)> {
        let (mut all, mut skipped) = (Vec::new(), 0);
        for record in self.read_topic(topic).await? {
            match T::decode(record.payload.as_deref().unwrap_or_default()) {
                Ok(message) => all.push(message),
                Err(_) => skipped += 1,
            }
        }
        Ok((all, skipped))
    }

    /// Every committed record of `topic` that exists now, partition after partition.
    pub async fn read_topic(&self, topic: &'static str) -> anyhow::Result<Vec<topup_kafka::Input>> {
        let mut all = Vec::new();
        for partition in 0..PARTITIONS {
            let kafka = self.kafka.clone();
            let records = tokio::task::spawn_blocking(move || {
                read_partition_to_end(&kafka, topic, partition, WAIT)
            })
            .await??;
            all.extend(records);
        }
        Ok(all)
    }

    /// Where `needle` occurs in the committed records of every platform topic (key, value
    /// or header), as `topic/partition@offset`.
    pub async fn find_in_topics(&self, needle: &[u8]) -> anyhow::Result<Vec<String>> {
        let holds = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        let mut found = Vec::new();
        for topic in topup_proto::topics::ALL {
            for record in self.read_topic(topic).await? {
                let in_headers = record.headers.iter().any(|(_, v)| holds(v));
                if holds(record.key.as_deref().unwrap_or_default())
                    || holds(record.payload.as_deref().unwrap_or_default())
                    || in_headers
                {
                    found.push(format!("{topic}/{}@{}", record.partition, record.offset));
                }
            }
        }
        Ok(found)
    }

    /// Every committed record of `topic` that exists now, decoded; any that does not
    /// decode is an error.
    pub async fn read_all<T: topup_proto::Message + Default>(
        &self,
        topic: &'static str,
    ) -> anyhow::Result<Vec<T>> {
        let (all, skipped) = self.read_decodable(topic).await?;
        if skipped > 0 {
            bail!("{skipped} records of {topic} are not a {}", std::any::type_name::<T>());
        }
        Ok(all)
    }

    /// Every committed result, by command id.
    pub async fn results_by_command(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<TopUpResult>>> {
        let mut by_command = std::collections::BTreeMap::<String, Vec<TopUpResult>>::new();
        for result in self.read_all::<TopUpResult>(topup_proto::topics::RESULTS).await? {
            by_command.entry(result.command_id.clone()).or_default().push(result);
        }
        Ok(by_command)
    }

    /// Waits for the result of each `(command id, status, reason)` and checks both; the
    /// results, in that order.
    pub async fn expect_results(
        &self,
        expected: &[(&str, TopUpStatus, FailureReason)],
    ) -> anyhow::Result<Vec<TopUpResult>> {
        let mut results = self.reader::<TopUpResult>(topup_proto::topics::RESULTS)?;
        let mut found = Vec::new();
        for (id, status, reason) in expected {
            let what = format!("the result of {id}");
            let result = results.wait_for(&what, |r| r.command_id == *id).await?.clone();
            let got = FailureReason::try_from(result.failure_reason).unwrap_or_default();
            anyhow::ensure!(
                result.status == *status as i32 && got == *reason,
                "{id}: expected {status:?} / {reason:?}, got {result:?}"
            );
            found.push(result);
        }
        Ok(found)
    }
}

/// Every log line of this process from the call on, kept in memory (and printed to
/// standard error as usual), for tests that look for what logs must never hold. Call it
/// before anything logs (before the platform starts): the first logging set-up of a
/// process is the one that stays. Debug level and up, without timestamps.
pub fn capture_logs() -> CapturedLogs {
    let captured = CapturedLogs::default();
    let writer = captured.clone();
    // One layer, one filter: the lines kept are the lines printed.
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,rdkafka=info,librdkafka=info,sqlx=info,hyper=info,h2=info,reqwest=info",
        ))
        .with_writer(move || writer.clone())
        .try_init();
    captured
}

/// What [`capture_logs`] keeps.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut kept) = self.0.lock() {
            kept.extend_from_slice(bytes);
        }
        // Printed as well, as the tests' logs always are.
        std::io::stderr().write_all(bytes)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Partitions where `group`'s committed offset is short of the end: (topic, partition,
/// committed, end).
fn lagging_partitions(
    kafka: &KafkaArgs,
    group: &str,
    topics: &[&'static str],
) -> anyhow::Result<Vec<(String, i32, i64, i64)>> {
    let consumer: rdkafka::consumer::BaseConsumer = kafka.group_consumer(group).create()?;
    let mut wanted = TopicPartitionList::new();
    for topic in topics {
        for partition in 0..PARTITIONS {
            wanted.add_partition(topic, partition);
        }
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let mut lagging = Vec::new();
    for element in committed.elements() {
        let (_, end) = consumer.fetch_watermarks(
            element.topic(),
            element.partition(),
            Duration::from_secs(10),
        )?;
        let at = match element.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        };
        // A transactional producer's commit marker follows its last record: a group that
        // committed past every record may still be short of the end by markers alone.
        if at < end && has_records(kafka, element.topic(), element.partition(), at, end)? {
            lagging.push((element.topic().to_string(), element.partition(), at, end));
        }
    }
    Ok(lagging)
}

/// Whether `topic`/`partition` holds a committed record in `from..end` (not only
/// transaction markers).
fn has_records(
    kafka: &KafkaArgs,
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
) -> anyhow::Result<bool> {
    let consumer: rdkafka::consumer::BaseConsumer = kafka.reader().create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(50)) {
            return Ok(message?.offset() < end);
        }
        let position = consumer.position()?;
        let at = position.find_partition(topic, partition).map(|p| p.offset());
        if matches!(at, Some(Offset::Offset(n)) if n >= end) {
            return Ok(false);
        }
    }
    // Nothing came and the position never reached the end: an open transaction holds it.
    Ok(true)
}

/// A balance event in CNY fen, observed now.
pub fn balance(subscriber: &str, amount_minor: i64, sequence: u64) -> BalanceUpdated {
    BalanceUpdated {
        subscriber_id: subscriber.into(),
        carrier_id: "test-carrier".into(),
        balance: Some(cny(amount_minor)),
        sequence,
        observed_at: Some(topup_kafka::now_timestamp()),
        event_id: String::new(),
        credited_command_ids: Vec::new(),
    }
}

/// Money in CNY fen.
pub fn cny(amount_minor: i64) -> Money {
    Money { currency: "CNY".into(), amount_minor }
}

/// An active rule: below 10.00 CNY, charge 50.00 CNY to `token`.
pub fn rule(subscriber: &str, token: &str, state: RuleState) -> AutoTopUpRule {
    AutoTopUpRule {
        subscriber_id: subscriber.into(),
        threshold: Some(cny(1000)),
        top_up: Some(TopUp::Amount(cny(5000))),
        payment_methods: vec![PaymentMethod {
            token: token.into(),
            kind: PaymentMethodKind::Card as i32,
            label: "•••• 4242".into(),
            expires: "2030-01".into(),
            currency: "CNY".into(),
            method_id: String::new(),
        }],
        state: state as i32,
        locale: "zh-CN".into(),
        channels: vec![NotificationChannel {
            kind: ChannelKind::Sms as i32,
            address: "+86 13812345678".into(),
        }],
        max_topups_per_day: 0,
        max_amount_per_month: None,
        carrier_id: "test-carrier".into(),
        monthly: None,
    }
}

/// Reads a topic from the beginning and keeps everything it has read.
pub struct Reader<T> {
    consumer: StreamConsumer,
    topic: &'static str,
    /// Records read so far.
    pub seen: Vec<T>,
}

impl<T: topup_proto::Message + Default> Reader<T> {
    fn new(kafka: &KafkaArgs, topic: &'static str) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = kafka.reader().create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(Self { consumer, topic, seen: Vec::new() })
    }

    /// Reads until `count` records read so far satisfy `found`, or fails after [`WAIT`].
    pub async fn wait_for_count(
        &mut self,
        what: &str,
        count: usize,
        found: impl Fn(&T) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.seen.iter().filter(|r| found(r)).count() < count {
            let message = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(message) => message?,
                Err(_) => bail!("timed out after {WAIT:?} waiting on {} for {what}", self.topic),
            };
            self.seen.push(T::decode(message.payload().unwrap_or_default())?);
        }
        Ok(())
    }

    /// Reads until some record read so far satisfies `found`, or fails after [`WAIT`].
    pub async fn wait_for(&mut self, what: &str, found: impl Fn(&T) -> bool) -> anyhow::Result<&T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(index) = self.seen.iter().position(&found) {
                return Ok(&self.seen[index]);
            }
            let message = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(message) => message?,
                Err(_) => bail!("timed out after {WAIT:?} waiting on {} for {what}", self.topic),
            };
            self.seen.push(T::decode(message.payload().unwrap_or_default())?);
        }
    }
}

/// The idempotency key of charging `token` (a card) for the [`command`] with id `command_id`.
pub fn charge_key(command_id: &str, token: &str) -> String {
    let method = topup_domain::payment_method_id(PaymentMethodKind::Card as i32, token);
    topup_domain::method_idempotency_key(&topup_domain::idempotency_key(command_id), &method)
}

/// A command as the evaluator would issue it: 50.00 CNY for `subscriber`, with `tokens`
/// as its payment methods in order.
pub fn command(subscriber: &str, id: &str, tokens: &[&str]) -> TopUpCommand {
    TopUpCommand {
        command_id: id.into(),
        subscriber_id: subscriber.into(),
        amount: Some(cny(5000)),
        payment_methods: tokens
            .iter()
            .map(|token| PaymentMethod {
                token: (*token).into(),
                kind: PaymentMethodKind::Card as i32,
                label: String::new(),
                expires: String::new(),
                currency: String::new(),
                method_id: topup_domain::payment_method_id(PaymentMethodKind::Card as i32, token),
            })
            .collect(),
        idempotency_key: topup_domain::idempotency_key(id),
        cause_event_id: String::new(),
        cause_sequence: 1,
        carrier_id: "test-carrier".into(),
        observed_at: Some(topup_kafka::now_timestamp()),
        issued_at: Some(topup_kafka::now_timestamp()),
        locale: "en".into(),
        trigger: topup_proto::v1::TopUpTrigger::Threshold as i32,
        channels: vec![NotificationChannel {
            kind: ChannelKind::Email as i32,
            address: format!("{subscriber}@example.com"),
        }],
        rule_version: 0,
    }
}

/// The sum of the series `name` in the Prometheus text `metrics` whose labels include all of
/// `labels` (other labels, such as the counting instance's `instance_id`, may be there too).
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let has = |(k, v): &(&str, &str)| rest.split(',').any(|l| l == format!("{k}=\"{v}\""));
            (metric == name && labels.iter().all(has)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
