//! `topup-notifier`: the notifier as its own process (console channel).
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Notifier: notification commands -> messages in the subscriber's language"
)]
struct Cli {
    #[command(flatten)]
    config: topup_notifier::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    topup_kafka::init_logging();
    let shutdown = topup_kafka::shutdown_on_signal();
    topup_notifier::run(cli.config, topup_notifier::Console, shutdown).await?;
    Ok(())
}
