//! The subscriber API over real HTTP: a draft, its code by SMS (through the notifier, from a
//! sealed record), confirmation, activation, a falling balance, the top-up in the history;
//! wrong, expired and locked codes; carrier limits; bad and oversized requests; the rate
//! limit; one subscriber kept out of another's data; a replayed record not doubling the
//! history — on SQLite, and on PostgreSQL (a real server, see `topup_tests::postgres`).
use std::time::Duration;

use prost::Message as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use topup_api::{issue, Role};
use topup_domain::{CodeKey, TokenKeys};
use topup_notifier::{Channels, Webhook, WebhookConfig};
use topup_proto::topics;
use topup_proto::v1::{TopUpCommand, TopUpResult};
use topup_tests::postgres::PgServer;
use topup_tests::webhook_server::{WebhookServer, SECRET};
use topup_tests::{Platform, WAIT};

const JWT_SECRET: &str = "a test secret of at least thirty-two bytes";

/// The platform (evaluator, payment worker, notifier with SMS) and the API on `database`.
struct World {
    platform: Platform,
    sms: WebhookServer,
    base: String,
    http: reqwest::Client,
    api: topup_api::Running,
    config: topup_api::Config,
}

fn token(subscriber: &str, role: Role) -> String {
    issue(JWT_SECRET.as_bytes(), subscriber, role, 3600).unwrap_or_default()
}

fn draft(phone: &str, amount_minor: i64) -> Value {
    json!({
        "threshold": { "currency": "CNY", "amountMinor": "1000" },
        "amount": { "currency": "CNY", "amountMinor": amount_minor.to_string() },
        "paymentMethods": [{
            "token": "tok_approve_4242", "kind": "PAYMENT_METHOD_KIND_CARD",
            "label": "4242", "expires": "2031-09", "currency": "CNY"
        }],
        "channels": [{ "kind": "CHANNEL_KIND_SMS", "address": phone }],
        "locale": "en",
        "carrierId": "cmcc"
    })
}

impl World {
    async fn start(
        database_url: &str,
        tune: impl FnOnce(&mut topup_api::Config),
    ) -> anyhow::Result<Self> {
        let mut platform = Platform::cluster()?;
        let key = CodeKey::random();
        let token_keys = TokenKeys::random("test");
        let mut evaluator = topup_evaluator::Config::new(platform.kafka.clone());
        evaluator.tick_ms = 100;
        platform.services.spawn(topup_evaluator::run(evaluator, platform.shutdown.clone()));
        let mut worker = topup_payment_worker::Config::new(platform.kafka.clone());
        worker.token_keys = Some(token_keys.clone());
        platform.start_payment_worker(worker, platform.gateway.clone());
        let sms = WebhookServer::start().await?;
        let mut notifier = platform.notifier_config();
        notifier.confirmation_code_key = Some(key.clone());
        let channels = Channels {
            email: None,
            sms: Some(Webhook::new(WebhookConfig {
                url: format!("{}/sms", sms.base),
                secret: SECRET.to_string().into(),
                timeout: Duration::from_secs(2),
            })?),
            push: None,
        };
        platform.start_notifier(notifier, channels);
        let mut config = topup_api::Config::new(
            platform.kafka.clone(),
            database_url,
            JWT_SECRET,
            key,
            token_keys,
        );
        config.addr = "127.0.0.1:0".parse()?;
        config.carrier_limits = "cmcc=2000-50000,*=100-100000".parse()?;
        tune(&mut config);
        let api = topup_api::start(config.clone(), platform.shutdown.clone()).await?;
        Ok(Self {
            platform,
            sms,
            base: format!("http://{}", api.addr),
            http: reqwest::Client::new(),
            api,
            config,
        })
    }

    /// Kills the API — every task of it ends wherever it is, nothing is shut down — and
    /// starts another on the same database.
    async fn kill_and_restart_api(&mut self) -> anyhow::Result<()> {
        self.api.task.abort();
        let killed = tokio::time::timeout(WAIT, &mut self.api.task).await?;
        anyhow::ensure!(killed.is_err_and(|e| e.is_cancelled()), "the API was not killed");
        self.api = topup_api::start(self.config.clone(), self.platform.shutdown.clone()).await?;
        self.base = format!("http://{}", self.api.addr);
        Ok(())
    }

    /// `phone` verified as `subscriber`'s contact with the code texted there (the `nth` code
    /// texted to it).
    async fn verify(
        &self,
        subscriber: &str,
        phone: &str,
        bearer: &str,
        nth: usize,
    ) -> anyhow::Result<()> {
        let path = format!("/v1/subscribers/{subscriber}/contacts");
        let contact = json!({ "kind": "CHANNEL_KIND_SMS", "address": phone });
        let (status, body) = self.call(Method::POST, &path, Some(bearer), Some(contact)).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "contact: {status} {body}");
        let code = self.code(phone, nth).await?;
        let verify = json!({ "kind": "CHANNEL_KIND_SMS", "address": phone, "code": code });
        let (status, body) =
            self.call(Method::POST, &format!("{path}/verify"), Some(bearer), Some(verify)).await?;
        anyhow::ensure!(
            status == StatusCode::OK && body["status"] == "verified",
            "{status} {body}"
        );
        Ok(())
    }

    /// A draft from `phone` (verified first), confirmed with the code texted there,
    /// activated.
    async fn active_rule(&self, subscriber: &str, phone: &str, bearer: &str) -> anyhow::Result<()> {
        let path = |p: &str| format!("/v1/subscribers/{subscriber}{p}");
        self.verify(subscriber, phone, bearer, 1).await?;
        let body = draft(phone, 5000);
        let (status, body) =
            self.call(Method::PUT, &path("/draft"), Some(bearer), Some(body)).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "draft: {status} {body}");
        let code = json!({ "code": self.code(phone, 2).await? });
        let (status, body) =
            self.call(Method::POST, &path("/draft/confirm"), Some(bearer), Some(code)).await?;
        anyhow::ensure!(status == StatusCode::OK, "confirm: {status} {body}");
        let (status, body) =
            self.call(Method::POST, &path("/rule/activate"), Some(bearer), None).await?;
        anyhow::ensure!(status == StatusCode::OK, "activate: {status} {body}");
        anyhow::ensure!(body["publication"] == "published", "activate: {body}");
        Ok(())
    }

    /// Stops the API (its history consumer leaves the group while Kafka is still there),
    /// then the services.
    async fn stop(self) -> anyhow::Result<()> {
        self.platform.shutdown.cancel();
        drop(self.http);
        tokio::time::timeout(WAIT, self.api.task).await???;
        self.platform.stop().await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(WAIT, request.send()).await??;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// The `nth` (1-based) confirmation code texted to `phone`.
    async fn code(&self, phone: &str, nth: usize) -> anyhow::Result<String> {
        let messages = self.sms.wait_for_kind(phone, "confirmation_code", nth).await?;
        let text = &messages[nth - 1].body.text;
        let code: String = text.chars().filter(char::is_ascii_digit).take(6).collect();
        anyhow::ensure!(code.len() == 6, "no code in {text:?}");
        Ok(code)
    }

    /// The rule as `GET .../rule` shows it, polled until `done` holds (at most [`WAIT`]).
    async fn rule_until(
        &self,
        subscriber: &str,
        bearer: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut every = tokio::time::interval(Duration::from_millis(250));
        let path = format!("/v1/subscribers/{subscriber}/rule");
        loop {
            every.tick().await;
            let (status, body) = self.call(Method::GET, &path, Some(bearer), None).await?;
            // The bearer's rate limit may answer a look: look again.
            let limited = status == StatusCode::TOO_MANY_REQUESTS;
            anyhow::ensure!(status == StatusCode::OK || limited, "rule: {status} {body}");
            if !limited && done(&body) {
                return Ok(body);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "never got there: {body}");
        }
    }

    /// The history, polled until `done` holds (at most [`WAIT`]).
    async fn history_until(
        &self,
        subscriber: &str,
        bearer: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let (status, page) = self
                .call(
                    Method::GET,
                    &format!("/v1/subscribers/{subscriber}/history"),
                    Some(bearer),
                    None,
                )
                .await?;
            anyhow::ensure!(status == StatusCode::OK, "history: {status} {page}");
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if done(&items) {
                return Ok(items);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "history never got there: {items:?}"
            );
        }
    }
}

/// Draft → code by SMS → confirm → activate → low balance → top-up in the history; the
/// other subscriber and the operator kept to what they may do; a replay changes nothing.
/// Both or neither: a rule change committed while Kafka cannot take it, and the API killed
/// before it could publish it. The change is in the outbox; the restarted API publishes it,
/// after the changes before it, and the evaluator acts on it: paused, a low balance brings
/// no top-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_change_committed_before_the_api_is_killed_reaches_kafka_after_the_restart(
) -> anyhow::Result<()> {
    use topup_proto::v1::{RuleState, RuleUpdated};
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("api.db").display());
    let mut world = World::start(&url, |_| {}).await?;
    let (subscriber, phone) = ("sub-outbox", "+8613800000077");
    let bearer = token(subscriber, Role::Subscriber);
    world.active_rule(subscriber, phone, &bearer).await?;

    // Kafka stops answering; the pause is committed to the database, not published.
    let broker = world.platform.kafka_cluster.brokers()[0];
    world.platform.kafka_cluster.broker_pause(broker)?;
    let pause = format!("/v1/subscribers/{subscriber}/rule/pause");
    let answer = world.call(Method::POST, &pause, Some(&bearer), None).await;
    // Killed before the relay could publish it.
    let killed = world.kill_and_restart_api().await;
    world.platform.kafka_cluster.broker_resume(broker)?;
    let (status, body) = answer?;
    killed?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "RULE_STATE_PAUSED");
    assert_eq!(body["publication"], "publishing", "Kafka could not have it yet: {body}");

    // The restarted API publishes it, after the activation.
    world.rule_until(subscriber, &bearer, |rule| rule["publication"] == "published").await?;
    let states: Vec<i32> = world
        .platform
        .read_all::<RuleUpdated>(topics::RULES)
        .await?
        .into_iter()
        .filter_map(|u| u.rule.filter(|r| r.subscriber_id == subscriber).map(|r| r.state))
        .collect();
    let mut changes = states.clone();
    changes.dedup(); // a record published twice (the killed API's last send) is one change
    let expected = [RuleState::Confirmed, RuleState::Active, RuleState::Paused].map(|s| s as i32);
    assert_eq!(changes, expected, "each change once and in order: {states:?}");

    // The evaluator has it: paused, a balance below the threshold brings no top-up.
    world.platform.publish_balance(subscriber, 500, 1).await?;
    world.platform.wait_caught_up("topup-evaluator", &[topics::RULES, topics::BALANCE]).await?;
    let commands = world.platform.read_all::<TopUpCommand>(topics::COMMANDS).await?;
    assert!(commands.iter().all(|c| c.subscriber_id != subscriber), "{commands:?}");
    world.stop().await
}

/// A rule the evaluator refuses — one in another currency than the subscriber's balance,
/// which the API cannot know — shows as `rejected: <reason>`, and the rule before it stays
/// in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_the_evaluator_refuses_shows_as_rejected_with_its_reason() -> anyhow::Result<()> {
    let world = World::start("sqlite::memory:", |_| {}).await?;
    let (subscriber, phone) = ("sub-usd", "+8613800000078");
    let bearer = token(subscriber, Role::Subscriber);
    // The carrier reports this subscriber's balance in US dollars.
    let mut usd = topup_tests::balance(subscriber, 2_000, 1);
    usd.balance = Some(topup_proto::v1::Money { currency: "USD".into(), amount_minor: 2_000 });
    world.platform.publish_raw(topics::BALANCE, subscriber, &usd.encode_to_vec()).await?;
    world.platform.wait_caught_up("topup-evaluator", &[topics::BALANCE]).await?;
    world.active_rule(subscriber, phone, &bearer).await?;

    let rejected =
        |rule: &Value| rule["publication"].as_str().is_some_and(|p| p.starts_with("rejected: "));
    let body = world.rule_until(subscriber, &bearer, rejected).await?;
    let reason = body["publication"].as_str().unwrap_or_default();
    assert!(reason.contains("USD") && reason.contains("CNY"), "{reason}");
    world.stop().await
}

/// Codes go only to verified contacts, and not often: a draft naming a number its
/// subscriber has not verified is refused (no code sent), the console is refused outside
/// the demo, codes are limited per subscriber and per destination whoever asks, and wrong
/// codes are capped per subscriber per day across contacts and drafts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_go_only_to_verified_contacts_and_are_limited_per_subscriber_and_destination(
) -> anyhow::Result<()> {
    let world = World::start("sqlite::memory:", |config| {
        config.codes_per_hour = 3;
        config.wrong_codes_per_day = 4;
    })
    .await?;
    let fay = token("sub-fay", Role::Subscriber);
    let phone = "+8613800000066";
    let path = |p: &str| format!("/v1/subscribers/sub-fay{p}");
    let sms = |code: &str| json!({ "kind": "CHANNEL_KIND_SMS", "address": phone, "code": code });

    // Not verified: refused, and nothing is texted.
    let (status, body) =
        world.call(Method::PUT, &path("/draft"), Some(&fay), Some(draft(phone, 5000))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "channels[0].address");
    let mut console = draft(phone, 5000);
    console["channels"] = json!([{ "kind": "CHANNEL_KIND_CONSOLE" }]);
    let (status, body) =
        world.call(Method::PUT, &path("/draft"), Some(&fay), Some(console)).await?;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("channels[0].kind")),
        "{body}"
    );

    // Verified with the code texted there (one wrong code first).
    let (status, body) =
        world.call(Method::POST, &path("/contacts"), Some(&fay), Some(sms(""))).await?;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::ACCEPTED, json!("awaiting_verification"))
    );
    let code = world.code(phone, 1).await?;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (status, body) =
        world.call(Method::POST, &path("/contacts/verify"), Some(&fay), Some(sms(wrong))).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("wrong_code"))
    );
    let (status, body) =
        world.call(Method::POST, &path("/contacts/verify"), Some(&fay), Some(sms(&code))).await?;
    assert_eq!((status, body["status"].clone()), (StatusCode::OK, json!("verified")), "{body}");
    let (_, listed) = world.call(Method::GET, &path("/contacts"), Some(&fay), None).await?;
    assert_eq!(listed["items"][0]["status"], "verified", "{listed}");

    // Three codes an hour: the contact's and two drafts'; the fourth is refused.
    for amount in [5000, 6000] {
        let (status, body) = world
            .call(Method::PUT, &path("/draft"), Some(&fay), Some(draft(phone, amount)))
            .await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let response = world
        .http
        .put(format!("{}{}", world.base, path("/draft")))
        .bearer_auth(&fay)
        .json(&draft(phone, 7000))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "too_many_codes", "{body}");
    // Another subscriber cannot have more codes sent to fay's number either.
    let gus = token("sub-gus", Role::Subscriber);
    let (status, body) = world
        .call(Method::POST, "/v1/subscribers/sub-gus/contacts", Some(&gus), Some(sms("")))
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("destination")), "{body}");
    // Wrong codes count per subscriber per day, whichever draft: one for the contact, three
    // for the draft make four, and then even the right code is refused.
    let code = world.code(phone, 3).await?;
    // Texted in order: had the refused drafts sent a code, it would be here by now.
    assert_eq!(world.sms.requests(phone), 3, "three codes texted, no more");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..3 {
        let (status, _) = world
            .call(Method::POST, &path("/draft/confirm"), Some(&fay), Some(json!({ "code": wrong })))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    }
    let (status, body) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&fay), Some(json!({ "code": code })))
        .await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::LOCKED, json!("codes_locked")),
        "{body}"
    );
    world.stop().await
}

async fn the_whole_flow(database_url: &str) -> anyhow::Result<()> {
    let logs = topup_tests::capture_logs();
    let world = World::start(database_url, |_| {}).await?;
    let alice = token("sub-alice", Role::Subscriber);
    let bob = token("sub-bob", Role::Subscriber);
    let care = token("care-desk", Role::Operator);
    let phone = "+8613800000001";
    let path = |p: &str| format!("/v1/subscribers/sub-alice{p}");

    // Below 10.00 add 50.00, and every month on today's date add 30.00.
    let today = topup_domain::calendar::civil_from_days(
        topup_kafka::now_timestamp().seconds.div_euclid(86_400),
    )
    .2;
    let mut body = draft(phone, 5000);
    body["monthly"] =
        json!({ "dayOfMonth": today, "amount": { "currency": "CNY", "amountMinor": "3000" } });
    world.verify("sub-alice", phone, &alice, 1).await?;
    let (status, body) = world.call(Method::PUT, &path("/draft"), Some(&alice), Some(body)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "awaiting_confirmation");
    assert_eq!(body["rule"]["paymentMethods"][0]["masked"], "card •••• 4242");
    assert!(!body.to_string().contains("tok_approve"), "the token never comes back: {body}");
    let code = world.code(phone, 2).await?;
    let contact_code = world.code(phone, 1).await?;

    // Nobody else confirms or reads Alice's draft; a wrong code costs an attempt.
    let confirm = |code: &str| json!({ "code": code });
    let (status, _) =
        world.call(Method::POST, &path("/draft/confirm"), Some(&bob), Some(confirm(&code))).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&care), Some(confirm(&code)))
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "operators change nothing");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (status, body) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&alice), Some(confirm(wrong)))
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "wrong_code");

    let (status, body) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&alice), Some(confirm(&code)))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "RULE_STATE_CONFIRMED");
    // Single use.
    let (status, _) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&alice), Some(confirm(&code)))
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    // Pausing needs an active rule.
    let (status, _) = world.call(Method::POST, &path("/rule/pause"), Some(&alice), None).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) =
        world.call(Method::POST, &path("/rule/activate"), Some(&alice), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "RULE_STATE_ACTIVE");

    // Today is the monthly day: that top-up comes. Then the balance falls: the evaluator
    // (which heard of the rule only through Kafka) tops up.
    world
        .history_until("sub-alice", &alice, |items| {
            items.iter().any(|i| i["trigger"] == "monthly" && i["status"] == "succeeded")
        })
        .await?;
    world.platform.publish_balance("sub-alice", 850, 1).await?;
    let items = world
        .history_until("sub-alice", &alice, |items| {
            items.len() == 2
                && items.iter().all(|i| {
                    i["status"] == "succeeded"
                        && i["notifications"].as_array().is_some_and(|n| {
                            n.contains(&json!("NOTIFICATION_KIND_TOP_UP_SUCCEEDED"))
                        })
                })
        })
        .await?;
    assert_eq!(items[0]["trigger"], "threshold", "newest first: {items:?}");
    assert_eq!(items[1]["trigger"], "monthly");

    // The card's token, given to the API in the clear, is on no topic and in no table in
    // the clear: sealed for alice from the draft on, opened only to charge it.
    let found = world.platform.find_in_topics(b"tok_approve_4242").await?;
    assert!(found.is_empty(), "the clear token is on {found:?}");
    let db = topup_api::Db::connect(database_url).await?;
    let stored = db.rule("sub-alice").await?.map(|r| r.rule).unwrap_or_default();
    let drafted = db.draft("sub-alice").await?.map(|d| d.rule).unwrap_or_default();
    for (what, rule) in [("rule", stored), ("draft", drafted)] {
        assert!(!rule.payment_methods.is_empty(), "{what}");
        for method in &rule.payment_methods {
            assert!(topup_domain::is_sealed(&method.token), "{what}: {}", method.token);
        }
    }
    // The codes travelled sealed: no notification record holds one.
    let notices = world
        .platform
        .read_all::<topup_proto::v1::NotificationCommand>(topics::NOTIFICATIONS)
        .await?;
    for notice in &notices {
        for (name, value) in &notice.parameters {
            assert!(value != &code && value != &contact_code, "a clear code in {name}");
        }
    }
    // Nor in any log line of the run (debug level and up), nor either code.
    let logged = logs.text();
    for line in ["contact verified", "rule confirmed", "top-up charged"] {
        assert!(logged.contains(line), "the logs were captured ({line:?}): {logged}");
    }
    assert!(!logged.contains("tok_approve_4242"), "a clear token in the logs");
    for code in [&code, &contact_code] {
        let digits = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
        let in_logs = logged.match_indices(code.as_str()).any(|(at, _)| {
            !digits(logged[..at].chars().next_back()) && !digits(logged[at + 6..].chars().next())
        });
        assert!(!in_logs, "a confirmation code ({code}) in the logs");
    }
    assert_eq!(items[1]["amount"]["amountMinor"], "3000");
    let item = &items[0];
    assert_eq!(item["amount"], json!({ "currency": "CNY", "amountMinor": "5000" }));
    assert_eq!(item["method"], "card •••• 4242");
    assert_eq!(item["trigger"], "threshold");
    assert_eq!(
        item["notifications"],
        json!(["NOTIFICATION_KIND_TOP_UP_STARTED", "NOTIFICATION_KIND_TOP_UP_SUCCEEDED"]),
        "what Alice was told about it"
    );
    assert!(item["completedAt"].is_string() && item["issuedAt"].is_string(), "{item}");

    // Replay: the command and the result once more. The history consumer reads them (its
    // group catches up) and still shows one top-up.
    let command = world.platform.read_all::<TopUpCommand>(topics::COMMANDS).await?;
    let result = world.platform.read_all::<TopUpResult>(topics::RESULTS).await?;
    for c in &command {
        world.platform.publish_raw(topics::COMMANDS, &c.subscriber_id, &c.encode_to_vec()).await?;
    }
    for r in &result {
        world.platform.publish_raw(topics::RESULTS, &r.subscriber_id, &r.encode_to_vec()).await?;
    }
    world
        .platform
        .wait_caught_up("topup-api-history", &[topics::COMMANDS, topics::RESULTS])
        .await?;
    let (_, page) = world.call(Method::GET, &path("/history"), Some(&alice), None).await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "a replay adds no row: {page}");
    assert_eq!(page["items"][0]["status"], "succeeded");

    // Bob sees none of it; the operator reads it; the CSV has the row.
    for p in ["/history", "/history.csv", "/rule", "/draft"] {
        let (status, _) = world.call(Method::GET, &path(p), Some(&bob), None).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "bob reading {p}");
        let (status, _) = world.call(Method::GET, &path(p), Some(&care), None).await?;
        assert_eq!(status, StatusCode::OK, "the operator reading {p}");
    }
    for (method, p) in
        [(Method::POST, "/rule/pause"), (Method::DELETE, "/rule"), (Method::PUT, "/draft")]
    {
        let body = (method == Method::PUT).then(|| draft("+8613800000002", 5000));
        let (status, _) = world.call(method.clone(), &path(p), Some(&bob), body).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "bob changing {method} {p}");
    }
    let (status, csv) = world.call(Method::GET, &path("/history.csv"), Some(&alice), None).await?;
    assert_eq!(status, StatusCode::OK);
    let csv = csv.as_str().unwrap_or_default().to_string();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "command_id,issued_at,amount,currency,method,status,reason,completed_at");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].contains(",50.00,CNY,card •••• 4242,succeeded,"), "{csv}");
    assert!(lines[2].contains(",30.00,CNY,card •••• 4242,succeeded,"), "{csv}");

    // Pause, resume, delete.
    let (status, body) = world.call(Method::POST, &path("/rule/pause"), Some(&alice), None).await?;
    assert_eq!((status, body["state"].clone()), (StatusCode::OK, json!("RULE_STATE_PAUSED")));
    let (status, body) =
        world.call(Method::POST, &path("/rule/resume"), Some(&alice), None).await?;
    assert_eq!((status, body["state"].clone()), (StatusCode::OK, json!("RULE_STATE_ACTIVE")));
    let (status, _) = world.call(Method::DELETE, &path("/rule"), Some(&alice), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = world.call(Method::GET, &path("/rule"), Some(&alice), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    world.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_draft_to_a_top_up_in_the_history_on_sqlite() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("topup-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite://{}?mode=rwc", dir.join("api.db").display());
    let ran = the_whole_flow(&url).await;
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_draft_to_a_top_up_in_the_history_on_postgresql() -> anyhow::Result<()> {
    let server = PgServer::start("topup_api_flow").await?;
    the_whole_flow(&server.url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_expire_and_lock_and_bad_requests_get_clear_errors() -> anyhow::Result<()> {
    let world = World::start("sqlite::memory:", |config| {
        config.code_max_attempts = 3;
        config.code_lock_secs = 600;
        config.max_body_bytes = 4096;
    })
    .await?;
    let carol = token("sub-carol", Role::Subscriber);
    let phone = "+8613800000003";
    let path = |p: &str| format!("/v1/subscribers/sub-carol{p}");
    let confirm = |code: &str| Some(json!({ "code": code }));

    // Three wrong codes lock the draft; then even the right code is refused, and so is a
    // new draft, until the lock ends.
    world.verify("sub-carol", phone, &carol, 1).await?;
    let (status, _) =
        world.call(Method::PUT, &path("/draft"), Some(&carol), Some(draft(phone, 5000))).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let code = world.code(phone, 2).await?;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for left in [2, 1] {
        let (status, body) =
            world.call(Method::POST, &path("/draft/confirm"), Some(&carol), confirm(wrong)).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("{left} attempts left")),
            "{body}"
        );
    }
    let (status, body) =
        world.call(Method::POST, &path("/draft/confirm"), Some(&carol), confirm(wrong)).await?;
    assert_eq!(status, StatusCode::LOCKED, "{body}");
    assert_eq!(body["error"]["code"], "draft_locked");
    let (status, _) =
        world.call(Method::POST, &path("/draft/confirm"), Some(&carol), confirm(&code)).await?;
    assert_eq!(status, StatusCode::LOCKED, "the right code after the lock");
    let (status, _) =
        world.call(Method::PUT, &path("/draft"), Some(&carol), Some(draft(phone, 5000))).await?;
    assert_eq!(status, StatusCode::LOCKED, "a new draft while locked");
    let (status, body) = world.call(Method::GET, &path("/draft"), Some(&carol), None).await?;
    assert_eq!((status, body["status"].clone()), (StatusCode::OK, json!("locked")));
    let (status, _) = world.call(Method::GET, &path("/rule"), Some(&carol), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was published");

    // A replaced draft: the first code stops working, the second works.
    let dave = token("sub-dave", Role::Subscriber);
    let dave_path = |p: &str| format!("/v1/subscribers/sub-dave{p}");
    let dave_phone = "+8613800000004";
    world.verify("sub-dave", dave_phone, &dave, 1).await?;
    world
        .call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(draft(dave_phone, 5000)))
        .await?;
    let first = world.code(dave_phone, 2).await?;
    world
        .call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(draft(dave_phone, 6000)))
        .await?;
    let second = world.code(dave_phone, 3).await?;
    if first != second {
        let (status, _) = world
            .call(Method::POST, &dave_path("/draft/confirm"), Some(&dave), confirm(&first))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "the replaced draft's code");
    }
    let (status, body) = world
        .call(Method::POST, &dave_path("/draft/confirm"), Some(&dave), confirm(&second))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["amount"]["amountMinor"], "6000");

    // Carrier limits, validation, JSON, size, authentication.
    let (status, body) = world
        .call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(draft(dave_phone, 1000)))
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "outside_carrier_limits");
    assert_eq!(body["error"]["field"], "amount");
    assert!(
        body["error"]["message"].as_str().unwrap_or_default().contains("minimum of 20.00 CNY"),
        "{body}"
    );
    let mut bad = draft(dave_phone, 5000);
    bad["amount"]["currency"] = json!("USD");
    let (status, body) =
        world.call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(bad)).await?;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("amount"))
    );
    let mut expired = draft(dave_phone, 5000);
    expired["paymentMethods"][0]["expires"] = json!("2020-01");
    let (status, body) =
        world.call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(expired)).await?;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("payment_methods[0].expires"))
    );
    let (status, body) = world
        .call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(json!({"threshold": 3})))
        .await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_json"))
    );
    let mut huge = draft(dave_phone, 5000);
    huge["locale"] = json!("x".repeat(8000));
    let (status, body) =
        world.call(Method::PUT, &dave_path("/draft"), Some(&dave), Some(huge)).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::PAYLOAD_TOO_LARGE, json!("payload_too_large"))
    );
    let (status, _) = world.call(Method::GET, &dave_path("/rule"), None, None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let forged =
        issue(b"not the secret, but just as long as it", "sub-dave", Role::Subscriber, 60)?;
    let (status, _) = world.call(Method::GET, &dave_path("/rule"), Some(&forged), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    world.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_is_refused_and_the_rate_limit_holds() -> anyhow::Result<()> {
    // Draft codes that expire at once, and seven requests a minute.
    let world = World::start("sqlite::memory:", |config| {
        config.code_ttl_secs = 0;
        config.rate_limit_per_minute = 7;
    })
    .await?;
    let erin = token("sub-erin", Role::Subscriber);
    let phone = "+8613800000005";
    let path = |p: &str| format!("/v1/subscribers/sub-erin{p}");
    // Two requests: the contact, its code.
    world.verify("sub-erin", phone, &erin, 1).await?;
    let (status, _) =
        world.call(Method::PUT, &path("/draft"), Some(&erin), Some(draft(phone, 5000))).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let code = world.code(phone, 2).await?;
    let (status, body) = world
        .call(Method::POST, &path("/draft/confirm"), Some(&erin), Some(json!({ "code": code })))
        .await?;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::GONE, json!("code_expired")));
    // Four requests made; three more pass, the eighth is refused with a Retry-After.
    for _ in 0..3 {
        let (status, _) = world.call(Method::GET, &path("/draft"), Some(&erin), None).await?;
        assert_eq!(status, StatusCode::OK);
    }
    let response = world
        .http
        .get(format!("{}{}", world.base, path("/draft")))
        .bearer_auth(&erin)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    // The document the API serves describes every route it has (no token needed).
    let spec = world.http.get(format!("{}/openapi.yaml", world.base)).send().await?.text().await?;
    for route in [
        "/v1/subscribers/{subscriberId}/draft:",
        "/v1/subscribers/{subscriberId}/draft/confirm:",
        "/v1/subscribers/{subscriberId}/contacts:",
        "/v1/subscribers/{subscriberId}/contacts/verify:",
        "/v1/subscribers/{subscriberId}/rule:",
        "/v1/subscribers/{subscriberId}/rule/activate:",
        "/v1/subscribers/{subscriberId}/rule/pause:",
        "/v1/subscribers/{subscriberId}/rule/resume:",
        "/v1/subscribers/{subscriberId}/history:",
        "/v1/subscribers/{subscriberId}/history.csv:",
        "/healthz:",
        "/readyz:",
        "/metrics:",
    ] {
        assert!(spec.contains(route), "deploy/openapi.yaml has no {route}");
    }
    // Another subscriber has a budget of their own.
    let (status, _) = world
        .call(
            Method::GET,
            "/v1/subscribers/sub-frank/rule",
            Some(&token("sub-frank", Role::Subscriber)),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    world.stop().await
}

/// The history store on both databases: newest first, cursor pages, idempotent records in
/// either order.
async fn history_pages(url: &str) -> anyhow::Result<()> {
    use topup_api::store::TopUpRow;
    let db = topup_api::Db::connect(url).await?;
    let row = |i: i64| TopUpRow {
        command_id: format!("cmd-{i}"),
        subscriber_id: "sub-1".into(),
        amount_minor: 1000 * i,
        currency: "CNY".into(),
        status: "pending".into(),
        reason: String::new(),
        method: String::new(),
        trigger: "threshold".into(),
        cause_sequence: i,
        observed_at_ms: 1_000 * i,
        issued_at_ms: 1_000 * i + 5,
        completed_at_ms: 0,
    };
    for i in 1..=5 {
        db.record_command(&row(i)).await?;
    }
    // A result before its command, and records read twice.
    let mut done = row(6);
    done.status = "failed".into();
    done.reason = "FAILURE_REASON_DECLINED".into();
    done.completed_at_ms = 9_000;
    done.issued_at_ms = 9_000;
    db.record_result(&done).await?;
    db.record_command(&row(6)).await?;
    db.record_result(&done).await?;
    db.record_command(&row(3)).await?;
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = db.history("sub-1", cursor.clone(), 2).await?;
        ids.extend(page.iter().map(|r| r.command_id.clone()));
        match page.last() {
            Some(last) if page.len() == 2 => {
                cursor = Some((last.issued_at_ms, last.command_id.clone()))
            }
            _ => break,
        }
    }
    assert_eq!(ids, ["cmd-6", "cmd-5", "cmd-4", "cmd-3", "cmd-2", "cmd-1"]);
    let six = &db.history("sub-1", None, 1).await?[0];
    assert_eq!((six.status.as_str(), six.reason.as_str()), ("failed", "FAILURE_REASON_DECLINED"));
    assert_eq!(six.issued_at_ms, 6_005, "the command's time replaces the result's");
    assert!(db.history("sub-2", None, 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_history_pages_newest_first_on_both_databases() -> anyhow::Result<()> {
    history_pages("sqlite::memory:").await?;
    let server = PgServer::start("topup_api_pages").await?;
    history_pages(&server.url).await
}
