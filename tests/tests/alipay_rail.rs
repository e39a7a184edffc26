//! Alipay agreement deduction against a gateway that checks our RSA2 signatures and signs
//! its answers with Alipay's official Python SDK: every answer ends in exactly one result
//! and at most one payment per top-up; a forged answer is not believed; a request signed
//! with another key is refused by the SDK.
use std::collections::HashMap;

use topup_payment_worker::gateway::alipay::out_trade_no;
use topup_payment_worker::gateway::{ChargeOutcome, ChargeRequest, PaymentGateway};
use topup_proto::topics;
use topup_proto::v1::{
    FailureReason, NotificationCommand, PaymentMethodKind, TopUpCommand, TopUpStatus,
};
use topup_tests::alipay_server::AlipayServer;
use topup_tests::{command, Platform};

/// A command whose methods are Alipay agreements.
fn alipay_command(subscriber: &str, id: &str, agreements: &[&str]) -> TopUpCommand {
    let mut command = command(subscriber, id, agreements);
    for method in &mut command.payment_methods {
        method.kind = PaymentMethodKind::Alipay as i32;
        method.method_id =
            topup_domain::payment_method_id(PaymentMethodKind::Alipay as i32, &method.token);
    }
    command
}

/// Alipay's order number of charging `agreement` for the command `id`.
fn trade(id: &str, agreement: &str) -> String {
    let method = topup_domain::payment_method_id(PaymentMethodKind::Alipay as i32, agreement);
    out_trade_no(&topup_domain::method_idempotency_key(&topup_domain::idempotency_key(id), &method))
}

/// `config` with Alipay methods to `server`, keys in files under `dir`, the sandbox for the
/// rest.
fn alipay_config(
    mut config: topup_payment_worker::Config,
    server: &AlipayServer,
    merchant_key: &str,
    dir: &std::path::Path,
) -> anyhow::Result<topup_payment_worker::Config> {
    config.gateway = Some(topup_payment_worker::GatewayKind::Sandbox);
    config.alipay_rail = topup_payment_worker::AlipayRail::Alipay;
    config.alipay_gateway_url = server.url.clone();
    config.alipay_app_id = Some("2021000000000001".into());
    let private = dir.join("merchant.key");
    let public = dir.join("alipay.pub");
    std::fs::write(&private, merchant_key)?;
    std::fs::write(&public, &server.alipay_public_key)?;
    config.alipay_private_key_file = Some(private);
    config.alipay_public_key_file = Some(public);
    Ok(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_alipay_answer_ends_in_one_result_and_at_most_one_payment() -> anyhow::Result<()> {
    let alipay = AlipayServer::start().await?;
    let mut platform = Platform::cluster()?;
    let keys = tempfile::tempdir()?;
    let base = platform.http_payment_config("http://127.0.0.1:9/unused");
    let config = alipay_config(base, &alipay, &alipay.merchant_private_key, keys.path())?;
    platform.start_payment_worker(config.clone(), config.gateway()?);

    let cases: &[(&str, &[&str], TopUpStatus, FailureReason)] = &[
        ("ok", &["agr_ok"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        ("broke", &["agr_broke"], TopUpStatus::Failed, FailureReason::InsufficientFunds),
        ("cancelled", &["agr_cancelled"], TopUpStatus::Failed, FailureReason::AgreementEnded),
        // 50.00 above the agreement's 30.00 per deduction.
        ("capped", &["agr_capped"], TopUpStatus::Failed, FailureReason::LimitExceeded),
        // Paid, answered 20000: the query settles it.
        ("lost", &["agr_lost", "agr_ok_2"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        // A "success" signed with another key: not believed; the query finds no trade, and
        // the same order number is sent again.
        ("forged", &["agr_forged"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        (
            "fallback",
            &["agr_cancelled_2", "agr_ok_3"],
            TopUpStatus::Succeeded,
            FailureReason::Unspecified,
        ),
    ];
    for (index, (id, agreements, _, _)) in cases.iter().enumerate() {
        let command = alipay_command(&format!("sub-{index}"), id, agreements);
        platform.publish_command(&command, None).await?;
    }
    let expected: Vec<_> = cases.iter().map(|(id, _, status, why)| (*id, *status, *why)).collect();
    for result in platform.expect_results(&expected).await? {
        if result.status == TopUpStatus::Succeeded as i32 {
            assert!(result.gateway_reference.starts_with("2026"), "{result:?}");
        }
    }
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;
    platform.wait_caught_up("topup-payment-worker-retries", &[topics::PAYMENT_RETRIES]).await?;
    let by_command = platform.results_by_command().await?;
    for (id, _, _, _) in cases {
        assert_eq!(by_command.get(*id).map(Vec::len), Some(1), "exactly one result for {id}");
    }
    let ledger = alipay.ledger().await?;
    let expected: HashMap<String, u64> =
        [("agr_ok", 1), ("agr_lost", 1), ("agr_forged", 1), ("agr_ok_3", 1)]
            .into_iter()
            .map(|(a, n)| (a.to_string(), n))
            .collect();
    assert_eq!(ledger.by_agreement, expected, "one payment per top-up, on the right agreement");
    assert_eq!(ledger.requests.get(&trade("lost", "agr_lost")), Some(&1));
    assert!(ledger.queries.get(&trade("lost", "agr_lost")).is_some_and(|n| *n >= 1));
    assert_eq!(ledger.requests.get(&trade("forged", "agr_forged")), Some(&2));
    assert_eq!(ledger.bad_signatures, 0, "the SDK verified every request");
    assert_eq!(ledger.problems, Vec::<String>::new());

    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let ended =
        notifications.wait_for("the notice of cancelled", |n| n.command_id == "cancelled").await?;
    assert_eq!(ended.parameters.get("reason").map(String::as_str), Some("agreement_ended"));
    platform.stop().await
}

/// The check is real: a request signed with another merchant's key is refused by the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_with_another_key_is_refused() -> anyhow::Result<()> {
    let (alipay, other) = tokio::try_join!(AlipayServer::start(), AlipayServer::start())?;
    let keys = tempfile::tempdir()?;
    // No Kafka: the connector is called directly.
    let base = topup_payment_worker::Config::new(topup_kafka::KafkaArgs::new("127.0.0.1:9"));
    let config = alipay_config(base, &alipay, &other.merchant_private_key, keys.path())?;
    let rails = config.gateway()?;
    let request = ChargeRequest {
        idempotency_key: "topup-wrong-key-pm-1".into(),
        token: "agr_ok".into(),
        kind: PaymentMethodKind::Alipay,
        amount: topup_domain::Money::new(topup_domain::Currency::parse("CNY")?, 5000),
        subscriber_id: "sub-1".into(),
        command_id: "wrong-key".into(),
    };
    // Alipay's refusal comes unsigned: it proves nothing, so the outcome is unknown (the
    // next method is never tried on it), and it names the cause.
    let outcome = rails.charge(&request).await;
    assert!(
        matches!(&outcome, ChargeOutcome::Unknown { detail } if detail.contains("isv.invalid-signature")),
        "{outcome:?}"
    );
    let ledger = alipay.ledger().await?;
    assert_eq!(ledger.bad_signatures, 1);
    assert_eq!(ledger.charges, HashMap::new());
    Ok(())
}
