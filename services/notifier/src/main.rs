//! `topup-notifier`: the notifier as its own process.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_notifier::main_from_args().await
}
