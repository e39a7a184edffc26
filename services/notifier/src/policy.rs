//! Whether, and when, a notification goes out: de-duplication by id, rate limits per
//! subscriber and kind, quiet hours in the time zone of the subscriber's locale, and the
//! retry schedule of failed deliveries. Pure: the time is a parameter, nothing here does
//! I/O, so the rules are tested with any clock.
use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use topup_kafka::{system_time, timestamp_of};
use topup_proto::notifier::v1::{Handled, SubscriberDeliveries};
use topup_proto::v1::{NotificationCommand, NotificationKind};

/// Local hours during which non-urgent notifications are held, e.g. 22:00–08:00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Start, local time.
    pub start: NaiveTime,
    /// End, local time (the next day when before `start`).
    pub end: NaiveTime,
}

impl FromStr for QuietHours {
    type Err = String;

    /// `22:00-08:00`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?}: expected HH:MM-HH:MM, e.g. 22:00-08:00"))?;
        let parse = |t: &str| {
            NaiveTime::parse_from_str(t.trim(), "%H:%M")
                .map_err(|e| format!("{t:?} is not a time HH:MM: {e}"))
        };
        Ok(Self { start: parse(start)?, end: parse(end)? })
    }
}

impl QuietHours {
    /// When quiet hours end, if `now` falls within them in `zone`.
    pub fn until(&self, zone: Tz, now: SystemTime) -> Option<SystemTime> {
        let local = DateTime::<Utc>::from(now).with_timezone(&zone);
        let time = local.time();
        let inside = if self.start <= self.end {
            time >= self.start && time < self.end
        } else {
            time >= self.start || time < self.end
        };
        if !inside {
            return None;
        }
        let mut day = local.date_naive();
        if time >= self.end && self.start > self.end {
            day = day.succ_opt()?;
        }
        // The end in local time; a gap (DST) takes the next valid instant.
        let end = zone
            .from_local_datetime(&day.and_time(self.end))
            .earliest()
            .or_else(|| zone.from_local_datetime(&day.and_time(self.end)).latest())?;
        Some(SystemTime::from(end.with_timezone(&Utc)))
    }
}

/// The `QUIET_HOURS` setting: hours, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHoursSetting(pub Option<QuietHours>);

impl FromStr for QuietHoursSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        text.parse().map(|hours| Self(Some(hours)))
    }
}

/// The `NOTIFIER_RATE_LIMITS` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits(pub HashMap<NotificationKind, RateLimit>);

impl FromStr for RateLimits {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_rate_limits(text).map(Self)
    }
}

/// The time zone quiet hours are read in, from the locale's region (then its language).
/// A rule carries a locale, not a time zone; this is the best guess, and it is documented.
pub fn time_zone(locale: &str) -> Tz {
    let normalized = locale.replace('_', "-");
    let mut parts = normalized.split('-');
    let language = parts.next().unwrap_or_default().to_ascii_lowercase();
    let region = parts.find(|p| p.len() == 2).map(str::to_ascii_uppercase).unwrap_or_default();
    match (language.as_str(), region.as_str()) {
        (_, "CN") => Tz::Asia__Shanghai,
        (_, "HK") => Tz::Asia__Hong_Kong,
        (_, "TW") => Tz::Asia__Taipei,
        (_, "MO") => Tz::Asia__Macau,
        (_, "SG") => Tz::Asia__Singapore,
        (_, "JP") => Tz::Asia__Tokyo,
        (_, "KR") => Tz::Asia__Seoul,
        (_, "IN") => Tz::Asia__Kolkata,
        (_, "GB") => Tz::Europe__London,
        (_, "DE") => Tz::Europe__Berlin,
        (_, "FR") => Tz::Europe__Paris,
        (_, "ES") => Tz::Europe__Madrid,
        (_, "IT") => Tz::Europe__Rome,
        (_, "US") => Tz::America__New_York,
        (_, "AU") => Tz::Australia__Sydney,
        ("zh", _) => Tz::Asia__Shanghai,
        ("ja", _) => Tz::Asia__Tokyo,
        ("ko", _) => Tz::Asia__Seoul,
        ("de", _) => Tz::Europe__Berlin,
        ("fr", _) => Tz::Europe__Paris,
        ("es", _) => Tz::Europe__Madrid,
        _ => Tz::UTC,
    }
}

/// At most `max` notifications of one kind per subscriber within `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// How many.
    pub max: u32,
    /// Within how long.
    pub per: Duration,
}

/// Parses `LOW_BALANCE=1/24h,CAP_REACHED=1/24h` (kinds by their proto name without the
/// prefix; periods in s, m, h or d).
pub fn parse_rate_limits(text: &str) -> Result<HashMap<NotificationKind, RateLimit>, String> {
    let mut limits = HashMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (kind, limit) =
            entry.split_once('=').ok_or_else(|| format!("{entry:?}: expected KIND=N/PERIOD"))?;
        let kind = NotificationKind::from_str_name(&format!(
            "NOTIFICATION_KIND_{}",
            kind.trim().to_ascii_uppercase()
        ))
        .ok_or_else(|| format!("{kind:?} is not a notification kind (e.g. LOW_BALANCE)"))?;
        let (max, per) =
            limit.split_once('/').ok_or_else(|| format!("{limit:?}: expected N/PERIOD"))?;
        let max: u32 = max.trim().parse().map_err(|e| format!("{max:?}: {e}"))?;
        let per = per.trim();
        let (number, unit) = per.split_at(per.len().saturating_sub(1));
        let number: u64 = number.parse().map_err(|e| format!("{per:?}: {e}"))?;
        let seconds = match unit {
            "s" => number,
            "m" => number * 60,
            "h" => number * 3600,
            "d" => number * 86_400,
            _ => return Err(format!("{per:?}: the period ends in s, m, h or d")),
        };
        limits.insert(kind, RateLimit { max, per: Duration::from_secs(seconds) });
    }
    Ok(limits)
}

/// Retry schedule for transient channel failures.
#[derive(Debug, Clone, Copy)]
pub struct RetrySchedule {
    /// Attempts per channel, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub initial_backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl RetrySchedule {
    /// The wait after `attempts` attempts.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(20);
        self.initial_backoff.saturating_mul(1 << doublings).min(self.max_backoff)
    }
}

/// Everything that decides whether and when a notification goes out.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Rate limits per kind; kinds without one are not limited. Urgent ones never are.
    pub rate_limits: HashMap<NotificationKind, RateLimit>,
    /// Quiet hours for non-urgent kinds; `None` = always send.
    pub quiet_hours: Option<QuietHours>,
    /// Failed deliveries.
    pub retry: RetrySchedule,
    /// How long a notification id is remembered to drop replays.
    pub dedup_window: Duration,
    /// Most ids remembered per subscriber (the oldest go first).
    pub max_remembered: usize,
}

/// What to do with a new notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Deliver now.
    Deliver,
    /// Already handled: never twice.
    Duplicate,
    /// Over a rate limit: dropped, with the reason.
    RateLimited(String),
    /// Held over quiet hours until then (and where).
    Deferred { until: SystemTime, zone: Tz },
}

impl Policy {
    /// Decides about `notification` for a subscriber whose history is `state`, at `now`.
    pub fn admit(
        &self,
        state: &SubscriberDeliveries,
        notification: &NotificationCommand,
        now: SystemTime,
    ) -> Admission {
        let id = notification.notification_id.as_str();
        let seen = state.handled.iter().any(|h| h.notification_id == id)
            || state
                .pending
                .iter()
                .any(|p| p.notification.as_ref().is_some_and(|n| n.notification_id == id));
        if seen {
            return Admission::Duplicate;
        }
        if notification.urgent {
            return Admission::Deliver;
        }
        let kind =
            NotificationKind::try_from(notification.kind).unwrap_or(NotificationKind::Unspecified);
        if let Some(limit) = self.rate_limits.get(&kind) {
            let since = now.checked_sub(limit.per).unwrap_or(SystemTime::UNIX_EPOCH);
            let recent = state
                .handled
                .iter()
                .filter(|h| h.kind == notification.kind && h.let_through)
                .filter(|h| h.at.as_ref().is_some_and(|at| system_time(at) > since))
                .count();
            if recent >= limit.max as usize {
                return Admission::RateLimited(format!(
                    "rate limited: at most {} {} per {:?}",
                    limit.max,
                    kind.as_str_name().trim_start_matches("NOTIFICATION_KIND_"),
                    limit.per
                ));
            }
        }
        if let Some(quiet) = self.quiet_hours {
            let zone = time_zone(&notification.locale);
            if let Some(until) = quiet.until(zone, now) {
                return Admission::Deferred { until, zone };
            }
        }
        Admission::Deliver
    }

    /// Remembers that `notification` was handled at `now` (let through or suppressed), and
    /// forgets what fell out of the window.
    pub fn remember(
        &self,
        state: &mut SubscriberDeliveries,
        notification: &NotificationCommand,
        let_through: bool,
        now: SystemTime,
    ) {
        state.handled.push(Handled {
            notification_id: notification.notification_id.clone(),
            kind: notification.kind,
            at: Some(timestamp_of(now)),
            let_through,
        });
        self.prune(state, now);
    }

    /// Drops ids older than the de-duplication window (or beyond the count). Rate-limit
    /// periods longer than the window are cut to it.
    pub fn prune(&self, state: &mut SubscriberDeliveries, now: SystemTime) {
        let since = now.checked_sub(self.dedup_window).unwrap_or(SystemTime::UNIX_EPOCH);
        state.handled.retain(|h| h.at.as_ref().is_some_and(|at| system_time(at) > since));
        let excess = state.handled.len().saturating_sub(self.max_remembered);
        state.handled.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(DateTime::parse_from_rfc3339(rfc3339).unwrap())
    }

    fn policy() -> Policy {
        Policy {
            rate_limits: parse_rate_limits("LOW_BALANCE=1/24h").unwrap(),
            quiet_hours: Some("22:00-08:00".parse().unwrap()),
            retry: RetrySchedule {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
            },
            dedup_window: Duration::from_secs(72 * 3600),
            max_remembered: 100,
        }
    }

    fn low_balance(id: &str, locale: &str) -> NotificationCommand {
        NotificationCommand {
            notification_id: id.into(),
            kind: NotificationKind::LowBalance as i32,
            locale: locale.into(),
            ..Default::default()
        }
    }

    #[test]
    fn quiet_hours_are_read_in_the_locales_time_zone() {
        let p = policy();
        // 15:30 UTC is 23:30 in Shanghai: held until 08:00 Shanghai = 00:00 UTC.
        let now = at("2026-11-26T15:30:00Z");
        assert_eq!(
            p.admit(&SubscriberDeliveries::default(), &low_balance("a", "zh-CN"), now),
            Admission::Deferred { until: at("2026-11-27T00:00:00Z"), zone: Tz::Asia__Shanghai }
        );
        // The same instant is 15:30 in London: sent.
        assert_eq!(
            p.admit(&SubscriberDeliveries::default(), &low_balance("a", "en-GB"), now),
            Admission::Deliver
        );
        // 01:00 in Shanghai (17:00 UTC): held until 08:00 the same local day.
        assert_eq!(
            p.admit(
                &SubscriberDeliveries::default(),
                &low_balance("a", "zh-CN"),
                at("2026-11-26T17:00:00Z")
            ),
            Admission::Deferred { until: at("2026-11-27T00:00:00Z"), zone: Tz::Asia__Shanghai }
        );
        // Urgent messages ignore quiet hours.
        let mut urgent = low_balance("b", "zh-CN");
        urgent.urgent = true;
        assert_eq!(p.admit(&SubscriberDeliveries::default(), &urgent, now), Admission::Deliver);
    }

    #[test]
    fn daylight_saving_is_respected() {
        let p = policy();
        // 22:30 in New York in summer is 02:30 UTC, in winter 03:30 UTC.
        let summer = p.admit(
            &SubscriberDeliveries::default(),
            &low_balance("a", "en-US"),
            at("2026-07-01T02:30:00Z"),
        );
        assert_eq!(
            summer,
            Admission::Deferred { until: at("2026-07-01T12:00:00Z"), zone: Tz::America__New_York }
        );
        let winter = p.admit(
            &SubscriberDeliveries::default(),
            &low_balance("a", "en-US"),
            at("2026-12-01T03:30:00Z"),
        );
        assert_eq!(
            winter,
            Admission::Deferred { until: at("2026-12-01T13:00:00Z"), zone: Tz::America__New_York }
        );
    }

    #[test]
    fn one_reminder_a_day_and_never_the_same_id_twice() {
        let mut p = policy();
        p.quiet_hours = None;
        let mut state = SubscriberDeliveries::default();
        let now = at("2026-11-26T10:00:00Z");
        assert_eq!(p.admit(&state, &low_balance("a", "en"), now), Admission::Deliver);
        p.remember(&mut state, &low_balance("a", "en"), true, now);
        assert_eq!(p.admit(&state, &low_balance("a", "en"), now), Admission::Duplicate);
        assert!(matches!(
            p.admit(&state, &low_balance("b", "en"), now + Duration::from_secs(3600)),
            Admission::RateLimited(_)
        ));
        // A day later the next reminder may go.
        let tomorrow = now + Duration::from_secs(24 * 3600 + 1);
        assert_eq!(p.admit(&state, &low_balance("c", "en"), tomorrow), Admission::Deliver);
        // Suppressed ones do not count towards the limit, but are remembered as ids.
        p.remember(&mut state, &low_balance("d", "en"), false, tomorrow);
        assert_eq!(p.admit(&state, &low_balance("d", "en"), tomorrow), Admission::Duplicate);
        assert_eq!(p.admit(&state, &low_balance("e", "en"), tomorrow), Admission::Deliver);
        // Ids fall out of the window.
        p.prune(&mut state, now + Duration::from_secs(73 * 3600));
        assert!(state.handled.iter().all(|h| h.notification_id != "a"));
    }

    #[test]
    fn settings_parse_and_refuse_with_a_reason() {
        assert!(parse_rate_limits("LOW_BALANCE=1/24h, cap_reached=2/7d").unwrap().len() == 2);
        assert!(parse_rate_limits("NOPE=1/1h").unwrap_err().contains("not a notification kind"));
        assert!(parse_rate_limits("LOW_BALANCE=1/24x").unwrap_err().contains("s, m, h or d"));
        assert!("22:00".parse::<QuietHours>().is_err());
        assert_eq!(time_zone("zh-HK"), Tz::Asia__Hong_Kong);
        assert_eq!(time_zone("zh"), Tz::Asia__Shanghai);
        assert_eq!(time_zone("en"), Tz::UTC);
        assert_eq!(
            RetrySchedule {
                max_attempts: 5,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5)
            }
            .backoff(4),
            Duration::from_secs(5)
        );
    }
}
