//! `topup-evaluator`: the threshold evaluator as its own process.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_evaluator::main_from_args().await
}
