//! The notifier as a child process for crash tests: `topup-notifier`'s own entry point,
//! built inside this package so tests can find it (`CARGO_BIN_EXE_notifier_child`) and
//! kill it with SIGKILL.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_tests::exit_with_parent();
    topup_notifier::main_from_args().await
}
