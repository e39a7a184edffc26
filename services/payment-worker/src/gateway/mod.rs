//! Payment gateways behind one trait. One file per implementation: adding a provider is a
//! new file and a new [`AnyGateway`] variant. [`Rails`] routes each charge to the gateway
//! of its payment method's rail (cards to Stripe, say, and the rest to the default).
//!
//! Every answer falls into one of three classes, and the worker acts on the class alone:
//!
//! | class    | variants                                   | what the worker does |
//! |----------|--------------------------------------------|----------------------|
//! | approved | [`ChargeOutcome::Approved`]                | the top-up succeeded |
//! | refused  | [`ChargeOutcome::Refused`], [`ChargeOutcome::Unavailable`] | definite, nothing moved: the next method (after retries, for `Unavailable`) |
//! | unknown  | [`ChargeOutcome::Unknown`]                 | money may have moved: ask the gateway by key ([`PaymentGateway::status`]), and send again with the same key only if it says it never received it; never another method; past the deadline the top-up needs reconciliation |
pub mod alipay;
pub mod http;
mod sandbox;
pub mod stripe;

use std::future::Future;

pub use alipay::{AlipayAgreements, AlipayConfig};
pub use http::{HttpGateway, HttpGatewayConfig};
pub use sandbox::Sandbox;
pub use stripe::{StripeCards, StripeConfig};
use topup_domain::Money;
use topup_proto::v1::{FailureReason, PaymentMethodKind};

/// One charge, as the gateway sees it.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    /// The gateway never charges twice for the same key: one per (top-up, payment method).
    pub idempotency_key: String,
    /// Gateway token of the payment method.
    pub token: String,
    /// Its kind.
    pub kind: PaymentMethodKind,
    /// What to charge.
    pub amount: Money,
    /// Whose top-up (for the gateway's records).
    pub subscriber_id: String,
    /// Which top-up (for the gateway's records and reconciliation).
    pub command_id: String,
}

/// What the gateway said to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money moved; `reference` is the gateway's id for the charge.
    Approved { reference: String },
    /// Definite and permanent: nothing moved, and this method will not work for this charge.
    /// Try the next method.
    Refused { reason: FailureReason, detail: String },
    /// Definite but temporary: the request was not processed (never sent, or refused before
    /// processing: 429, 503). The same method may work later.
    Unavailable { detail: String },
    /// Money may have moved: the request was sent and no definite answer came back (a
    /// timeout, a connection reset, a 5xx, an unreadable 2xx).
    Unknown { detail: String },
}

/// What the gateway says it did with a key, asked after an [`ChargeOutcome::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeStatus {
    /// It charged; `reference` is its id.
    Approved { reference: String },
    /// It refused the charge; nothing moved.
    Refused { reason: FailureReason, detail: String },
    /// It never received the key (or refused it before processing): nothing moved, and
    /// sending the charge again is a first attempt. Trustworthy only while the gateway
    /// still remembers keys (its retention window).
    NotFound,
    /// No definite answer (still processing, or the lookup itself failed).
    Unknown { detail: String },
}

/// A payment gateway.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charges, idempotently by `request.idempotency_key`.
    fn charge(&self, request: &ChargeRequest) -> impl Future<Output = ChargeOutcome> + Send;

    /// What became of the charge sent with `idempotency_key` (a method of `kind`).
    fn status(
        &self,
        idempotency_key: &str,
        kind: PaymentMethodKind,
    ) -> impl Future<Output = ChargeStatus> + Send;
}

/// A request that got no answer, and what that means for the money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unanswered {
    /// Never connected: the request was not sent, nothing can have moved.
    NotSent(String),
    /// Sent, or perhaps sent (a timeout, a reset after the write, a body cut short): money
    /// may have moved.
    Lost(String),
}

impl From<Unanswered> for ChargeOutcome {
    fn from(unanswered: Unanswered) -> Self {
        match unanswered {
            Unanswered::NotSent(detail) => ChargeOutcome::Unavailable { detail },
            Unanswered::Lost(detail) => ChargeOutcome::Unknown { detail },
        }
    }
}

impl From<Unanswered> for ChargeStatus {
    fn from(unanswered: Unanswered) -> Self {
        match unanswered {
            Unanswered::NotSent(detail) | Unanswered::Lost(detail) => {
                ChargeStatus::Unknown { detail }
            }
        }
    }
}

/// The HTTP client of a gateway: every request (and its connection) bounded by `timeout`.
pub fn client(timeout: std::time::Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("topup-payment-worker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends `request` to `provider`: the answer's status and body, or why there is none. The
/// one place where a lost HTTP answer is told from a request never sent.
pub async fn send(
    request: reqwest::RequestBuilder,
    provider: &str,
) -> Result<(reqwest::StatusCode, Vec<u8>), Unanswered> {
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            return Err(Unanswered::NotSent(format!("{provider} unreachable: {e}")))
        }
        Err(e) if e.is_timeout() => {
            return Err(Unanswered::Lost(format!("no answer from {provider} in time: {e}")))
        }
        Err(e) => return Err(Unanswered::Lost(format!("{provider}'s answer lost: {e}"))),
    };
    let status = response.status();
    match response.bytes().await {
        Ok(body) => Ok((status, body.to_vec())),
        Err(e) => Err(Unanswered::Lost(format!("reading {provider}'s answer: {e}"))),
    }
}

/// The gateway chosen by configuration.
#[derive(Debug, Clone)]
pub enum AnyGateway {
    /// Deterministic test tokens, no money moves.
    Sandbox(Sandbox),
    /// A real provider (or a bridge) over HTTP.
    Http(HttpGateway),
    /// Cards through Stripe's PaymentIntents.
    Stripe(StripeCards),
    /// Alipay agreement deduction.
    Alipay(AlipayAgreements),
}

impl PaymentGateway for AnyGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        match self {
            AnyGateway::Sandbox(gateway) => gateway.charge(request).await,
            AnyGateway::Http(gateway) => gateway.charge(request).await,
            AnyGateway::Stripe(gateway) => gateway.charge(request).await,
            AnyGateway::Alipay(gateway) => gateway.charge(request).await,
        }
    }

    async fn status(&self, idempotency_key: &str, kind: PaymentMethodKind) -> ChargeStatus {
        match self {
            AnyGateway::Sandbox(gateway) => gateway.status(idempotency_key, kind).await,
            AnyGateway::Http(gateway) => gateway.status(idempotency_key, kind).await,
            AnyGateway::Stripe(gateway) => gateway.status(idempotency_key, kind).await,
            AnyGateway::Alipay(gateway) => gateway.status(idempotency_key, kind).await,
        }
    }
}

/// The gateway of each rail: cards (credit and debit) and Alipay on their own gateways when
/// configured, every other kind (and those without one) on the default. A charge parked
/// with an unknown outcome is looked up on today's gateway of its kind: change a rail only
/// while no charge of that kind is parked (docs/payment-worker.md).
#[derive(Debug, Clone)]
pub struct Rails {
    /// Charges every kind without a gateway of its own.
    pub default: AnyGateway,
    /// Charges cards and debit cards, when set.
    pub cards: Option<AnyGateway>,
    /// Charges Alipay agreements, when set.
    pub alipay: Option<AnyGateway>,
}

impl Rails {
    /// Every kind on `gateway`.
    pub fn single(gateway: AnyGateway) -> Self {
        Self { default: gateway, cards: None, alipay: None }
    }

    fn of(&self, kind: PaymentMethodKind) -> &AnyGateway {
        let own = match kind {
            PaymentMethodKind::Card | PaymentMethodKind::DebitCard => self.cards.as_ref(),
            PaymentMethodKind::Alipay => self.alipay.as_ref(),
            _ => None,
        };
        own.unwrap_or(&self.default)
    }
}

impl PaymentGateway for Rails {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        self.of(request.kind).charge(request).await
    }

    async fn status(&self, idempotency_key: &str, kind: PaymentMethodKind) -> ChargeStatus {
        self.of(kind).status(idempotency_key, kind).await
    }
}
