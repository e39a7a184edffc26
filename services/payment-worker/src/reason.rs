//! The failure reasons of a top-up as stable codes: what the notifier's templates, the
//! metrics' `reason` label and dashboards know them by.
use topup_proto::v1::FailureReason;

/// Stable reason codes, as the notifier's templates and dashboards know them.
pub fn reason_code(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::Declined => "declined",
        FailureReason::CardExpired => "card_expired",
        FailureReason::InsufficientFunds => "insufficient_funds",
        FailureReason::GatewayUnavailable => "gateway_unavailable",
        FailureReason::LimitExceeded => "limit_exceeded",
        FailureReason::NoPaymentMethod => "no_payment_method",
        FailureReason::CurrencyMismatch => "currency_mismatch",
        FailureReason::RuleNotActive => "rule_not_active",
        FailureReason::MethodRemoved => "method_removed",
        FailureReason::CommandExpired => "command_expired",
        FailureReason::OutcomeUnknown => "outcome_unknown",
        FailureReason::AuthenticationRequired => "authentication_required",
        FailureReason::AgreementEnded => "agreement_ended",
        FailureReason::Unspecified => "unknown",
    }
}
