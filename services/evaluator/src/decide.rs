//! The decision, pure: `decide(state, event, now) -> (state, effects)`. No Kafka, no clock,
//! no randomness; everything it needs arrives as arguments, so a replay decides the same.
//!
//! Semantics (see docs/architecture.md): only an active rule charges; it fires once per downward
//! crossing of the threshold; one top-up in flight per subscriber; a failed top-up waits
//! for a new crossing or a rule change; caps count per UTC day and UTC calendar month;
//! stale balance events change nothing; without an active rule a low balance gets one
//! reminder per crossing of the reminder level.
use std::sync::Arc;

use topup_domain::{
    command_id, idempotency_key, monthly_command_id, BalanceObservation, Money, Notice,
    OutcomeStatus, Rule, RuleState, SubscriberId, TopUpOutcome, ValidationError, YearMonth,
};
use topup_proto::v1::{NotificationCommand, NotificationKind, TopUpCommand, TopUpTrigger};
use topup_proto::Timestamp;

/// What the evaluator remembers of one subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberState {
    /// Whose state.
    pub subscriber: SubscriberId,
    /// The last valid rule (none, or deleted). Shared: copying a state copies no rule.
    pub rule: Option<Arc<Rule>>,
    /// The last balance seen.
    pub balance: Option<LastBalance>,
    /// The top-up in flight.
    pub in_flight: Option<InFlight>,
    /// The next drop below the threshold may fire.
    pub armed: bool,
    /// The next drop below the reminder level may send a reminder.
    pub reminder_armed: bool,
    /// Cap counters.
    pub caps: CapCounters,
    /// The cap window in which the subscriber was last told of a cap ("day:N", "month:M").
    pub cap_notified_window: String,
    /// Commands issued so far (part of the deterministic command id).
    pub commands_issued: u64,
    /// The month ("2026-11") of the last monthly top-up issued or skipped.
    pub monthly_period: String,
    /// Payment methods reminded of their expiry ("<token>|<YYYY-MM>").
    pub expiry_reminded: Vec<String>,
    /// A top-up succeeded after the last balance seen: that balance is stale, and a rule
    /// change (pause and resume) must not fire on it again.
    pub awaiting_credit: bool,
    /// A charged top-up whose credit by the carrier has not been seen yet (boxed: most
    /// subscribers have none, and state is kept for millions).
    pub credit_watch: Option<Box<CreditWatch>>,
    /// One more than the offset of the rule in force on topup.rules.v1 (0 unknown): the
    /// version commands carry, so that the payment worker can tell a later rule change.
    pub rule_version: u64,
}

/// A top-up that was charged and that the carrier has yet to credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditWatch {
    /// Its command id.
    pub command_id: String,
    /// What was charged.
    pub amount: Money,
    /// The balance before the top-up, in minor units.
    pub balance_before_minor: i64,
    /// By when (seconds since the epoch) the credit must have been seen.
    pub due: i64,
    /// The subscriber and operators have been told it is overdue.
    pub raised: bool,
}

/// The last balance seen.
#[derive(Debug, Clone, PartialEq)]
pub struct LastBalance {
    /// The balance.
    pub money: Money,
    /// Its sequence.
    pub sequence: u64,
    /// When the carrier saw it.
    pub observed_at: Option<Timestamp>,
    /// Reporting carrier.
    pub carrier_id: String,
}

/// A top-up issued and not yet answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Its command id.
    pub command_id: String,
    /// What it charges.
    pub amount: Money,
    /// The balance sequence that caused it.
    pub cause_sequence: u64,
    /// UTC day it was counted in.
    pub issued_day: i64,
    /// UTC month it was counted in.
    pub issued_month: i64,
    /// The input record that issued it (set by the processor, which knows records).
    pub issued_by: Option<InputRecord>,
    /// When its command was last issued, seconds since the epoch (see [`reissue_overdue`]);
    /// 0 unknown (a state written before this was kept).
    pub issued_at: i64,
    /// How many times its command was issued again by [`reissue_overdue`].
    pub reissued: u32,
    /// The payment worker could not learn whether money moved: kept in flight, its caps
    /// kept, never issued again, until a settlement arrives.
    pub awaiting_reconciliation: bool,
    /// The command's payment methods (with their ids), so a command issued again carries
    /// exactly these, and so the same idempotency keys. Empty while they are the rule's
    /// (copied when the rule changes).
    pub payment_methods: Vec<topup_proto::v1::PaymentMethod>,
    /// The rule version the command carried.
    pub rule_version: u64,
    /// The balance that caused it, in minor units.
    pub cause_balance_minor: i64,
    /// When its command was first issued, seconds since the epoch (0 unknown): commands
    /// issued again carry it, so the payment worker's age bound counts from the first issue.
    pub first_issued_at: i64,
    /// A balance seen while it was in flight already shows its credit (the carrier credited
    /// before its result reached the evaluator).
    pub credit_seen: bool,
}

/// Where an input record is: its topic (one of the evaluator's inputs) and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputRecord {
    /// Its topic.
    pub topic: &'static str,
    /// Its offset on the subscriber's partition.
    pub offset: i64,
}

/// Usage counted against the rule's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapCounters {
    /// UTC day (days since the epoch) `topups_today` counts.
    pub day: i64,
    /// Top-ups issued that day.
    pub topups_today: u32,
    /// UTC month (year * 12 + month - 1) `amount_this_month` counts.
    pub month: i64,
    /// Minor units issued that month.
    pub amount_this_month: i64,
}

impl InFlight {
    /// `command` as issued again: with the first issue's time, so that its age is the
    /// top-up's age, not the reissue's.
    fn first_issue(&self, mut command: TopUpCommand) -> TopUpCommand {
        if self.first_issued_at > 0 {
            command.issued_at = Some(Timestamp { seconds: self.first_issued_at, nanos: 0 });
        }
        command
    }

    /// The command's payment methods: kept here once the rule changed, the rule's until then
    /// (and for a state written before they were kept).
    fn methods_or<'a>(&'a self, rule: &'a Rule) -> &'a [topup_proto::v1::PaymentMethod] {
        if self.payment_methods.is_empty() {
            &rule.wire.payment_methods
        } else {
            &self.payment_methods
        }
    }
}

impl SubscriberState {
    /// A subscriber seen for the first time.
    pub fn new(subscriber: SubscriberId) -> Self {
        Self {
            subscriber,
            rule: None,
            balance: None,
            in_flight: None,
            armed: true,
            reminder_armed: true,
            caps: CapCounters::default(),
            cap_notified_window: String::new(),
            commands_issued: 0,
            monthly_period: String::new(),
            expiry_reminded: Vec::new(),
            awaiting_credit: false,
            credit_watch: None,
            rule_version: 0,
        }
    }
}

/// Something that happened to a subscriber.
#[derive(Debug, Clone)]
pub enum Event {
    /// The carrier reported a balance.
    Balance(BalanceObservation),
    /// The rule was created, changed or deleted.
    Rule(Box<Rule>),
    /// A top-up finished.
    Outcome(TopUpOutcome),
}

/// What the decision asks the world to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Charge: publish to topup.commands.v1.
    Command(TopUpCommand),
    /// Tell the subscriber: publish to topup.notifications.v1.
    Notify(NotificationCommand),
}

/// Settings of the decision that are not part of any rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Low-balance reminder level (minor units of the balance's currency) for subscribers
    /// without a rule; subscribers with an inactive rule are reminded at its threshold.
    pub reminder_level_minor: i64,
    /// Seconds a top-up may wait for its result before its command is issued again under
    /// the same id (see [`reissue_overdue`]); 0 never.
    pub reissue_after_secs: i64,
    /// Seconds after a charged top-up within which the carrier's credit must be seen (see
    /// [`credit_overdue`]); 0 never watched.
    pub credit_deadline_secs: i64,
}

impl Default for Settings {
    /// The defaults of `topup-evaluator`'s settings (written once, in [`crate::Config`]).
    fn default() -> Self {
        crate::Config::new(topup_kafka::KafkaArgs::new("")).settings()
    }
}

/// How far apart two balances' observation times must be for those times, not their
/// sequences, to say which is newer. Reordered and resent records arrive within minutes, and
/// within that the carrier's sequence decides.
pub const SEQUENCE_RESTART_SECS: i64 = 3_600;

/// Whether `observation` is newer than `last`: by sequence, unless their observation times
/// are [`SEQUENCE_RESTART_SECS`] or more apart. Then the later one is newer whatever its
/// sequence — the carrier's counter started again (a reset, or after a jump far ahead: one
/// absurd sequence near `u64::MAX` would otherwise make every later balance look stale and
/// silence the subscriber's top-ups for ever), and a record from before the restart, higher
/// sequence and all, is stale.
fn newer_than(observation: &BalanceObservation, last: &LastBalance) -> bool {
    if let (Some(then), Some(now)) = (&last.observed_at, &observation.observed_at) {
        let apart = now.seconds.saturating_sub(then.seconds);
        if apart >= SEQUENCE_RESTART_SECS {
            return true;
        }
        if apart <= -SEQUENCE_RESTART_SECS {
            return false;
        }
    }
    observation.sequence > last.sequence
}

/// The UTC day and month index of `now`.
fn windows(now: &Timestamp) -> (i64, i64) {
    let day = now.seconds.div_euclid(86_400);
    let (year, month, _) = topup_domain::calendar::civil_from_days(day);
    (day, year * 12 + i64::from(month) - 1)
}

/// Applies `event` to `state`. `origin` identifies the event (topic/partition/offset)
/// for deterministic notification ids. A refusal leaves the state as it was.
pub fn decide(
    mut state: SubscriberState,
    event: Event,
    origin: &str,
    now: Timestamp,
    settings: &Settings,
) -> Result<(SubscriberState, Vec<Effect>), ValidationError> {
    let mut effects = Vec::new();
    match event {
        Event::Balance(observation) => {
            if let Some(last) = &state.balance {
                if !newer_than(&observation, last) {
                    // Stale or duplicate: carriers resend and reorder; nothing changes.
                    return Ok((state, effects));
                }
            }
            if let Some(rule) = &state.rule {
                if observation.balance.currency != rule.threshold.currency {
                    return Err(ValidationError::new(
                        "balance.currency",
                        format!(
                            "{} differs from the rule's currency {}",
                            observation.balance.currency, rule.threshold.currency
                        ),
                    ));
                }
                if observation.balance.minor >= rule.threshold.minor {
                    state.armed = true;
                }
            }
            state.awaiting_credit = false;
            let rise = state
                .balance
                .as_ref()
                .map_or(0, |last| observation.balance.minor.saturating_sub(last.money.minor));
            if let Some(flight) = state.in_flight.as_mut() {
                // Results and balances have no order: the credit may be seen first.
                if observation.credited_command_ids.contains(&flight.command_id)
                    || rise >= flight.amount.minor
                {
                    flight.credit_seen = true;
                }
            }
            if let Some(watch) = &state.credit_watch {
                if observation.credited_command_ids.contains(&watch.command_id)
                    || rise >= watch.amount.minor
                    || observation.balance.minor
                        >= watch.balance_before_minor.saturating_add(watch.amount.minor)
                {
                    state.credit_watch = None;
                }
            }
            state.balance = Some(LastBalance {
                money: observation.balance,
                sequence: observation.sequence,
                observed_at: observation.observed_at,
                carrier_id: observation.carrier_id,
            });
        }
        Event::Rule(rule) => {
            let rule = *rule;
            if let Some(balance) = &state.balance {
                if rule.state != RuleState::Deleted
                    && rule.threshold.currency != balance.money.currency
                {
                    return Err(ValidationError::new(
                        "rule.threshold.currency",
                        format!(
                            "{} differs from the balance's currency {}",
                            rule.threshold.currency, balance.money.currency
                        ),
                    ));
                }
            }
            let was_active = state.rule.as_deref().is_some_and(Rule::is_active);
            let changed = state.rule.as_ref().map(|r| &r.wire) != Some(&rule.wire);
            // A top-up in flight keeps the methods it was issued with (and so its keys): they
            // are copied from the old rule the moment the rule changes.
            if let (Some(flight), Some(old)) = (state.in_flight.as_mut(), state.rule.as_deref()) {
                if flight.payment_methods.is_empty()
                    && old.wire.payment_methods != rule.wire.payment_methods
                {
                    flight.payment_methods.clone_from(&old.wire.payment_methods);
                }
            }
            if rule.state == RuleState::Deleted {
                state.rule = None;
            } else {
                if changed {
                    // A rule change is a fresh start: the next low balance may fire again.
                    state.armed = true;
                }
                if rule.is_active() && (!was_active || changed) {
                    skip_passed_monthly(&mut state, &rule, &now);
                }
                if rule.is_active() && !was_active {
                    let activated =
                        notify(&state, &rule, NotificationKind::RuleActivated, origin, now);
                    effects.push(Effect::Notify(activated.build()));
                }
                state.rule = Some(Arc::new(rule));
            }
        }
        Event::Outcome(outcome) => {
            let Some(flight) =
                state.in_flight.clone().filter(|f| f.command_id == outcome.command_id)
            else {
                // A result for something no longer in flight (a duplicate): nothing to close.
                return Ok((state, effects));
            };
            let mut credited = false;
            match outcome.status {
                OutcomeStatus::Unresolved => {
                    // Money may have moved: keep the top-up (and what it took of the caps)
                    // until an operator settles it with the gateway's word.
                    if let Some(flight) = state.in_flight.as_mut() {
                        flight.awaiting_reconciliation = true;
                    }
                    return Ok((state, effects));
                }
                OutcomeStatus::NotCharged => {
                    // Definitely nothing was charged: give back what the top-up took of the caps.
                    if state.caps.day == flight.issued_day {
                        state.caps.topups_today = state.caps.topups_today.saturating_sub(1);
                    }
                    if state.caps.month == flight.issued_month {
                        state.caps.amount_this_month =
                            (state.caps.amount_this_month - flight.amount.minor).max(0);
                    }
                }
                OutcomeStatus::Charged => {
                    credited = flight.credit_seen
                        || state.balance.as_ref().is_some_and(|b| {
                            b.sequence > flight.cause_sequence
                                && b.money.minor
                                    >= flight
                                        .cause_balance_minor
                                        .saturating_add(flight.amount.minor)
                        });
                    state.credit_watch =
                        (settings.credit_deadline_secs > 0 && !credited).then(|| {
                            Box::new(CreditWatch {
                                command_id: flight.command_id.clone(),
                                amount: flight.amount,
                                balance_before_minor: flight.cause_balance_minor,
                                due: now.seconds.saturating_add(settings.credit_deadline_secs),
                                raised: false,
                            })
                        });
                }
            }
            // The balance we know is from before this top-up: until the carrier reports the
            // credited one, it must not fire another.
            state.awaiting_credit = outcome.charged() && !credited;
            state.in_flight = None;
        }
    }
    fire_if_due(&mut state, now, &mut effects);
    remind_if_due(&mut state, origin, now, settings, &mut effects);
    Ok((state, effects))
}

fn fire_if_due(state: &mut SubscriberState, now: Timestamp, effects: &mut Vec<Effect>) {
    let (Some(rule), Some(balance)) = (&state.rule, &state.balance) else { return };
    if !rule.is_active() || !state.armed || state.in_flight.is_some() || state.awaiting_credit {
        return;
    }
    if balance.money.minor >= rule.threshold.minor {
        return;
    }
    let Some(amount) = rule.charge_for(balance.money) else { return };
    // Windows only move forward: a record stamped earlier than the last one counted (a
    // producer's clock behind another's around midnight) counts in the window already open
    // and never opens the one before again.
    // A window saved more than one ahead of now (a state written before record times were
    // capped at the evaluator's clock) is not kept: it would never close.
    let (day, month) = windows(&now);
    let keep =
        |window: i64, saved: i64| if saved > window + 1 { window } else { window.max(saved) };
    let (day, month) = (keep(day, state.caps.day), keep(month, state.caps.month));
    if state.caps.day != day {
        state.caps.day = day;
        state.caps.topups_today = 0;
    }
    if state.caps.month != month {
        state.caps.month = month;
        state.caps.amount_this_month = 0;
    }
    // This crossing is used up whether it charges or hits a cap.
    state.armed = false;
    let over_day = rule.max_topups_per_day.is_some_and(|max| state.caps.topups_today >= max);
    let over_month = rule
        .max_amount_per_month
        .is_some_and(|max| state.caps.amount_this_month.saturating_add(amount.minor) > max.minor);
    if over_day || over_month {
        let window = if over_day { format!("day:{day}") } else { format!("month:{month}") };
        if state.cap_notified_window != window {
            let cap = if over_day { "max_topups_per_day" } else { "max_amount_per_month" };
            let notification = notify(state, rule, NotificationKind::CapReached, &window, now)
                .amount(Some(amount))
                .parameter("cap", cap);
            effects.push(Effect::Notify(notification.build()));
            state.cap_notified_window = window;
        }
        return;
    }
    let id = command_id(&state.subscriber, balance.sequence, state.commands_issued);
    let methods = &rule.wire.payment_methods;
    let (command, started) =
        command_effects(state, rule, balance, &id, amount, methods, state.rule_version, now);
    state.in_flight = Some(InFlight {
        command_id: id,
        amount,
        cause_sequence: balance.sequence,
        issued_day: day,
        issued_month: month,
        issued_by: None,
        issued_at: now.seconds,
        reissued: 0,
        awaiting_reconciliation: false,
        // The rule's methods stand in until the rule changes (see `Event::Rule`): a state
        // record written on every balance need not carry them.
        payment_methods: Vec::new(),
        rule_version: state.rule_version,
        cause_balance_minor: balance.money.minor,
        first_issued_at: now.seconds,
        credit_seen: false,
    });
    state.caps.topups_today += 1;
    state.caps.amount_this_month = state.caps.amount_this_month.saturating_add(amount.minor);
    state.commands_issued += 1;
    effects.push(Effect::Command(command));
    effects.push(Effect::Notify(started));
}

/// The command for top-up `id` of `amount` with `methods` under rule `rule_version`, caused
/// by `balance`, and the notification that it started.
#[allow(clippy::too_many_arguments)]
fn command_effects(
    state: &SubscriberState,
    rule: &Rule,
    balance: &LastBalance,
    id: &str,
    amount: Money,
    methods: &[topup_proto::v1::PaymentMethod],
    rule_version: u64,
    now: Timestamp,
) -> (TopUpCommand, NotificationCommand) {
    let command = TopUpCommand {
        command_id: id.to_string(),
        subscriber_id: state.subscriber.to_string(),
        amount: Some(amount.to_wire()),
        // Each with its stable id: the payment worker derives the keys from it.
        payment_methods: methods
            .iter()
            .map(|m| topup_proto::v1::PaymentMethod {
                method_id: topup_domain::payment_method_id(m.kind, &m.token),
                ..m.clone()
            })
            .collect(),
        idempotency_key: idempotency_key(id),
        cause_event_id: format!("{}/{}", state.subscriber, balance.sequence),
        cause_sequence: balance.sequence,
        carrier_id: if balance.carrier_id.is_empty() {
            rule.carrier_id.clone()
        } else {
            balance.carrier_id.clone()
        },
        observed_at: balance.observed_at,
        issued_at: Some(now),
        locale: rule.locale.clone(),
        channels: rule.wire.channels.clone(),
        trigger: TopUpTrigger::Threshold as i32,
        rule_version,
    };
    let started = notify(state, rule, NotificationKind::TopUpStarted, id, now)
        .command(id)
        .amount(Some(amount));
    (command, started.build())
}

/// The effects of the top-up in flight once more, when the record that issued it is read a
/// second time (see `InFlight::issued_by`): the same command id, so the same idempotency key,
/// and the same notification id. `None` unless `record` issued the top-up in flight.
///
/// On a broker that honours `read_committed` this never happens: a state that remembers the
/// top-up was committed with the input's offset. The mock cluster shows uncommitted records,
/// so a restarted evaluator may restore a state whose command was never written.
pub fn reissue(
    state: &SubscriberState,
    record: InputRecord,
    event: &Event,
    now: Timestamp,
) -> Option<Vec<Effect>> {
    let flight = state.in_flight.as_ref()?;
    if flight.issued_by != Some(record) {
        return None;
    }
    let rule = state.rule.as_deref()?;
    let balance = match event {
        Event::Balance(observation) if observation.sequence == flight.cause_sequence => {
            LastBalance {
                money: observation.balance,
                sequence: observation.sequence,
                observed_at: observation.observed_at,
                carrier_id: observation.carrier_id.clone(),
            }
        }
        _ => state.balance.clone()?,
    };
    let (command, started) = command_effects(
        state,
        rule,
        &balance,
        &flight.command_id,
        flight.amount,
        flight.methods_or(rule),
        flight.rule_version,
        now,
    );
    Some(vec![Effect::Command(flight.first_issue(command)), Effect::Notify(started)])
}

/// How many times a top-up's command is issued again at most: a gateway remembers an
/// idempotency key for a limited time (a day is common), so reissuing for ever could charge
/// twice. Past this the top-up stays in flight for a person to look at (the reissues have
/// raised an alert by then).
pub const MAX_REISSUES: u32 = 3;

/// The command of the top-up in flight once more, under the same id, when it has waited
/// `settings.reissue_after_secs` for a result. Without this a top-up whose command or result
/// is lost — a topic's retention, a consumer broken for longer, a record a broker dropped —
/// would stay in flight for ever, and with it the subscriber's automatic top-ups. The same
/// id is the same idempotency key, so the gateway charges it at most once, and a second
/// result for it is a duplicate the evaluator ignores. The wait starts again from now; at
/// most [`MAX_REISSUES`] times, and only while the rule is active. A top-up whose issue time
/// is unknown (0) starts its wait now.
pub fn reissue_overdue(
    mut state: SubscriberState,
    now: Timestamp,
    settings: &Settings,
) -> (SubscriberState, Option<TopUpCommand>) {
    let after = settings.reissue_after_secs;
    let (Some(flight), Some(rule), Some(balance)) =
        (state.in_flight.as_ref(), state.rule.as_deref(), state.balance.as_ref())
    else {
        return (state, None);
    };
    // A top-up awaiting reconciliation may have been charged: only a settlement ends it.
    if after <= 0
        || !rule.is_active()
        || flight.reissued >= MAX_REISSUES
        || flight.awaiting_reconciliation
    {
        return (state, None);
    }
    if flight.issued_at == 0 {
        if let Some(flight) = state.in_flight.as_mut() {
            flight.issued_at = now.seconds;
        }
        return (state, None);
    }
    if now.seconds.saturating_sub(flight.issued_at) < after {
        return (state, None);
    }
    let cause = LastBalance { sequence: flight.cause_sequence, ..balance.clone() };
    let (command, _) = command_effects(
        &state,
        rule,
        &cause,
        &flight.command_id,
        flight.amount,
        flight.methods_or(rule),
        flight.rule_version,
        now,
    );
    let command = flight.first_issue(command);
    if let Some(flight) = state.in_flight.as_mut() {
        flight.issued_at = now.seconds;
        flight.reissued += 1;
    }
    (state, Some(command))
}

/// The notice that a charged top-up was not credited by the carrier within
/// `settings.credit_deadline_secs`: the subscriber was charged and may still be without
/// service, so they and operators (alerting reads topup.notifications.v1 too) are told, once.
pub fn credit_overdue(
    mut state: SubscriberState,
    now: Timestamp,
) -> (SubscriberState, Option<NotificationCommand>) {
    let Some(watch) = state.credit_watch.as_ref().filter(|w| !w.raised && now.seconds >= w.due)
    else {
        return (state, None);
    };
    let mut notice =
        Notice::new(NotificationKind::TopUpNotCredited, &state.subscriber, &watch.command_id, now)
            .urgent(true)
            .command(&watch.command_id)
            .amount(Some(watch.amount))
            .balance(state.balance.as_ref().map(|b| b.money));
    if let Some(rule) = &state.rule {
        notice = notice.to(&rule.locale, &rule.wire.channels);
    }
    let notice = notice.build();
    if let Some(watch) = state.credit_watch.as_mut() {
        watch.raised = true;
    }
    (state, Some(notice))
}

/// When the tick has work for `state` (seconds since the epoch), so that it is looked at
/// then and not before: the day its monthly top-up or an expiry reminder is due
/// ([`on_day`]), the moment its top-up in flight has waited too long for a result
/// ([`reissue_overdue`]), the moment a charged top-up's credit is overdue
/// ([`credit_overdue`]). `None`: nothing comes without an input record.
pub fn next_due(state: &SubscriberState, now: Timestamp, settings: &Settings) -> Option<i64> {
    let today = now.seconds.div_euclid(86_400);
    let day_work = state.rule.as_deref().and_then(|rule| next_day_work(state, rule, today));
    let reissue = match (&state.in_flight, state.rule.as_deref(), &state.balance) {
        (Some(flight), Some(rule), Some(_))
            if settings.reissue_after_secs > 0
                && rule.is_active()
                && flight.reissued < MAX_REISSUES
                && !flight.awaiting_reconciliation =>
        {
            Some(match flight.issued_at {
                0 => now.seconds,
                issued => issued.saturating_add(settings.reissue_after_secs),
            })
        }
        _ => None,
    };
    let credit = state.credit_watch.as_ref().filter(|w| !w.raised).map(|w| w.due);
    [day_work.map(|day| day.saturating_mul(86_400)), reissue, credit].into_iter().flatten().min()
}

/// The first UTC day from `today` on which [`on_day`] has something to do.
fn next_day_work(state: &SubscriberState, rule: &Rule, today: i64) -> Option<i64> {
    let monthly = rule.monthly.filter(|_| rule.is_active()).map(|monthly| {
        if state.monthly_period < YearMonth::of_day(today).to_string() {
            monthly.due_day_in_month_of(today).max(today)
        } else {
            monthly.due_day_in_month_of(YearMonth::of_day(today).end_day())
        }
    });
    let reminders =
        matches!(rule.state, RuleState::Active | RuleState::Paused | RuleState::Confirmed)
            .then(|| {
                rule.payment_methods
                    .iter()
                    .filter_map(|method| {
                        let expires = method.expires?;
                        let end = expires.end_day();
                        let reminded =
                            state.expiry_reminded.contains(&format!("{}|{expires}", method.token));
                        // From 30 days before, or from the first of the month it expires in.
                        let first_of_month = topup_domain::calendar::days_from_civil(
                            i64::from(expires.year),
                            expires.month,
                            1,
                        );
                        let from = (end - EXPIRY_REMINDER_DAYS).min(first_of_month).max(today);
                        (!reminded && from < end).then_some(from)
                    })
                    .min()
            })
            .flatten();
    [monthly, reminders].into_iter().flatten().min()
}

/// Days before a payment method's expiry when the subscriber is reminded to update it.
pub const EXPIRY_REMINDER_DAYS: i64 = 30;

/// A monthly top-up whose day of this month has passed when the rule is switched on waits
/// for next month (nobody expects a charge for a day gone by).
fn skip_passed_monthly(state: &mut SubscriberState, rule: &Rule, now: &Timestamp) {
    let Some(monthly) = rule.monthly else { return };
    let day = now.seconds.div_euclid(86_400);
    if day > monthly.due_day_in_month_of(day) {
        let period = YearMonth::of_day(day).to_string();
        if state.monthly_period < period {
            state.monthly_period = period;
        }
    }
}

/// What a UTC day brings a subscriber, whatever the balance: the monthly top-up on its day
/// (once per month, even when asked again), and a reminder for each payment method that
/// expires within [`EXPIRY_REMINDER_DAYS`] or this month (once per method and expiry).
pub fn on_day(mut state: SubscriberState, now: Timestamp) -> (SubscriberState, Vec<Effect>) {
    let mut effects = Vec::new();
    let Some(rule) = state.rule.clone() else { return (state, effects) };
    let day = now.seconds.div_euclid(86_400);
    if let Some(monthly) = rule.monthly.filter(|_| rule.is_active()) {
        let period = YearMonth::of_day(day).to_string();
        if day >= monthly.due_day_in_month_of(day) && state.monthly_period < period {
            let id = monthly_command_id(&state.subscriber, &period);
            let balance = LastBalance {
                money: state.balance.as_ref().map_or(monthly.amount, |b| b.money),
                sequence: 0,
                observed_at: Some(now),
                carrier_id: state
                    .balance
                    .as_ref()
                    .map(|b| b.carrier_id.clone())
                    .unwrap_or_default(),
            };
            let methods = &rule.wire.payment_methods;
            let (mut command, started) = command_effects(
                &state,
                &rule,
                &balance,
                &id,
                monthly.amount,
                methods,
                state.rule_version,
                now,
            );
            command.trigger = TopUpTrigger::Monthly as i32;
            command.cause_event_id = format!("{}/monthly/{period}", state.subscriber);
            effects.push(Effect::Command(command));
            effects.push(Effect::Notify(started));
            state.monthly_period = period;
        }
    }
    if matches!(rule.state, RuleState::Active | RuleState::Paused | RuleState::Confirmed) {
        let keys: Vec<String> = rule
            .payment_methods
            .iter()
            .filter_map(|m| m.expires.map(|e| format!("{}|{e}", m.token)))
            .collect();
        // Forget reminders of methods no longer in the rule.
        state.expiry_reminded.retain(|k| keys.contains(k));
        for method in &rule.payment_methods {
            let Some(expires) = method.expires else { continue };
            let left = expires.end_day() - day;
            let key = format!("{}|{expires}", method.token);
            // Within 30 days, or this very month (on the 1st of a 31-day month it is 31).
            let soon = left <= EXPIRY_REMINDER_DAYS || expires == YearMonth::of_day(day);
            if left <= 0 || !soon || state.expiry_reminded.contains(&key) {
                continue;
            }
            let shown = if method.label.is_empty() {
                topup_domain::mask_token(&method.token)
            } else {
                method.label.clone()
            };
            let about = format!("expiring/{}/{expires}", topup_domain::mask_token(&method.token));
            let n = notify(&state, &rule, NotificationKind::PaymentMethodExpiring, &about, now)
                .parameter("method", shown)
                .parameter("expires", expires.to_string());
            effects.push(Effect::Notify(n.build()));
            state.expiry_reminded.push(key);
        }
    }
    (state, effects)
}

fn remind_if_due(
    state: &mut SubscriberState,
    origin: &str,
    now: Timestamp,
    settings: &Settings,
    effects: &mut Vec<Effect>,
) {
    if state.rule.as_deref().is_some_and(Rule::is_active) {
        return;
    }
    let Some(balance) = &state.balance else { return };
    let level = state.rule.as_ref().map_or(settings.reminder_level_minor, |r| r.threshold.minor);
    if balance.money.minor >= level {
        state.reminder_armed = true;
        return;
    }
    if !state.reminder_armed {
        return;
    }
    state.reminder_armed = false;
    let mut reminder = Notice::new(NotificationKind::LowBalance, &state.subscriber, origin, now)
        .balance(Some(balance.money))
        .threshold(Some(Money::new(balance.money.currency, level)));
    if let Some(rule) = &state.rule {
        reminder = reminder.to(&rule.locale, &rule.wire.channels);
    }
    let reminder = reminder.build();
    effects.push(Effect::Notify(reminder));
}

fn notify(
    state: &SubscriberState,
    rule: &Rule,
    kind: NotificationKind,
    about: &str,
    now: Timestamp,
) -> Notice {
    Notice::new(kind, &state.subscriber, about, now)
        .to(&rule.locale, &rule.wire.channels)
        .balance(state.balance.as_ref().map(|b| b.money))
        .threshold(Some(rule.threshold))
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
