//! A service fails closed: the real binaries, started with only the environment a test gives
//! them, refuse to start on a setting they would otherwise have guessed — a payment worker
//! without an explicitly chosen gateway, a notifier with a channel kind that has no provider
//! (unless told to print it) — and `--help` never shows a secret held in an environment
//! value. None of it needs Kafka: the refusals come before anything connects. That the
//! binaries do start once the choice is made is what `faults.rs` and `payment_gateway.rs`
//! run them for.
use std::process::{Output, Stdio};

use anyhow::Context;
use topup_tests::WAIT;

/// Nothing listens on port 1: a service that got as far as Kafka would retry, not exit.
const NO_KAFKA: (&str, &str) = ("KAFKA_BROKERS", "127.0.0.1:1");

/// The password in every secret given to a service below.
const PASSWORD: &str = "hunter2";

/// A confirmation-code key must be 64 hex digits, so it cannot carry [`PASSWORD`].
const CODE_KEY: &str = "feedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedface";

/// Runs `program` with `args` and the environment `env` alone (nothing inherited from the
/// test's), until it exits or [`WAIT`] has passed.
async fn run_alone(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(WAIT, command.output())
        .await
        .with_context(|| format!("{program} {args:?} still running after {WAIT:?}"))?
        .with_context(|| format!("starting {program}"))
}

/// Asserts that `output` is a refusal to start whose message names each of `expected`.
fn assert_refused(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {stderr}");
    for name in expected {
        assert!(stderr.contains(name), "the refusal does not name {name}: {stderr}");
    }
}

#[tokio::test]
async fn a_payment_worker_without_an_explicitly_chosen_gateway_does_not_start() -> anyhow::Result<()>
{
    // An HTTP gateway half set up (URL and secret, no PAYMENT_GATEWAY) is the mistake that
    // used to charge through the sandbox: approvals, and no money moved.
    let output = run_alone(
        env!("CARGO_BIN_EXE_payment_worker_child"),
        &[],
        &[
            NO_KAFKA,
            ("PAYMENT_GATEWAY_URL", "https://pay.example.com/v1/charges"),
            ("PAYMENT_GATEWAY_SECRET", PASSWORD),
        ],
    )
    .await?;
    assert_refused(&output, &["PAYMENT_GATEWAY", "`http`", "`sandbox`"]);
    Ok(())
}

#[tokio::test]
async fn a_notifier_with_a_kind_without_provider_does_not_start_unless_told_to_print(
) -> anyhow::Result<()> {
    // E-mail has its server; SMS and push have nothing, and would have been printed.
    let email_only = [NO_KAFKA, ("SMTP_HOST", "127.0.0.1"), ("SMTP_TLS", "none")];
    let output = run_alone(env!("CARGO_BIN_EXE_notifier_child"), &[], &email_only).await?;
    assert_refused(
        &output,
        &["SMS_WEBHOOK_URL", "PUSH_WEBHOOK_URL", "NOTIFIER_PRINT_UNCONFIGURED"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("SMTP_HOST"), "e-mail has a provider: {stderr}");
    Ok(())
}

/// Secrets in every variable that may hold one, each carrying [`PASSWORD`] (or being
/// [`CODE_KEY`]).
const SECRETS: &[(&str, &str)] = &[
    ("KAFKA_PROPERTIES", "security.protocol=SASL_SSL,sasl.password=hunter2"),
    ("DATABASE_URL", "postgres://topup:hunter2@db:5432/topup"),
    ("PAYMENT_GATEWAY_URL", "https://worker:hunter2@pay.example.com/v1/charges"),
    ("PAYMENT_GATEWAY_SECRET", "hunter2"),
    ("SMTP_PASSWORD", "hunter2"),
    ("WEBHOOK_SECRET", "hunter2"),
    ("SMS_WEBHOOK_URL", "https://sms.example.com/v1/messages?token=hunter2"),
    ("PUSH_WEBHOOK_URL", "https://push.example.com/v1/messages?token=hunter2"),
    ("API_JWT_SECRET", "hunter2-hunter2-hunter2-hunter2-hunter2"),
    ("CONFIRMATION_CODE_KEY", CODE_KEY),
];

#[tokio::test]
async fn help_names_the_variables_but_never_shows_a_secret_they_hold() -> anyhow::Result<()> {
    for program in [
        env!("CARGO_BIN_EXE_evaluator_child"),
        env!("CARGO_BIN_EXE_payment_worker_child"),
        env!("CARGO_BIN_EXE_notifier_child"),
    ] {
        let output = run_alone(program, &["--help"], SECRETS).await?;
        let help = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{program} --help failed: {stderr}");
        // The variable is named, without its value.
        assert!(help.contains("[env: KAFKA_PROPERTIES]"), "{program} --help:\n{help}");
        for secret in [PASSWORD, CODE_KEY] {
            assert!(!help.contains(secret), "{program} --help shows {secret}:\n{help}");
        }
    }
    Ok(())
}

/// Whether a variable by this name may hold a secret: keys, passwords, tokens, client
/// properties (SASL), and URLs, which may carry credentials or a token.
fn may_hold_a_secret(env: &str) -> bool {
    ["_SECRET", "_PASSWORD", "_TOKEN", "_KEY", "_PROPERTIES", "_URL"]
        .iter()
        .any(|suffix| env.ends_with(suffix))
}

/// The variables whose values `command`'s `--help` would show although they may be secret.
fn secrets_shown(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|arg| Some((arg, arg.get_env()?.to_str()?)))
        .filter(|(arg, env)| may_hold_a_secret(env) && !arg.is_hide_env_values_set())
        .map(|(_, env)| env.to_string())
        .collect()
}

/// Every service's settings, the API's included (it has no child binary here), read from
/// their clap definitions: no environment needed.
#[test]
fn no_service_shows_the_value_of_a_variable_that_may_hold_a_secret() {
    let service = clap::Command::new;
    let commands = [
        <topup_evaluator::Config as clap::Args>::augment_args(service("topup-evaluator")),
        <topup_payment_worker::Config as clap::Args>::augment_args(service("topup-payment-worker")),
        <topup_notifier::Config as clap::Args>::augment_args(service("topup-notifier")),
        <topup_api::Config as clap::Args>::augment_args(service("topup-api")),
        <topupctl::Cli as clap::CommandFactory>::command(),
    ];
    for command in commands {
        let shown = secrets_shown(&command);
        assert!(shown.is_empty(), "{} --help shows the values of {shown:?}", command.get_name());
    }
}
