//! `topupctl`: the operator CLI. `topupctl --help` lists the commands.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = <topupctl::Cli as clap::Parser>::parse();
    topup_kafka::init_logging();
    topupctl::run(cli, &mut std::io::stdout()).await
}
