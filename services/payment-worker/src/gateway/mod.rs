//! Payment gateways behind one trait. One file per implementation: adding a provider is a
//! new file and a new [`AnyGateway`] variant.
pub mod http;
mod sandbox;

use std::future::Future;

pub use http::{HttpGateway, HttpGatewayConfig};
pub use sandbox::Sandbox;
use topup_domain::Money;
use topup_proto::v1::{FailureReason, PaymentMethodKind};

/// One charge, as the gateway sees it.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    /// The gateway never charges twice for the same key.
    pub idempotency_key: String,
    /// Gateway token of the payment method.
    pub token: String,
    /// Its kind.
    pub kind: PaymentMethodKind,
    /// What to charge.
    pub amount: Money,
    /// Whose top-up (for the gateway's records).
    pub subscriber_id: String,
}

/// What the gateway said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money moved; `reference` is the gateway's id for the charge.
    Approved { reference: String },
    /// Permanent: this method will not work for this charge. Try the next method.
    Refused { reason: FailureReason, detail: String },
    /// Temporary: the same request may succeed later.
    Transient { detail: String },
}

/// A payment gateway.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charges, idempotently by `request.idempotency_key`.
    fn charge(&self, request: &ChargeRequest) -> impl Future<Output = ChargeOutcome> + Send;
}

/// The gateway chosen by configuration.
#[derive(Debug, Clone)]
pub enum AnyGateway {
    /// Deterministic test tokens, no money moves.
    Sandbox(Sandbox),
    /// A real provider (or a bridge) over HTTP.
    Http(HttpGateway),
}

impl PaymentGateway for AnyGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        match self {
            AnyGateway::Sandbox(gateway) => gateway.charge(request).await,
            AnyGateway::Http(gateway) => gateway.charge(request).await,
        }
    }
}
