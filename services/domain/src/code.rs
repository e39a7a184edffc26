//! One-time confirmation codes. The API stores only a keyed hash of a code; the code travels
//! to the notifier sealed (ChaCha20-Poly1305, bound to the subscriber), so no Kafka record,
//! dead letter, log line or span holds it in the clear. API and notifier share one key,
//! `CONFIRMATION_CODE_KEY` (32 bytes, hex).
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `NotificationCommand` parameter that carries a sealed code.
pub const SEALED_CODE_PARAMETER: &str = "code_sealed";

/// The shared key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct CodeKey([u8; 32]);

impl std::fmt::Debug for CodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodeKey(…)")
    }
}

/// Why a key or a sealed code could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The key is not 64 hex digits.
    #[error(
        "CONFIRMATION_CODE_KEY must be 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`"
    )]
    BadKey,
    /// The sealed code was not sealed with this key for this subscriber, or was altered.
    #[error("the sealed confirmation code does not open with this key for this subscriber")]
    CannotOpen,
}

impl CodeKey {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, CodeError> {
        let bytes = hex::decode(text.trim()).map_err(|_| CodeError::BadKey)?;
        Ok(Self(bytes.try_into().map_err(|_| CodeError::BadKey)?))
    }

    /// A fresh random key (the all-in-one process shares it between its API and notifier).
    pub fn random() -> Self {
        Self(ChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// The key as hex, to hand to another process.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn derived(&self, purpose: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(purpose);
        mac.finalize().into_bytes().into()
    }

    /// The stored form of `code` for `subscriber`: HMAC-SHA256 under a key derived from this
    /// one, hex. Without the key, a stolen database does not give the codes away.
    pub fn hash(&self, subscriber: &str, code: &str) -> String {
        let key = self.derived(b"topup confirmation code hash v1");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(subscriber.as_bytes());
        mac.update(b"\0");
        mac.update(code.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `code` hashes to `stored` (compared in constant time).
    pub fn matches(&self, subscriber: &str, code: &str, stored: &str) -> bool {
        let key = self.derived(b"topup confirmation code hash v1");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(subscriber.as_bytes());
        mac.update(b"\0");
        mac.update(code.as_bytes());
        match hex::decode(stored) {
            Ok(expected) => mac.verify_slice(&expected).is_ok(),
            Err(_) => false,
        }
    }

    /// `code` sealed for `subscriber`: hex of nonce ‖ ciphertext.
    pub fn seal(&self, subscriber: &str, code: &str) -> String {
        let cipher =
            ChaCha20Poly1305::new(&self.derived(b"topup confirmation code seal v1").into());
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let payload = Payload { msg: code.as_bytes(), aad: subscriber.as_bytes() };
        let sealed = cipher.encrypt(&nonce, payload).expect("in-memory encryption of a short code");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// Opens what [`CodeKey::seal`] made for `subscriber`.
    pub fn open(&self, subscriber: &str, sealed: &str) -> Result<String, CodeError> {
        let bytes = hex::decode(sealed).map_err(|_| CodeError::CannotOpen)?;
        if bytes.len() < 12 {
            return Err(CodeError::CannotOpen);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let cipher =
            ChaCha20Poly1305::new(&self.derived(b"topup confirmation code seal v1").into());
        let payload = Payload { msg: ciphertext, aad: subscriber.as_bytes() };
        let code =
            cipher.decrypt(Nonce::from_slice(nonce), payload).map_err(|_| CodeError::CannotOpen)?;
        String::from_utf8(code).map_err(|_| CodeError::CannotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_hashed_and_sealed_for_one_subscriber_only() {
        let key = CodeKey::random();
        let stored = key.hash("sub-1", "123456");
        assert!(key.matches("sub-1", "123456", &stored));
        assert!(!key.matches("sub-1", "123457", &stored));
        assert!(!key.matches("sub-2", "123456", &stored));
        assert!(!CodeKey::random().matches("sub-1", "123456", &stored));
        assert!(!stored.contains("123456"));

        let sealed = key.seal("sub-1", "123456");
        assert!(!sealed.contains("123456"));
        assert_eq!(key.open("sub-1", &sealed).unwrap(), "123456");
        assert_eq!(key.open("sub-2", &sealed), Err(CodeError::CannotOpen));
        assert_eq!(CodeKey::random().open("sub-1", &sealed), Err(CodeError::CannotOpen));
        assert_eq!(key.open("sub-1", "zz"), Err(CodeError::CannotOpen));

        let hex = key.to_hex();
        assert_eq!(CodeKey::from_hex(&hex).unwrap().open("sub-1", &sealed).unwrap(), "123456");
        assert_eq!(CodeKey::from_hex("abcd").unwrap_err(), CodeError::BadKey);
        assert_eq!(format!("{key:?}"), "CodeKey(…)");
    }
}
