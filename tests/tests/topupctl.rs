//! `topupctl` against the platform on the mock cluster: publish a rule from proto3 JSON and
//! a balance from flags, see the top-up happen, show the subscriber's state, tail a topic as
//! JSON, and replay a dead letter to its source topic.
use clap::Parser;
use topup_proto::topics;
use topup_proto::v1::{DeadLetter, RuleState, TopUpCommand, TopUpResult};
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

/// A top-up stuck in flight (no payment worker here) is ended by the settlement an operator
/// publishes with the gateway's word; a result without a command id, or a "succeeded"
/// without the gateway's reference, is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_ends_a_stuck_top_up_with_its_result() -> anyhow::Result<()> {
    let mut platform = Platform::cluster()?;
    platform.start_evaluator();
    platform.publish_rule(rule("sub-stuck", "tok_ok", RuleState::Active)).await?;
    platform.wait_caught_up("topup-evaluator", &[topics::RULES]).await?;
    platform.publish_balance("sub-stuck", 500, 1).await?;
    let mut commands = platform.reader::<TopUpCommand>(topics::COMMANDS)?;
    let command = commands.wait_for("the command", |c| c.subscriber_id == "sub-stuck").await?;
    let command_id = command.command_id.clone();
    platform.wait_caught_up("topup-evaluator", &[topics::BALANCE]).await?;
    let in_flight =
        |state: &serde_json::Value| state["topup.evaluator-state.v1 sub-stuck"]["inFlight"].clone();
    let state: serde_json::Value =
        serde_json::from_str(&topupctl(&platform, &["state", "sub-stuck"]).await?)?;
    // (The changelog leaves out the in-flight command id: it is derived.)
    assert!(in_flight(&state).is_object(), "in flight: {state:#}");

    let dir = std::env::temp_dir().join(format!("topupctl-result-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("result.json");
    let path = file.to_str().unwrap_or_default();
    std::fs::write(&file, r#"{"subscriberId": "sub-stuck", "status": "TOP_UP_STATUS_SUCCEEDED"}"#)?;
    let refused =
        topupctl(&platform, &["publish", "--topic", topics::RESULTS, "--json", path]).await;
    let refusal = format!("{:#}", refused.err().ok_or_else(|| anyhow::anyhow!("accepted"))?);
    assert!(refusal.contains("command_id"), "{refusal}");

    let result = serde_json::json!({
        "commandId": command_id,
        "subscriberId": "sub-stuck",
        "status": "TOP_UP_STATUS_SUCCEEDED",
    });
    std::fs::write(&file, result.to_string())?;
    let refused =
        topupctl(&platform, &["publish", "--topic", topics::RESULTS, "--json", path]).await;
    let refusal = format!("{:#}", refused.err().ok_or_else(|| anyhow::anyhow!("accepted"))?);
    assert!(refusal.contains("gateway's reference"), "{refusal}");

    let settled = topupctl(
        &platform,
        &[
            "settle",
            "--subscriber",
            "sub-stuck",
            "--command-id",
            &command_id,
            "--approved",
            "ch_from_the_books",
            "--evidence",
            "ops:test: gateway dashboard",
        ],
    )
    .await?;
    assert!(settled.contains("ch_from_the_books"), "{settled}");
    platform.wait_caught_up("topup-evaluator", &[topics::RESULTS]).await?;
    let state: serde_json::Value =
        serde_json::from_str(&topupctl(&platform, &["state", "sub-stuck"]).await?)?;
    assert!(in_flight(&state).is_null(), "no longer in flight: {state:#}");
    std::fs::remove_dir_all(&dir)?;
    platform.stop().await
}
