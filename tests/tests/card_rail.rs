//! Cards through the Stripe connector, against stripe-mock (Stripe's own check of every
//! request's shape) behind a stateful Stripe of the tests: every answer ends in exactly one
//! result and at most one charge per top-up; a rule's card refused falls back to its Alipay
//! agreement on the Alipay rail.
use std::collections::HashMap;

use topup_proto::topics;
use topup_proto::v1::{
    FailureReason, NotificationCommand, PaymentMethod, PaymentMethodKind, RuleState, TopUpResult,
    TopUpStatus,
};
use topup_tests::alipay_server::AlipayServer;
use topup_tests::stripe_server::{StripeServer, SECRET_KEY};
use topup_tests::{command, Platform};

/// Payment worker settings: cards to the test Stripe at `url`, the rest to the sandbox.
fn stripe_config(platform: &Platform, url: &str) -> topup_payment_worker::Config {
    let mut config = platform.http_payment_config("http://127.0.0.1:9/unused");
    config.gateway = Some(topup_payment_worker::GatewayKind::Sandbox);
    config.card_rail = topup_payment_worker::CardRail::Stripe;
    config.stripe_api_url = url.to_string();
    config.stripe_secret_key = Some(SECRET_KEY.to_string().into());
    config
}

fn card(token: &str) -> String {
    format!("cus_test/{token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_stripe_answer_ends_in_one_result_and_at_most_one_charge() -> anyhow::Result<()> {
    let stripe = StripeServer::start().await?;
    let mut platform = Platform::cluster()?;
    let config = stripe_config(&platform, &stripe.url);
    platform.start_payment_worker(config.clone(), config.gateway()?);

    let cases: &[(&str, &[&str], TopUpStatus, FailureReason)] = &[
        ("approve", &["pm_card_visa"], TopUpStatus::Succeeded, FailureReason::Unspecified),
        ("decline", &["pm_card_chargeDeclined"], TopUpStatus::Failed, FailureReason::Declined),
        (
            "broke",
            &["pm_card_chargeDeclinedInsufficientFunds"],
            TopUpStatus::Failed,
            FailureReason::InsufficientFunds,
        ),
        (
            "expired",
            &["pm_card_chargeDeclinedExpiredCard"],
            TopUpStatus::Failed,
            FailureReason::CardExpired,
        ),
        (
            "challenge",
            &["pm_card_authenticationRequired"],
            TopUpStatus::Failed,
            FailureReason::AuthenticationRequired,
        ),
        (
            "fallback",
            &["pm_card_chargeDeclined", "pm_card_mastercard"],
            TopUpStatus::Succeeded,
            FailureReason::Unspecified,
        ),
        // Charged, but the answer is a 500: settled by the search, never charged again.
        (
            "lost",
            &["pm_test_lost", "pm_card_visa"],
            TopUpStatus::Succeeded,
            FailureReason::Unspecified,
        ),
        // Rate limited twice (nothing processed), then charged.
        ("busy", &["pm_test_busy2"], TopUpStatus::Succeeded, FailureReason::Unspecified),
    ];
    for (index, (id, tokens, _, _)) in cases.iter().enumerate() {
        let tokens: Vec<String> = tokens.iter().map(|t| card(t)).collect();
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        platform.publish_command(&command(&format!("sub-{index}"), id, &tokens), None).await?;
    }
    let expected: Vec<_> = cases.iter().map(|(id, _, status, why)| (*id, *status, *why)).collect();
    for result in platform.expect_results(&expected).await? {
        if result.status == TopUpStatus::Succeeded as i32 {
            assert!(result.gateway_reference.starts_with("pi_"), "{result:?}");
        }
    }
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;
    platform.wait_caught_up("topup-payment-worker-retries", &[topics::PAYMENT_RETRIES]).await?;
    let by_command = platform.results_by_command().await?;
    for (id, _, _, _) in cases {
        assert_eq!(by_command.get(*id).map(Vec::len), Some(1), "exactly one result for {id}");
    }
    let expected: HashMap<String, u32> =
        ["approve", "fallback", "lost", "busy"].into_iter().map(|id| (id.to_string(), 1)).collect();
    assert_eq!(stripe.charges_by_command(), expected);
    let lost_key = topup_tests::charge_key("lost", &card("pm_test_lost"));
    assert_eq!(stripe.charges().get(&lost_key), Some(&1));
    // The first search finds nothing (Stripe's lags): still unknown, asked again, found.
    assert!(stripe.searches() >= 2, "the lost answer was looked up until found");
    assert_eq!(stripe.requests(&topup_tests::charge_key("busy", &card("pm_test_busy2"))), 3);
    assert_eq!(stripe.shape_errors(), Vec::<String>::new(), "stripe-mock refused requests");

    // The cardholder is told to authenticate the card.
    let mut notifications = platform.reader::<NotificationCommand>(topics::NOTIFICATIONS)?;
    let challenge =
        notifications.wait_for("the notice of challenge", |n| n.command_id == "challenge").await?;
    assert_eq!(
        challenge.parameters.get("reason").map(String::as_str),
        Some("authentication_required")
    );
    platform.stop().await
}

/// The whole platform: a rule whose card Stripe declines tops up through its Alipay
/// agreement on the Alipay rail (checked by Alipay's SDK), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_card_falls_back_to_the_next_rail() -> anyhow::Result<()> {
    let (stripe, alipay) = tokio::try_join!(StripeServer::start(), AlipayServer::start())?;
    let mut platform = Platform::cluster()?;
    platform.start_evaluator();
    let mut config = stripe_config(&platform, &stripe.url);
    let keys = tempfile::tempdir()?;
    config.alipay_rail = topup_payment_worker::AlipayRail::Alipay;
    config.alipay_gateway_url = alipay.url.clone();
    config.alipay_app_id = Some("2021000000000001".into());
    for (file, key) in
        [("merchant.key", &alipay.merchant_private_key), ("alipay.pub", &alipay.alipay_public_key)]
    {
        std::fs::write(keys.path().join(file), key)?;
    }
    config.alipay_private_key_file = Some(keys.path().join("merchant.key"));
    config.alipay_public_key_file = Some(keys.path().join("alipay.pub"));
    platform.start_payment_worker(config.clone(), config.gateway()?);

    let mut rule =
        topup_tests::rule("sub-rails", &card("pm_card_chargeDeclined"), RuleState::Active);
    rule.payment_methods.push(PaymentMethod {
        token: "agr_rails_ok".into(),
        kind: PaymentMethodKind::Alipay as i32,
        label: "Alipay".into(),
        expires: String::new(),
        currency: "CNY".into(),
        method_id: String::new(),
    });
    platform.publish_rule(rule).await?;
    platform.publish_balance("sub-rails", 500, 1).await?;
    let mut results = platform.reader::<TopUpResult>(topics::RESULTS)?;
    let result = results.wait_for("the top-up", |r| r.subscriber_id == "sub-rails").await?.clone();
    assert_eq!(result.status, TopUpStatus::Succeeded as i32, "{result:?}");
    assert_eq!(
        result.payment_method.as_ref().map(|m| m.kind),
        Some(PaymentMethodKind::Alipay as i32),
        "{result:?}"
    );
    platform.wait_caught_up("topup-payment-worker", &[topics::COMMANDS]).await?;
    // Stripe was asked once and charged nothing; Alipay took one payment on the agreement.
    assert_eq!(stripe.charges_by_subscriber(), HashMap::new());
    let declined = topup_tests::charge_key(&result.command_id, &card("pm_card_chargeDeclined"));
    assert_eq!(stripe.requests(&declined), 1);
    assert_eq!(stripe.shape_errors(), Vec::<String>::new());
    let ledger = alipay.ledger().await?;
    assert_eq!(ledger.by_agreement.get("agr_rails_ok"), Some(&1), "{ledger:?}");
    assert_eq!(ledger.by_agreement.len(), 1, "{ledger:?}");
    assert_eq!(ledger.bad_signatures, 0);
    platform.stop().await
}
