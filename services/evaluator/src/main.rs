//! `topup-evaluator`: the threshold evaluator as its own process.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Threshold evaluator: balances + rules -> top-up commands")]
struct Cli {
    #[command(flatten)]
    config: topup_evaluator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    topup_kafka::init_logging();
    let shutdown = topup_kafka::shutdown_on_signal();
    topup_evaluator::run(cli.config, shutdown).await?;
    Ok(())
}
