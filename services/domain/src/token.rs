//! Payment tokens sealed for the bus. The API seals each payment method's token as it takes
//! a draft (ChaCha20-Poly1305, the subscriber's id as associated data, so a sealed token
//! moved to another subscriber does not open); from there on the rule, its commands, the
//! retry topic, dead letters, the evaluator's changelog and the API's database carry only
//! the sealed form, and only the payment worker opens it, just before it asks the gateway.
//!
//! The keys are `PAYMENT_TOKEN_KEYS`: `id:hex[,id:hex…]`, 32 bytes each. The first seals;
//! every one opens what was sealed under its id, so a key is rotated by putting the new one
//! first and dropping the old one once no record sealed under it is left. A sealed token
//! reads `sealed:v1:<key id>:<base64url of nonce ‖ ciphertext>`. A token without that prefix
//! is a clear token from before sealing: it is charged as it is.
//!
//! Sealing is deterministic: the nonce is an HMAC of the subscriber and the token under the
//! key, so the same card saved again by the same subscriber seals to the same text and
//! keeps its payment method id (`crate::payment_method_id`, derived from the token as the
//! rule holds it), and with it its idempotency keys and expiry reminders. Equal sealed texts
//! tell only that the same subscriber saved the same token twice; a nonce repeats only for
//! the very same plaintext.
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What every sealed token starts with.
pub const SEALED_TOKEN_PREFIX: &str = "sealed:v1:";

const AAD_CONTEXT: &[u8] = b"topup payment token v1\0";

/// Whether `token` is a sealed token in form (as opposed to a clear token from before
/// sealing): the prefix, a key id and an envelope long enough for a nonce and a tag. Whether
/// it opens only the payment worker's keys can tell.
pub fn is_sealed(token: &str) -> bool {
    let Some((id, text)) = token.strip_prefix(SEALED_TOKEN_PREFIX).and_then(|r| r.split_once(':'))
    else {
        return false;
    };
    !id.is_empty()
        && base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .is_ok_and(|bytes| bytes.len() > 12 + 16)
}

/// Why keys or a sealed token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The keys are not `id:hex[,id:hex…]`.
    #[error(
        "PAYMENT_TOKEN_KEYS must be id:hex[,id:hex…] (an id of letters, digits, - or _, and \
         64 hex digits, e.g. k1:$(openssl rand -hex 32)); the first one seals"
    )]
    BadKeys,
    /// No key with the sealed token's id.
    #[error("the payment token was sealed with key {0:?}, which PAYMENT_TOKEN_KEYS does not hold")]
    UnknownKey(String),
    /// Not sealed for this subscriber with this key, or altered.
    #[error("the sealed payment token does not open for this subscriber")]
    CannotOpen,
}

/// The keys. Their `Debug` shows only their ids.
#[derive(Clone)]
pub struct TokenKeys(Vec<(String, [u8; 32])>);

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.0.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "TokenKeys({ids:?})")
    }
}

impl std::str::FromStr for TokenKeys {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        let mut keys = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, hex) = part.split_once(':').ok_or(TokenError::BadKeys)?;
            let valid_id = !id.is_empty()
                && id.len() <= 32
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            let key = hex::decode(hex.trim()).map_err(|_| TokenError::BadKeys)?;
            let key: [u8; 32] = key.try_into().map_err(|_| TokenError::BadKeys)?;
            if !valid_id || keys.iter().any(|(known, _)| known == id) {
                return Err(TokenError::BadKeys);
            }
            keys.push((id.to_string(), key));
        }
        if keys.is_empty() {
            return Err(TokenError::BadKeys);
        }
        Ok(Self(keys))
    }
}

impl TokenKeys {
    /// Parses `PAYMENT_TOKEN_KEYS` (`id:hex[,id:hex…]`).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        text.parse()
    }

    /// One fresh random key under `id` (the all-in-one process shares it between its API
    /// and payment worker).
    pub fn random(id: &str) -> Self {
        Self(vec![(id.to_string(), ChaCha20Poly1305::generate_key(&mut OsRng).into())])
    }

    /// The keys as `PAYMENT_TOKEN_KEYS` reads them, to hand to another process.
    pub fn to_setting(&self) -> String {
        let keys: Vec<String> =
            self.0.iter().map(|(id, key)| format!("{id}:{}", hex::encode(key))).collect();
        keys.join(",")
    }

    /// The nonce of `token` for `subscriber` under `key`: the first 12 bytes of an HMAC of
    /// both (see the module's notes on determinism).
    fn nonce(key: &[u8; 32], subscriber: &str, token: &str) -> [u8; 12] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        mac.update(b"topup payment token nonce v1\0");
        mac.update(subscriber.as_bytes());
        mac.update(b"\0");
        mac.update(token.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&digest[..12]);
        nonce
    }

    fn aad(subscriber: &str) -> Vec<u8> {
        [AAD_CONTEXT, subscriber.as_bytes()].concat()
    }

    /// `token` sealed for `subscriber` under the first key. A token already sealed is left
    /// as it is.
    pub fn seal(&self, subscriber: &str, token: &str) -> String {
        if is_sealed(token) {
            return token.to_string();
        }
        let (id, key) = &self.0[0];
        let cipher = ChaCha20Poly1305::new(key.into());
        let nonce = Self::nonce(key, subscriber, token);
        let nonce = Nonce::from_slice(&nonce);
        let aad = Self::aad(subscriber);
        let payload = Payload { msg: token.as_bytes(), aad: &aad };
        // Encryption in memory with a valid key and nonce does not fail.
        let sealed = cipher.encrypt(nonce, payload).unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        format!("{SEALED_TOKEN_PREFIX}{id}:{text}")
    }

    /// The clear token: `token` opened for `subscriber` when it is sealed, `token` itself
    /// when it is a clear one from before sealing.
    pub fn open(&self, subscriber: &str, token: &str) -> Result<String, TokenError> {
        let Some(rest) = token.strip_prefix(SEALED_TOKEN_PREFIX) else {
            return Ok(token.to_string());
        };
        let (id, text) = rest.split_once(':').ok_or(TokenError::CannotOpen)?;
        let (_, key) = self
            .0
            .iter()
            .find(|(known, _)| known == id)
            .ok_or_else(|| TokenError::UnknownKey(id.to_string()))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| TokenError::CannotOpen)?;
        if bytes.len() < 12 {
            return Err(TokenError::CannotOpen);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let aad = Self::aad(subscriber);
        let clear = ChaCha20Poly1305::new(key.into())
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| TokenError::CannotOpen)?;
        String::from_utf8(clear).map_err(|_| TokenError::CannotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_sealed_for_one_subscriber_and_opens_under_a_rotated_key() {
        let old: TokenKeys = format!("k1:{}", "11".repeat(32)).parse().unwrap();
        let sealed = old.seal("sub-1", "tok_approve_4242");
        assert!(is_sealed(&sealed) && sealed.starts_with("sealed:v1:k1:"), "{sealed}");
        assert!(!sealed.contains("4242") || !sealed.contains("tok_approve"));
        assert_eq!(old.open("sub-1", &sealed).unwrap(), "tok_approve_4242");
        assert_eq!(old.open("sub-2", &sealed), Err(TokenError::CannotOpen));
        assert_eq!(old.seal("sub-1", &sealed), sealed, "sealed once");
        // The same card saved again seals the same (so its method id stays); for another
        // subscriber, or another token, it does not.
        assert_eq!(old.seal("sub-1", "tok_approve_4242"), sealed);
        assert_ne!(old.seal("sub-2", "tok_approve_4242"), sealed);
        assert_ne!(old.seal("sub-1", "tok_approve_4243"), sealed);
        assert!(!is_sealed("sealed:v1:k1:short"), "an envelope too short to hold a token");
        assert!(!is_sealed("sealed:v1:4111111111111111"));

        // Rotation: the new key seals, the old one still opens what it sealed.
        let rotated: TokenKeys =
            format!("k2:{},k1:{}", "22".repeat(32), "11".repeat(32)).parse().unwrap();
        assert_eq!(rotated.open("sub-1", &sealed).unwrap(), "tok_approve_4242");
        let resealed = rotated.seal("sub-1", "tok_approve_4242");
        assert!(resealed.starts_with("sealed:v1:k2:"));
        assert_eq!(old.open("sub-1", &resealed), Err(TokenError::UnknownKey("k2".into())));

        // A clear token from before sealing is charged as it is.
        assert_eq!(old.open("sub-1", "tok_legacy").unwrap(), "tok_legacy");
        // Altered: refused.
        let mut altered = sealed.clone();
        altered.pop();
        altered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(old.open("sub-1", &altered), Err(TokenError::CannotOpen));

        assert_eq!(
            rotated.to_setting().parse::<TokenKeys>().unwrap().to_setting(),
            rotated.to_setting()
        );
        assert_eq!(format!("{rotated:?}"), r#"TokenKeys(["k2", "k1"])"#);
        for bad in ["", "k1", "k1:abcd", "k 1:00", &format!("a:{0},a:{0}", "11".repeat(32))] {
            assert_eq!(bad.parse::<TokenKeys>().unwrap_err(), TokenError::BadKeys, "{bad}");
        }
    }
}
