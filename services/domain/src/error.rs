//! The one error of this crate: a field of a record that does not make sense.
use std::fmt;

/// Why a wire record was refused: the field path and the reason, e.g.
/// `balance.currency: "RMB" is not an ISO 4217 code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// Dotted path of the offending field (`rule.threshold.amount_minor`).
    pub field: String,
    /// What is wrong with it, for a human.
    pub reason: String,
}

impl ValidationError {
    /// A new error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// Prefixes the field path, so nested conversions report `rule.threshold.currency`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Shorthand for conversions that may refuse their input.
pub type Invalid<T> = Result<T, ValidationError>;
