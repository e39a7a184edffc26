//! Verified contacts and the limits on codes. A subscriber's phone number, e-mail address or
//! push token is verified once, with a code sent to it (`POST .../contacts`, then
//! `.../contacts/verify`); a draft rule may name only verified contacts, so its
//! confirmation code goes only where the subscriber has shown they receive messages. Every
//! code sent — for a contact or a draft — counts against limits per subscriber and per
//! destination, per hour and per day (`API_CODES_PER_HOUR`, `API_CODES_PER_DAY`), so that no
//! bearer can make the platform text numbers of its choosing; wrong codes count per
//! subscriber per day across drafts and contacts (`API_WRONG_CODES_PER_DAY`), so replacing a
//! draft does not buy more guesses. The console channel is for the embedded demo only
//! (`API_ALLOW_CONSOLE`).
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prost::Message as _;
use serde::Deserialize;
use serde_json::{json, Value};
use topup_domain::{SubscriberId, ValidationError};
use topup_proto::topics;
use topup_proto::v1::{ChannelKind, NotificationChannel};

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::routes::{code_notice, json_body, now_ms, rfc3339, six_digits, subscriber_of};
use crate::store::{Contact, Db};
use crate::App;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Where a code goes, as the limits count it: one number or address however it is written
/// (`+86 138-0013-8000` and `008613800138000` are one phone, `Li@QQ.com` and `li@qq.com` one
/// mailbox).
pub(crate) fn destination(kind: &str, address: &str) -> String {
    let address = address.trim();
    let normal = if kind == ChannelKind::Sms.as_str_name() {
        let digits: String = address.chars().filter(|c| c.is_ascii_digit() || *c == '+').collect();
        match digits.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => digits,
        }
    } else if kind == ChannelKind::Email.as_str_name() {
        address.to_lowercase()
    } else {
        address.to_string()
    };
    format!("{kind} {normal}")
}

/// Refuses (429, with when it may) when one more code now, to each of `destinations`, for
/// `subscriber`, would break a limit.
pub(crate) async fn allow_codes(
    app: &App,
    subscriber: &str,
    destinations: &[String],
    now: i64,
) -> Result<(), ApiError> {
    let limits = [(HOUR_MS, app.settings.codes_per_hour), (DAY_MS, app.settings.codes_per_day)];
    for (window, most) in limits {
        let most = usize::try_from(most.max(1)).unwrap_or(usize::MAX);
        let since = now - window;
        let mut counted = vec![(
            app.db.codes_sent_since(subscriber, false, since).await?,
            "for this subscriber".to_string(),
        )];
        for to in destinations {
            counted.push((
                app.db.codes_sent_since(to, true, since).await?,
                "to this destination".into(),
            ));
        }
        for (n, (times, what)) in counted.into_iter().enumerate() {
            // The subscriber's count grows by every destination at once; each destination's
            // by one.
            let adding = if n == 0 { destinations.len().max(1) } else { 1 };
            if times.len() + adding > most {
                // The oldest code that must leave the window first leaves it then.
                let must_leave = times.len() + adding - most;
                let frees_at = times.get(must_leave - 1).map_or(now + window, |t| t + window);
                let retry = u64::try_from((frees_at - now + 999) / 1000).unwrap_or(1).max(1);
                return Err(ApiError::too_many_codes(&what, retry));
            }
        }
    }
    Ok(())
}

/// Refuses (423) every code while `subscriber` has given `API_WRONG_CODES_PER_DAY` wrong
/// codes in the last 24 hours.
pub(crate) async fn accept_codes(app: &App, subscriber: &str, now: i64) -> Result<(), ApiError> {
    let most = usize::try_from(app.settings.wrong_codes_per_day.max(1)).unwrap_or(usize::MAX);
    let times = app.db.wrong_codes_since(subscriber, now - DAY_MS).await?;
    if times.len() >= most {
        let frees_at = times[times.len() - most] + DAY_MS;
        let retry = u64::try_from((frees_at - now + 999) / 1000).unwrap_or(1).max(1);
        return Err(ApiError::codes_locked(retry));
    }
    Ok(())
}

/// Checks a draft's channels: each a verified contact of `subscriber`, the console only
/// where it is allowed (the embedded demo).
pub(crate) async fn check_channels(
    app: &App,
    subscriber: &str,
    channels: &[NotificationChannel],
) -> Result<(), ApiError> {
    for (i, channel) in channels.iter().enumerate() {
        let kind = ChannelKind::try_from(channel.kind).unwrap_or(ChannelKind::Unspecified);
        if kind == ChannelKind::Console {
            if app.settings.allow_console {
                continue;
            }
            return Err(ApiError::invalid(ValidationError::new(
                format!("channels[{i}].kind"),
                "the console channel is for the embedded demo only",
            )));
        }
        let verified = app
            .db
            .contact(subscriber, kind.as_str_name(), &channel.address)
            .await?
            .is_some_and(|c| c.verified_at_ms > 0);
        if !verified {
            return Err(ApiError::invalid(ValidationError::new(
                format!("channels[{i}].address"),
                format!(
                    "is not a verified contact; verify it first \
                     (POST /v1/subscribers/{subscriber}/contacts)"
                ),
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ContactBody {
    kind: String,
    address: String,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

/// The contact a body names: a kind that has an address, and an address of a sane length.
fn channel_of(body: &ContactBody) -> Result<(ChannelKind, String), ApiError> {
    let kind = match ChannelKind::from_str_name(&body.kind) {
        Some(kind @ (ChannelKind::Sms | ChannelKind::Email | ChannelKind::Push)) => kind,
        _ => {
            return Err(ApiError::invalid(ValidationError::new(
                "kind",
                "must be CHANNEL_KIND_SMS, CHANNEL_KIND_EMAIL or CHANNEL_KIND_PUSH",
            )))
        }
    };
    let address = body.address.trim();
    if address.is_empty() || address.len() > 320 || address.chars().any(char::is_control) {
        return Err(ApiError::invalid(ValidationError::new(
            "address",
            "must be 1 to 320 characters, none of them control characters",
        )));
    }
    Ok((kind, address.to_string()))
}

fn contact_view(contact: &Contact, now: i64) -> Value {
    let status = if contact.verified_at_ms > 0 {
        "verified"
    } else if !contact.code_hash.is_empty() && contact.code_expires_ms > now {
        "awaiting_verification"
    } else {
        "unverified"
    };
    let mut view = json!({ "kind": contact.kind, "address": contact.address, "status": status });
    if status == "awaiting_verification" {
        view["codeExpiresAt"] = rfc3339(contact.code_expires_ms);
    }
    view
}

/// `POST /v1/subscribers/{id}/contacts`: sends a code to the contact (`202`), unless it is
/// verified already (`200`).
pub(crate) async fn add_contact(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Write)?;
    let subscriber: SubscriberId = subscriber_of(&subscriber)?;
    let body: ContactBody =
        json_body(&app, body, r#"{"kind": "CHANNEL_KIND_SMS", "address": "+86…"}"#)?;
    let (kind, address) = channel_of(&body)?;
    let now = now_ms();
    let known = app.db.contact(subscriber.as_str(), kind.as_str_name(), &address).await?;
    if let Some(contact) = known.as_ref().filter(|c| c.verified_at_ms > 0) {
        return Ok((StatusCode::OK, Json(contact_view(contact, now))).into_response());
    }
    let to = destination(kind.as_str_name(), &address);
    allow_codes(&app, subscriber.as_str(), std::slice::from_ref(&to), now).await?;
    let code = six_digits();
    let contact = Contact {
        kind: kind.as_str_name().to_string(),
        address: address.clone(),
        code_hash: app.code_key.hash(subscriber.as_str(), &code),
        code_expires_ms: now + app.settings.contact_code_ttl.as_millis() as i64,
        verified_at_ms: 0,
    };
    let about = format!("contact-code/{}", contact.code_hash);
    let channel = NotificationChannel { kind: kind as i32, address };
    let locale = body.locale.unwrap_or_else(|| "en".to_string());
    let channels = (locale.as_str(), std::slice::from_ref(&channel));
    let ttl = app.settings.contact_code_ttl;
    let notification = code_notice(&app, &subscriber, &about, channels, &code, ttl, now);
    let mut tx = app.db.pool().begin().await?;
    Db::save_contact(&mut tx, subscriber.as_str(), &contact).await?;
    Db::code_sent(&mut tx, subscriber.as_str(), &to, now).await?;
    app.publish(topics::NOTIFICATIONS, subscriber.as_str(), notification.encode_to_vec()).await?;
    tx.commit().await?;
    tracing::info!(%subscriber, kind = kind.as_str_name(), "contact verification code sent");
    Ok((StatusCode::ACCEPTED, Json(contact_view(&contact, now))).into_response())
}

/// `POST /v1/subscribers/{id}/contacts/verify`: the code sent to the contact.
pub(crate) async fn verify_contact(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Write)?;
    let body: ContactBody =
        json_body(&app, body, r#"{"kind": …, "address": …, "code": "123456"}"#)?;
    let (kind, address) = channel_of(&body)?;
    let code = body.code.clone().unwrap_or_default();
    let now = now_ms();
    accept_codes(&app, &subscriber, now).await?;
    let mut contact =
        app.db.contact(&subscriber, kind.as_str_name(), &address).await?.ok_or_else(|| {
            ApiError::not_found("no code was sent to this contact; POST it first")
        })?;
    if contact.verified_at_ms > 0 {
        return Ok(Json(contact_view(&contact, now)));
    }
    if contact.code_hash.is_empty() || now > contact.code_expires_ms {
        return Err(ApiError::code_expired());
    }
    if !app.code_key.matches(&subscriber, code.trim(), &contact.code_hash) {
        let mut conn = app.db.pool().acquire().await?;
        Db::wrong_code(&mut conn, &subscriber, now).await?;
        drop(conn);
        tracing::warn!(%subscriber, "wrong contact verification code");
        let given = app.db.wrong_codes_since(&subscriber, now - DAY_MS).await?.len() as i64;
        return Err(ApiError::wrong_code((app.settings.wrong_codes_per_day - given).max(0)));
    }
    contact.verified_at_ms = now;
    contact.code_hash.clear();
    let mut conn = app.db.pool().acquire().await?;
    Db::save_contact(&mut conn, &subscriber, &contact).await?;
    tracing::info!(%subscriber, kind = kind.as_str_name(), "contact verified");
    Ok(Json(contact_view(&contact, now)))
}

/// `GET /v1/subscribers/{id}/contacts`.
pub(crate) async fn list_contacts(
    State(app): State<App>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let claims = app.gate.admit(&headers)?;
    authorize(&claims, &subscriber, Access::Read)?;
    let now = now_ms();
    let items: Vec<Value> =
        app.db.contacts(&subscriber).await?.iter().map(|c| contact_view(c, now)).collect();
    Ok(Json(json!({ "items": items })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_number_or_mailbox_is_one_destination_however_it_is_written() {
        let sms = ChannelKind::Sms.as_str_name();
        let email = ChannelKind::Email.as_str_name();
        assert_eq!(destination(sms, "+86 138-0013-8000"), destination(sms, "008613800138000"));
        assert_eq!(destination(email, " Li@QQ.com"), destination(email, "li@qq.com"));
        assert_ne!(destination(sms, "+8613800138000"), destination(email, "+8613800138000"));
    }
}
