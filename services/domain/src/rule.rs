//! The subscriber's auto top-up rule, validated. The same checks serve the evaluator (which
//! dead-letters invalid rules) and any front door that accepts rules.
use topup_proto::v1 as wire;

use crate::money::required_money;
use crate::{Currency, Invalid, Money, SubscriberId, ValidationError};

/// Largest absolute amount (minor units) accepted anywhere in a rule or balance: far above
/// any real top-up, far below `i64` overflow when amounts are added or subtracted.
pub(crate) const MAX_ABS_MINOR: i64 = 1_000_000_000_000_000;

/// Where a rule is in its life. Only `Active` charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleState {
    /// Being set up; not yet confirmed by the subscriber.
    Draft,
    /// Confirmed with the one-time code; not yet switched on.
    Confirmed,
    /// Charges when the balance drops below the threshold.
    Active,
    /// Switched off for now by the subscriber.
    Paused,
    /// Gone.
    Deleted,
}

/// How much a top-up charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpAmount {
    /// Always this amount.
    Fixed(Money),
    /// Whatever brings the balance up to this target.
    UpTo(Money),
}

/// A stored payment method: an opaque gateway token with its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentMethod {
    /// Gateway token; never a card number.
    pub token: String,
    /// Card, debit card, Alipay, WeChat Pay, ...
    pub kind: wire::PaymentMethodKind,
    /// Display label ("•••• 4242").
    pub label: String,
    /// The only currency it charges in, when the gateway said so.
    pub currency: Option<Currency>,
    /// The last month it can charge in, for kinds that expire (cards).
    pub expires: Option<YearMonth>,
}

/// "Every month on day N, add X".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthlyTopUp {
    /// 1 to 31; a shorter month uses its last day.
    pub day_of_month: u32,
    /// How much.
    pub amount: Money,
}

impl PaymentMethod {
    /// Its stable id, derived from its kind and token (see [`crate::payment_method_id`]);
    /// never taken from the record, so a writer cannot give a new token the id (and so the
    /// authorisation and the keys) of a method it replaces. Computed, not kept: state stays
    /// small.
    pub fn id(&self) -> String {
        crate::payment_method_id(self.kind as i32, &self.token)
    }
}

impl MonthlyTopUp {
    /// The UTC day (days since 1970-01-01) on which it is due in the month of `day`.
    pub fn due_day_in_month_of(&self, day: i64) -> i64 {
        let (year, month, _) = crate::calendar::civil_from_days(day);
        let last = crate::calendar::days_in_month(year, month);
        crate::calendar::days_from_civil(year, month, self.day_of_month.min(last))
    }
}

/// A calendar month, as a card's expiry ("2028-09": valid through September 2028).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct YearMonth {
    /// The year, 2000 to 2199.
    pub year: i32,
    /// The month, 1 to 12.
    pub month: u32,
}

impl YearMonth {
    /// Parses "YYYY-MM".
    pub fn parse(raw: &str) -> Invalid<Self> {
        let invalid = || ValidationError::new("", format!("{raw:?} is not a month as YYYY-MM"));
        let (year, month) = raw.split_once('-').ok_or_else(invalid)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(invalid());
        }
        let year: i32 = year.parse().map_err(|_| invalid())?;
        let month: u32 = month.parse().map_err(|_| invalid())?;
        if !(2000..=2199).contains(&year) || !(1..=12).contains(&month) {
            return Err(invalid());
        }
        Ok(Self { year, month })
    }

    /// The month of UTC day `days` since 1970-01-01.
    pub fn of_day(days: i64) -> Self {
        let (year, month, _) = crate::calendar::civil_from_days(days);
        Self { year: year as i32, month }
    }

    /// Days since 1970-01-01 of the first day after this month (when a card that expires
    /// this month stops working).
    pub fn end_day(&self) -> i64 {
        let (year, month) =
            if self.month == 12 { (self.year + 1, 1) } else { (self.year, self.month + 1) };
        crate::calendar::days_from_civil(i64::from(year), month, 1)
    }
}

impl std::fmt::Display for YearMonth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A notification channel with its contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// SMS, e-mail, push or console.
    pub kind: wire::ChannelKind,
    /// Phone number, e-mail address or push token.
    pub address: String,
}

/// A valid auto top-up rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Whose rule.
    pub subscriber: SubscriberId,
    /// Lifecycle state.
    pub state: RuleState,
    /// Fire when the balance drops below this.
    pub threshold: Money,
    /// How much to charge.
    pub top_up: TopUpAmount,
    /// Tried in order.
    pub payment_methods: Vec<PaymentMethod>,
    /// Language of notifications.
    pub locale: String,
    /// Where notifications go.
    pub channels: Vec<Channel>,
    /// At most this many top-ups per UTC day.
    pub max_topups_per_day: Option<u32>,
    /// At most this much charged per UTC calendar month.
    pub max_amount_per_month: Option<Money>,
    /// The carrier the subscriber belongs to.
    pub carrier_id: String,
    /// A top-up every month on a fixed day, besides the threshold.
    pub monthly: Option<MonthlyTopUp>,
    /// The rule as received, for the changelog and for commands.
    pub wire: wire::AutoTopUpRule,
}

impl Rule {
    /// The amount to charge when the balance is `balance`; `None` when the currencies differ,
    /// the balance is already at or above a target, or the arithmetic would overflow.
    pub fn charge_for(&self, balance: Money) -> Option<Money> {
        let amount = match self.top_up {
            TopUpAmount::Fixed(amount) => amount,
            TopUpAmount::UpTo(target) => target.checked_sub(balance)?,
        };
        (amount.minor > 0 && amount.currency == balance.currency).then_some(amount)
    }

    /// Is this rule allowed to charge?
    pub fn is_active(&self) -> bool {
        self.state == RuleState::Active
    }
}

fn positive(money: Money, field: &str) -> Invalid<Money> {
    if money.minor <= 0 {
        return Err(ValidationError::new(field, format!("must be positive, got {money}")));
    }
    if money.minor > MAX_ABS_MINOR {
        return Err(ValidationError::new(field, format!("{money} is beyond any plausible top-up")));
    }
    Ok(money)
}

fn same_currency(money: Money, threshold: Money, field: &str) -> Invalid<Money> {
    if money.currency != threshold.currency {
        return Err(ValidationError::new(
            field,
            format!(
                "currency {} differs from the threshold's {}",
                money.currency, threshold.currency
            ),
        ));
    }
    Ok(money)
}

fn state_of(raw: i32) -> Invalid<RuleState> {
    match wire::RuleState::try_from(raw) {
        Ok(wire::RuleState::Draft) => Ok(RuleState::Draft),
        Ok(wire::RuleState::Confirmed) => Ok(RuleState::Confirmed),
        Ok(wire::RuleState::Active) => Ok(RuleState::Active),
        Ok(wire::RuleState::Paused) => Ok(RuleState::Paused),
        Ok(wire::RuleState::Deleted) => Ok(RuleState::Deleted),
        Ok(wire::RuleState::Unspecified) => Err(ValidationError::new(
            "state",
            "is required (draft, confirmed, active, paused, deleted)",
        )),
        Err(_) => Err(ValidationError::new("state", format!("{raw} is not a known rule state"))),
    }
}

/// Which checks a rule is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    /// Every check of today: a rule submitted now.
    Today,
    /// Only what the rule's parts need to exist (known kinds and states, currencies that
    /// parse and agree, amounts within arithmetic's reach): a rule accepted when it was
    /// stored stays in force when read back, whatever was tightened since.
    Stored,
}

fn payment_method(
    index: usize,
    raw: &wire::PaymentMethod,
    checks: Checks,
) -> Invalid<PaymentMethod> {
    let field = format!("payment_methods[{index}]");
    let today = checks == Checks::Today;
    // A sealed token (see `crate::token`) is the clear one, checked before it was sealed,
    // in a longer envelope.
    let sealed = crate::is_sealed(&raw.token);
    let longest = if sealed { 1024 } else { 256 };
    if today && (raw.token.is_empty() || raw.token.len() > longest) {
        return Err(ValidationError::new(
            format!("{field}.token"),
            format!("must be 1 to {longest} bytes"),
        ));
    }
    if today && !sealed && raw.token.chars().filter(|c| c.is_ascii_digit()).count() >= 13 {
        // Looks like a card number (PAN): refuse rather than let it travel the bus.
        return Err(ValidationError::new(
            format!("{field}.token"),
            "looks like a card number; only gateway tokens are accepted",
        ));
    }
    let kind = match wire::PaymentMethodKind::try_from(raw.kind) {
        Ok(wire::PaymentMethodKind::Unspecified) | Err(_) => {
            return Err(ValidationError::new(
                format!("{field}.kind"),
                format!("{} is not a known payment method kind", raw.kind),
            ))
        }
        Ok(kind) => kind,
    };
    let currency = if raw.currency.is_empty() {
        None
    } else {
        Some(Currency::parse(&raw.currency).map_err(|e| e.within(&field))?)
    };
    let expires = if raw.expires.is_empty() {
        None
    } else {
        Some(YearMonth::parse(&raw.expires).map_err(|e| e.within(&format!("{field}.expires")))?)
    };
    if today && raw.label.len() > 64 {
        return Err(ValidationError::new(format!("{field}.label"), "is longer than 64 bytes"));
    }
    Ok(PaymentMethod {
        token: raw.token.clone(),
        kind,
        label: raw.label.clone(),
        currency,
        expires,
    })
}

fn channel(index: usize, raw: &wire::NotificationChannel, checks: Checks) -> Invalid<Channel> {
    let field = format!("channels[{index}]");
    let kind = match wire::ChannelKind::try_from(raw.kind) {
        Ok(wire::ChannelKind::Unspecified) | Err(_) => {
            return Err(ValidationError::new(
                format!("{field}.kind"),
                format!("{} is not a known channel kind", raw.kind),
            ))
        }
        Ok(kind) => kind,
    };
    if checks == Checks::Stored {
        return Ok(Channel { kind, address: raw.address.clone() });
    }
    if raw.address.is_empty() && kind != wire::ChannelKind::Console {
        return Err(ValidationError::new(format!("{field}.address"), "is required"));
    }
    if raw.address.len() > 320 {
        return Err(ValidationError::new(format!("{field}.address"), "is longer than 320 bytes"));
    }
    Ok(Channel { kind, address: raw.address.clone() })
}

impl TryFrom<&wire::AutoTopUpRule> for Rule {
    type Error = ValidationError;

    /// A rule submitted now: every check of today.
    fn try_from(raw: &wire::AutoTopUpRule) -> Invalid<Self> {
        Rule::read(raw, Checks::Today)
    }
}

impl Rule {
    /// A rule read back from where it was stored after it was accepted (a changelog, a
    /// database): only what its parts need to exist is checked, so a rule valid when stored
    /// stays in force after a check was tightened.
    pub fn from_stored(raw: &wire::AutoTopUpRule) -> Invalid<Self> {
        Rule::read(raw, Checks::Stored)
    }

    fn read(raw: &wire::AutoTopUpRule, checks: Checks) -> Invalid<Self> {
        let today = checks == Checks::Today;
        let subscriber = SubscriberId::parse(&raw.subscriber_id)?;
        let state = state_of(raw.state)?;
        let threshold = required_money(raw.threshold.as_ref(), "threshold")?;
        if threshold.minor.unsigned_abs() > MAX_ABS_MINOR as u64 {
            return Err(ValidationError::new("threshold", "is beyond any plausible balance"));
        }
        let top_up = match &raw.top_up {
            Some(wire::auto_top_up_rule::TopUp::Amount(m)) => {
                let amount = required_money(Some(m), "amount")?;
                TopUpAmount::Fixed(same_currency(positive(amount, "amount")?, threshold, "amount")?)
            }
            Some(wire::auto_top_up_rule::TopUp::TargetBalance(m)) => {
                let target = required_money(Some(m), "target_balance")?;
                let target = same_currency(
                    positive(target, "target_balance")?,
                    threshold,
                    "target_balance",
                )?;
                if today && target.minor <= threshold.minor {
                    return Err(ValidationError::new(
                        "target_balance",
                        format!("{target} must be above the threshold {threshold}"),
                    ));
                }
                TopUpAmount::UpTo(target)
            }
            None => {
                return Err(ValidationError::new(
                    "top_up",
                    "either amount or target_balance is required",
                ))
            }
        };
        if today && raw.payment_methods.is_empty() {
            return Err(ValidationError::new("payment_methods", "at least one is required"));
        }
        let payment_methods = raw
            .payment_methods
            .iter()
            .enumerate()
            .map(|(i, m)| payment_method(i, m, checks))
            .collect::<Invalid<Vec<_>>>()?;
        if let Some((i, method)) = payment_methods
            .iter()
            .enumerate()
            .find(|(_, m)| m.currency.is_some_and(|c| c != threshold.currency))
        {
            return Err(ValidationError::new(
                format!("payment_methods[{i}].currency"),
                format!(
                    "{} does not match the rule's currency {}",
                    method.currency.map(|c| c.to_string()).unwrap_or_default(),
                    threshold.currency
                ),
            ));
        }
        let channels = raw
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| channel(i, c, checks))
            .collect::<Invalid<Vec<_>>>()?;
        let max_amount_per_month = match raw.max_amount_per_month.as_ref() {
            None => None,
            Some(m) => {
                let cap = required_money(Some(m), "max_amount_per_month")?;
                Some(same_currency(
                    positive(cap, "max_amount_per_month")?,
                    threshold,
                    "max_amount_per_month",
                )?)
            }
        };
        if today && raw.locale.len() > 35 {
            return Err(ValidationError::new("locale", "is not a BCP 47 language tag"));
        }
        if today && raw.payment_methods.len() > 5 {
            return Err(ValidationError::new("payment_methods", "at most 5 are accepted"));
        }
        if today && raw.channels.len() > 5 {
            return Err(ValidationError::new("channels", "at most 5 are accepted"));
        }
        let monthly = match raw.monthly.as_ref() {
            None => None,
            Some(m) => {
                if today && !(1..=31).contains(&m.day_of_month) {
                    return Err(ValidationError::new(
                        "monthly.day_of_month",
                        format!("{} is not a day of the month (1 to 31)", m.day_of_month),
                    ));
                }
                let amount = required_money(m.amount.as_ref(), "monthly.amount")?;
                let amount = same_currency(
                    positive(amount, "monthly.amount")?,
                    threshold,
                    "monthly.amount",
                )?;
                Some(MonthlyTopUp { day_of_month: m.day_of_month, amount })
            }
        };
        let wire = raw.clone();
        Ok(Rule {
            monthly,
            subscriber,
            state,
            threshold,
            top_up,
            payment_methods,
            locale: if raw.locale.is_empty() { "en".to_string() } else { raw.locale.clone() },
            channels,
            max_topups_per_day: (raw.max_topups_per_day > 0).then_some(raw.max_topups_per_day),
            max_amount_per_month,
            carrier_id: raw.carrier_id.clone(),
            wire,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn valid() -> wire::AutoTopUpRule {
        wire::AutoTopUpRule {
            subscriber_id: "sub-1".into(),
            threshold: Some(wire::Money { currency: "CNY".into(), amount_minor: 1000 }),
            top_up: Some(wire::auto_top_up_rule::TopUp::Amount(wire::Money {
                currency: "CNY".into(),
                amount_minor: 5000,
            })),
            payment_methods: vec![wire::PaymentMethod {
                token: "tok_approve_4242".into(),
                kind: wire::PaymentMethodKind::Card as i32,
                ..Default::default()
            }],
            state: wire::RuleState::Active as i32,
            locale: "zh-CN".into(),
            ..Default::default()
        }
    }

    fn refused(raw: wire::AutoTopUpRule) -> String {
        Rule::try_from(&raw).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn a_stored_rule_that_todays_checks_refuse_is_still_read_back() {
        let mut stored = valid();
        // Accepted by the checks of its day, refused by today's.
        stored.payment_methods = (0..6)
            .map(|i| wire::PaymentMethod {
                token: format!("tok_{i}"),
                kind: wire::PaymentMethodKind::Card as i32,
                label: "x".repeat(80),
                ..Default::default()
            })
            .collect();
        stored.locale = "x".repeat(40);
        stored.channels = vec![wire::NotificationChannel {
            kind: wire::ChannelKind::Sms as i32,
            address: String::new(),
        }];
        assert!(Rule::try_from(&stored).is_err(), "today's checks refuse it");
        let rule = Rule::from_stored(&stored).unwrap();
        assert_eq!(rule.payment_methods.len(), 6);
        assert_eq!(rule.wire, stored);
        // What the rule's parts need is still checked.
        let mut broken = valid();
        broken.threshold = Some(wire::Money { currency: "??".into(), amount_minor: 1 });
        assert!(Rule::from_stored(&broken).is_err());
    }

    #[test]
    fn accepts_a_valid_rule() {
        let rule = Rule::try_from(&valid()).unwrap();
        assert!(rule.is_active());
        let cny = rule.threshold.currency;
        assert_eq!(rule.charge_for(Money::new(cny, 900)), Some(Money::new(cny, 5000)));
    }

    #[test]
    fn target_balance_charges_the_difference() {
        let mut raw = valid();
        raw.top_up = Some(wire::auto_top_up_rule::TopUp::TargetBalance(wire::Money {
            currency: "CNY".into(),
            amount_minor: 10_000,
        }));
        let rule = Rule::try_from(&raw).unwrap();
        let cny = rule.threshold.currency;
        assert_eq!(rule.charge_for(Money::new(cny, -250)), Some(Money::new(cny, 10_250)));
    }

    #[test]
    fn refuses_invalid_rules_with_the_field_named() {
        let mut r = valid();
        r.top_up = Some(wire::auto_top_up_rule::TopUp::Amount(wire::Money {
            currency: "USD".into(),
            amount_minor: 5000,
        }));
        assert!(refused(r).starts_with("amount: currency USD"));

        let mut r = valid();
        r.top_up = Some(wire::auto_top_up_rule::TopUp::Amount(wire::Money {
            currency: "CNY".into(),
            amount_minor: 0,
        }));
        assert!(refused(r).starts_with("amount: must be positive"));

        let mut r = valid();
        r.top_up = Some(wire::auto_top_up_rule::TopUp::TargetBalance(wire::Money {
            currency: "CNY".into(),
            amount_minor: 1000,
        }));
        assert!(refused(r).starts_with("target_balance:"));

        let mut r = valid();
        r.payment_methods.clear();
        assert!(refused(r).starts_with("payment_methods:"));

        let mut r = valid();
        r.payment_methods[0].currency = "USD".into();
        assert!(refused(r).starts_with("payment_methods[0].currency: USD does not match"));

        let mut r = valid();
        r.payment_methods[0].currency = "yuan".into();
        assert!(refused(r).starts_with("payment_methods[0].currency: \"yuan\""));

        let mut r = valid();
        r.state = 42;
        assert!(refused(r).starts_with("state: 42"));

        let mut r = valid();
        r.payment_methods[0].token = "4111111111111111".into();
        assert!(refused(r).contains("card number"));
    }
}
