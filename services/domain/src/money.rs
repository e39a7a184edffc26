//! Money in minor units of an ISO 4217 currency. Never a float.
use std::fmt;

use topup_proto::v1 as wire;

use crate::{Invalid, ValidationError};

/// An ISO 4217 alphabetic currency code, upper case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// Currencies whose minor unit is not 1/100 (ISO 4217 exponent). All others use 2.
const EXPONENTS: &[(&str, u32)] = &[
    ("BHD", 3),
    ("CLP", 0),
    ("IQD", 3),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("PYG", 0),
    ("TND", 3),
    ("UGX", 0),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
];

impl Currency {
    /// Parses a three-letter upper-case code.
    pub fn parse(code: &str) -> Invalid<Self> {
        match code.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|ch| ch.is_ascii_uppercase()) => {
                Ok(Self([*a, *b, *c]))
            }
            _ => Err(ValidationError::new(
                "currency",
                format!("{code:?} is not an ISO 4217 code (three upper-case letters)"),
            )),
        }
    }

    /// The code as text.
    pub fn code(&self) -> &str {
        // The bytes were checked to be ASCII upper-case letters in `parse`.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point (2 for CNY, 0 for JPY, 3 for KWD).
    pub fn exponent(&self) -> u32 {
        EXPONENTS.iter().find(|(code, _)| *code == self.code()).map_or(2, |(_, e)| *e)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount in minor units of a currency. May be negative (a balance in debt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    /// The currency.
    pub currency: Currency,
    /// Minor units (fen, cents).
    pub minor: i64,
}

impl Money {
    /// A new amount.
    pub fn new(currency: Currency, minor: i64) -> Self {
        Self { currency, minor }
    }

    /// `self - other`, or `None` when the currencies differ or it overflows.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        (self.currency == other.currency)
            .then(|| self.minor.checked_sub(other.minor))
            .flatten()
            .map(|minor| Money::new(self.currency, minor))
    }

    /// `self + other`, or `None` when the currencies differ or it overflows.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        (self.currency == other.currency)
            .then(|| self.minor.checked_add(other.minor))
            .flatten()
            .map(|minor| Money::new(self.currency, minor))
    }

    /// The amount as a plain decimal string in major units: `10.50`, `-0.05`, `500`.
    pub fn decimal(&self) -> String {
        let exp = self.currency.exponent();
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if exp == 0 {
            return format!("{sign}{abs}");
        }
        let unit = 10u64.pow(exp);
        format!("{sign}{}.{:0width$}", abs / unit, abs % unit, width = exp as usize)
    }

    /// Converts to the wire type.
    pub fn to_wire(self) -> wire::Money {
        wire::Money { currency: self.currency.code().to_string(), amount_minor: self.minor }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.decimal(), self.currency)
    }
}

impl TryFrom<&wire::Money> for Money {
    type Error = ValidationError;

    fn try_from(value: &wire::Money) -> Invalid<Self> {
        Ok(Money::new(Currency::parse(&value.currency)?, value.amount_minor))
    }
}

/// Converts a required wire `Money` field, naming the field on error.
pub(crate) fn required_money(value: Option<&wire::Money>, field: &str) -> Invalid<Money> {
    let money = value.ok_or_else(|| ValidationError::new(field, "is required"))?;
    Money::try_from(money).map_err(|e| e.within(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cny(minor: i64) -> Money {
        Money::new(Currency::parse("CNY").unwrap(), minor)
    }

    #[test]
    fn formats_minor_units_by_the_currency_exponent() {
        assert_eq!(cny(1050).to_string(), "10.50 CNY");
        assert_eq!(cny(-5).decimal(), "-0.05");
        assert_eq!(Money::new(Currency::parse("JPY").unwrap(), 500).decimal(), "500");
        assert_eq!(Money::new(Currency::parse("KWD").unwrap(), 1234).decimal(), "1.234");
        assert_eq!(cny(i64::MIN).decimal(), "-92233720368547758.08");
    }

    #[test]
    fn refuses_codes_that_are_not_iso_4217_shaped() {
        for bad in ["", "cny", "RMB1", "¥", "CN"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arithmetic_refuses_mixed_currencies_and_overflow() {
        let eur = Money::new(Currency::parse("EUR").unwrap(), 1);
        assert_eq!(cny(1).checked_add(eur), None);
        assert_eq!(cny(i64::MAX).checked_add(cny(1)), None);
        assert_eq!(cny(100).checked_sub(cny(30)), Some(cny(70)));
    }
}
