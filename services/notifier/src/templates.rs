//! Message templates per notification kind and locale, kept as files under
//! `services/notifier/templates/<locale>/` and compiled in. Fallback chain: the exact
//! locale (`zh-CN`), then any shipped locale of the same language (`zh-HK` → `zh-CN`),
//! then `en`. Amounts follow the requested locale's number format even when its text
//! falls back (`de-DE` reads English with `50,00 €`).
use std::collections::HashMap;

use topup_domain::Money;
use topup_proto::v1::{NotificationCommand, NotificationKind};

macro_rules! locale {
    ($dir:literal) => {
        Locale {
            tag: $dir,
            low_balance: include_str!(concat!("../templates/", $dir, "/low_balance.txt")),
            top_up_started: include_str!(concat!("../templates/", $dir, "/top_up_started.txt")),
            top_up_succeeded: include_str!(concat!("../templates/", $dir, "/top_up_succeeded.txt")),
            top_up_failed: include_str!(concat!("../templates/", $dir, "/top_up_failed.txt")),
            payment_method_problem: include_str!(concat!(
                "../templates/",
                $dir,
                "/payment_method_problem.txt"
            )),
            cap_reached: include_str!(concat!("../templates/", $dir, "/cap_reached.txt")),
            rule_activated: include_str!(concat!("../templates/", $dir, "/rule_activated.txt")),
            confirmation_code: include_str!(concat!(
                "../templates/",
                $dir,
                "/confirmation_code.txt"
            )),
            payment_method_expiring: include_str!(concat!(
                "../templates/",
                $dir,
                "/payment_method_expiring.txt"
            )),
            top_up_cancelled: include_str!(concat!("../templates/", $dir, "/top_up_cancelled.txt")),
            top_up_not_credited: include_str!(concat!(
                "../templates/",
                $dir,
                "/top_up_not_credited.txt"
            )),
            reasons: include_str!(concat!("../templates/", $dir, "/reasons.txt")),
            subjects: include_str!(concat!("../templates/", $dir, "/subjects.txt")),
        }
    };
}

struct Locale {
    tag: &'static str,
    low_balance: &'static str,
    top_up_started: &'static str,
    top_up_succeeded: &'static str,
    top_up_failed: &'static str,
    payment_method_problem: &'static str,
    cap_reached: &'static str,
    rule_activated: &'static str,
    confirmation_code: &'static str,
    payment_method_expiring: &'static str,
    top_up_cancelled: &'static str,
    top_up_not_credited: &'static str,
    reasons: &'static str,
    subjects: &'static str,
}

/// Shipped locales; the first is the last resort.
static LOCALES: &[Locale] = &[locale!("en"), locale!("zh-CN")];

/// Every shipped locale tag.
pub fn shipped_locales() -> Vec<&'static str> {
    LOCALES.iter().map(|l| l.tag).collect()
}

fn pick(requested: &str) -> &'static Locale {
    let language = requested.split(['-', '_']).next().unwrap_or_default();
    LOCALES
        .iter()
        .find(|l| l.tag.eq_ignore_ascii_case(requested))
        .or_else(|| {
            LOCALES.iter().find(|l| {
                l.tag.split('-').next().is_some_and(|lang| lang.eq_ignore_ascii_case(language))
            })
        })
        .unwrap_or(&LOCALES[0])
}

/// The value of `code` in a `key = text` file.
fn lookup(table: &str, code: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|line| line.split_once('='))
        .find(|(key, _)| key.trim() == code)
        .map(|(_, text)| text.trim().to_string())
}

fn reason_text(locale: &Locale, code: &str) -> String {
    lookup(locale.reasons, code).unwrap_or_else(|| code.to_string())
}

/// Languages that write `10,00 €` rather than `€10.00`.
const DECIMAL_COMMA: &[&str] = &["de", "fr", "es", "it", "pt", "nl", "ru", "pl", "tr", "id", "vi"];

/// Formats money for people in `locale`: `¥50.00`, `€10.00`, `US$5.00`, `10.00 KWD`; and
/// `10,00 €` where the locale's language writes a decimal comma.
pub fn format_money(money: &Money, locale: &str) -> String {
    let language = locale.split(['-', '_']).next().unwrap_or_default().to_ascii_lowercase();
    if DECIMAL_COMMA.contains(&language.as_str()) {
        let decimal = money.decimal().replace('.', ",");
        let symbol = match money.currency.code() {
            "EUR" => "€",
            "GBP" => "£",
            "CNY" | "JPY" => "¥",
            "USD" => "$",
            other => other,
        };
        return format!("{decimal} {symbol}");
    }
    let symbol = match money.currency.code() {
        "CNY" => "¥",
        "JPY" => "¥",
        "EUR" => "€",
        "GBP" => "£",
        "USD" => "US$",
        "HKD" => "HK$",
        _ => return money.to_string(),
    };
    let decimal = money.decimal();
    match decimal.strip_prefix('-') {
        Some(positive) => format!("-{symbol}{positive}"),
        None => format!("{symbol}{decimal}"),
    }
}

/// A rendered message and the locale actually used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Locale of the text.
    pub locale: &'static str,
    /// E-mail subject / push title.
    pub subject: String,
    /// The text.
    pub text: String,
}

/// Renders a notification in its locale (or the fallback).
pub fn render(notification: &NotificationCommand) -> Rendered {
    let locale = pick(&notification.locale);
    let kind =
        NotificationKind::try_from(notification.kind).unwrap_or(NotificationKind::Unspecified);
    let kind_name =
        kind.as_str_name().trim_start_matches("NOTIFICATION_KIND_").to_ascii_lowercase();
    let subject = lookup(locale.subjects, &kind_name)
        .or_else(|| lookup(LOCALES[0].subjects, &kind_name))
        .unwrap_or_default();
    let template = match kind {
        NotificationKind::LowBalance | NotificationKind::Unspecified => locale.low_balance,
        NotificationKind::TopUpStarted => locale.top_up_started,
        NotificationKind::TopUpSucceeded => locale.top_up_succeeded,
        NotificationKind::TopUpFailed => locale.top_up_failed,
        NotificationKind::PaymentMethodProblem => locale.payment_method_problem,
        NotificationKind::CapReached => locale.cap_reached,
        NotificationKind::RuleActivated => locale.rule_activated,
        NotificationKind::ConfirmationCode => locale.confirmation_code,
        NotificationKind::PaymentMethodExpiring => locale.payment_method_expiring,
        NotificationKind::TopUpCancelled => locale.top_up_cancelled,
        NotificationKind::TopUpNotCredited => locale.top_up_not_credited,
    };
    let mut values: HashMap<&str, String> = HashMap::new();
    for (name, money) in [
        ("amount", &notification.amount),
        ("balance", &notification.balance),
        ("threshold", &notification.threshold),
    ] {
        if let Some(m) = money.as_ref().and_then(|m| Money::try_from(m).ok()) {
            values.insert(name, format_money(&m, &notification.locale));
        }
    }
    for (key, value) in &notification.parameters {
        let text = match key.as_str() {
            "reason" | "cap" => reason_text(locale, value),
            _ => value.clone(),
        };
        values.insert(key.as_str(), text);
    }
    let mut text = template.trim_end().to_string();
    for (name, value) in values {
        text = text.replace(&format!("{{{name}}}"), &value);
    }
    Rendered { locale: locale.tag, subject, text }
}

#[cfg(test)]
mod tests {
    use topup_proto::v1::Money as WireMoney;

    use super::*;

    fn all_kinds() -> Vec<NotificationKind> {
        (1..=11).filter_map(|k| NotificationKind::try_from(k).ok()).collect()
    }

    fn sample(kind: NotificationKind, locale: &str) -> NotificationCommand {
        let cny = |minor| Some(WireMoney { currency: "CNY".into(), amount_minor: minor });
        NotificationCommand {
            kind: kind as i32,
            locale: locale.into(),
            amount: cny(5000),
            balance: cny(850),
            threshold: cny(1000),
            parameters: [
                ("reason".to_string(), "card_expired".to_string()),
                ("method".to_string(), "•••• 4242".to_string()),
                ("cap".to_string(), "max_topups_per_day".to_string()),
                ("code".to_string(), "123456".to_string()),
                ("minutes".to_string(), "10".to_string()),
                ("expires".to_string(), "2027-01".to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_kind_renders_in_every_shipped_locale_without_placeholders_left() {
        for locale in shipped_locales() {
            for kind in all_kinds() {
                let rendered = render(&sample(kind, locale));
                assert_eq!(rendered.locale, locale);
                assert!(!rendered.text.contains('{'), "{locale} {kind:?}: {}", rendered.text);
                assert!(!rendered.text.is_empty());
                assert!(!rendered.subject.is_empty(), "{locale} {kind:?} has no subject");
            }
        }
    }

    #[test]
    fn renders_chinese_with_yuan_and_translated_reasons() {
        let text = render(&sample(NotificationKind::TopUpFailed, "zh-CN")).text;
        assert_eq!(text, "自动充值 ¥50.00 失败：银行卡已过期。请更新您的支付方式，以免停机。");
    }

    #[test]
    fn amounts_follow_the_locales_number_format() {
        let eur = Money::new(topup_domain::Currency::parse("EUR").unwrap(), 1000);
        assert_eq!(format_money(&eur, "en"), "€10.00");
        assert_eq!(format_money(&eur, "de-DE"), "10,00 €");
        assert_eq!(format_money(&eur, "fr"), "10,00 €");
        let cny = Money::new(topup_domain::Currency::parse("CNY").unwrap(), 1050);
        assert_eq!(format_money(&cny, "zh-CN"), "¥10.50");
        // A German subscriber gets the English text (no German templates) with German numbers.
        let mut n = sample(NotificationKind::TopUpFailed, "de-DE");
        n.amount = Some(WireMoney { currency: "EUR".into(), amount_minor: 5000 });
        let rendered = render(&n);
        assert_eq!(rendered.locale, "en");
        assert!(rendered.text.contains("50,00 €"), "{}", rendered.text);
    }

    #[test]
    fn falls_back_by_language_then_to_english() {
        assert_eq!(render(&sample(NotificationKind::LowBalance, "zh-HK")).locale, "zh-CN");
        assert_eq!(render(&sample(NotificationKind::LowBalance, "fr-FR")).locale, "en");
        assert_eq!(render(&sample(NotificationKind::LowBalance, "")).locale, "en");
    }
}
