//! The outcome of a top-up, as the evaluator needs it to close what is in flight.
use topup_proto::v1 as wire;

use crate::{Invalid, SubscriberId, ValidationError};

/// A valid `TopUpResult`, reduced to what closes an in-flight top-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpOutcome {
    /// Whose top-up.
    pub subscriber: SubscriberId,
    /// Which command it answers.
    pub command_id: String,
    /// Did money move?
    pub succeeded: bool,
}

impl TryFrom<&wire::TopUpResult> for TopUpOutcome {
    type Error = ValidationError;

    fn try_from(raw: &wire::TopUpResult) -> Invalid<Self> {
        let subscriber = SubscriberId::parse(&raw.subscriber_id)?;
        if raw.command_id.is_empty() {
            return Err(ValidationError::new("command_id", "is required"));
        }
        let succeeded = match wire::TopUpStatus::try_from(raw.status) {
            Ok(wire::TopUpStatus::Succeeded) => true,
            Ok(wire::TopUpStatus::Failed) => false,
            _ => {
                return Err(ValidationError::new(
                    "status",
                    format!("{} is not succeeded or failed", raw.status),
                ))
            }
        };
        Ok(Self { subscriber, command_id: raw.command_id.clone(), succeeded })
    }
}
