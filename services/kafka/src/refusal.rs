//! Why a record was not used. A refusal is a value with a class, not a sentence to parse:
//! its [`Refusal::class`] is the metric label and its text (the `Display`) the reason a
//! dead letter carries. A [`Refusal::Transient`] is different in kind: the record is fine,
//! something it needs is not available yet, and the pipeline processes it again.
use std::borrow::Cow;

use topup_domain::ValidationError;

/// Why a record was not used. Every variant but [`Refusal::Transient`] sends the record to
/// the dead-letter topic with [`Refusal`]'s text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The record has no value at all.
    #[error("record has no value")]
    NoValue,
    /// The value is larger than a service decodes.
    #[error("value is {size} bytes, larger than the {limit} bytes accepted")]
    TooLarge {
        /// Bytes in the value.
        size: usize,
        /// Most bytes accepted.
        limit: usize,
    },
    /// The value is not the protobuf message the topic carries.
    #[error("value is not a valid {message}: {detail}")]
    Undecodable {
        /// The message type expected.
        message: &'static str,
        /// What the decoder said.
        detail: String,
    },
    /// The record is not keyed by the subscriber it is about (co-partitioning needs it).
    #[error("{}", wrong_key_text(key.as_deref(), expected))]
    WrongKey {
        /// The record's key, when it is UTF-8.
        key: Option<String>,
        /// The subscriber id the value names.
        expected: String,
    },
    /// A field does not make sense (`rule.threshold.currency: "RMB" is not ISO 4217`).
    #[error("{0}")]
    Invalid(ValidationError),
    /// The service does not consume the record's topic (a wiring mistake).
    #[error("the {service} does not consume {topic}")]
    UnexpectedTopic {
        /// Who received it ("evaluator").
        service: &'static str,
        /// Where it came from.
        topic: String,
    },
    /// The record could not be processed now, for a reason that passes (a dependency not
    /// caught up or unreachable): the pipeline processes it again after a backoff, from the
    /// state it had before, and never dead-letters it.
    #[error("transient: {0}")]
    Transient(String),
}

fn wrong_key_text(key: Option<&str>, expected: &str) -> String {
    match key {
        Some(key) => format!("record key {key:?} differs from subscriber_id {expected:?}"),
        None => format!("record has no UTF-8 key; expected the subscriber id {expected:?}"),
    }
}

impl Refusal {
    /// A refusal of `field` for `reason`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(ValidationError::new(field, reason))
    }

    /// The refusal as a metric label of bounded cardinality: `no_value`, `too_large`,
    /// `undecodable`, `wrong_key`, `unexpected_topic`, `transient` or `invalid:<field path>`
    /// (list indexes dropped: `rule.payment_methods.token`). Field paths are written in
    /// code, never taken from the input, so the set of labels is fixed by the code.
    pub fn class(&self) -> Cow<'static, str> {
        match self {
            Self::NoValue => "no_value".into(),
            Self::TooLarge { .. } => "too_large".into(),
            Self::Undecodable { .. } => "undecodable".into(),
            Self::WrongKey { .. } => "wrong_key".into(),
            Self::UnexpectedTopic { .. } => "unexpected_topic".into(),
            Self::Transient(_) => "transient".into(),
            Self::Invalid(error) => {
                let path: String = error
                    .field
                    .split('[')
                    .map(|part| part.split_once(']').map_or(part, |(_, rest)| rest))
                    .collect();
                if path.is_empty() {
                    "invalid".into()
                } else {
                    format!("invalid:{path}").into()
                }
            }
        }
    }

    /// Whether the pipeline processes the record again rather than dead-letter it.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

impl From<ValidationError> for Refusal {
    fn from(error: ValidationError) -> Self {
        Self::Invalid(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_a_class_and_a_reason() {
        let cases = [
            (Refusal::NoValue, "no_value", "record has no value"),
            (
                Refusal::TooLarge { size: 2_000_000, limit: 1 },
                "too_large",
                "value is 2000000 bytes, larger than the 1 bytes accepted",
            ),
            (
                Refusal::Undecodable { message: "topup.v1.X", detail: "bad wire type".into() },
                "undecodable",
                "value is not a valid topup.v1.X: bad wire type",
            ),
            (
                Refusal::WrongKey { key: Some("a".into()), expected: "b".into() },
                "wrong_key",
                "record key \"a\" differs from subscriber_id \"b\"",
            ),
            (
                Refusal::WrongKey { key: None, expected: "b".into() },
                "wrong_key",
                "record has no UTF-8 key; expected the subscriber id \"b\"",
            ),
            (
                Refusal::invalid("balance.currency", "XYZ is not ISO 4217"),
                "invalid:balance.currency",
                "balance.currency: XYZ is not ISO 4217",
            ),
            (
                Refusal::invalid("rule.payment_methods[3].token", "is required"),
                "invalid:rule.payment_methods.token",
                "rule.payment_methods[3].token: is required",
            ),
            (
                Refusal::UnexpectedTopic { service: "evaluator", topic: "t".into() },
                "unexpected_topic",
                "the evaluator does not consume t",
            ),
            (Refusal::Transient("rules behind".into()), "transient", "transient: rules behind"),
        ];
        for (refusal, class, reason) in cases {
            assert_eq!(refusal.class(), class, "{refusal:?}");
            assert_eq!(refusal.to_string(), reason, "{refusal:?}");
            assert_eq!(refusal.is_transient(), class == "transient");
        }
    }
}
