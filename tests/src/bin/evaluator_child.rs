//! The evaluator as a child process for crash tests: `topup-evaluator`'s own entry point,
//! built inside this package so tests can find it (`CARGO_BIN_EXE_evaluator_child`) and
//! kill it with SIGKILL.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    topup_tests::exit_with_parent();
    topup_evaluator::main_from_args().await
}
