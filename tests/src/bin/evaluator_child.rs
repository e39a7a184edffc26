//! The evaluator as a child process for crash tests: exactly `topup-evaluator`'s main,
//! built inside this package so tests can find it (`CARGO_BIN_EXE_evaluator_child`) and
//! kill it with SIGKILL.
use clap::Parser;

#[derive(Parser)]
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
