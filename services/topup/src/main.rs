//! `topup`: every service in one process. With no configuration it starts an in-process
//! Kafka (librdkafka's mock cluster) and a carrier simulator, and shows the loop.
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use topup::{embedded::EmbeddedKafka, simulator, summary::Summary};
use topup_kafka::{KafkaArgs, TopicSpec, DEFAULT_PARTITIONS};

/// Runs the whole auto top-up loop in one process.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Use this Kafka (host:port,...) instead of starting an in-process one.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Partitions per topic when creating topics.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    partitions: i32,
    /// Do not start the carrier simulator (process only what outside clients publish).
    #[arg(long)]
    no_simulator: bool,
    /// Subscribers the simulator plays.
    #[arg(long, env = "SIM_SUBSCRIBERS", default_value_t = simulator::SimulatorConfig::default().subscribers)]
    subscribers: usize,
    /// Stop after this many seconds and print a summary.
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Stop after the evaluator has consumed this many balance events, with a summary.
    #[arg(long)]
    max_events: Option<u64>,
    /// Where the subscriber API listens.
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8088")]
    api_addr: std::net::SocketAddr,
    /// The API's database (default: in memory, gone at exit like the embedded Kafka;
    /// hidden in `--help`: a postgres:// URL holds the password).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite::memory:", hide_env_values = true)]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Export first: the bridge for spans is part of the logging subscriber.
    topup_kafka::telemetry::init("topup").map_err(anyhow::Error::msg)?;
    topup_kafka::init_logging();
    let shutdown = topup_kafka::shutdown_on_signal();

    // The embedded cluster lives as long as `main`; it is dropped after the services stop.
    let (embedded, kafka) = match &cli.kafka_brokers {
        Some(brokers) => {
            let kafka = KafkaArgs::new(brokers.clone());
            topup_kafka::create_topics(&kafka, &TopicSpec::all(cli.partitions), 1).await?;
            (None, kafka)
        }
        None => {
            let embedded = EmbeddedKafka::start(cli.partitions)?;
            let kafka = embedded.kafka_args();
            (Some(embedded), kafka)
        }
    };
    println!("Kafka bootstrap servers: {}", kafka.brokers);
    println!("  watch:   kcat -b {} -C -t topup.commands.v1 -f '%k %s\\n'", kafka.brokers);
    println!("  Ctrl-C stops cleanly.\n");

    let mut tasks = tokio::task::JoinSet::new();
    tasks
        .spawn(topup_evaluator::run(topup_evaluator::Config::new(kafka.clone()), shutdown.clone()));
    // The sandbox, chosen here (a standalone worker needs PAYMENT_GATEWAY): no money moves.
    // One key seals payment tokens between the API and the payment worker.
    let token_keys = topup_domain::TokenKeys::random("demo");
    let mut worker = topup_payment_worker::Config::new(kafka.clone());
    worker.token_keys = Some(token_keys.clone());
    tasks.spawn(topup_payment_worker::run(
        worker,
        topup_payment_worker::Sandbox::new(),
        shutdown.clone(),
    ));
    // One key seals confirmation codes between the API and the notifier; one signs tokens.
    let code_key = topup_domain::CodeKey::random();
    let jwt_secret = topup_domain::CodeKey::random().to_hex();
    let mut api = topup_api::Config::new(
        kafka.clone(),
        &cli.database_url,
        &jwt_secret,
        code_key.clone(),
        token_keys,
    );
    api.addr = cli.api_addr;
    // The demo's subscribers may name the console (it is where its messages go).
    api.allow_console = true;
    let api = topup_api::start(api, shutdown.clone()).await?;
    let day = 24 * 3600;
    let subscriber =
        topup_api::issue(jwt_secret.as_bytes(), "sub-demo", topup_api::Role::Subscriber, day)?;
    let operator =
        topup_api::issue(jwt_secret.as_bytes(), "care-desk", topup_api::Role::Operator, day)?;
    println!("Subscriber API: http://{}  (OpenAPI: http://{}/openapi.yaml)", api.addr, api.addr);
    println!("  token for subscriber sub-demo: {subscriber}");
    println!("  token for an operator:         {operator}\n");

    let mut notifier = topup_notifier::Config::new(kafka.clone());
    notifier.confirmation_code_key = Some(code_key);
    // The demo shows every message at once; a deployed notifier holds non-urgent ones over
    // the subscriber's night (QUIET_HOURS, default 22:00-08:00).
    notifier.quiet_hours = topup_notifier::QuietHoursSetting(None);
    // Every message printed, chosen here (what NOTIFIER_PRINT_UNCONFIGURED asks of a
    // standalone notifier): the demo has no SMTP server or provider.
    tasks.spawn(topup_notifier::run(
        notifier,
        topup_notifier::Channels::console(),
        shutdown.clone(),
    ));
    let simulator = (!cli.no_simulator).then(|| {
        let config = simulator::SimulatorConfig {
            subscribers: cli.subscribers.max(1),
            ..Default::default()
        };
        tokio::spawn(simulator::run(kafka.clone(), config, shutdown.clone()))
    });

    wait_for_stop(&shutdown, cli.duration_secs, cli.max_events).await;
    shutdown.cancel();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Err(e))) => eprintln!("a service stopped with an error: {e}"),
                Some(Err(e)) => eprintln!("a service panicked: {e}"),
                Some(Ok(Ok(()))) => {}
                None => break,
            },
            // A service that does not drain in time is abandoned rather than hanging the exit.
            _ = &mut deadline => { eprintln!("services did not stop within 20 s"); break; }
        }
    }
    if let Some(simulator) = simulator {
        simulator.abort();
    }
    match tokio::time::timeout(Duration::from_secs(10), api.task).await {
        Ok(Ok(Err(e))) => eprintln!("the API stopped with an error: {e:#}"),
        Ok(Err(e)) => eprintln!("the API panicked: {e}"),
        Err(_) => eprintln!("the API did not stop within 10 s"),
        Ok(Ok(Ok(()))) => {}
    }
    println!("\n{}", Summary::now());
    topup_kafka::finish_service().await;
    drop(embedded);
    Ok(())
}

async fn wait_for_stop(
    shutdown: &CancellationToken,
    duration_secs: Option<u64>,
    max_events: Option<u64>,
) {
    let until = async {
        match duration_secs {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let enough_events = async {
        let Some(max) = max_events else { return std::future::pending().await };
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            if Summary::now().events_in >= max {
                return;
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = until => {}
        _ = enough_events => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn help_shows_no_database_url_it_was_given() {
        let command = Cli::command();
        let database = command.get_arguments().find(|a| a.get_id() == "database_url");
        assert!(database.is_some_and(clap::Arg::is_hide_env_values_set));
    }
}
