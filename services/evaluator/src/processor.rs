//! Where a record becomes a decision: decode and validate the input, `decide` with the
//! subscriber's state (which the pipeline's task hands over and keeps), and turn the
//! effects into records. The changelog format is in [`crate::changelog`].
use std::time::SystemTime;

use topup_domain::{BalanceObservation, Rule, SubscriberId, TopUpOutcome};
use topup_kafka::{decode, Answer, Changelog, Input, KafkaArgs, Output, Processor, Refusal};
use topup_proto::topics;
use topup_proto::v1::{BalanceUpdated, RuleUpdated, TopUpResult};

use crate::decide::{
    credit_overdue, decide, next_due, on_day, reissue, reissue_overdue, Effect, Event, InputRecord,
    Settings, SubscriberState,
};
use crate::metrics::{CreditOverdue, TopUpIssued, TopUpReissued};

/// The evaluator's Kafka-facing half; the decision itself is in [`crate::decide`].
pub struct Evaluator {
    settings: Settings,
    /// On the mock cluster, which shows records of transactions never committed, the
    /// record that issued the top-up in flight may be read again after a crash: its command
    /// is then issued again (see [`crate::decide::reissue`]). Never on Apache Kafka.
    reissue_on_reread: bool,
}

/// How far ahead of the record's own time a balance's `observed_at` may be.
const MAX_CLOCK_SKEW_SECS: i64 = 300;

impl Evaluator {
    /// An evaluator with no partitions yet.
    pub fn new(kafka: KafkaArgs, settings: Settings) -> Self {
        Self { settings, reissue_on_reread: kafka.mock_cluster }
    }
}

/// The time `input` is decided at: the record's own time (deterministic on replay), but
/// never more than [`MAX_CLOCK_SKEW_SECS`] ahead of this process's clock. A producer's clock
/// far ahead would otherwise open windows no real time reaches for years (a cap's day, a
/// month), and every later record would count in them.
fn decision_time(input: &Input) -> topup_proto::Timestamp {
    let record = input.time();
    let limit = topup_kafka::now_timestamp().seconds.saturating_add(MAX_CLOCK_SKEW_SECS);
    if record.seconds > limit {
        topup_proto::Timestamp { seconds: limit, nanos: 0 }
    } else {
        record
    }
}

fn event_of(input: &Input) -> Result<(SubscriberId, Event), Refusal> {
    match input.topic.as_str() {
        topics::BALANCE => {
            let raw: BalanceUpdated = decode(input, |m: &BalanceUpdated| &m.subscriber_id)?;
            let observation = BalanceObservation::try_from(&raw)?;
            // A balance from the future would win over every real one that follows (and its
            // day would count caps wrongly): refuse it, allowing for clock skew.
            if let Some(observed) = &observation.observed_at {
                let limit = decision_time(input).seconds.saturating_add(MAX_CLOCK_SKEW_SECS);
                if observed.seconds > limit {
                    return Err(Refusal::invalid(
                        "observed_at",
                        format!(
                            "{}s is more than {MAX_CLOCK_SKEW_SECS}s ahead of the record's time {}s",
                            observed.seconds,
                            decision_time(input).seconds
                        ),
                    ));
                }
            }
            Ok((observation.subscriber.clone(), Event::Balance(observation)))
        }
        topics::RULES => {
            let raw: RuleUpdated = decode(input, |m: &RuleUpdated| {
                m.rule.as_ref().map_or("", |r| r.subscriber_id.as_str())
            })?;
            let wire = raw.rule.as_ref().ok_or_else(|| Refusal::invalid("rule", "is required"))?;
            let rule = Rule::try_from(wire).map_err(|e| e.within("rule"))?;
            Ok((rule.subscriber.clone(), Event::Rule(Box::new(rule))))
        }
        topics::RESULTS => {
            let raw: TopUpResult = decode(input, |m: &TopUpResult| &m.subscriber_id)?;
            let outcome = TopUpOutcome::try_from(&raw)?;
            Ok((outcome.subscriber.clone(), Event::Outcome(outcome)))
        }
        other => Err(Refusal::UnexpectedTopic { service: "evaluator", topic: other.to_string() }),
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
                topup_kafka::emit(TopUpIssued { subscriber, command: &command });
                out.push(Output::message(topics::COMMANDS, subscriber.as_str(), &command));
            }
            Effect::Notify(notification) => {
                out.push(Output::message(
                    topics::NOTIFICATIONS,
                    subscriber.as_str(),
                    &notification,
                ));
            }
        }
    }
}

impl Processor for Evaluator {
    type Event = (SubscriberId, Event);
    type State = SubscriberState;
    type Batch = ();
    const CHANGELOG: Option<Changelog<SubscriberState>> = Some(crate::changelog::CHANGELOG);

    fn decode(&self, input: &Input) -> Result<(String, Self::Event), Refusal> {
        let (subscriber, event) = event_of(input)?;
        Ok((subscriber.to_string(), (subscriber, event)))
    }

    async fn begin_batch(&self, _batch: &[Input]) {}

    async fn process(
        &self,
        input: &Input,
        _batch: &(),
        state: &mut Option<SubscriberState>,
        (subscriber, event): Self::Event,
    ) -> Answer {
        let mut out = Vec::new();
        let before = state.take().unwrap_or_else(|| SubscriberState::new(subscriber.clone()));
        let origin = format!("{}/{}/{}", input.topic, input.partition, input.offset);
        let record = input_record(input);
        let reread = record.filter(|_| self.reissue_on_reread);
        let now = decision_time(input);
        if let Some(effects) = reread.and_then(|r| reissue(&before, r, &event, now)) {
            tracing::warn!(
                subscriber = %subscriber,
                offset = input.offset,
                "the record that issued the top-up in flight was read again: command issued again under the same id"
            );
            emit(effects, &subscriber, &mut out);
            *state = Some(before);
            return Ok(out);
        }
        let rule_event = matches!(event, Event::Rule(_));
        let (mut after, effects) = decide(before, event, &origin, now, &self.settings)?;
        if rule_event {
            // The version commands carry: the payment worker compares it with the rules it
            // reads itself.
            after.rule_version = u64::try_from(input.offset).map_or(0, |o| o + 1);
        }
        if effects.iter().any(|e| matches!(e, Effect::Command(_))) {
            if let Some(flight) = after.in_flight.as_mut() {
                flight.issued_by = record;
            }
        }
        emit(effects, &subscriber, &mut out);
        if rule_event {
            // A new rule is looked at for the day at once (a monthly top-up due, a method
            // about to expire), not only at the next day's scan.
            let (today, effects) = on_day(after, now);
            after = today;
            emit(effects, &subscriber, &mut out);
        }
        *state = Some(after);
        Ok(out)
    }

    /// A monthly top-up's or an expiry reminder's day; a top-up in flight waiting too
    /// long for its result; a charged top-up whose credit is overdue (see [`next_due`]).
    fn due_at(&self, state: &SubscriberState, now: SystemTime) -> Option<SystemTime> {
        let second = next_due(state, topup_kafka::timestamp_of(now), &self.settings)?;
        let second = u64::try_from(second).unwrap_or(0);
        Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(second))
    }

    async fn on_due(
        &self,
        _key: &str,
        state: &mut Option<SubscriberState>,
        now: SystemTime,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(mut current) = state.take() else { return out };
        let subscriber = current.subscriber.clone();
        let now_ts = topup_kafka::timestamp_of(now);
        if current.rule.is_some() {
            let (after, effects) = on_day(current, now_ts);
            current = after;
            emit(effects, &subscriber, &mut out);
        }
        if current.in_flight.is_some() && self.settings.reissue_after_secs > 0 {
            // The top-up waited too long for its result: issued again under the same id
            // (see `crate::decide::reissue_overdue`).
            let (after, command) = reissue_overdue(current, now_ts, &self.settings);
            current = after;
            if let Some(command) = command {
                topup_kafka::emit(TopUpReissued {
                    subscriber: &subscriber,
                    command_id: &command.command_id,
                    after_secs: self.settings.reissue_after_secs,
                });
                out.push(Output::message(topics::COMMANDS, subscriber.as_str(), &command));
            }
        }
        if current.credit_watch.is_some() {
            // A charged top-up the carrier has not reported as credited in time (see
            // `crate::decide::credit_overdue`).
            let (after, notice) = credit_overdue(current.clone(), now_ts);
            if let Some(notice) = notice {
                current = after;
                topup_kafka::emit(CreditOverdue {
                    subscriber: &subscriber,
                    command_id: &notice.command_id,
                });
                out.push(Output::message(topics::NOTIFICATIONS, subscriber.as_str(), &notice));
            }
        }
        *state = Some(current);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::changelog::apply as apply_record;
    use topup_kafka::Task;
    use topup_proto::evaluator::v1 as changelog;
    use topup_proto::v1 as wire;
    use topup_proto::Message;

    /// An active rule for `subscriber`: below 10.00 CNY add 50.00, one card.
    pub(crate) fn raw_rule(subscriber: &str) -> wire::AutoTopUpRule {
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
    fn the_rule_key_and_the_state_key_read_back_as_one_state_whatever_their_order() {
        let kafka = KafkaArgs::new("unused:9092");
        let mut task = Task::new(Evaluator::new(kafka, Settings::default()));
        let mut write = |key: &str, value: Option<&[u8]>| task.restore_one(0, key, value).unwrap();
        let rule = raw_rule("sub-1").encode_to_vec();
        // Rule first, then state records: the rule stays.
        write("sub-1 rule", Some(&rule));
        write("sub-1", Some(&dynamic("sub-1", 1)));
        write("sub-1", Some(&dynamic("sub-1", 2)));
        // State first, then the rule.
        write("sub-2", Some(&dynamic("sub-2", 5)));
        write("sub-2 rule", Some(&raw_rule("sub-2").encode_to_vec()));
        // A record written before the split carries its rule.
        let mut old = changelog::SubscriberState::decode(dynamic("sub-3", 1).as_slice()).unwrap();
        old.rule = Some(raw_rule("sub-3"));
        write("sub-3", Some(&old.encode_to_vec()));
        // Garbage is skipped with a reason.
        write("sub-4 rule", Some(b"\xff\xff"));
        let state = task.state(0, "sub-1").unwrap();
        assert!(state.rule.is_some());
        assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(2));
        let state = task.state(0, "sub-2").unwrap();
        assert!(state.rule.is_some());
        assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(5));
        assert!(task.state(0, "sub-3").unwrap().rule.is_some());
        assert!(task.state(0, "sub-4").is_none());
        // A rule tombstone removes the rule, and later state records do not bring it back.
        task.restore_one(0, "sub-1 rule", None).unwrap();
        task.restore_one(0, "sub-1", Some(&dynamic("sub-1", 3))).unwrap();
        assert!(task.state(0, "sub-1").unwrap().rule.is_none());

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
        let mut read = None;
        apply_record(&mut read, "sub-5", "sub-5", &state.encode_record()).unwrap();
        let read = read.unwrap();
        assert_eq!(read.in_flight.as_ref().map(|f| f.command_id.clone()), Some(issued));
        assert_eq!(read.subscriber.as_str(), "sub-5");
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

    #[test]
    fn a_record_stamped_far_ahead_is_decided_at_this_process_s_clock() {
        let now = topup_kafka::now_timestamp().seconds;
        let mut ahead = input(topics::BALANCE, 0, "sub-1", Vec::new());
        ahead.timestamp_ms = Some((now + 10 * 365 * 86_400) * 1000);
        let at = decision_time(&ahead).seconds;
        assert!((now..=now + MAX_CLOCK_SKEW_SECS + 5).contains(&at), "{at} vs {now}");
        // A record in the past is decided at its own time, as on every replay.
        let past = input(topics::BALANCE, 0, "sub-1", Vec::new());
        assert_eq!(decision_time(&past).seconds, 1_764_000_000);
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
            let mut first = Task::new(Evaluator::new(kafka.clone(), settings));
            let mut out = Vec::new();
            for record in &records {
                for answer in first.process(std::slice::from_ref(record)).await.unwrap() {
                    out.extend(answer.unwrap());
                }
            }
            let issued: Vec<_> = out.iter().filter(|o| o.topic == topics::COMMANDS).collect();
            assert_eq!(issued.len(), 1);
            // Only the changelog survived: restore it, then read the balances again.
            let mut second = Task::new(Evaluator::new(kafka, settings));
            for o in out.iter().filter(|o| o.topic == topics::EVALUATOR_STATE) {
                let key = String::from_utf8(o.key.clone()).unwrap();
                second.restore_one(0, &key, o.payload.as_deref()).unwrap();
            }
            let mut again = Vec::new();
            for answer in second.process(&records[1..]).await.unwrap() {
                again.extend(answer.unwrap());
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
