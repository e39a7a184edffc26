//! Validated domain types of the top-up platform. Wire types from `topup-proto` convert into
//! these with `TryFrom`; invalid input fails there, once, with a reason that becomes the
//! dead-letter record. No I/O, no clock.

mod balance;
pub mod calendar;
mod code;
mod error;
mod ids;
mod limits;
mod mask;
mod money;
mod notice;
mod outcome;
mod rule;
mod signing;
mod token;

pub use balance::BalanceObservation;
pub use code::{CodeError, CodeKey, SEALED_CODE_PARAMETER};
pub use error::{Invalid, ValidationError};
pub use ids::{
    command_id, idempotency_key, method_idempotency_key, monthly_command_id, notification_id,
    payment_method_id, SubscriberId,
};
pub use limits::{CarrierLimits, ChargeRange, LimitsSyntax};
pub use mask::{mask_contact, mask_token};
pub use money::{Currency, Money};
pub use notice::Notice;
pub use outcome::{OutcomeStatus, TopUpOutcome};
pub use rule::{Channel, MonthlyTopUp, PaymentMethod, Rule, RuleState, TopUpAmount, YearMonth};
pub use signing::request_signature;
pub use token::{is_sealed, TokenError, TokenKeys, SEALED_TOKEN_PREFIX};
