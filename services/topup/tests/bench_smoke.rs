//! The benchmark at a tiny scale: every phase that CI can afford runs to its end and writes
//! its figures (the figures themselves are measured by hand, docs/benchmarks.md).
use std::process::Command;

#[test]
fn the_benchmark_runs_its_throughput_restore_and_state_phases_at_a_small_scale(
) -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    // The broker the tests run on (TOPUP_TEST_KAFKA); the restore phase needs Apache Kafka.
    let apache = std::env::var("TOPUP_TEST_KAFKA").as_deref() != Ok("mock");
    let (brokers, phases) = if apache {
        ("apache", "throughput,restore,memory,stores")
    } else {
        ("mock", "throughput,memory,stores")
    };
    let output = Command::new(env!("CARGO_BIN_EXE_topup-bench"))
        .args(["--brokers", brokers, "--phases", phases, "--rounds", "1"])
        .args(["--events", "2000", "--subscribers", "200", "--state-sizes", "1000,3000"])
        .args([
            "--restore-subscribers",
            "2000",
            "--restore-tail",
            "100",
            "--store-subscribers",
            "2000",
        ])
        .arg("--out")
        .arg(out.path())
        .output()?;
    let printed = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "topup-bench failed ({}):\n{printed}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("topup-bench.json"))?)?;
    let points = figures["memory"]["points"].as_array().map_or(0, Vec::len);
    assert_eq!(points, 2, "{figures}");
    for bytes in ["balance", "top_up", "quiet"] {
        let per_event = &figures["memory"][format!("changelog_bytes_per_{bytes}_event")];
        assert!(per_event.as_f64() > Some(0.0), "{figures}");
    }
    assert!(figures["brokers"][0]["evaluator_events_per_s"].as_f64() > Some(0.0));
    let stores = figures["stores"].as_array().map_or(0, Vec::len);
    assert_eq!(stores, 3, "the baseline, redb and fjall: {figures}");
    if apache {
        let restore = &figures["brokers"][0]["restore"];
        assert!(restore["cold_restore_s"].as_f64() > Some(0.0), "{restore}");
        assert!(restore["checkpointed_restore_s"].as_f64() > Some(0.0), "{restore}");
        assert!(restore["restarted_restore_s"].as_f64() > Some(0.0), "{restore}");
        assert!(restore["restarted_cold_restore_s"].as_f64() > Some(0.0), "{restore}");
    }
    assert!(printed.contains("checkpointed") == apache, "{printed}");
    Ok(())
}
