//! Identifiers: the subscriber id every record is keyed by, and the deterministic ids of
//! commands and notifications that make replays harmless.
use std::fmt;

use uuid::Uuid;

use crate::{Invalid, ValidationError};

/// Longest subscriber id accepted (bytes).
const MAX_SUBSCRIBER_ID_LEN: usize = 128;

/// Namespace of the v5 UUIDs this platform derives.
const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_1d7e_2b4a_4f0e_9a53_7c1e_0b2d_a001);

/// A subscriber id: 1–128 printable ASCII characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(String);

impl SubscriberId {
    /// Validates a subscriber id.
    pub fn parse(raw: &str) -> Invalid<Self> {
        if raw.is_empty() {
            return Err(ValidationError::new("subscriber_id", "is required"));
        }
        if raw.len() > MAX_SUBSCRIBER_ID_LEN {
            return Err(ValidationError::new(
                "subscriber_id",
                format!("is {} bytes long, at most {MAX_SUBSCRIBER_ID_LEN} allowed", raw.len()),
            ));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ValidationError::new(
                "subscriber_id",
                "must be printable ASCII without spaces",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of the `n`-th top-up command of a subscriber, caused by the balance event with
/// `cause_sequence`. The same inputs always give the same id, so a replay from an older
/// offset re-issues the same command rather than a new one.
pub fn command_id(subscriber: &SubscriberId, cause_sequence: u64, n: u64) -> String {
    let name = format!("command/{subscriber}/{cause_sequence}/{n}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// The id of a subscriber's monthly top-up for `period` ("2026-11"): one per period, the
/// same however often it is issued, so it is charged once.
pub fn monthly_command_id(subscriber: &SubscriberId, period: &str) -> String {
    let name = format!("command/{subscriber}/monthly/{period}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// The key the payment gateway de-duplicates charges by; derived from the command id.
pub fn idempotency_key(command_id: &str) -> String {
    format!("topup-{command_id}")
}

/// The stable id of a payment method on a rule: "pm-" and 16 hex digits, derived from its
/// kind and its gateway token (in clear, before any sealing), so that the same method keeps
/// its id across rule changes and a new method gets a new one. Idempotency keys are built
/// from it, never from the method's position in the list.
pub fn payment_method_id(kind: i32, token: &str) -> String {
    let name = format!("payment-method/{kind}/{token}");
    let id = Uuid::new_v5(&NAMESPACE, name.as_bytes()).simple().to_string();
    format!("pm-{}", &id[..16])
}

/// The idempotency key of the charge of `method_id` for the command whose key is
/// `command_key`: one key per (top-up, method), the same however often it is sent.
pub fn method_idempotency_key(command_key: &str, method_id: &str) -> String {
    format!("{command_key}-{method_id}")
}

/// A notification's id, derived from what it is about (e.g. a command id and its kind).
pub fn notification_id(subscriber: &SubscriberId, about: &str, kind: &str) -> String {
    let name = format!("notification/{subscriber}/{about}/{kind}");
    Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_ids_are_checked() {
        assert!(SubscriberId::parse("sub-0001").is_ok());
        assert!(SubscriberId::parse("").is_err());
        assert!(SubscriberId::parse("has space").is_err());
        assert!(SubscriberId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn payment_method_ids_follow_the_method_not_its_place() {
        let card = payment_method_id(1, "tok_visa");
        assert_eq!(card, payment_method_id(1, "tok_visa"));
        assert_ne!(card, payment_method_id(1, "tok_other"));
        assert_ne!(card, payment_method_id(3, "tok_visa"));
        assert!(card.starts_with("pm-") && card.len() == 19, "{card}");
        assert_ne!(method_idempotency_key("k", &card), method_idempotency_key("k", "pm-x"));
    }

    #[test]
    fn command_ids_are_deterministic_and_distinct() {
        let sub = SubscriberId::parse("sub-1").unwrap();
        assert_eq!(command_id(&sub, 7, 0), command_id(&sub, 7, 0));
        assert_ne!(command_id(&sub, 7, 0), command_id(&sub, 7, 1));
        assert_ne!(command_id(&sub, 7, 0), command_id(&sub, 8, 0));
    }
}
