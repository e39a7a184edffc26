//! The evaluator's state as changelog records (`topup.evaluator.v1.SubscriberState`).
use topup_domain::{Money, Rule, SubscriberId, ValidationError};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::Message;

use crate::decide::{
    CapCounters, CreditWatch, InFlight, InputRecord, LastBalance, SubscriberState,
};
use changelog::InputTopic;
use topup_proto::topics;

fn input_topic(topic: &str) -> InputTopic {
    match topic {
        topics::BALANCE => InputTopic::Balance,
        topics::RULES => InputTopic::Rules,
        topics::RESULTS => InputTopic::Results,
        _ => InputTopic::Unspecified,
    }
}

fn topic_of(tag: i32) -> Option<&'static str> {
    match InputTopic::try_from(tag).ok()? {
        InputTopic::Balance => Some(topics::BALANCE),
        InputTopic::Rules => Some(topics::RULES),
        InputTopic::Results => Some(topics::RESULTS),
        InputTopic::Unspecified => None,
    }
}

impl SubscriberState {
    /// The changelog record of this state.
    pub fn to_record(&self) -> changelog::SubscriberState {
        let mut record = self.record_without_rule();
        record.rule = self.rule.as_ref().map(|r| r.wire.clone());
        record
    }

    /// The changelog record under the subscriber's key, encoded: everything but the rule,
    /// which has a key of its own (see `changelog::rule_key`) and is written only when it
    /// changes — a balance event writes a small record.
    ///
    /// Three more fields are left out because they can be derived, making the record about
    /// half the size: the subscriber id (it is the record's key), the in-flight command id
    /// (always the last one issued: `command_id(subscriber, cause_sequence,
    /// commands_issued - 1)`; reading fills both back in) and the reporting carrier when it
    /// is the rule's (an empty one stands for the rule's wherever it is read:
    /// `decide::command_effects`).
    pub fn encode_record(&self) -> Vec<u8> {
        let mut record = self.record_without_rule();
        record.subscriber_id.clear();
        if let Some(in_flight) = record.in_flight.as_mut() {
            in_flight.command_id.clear();
        }
        if self.rule.as_ref().is_some_and(|rule| rule.carrier_id == record.carrier_id) {
            record.carrier_id.clear();
        }
        record.encode_to_vec()
    }

    /// Whether the changelog must be written: anything but the rule compared by value, the
    /// rule by identity (a changed rule is always a new one).
    pub fn differs_from(&self, other: &SubscriberState) -> bool {
        let same_rule = match (&self.rule, &other.rule) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        !same_rule
            || self.balance != other.balance
            || self.in_flight != other.in_flight
            || self.armed != other.armed
            || self.reminder_armed != other.reminder_armed
            || self.caps != other.caps
            || self.cap_notified_window != other.cap_notified_window
            || self.commands_issued != other.commands_issued
            || self.monthly_period != other.monthly_period
            || self.expiry_reminded != other.expiry_reminded
            || self.awaiting_credit != other.awaiting_credit
            || self.credit_watch != other.credit_watch
            || self.rule_version != other.rule_version
            || self.subscriber != other.subscriber
    }

    fn record_without_rule(&self) -> changelog::SubscriberState {
        changelog::SubscriberState {
            subscriber_id: self.subscriber.to_string(),
            rule: None,
            balance: self.balance.as_ref().map(|b| b.money.to_wire()),
            balance_sequence: self.balance.as_ref().map_or(0, |b| b.sequence),
            balance_observed_at: self.balance.as_ref().and_then(|b| b.observed_at),
            carrier_id: self.balance.as_ref().map(|b| b.carrier_id.clone()).unwrap_or_default(),
            in_flight: self.in_flight.as_ref().map(|f| changelog::InFlight {
                command_id: f.command_id.clone(),
                amount: Some(f.amount.to_wire()),
                cause_sequence: f.cause_sequence,
                issued_day: f.issued_day,
                issued_month: f.issued_month,
                cause_topic: f.issued_by.map_or(0, |r| input_topic(r.topic) as i32),
                cause_offset: f.issued_by.map_or(0, |r| r.offset),
                issued_at_seconds: f.issued_at,
                reissued: f.reissued,
                awaiting_reconciliation: f.awaiting_reconciliation,
                payment_methods: f.payment_methods.clone(),
                rule_version: f.rule_version,
                cause_balance_minor: f.cause_balance_minor,
                first_issued_at_seconds: f.first_issued_at,
                credit_seen: f.credit_seen,
            }),
            armed: self.armed,
            reminder_armed: self.reminder_armed,
            cap_day: self.caps.day,
            topups_today: self.caps.topups_today,
            cap_month: self.caps.month,
            amount_this_month_minor: self.caps.amount_this_month,
            cap_notified_window: self.cap_notified_window.clone(),
            commands_issued: self.commands_issued,
            monthly_period: self.monthly_period.clone(),
            expiry_reminded: self.expiry_reminded.clone(),
            awaiting_credit: self.awaiting_credit,
            credit_watch: self.credit_watch.as_ref().map(|w| changelog::CreditWatch {
                command_id: w.command_id.clone(),
                amount: Some(w.amount.to_wire()),
                balance_before_minor: w.balance_before_minor,
                due_seconds: w.due,
                raised: w.raised,
            }),
            rule_version: self.rule_version,
        }
    }
}

fn money(value: Option<&topup_proto::v1::Money>, field: &str) -> Result<Money, ValidationError> {
    let value = value.ok_or_else(|| ValidationError::new(field, "is required"))?;
    Money::try_from(value).map_err(|e| e.within(field))
}

impl TryFrom<&changelog::SubscriberState> for SubscriberState {
    type Error = ValidationError;

    fn try_from(record: &changelog::SubscriberState) -> Result<Self, ValidationError> {
        let balance = match record.balance.as_ref() {
            Some(b) if record.balance_sequence > 0 => Some(LastBalance {
                money: money(Some(b), "balance")?,
                sequence: record.balance_sequence,
                observed_at: record.balance_observed_at,
                carrier_id: record.carrier_id.clone(),
            }),
            _ => None,
        };
        let subscriber = SubscriberId::parse(&record.subscriber_id)?;
        let in_flight = match record.in_flight.as_ref() {
            Some(f) => Some(InFlight {
                command_id: if f.command_id.is_empty() {
                    topup_domain::command_id(
                        &subscriber,
                        f.cause_sequence,
                        record.commands_issued.saturating_sub(1),
                    )
                } else {
                    f.command_id.clone()
                },
                amount: money(f.amount.as_ref(), "in_flight.amount")?,
                cause_sequence: f.cause_sequence,
                issued_day: f.issued_day,
                issued_month: f.issued_month,
                issued_by: topic_of(f.cause_topic)
                    .map(|topic| InputRecord { topic, offset: f.cause_offset }),
                issued_at: f.issued_at_seconds,
                reissued: f.reissued,
                awaiting_reconciliation: f.awaiting_reconciliation,
                // A state written before methods were kept here issues again with the
                // rule's methods (see `crate::decide::reissue_overdue`).
                payment_methods: f.payment_methods.clone(),
                rule_version: f.rule_version,
                cause_balance_minor: f.cause_balance_minor,
                first_issued_at: f.first_issued_at_seconds,
                credit_seen: f.credit_seen,
            }),
            None => None,
        };
        let credit_watch = match record.credit_watch.as_ref() {
            Some(w) => Some(Box::new(CreditWatch {
                command_id: w.command_id.clone(),
                amount: money(w.amount.as_ref(), "credit_watch.amount")?,
                balance_before_minor: w.balance_before_minor,
                due: w.due_seconds,
                raised: w.raised,
            })),
            None => None,
        };
        Ok(Self {
            subscriber,
            rule: record
                .rule
                .as_ref()
                .map(|wire| Rule::from_stored(wire).map(std::sync::Arc::new))
                .transpose()
                .map_err(|e| e.within("rule"))?,
            balance,
            in_flight,
            armed: record.armed,
            reminder_armed: record.reminder_armed,
            caps: CapCounters {
                day: record.cap_day,
                topups_today: record.topups_today,
                month: record.cap_month,
                amount_this_month: record.amount_this_month_minor,
            },
            cap_notified_window: record.cap_notified_window.clone(),
            commands_issued: record.commands_issued,
            monthly_period: record.monthly_period.clone(),
            expiry_reminded: record.expiry_reminded.clone(),
            awaiting_credit: record.awaiting_credit,
            credit_watch,
            rule_version: record.rule_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{decide, Event, Settings};

    #[test]
    fn the_encoded_record_decodes_to_the_same_state() {
        let raw = crate::processor::tests::raw_rule("sub-1");
        let rule = Rule::try_from(&raw).unwrap();
        let state = SubscriberState::new(SubscriberId::parse("sub-1").unwrap());
        let (state, _) = decide(
            state,
            Event::Rule(Box::new(rule)),
            "test",
            topup_proto::Timestamp { seconds: 0, nanos: 0 },
            &Settings::default(),
        )
        .unwrap();
        let decoded = changelog::SubscriberState::decode(state.encode_record().as_slice()).unwrap();
        assert_eq!(decoded.rule, None, "the rule has its own key");
        let mut whole = state.to_record();
        whole.rule = None;
        whole.subscriber_id.clear();
        assert_eq!(decoded, whole);
    }

    #[test]
    fn a_carrier_left_out_as_the_rules_issues_the_same_command_again() {
        let mut raw = crate::processor::tests::raw_rule("sub-1");
        raw.carrier_id = "carrier-a".into();
        let settings = Settings::default();
        let at = |seconds| topup_proto::Timestamp { seconds, nanos: 0 };
        let state = SubscriberState::new(SubscriberId::parse("sub-1").unwrap());
        let rule = Event::Rule(Box::new(Rule::try_from(&raw).unwrap()));
        let (state, _) = decide(state, rule, "t/0/0", at(1_000), &settings).unwrap();
        let low = Event::Balance(topup_domain::BalanceObservation {
            subscriber: state.subscriber.clone(),
            carrier_id: "carrier-a".into(),
            balance: Money::new(topup_domain::Currency::parse("CNY").unwrap(), 500),
            sequence: 1,
            observed_at: Some(at(1_000)),
            event_id: String::new(),
            credited_command_ids: Vec::new(),
        });
        let (state, _) = decide(state, low, "t/0/1", at(1_000), &settings).unwrap();
        assert!(state.in_flight.is_some(), "the low balance issued a top-up");

        let encoded = state.encode_record();
        let record = changelog::SubscriberState::decode(encoded.as_slice()).unwrap();
        assert_eq!(record.carrier_id, "", "the rule's carrier is not written again");
        let mut restored = SubscriberState::try_from(&changelog::SubscriberState {
            subscriber_id: "sub-1".into(),
            ..record
        })
        .unwrap();
        restored.rule = state.rule.clone();
        // A balance from another carrier is written as it is.
        let mut other = state.clone();
        if let Some(balance) = other.balance.as_mut() {
            balance.carrier_id = "carrier-b".into();
        }
        let other = changelog::SubscriberState::decode(other.encode_record().as_slice()).unwrap();
        assert_eq!(other.carrier_id, "carrier-b");

        let later = at(1_000 + settings.reissue_after_secs + 1);
        let (_, before) = crate::decide::reissue_overdue(state, later, &settings);
        let (_, after) = crate::decide::reissue_overdue(restored, later, &settings);
        let before = before.expect("the stuck top-up is issued again");
        assert_eq!(before.carrier_id, "carrier-a");
        assert_eq!(Some(before), after, "the restored state issues the very same command");
    }
}
