//! A carrier's balance observation, validated.
use topup_proto::v1 as wire;
use topup_proto::Timestamp;

use crate::money::required_money;
use crate::rule::MAX_ABS_MINOR;
use crate::{Invalid, Money, SubscriberId, ValidationError};

/// A valid `BalanceUpdated`.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceObservation {
    /// Whose balance.
    pub subscriber: SubscriberId,
    /// Which carrier reported it.
    pub carrier_id: String,
    /// The balance now.
    pub balance: Money,
    /// Per-subscriber, increasing; never 0.
    pub sequence: u64,
    /// When the carrier observed it.
    pub observed_at: Option<Timestamp>,
    /// The carrier's event id, or `<subscriber_id>/<sequence>`.
    pub event_id: String,
    /// Top-ups whose credit the carrier says this balance includes.
    pub credited_command_ids: Vec<String>,
}

impl TryFrom<&wire::BalanceUpdated> for BalanceObservation {
    type Error = ValidationError;

    fn try_from(raw: &wire::BalanceUpdated) -> Invalid<Self> {
        let subscriber = SubscriberId::parse(&raw.subscriber_id)?;
        let balance = required_money(raw.balance.as_ref(), "balance")?;
        if balance.minor.unsigned_abs() > MAX_ABS_MINOR as u64 {
            return Err(ValidationError::new(
                "balance.amount_minor",
                format!("{} is beyond any plausible balance", balance.minor),
            ));
        }
        if raw.sequence == 0 {
            return Err(ValidationError::new("sequence", "is required and must be positive"));
        }
        if raw.event_id.len() > 256 || raw.carrier_id.len() > 128 {
            return Err(ValidationError::new("event_id", "event_id or carrier_id is too long"));
        }
        let event_id = if raw.event_id.is_empty() {
            format!("{}/{}", raw.subscriber_id, raw.sequence)
        } else {
            raw.event_id.clone()
        };
        Ok(Self {
            subscriber,
            carrier_id: raw.carrier_id.clone(),
            balance,
            sequence: raw.sequence,
            observed_at: raw.observed_at,
            event_id,
            credited_command_ids: raw.credited_command_ids.iter().take(16).cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(amount_minor: i64, sequence: u64) -> wire::BalanceUpdated {
        wire::BalanceUpdated {
            subscriber_id: "sub-1".into(),
            balance: Some(wire::Money { currency: "CNY".into(), amount_minor }),
            sequence,
            ..Default::default()
        }
    }

    #[test]
    fn derives_an_event_id_when_the_carrier_gives_none() {
        let obs = BalanceObservation::try_from(&event(850, 3)).unwrap();
        assert_eq!(obs.event_id, "sub-1/3");
    }

    #[test]
    fn refuses_missing_and_absurd_values() {
        assert!(BalanceObservation::try_from(&event(850, 0)).is_err());
        assert!(BalanceObservation::try_from(&event(i64::MIN, 1)).is_err());
        let mut no_balance = event(1, 1);
        no_balance.balance = None;
        let err = BalanceObservation::try_from(&no_balance).unwrap_err();
        assert_eq!(err.to_string(), "balance: is required");
    }
}
