//! What an SRE asks a running service: alive, ready (partitions assigned and restored),
//! and its metrics in the Prometheus text format — on `HTTP_ADDR`, from the real binary.
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use topup_proto::topics;
use topup_proto::v1::RuleState;
use topup_tests::{metric, rule, Platform, WAIT};

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::get(url).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_says_when_it_is_alive_ready_and_what_it_did() -> anyhow::Result<()> {
    let platform = Platform::cluster()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = topup_tests::child_command(env!("CARGO_BIN_EXE_evaluator_child"))
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the evaluator")?;
    let base = format!("http://127.0.0.1:{port}");

    // Alive as soon as it listens; ready once its partitions are assigned and restored.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        if let Ok((status, body)) = get(&format!("{base}/readyz")).await {
            if status == 200 {
                assert!(body.contains("topup-evaluator: ready"), "{body}");
                break;
            }
            assert_eq!(status, 503, "{body}");
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never ready");
    }
    assert_eq!(get(&format!("{base}/healthz")).await?.0, 200);

    platform.publish_rule(rule("sub-ops", "tok_ok", RuleState::Active)).await?;
    platform.publish_balance("sub-ops", 800, 1).await?;
    platform.publish_raw(topics::BALANCE, "sub-ops", b"\xff\xff not protobuf").await?;
    platform.wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES]).await?;
    let (status, metrics) = get(&format!("{base}/metrics")).await?;
    assert_eq!(status, 200);
    let evaluator = |topic| [("service", "topup-evaluator"), ("topic", topic)];
    let expected = [
        ("topup_records_consumed_total", evaluator(topics::BALANCE).to_vec(), 2.0),
        ("topup_records_consumed_total", evaluator(topics::RULES).to_vec(), 1.0),
        ("topup_records_produced_total", evaluator(topics::COMMANDS).to_vec(), 1.0),
        ("topup_topups_issued_total", vec![], 1.0),
        (
            "topup_dead_letters_total",
            [evaluator(topics::BALANCE).as_slice(), &[("reason", "undecodable")]].concat(),
            1.0,
        ),
        ("topup_command_latency_seconds_count", vec![], 1.0),
    ];
    for (name, labels, value) in expected {
        assert_eq!(metric(&metrics, name, &labels), value, "{name} {labels:?} in:\n{metrics}");
    }
    // Counted as the evaluator instance that did it.
    assert!(metrics.contains("instance_id=\"topup-evaluator-"), "{metrics}");
    child.kill().await?;
    Ok(())
}
