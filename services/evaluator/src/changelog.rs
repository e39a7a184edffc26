//! The evaluator's changelog, `topup.evaluator-state.v1`: under which keys a subscriber's
//! state is written and how its records fold back into states. The one place that knows
//! the key scheme; `topupctl` reads the changelog through it.
//!
//! A subscriber's state is two records: the rule under `"<subscriber> rule"`, written only
//! when the rule changes, and everything else under `"<subscriber>"` (see
//! [`SubscriberState::encode_record`]), so that a balance event — the common case — writes
//! a small record, not the rule again. A space never occurs in a subscriber id.
use std::sync::Arc;

use topup_domain::{Rule, SubscriberId};
use topup_kafka::{Changelog, StateRecord};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::v1 as wire;
use topup_proto::Message;

use crate::decide::SubscriberState;

/// The evaluator's changelog, for the pipeline's task.
pub(crate) const CHANGELOG: Changelog<SubscriberState> = Changelog {
    topic: topup_proto::topics::EVALUATOR_STATE,
    records,
    keys: |subscriber| keys_of(subscriber).into(),
    owner: |key| rule_key_subscriber(key).unwrap_or(key),
    restore: apply,
};

/// Suffix of the key holding a subscriber's rule.
const RULE_KEY_SUFFIX: &str = " rule";

/// The changelog key of `subscriber`'s rule.
pub fn rule_key(subscriber: &str) -> String {
    format!("{subscriber}{RULE_KEY_SUFFIX}")
}

/// Every changelog key a subscriber's state is written under.
pub fn keys_of(subscriber: &str) -> [String; 2] {
    [subscriber.to_string(), rule_key(subscriber)]
}

/// The subscriber whose rule `key` holds, when it is a rule key.
pub fn rule_key_subscriber(key: &str) -> Option<&str> {
    key.strip_suffix(RULE_KEY_SUFFIX)
}

/// The records that bring `subscriber`'s changelog from `before` to `after`.
pub(crate) fn records(
    subscriber: &str,
    before: Option<&SubscriberState>,
    after: Option<&SubscriberState>,
) -> Vec<StateRecord> {
    let Some(after) = after else {
        return match before {
            Some(_) => keys_of(subscriber).into_iter().map(|key| (key, None)).collect(),
            None => Vec::new(),
        };
    };
    let mut records = Vec::new();
    if before.is_none_or(|before| after.differs_from(before)) {
        records.push((subscriber.to_string(), Some(after.encode_record())));
    }
    let rule_changed = match (before.and_then(|b| b.rule.as_ref()), &after.rule) {
        (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
        (None, None) => false,
        _ => true,
    };
    if rule_changed {
        let value = after.rule.as_ref().map(|rule| rule.wire.encode_to_vec());
        records.push((rule_key(subscriber), value));
    }
    records
}

/// Folds the record under `changelog_key` into `subscriber`'s state. The rule's own key
/// comes after the subscriber's in [`keys_of`], so a rule written under its key replaces one
/// carried by a record written before the split.
pub(crate) fn apply(
    state: &mut Option<SubscriberState>,
    subscriber: &str,
    changelog_key: &str,
    value: &[u8],
) -> Result<(), String> {
    if rule_key_subscriber(changelog_key).is_some() {
        let raw = wire::AutoTopUpRule::decode(value).map_err(|e| e.to_string())?;
        let rule = Arc::new(Rule::from_stored(&raw).map_err(|e| e.to_string())?);
        match state {
            Some(state) => state.rule = Some(rule),
            None => {
                let id = SubscriberId::parse(subscriber).map_err(|e| e.to_string())?;
                let mut fresh = SubscriberState::new(id);
                fresh.rule = Some(rule);
                *state = Some(fresh);
            }
        }
        return Ok(());
    }
    let mut record = changelog::SubscriberState::decode(value).map_err(|e| e.to_string())?;
    if record.subscriber_id.is_empty() {
        // Left out when written: it is the key.
        record.subscriber_id = subscriber.to_string();
    }
    *state = Some(SubscriberState::try_from(&record).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_rule_is_not_checked_again_by_todays_rules() {
        // Six payment methods: refused today (at most five), accepted when it was stored.
        let mut stored = crate::processor::tests::raw_rule("sub-1");
        let method = stored.payment_methods[0].clone();
        stored.payment_methods = (0..6)
            .map(|i| wire::PaymentMethod { token: format!("tok_{i}"), ..method.clone() })
            .collect();
        assert!(Rule::try_from(&stored).is_err(), "today's checks refuse it");
        let mut state = None;
        apply(&mut state, "sub-1", &rule_key("sub-1"), &stored.encode_to_vec()).unwrap();
        let rule = state.and_then(|s| s.rule).expect("the stored rule stays in force");
        assert_eq!(rule.wire, stored);
        assert!(rule.is_active());
    }
}
