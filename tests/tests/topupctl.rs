//! `topupctl` against the platform on the mock cluster: publish a rule from proto3 JSON and
//! a balance from flags, see the top-up happen, show the subscriber's state, tail a topic as
//! JSON, and replay a dead letter to its source topic.
use clap::Parser;
use topup_proto::topics;
use topup_proto::v1::{DeadLetter, RuleState, TopUpResult};
use topup_tests::{rule, Platform};

async fn topupctl(platform: &Platform, args: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["topupctl", "--kafka-brokers", platform.kafka.brokers.as_str()];
    argv.extend_from_slice(args);
    let cli = topupctl::Cli::try_parse_from(argv)?;
    let mut out = Vec::new();
    topupctl::run(cli, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_publishes_inspects_tails_and_replays() -> anyhow::Result<()> {
    let platform = Platform::start()?;
    let dir = std::env::temp_dir().join(format!("topupctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rule_file = dir.join("rule.json");
    std::fs::write(
        &rule_file,
        serde_json::to_string(&rule("sub-ctl", "tok_ok", RuleState::Active))?,
    )?;

    topupctl(
        &platform,
        &["publish", "--topic", topics::RULES, "--json", rule_file.to_str().unwrap_or_default()],
    )
    .await?;
    topupctl(
        &platform,
        &["publish-balance", "--subscriber", "sub-ctl", "--balance", "8.50", "--sequence", "1"],
    )
    .await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    results.wait_for("the top-up", |r| r.subscriber_id == "sub-ctl").await?;
    platform
        .wait_caught_up("topup-evaluator", &[topics::BALANCE, topics::RULES, topics::RESULTS])
        .await?;

    let state = topupctl(&platform, &["state", "sub-ctl"]).await?;
    let state: serde_json::Value = serde_json::from_str(&state)?;
    assert_eq!(
        state["topup.evaluator-state.v1 sub-ctl"]["balance"]["amountMinor"], "850",
        "{state:#}"
    );
    assert_eq!(
        state["topup.evaluator-state.v1 sub-ctl rule"]["state"], "RULE_STATE_ACTIVE",
        "{state:#}"
    );

    let tail =
        topupctl(&platform, &["tail", topics::RESULTS, "--from-beginning", "--max", "1"]).await?;
    let line: serde_json::Value = serde_json::from_str(tail.trim())?;
    assert_eq!(line["key"], "sub-ctl");
    assert_eq!(line["value"]["status"], "TOP_UP_STATUS_SUCCEEDED");

    // A balance in the wrong currency is dead-lettered; replaying sends it back to its topic
    // (where, unfixed, it is refused again: a second dead letter from the same source).
    topupctl(
        &platform,
        &[
            "publish-balance",
            "--subscriber",
            "sub-ctl",
            "--balance",
            "3.00",
            "--currency",
            "USD",
            "--sequence",
            "2",
        ],
    )
    .await?;
    let mut dead = platform.reader::<DeadLetter>(topics::DLQ)?;
    dead.wait_for("the refused balance", |d| d.source_topic == topics::BALANCE).await?;
    let dry = topupctl(&platform, &["replay-dlq", "--source-topic", topics::BALANCE, "--dry-run"])
        .await?;
    assert!(dry.contains("1 dead letters would be replayed"), "{dry}");
    let replayed = topupctl(&platform, &["replay-dlq", "--reason-contains", "currency"]).await?;
    assert!(replayed.contains("1 dead letters replayed"), "{replayed}");
    dead.wait_for_count("the replayed balance refused again", 2, |d| {
        d.source_topic == topics::BALANCE
    })
    .await?;

    // Mistakes get a message saying what to do.
    let wrong = topupctl(&platform, &["tail", "no.such.topic"]).await.unwrap_err().to_string();
    assert!(wrong.contains("not a topic of the platform"), "{wrong}");
    let wrong = topupctl(
        &platform,
        &["publish-balance", "--subscriber", "s", "--balance", "8.505", "--sequence", "1"],
    )
    .await
    .unwrap_err();
    assert!(format!("{wrong:#}").contains("decimal places"), "{wrong:#}");
    std::fs::remove_dir_all(&dir)?;
    platform.stop().await
}
