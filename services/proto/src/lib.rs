//! The wire contract: protobuf messages of package `topup.v1` (and the evaluator's internal
//! state), generated at build time, each with the canonical proto3 JSON mapping.
//!
//! This crate does no I/O. Validation into domain types lives in `topup-domain`.
#![allow(unreachable_pub, clippy::all, missing_docs)]

/// Package `topup.v1`: the public contract on the bus.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/topup.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/topup.v1.serde.rs"));
}

/// Package `topup.evaluator.v1`: the evaluator's changelog records.
pub mod evaluator {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/topup.evaluator.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/topup.evaluator.v1.serde.rs"));
    }
}

/// Package `topup.payment.v1`: the payment worker's retry records.
pub mod payment {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/topup.payment.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/topup.payment.v1.serde.rs"));
    }
}

/// Package `topup.notifier.v1`: the notifier's changelog records.
pub mod notifier {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/topup.notifier.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/topup.notifier.v1.serde.rs"));
    }
}

pub use pbjson_types::Timestamp;
pub use prost::Message;

/// Topic names of the v1 contract. Every record is keyed by the subscriber id.
pub mod topics {
    /// `BalanceUpdated`, from carrier integrations.
    pub const BALANCE: &str = "carrier.balance.v1";
    /// `RuleUpdated`, from the account portal, `topup-api` or `topupctl`.
    pub const RULES: &str = "topup.rules.v1";
    /// `TopUpCommand`, from the evaluator.
    pub const COMMANDS: &str = "topup.commands.v1";
    /// `NotificationCommand`, from the evaluator and the payment worker.
    pub const NOTIFICATIONS: &str = "topup.notifications.v1";
    /// `TopUpResult`, from the payment worker.
    pub const RESULTS: &str = "topup.results.v1";
    /// `DeliveryReceipt`, from the notifier.
    pub const DELIVERIES: &str = "topup.deliveries.v1";
    /// `DeadLetter`, from every service.
    pub const DLQ: &str = "topup.dlq.v1";
    /// `topup.evaluator.v1.SubscriberState`, the evaluator's compacted changelog (internal).
    pub const EVALUATOR_STATE: &str = "topup.evaluator-state.v1";
    /// `topup.payment.v1.ChargeRetry`, charges waiting for another attempt (internal).
    pub const PAYMENT_RETRIES: &str = "topup.payment-retries.v1";
    /// `topup.notifier.v1.SubscriberDeliveries`, the notifier's compacted changelog (internal).
    pub const NOTIFIER_STATE: &str = "topup.notifier-state.v1";

    /// Every topic, in the order they are created.
    pub const ALL: &[&str] = &[
        BALANCE,
        RULES,
        COMMANDS,
        NOTIFICATIONS,
        RESULTS,
        DELIVERIES,
        DLQ,
        EVALUATOR_STATE,
        PAYMENT_RETRIES,
        NOTIFIER_STATE,
    ];
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn balance_round_trips_through_proto3_json() {
        let event = BalanceUpdated {
            credited_command_ids: Default::default(),
            subscriber_id: "sub-1".into(),
            carrier_id: "cmcc".into(),
            balance: Some(Money { currency: "CNY".into(), amount_minor: 850 }),
            sequence: 7,
            observed_at: Some(pbjson_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            event_id: String::new(),
        };
        let json = serde_json::to_value(&event).unwrap();
        // proto3 JSON: lowerCamelCase names, int64 and uint64 as strings, RFC 3339 timestamps.
        assert_eq!(json["subscriberId"], "sub-1");
        assert_eq!(json["balance"]["amountMinor"], "850");
        assert_eq!(json["sequence"], "7");
        assert_eq!(json["observedAt"], "2023-11-14T22:13:20+00:00");
        let back: BalanceUpdated = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn enums_use_their_proto_names_in_json() {
        let rule = AutoTopUpRule { state: RuleState::Active as i32, ..Default::default() };
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(json["state"], "RULE_STATE_ACTIVE");
    }
}
