//! Every error the API answers with: an HTTP status and `{"error": {"code", "message",
//! "field"?}}`. Internal failures are logged with their cause and answered without it.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use topup_domain::ValidationError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after_secs: None }
    }

    /// 401: no or bad bearer token.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403: authenticated, not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 400: the body is not the JSON expected.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// 422 about one field.
    pub fn invalid(error: ValidationError) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", error.to_string());
        e.field = Some(error.field);
        e
    }

    /// 422: outside the carrier's single top-up range.
    pub fn outside_limits(error: ValidationError) -> Self {
        let mut e = Self::invalid(error);
        e.code = "outside_carrier_limits";
        e
    }

    /// 422: a wrong confirmation code.
    pub fn wrong_code(attempts_left: i64) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_code",
            format!("the code is wrong; {attempts_left} attempts left before the draft locks"),
        )
    }

    /// 410: the code expired.
    pub fn code_expired() -> Self {
        Self::new(
            StatusCode::GONE,
            "code_expired",
            "the code has expired; send the draft again (PUT) for a new one",
        )
    }

    /// 423: too many wrong codes.
    pub fn locked(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::LOCKED,
            "draft_locked",
            format!(
                "too many wrong codes: the draft is locked for {retry_after_secs} s more; then send it again for a new code"
            ),
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 429: one more code would break a limit on codes sent (per subscriber or per
    /// destination, per hour or per day).
    pub fn too_many_codes(what: &str, retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_codes",
            format!("too many codes sent {what}; another can be sent in {retry_after_secs} s"),
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 423: too many wrong codes in a day, whichever drafts or contacts they were for.
    pub fn codes_locked(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::LOCKED,
            "codes_locked",
            format!("too many wrong codes today: no code is accepted for {retry_after_secs} s"),
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 409: the change does not apply in the rule's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    }

    /// 429.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; try again in {retry_after_secs} s"),
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    /// 503: a dependency (database, Kafka) failed; logged with `cause`, answered without.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "{what} failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what} failed; nothing was changed, try again"),
        )
    }

    /// The status, for tests and logs.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::unavailable("the database", error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        let mut response = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(value) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
