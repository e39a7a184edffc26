//! Where a record becomes a decision: decode and validate the input, load the subscriber's
//! state, `decide`, and turn the effects and the new state into records.
use std::collections::BTreeSet;

use topup_domain::{BalanceObservation, Money, Rule, SubscriberId, TopUpOutcome};
use topup_kafka::{decode, Input, KafkaArgs, Output, Processor, Refusal, StateStore};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::v1::{BalanceUpdated, RuleUpdated, TopUpResult};
use topup_proto::{topics, Message};

use crate::decide::{decide, Effect, Event, Settings, SubscriberState};
use crate::metrics::{self, count};

/// The evaluator's Kafka-facing half; the decision itself is in [`crate::decide`].
pub struct Evaluator {
    settings: Settings,
    /// State per input partition, then per subscriber id.
    store: StateStore<SubscriberState>,
}

/// A changelog value back into a subscriber's state.
fn decode_state(bytes: &[u8]) -> Result<SubscriberState, String> {
    let record = changelog::SubscriberState::decode(bytes).map_err(|e| e.to_string())?;
    SubscriberState::try_from(&record).map_err(|e| e.to_string())
}

impl Evaluator {
    /// An evaluator with no partitions yet.
    pub fn new(kafka: KafkaArgs, settings: Settings) -> Self {
        Self { settings, store: StateStore::new(kafka, topics::EVALUATOR_STATE, decode_state) }
    }
}

fn event_of(input: &Input) -> Result<(SubscriberId, Event), Refusal> {
    match input.topic.as_str() {
        topics::BALANCE => {
            count(&metrics::BALANCE_EVENTS);
            let raw: BalanceUpdated = decode(input, |m: &BalanceUpdated| &m.subscriber_id)?;
            let observation = BalanceObservation::try_from(&raw)?;
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

impl Processor for Evaluator {
    async fn assigned(&mut self, partitions: &BTreeSet<i32>) -> topup_kafka::Result<()> {
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
        let kept = before.clone();
        match decide(before, event, &origin, input.time(), &self.settings) {
            Ok((after, effects)) => {
                for effect in effects {
                    match effect {
                        Effect::Command(command) => {
                            count(&metrics::COMMANDS_ISSUED);
                            tracing::info!(
                                subscriber = %subscriber,
                                command_id = %command.command_id,
                                amount = %command.amount.as_ref().and_then(|m| Money::try_from(m).ok()).map(|m| m.to_string()).unwrap_or_default(),
                                "balance below threshold: top-up issued"
                            );
                            out.push(Output::message(
                                topics::COMMANDS,
                                subscriber.as_str(),
                                &command,
                            ));
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
                if after.differs_from(&kept) {
                    out.push(self.store.record_bytes(
                        input.partition,
                        subscriber.as_str(),
                        after.encode_record(),
                    ));
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
}
