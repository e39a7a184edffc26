//! A carrier simulator: subscribers whose balances fall with usage, most with rules (some
//! with cards that will be declined or have expired, some paused, some without a rule), and
//! a carrier that credits the balance when a top-up succeeds and publishes the new balance.
use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use topup_kafka::{now_timestamp, KafkaArgs};
use topup_proto::v1::{
    auto_top_up_rule::TopUp, AutoTopUpRule, BalanceUpdated, ChannelKind, Money,
    NotificationChannel, PaymentMethod, PaymentMethodKind, RuleState, RuleUpdated, TopUpResult,
    TopUpStatus,
};
use topup_proto::{topics, Message as _};

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// How many subscribers.
    pub subscribers: usize,
    /// Time between usage rounds.
    pub tick: Duration,
    /// Seed of the (deterministic) usage pattern.
    pub seed: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self { subscribers: 300, tick: Duration::from_millis(100), seed: 42 }
    }
}

const CARRIER: &str = "sim-mobile";
const CURRENCY: &str = "CNY";

/// xorshift64*: deterministic, dependency-free, good enough for simulated usage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn cny(amount_minor: i64) -> Option<Money> {
    Some(Money { currency: CURRENCY.into(), amount_minor })
}

/// The rule subscriber `index` sets up, if any. The mix shows every path of the loop.
pub fn rule_for(index: usize, subscriber_id: &str) -> Option<AutoTopUpRule> {
    let card = |token: &str, label: &str| PaymentMethod {
        method_id: Default::default(),
        token: token.into(),
        kind: PaymentMethodKind::Card as i32,
        label: label.into(),
        expires: "2029-12".into(),
        currency: CURRENCY.into(),
    };
    let (methods, state, top_up) = match index % 10 {
        0 => return None,
        1 => (
            vec![card("tok_approve_1111", "•••• 1111")],
            RuleState::Paused,
            TopUp::Amount(Money { currency: CURRENCY.into(), amount_minor: 5000 }),
        ),
        2 => (
            vec![card("tok_decline_0002", "•••• 0002")],
            RuleState::Active,
            TopUp::Amount(Money { currency: CURRENCY.into(), amount_minor: 5000 }),
        ),
        3 => (
            vec![
                card("tok_expired_0003", "•••• 0003"),
                PaymentMethod {
                    method_id: Default::default(),
                    token: "tok_alipay_approve_03".into(),
                    kind: PaymentMethodKind::Alipay as i32,
                    label: "alipay: 13*******03".into(),
                    expires: String::new(),
                    currency: String::new(),
                },
            ],
            RuleState::Active,
            TopUp::Amount(Money { currency: CURRENCY.into(), amount_minor: 3000 }),
        ),
        4 => (
            vec![card("tok_approve_4444", "•••• 4444")],
            RuleState::Active,
            TopUp::TargetBalance(Money { currency: CURRENCY.into(), amount_minor: 8000 }),
        ),
        // The gateway fails twice, the retry lane charges on the third attempt.
        5 => (
            vec![card("tok_transient2_5555", "•••• 5555")],
            RuleState::Active,
            TopUp::Amount(Money { currency: CURRENCY.into(), amount_minor: 5000 }),
        ),
        _ => (
            vec![card("tok_approve_4242", "•••• 4242")],
            RuleState::Active,
            TopUp::Amount(Money { currency: CURRENCY.into(), amount_minor: 5000 }),
        ),
    };
    let locale = if index.is_multiple_of(2) { "zh-CN" } else { "en" };
    let mut channels = vec![NotificationChannel {
        kind: ChannelKind::Sms as i32,
        address: format!("+86 138{:08}", index),
    }];
    if index.is_multiple_of(3) {
        channels.push(NotificationChannel {
            kind: ChannelKind::Email as i32,
            address: format!("user{index}@example.com"),
        });
    }
    Some(AutoTopUpRule {
        subscriber_id: subscriber_id.into(),
        threshold: cny(1000),
        top_up: Some(top_up),
        payment_methods: methods,
        state: state as i32,
        locale: locale.into(),
        channels,
        max_topups_per_day: 20,
        max_amount_per_month: cny(200_000),
        carrier_id: CARRIER.into(),
        monthly: None,
    })
}

struct Subscriber {
    id: String,
    balance: i64,
    sequence: u64,
}

async fn publish(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("publishing to {topic}: {e}"))?;
    Ok(())
}

async fn publish_balance(producer: &FutureProducer, s: &mut Subscriber) -> anyhow::Result<()> {
    s.sequence += 1;
    let event = BalanceUpdated {
        credited_command_ids: Default::default(),
        subscriber_id: s.id.clone(),
        carrier_id: CARRIER.into(),
        balance: cny(s.balance),
        sequence: s.sequence,
        observed_at: Some(now_timestamp()),
        event_id: String::new(),
    };
    publish(producer, topics::BALANCE, &s.id, event.encode_to_vec()).await
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn run(
    kafka: KafkaArgs,
    config: SimulatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka.producer().create()?;
    let results: StreamConsumer = kafka.group_consumer("carrier-simulator").create()?;
    results.subscribe(&[topics::RESULTS])?;
    let mut rng = Rng(config.seed.max(1));
    let mut subscribers: Vec<Subscriber> = (0..config.subscribers)
        .map(|i| Subscriber {
            id: format!("sub-{i:04}"),
            balance: 1500 + rng.below(4500) as i64,
            sequence: 0,
        })
        .collect();
    let index: HashMap<String, usize> =
        subscribers.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect();
    for (i, s) in subscribers.iter_mut().enumerate() {
        if let Some(rule) = rule_for(i, &s.id) {
            let update = RuleUpdated { rule: Some(rule), updated_at: Some(now_timestamp()) };
            publish(&producer, topics::RULES, &s.id, update.encode_to_vec()).await?;
        }
        publish_balance(&producer, s).await?;
    }
    tracing::info!(
        subscribers = subscribers.len(),
        "carrier simulator: rules and opening balances published"
    );
    let mut ticks = tokio::time::interval(config.tick);
    let per_tick = (subscribers.len() / 20).max(1);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // The carrier credits successful top-ups and reports the new balance.
            message = results.recv() => {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => { tracing::warn!(error = %e, "simulator: results consumer error"); continue; }
                };
                let Some(result) = message.payload().and_then(|p| TopUpResult::decode(p).ok()) else { continue };
                if result.status != TopUpStatus::Succeeded as i32 { continue; }
                let (Some(&i), Some(amount)) = (index.get(&result.subscriber_id), result.amount.as_ref()) else { continue };
                let s = &mut subscribers[i];
                s.balance += amount.amount_minor;
                publish_balance(&producer, s).await?;
            }
            // Usage: a few subscribers spend a little; suspended ones (at zero) sometimes top up by hand.
            _ = ticks.tick() => {
                for _ in 0..per_tick {
                    let s = &mut subscribers[rng.below(config.subscribers as u64) as usize];
                    if s.balance <= 0 {
                        if rng.below(50) == 0 {
                            s.balance = 3000;
                            publish_balance(&producer, s).await?;
                        }
                        continue;
                    }
                    s.balance = (s.balance - 100 - rng.below(700) as i64).max(0);
                    publish_balance(&producer, s).await?;
                }
            }
        }
    }
    Ok(())
}
