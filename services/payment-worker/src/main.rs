//! `topup-payment-worker`: the payment worker as its own process (sandbox gateway).
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Payment worker: top-up commands -> charges -> results")]
struct Cli {
    #[command(flatten)]
    config: topup_payment_worker::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    topup_kafka::init_logging();
    let shutdown = topup_kafka::shutdown_on_signal();
    topup_payment_worker::run(cli.config, topup_payment_worker::Sandbox::new(), shutdown).await?;
    Ok(())
}
