//! Who is asking: a bearer JWT (HS256, signed with `API_JWT_SECRET`) with `sub`, `role` and
//! `exp`. A subscriber reads and changes only their own paths; an operator reads any.
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The roles a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The subscriber named by `sub`.
    Subscriber,
    /// Customer care: reads any subscriber, changes nothing.
    Operator,
}

/// A token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The subscriber id (or the operator's name).
    pub sub: String,
    /// What the bearer may do.
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// What a request wants to do with a subscriber's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read.
    Read,
    /// Change.
    Write,
}

/// Verifies tokens and limits how often each bearer may call.
#[derive(Clone)]
pub struct Gate {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl Gate {
    /// Tokens signed with `secret`; `per_minute` requests per bearer.
    pub fn new(secret: &[u8], per_minute: u32) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        let quota =
            Quota::per_minute(NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            key: Arc::new(DecodingKey::from_secret(secret)),
            validation: Arc::new(validation),
            limiter: Arc::new(RateLimiter::keyed(quota)),
        }
    }

    /// The verified claims of the request's bearer token, within its rate limit.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Claims, ApiError> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthenticated("an Authorization: Bearer <token> header is required")
            })?;
        let token = value.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be Bearer <token>")
        })?;
        let claims = jsonwebtoken::decode::<Claims>(token.trim(), &self.key, &self.validation)
            .map_err(|e| ApiError::unauthenticated(format!("the token is not valid: {e}")))?
            .claims;
        if let Err(not_until) = self.limiter.check_key(&claims.sub) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(ApiError::rate_limited(wait.as_secs().max(1)));
        }
        Ok(claims)
    }

    /// Forgets bearers not seen for a while (call now and then).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

/// Refuses `claims` access to `subscriber`'s data unless it is theirs, or an operator reads.
pub fn authorize(claims: &Claims, subscriber: &str, access: Access) -> Result<(), ApiError> {
    match (claims.role, access) {
        (Role::Subscriber, _) if claims.sub == subscriber => Ok(()),
        (Role::Subscriber, _) => Err(ApiError::forbidden(
            "a subscriber can only see and change their own rules and history",
        )),
        (Role::Operator, Access::Read) => Ok(()),
        (Role::Operator, Access::Write) => {
            Err(ApiError::forbidden("operators can read any subscriber but change nothing"))
        }
    }
}

/// Signs a token (for the embedded demo and tests).
pub fn issue(
    secret: &[u8],
    sub: &str,
    role: Role,
    valid_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + valid_secs;
    let claims = Claims { sub: sub.to_string(), role, exp };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers
            .insert(axum::http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        headers
    }

    #[test]
    fn tokens_are_verified_and_roles_respected() {
        let gate = Gate::new(b"secret", 1000);
        let token = issue(b"secret", "sub-1", Role::Subscriber, 60).unwrap();
        let claims = gate.admit(&bearer(&token)).unwrap();
        assert!(authorize(&claims, "sub-1", Access::Write).is_ok());
        assert_eq!(authorize(&claims, "sub-2", Access::Read).unwrap_err().status(), 403);
        let operator =
            gate.admit(&bearer(&issue(b"secret", "care", Role::Operator, 60).unwrap())).unwrap();
        assert!(authorize(&operator, "sub-2", Access::Read).is_ok());
        assert_eq!(authorize(&operator, "sub-2", Access::Write).unwrap_err().status(), 403);
        // Wrong key, garbage, missing header.
        let forged = issue(b"other", "sub-1", Role::Subscriber, 60).unwrap();
        assert_eq!(gate.admit(&bearer(&forged)).unwrap_err().status(), 401);
        assert_eq!(gate.admit(&bearer("x.y.z")).unwrap_err().status(), 401);
        assert_eq!(gate.admit(&HeaderMap::new()).unwrap_err().status(), 401);
    }

    #[test]
    fn each_bearer_has_its_own_rate_limit() {
        let gate = Gate::new(b"secret", 2);
        let a = bearer(&issue(b"secret", "sub-a", Role::Subscriber, 60).unwrap());
        let b = bearer(&issue(b"secret", "sub-b", Role::Subscriber, 60).unwrap());
        assert!(gate.admit(&a).is_ok());
        assert!(gate.admit(&a).is_ok());
        assert_eq!(gate.admit(&a).unwrap_err().status(), 429);
        assert!(gate.admit(&b).is_ok());
    }
}
