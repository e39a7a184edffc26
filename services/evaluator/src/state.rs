//! The evaluator's state as changelog records (`topup.evaluator.v1.SubscriberState`).
use topup_domain::{Money, Rule, SubscriberId, ValidationError};
use topup_proto::evaluator::v1 as changelog;

use crate::decide::{CapCounters, InFlight, LastBalance, SubscriberState};

impl SubscriberState {
    /// The changelog record of this state.
    pub fn to_record(&self) -> changelog::SubscriberState {
        changelog::SubscriberState {
            subscriber_id: self.subscriber.to_string(),
            rule: self.rule.as_ref().map(|r| r.wire.clone()),
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
            }),
            armed: self.armed,
            reminder_armed: self.reminder_armed,
            cap_day: self.caps.day,
            topups_today: self.caps.topups_today,
            cap_month: self.caps.month,
            amount_this_month_minor: self.caps.amount_this_month,
            cap_notified_window: self.cap_notified_window.clone(),
            commands_issued: self.commands_issued,
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
        let in_flight = match record.in_flight.as_ref() {
            Some(f) => Some(InFlight {
                command_id: f.command_id.clone(),
                amount: money(f.amount.as_ref(), "in_flight.amount")?,
                cause_sequence: f.cause_sequence,
                issued_day: f.issued_day,
                issued_month: f.issued_month,
            }),
            None => None,
        };
        Ok(Self {
            subscriber: SubscriberId::parse(&record.subscriber_id)?,
            rule: record
                .rule
                .as_ref()
                .map(Rule::try_from)
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
        })
    }
}
