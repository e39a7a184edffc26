//! The HTTP handlers. Each one: who asks (bearer token, rate limit), may they (their own
//! subscriber, or an operator reading), is the input valid (the domain's rules, the
//! carrier's limits), then the change — in a database transaction that commits only once
//! Kafka has the record.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use serde::Deserialize;
use serde_json::{json, Value};
use topup_domain::{Money, Notice, Rule, SubscriberId, ValidationError};
use topup_proto::topics;
use topup_proto::v1::{AutoTopUpRule, NotificationKind, RuleState, RuleUpdated};

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::store::{Db, Draft, StoredRule, TopUpRow};
use crate::App;

const AWAITING: &str = "awaiting_confirmation";
const CONFIRMED: &str = "confirmed";

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn rfc3339(ms: i64) -> Value {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) if ms > 0 => json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        _ => Value::Null,
    }
}

pub(crate) fn timestamp(ms: i64) -> topup_proto::Timestamp {
    topup_proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub(crate) fn body_of(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid_json(rejection.body_text())
        }
    })
}

/// The request's JSON body as a `T`, or 413 (too large) / 400 saying what was expected.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
    expected: &str,
) -> Result<T, ApiError> {
    let body = body_of(body, app.settings.max_body_bytes)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_json(format!("expected {expected}: {e}")))
}

pub(crate) fn subscriber_of(raw: &str) -> Result<SubscriberId, ApiError> {
    SubscriberId::parse(raw).map_err(ApiError::invalid)
}

fn state_name(state: i32) -> &'static str {
    RuleState::try_from(state).map_or("RULE_STATE_UNSPECIFIED", |s| s.as_str_name())
}

/// The rule as the API shows it: proto3 JSON, payment tokens replaced by masked labels.
fn rule_view(rule: &AutoTopUpRule, updated_at_ms: i64) -> Value {
    let mut view = serde_json::to_value(rule).unwrap_or(Value::Null);
    if let Some(methods) = view.get_mut("paymentMethods").and_then(Value::as_array_mut) {
        for (method, raw) in methods.iter_mut().zip(&rule.payment_methods) {
            if let Some(object) = method.as_object_mut() {
                object.remove("token");
                object.insert("masked".into(), json!(crate::history::masked_method(raw)));
            }
        }
    }
    if let Some(object) = view.as_object_mut() {
        object.insert("subscriberId".into(), json!(rule.subscriber_id));
        object.insert("state".into(), json!(state_name(rule.state)));
        object.insert("updatedAt".into(), rfc3339(updated_at_ms));
    }
    view
}

fn draft_view(app: &App, draft: &Draft, now: i64) -> Value {
    let locked = draft.locked_until_ms > now;
    let mut view = json!({
        "subscriberId": draft.subscriber_id,
        "status": if locked { "locked" } else { draft.status.as_str() },
        "codeExpiresAt": rfc3339(draft.code_expires_ms),
        "attemptsLeft": (app.settings.code_max_attempts - draft.attempts).max(0),
        "rule": rule_view(&draft.rule, draft.updated_at_ms),
    });
    if locked {
        view["lockedUntil"] = rfc3339(draft.locked_until_ms);
    }
    view
}

impl App {
    pub(crate) async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<(), ApiError> {
        self.producer
            .send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| ApiError::unavailable("publishing to Kafka", e))
    }

    /// After the commit that put `version` of `subscriber`'s rule in the outbox: wakes the
    /// relay and waits a little for it, so that an answer normally finds the change on
    /// Kafka. Answers the rule's publication (see [`publication`]).
    async fn relayed(&self, subscriber: &str, version: i64) -> &'static str {
        self.outbox.wake();
        if self.outbox.until_published(&self.db, subscriber, version, PUBLISH_WAIT).await {
            "published"
        } else {
            "publishing"
        }
    }
}

/// How long a rule change's answer waits for the relay to publish it (it is committed, and
/// will be published, either way).
const PUBLISH_WAIT: Duration = Duration::from_secs(3);

/// The `RuleUpdated` record of `rule` as changed at `now` (milliseconds).
fn rule_record(rule: &AutoTopUpRule, now: i64) -> Vec<u8> {
    RuleUpdated { rule: Some(rule.clone()), updated_at: Some(timestamp(now)) }.encode_to_vec()
}

/// What became of a stored rule's last change: `publishing` (committed, on its way to
/// Kafka), `published`, or `rejected: <reason>` (the evaluator refused it; the rule before
/// it stays in force).
async fn publication(app: &App, stored: &StoredRule) -> Result<String, ApiError> {
    if !stored.rejected.is_empty() {
        return Ok(format!("rejected: {}", stored.rejected));
    }
    let waiting = app.db.in_outbox(&stored.rule.subscriber_id, stored.version).await?;
    Ok(if waiting { "publishing" } else { "published" }.to_string())
}

fn with_publication(mut view: Value, publication: &str) -> Value {
    if let Some(object) = view.as_object_mut() {
        object.insert("publication".into(), json!(publication));
    }
    view
}

/// Checks a draft rule as the evaluator will, then against the carrier's limits.
fn validate(app: &App, raw: &AutoTopUpRule, today: i64) -> Result<Rule, ApiError> {
    let rule = Rule::try_from(raw).map_err(ApiError::invalid)?;
    if rule.channels.is_empty() {
        return Err(ApiError::invalid(ValidationError::new(
            "channels",
            "at least one is needed: the confirmation code is sent there",
        )));
    }
    app.limits.check(&rule).map_err(ApiError::outside_limits)?;
    for (i, method) in rule.payment_methods.iter().enumerate() {
        if let Some(expires) = method.expires {
            if expires.end_day() <= today {
                return Err(ApiError::invalid(ValidationError::new(
                    format!("payment_methods[{i}].expires"),
                    format!("{expires} has passed: the method cannot be charged"),
                )));
            }
        }
    }
    Ok(rule)
}

/// The notification that carries `code` (sealed) to `channels` for `subscriber`: urgent,
/// valid `ttl`; `about` names what it confirms (its id is derived from it).
pub(crate) fn code_notice(
    app: &App,
    subscriber: &SubscriberId,
    about: &str,
    (locale, channels): (&str, &[topup_proto::v1::NotificationChannel]),
    code: &str,
    ttl: Duration,
    now: i64,
) -> topup_proto::v1::NotificationCommand {
    Notice::new(NotificationKind::ConfirmationCode, subscriber, about, timestamp(now))
        .to(locale, channels)
        .urgent(true)
        .parameter(
            topup_domain::SEALED_CODE_PARAMETER,
            app.code_key.seal(subscriber.as_str(), code),
        )
        .parameter("minutes", (ttl.as_secs() / 60).max(1).to_string())
        .build()
}

pub(crate) fn six_digits() -> String {
    format!("{:06}", rand::random_range(0..1_000_000u32))
}

/// `PUT /v1/subscribers/{id}/draft`.
pub(crate) async fn put_draft(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Write)?;
    let subscriber = subscriber_of(&subscriber)?;
    let body = body_of(body, app.settings.max_body_bytes)?;
    let mut raw: AutoTopUpRule = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_json(format!("the body is not an auto top-up rule in proto3 JSON: {e}"))
    })?;
    if !raw.subscriber_id.is_empty() && raw.subscriber_id != subscriber.as_str() {
        return Err(ApiError::invalid(ValidationError::new(
            "subscriber_id",
            "differs from the subscriber in the path",
        )));
    }
    raw.subscriber_id = subscriber.to_string();
    raw.state = RuleState::Draft as i32;
    if let Some(i) = raw.payment_methods.iter().position(|m| topup_domain::is_sealed(&m.token)) {
        return Err(ApiError::invalid(ValidationError::new(
            format!("payment_methods[{i}].token"),
            "must be the gateway's token as the gateway gave it",
        )));
    }
    let now = now_ms();
    let rule = validate(&app, &raw, now.div_euclid(86_400_000))?;
    crate::contacts::check_channels(&app, subscriber.as_str(), &raw.channels).await?;
    let destinations: Vec<String> = raw
        .channels
        .iter()
        .map(|c| {
            let kind = topup_proto::v1::ChannelKind::try_from(c.kind)
                .unwrap_or(topup_proto::v1::ChannelKind::Unspecified);
            crate::contacts::destination(kind.as_str_name(), &c.address)
        })
        .collect();
    crate::contacts::allow_codes(&app, subscriber.as_str(), &destinations, now).await?;
    // Checked in the clear; from here on (database, Kafka) only sealed, for this subscriber.
    for method in &mut raw.payment_methods {
        method.token = app.token_keys.seal(subscriber.as_str(), &method.token);
    }
    let existing = app.db.draft(subscriber.as_str()).await?;
    if let Some(draft) = &existing {
        if draft.locked_until_ms > now {
            return Err(ApiError::locked(((draft.locked_until_ms - now) / 1000) as u64));
        }
    }
    let code = six_digits();
    let draft = Draft {
        subscriber_id: subscriber.to_string(),
        rule: raw,
        status: AWAITING.into(),
        code_hash: app.code_key.hash(subscriber.as_str(), &code),
        code_expires_ms: now + app.settings.code_ttl.as_millis() as i64,
        attempts: 0,
        locked_until_ms: 0,
        version: existing.as_ref().map_or(0, |d| d.version),
        updated_at_ms: now,
    };
    let about = format!("confirmation-code/{}", draft.code_hash);
    let to = (rule.locale.as_str(), draft.rule.channels.as_slice());
    let notification =
        code_notice(&app, &subscriber, &about, to, &code, app.settings.code_ttl, now);
    let mut tx = app.db.pool().begin().await?;
    if !Db::save_draft(&mut tx, &draft).await? {
        return Err(ApiError::conflict("the draft was changed by another request; try again"));
    }
    for to in &destinations {
        Db::code_sent(&mut tx, subscriber.as_str(), to, now).await?;
    }
    app.publish(topics::NOTIFICATIONS, subscriber.as_str(), notification.encode_to_vec()).await?;
    tx.commit().await?;
    tracing::info!(%subscriber, "draft saved; confirmation code sent");
    let saved = Draft { version: draft.version + 1, ..draft };
    Ok((StatusCode::ACCEPTED, Json(draft_view(&app, &saved, now))).into_response())
}

/// `GET /v1/subscribers/{id}/draft`.
pub(crate) async fn get_draft(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Read)?;
    let draft = app.db.draft(&subscriber).await?.ok_or_else(|| ApiError::not_found("no draft"))?;
    Ok(Json(draft_view(&app, &draft, now_ms())))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConfirmBody {
    code: String,
}

/// `POST /v1/subscribers/{id}/draft/confirm`.
pub(crate) async fn confirm(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Write)?;
    let ConfirmBody { code } = json_body(&app, body, r#"{"code": "123456"}"#)?;
    let now = now_ms();
    crate::contacts::accept_codes(&app, &subscriber, now).await?;
    let mut draft = app
        .db
        .draft(&subscriber)
        .await?
        .ok_or_else(|| ApiError::not_found("no draft to confirm; PUT one first"))?;
    if draft.locked_until_ms > now {
        return Err(ApiError::locked(((draft.locked_until_ms - now) / 1000) as u64));
    }
    if draft.status == CONFIRMED || draft.code_hash.is_empty() {
        return Err(ApiError::conflict(
            "this draft's code was used or withdrawn; PUT the draft again for a new code",
        ));
    }
    if now > draft.code_expires_ms {
        return Err(ApiError::code_expired());
    }
    let mut conn = app.db.pool().acquire().await?;
    if !app.code_key.matches(&subscriber, code.trim(), &draft.code_hash) {
        Db::wrong_code(&mut conn, &subscriber, now).await?;
        draft.attempts += 1;
        let locks = draft.attempts >= app.settings.code_max_attempts;
        if locks {
            // The code is withdrawn too: after the lock, only a new code confirms.
            draft.locked_until_ms = now + app.settings.code_lock.as_millis() as i64;
            draft.code_hash.clear();
        }
        let left = app.settings.code_max_attempts - draft.attempts;
        if !Db::save_draft(&mut conn, &draft).await? {
            return Err(ApiError::conflict("the draft was changed by another request; try again"));
        }
        tracing::warn!(%subscriber, attempts = draft.attempts, locked = locks, "wrong confirmation code");
        return Err(if locks {
            ApiError::locked(app.settings.code_lock.as_secs())
        } else {
            ApiError::wrong_code(left)
        });
    }
    drop(conn);
    // The right code: used up, the rule confirmed and published.
    draft.status = CONFIRMED.into();
    draft.code_hash.clear();
    draft.updated_at_ms = now;
    let mut rule = draft.rule.clone();
    rule.state = RuleState::Confirmed as i32;
    let version = app.db.rule(&subscriber).await?.map_or(0, |r| r.version);
    let mut tx = app.db.pool().begin().await?;
    if !Db::save_draft(&mut tx, &draft).await?
        || !Db::save_rule(&mut tx, &rule, state_name(rule.state), version, now).await?
    {
        return Err(ApiError::conflict("the draft was changed by another request; try again"));
    }
    // In the same transaction: the change reaches Kafka even if this process dies now.
    Db::enqueue(&mut tx, &subscriber, version + 1, &rule_record(&rule, now), now).await?;
    tx.commit().await?;
    let publication = app.relayed(&subscriber, version + 1).await;
    tracing::info!(%subscriber, publication, "rule confirmed");
    Ok(Json(with_publication(rule_view(&rule, now), publication)))
}

async fn current_rule(app: &App, subscriber: &str) -> Result<StoredRule, ApiError> {
    app.db
        .rule(subscriber)
        .await?
        .filter(|r| r.rule.state != RuleState::Deleted as i32)
        .ok_or_else(|| ApiError::not_found("no rule; PUT a draft and confirm it first"))
}

/// `GET /v1/subscribers/{id}/rule`.
pub(crate) async fn get_rule(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Read)?;
    let stored = current_rule(&app, &subscriber).await?;
    let publication = publication(&app, &stored).await?;
    Ok(Json(with_publication(rule_view(&stored.rule, stored.updated_at_ms), &publication)))
}

/// Moves the rule from one of `from` to `to`, publishing it.
async fn transition(
    app: &App,
    subscriber: &str,
    headers: &HeaderMap,
    from: &[RuleState],
    to: RuleState,
) -> Result<(AutoTopUpRule, &'static str), ApiError> {
    let claims = app.gate.admit(headers)?;
    authorize(&claims, subscriber, Access::Write)?;
    let stored = current_rule(app, subscriber).await?;
    if !from.iter().any(|s| *s as i32 == stored.rule.state) {
        return Err(ApiError::conflict(format!(
            "the rule is {}; this needs it to be {}",
            state_name(stored.rule.state),
            from.iter().map(|s| s.as_str_name()).collect::<Vec<_>>().join(" or ")
        )));
    }
    let now = now_ms();
    let mut rule = stored.rule;
    rule.state = to as i32;
    let mut tx = app.db.pool().begin().await?;
    if !Db::save_rule(&mut tx, &rule, to.as_str_name(), stored.version, now).await? {
        return Err(ApiError::conflict("the rule was changed by another request; try again"));
    }
    // In the same transaction: the change reaches Kafka even if this process dies now.
    let version = stored.version + 1;
    Db::enqueue(&mut tx, subscriber, version, &rule_record(&rule, now), now).await?;
    tx.commit().await?;
    let publication = app.relayed(subscriber, version).await;
    tracing::info!(%subscriber, state = to.as_str_name(), publication, "rule changed");
    Ok((rule, publication))
}

/// What `POST /v1/subscribers/{id}/rule/{action}` does: the states it applies in, the
/// state it leads to.
const ACTIONS: &[(&str, &[RuleState], RuleState)] = &[
    ("activate", &[RuleState::Confirmed, RuleState::Paused], RuleState::Active),
    ("pause", &[RuleState::Active], RuleState::Paused),
    ("resume", &[RuleState::Paused], RuleState::Active),
];

/// `POST /v1/subscribers/{id}/rule/activate` | `pause` | `resume`.
pub(crate) async fn change_rule(
    State(app): State<App>,
    Path((subscriber, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let Some((_, from, to)) = ACTIONS.iter().find(|(name, _, _)| *name == action) else {
        // Authenticated like any request before it is told there is no such action.
        app.gate.admit(&headers)?;
        return Err(ApiError::not_found(format!(
            "no action {action:?}: activate, pause or resume"
        )));
    };
    let (rule, publication) = transition(&app, &subscriber, &headers, from, *to).await?;
    Ok(Json(with_publication(rule_view(&rule, now_ms()), publication)))
}

/// `DELETE /v1/subscribers/{id}/rule`.
pub(crate) async fn delete_rule(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let from = [RuleState::Draft, RuleState::Confirmed, RuleState::Active, RuleState::Paused];
    transition(&app, &subscriber, &headers, &from, RuleState::Deleted).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub(crate) struct Page {
    limit: Option<i64>,
    cursor: Option<String>,
}

fn encode_cursor(row: &TopUpRow) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.issued_at_ms, row.command_id))
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::invalid(ValidationError::new("cursor", "is not a cursor this API gave"));
    let text =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(text).map_err(|_| bad())?;
    let (issued, command) = text.split_once(':').ok_or_else(bad)?;
    Ok((issued.parse().map_err(|_| bad())?, command.to_string()))
}

fn decimal(minor: i64, currency: &str) -> String {
    topup_domain::Currency::parse(currency)
        .map(|c| Money::new(c, minor).decimal())
        .unwrap_or_else(|_| minor.to_string())
}

fn item_view(row: &TopUpRow) -> Value {
    let mut item = json!({
        "commandId": row.command_id,
        "amount": { "currency": row.currency, "amountMinor": row.amount_minor.to_string() },
        "method": row.method,
        "status": row.status,
        "reason": row.reason,
        "trigger": row.trigger,
        "causeSequence": row.cause_sequence.to_string(),
        "observedAt": rfc3339(row.observed_at_ms),
        "issuedAt": rfc3339(row.issued_at_ms),
    });
    if row.completed_at_ms > 0 {
        item["completedAt"] = rfc3339(row.completed_at_ms);
    }
    item
}

/// `GET /v1/subscribers/{id}/history`.
pub(crate) async fn history(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Read)?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid(ValidationError::new("limit", "must be 1 to 200")));
    }
    let cursor = page.cursor.as_deref().map(decode_cursor).transpose()?;
    let rows = app.db.history(&subscriber, cursor, limit).await?;
    let next = (rows.len() as i64 == limit).then(|| rows.last().map(encode_cursor)).flatten();
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut item = item_view(row);
        item["notifications"] = json!(app.db.notifications_about(&row.command_id).await?);
        items.push(item);
    }
    Ok(Json(json!({ "items": items, "nextCursor": next })))
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// `GET /v1/subscribers/{id}/history.csv`: every top-up, newest first.
pub(crate) async fn history_csv(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Read)?;
    let mut csv =
        String::from("command_id,issued_at,amount,currency,method,status,reason,completed_at\n");
    let mut cursor = None;
    loop {
        let rows = app.db.history(&subscriber, cursor, 500).await?;
        for row in &rows {
            let time = |ms| rfc3339(ms).as_str().unwrap_or_default().to_string();
            let fields = [
                row.command_id.clone(),
                time(row.issued_at_ms),
                decimal(row.amount_minor, &row.currency),
                row.currency.clone(),
                row.method.clone(),
                row.status.clone(),
                row.reason.clone(),
                time(row.completed_at_ms),
            ];
            csv.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            csv.push('\n');
        }
        match rows.last() {
            Some(last) if rows.len() == 500 => {
                cursor = Some((last.issued_at_ms, last.command_id.clone()))
            }
            _ => break,
        }
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"topups-{subscriber}.csv\""),
            ),
        ],
        csv,
    )
        .into_response())
}
