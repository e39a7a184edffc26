//! `topup-api`: the subscriber API as its own process.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_api::main_from_args().await
}
