//! Where a record becomes a decision: decode and validate the input, load the subscriber's
//! state, `decide`, and turn the effects and the new state into records.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use topup_domain::{BalanceObservation, Money, Rule, SubscriberId, TopUpOutcome};
use topup_kafka::{decode, Input, KafkaArgs, Output, Processor, Refusal, StateStore};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::v1::{self as wire, BalanceUpdated, RuleUpdated, TopUpResult};
use topup_proto::{topics, Message};

use crate::decide::{
    decide, on_day, reissue, Effect, Event, InputRecord, Settings, SubscriberState,
};
use crate::metrics::{self, count};

/// The evaluator's Kafka-facing half; the decision itself is in [`crate::decide`].
pub struct Evaluator {
    settings: Settings,
    /// State per input partition, then per subscriber id.
    store: StateStore<SubscriberState>,
    /// The UTC day every subscriber was last looked at for [`on_day`] (monthly top-ups,
    /// expiry reminders); `None` after a (re)assignment.
    scanned_day: Option<i64>,
    /// Subscribers whose rule changed since, looked at on the next tick.
    rule_changed: HashSet<(i32, String)>,
    /// On the mock cluster, which shows records of transactions never committed, the
    /// record that issued the top-up in flight may be read again after a crash: its command
    /// is then issued again (see [`crate::decide::reissue`]). Never on Apache Kafka.
    reissue_on_reread: bool,
}

/// How far ahead of the record's own time a balance's `observed_at` may be.
const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Suffix of the changelog key holding a subscriber's rule ("sub-42 rule"); a space never
/// occurs in a subscriber id. The rule is written apart from the rest of the state so that
/// a balance event — the common case — writes a small record, not the rule again.
const RULE_KEY_SUFFIX: &str = " rule";

/// The changelog key of `subscriber`'s rule.
pub fn rule_key(subscriber: &str) -> String {
    format!("{subscriber}{RULE_KEY_SUFFIX}")
}

/// Folds one changelog record into a partition's states (see [`topup_kafka::ApplyRecord`]).
fn apply_record(
    states: &mut HashMap<String, SubscriberState>,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), String> {
    if let Some(subscriber) = key.strip_suffix(RULE_KEY_SUFFIX) {
        let rule = match value {
            None => None,
            Some(bytes) => {
                let raw = wire::AutoTopUpRule::decode(bytes).map_err(|e| e.to_string())?;
                Some(Arc::new(Rule::try_from(&raw).map_err(|e| e.to_string())?))
            }
        };
        match states.get_mut(subscriber) {
            Some(state) => state.rule = rule,
            None => {
                let id = SubscriberId::parse(subscriber).map_err(|e| e.to_string())?;
                let mut state = SubscriberState::new(id);
                state.rule = rule;
                states.insert(subscriber.to_string(), state);
            }
        }
        return Ok(());
    }
    let Some(bytes) = value else {
        states.remove(key);
        return Ok(());
    };
    let mut record = changelog::SubscriberState::decode(bytes).map_err(|e| e.to_string())?;
    if record.subscriber_id.is_empty() {
        // Left out when written: it is the key.
        record.subscriber_id = key.to_string();
    }
    let mut state = SubscriberState::try_from(&record).map_err(|e| e.to_string())?;
    // Records without a rule leave the rule written under its own key in place (records
    // written before the split carry their rule and replace it).
    if record.rule.is_none() {
        state.rule = states.get(key).and_then(|s| s.rule.clone());
    }
    states.insert(key.to_string(), state);
    Ok(())
}

impl Evaluator {
    /// An evaluator with no partitions yet.
    pub fn new(kafka: KafkaArgs, settings: Settings) -> Self {
        Self {
            settings,
            reissue_on_reread: kafka.mock_cluster,
            store: StateStore::new(kafka, topics::EVALUATOR_STATE, apply_record),
            scanned_day: None,
            rule_changed: HashSet::new(),
        }
    }
}

fn event_of(input: &Input) -> Result<(SubscriberId, Event), Refusal> {
    match input.topic.as_str() {
        topics::BALANCE => {
            count(&metrics::BALANCE_EVENTS);
            let raw: BalanceUpdated = decode(input, |m: &BalanceUpdated| &m.subscriber_id)?;
            let observation = BalanceObservation::try_from(&raw)?;
            // A balance from the future would win over every real one that follows (and its
            // day would count caps wrongly): refuse it, allowing for clock skew.
            if let Some(observed) = &observation.observed_at {
                let limit = input.time().seconds.saturating_add(MAX_CLOCK_SKEW_SECS);
                if observed.seconds > limit {
                    return Err(Refusal::new(format!(
                        "observed_at: {}s is more than {MAX_CLOCK_SKEW_SECS}s ahead of the record's time {}s",
                        observed.seconds,
                        input.time().seconds
                    )));
                }
            }
            Ok((observation.subscriber.clone(), Event::Balance(observation)))
        }
        topics::RULES => {
            let raw: RuleUpdated = decode(input, |m: &RuleUpdated| {
                m.rule.as_ref().map_or("", |r| r.subscriber_id.as_str())
            })?;
            let wire = raw.rule.as_ref().ok_or_else(|| Refusal::new("rule: is required"))?;
            let rule = Rule::try_from(wire).map_err(|e| e.within("rule"))?;
            Ok((rule.subscriber.clone(), Event::Rule(Box::new(rule))))
        }
        topics::RESULTS => {
            let raw: TopUpResult = decode(input, |m: &TopUpResult| &m.subscriber_id)?;
            let outcome = TopUpOutcome::try_from(&raw)?;
            Ok((outcome.subscriber.clone(), Event::Outcome(outcome)))
        }
        other => Err(Refusal::new(format!("the evaluator does not consume {other}"))),
    }
}

/// Where `input` is, when it is one of the evaluator's inputs.
fn input_record(input: &Input) -> Option<InputRecord> {
    let topic = [topics::BALANCE, topics::RULES, topics::RESULTS]
        .into_iter()
        .find(|t| *t == input.topic)?;
    Some(InputRecord { topic, offset: input.offset })
}

/// Turns effects into output records.
fn emit(effects: Vec<Effect>, subscriber: &SubscriberId, out: &mut Vec<Output>) {
    for effect in effects {
        match effect {
            Effect::Command(command) => {
                count(&metrics::COMMANDS_ISSUED);
                let exported = metrics::exported();
                exported.topups_issued.inc(&[]);
                if let Some(seconds) = topup_kafka::ops::seconds_since(command.observed_at.as_ref())
                {
                    exported.command_latency.observe(seconds);
                }
                tracing::info!(
                    subscriber = %subscriber,
                    command_id = %command.command_id,
                    amount = %command.amount.as_ref().and_then(|m| Money::try_from(m).ok()).map(|m| m.to_string()).unwrap_or_default(),
                    "balance below threshold: top-up issued"
                );
                out.push(Output::message(topics::COMMANDS, subscriber.as_str(), &command));
            }
            Effect::Notify(notification) => {
                count(&metrics::NOTIFICATIONS_ISSUED);
                out.push(Output::message(
                    topics::NOTIFICATIONS,
                    subscriber.as_str(),
                    &notification,
                ));
            }
        }
    }
}

impl Evaluator {
    /// Every tick: the top-ups that have waited too long for their result, issued again
    /// under the same id (see [`crate::decide::reissue_overdue`]).
    fn reissue_overdue(&mut self, now: topup_proto::Timestamp, out: &mut Vec<Output>) {
        if self.settings.reissue_after_secs <= 0 {
            return;
        }
        let mut changed = Vec::new();
        for (partition, states) in self.store.partitions_mut() {
            for (subscriber, state) in states.iter_mut().filter(|(_, s)| s.in_flight.is_some()) {
                let (after, command) =
                    crate::decide::reissue_overdue(state.clone(), now, &self.settings);
                if after.differs_from(state) {
                    *state = after;
                    changed.push((partition, subscriber.clone(), state.encode_record(), command));
                }
            }
        }
        for (partition, subscriber, record, command) in changed {
            out.push(self.store.record_bytes(partition, &subscriber, record));
            let Some(command) = command else { continue };
            tracing::warn!(
                subscriber = %subscriber,
                command_id = %command.command_id,
                after_secs = self.settings.reissue_after_secs,
                "top-up without a result for too long: command issued again under the same id"
            );
            metrics::exported().topups_reissued.inc(&[]);
            out.push(Output::message(topics::COMMANDS, &subscriber, &command));
        }
    }
}

impl Evaluator {
    /// Every tick: charged top-ups whose credit the carrier has not reported in time (see
    /// [`crate::decide::credit_overdue`]).
    fn credits_overdue(&mut self, now: topup_proto::Timestamp, out: &mut Vec<Output>) {
        let mut raised = Vec::new();
        for (partition, states) in self.store.partitions_mut() {
            for (subscriber, state) in states.iter_mut().filter(|(_, s)| s.credit_watch.is_some()) {
                let (after, notice) = crate::decide::credit_overdue(state.clone(), now);
                if let Some(notice) = notice {
                    *state = after;
                    raised.push((partition, subscriber.clone(), state.encode_record(), notice));
                }
            }
        }
        for (partition, subscriber, record, notice) in raised {
            tracing::error!(
                subscriber = %subscriber,
                command_id = %notice.command_id,
                "a charged top-up was not credited by the carrier in time"
            );
            metrics::exported().credits_overdue.inc(&[]);
            out.push(self.store.record_bytes(partition, &subscriber, record));
            out.push(Output::message(topics::NOTIFICATIONS, &subscriber, &notice));
        }
    }
}

impl Processor for Evaluator {
    async fn assigned(&mut self, partitions: &BTreeSet<i32>) -> topup_kafka::Result<()> {
        self.scanned_day = None;
        self.store.restore(partitions).await
    }

    fn revoked(&mut self, partitions: &BTreeSet<i32>) {
        self.store.revoke(partitions);
    }

    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        let (subscriber, event) = event_of(input).inspect_err(|_| count(&metrics::DEAD_LETTERS))?;
        let states = self.store.partition_mut(input.partition);
        let before = states
            .remove(subscriber.as_str())
            .unwrap_or_else(|| SubscriberState::new(subscriber.clone()));
        let origin = format!("{}/{}/{}", input.topic, input.partition, input.offset);
        let record = input_record(input);
        let reread = record.filter(|_| self.reissue_on_reread);
        if let Some(effects) = reread.and_then(|r| reissue(&before, r, &event, input.time())) {
            tracing::warn!(
                subscriber = %subscriber,
                offset = input.offset,
                "the record that issued the top-up in flight was read again: command issued again under the same id"
            );
            emit(effects, &subscriber, out);
            self.store.partition_mut(input.partition).insert(subscriber.to_string(), before);
            return Ok(());
        }
        let kept = before.clone();
        match decide(before, event, &origin, input.time(), &self.settings) {
            Ok((mut after, effects)) => {
                if input.topic == topics::RULES {
                    // The version commands carry: the payment worker compares it with the
                    // rules it reads itself.
                    after.rule_version = u64::try_from(input.offset).map_or(0, |o| o + 1);
                }
                if effects.iter().any(|e| matches!(e, Effect::Command(_))) {
                    if let Some(flight) = after.in_flight.as_mut() {
                        flight.issued_by = record;
                    }
                }
                emit(effects, &subscriber, out);
                if after.differs_from(&kept) {
                    out.push(self.store.record_bytes(
                        input.partition,
                        subscriber.as_str(),
                        after.encode_record(),
                    ));
                }
                let rule_changed = match (&kept.rule, &after.rule) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (None, None) => false,
                    _ => true,
                };
                if rule_changed {
                    self.rule_changed.insert((input.partition, subscriber.to_string()));
                    let key = rule_key(subscriber.as_str());
                    out.push(match &after.rule {
                        Some(rule) => self.store.record_bytes(
                            input.partition,
                            &key,
                            rule.wire.encode_to_vec(),
                        ),
                        None => self.store.tombstone(input.partition, &key),
                    });
                }
                self.store.partition_mut(input.partition).insert(subscriber.to_string(), after);
                Ok(())
            }
            Err(reason) => {
                self.store.partition_mut(input.partition).insert(subscriber.to_string(), kept);
                count(&metrics::DEAD_LETTERS);
                Err(Refusal::new(reason))
            }
        }
    }

    /// Once per UTC day every subscriber, and any whose rule changed since the last tick:
    /// the monthly top-up when due, reminders for payment methods about to expire.
    async fn tick(&mut self, now: SystemTime) -> Vec<Output> {
        let now = topup_kafka::timestamp_of(now);
        let day = now.seconds.div_euclid(86_400);
        let changed = std::mem::take(&mut self.rule_changed);
        let targets: Vec<(i32, String)> = if self.scanned_day == Some(day) {
            changed.into_iter().collect()
        } else {
            self.store
                .partitions_mut()
                .flat_map(|(partition, states)| {
                    states
                        .iter()
                        .filter(|(_, state)| state.rule.is_some())
                        .map(move |(subscriber, _)| (partition, subscriber.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut out = Vec::new();
        for (partition, subscriber) in targets {
            let Some(state) = self.store.partition_mut(partition).get_mut(&subscriber) else {
                continue;
            };
            let (after, effects) = on_day(state.clone(), now);
            let record = after.differs_from(state).then(|| after.encode_record());
            *state = after;
            if let Ok(id) = SubscriberId::parse(&subscriber) {
                emit(effects, &id, &mut out);
            }
            if let Some(record) = record {
                out.push(self.store.record_bytes(partition, &subscriber, record));
            }
        }
        self.scanned_day = Some(day);
        self.reissue_overdue(now, &mut out);
        self.credits_overdue(now, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_rule(subscriber: &str) -> wire::AutoTopUpRule {
        let cny = |minor| wire::Money { currency: "CNY".into(), amount_minor: minor };
        wire::AutoTopUpRule {
            subscriber_id: subscriber.into(),
            threshold: Some(cny(1000)),
            top_up: Some(wire::auto_top_up_rule::TopUp::Amount(cny(5000))),
            payment_methods: vec![wire::PaymentMethod {
                token: "tok_1".into(),
                kind: wire::PaymentMethodKind::Card as i32,
                ..Default::default()
            }],
            state: wire::RuleState::Active as i32,
            ..Default::default()
        }
    }

    fn dynamic(subscriber: &str, sequence: u64) -> Vec<u8> {
        changelog::SubscriberState {
            subscriber_id: subscriber.into(),
            balance: Some(wire::Money { currency: "CNY".into(), amount_minor: 800 }),
            balance_sequence: sequence,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn restore_folds_the_rule_key_and_the_state_key_in_any_order() {
        let mut states = HashMap::new();
        let rule = raw_rule("sub-1").encode_to_vec();
        // Rule first, then state records: the rule stays.
        apply_record(&mut states, "sub-1 rule", Some(&rule)).unwrap();
        apply_record(&mut states, "sub-1", Some(&dynamic("sub-1", 1))).unwrap();
        apply_record(&mut states, "sub-1", Some(&dynamic("sub-1", 2))).unwrap();
        let state = &states["sub-1"];
        assert!(state.rule.is_some());
        assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(2));
        // State first, then the rule.
        apply_record(&mut states, "sub-2", Some(&dynamic("sub-2", 5))).unwrap();
        apply_record(&mut states, "sub-2 rule", Some(&raw_rule("sub-2").encode_to_vec())).unwrap();
        assert!(states["sub-2"].rule.is_some());
        assert_eq!(states["sub-2"].balance.as_ref().map(|b| b.sequence), Some(5));
        // A rule tombstone removes the rule, and later state records do not bring it back.
        apply_record(&mut states, "sub-1 rule", None).unwrap();
        apply_record(&mut states, "sub-1", Some(&dynamic("sub-1", 3))).unwrap();
        assert!(states["sub-1"].rule.is_none());
        // A record written before the split carries its rule.
        let mut old = changelog::SubscriberState::decode(dynamic("sub-3", 1).as_slice()).unwrap();
        old.rule = Some(raw_rule("sub-3"));
        apply_record(&mut states, "sub-3", Some(&old.encode_to_vec())).unwrap();
        assert!(states["sub-3"].rule.is_some());
        // The compact record (no subscriber id, no in-flight command id) reads back whole.
        let settings = Settings::default();
        let now = topup_proto::Timestamp { seconds: 1_764_000_000, nanos: 0 };
        let rule = Rule::try_from(&raw_rule("sub-5")).unwrap();
        let state = SubscriberState::new(SubscriberId::parse("sub-5").unwrap());
        let (state, _) = decide(state, Event::Rule(Box::new(rule)), "t", now, &settings).unwrap();
        let low = changelog::SubscriberState::decode(dynamic("sub-5", 1).as_slice()).unwrap();
        let observation = BalanceObservation::try_from(&wire::BalanceUpdated {
            subscriber_id: "sub-5".into(),
            balance: low.balance,
            sequence: 1,
            ..Default::default()
        })
        .unwrap();
        let (state, effects) =
            decide(state, Event::Balance(observation), "t", now, &settings).unwrap();
        assert!(!effects.is_empty());
        let issued = state.in_flight.as_ref().map(|f| f.command_id.clone()).unwrap();
        apply_record(&mut states, "sub-5", Some(&state.encode_record())).unwrap();
        assert_eq!(states["sub-5"].in_flight.as_ref().map(|f| f.command_id.clone()), Some(issued));
        assert_eq!(states["sub-5"].subscriber.as_str(), "sub-5");

        // Garbage is refused with a reason, the states untouched.
        assert!(apply_record(&mut states, "sub-4 rule", Some(b"\xff\xff")).is_err());
        assert!(!states.contains_key("sub-4"));
    }

    fn input(topic: &str, offset: i64, key: &str, payload: Vec<u8>) -> Input {
        Input {
            topic: topic.to_string(),
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(payload),
            timestamp_ms: Some(1_764_000_000_000),
            headers: Vec::new(),
        }
    }

    /// A crash after the state was written but before the command was (on a broker that shows
    /// uncommitted records): the restored evaluator, reading the same records again, issues
    /// the same command again.
    #[test]
    fn a_state_restored_from_an_unfinished_batch_issues_its_command_again() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let kafka = KafkaArgs { mock_cluster: true, ..KafkaArgs::new("unused:9092") };
            let settings = Settings::default();
            let rule = wire::RuleUpdated { rule: Some(raw_rule("sub-1")), updated_at: None };
            let balance = |seq: u64, minor: i64| {
                wire::BalanceUpdated {
                    subscriber_id: "sub-1".into(),
                    balance: Some(wire::Money { currency: "CNY".into(), amount_minor: minor }),
                    sequence: seq,
                    ..Default::default()
                }
                .encode_to_vec()
            };
            let records = vec![
                input(topics::RULES, 0, "sub-1", rule.encode_to_vec()),
                input(topics::BALANCE, 10, "sub-1", balance(1, 1500)),
                input(topics::BALANCE, 11, "sub-1", balance(2, 500)),
                input(topics::BALANCE, 12, "sub-1", balance(3, 450)),
            ];
            let mut first = Evaluator::new(kafka.clone(), settings);
            let mut out = Vec::new();
            for record in &records {
                first.process(record, &mut out).await.unwrap();
            }
            let issued: Vec<_> = out.iter().filter(|o| o.topic == topics::COMMANDS).collect();
            assert_eq!(issued.len(), 1);
            // Only the changelog survived: restore it, then read the balances again.
            let mut second = Evaluator::new(kafka, settings);
            for o in out.iter().filter(|o| o.topic == topics::EVALUATOR_STATE) {
                let key = String::from_utf8(o.key.clone()).unwrap();
                apply_record(second.store.partition_mut(0), &key, o.payload.as_deref()).unwrap();
            }
            let mut again = Vec::new();
            for record in &records[1..] {
                second.process(record, &mut again).await.unwrap();
            }
            let reissued: Vec<_> = again.iter().filter(|o| o.topic == topics::COMMANDS).collect();
            assert_eq!(reissued.len(), 1, "the command again");
            // The same command (its issued_at aside): the same id, so the same idempotency key.
            let id = |o: &Output| {
                wire::TopUpCommand::decode(o.payload.as_deref().unwrap_or_default())
                    .unwrap()
                    .command_id
            };
            assert_eq!(id(reissued[0]), id(issued[0]));
        });
    }
}
