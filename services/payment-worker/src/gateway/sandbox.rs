//! The deterministic sandbox gateway: the token decides the outcome, so integrators and
//! tests can produce every case on purpose.
//!
//! | token contains   | outcome                                                  |
//! |------------------|----------------------------------------------------------|
//! | `decline`        | refused: declined                                        |
//! | `expired`        | refused: card expired                                    |
//! | `insufficient`   | refused: insufficient funds                              |
//! | `transient<N>`   | unavailable (nothing moved) the first N attempts per key, then approved |
//! | `lost<N>`        | charged at once, but the first N answers per key are lost (unknown); a status lookup tells the truth |
//! | `slow`           | approved after 2 s                                       |
//! | anything else    | approved                                                 |
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use topup_proto::v1::{FailureReason, PaymentMethodKind};

use super::{ChargeOutcome, ChargeRequest, ChargeStatus, PaymentGateway};

/// How long a `slow` token takes.
const SLOW: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Ledger {
    /// Final outcome per idempotency key: a replay gets the same answer, no new charge.
    outcomes: HashMap<String, ChargeOutcome>,
    /// Attempts per key (for `transient<N>`).
    attempts: HashMap<String, u32>,
    /// Charges actually made per key (a correct client keeps every value at most 1).
    charges: HashMap<String, u32>,
    /// Charges made per top-up (command id), across all its keys.
    by_command: HashMap<String, u32>,
}

/// The sandbox gateway. Clones share one ledger.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    ledger: Arc<Mutex<Ledger>>,
}

impl Sandbox {
    /// A sandbox with an empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Charges made per idempotency key.
    pub fn charges(&self) -> HashMap<String, u32> {
        self.ledger.lock().map(|l| l.charges.clone()).unwrap_or_default()
    }

    /// Charges made per top-up (command id), across all its keys and methods: what the
    /// subscriber sees on their statement. A correct worker keeps every value at most 1.
    pub fn charges_by_command(&self) -> HashMap<String, u32> {
        self.ledger.lock().map(|l| l.by_command.clone()).unwrap_or_default()
    }
}

fn transient_count(token: &str) -> Option<u32> {
    count_after(token, "transient")
}

fn count_after(token: &str, word: &str) -> Option<u32> {
    let rest = &token[token.find(word)? + word.len()..];
    let digits: String =
        rest.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    Some(digits.parse().unwrap_or(1))
}

impl PaymentGateway for Sandbox {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        if request.token.contains("slow") {
            tokio::time::sleep(SLOW).await;
        }
        let Ok(mut ledger) = self.ledger.lock() else {
            return ChargeOutcome::Unavailable { detail: "sandbox ledger unavailable".into() };
        };
        let attempt = {
            let n = ledger.attempts.entry(request.idempotency_key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let token = request.token.as_str();
        let lost = count_after(token, "lost").is_some_and(|n| attempt <= n);
        if let Some(done) = ledger.outcomes.get(&request.idempotency_key) {
            if lost {
                return ChargeOutcome::Unknown { detail: "sandbox: the answer was lost".into() };
            }
            return done.clone();
        }
        let refused = |reason: FailureReason, detail: &str| ChargeOutcome::Refused {
            reason,
            detail: detail.into(),
        };
        let outcome = if token.contains("decline") {
            refused(FailureReason::Declined, "card declined by issuer")
        } else if token.contains("expired") {
            refused(FailureReason::CardExpired, "card expired")
        } else if token.contains("insufficient") {
            refused(FailureReason::InsufficientFunds, "insufficient funds")
        } else if transient_count(token).is_some_and(|n| attempt <= n) {
            return ChargeOutcome::Unavailable {
                detail: format!("sandbox transient error (attempt {attempt})"),
            };
        } else {
            *ledger.charges.entry(request.idempotency_key.clone()).or_insert(0) += 1;
            *ledger.by_command.entry(request.command_id.clone()).or_insert(0) += 1;
            ChargeOutcome::Approved { reference: format!("sbx_{}", &request.idempotency_key) }
        };
        ledger.outcomes.insert(request.idempotency_key.clone(), outcome.clone());
        if lost {
            return ChargeOutcome::Unknown { detail: "sandbox: the answer was lost".into() };
        }
        outcome
    }

    async fn status(&self, idempotency_key: &str, _kind: PaymentMethodKind) -> ChargeStatus {
        let Ok(ledger) = self.ledger.lock() else {
            return ChargeStatus::Unknown { detail: "sandbox ledger unavailable".into() };
        };
        match ledger.outcomes.get(idempotency_key) {
            Some(ChargeOutcome::Approved { reference }) => {
                ChargeStatus::Approved { reference: reference.clone() }
            }
            Some(ChargeOutcome::Refused { reason, detail }) => {
                ChargeStatus::Refused { reason: *reason, detail: detail.clone() }
            }
            Some(_) => ChargeStatus::Unknown { detail: "sandbox: not settled".into() },
            None => ChargeStatus::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use topup_domain::{Currency, Money};
    use topup_proto::v1::PaymentMethodKind;

    use super::*;

    fn request(token: &str, key: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            token: token.into(),
            kind: PaymentMethodKind::Card,
            amount: Money::new(Currency::parse("CNY").unwrap(), 5000),
            subscriber_id: "sub-1".into(),
            command_id: format!("c-{key}"),
        }
    }

    #[tokio::test]
    async fn tokens_decide_and_keys_never_charge_twice() {
        let sandbox = Sandbox::new();
        assert!(matches!(
            sandbox.charge(&request("tok_ok", "k1")).await,
            ChargeOutcome::Approved { .. }
        ));
        assert!(matches!(
            sandbox.charge(&request("tok_ok", "k1")).await,
            ChargeOutcome::Approved { .. }
        ));
        assert_eq!(sandbox.charges()["k1"], 1);
        assert!(matches!(
            sandbox.charge(&request("tok_expired", "k2")).await,
            ChargeOutcome::Refused { reason: FailureReason::CardExpired, .. }
        ));
        assert!(matches!(
            sandbox.charge(&request("tok_transient2", "k3")).await,
            ChargeOutcome::Unavailable { .. }
        ));
        assert!(matches!(
            sandbox.charge(&request("tok_transient2", "k3")).await,
            ChargeOutcome::Unavailable { .. }
        ));
        assert!(matches!(
            sandbox.charge(&request("tok_transient2", "k3")).await,
            ChargeOutcome::Approved { .. }
        ));
        // A lost answer: charged once, the status lookup knows, a resend gets the charge.
        assert_eq!(sandbox.status("k4", PaymentMethodKind::Card).await, ChargeStatus::NotFound);
        assert!(matches!(
            sandbox.charge(&request("tok_lost1", "k4")).await,
            ChargeOutcome::Unknown { .. }
        ));
        assert!(matches!(
            sandbox.status("k4", PaymentMethodKind::Card).await,
            ChargeStatus::Approved { .. }
        ));
        assert!(matches!(
            sandbox.charge(&request("tok_lost1", "k4")).await,
            ChargeOutcome::Approved { .. }
        ));
        assert_eq!(sandbox.charges_by_command()["c-k4"], 1);
    }
}
