//! Per-carrier limits on a single top-up: each carrier accepts top-ups between a minimum and
//! a maximum amount. A rule whose charges could fall outside them is refused up front.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::{Rule, TopUpAmount, ValidationError};

/// The smallest and largest single top-up, in minor units of the rule's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeRange {
    /// Smallest charge.
    pub min_minor: i64,
    /// Largest charge.
    pub max_minor: i64,
}

/// Limits per carrier id, with a default for carriers not listed.
///
/// Written `carrier=min-max,...` in minor units, `*` for the default:
/// `cmcc=1000-50000,*=500-100000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierLimits {
    carriers: BTreeMap<String, ChargeRange>,
    default: ChargeRange,
}

impl Default for CarrierLimits {
    /// 1.00 to 1,000.00 (in a two-decimal currency) for every carrier.
    fn default() -> Self {
        Self {
            carriers: BTreeMap::new(),
            default: ChargeRange { min_minor: 100, max_minor: 100_000 },
        }
    }
}

impl CarrierLimits {
    /// The range for `carrier`.
    pub fn range(&self, carrier: &str) -> ChargeRange {
        self.carriers.get(carrier).copied().unwrap_or(self.default)
    }

    /// Refuses `rule` when a charge it can make is outside its carrier's range: a fixed amount
    /// must be within it; a target balance must be at most the maximum, and the smallest
    /// charge it makes (target − threshold + one minor unit) at least the minimum.
    pub fn check(&self, rule: &Rule) -> Result<(), ValidationError> {
        let range = self.range(&rule.carrier_id);
        let carrier = if rule.carrier_id.is_empty() { "this carrier" } else { &rule.carrier_id };
        let (field, smallest, largest) = match rule.top_up {
            TopUpAmount::Fixed(amount) => ("amount", amount.minor, amount.minor),
            TopUpAmount::UpTo(target) => (
                "target_balance",
                target.minor.saturating_sub(rule.threshold.minor).saturating_add(1),
                target.minor,
            ),
        };
        let currency = rule.threshold.currency;
        let money = |minor| crate::Money::new(currency, minor);
        if smallest < range.min_minor {
            return Err(ValidationError::new(
                field,
                format!(
                    "a top-up of {} is below {carrier}'s minimum of {}",
                    money(smallest),
                    money(range.min_minor)
                ),
            ));
        }
        if largest > range.max_minor {
            return Err(ValidationError::new(
                field,
                format!(
                    "a top-up of {} is above {carrier}'s maximum of {}",
                    money(largest),
                    money(range.max_minor)
                ),
            ));
        }
        if let Some(monthly) = rule.monthly {
            if monthly.amount.minor < range.min_minor || monthly.amount.minor > range.max_minor {
                return Err(ValidationError::new(
                    "monthly.amount",
                    format!(
                        "{} is outside {carrier}'s range of {} to {}",
                        monthly.amount,
                        money(range.min_minor),
                        money(range.max_minor)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Why a limits setting could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "carrier limits {0}: write carrier=min-max in minor units, e.g. cmcc=1000-50000,*=500-100000"
)]
pub struct LimitsSyntax(String);

impl FromStr for CarrierLimits {
    type Err = LimitsSyntax;

    fn from_str(text: &str) -> Result<Self, LimitsSyntax> {
        let mut limits = CarrierLimits::default();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || LimitsSyntax(format!("{entry:?}"));
            let (carrier, range) = entry.split_once('=').ok_or_else(bad)?;
            let (min, max) = range.split_once('-').ok_or_else(bad)?;
            let min: i64 = min.trim().parse().map_err(|_| bad())?;
            let max: i64 = max.trim().parse().map_err(|_| bad())?;
            if min <= 0 || max < min {
                return Err(LimitsSyntax(format!("{entry:?}: need 0 < min <= max")));
            }
            let range = ChargeRange { min_minor: min, max_minor: max };
            match carrier.trim() {
                "*" => limits.default = range,
                "" => return Err(bad()),
                carrier => {
                    limits.carriers.insert(carrier.to_string(), range);
                }
            }
        }
        Ok(limits)
    }
}

impl fmt::Display for CarrierLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (carrier, r) in &self.carriers {
            write!(f, "{carrier}={}-{},", r.min_minor, r.max_minor)?;
        }
        write!(f, "*={}-{}", self.default.min_minor, self.default.max_minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topup_proto::v1 as wire;

    fn rule(carrier: &str, top_up: wire::auto_top_up_rule::TopUp) -> Rule {
        let cny = |minor| wire::Money { currency: "CNY".into(), amount_minor: minor };
        Rule::try_from(&wire::AutoTopUpRule {
            subscriber_id: "sub-1".into(),
            threshold: Some(cny(1000)),
            top_up: Some(top_up),
            payment_methods: vec![wire::PaymentMethod {
                token: "tok".into(),
                kind: wire::PaymentMethodKind::Card as i32,
                ..Default::default()
            }],
            state: wire::RuleState::Draft as i32,
            carrier_id: carrier.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn rules_outside_their_carriers_range_are_refused_with_the_field() {
        use wire::auto_top_up_rule::TopUp;
        let cny = |minor| wire::Money { currency: "CNY".into(), amount_minor: minor };
        let limits: CarrierLimits = "cmcc=2000-50000, *=500-100000".parse().unwrap();
        assert!(limits.check(&rule("cmcc", TopUp::Amount(cny(5000)))).is_ok());
        let low = limits.check(&rule("cmcc", TopUp::Amount(cny(1000)))).unwrap_err();
        assert_eq!(low.field, "amount");
        assert!(low.reason.contains("below cmcc's minimum of 20.00 CNY"), "{}", low.reason);
        let high = limits.check(&rule("cmcc", TopUp::Amount(cny(60000)))).unwrap_err();
        assert!(high.reason.contains("above cmcc's maximum of 500.00 CNY"), "{}", high.reason);
        // Other carriers get the default.
        assert!(limits.check(&rule("other", TopUp::Amount(cny(1000)))).is_ok());
        // A target balance: at most the maximum; its smallest charge at least the minimum.
        assert!(limits.check(&rule("cmcc", TopUp::TargetBalance(cny(3000)))).is_ok());
        let small = limits.check(&rule("cmcc", TopUp::TargetBalance(cny(2000)))).unwrap_err();
        assert_eq!(small.field, "target_balance");
        assert_eq!(limits.to_string(), "cmcc=2000-50000,*=500-100000");
        for bad in ["cmcc", "cmcc=1", "cmcc=a-b", "cmcc=5-1", "=1-2", "x=0-5"] {
            assert!(bad.parse::<CarrierLimits>().is_err(), "{bad}");
        }
    }
}
