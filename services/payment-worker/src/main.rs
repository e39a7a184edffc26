//! `topup-payment-worker`: the payment worker as its own process.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_payment_worker::main_from_args().await
}
