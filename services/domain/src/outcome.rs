//! The outcome of a top-up, as the evaluator needs it to close what is in flight.
use topup_proto::v1 as wire;

use crate::{Invalid, SubscriberId, ValidationError};

/// What a result says about the money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeStatus {
    /// Money moved.
    Charged,
    /// Definitely no money moved: refused, failed, or cancelled before any charge.
    NotCharged,
    /// Money may have moved; the gateway has not said. The top-up stays open until an
    /// operator settles it.
    Unresolved,
}

/// A valid `TopUpResult`, reduced to what closes an in-flight top-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpOutcome {
    /// Whose top-up.
    pub subscriber: SubscriberId,
    /// Which command it answers.
    pub command_id: String,
    /// Did money move?
    pub status: OutcomeStatus,
}

impl TopUpOutcome {
    /// Money moved.
    pub fn charged(&self) -> bool {
        self.status == OutcomeStatus::Charged
    }
}

impl TryFrom<&wire::TopUpResult> for TopUpOutcome {
    type Error = ValidationError;

    fn try_from(raw: &wire::TopUpResult) -> Invalid<Self> {
        let subscriber = SubscriberId::parse(&raw.subscriber_id)?;
        if raw.command_id.is_empty() {
            return Err(ValidationError::new("command_id", "is required"));
        }
        let status = match wire::TopUpStatus::try_from(raw.status) {
            Ok(wire::TopUpStatus::Succeeded) => OutcomeStatus::Charged,
            Ok(wire::TopUpStatus::Failed | wire::TopUpStatus::Cancelled) => {
                OutcomeStatus::NotCharged
            }
            Ok(wire::TopUpStatus::NeedsReconciliation) => OutcomeStatus::Unresolved,
            _ => {
                return Err(ValidationError::new(
                    "status",
                    format!(
                        "{} is not succeeded, failed, cancelled or needs_reconciliation",
                        raw.status
                    ),
                ))
            }
        };
        Ok(Self { subscriber, command_id: raw.command_id.clone(), status })
    }
}
