//! What the payment worker knows of the subscribers' rules, read by itself from
//! `topup.rules.v1`, so that a charge is made only while the rule is still active and the
//! method still on it — whatever the evaluator saw when it issued the command.
//!
//! Records of different topics have no order: a pause written before a command may be read
//! after it. So before a batch is charged, the view reads the rules topic up to the end
//! offsets asked for at that moment ([`RuleView::caught_up`]); every rule change committed
//! before the charge is then known. A change committed later races with the charge, as it
//! would with any check.
//!
//! The view holds every subscriber of every partition (a few dozen bytes each: the rule's
//! version, whether it is active, its method ids) and reads the topic from its beginning at
//! start-up; `topup.rules.v1` is compacted by subscriber for that reason.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use topup_domain::{payment_method_id, Rule};
use topup_kafka::KafkaArgs;
use topup_proto::v1::{PaymentMethod, RuleUpdated};
use topup_proto::{topics, Message as _};

/// What the worker knows of one subscriber's rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleAuthority {
    /// One more than the rule record's offset (the version commands carry).
    pub version: u64,
    /// Only an active rule charges.
    pub active: bool,
    /// The ids of the methods on it.
    pub method_ids: Vec<String>,
}

/// The stable id of a command's payment method, derived from its kind and token as the
/// rule's validation derives it (whatever id the record carries).
pub fn method_id_of(method: &PaymentMethod) -> String {
    payment_method_id(method.kind, &method.token)
}

#[derive(Default)]
struct Shared {
    rules: RwLock<HashMap<String, RuleAuthority>>,
    /// Next offset to read, per partition (past control records too).
    positions: Mutex<HashMap<i32, i64>>,
    /// Set once the topic's partitions are assigned.
    consumer: Mutex<Option<Arc<BaseConsumer>>>,
    /// Fed by hand ([`RuleView::fixed`]): always caught up.
    fixed: bool,
}

/// The rule view. Clones share one reader.
#[derive(Clone)]
pub struct RuleView {
    shared: Arc<Shared>,
}

/// How long a watermark query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl RuleView {
    /// Starts reading `topup.rules.v1` from its beginning on a thread of its own, until
    /// `shutdown`.
    pub fn start(kafka: &KafkaArgs, shutdown: CancellationToken) -> Self {
        let view = Self { shared: Arc::default() };
        let shared = view.shared.clone();
        let config = kafka.reader();
        let spawned = std::thread::Builder::new()
            .name("rule-view".into())
            .spawn(move || read_rules(&shared, &config, &shutdown));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the rule view: charges will wait");
        }
        view
    }

    /// A view fed by hand, for tests of the worker without Kafka.
    pub fn fixed(rules: HashMap<String, RuleAuthority>) -> Self {
        Self {
            shared: Arc::new(Shared {
                rules: RwLock::new(rules),
                fixed: true,
                ..Shared::default()
            }),
        }
    }

    /// The rule of `subscriber`, as far as read.
    pub fn rule(&self, subscriber: &str) -> Option<RuleAuthority> {
        self.shared.rules.read().ok()?.get(subscriber).cloned()
    }

    /// Waits (at most `deadline`) until the view has read every partition up to the end
    /// offsets it has now. `false` when it could not: the caller must not charge on what
    /// the view says.
    pub async fn caught_up(&self, deadline: Duration) -> bool {
        let consumer = self.shared.consumer.lock().ok().and_then(|c| c.clone());
        let Some(consumer) = consumer else {
            // A fixed view is always caught up; a reading one not yet assigned is not.
            return self.shared.fixed;
        };
        let partitions: Vec<i32> =
            self.shared.positions.lock().map(|p| p.keys().copied().collect()).unwrap_or_default();
        let ends = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|p| {
                    consumer.fetch_watermarks(topics::RULES, p, QUERY_TIMEOUT).map(|(_, h)| (p, h))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        let ends = match ends {
            Ok(Ok(ends)) => ends,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "rule view: end offsets unavailable");
                return false;
            }
            Err(_) => return false,
        };
        let until = Instant::now() + deadline;
        loop {
            let behind = self.shared.positions.lock().map_or(true, |positions| {
                ends.iter().any(|(p, end)| positions.get(p).copied().unwrap_or(0) < *end)
            });
            if !behind {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            // The reader thread advances the positions; look again shortly.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The reader thread: assigns every partition of the rules topic from the beginning and
/// folds each record into the view.
fn read_rules(shared: &Shared, config: &rdkafka::ClientConfig, shutdown: &CancellationToken) {
    let consumer: BaseConsumer = match config.create() {
        Ok(consumer) => consumer,
        Err(e) => {
            tracing::error!(error = %e, "rule view: cannot create its consumer");
            return;
        }
    };
    let consumer = Arc::new(consumer);
    // The topic may not exist yet (topics created by another process): ask until it does.
    let partitions = loop {
        if shutdown.is_cancelled() {
            return;
        }
        match consumer.fetch_metadata(Some(topics::RULES), QUERY_TIMEOUT) {
            Ok(metadata) => {
                let found: Vec<i32> = metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topics::RULES && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                if !found.is_empty() {
                    break found;
                }
            }
            Err(e) => tracing::debug!(error = %e, "rule view: waiting for topup.rules.v1"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        if let Err(e) = assignment.add_partition_offset(topics::RULES, *p, Offset::Beginning) {
            tracing::error!(error = %e, "rule view: bad assignment");
            return;
        }
    }
    if let Err(e) = consumer.assign(&assignment) {
        tracing::error!(error = %e, "rule view: cannot assign topup.rules.v1");
        return;
    }
    if let Ok(mut positions) = shared.positions.lock() {
        positions.extend(partitions.iter().map(|p| (*p, 0)));
    }
    if let Ok(mut slot) = shared.consumer.lock() {
        *slot = Some(consumer.clone());
    }
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let version = u64::try_from(message.offset()).map_or(0, |o| o + 1);
                if let Some((subscriber, authority)) = authority_of(message.payload(), version) {
                    if let Ok(mut rules) = shared.rules.write() {
                        let newer = rules.get(&subscriber).is_none_or(|r| r.version < version);
                        if newer {
                            rules.insert(subscriber, authority);
                        }
                    }
                }
                if let Ok(mut positions) = shared.positions.lock() {
                    positions.insert(message.partition(), message.offset() + 1);
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "rule view: consumer error"),
            None => {}
        }
        // The consumer's own position also moves past transaction markers, which are
        // never delivered as messages.
        if let Ok(list) = consumer.position() {
            if let Ok(mut positions) = shared.positions.lock() {
                for element in list.elements() {
                    if let Offset::Offset(next) = element.offset() {
                        let known = positions.entry(element.partition()).or_insert(0);
                        *known = (*known).max(next);
                    }
                }
            }
        }
    }
}

/// A rules record as the view keeps it; `None` for a record the evaluator refuses too (it
/// keeps the rule before it, and so does the view).
fn authority_of(payload: Option<&[u8]>, version: u64) -> Option<(String, RuleAuthority)> {
    let update = RuleUpdated::decode(payload?).ok()?;
    let rule = Rule::try_from(update.rule.as_ref()?).ok()?;
    let authority = RuleAuthority {
        version,
        active: rule.is_active(),
        method_ids: rule.payment_methods.iter().map(topup_domain::PaymentMethod::id).collect(),
    };
    Some((rule.subscriber.to_string(), authority))
}
