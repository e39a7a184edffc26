//! Unit and property tests of the pure decision.
use proptest::prelude::*;
use topup_domain::{
    BalanceObservation, Currency, Money, OutcomeStatus, Rule, SubscriberId, TopUpOutcome,
};
use topup_proto::v1::{self as wire, NotificationKind};
use topup_proto::Timestamp;

use super::*;

const NOW: Timestamp = Timestamp { seconds: 1_790_000_000, nanos: 0 };

fn sub() -> SubscriberId {
    SubscriberId::parse("sub-1").unwrap()
}

fn cny(minor: i64) -> wire::Money {
    wire::Money { currency: "CNY".into(), amount_minor: minor }
}

fn wire_rule(state: wire::RuleState) -> wire::AutoTopUpRule {
    wire::AutoTopUpRule {
        subscriber_id: "sub-1".into(),
        threshold: Some(cny(1000)),
        top_up: Some(wire::auto_top_up_rule::TopUp::Amount(cny(5000))),
        payment_methods: vec![wire::PaymentMethod {
            token: "tok_approve_4242".into(),
            kind: wire::PaymentMethodKind::Card as i32,
            ..Default::default()
        }],
        state: state as i32,
        locale: "en".into(),
        ..Default::default()
    }
}

fn rule_event(raw: &wire::AutoTopUpRule) -> Event {
    Event::Rule(Box::new(Rule::try_from(raw).unwrap()))
}

fn balance(minor: i64, sequence: u64) -> Event {
    Event::Balance(BalanceObservation {
        subscriber: sub(),
        carrier_id: "c".into(),
        balance: Money::new(Currency::parse("CNY").unwrap(), minor),
        sequence,
        observed_at: None,
        event_id: String::new(),
        credited_command_ids: Vec::new(),
    })
}

fn outcome(command_id: &str, succeeded: bool) -> Event {
    let status = if succeeded { OutcomeStatus::Charged } else { OutcomeStatus::NotCharged };
    outcome_with(command_id, status)
}

fn outcome_with(command_id: &str, status: OutcomeStatus) -> Event {
    Event::Outcome(TopUpOutcome { subscriber: sub(), command_id: command_id.into(), status })
}

/// Applies events in order to a new subscriber; returns the final state and every effect.
fn run(events: Vec<Event>) -> (SubscriberState, Vec<Effect>) {
    run_from(SubscriberState::new(sub()), events)
}

/// Applies events in order to `state`; returns the final state and every effect.
fn run_from(mut state: SubscriberState, events: Vec<Event>) -> (SubscriberState, Vec<Effect>) {
    let mut all = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        let (next, effects) =
            decide(state, event, &format!("t/0/{i}"), NOW, &Settings::default()).unwrap();
        state = next;
        all.extend(effects);
    }
    (state, all)
}

fn commands(effects: &[Effect]) -> Vec<&wire::TopUpCommand> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command(c) => Some(c),
            Effect::Notify(_) => None,
        })
        .collect()
}

fn notifications(effects: &[Effect], kind: NotificationKind) -> usize {
    effects.iter().filter(|e| matches!(e, Effect::Notify(n) if n.kind == kind as i32)).count()
}

#[test]
fn fires_once_per_crossing_and_ignores_stale_events() {
    let (state, effects) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(2000, 1),
        balance(900, 2),
        balance(800, 3),
        balance(950, 2), // stale
        balance(800, 3), // duplicate
    ]);
    let cmds = commands(&effects);
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].cause_sequence, 2);
    assert_eq!(cmds[0].amount, Some(cny(5000)));
    assert_eq!(cmds[0].idempotency_key, format!("topup-{}", cmds[0].command_id));
    assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(3));
    assert_eq!(notifications(&effects, NotificationKind::TopUpStarted), 1);
}

#[test]
fn a_success_rearms_only_when_the_credited_balance_is_seen() {
    let (state, effects) =
        run(vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(900, 1)]);
    let id = commands(&effects)[0].command_id.clone();
    let (state, effects) = run_from(
        state,
        vec![outcome(&id, true), balance(850, 2), balance(5850, 3), balance(950, 4)],
    );
    // 850 (usage racing the credit) does not fire; 5850 re-arms; 950 is a new crossing.
    let cmds = commands(&effects);
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].cause_sequence, 4);
    assert!(state.in_flight.is_some());
}

#[test]
fn a_failure_does_not_retry_until_a_new_crossing_or_rule_change() {
    let raw = wire_rule(wire::RuleState::Active);
    let (state, effects) = run(vec![rule_event(&raw), balance(900, 1)]);
    let id = commands(&effects)[0].command_id.clone();
    let (state, fx) = decide(state, outcome(&id, false), "r", NOW, &Settings::default()).unwrap();
    assert!(commands(&fx).is_empty());
    let (state, fx) = decide(state, balance(800, 2), "b", NOW, &Settings::default()).unwrap();
    assert!(commands(&fx).is_empty(), "no retry loop");
    assert_eq!(state.caps.topups_today, 0, "the failed top-up gave its cap back");
    let mut changed = raw.clone();
    changed.payment_methods[0].token = "tok_approve_9999".into();
    let (_, fx) = decide(state, rule_event(&changed), "u", NOW, &Settings::default()).unwrap();
    assert_eq!(commands(&fx).len(), 1, "a changed rule tries again at once");
}

#[test]
fn activation_while_low_fires_at_once_and_paused_rules_only_remind() {
    let (state, effects) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Paused)),
        balance(300, 1),
        balance(200, 2),
    ]);
    assert!(commands(&effects).is_empty());
    assert_eq!(
        notifications(&effects, NotificationKind::LowBalance),
        1,
        "one reminder per crossing"
    );
    let (_, fx) = decide(
        state,
        rule_event(&wire_rule(wire::RuleState::Active)),
        "a",
        NOW,
        &Settings::default(),
    )
    .unwrap();
    assert_eq!(commands(&fx).len(), 1);
    assert_eq!(notifications(&fx, NotificationKind::RuleActivated), 1);
}

#[test]
fn subscribers_without_a_rule_get_a_reminder_per_crossing() {
    let (_, effects) =
        run(vec![balance(300, 1), balance(200, 2), balance(900, 3), balance(100, 4)]);
    assert!(commands(&effects).is_empty());
    assert_eq!(notifications(&effects, NotificationKind::LowBalance), 2);
}

#[test]
fn caps_stop_charges_and_tell_the_subscriber_once() {
    let mut raw = wire_rule(wire::RuleState::Active);
    raw.max_topups_per_day = 1;
    let (state, effects) = run(vec![rule_event(&raw), balance(900, 1)]);
    let id = commands(&effects)[0].command_id.clone();
    let (state, effects) = run_from(
        state,
        vec![
            outcome(&id, true),
            balance(5900, 2),
            balance(900, 3),
            balance(5900, 4),
            balance(900, 5),
        ],
    );
    assert!(commands(&effects).is_empty(), "the daily cap holds");
    assert_eq!(notifications(&effects, NotificationKind::CapReached), 1, "told once");
    assert_eq!(state.caps.topups_today, 1);
}

#[test]
fn target_balance_tops_up_the_difference() {
    let mut raw = wire_rule(wire::RuleState::Active);
    raw.top_up = Some(wire::auto_top_up_rule::TopUp::TargetBalance(cny(8000)));
    let (_, effects) = run(vec![rule_event(&raw), balance(-250, 1)]);
    assert_eq!(commands(&effects)[0].amount, Some(cny(8250)));
}

#[test]
fn a_rule_in_another_currency_than_the_balance_is_refused_and_the_old_rule_stays() {
    let (state, _) = run(vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(2000, 1)]);
    let mut usd = wire_rule(wire::RuleState::Active);
    usd.threshold = Some(wire::Money { currency: "USD".into(), amount_minor: 1000 });
    usd.top_up = Some(wire::auto_top_up_rule::TopUp::Amount(wire::Money {
        currency: "USD".into(),
        amount_minor: 500,
    }));
    let before = state.clone();
    let refused = decide(state, rule_event(&usd), "r", NOW, &Settings::default()).unwrap_err();
    assert!(refused.to_string().contains("USD"), "{refused}");
    assert_eq!(before.rule.map(|r| r.threshold.currency.code().to_string()), Some("CNY".into()));
}

#[test]
fn replaying_the_same_events_issues_the_same_command_ids() {
    let events = || vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(900, 7)];
    let (_, first) = run(events());
    let (_, second) = run(events());
    assert_eq!(commands(&first)[0].command_id, commands(&second)[0].command_id);
}

/// An event of a generated history; outcomes refer to whatever is in flight, or to nothing.
#[derive(Debug, Clone)]
enum Step {
    Balance { minor: i64, sequence: u64 },
    Rule { state: wire::RuleState },
    Outcome { matches: bool, succeeded: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (-2000i64..4000, 1u64..40).prop_map(|(minor, sequence)| Step::Balance { minor, sequence }),
        1 => prop_oneof![
            Just(wire::RuleState::Active),
            Just(wire::RuleState::Paused),
            Just(wire::RuleState::Draft),
            Just(wire::RuleState::Deleted),
        ].prop_map(|state| Step::Rule { state }),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(matches, succeeded)| Step::Outcome { matches, succeeded }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For any interleaving: at most one command in flight; at most one per crossing (or
    /// rule change); the daily count and monthly amount caps are never exceeded; and every
    /// downward crossing of an active rule with nothing in flight and no cap reached gets a
    /// command.
    #[test]
    fn invariants_hold_for_any_interleaving(
        steps in prop::collection::vec(step(), 1..60),
        max_per_day in 0u32..4,
        max_month_units in prop::option::of(1i64..4),
    ) {
        let mut raw = wire_rule(wire::RuleState::Active);
        raw.max_topups_per_day = max_per_day;
        raw.max_amount_per_month = max_month_units.map(|n| cny(n * 5000));
        let mut state = SubscriberState::new(sub());
        // The test's own model of the world, independent of the state's bookkeeping.
        let mut in_flight: Option<String> = None;
        let mut charged_count = 0u32;
        let mut charged_minor = 0i64;
        let mut last_balance: Option<(u64, i64)> = None;
        let mut active = false;
        // May a command be issued? Upper bound of the evaluator's `armed`: set by a balance at
        // or above the threshold (with a rule) or a changed rule, cleared by a command.
        let mut armed = true;
        let mut rule_state: Option<wire::RuleState> = None;
        for (i, step) in steps.into_iter().enumerate() {
            let (event, crossing) = match &step {
                Step::Balance { minor, sequence } => {
                    let fresh = last_balance.is_none_or(|(seq, _)| *sequence > seq);
                    let was_above = last_balance.is_none_or(|(_, b)| b >= 1000);
                    let crossing = fresh && was_above && *minor < 1000;
                    if fresh { last_balance = Some((*sequence, *minor)); }
                    if fresh && *minor >= 1000 && rule_state.is_some() { armed = true; }
                    (balance(*minor, *sequence), crossing)
                }
                Step::Rule { state: s } => {
                    let mut r = raw.clone();
                    r.state = *s as i32;
                    active = *s == wire::RuleState::Active;
                    if *s == wire::RuleState::Deleted {
                        rule_state = None;
                    } else {
                        if rule_state != Some(*s) { armed = true; }
                        rule_state = Some(*s);
                    }
                    (rule_event(&r), false)
                }
                Step::Outcome { matches, succeeded } => {
                    let id = match (&in_flight, matches) {
                        (Some(id), true) => id.clone(),
                        _ => "not-in-flight".to_string(),
                    };
                    (outcome(&id, *succeeded), false)
                }
            };
            let (next, effects) = decide(state, event, &format!("p/{i}"), NOW, &Settings::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            state = next;
            let issued = commands(&effects);
            prop_assert!(issued.len() <= 1);
            if let Step::Outcome { matches: true, succeeded } = step {
                if in_flight.take().is_some() && !succeeded {
                    charged_count -= 1;
                    charged_minor -= 5000;
                }
            }
            if let Some(command) = issued.first() {
                prop_assert!(in_flight.is_none(), "a second command while one is in flight");
                prop_assert!(armed, "a second command for one crossing");
                armed = false;
                in_flight = Some(command.command_id.clone());
                charged_count += 1;
                charged_minor += 5000;
            }
            if max_per_day > 0 {
                prop_assert!(charged_count <= max_per_day, "daily cap exceeded");
            }
            if let Some(units) = max_month_units {
                prop_assert!(charged_minor <= units * 5000, "monthly cap exceeded");
            }
            let cap_room = (max_per_day == 0 || charged_count < max_per_day)
                && max_month_units.is_none_or(|u| charged_minor + 5000 <= u * 5000);
            if crossing && active && in_flight.is_none() && cap_room {
                prop_assert!(false, "a crossing with room under the caps got no command");
            }
        }
    }
}

#[test]
fn the_record_that_issued_a_top_up_read_again_issues_the_same_command_and_nothing_else_does() {
    let (mut state, effects) = run(vec![rule_event(&wire_rule(wire::RuleState::Active))]);
    assert!(commands(&effects).is_empty());
    let low = balance(800, 2);
    let (mut after, effects) =
        decide(state.clone(), low.clone(), "t/0/7", NOW, &Settings::default()).unwrap();
    let issued = commands(&effects)[0].clone();
    let at = InputRecord { topic: topup_proto::topics::BALANCE, offset: 7 };
    // The processor marks the record that issued it.
    if let Some(flight) = after.in_flight.as_mut() {
        flight.issued_by = Some(at);
    }
    let again = reissue(&after, at, &low, NOW).expect("the issuing record reissues");
    let again = commands(&again);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].command_id, issued.command_id);
    assert_eq!(again[0].idempotency_key, issued.idempotency_key);
    assert_eq!(again[0].amount, issued.amount);
    // The carrier sending the same balance again is another record: nothing is reissued.
    assert!(reissue(&after, InputRecord { offset: 8, ..at }, &low, NOW).is_none());
    assert!(reissue(&after, InputRecord { topic: "topup.rules.v1", ..at }, &low, NOW).is_none());
    // Nothing in flight, nothing to reissue.
    state.in_flight = None;
    assert!(reissue(&state, at, &low, NOW).is_none());
}

/// Midnight UTC of a date.
fn at(year: i64, month: u32, day: u32) -> Timestamp {
    Timestamp {
        seconds: topup_domain::calendar::days_from_civil(year, month, day) * 86_400,
        nanos: 0,
    }
}

fn monthly_rule(day_of_month: u32, expires: &str) -> wire::AutoTopUpRule {
    let mut raw = wire_rule(wire::RuleState::Active);
    raw.monthly = Some(wire::MonthlyTopUp { day_of_month, amount: Some(cny(3000)) });
    raw.payment_methods[0].expires = expires.into();
    raw
}

fn with_rule(raw: &wire::AutoTopUpRule, when: Timestamp) -> SubscriberState {
    decide(SubscriberState::new(sub()), rule_event(raw), "t/0/0", when, &Settings::default())
        .unwrap()
        .0
}

#[test]
fn a_monthly_top_up_comes_on_its_day_once_a_month() {
    let state = with_rule(&monthly_rule(15, ""), at(2026, 3, 1));
    // Before the day: nothing.
    let (state, effects) = on_day(state, at(2026, 3, 14));
    assert!(commands(&effects).is_empty());
    // On the day: one command of the monthly amount, a monthly trigger and a period id.
    let (state, effects) = on_day(state, at(2026, 3, 15));
    let issued = commands(&effects);
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].amount, Some(cny(3000)));
    assert_eq!(issued[0].trigger, wire::TopUpTrigger::Monthly as i32);
    assert_eq!(issued[0].command_id, topup_domain::monthly_command_id(&sub(), "2026-03"));
    let first_id = issued[0].command_id.clone();
    // Asked again the same month (another tick, a restart that restored this state): nothing.
    let (state, effects) = on_day(state, at(2026, 3, 15));
    assert!(commands(&effects).is_empty());
    let (state, effects) = on_day(state, at(2026, 3, 31));
    assert!(commands(&effects).is_empty());
    // Next month, a new id.
    let (_, effects) = on_day(state, at(2026, 4, 20));
    assert_eq!(commands(&effects).len(), 1);
    assert_ne!(commands(&effects)[0].command_id, first_id);
}

#[test]
fn a_monthly_day_past_the_months_end_falls_on_its_last_day() {
    let state = with_rule(&monthly_rule(31, ""), at(2026, 2, 1));
    let (state, effects) = on_day(state, at(2026, 2, 27));
    assert!(commands(&effects).is_empty());
    let (_, effects) = on_day(state, at(2026, 2, 28));
    assert_eq!(commands(&effects).len(), 1, "February 2026 has 28 days");
}

#[test]
fn a_rule_switched_on_after_the_day_waits_for_next_month_and_paused_rules_never_charge() {
    let state = with_rule(&monthly_rule(5, ""), at(2026, 3, 20));
    let (state, effects) = on_day(state, at(2026, 3, 20));
    assert!(commands(&effects).is_empty(), "the 5th has passed");
    let (_, effects) = on_day(state, at(2026, 4, 5));
    assert_eq!(commands(&effects).len(), 1);
    let mut paused = monthly_rule(5, "");
    paused.state = wire::RuleState::Paused as i32;
    let (_, effects) = on_day(with_rule(&paused, at(2026, 3, 1)), at(2026, 3, 5));
    assert!(commands(&effects).is_empty());
}

#[test]
fn a_payment_method_about_to_expire_is_reminded_of_once() {
    let reminders = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::Notify(n) if n.kind == NotificationKind::PaymentMethodExpiring as i32))
            .count()
    };
    let state = with_rule(&monthly_rule(28, "2026-06"), at(2026, 3, 1));
    // More than 30 days before the end of June: nothing.
    let (state, effects) = on_day(state, at(2026, 5, 31));
    assert_eq!(reminders(&effects), 0);
    // June 1st: the card expires this month.
    let (state, effects) = on_day(state, at(2026, 6, 1));
    assert_eq!(reminders(&effects), 1);
    let Some(Effect::Notify(n)) = effects.iter().find(|e| matches!(e, Effect::Notify(_))) else {
        panic!("no reminder")
    };
    assert_eq!(n.parameters.get("expires").map(String::as_str), Some("2026-06"));
    // Once.
    let (state, effects) = on_day(state, at(2026, 6, 10));
    assert_eq!(reminders(&effects), 0);
    // Expired: no reminder (the payment worker skips it and says so).
    let (_, effects) = on_day(state, at(2026, 7, 2));
    assert_eq!(reminders(&effects), 0);
}

#[test]
fn pausing_and_resuming_after_a_top_up_does_not_charge_again_on_the_old_balance() {
    let active = wire_rule(wire::RuleState::Active);
    let (state, effects) = run(vec![rule_event(&active), balance(850, 1)]);
    let id = commands(&effects)[0].command_id.clone();
    let mut paused = active.clone();
    paused.state = wire::RuleState::Paused as i32;
    // Paid; the carrier has not reported the credited balance yet; pause and resume.
    let (state, effects) =
        run_from(state, vec![outcome(&id, true), rule_event(&paused), rule_event(&active)]);
    assert!(commands(&effects).is_empty(), "850 is from before the top-up");
    // The credited balance, then a new drop: a new top-up.
    let (_, effects) = run_from(state, vec![balance(5850, 2), balance(700, 3)]);
    assert_eq!(commands(&effects).len(), 1);
}

#[test]
fn a_top_up_left_without_a_result_is_issued_again_under_its_id_until_it_ends() {
    let settings = Settings { reissue_after_secs: 900, ..Settings::default() };
    let later = |secs: i64| Timestamp { seconds: NOW.seconds + secs, nanos: 0 };
    let (state, effects) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(1500, 1),
        balance(500, 2),
    ]);
    let issued = commands(&effects)[0].clone();

    // Not yet due: nothing.
    let (state, again) = reissue_overdue(state, later(899), &settings);
    assert!(again.is_none());
    // Due: the same command (id, key, amount, cause), and the wait starts again.
    let (state, again) = reissue_overdue(state, later(900), &settings);
    let again = again.expect("issued again");
    assert_eq!(
        (&again.command_id, &again.idempotency_key, &again.amount, again.cause_sequence),
        (&issued.command_id, &issued.idempotency_key, &issued.amount, issued.cause_sequence)
    );
    let (state, twice) = reissue_overdue(state, later(1000), &settings);
    assert!(twice.is_none(), "not again before another period");
    // Its result ends it: nothing more, whenever.
    let (state, _) = run_from(state, vec![outcome(&issued.command_id, true)]);
    assert!(reissue_overdue(state.clone(), later(100_000), &settings).1.is_none());
    // Switched off: never.
    let (state, _) = run(vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(500, 1)]);
    let off = Settings { reissue_after_secs: 0, ..Settings::default() };
    assert!(reissue_overdue(state, later(100_000), &off).1.is_none());
}

#[test]
fn reissues_stop_after_a_few_and_wait_for_an_active_rule_and_a_known_issue_time() {
    let settings = Settings { reissue_after_secs: 60, ..Settings::default() };
    let later = |secs: i64| Timestamp { seconds: NOW.seconds + secs, nanos: 0 };
    let (mut state, _) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(1500, 1),
        balance(500, 2),
    ]);
    let mut reissued = 0;
    for minute in 1..=10 {
        let (next, again) = reissue_overdue(state, later(minute * 60), &settings);
        state = next;
        reissued += usize::from(again.is_some());
    }
    assert_eq!(reissued, MAX_REISSUES as usize, "a gateway forgets keys: a few times only");

    // A paused rule: not while paused.
    let (state, _) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(500, 1),
        rule_event(&wire_rule(wire::RuleState::Paused)),
    ]);
    assert!(state.in_flight.is_some());
    assert!(reissue_overdue(state, later(100_000), &settings).1.is_none());

    // A state from before issue times were kept: the wait starts now.
    let (mut state, _) =
        run(vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(500, 1)]);
    if let Some(flight) = state.in_flight.as_mut() {
        flight.issued_at = 0;
    }
    let (state, again) = reissue_overdue(state, later(100_000), &settings);
    assert!(again.is_none());
    assert_eq!(state.in_flight.as_ref().map(|f| f.issued_at), Some(later(100_000).seconds));
    assert!(reissue_overdue(state, later(100_060), &settings).1.is_some());
}

#[test]
fn a_top_up_needing_reconciliation_stays_in_flight_keeps_its_caps_and_is_never_reissued() {
    let settings = Settings { reissue_after_secs: 60, ..Settings::default() };
    let later = |secs: i64| Timestamp { seconds: NOW.seconds + secs, nanos: 0 };
    let mut raw = wire_rule(wire::RuleState::Active);
    raw.max_topups_per_day = 1;
    let (state, effects) = run(vec![rule_event(&raw), balance(1500, 1), balance(500, 2)]);
    let id = commands(&effects)[0].command_id.clone();
    let (state, effects) =
        run_from(state, vec![outcome_with(&id, OutcomeStatus::Unresolved), balance(400, 3)]);
    assert!(commands(&effects).is_empty(), "one top-up in flight, and it may have been charged");
    assert!(state.in_flight.as_ref().is_some_and(|f| f.awaiting_reconciliation));
    assert_eq!(state.caps.topups_today, 1, "the cap is kept: money may have moved");
    assert!(reissue_overdue(state.clone(), later(100_000), &settings).1.is_none());
    // The operator's settlement: refused after all. Caps given back, the top-up closed.
    let (settled, _) = run_from(state.clone(), vec![outcome(&id, false)]);
    assert!(settled.in_flight.is_none());
    assert_eq!(settled.caps.topups_today, 0);
    // Or charged after all: closed, caps kept.
    let (settled, _) = run_from(state, vec![outcome(&id, true)]);
    assert!(settled.in_flight.is_none());
    assert_eq!(settled.caps.topups_today, 1);
}

#[test]
fn a_reissued_command_carries_the_original_methods_and_rule_version_after_a_rule_change() {
    let settings = Settings { reissue_after_secs: 60, ..Settings::default() };
    let later = |secs: i64| Timestamp { seconds: NOW.seconds + secs, nanos: 0 };
    let (mut state, _) = run(vec![rule_event(&wire_rule(wire::RuleState::Active))]);
    state.rule_version = 7;
    let (state, effects) = run_from(state, vec![balance(1500, 1), balance(500, 2)]);
    let issued = commands(&effects)[0].clone();
    assert_eq!(issued.rule_version, 7);
    assert!(issued.payment_methods.iter().all(|m| m.method_id.starts_with("pm-")));
    // The subscriber adds a card in front of the old one.
    let mut changed = wire_rule(wire::RuleState::Active);
    changed.payment_methods.insert(
        0,
        wire::PaymentMethod {
            token: "tok_new_card".into(),
            kind: wire::PaymentMethodKind::Card as i32,
            ..Default::default()
        },
    );
    let (mut state, _) = run_from(state, vec![rule_event(&changed)]);
    state.rule_version = 9;
    let (_, again) = reissue_overdue(state, later(60), &settings);
    let again = again.expect("issued again");
    assert_eq!(again.payment_methods, issued.payment_methods, "exactly the original methods");
    assert_eq!(again.rule_version, 7);
    assert_eq!(again.idempotency_key, issued.idempotency_key);
}

#[test]
fn a_charged_top_up_the_carrier_does_not_credit_is_raised_once() {
    let settings = Settings::default();
    let later = |secs: i64| Timestamp { seconds: NOW.seconds + secs, nanos: 0 };
    let (state, effects) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(1500, 1),
        balance(500, 2),
    ]);
    let id = commands(&effects)[0].command_id.clone();
    let (state, _) = run_from(state, vec![outcome(&id, true)]);
    assert!(state.credit_watch.is_some());
    // Usage, but no credit: still watched.
    let (state, _) = run_from(state, vec![balance(450, 3)]);
    let (state, early) = credit_overdue(state, later(settings.credit_deadline_secs - 1));
    assert!(early.is_none());
    let (state, notice) = credit_overdue(state, later(settings.credit_deadline_secs));
    let notice = notice.expect("raised");
    assert_eq!(notice.kind, NotificationKind::TopUpNotCredited as i32);
    assert_eq!(notice.command_id, id);
    assert!(credit_overdue(state.clone(), later(100_000)).1.is_none(), "once");

    // A credit seen in time ends the watch: by the amount, or by the carrier's word.
    let (state, effects) = run(vec![
        rule_event(&wire_rule(wire::RuleState::Active)),
        balance(1500, 1),
        balance(500, 2),
    ]);
    let id = commands(&effects)[0].command_id.clone();
    let (credited, _) = run_from(state.clone(), vec![outcome(&id, true), balance(5500, 3)]);
    assert!(credited.credit_watch.is_none());
    let (mut acknowledged, _) = run_from(state, vec![outcome(&id, true)]);
    let ack = Event::Balance(BalanceObservation {
        subscriber: sub(),
        carrier_id: "c".into(),
        balance: Money::new(Currency::parse("CNY").unwrap(), 300),
        sequence: 3,
        observed_at: None,
        event_id: String::new(),
        credited_command_ids: vec![id],
    });
    (acknowledged, _) = run_from(acknowledged, vec![ack]);
    assert!(acknowledged.credit_watch.is_none());
}

/// A subscriber looked at only when `next_due` says gets exactly what looking at it every
/// day gives (monthly top-ups, expiry reminders), and every look finds work: the tick
/// needs no scan of every subscriber.
#[test]
fn looking_only_when_due_gives_what_looking_every_day_gives() {
    let settings = Settings::default();
    let cases = [
        (monthly_rule(15, "2026-06"), at(2026, 3, 1)),
        (monthly_rule(31, "2027-02"), at(2026, 1, 20)),
        (monthly_rule(5, ""), at(2026, 3, 20)),
        (wire_rule(wire::RuleState::Paused), at(2026, 3, 20)),
    ];
    for (raw, start) in cases {
        let mut raw = raw;
        if raw.monthly.is_none() {
            raw.payment_methods[0].expires = "2026-05".into();
        }
        let (mut daily, mut indexed) = (with_rule(&raw, start), with_rule(&raw, start));
        let (mut every_day, mut when_due, mut idle_looks) = (Vec::new(), Vec::new(), 0);
        for n in 0..500 {
            let now = Timestamp { seconds: start.seconds + n * 86_400 + 3_600, nanos: 0 };
            let (after, effects) = on_day(daily, now);
            daily = after;
            if !effects.is_empty() {
                every_day.push((n, effects.len()));
            }
            if next_due(&indexed, now, &settings).is_some_and(|due| due <= now.seconds) {
                let (after, effects) = on_day(indexed, now);
                indexed = after;
                if effects.is_empty() {
                    idle_looks += 1;
                } else {
                    when_due.push((n, effects.len()));
                }
            }
        }
        assert!(!every_day.is_empty(), "{raw:?}: the case has work");
        assert_eq!(when_due, every_day, "{raw:?}");
        assert_eq!(idle_looks, 0, "{raw:?}");
    }
}

#[test]
fn a_top_up_in_flight_and_a_watched_credit_come_due_when_they_are_overdue() {
    let settings = Settings { reissue_after_secs: 600, ..Settings::default() };
    let (mut state, _) =
        run(vec![rule_event(&wire_rule(wire::RuleState::Active)), balance(850, 1)]);
    let issued = state.in_flight.as_ref().map(|f| f.issued_at).unwrap_or_default();
    assert!(issued > 0);
    assert_eq!(next_due(&state, NOW, &settings), Some(issued + 600));
    // Reissued as often as allowed: nothing more comes due.
    if let Some(flight) = state.in_flight.as_mut() {
        flight.reissued = MAX_REISSUES;
    }
    assert_eq!(next_due(&state, NOW, &settings), None);
    state.credit_watch = Some(Box::new(CreditWatch {
        command_id: "c".into(),
        amount: Money::new(Currency::parse("CNY").unwrap(), 5000),
        balance_before_minor: 850,
        due: 1_790_000_900,
        raised: false,
    }));
    assert_eq!(next_due(&state, NOW, &settings), Some(1_790_000_900));
    if let Some(watch) = state.credit_watch.as_mut() {
        watch.raised = true;
    }
    assert_eq!(next_due(&state, NOW, &settings), None);
}

/// Applies `events` at the given times (seconds after `NOW`) to `state`.
fn run_at(mut state: SubscriberState, events: Vec<(i64, Event)>) -> (SubscriberState, Vec<Effect>) {
    let mut all = Vec::new();
    for (i, (at, event)) in events.into_iter().enumerate() {
        let now = Timestamp { seconds: NOW.seconds + at, nanos: 0 };
        let (next, effects) =
            decide(state, event, &format!("t/0/{i}"), now, &Settings::default()).unwrap();
        state = next;
        all.extend(effects);
    }
    (state, all)
}

fn balance_observed(minor: i64, sequence: u64, observed_secs: i64) -> Event {
    let Event::Balance(mut observation) = balance(minor, sequence) else { unreachable!() };
    observation.observed_at = Some(Timestamp { seconds: NOW.seconds + observed_secs, nanos: 0 });
    Event::Balance(observation)
}

#[test]
fn a_record_stamped_before_midnight_after_one_stamped_after_it_does_not_reopen_the_day() {
    let mut raw = wire_rule(wire::RuleState::Active);
    raw.max_topups_per_day = 1;
    // NOW's day starts at `midnight` (seconds after NOW, negative or zero).
    let midnight = -NOW.seconds.rem_euclid(86_400);
    let (state, effects) = run_at(
        SubscriberState::new(sub()),
        vec![(midnight + 60, rule_event(&raw)), (midnight + 60, balance(900, 1))],
    );
    let id = commands(&effects)[0].command_id.clone();
    // The top-up succeeds; then a producer whose clock is two minutes behind stamps its
    // records in the day before.
    let (state, effects) = run_at(
        state,
        vec![
            (midnight + 70, outcome(&id, true)),
            (midnight - 60, balance(5900, 2)),
            (midnight - 50, balance(900, 3)),
        ],
    );
    assert!(commands(&effects).is_empty(), "the day's cap holds: {effects:?}");
    assert_eq!(state.caps.topups_today, 1);
    assert_eq!(state.caps.day, (NOW.seconds + midnight).div_euclid(86_400));
    // A window saved far ahead (by a state written before record times were capped) does
    // not stay shut for ever: the next day's crossing is topped up, in that day's window.
    let mut stuck = state.clone();
    stuck.caps.day += 10_000;
    let (stuck, effects) = run_at(
        stuck,
        vec![(midnight + 86_400, balance(5900, 4)), (midnight + 86_400, balance(900, 5))],
    );
    assert_eq!(commands(&effects).len(), 1, "{effects:?}");
    assert_eq!(stuck.caps.day, state.caps.day + 1);
    // The next real day opens the next window.
    let (_, effects) = run_at(
        state,
        vec![(midnight + 86_400, balance(5900, 4)), (midnight + 86_400, balance(900, 5))],
    );
    assert_eq!(commands(&effects).len(), 1, "a new day, a new top-up");
}

#[test]
fn an_absurd_sequence_does_not_silence_the_subscriber_for_ever() {
    let rule = rule_event(&wire_rule(wire::RuleState::Active));
    let (state, _) = run_at(
        SubscriberState::new(sub()),
        vec![
            (0, rule),
            (0, balance_observed(5000, 1, 0)),
            (0, balance_observed(5000, u64::MAX, 10)),
        ],
    );
    // Minutes later a lower sequence is still taken as stale (carriers resend and reorder)...
    let (state, effects) = run_at(state, vec![(600, balance_observed(900, 2, 600))]);
    assert!(commands(&effects).is_empty(), "a reordered record within minutes is stale");
    assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(u64::MAX));
    // ...but a balance observed an hour after the last one is new: the counter started again.
    let later = SEQUENCE_RESTART_SECS + 10;
    let (state, effects) = run_at(state, vec![(later, balance_observed(900, 3, later))]);
    assert_eq!(commands(&effects).len(), 1, "the low balance is topped up");
    assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(3));
    // And from there on, its own order holds again.
    let (state, effects) = run_at(state, vec![(later + 5, balance_observed(400, 2, later - 20))]);
    assert!(effects.is_empty());
    assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(3));
    // A record from before the restart, arriving late with its higher sequence, is stale.
    let (state, effects) = run_at(state, vec![(later + 10, balance_observed(100, 9, 5))]);
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(state.balance.as_ref().map(|b| b.sequence), Some(3));
}
