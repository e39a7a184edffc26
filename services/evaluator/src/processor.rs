//! Where a record becomes a decision: decode and validate the input, load the subscriber's
//! state, `decide`, and turn the effects and the new state into records.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use topup_domain::{BalanceObservation, Money, Rule, SubscriberId, TopUpOutcome};
use topup_kafka::{decode, read_partition_to_end, Input, KafkaArgs, Output, Processor, Refusal};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::v1::{BalanceUpdated, RuleUpdated, TopUpResult};
use topup_proto::{topics, Message};

use crate::decide::{decide, Effect, Event, Settings, SubscriberState};
use crate::metrics::{self, count};

/// How long restoring one partition's state may take.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// The evaluator's Kafka-facing half; the decision itself is in [`crate::decide`].
pub struct Evaluator {
    kafka: KafkaArgs,
    settings: Settings,
    /// State per input partition, then per subscriber id.
    partitions: HashMap<i32, HashMap<String, SubscriberState>>,
}

impl Evaluator {
    /// An evaluator with no partitions yet.
    pub fn new(kafka: KafkaArgs, settings: Settings) -> Self {
        Self { kafka, settings, partitions: HashMap::new() }
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
        for &partition in partitions {
            let kafka = self.kafka.clone();
            let records = tokio::task::spawn_blocking(move || {
                read_partition_to_end(&kafka, topics::EVALUATOR_STATE, partition, RESTORE_DEADLINE)
            })
            .await??;
            let mut states = HashMap::new();
            for record in &records {
                let Some(key) = record.key_str() else { continue };
                match record.payload.as_deref() {
                    None => {
                        states.remove(key);
                    }
                    Some(bytes) => {
                        let restored = changelog::SubscriberState::decode(bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|r| SubscriberState::try_from(&r).map_err(|e| e.to_string()));
                        match restored {
                            Ok(state) => {
                                states.insert(key.to_string(), state);
                            }
                            Err(error) => tracing::error!(
                                partition, offset = record.offset, %error,
                                "unreadable state record skipped"
                            ),
                        }
                    }
                }
            }
            tracing::info!(
                partition,
                subscribers = states.len(),
                records = records.len(),
                "state restored"
            );
            self.partitions.insert(partition, states);
        }
        Ok(())
    }

    fn revoked(&mut self, partitions: &BTreeSet<i32>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        let (subscriber, event) = event_of(input).inspect_err(|_| count(&metrics::DEAD_LETTERS))?;
        let states = self.partitions.entry(input.partition).or_default();
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
                if after != kept {
                    let mut record = Output::message(
                        topics::EVALUATOR_STATE,
                        subscriber.as_str(),
                        &after.to_record(),
                    );
                    record.partition = Some(input.partition);
                    out.push(record);
                }
                states.insert(subscriber.to_string(), after);
                Ok(())
            }
            Err(reason) => {
                states.insert(subscriber.to_string(), kept);
                count(&metrics::DEAD_LETTERS);
                Err(Refusal::new(reason))
            }
        }
    }
}
