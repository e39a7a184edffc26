//! Records in and out of a pipeline, decoding, and dead letters.
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rdkafka::message::{Headers, Message};
use topup_proto::{v1::DeadLetter, Timestamp};

use crate::Refusal;

/// Largest record value a service decodes; anything bigger is dead-lettered unread.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 20;

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Input {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Record key (the subscriber id), if any.
    pub key: Option<Vec<u8>>,
    /// Record value, if any.
    pub payload: Option<Vec<u8>>,
    /// Record timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Input {
    /// Copies a borrowed message out of the consumer.
    pub fn from_message<M: Message>(message: &M) -> Self {
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
            headers,
        }
    }

    /// The key as text, if it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The record's time: the broker timestamp, else now. Deterministic on replay when the
    /// broker sets timestamps, which is what decisions depending on "today" should use.
    pub fn time(&self) -> Timestamp {
        match self.timestamp_ms {
            Some(ms) if ms >= 0 => Timestamp {
                seconds: ms / 1000,
                nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
            },
            _ => now_timestamp(),
        }
    }
}

/// A record to produce inside the current transaction.
#[derive(Debug, Clone)]
pub struct Output {
    /// Destination topic.
    pub topic: &'static str,
    /// Explicit partition (state changelogs follow their input partition); `None` = by key.
    pub partition: Option<i32>,
    /// Record key (the subscriber id).
    pub key: Vec<u8>,
    /// Encoded value; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers (trace context travels here).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// A protobuf message keyed by `key`.
    pub fn message(topic: &'static str, key: &str, message: &impl prost::Message) -> Self {
        Self {
            topic,
            partition: None,
            key: key.as_bytes().to_vec(),
            payload: Some(message.encode_to_vec()),
            headers: Vec::new(),
        }
    }

    /// A tombstone for `key` (compacted topics forget it).
    pub fn tombstone(topic: &'static str, key: &str) -> Self {
        Self {
            topic,
            partition: None,
            key: key.as_bytes().to_vec(),
            payload: None,
            headers: Vec::new(),
        }
    }
}

/// Decodes a protobuf value and checks that the record is keyed by the subscriber it is
/// about (co-partitioning depends on it). Failures are refusals with a reason.
pub fn decode<T: prost::Message + Default>(
    input: &Input,
    subscriber_id: impl Fn(&T) -> &str,
) -> Result<T, Refusal> {
    let payload = input.payload.as_deref().ok_or(Refusal::NoValue)?;
    if payload.len() > MAX_RECORD_BYTES {
        return Err(Refusal::TooLarge { size: payload.len(), limit: MAX_RECORD_BYTES });
    }
    let message = T::decode(payload).map_err(|e| Refusal::Undecodable {
        message: std::any::type_name::<T>(),
        detail: e.to_string(),
    })?;
    let subscriber = subscriber_id(&message);
    match input.key_str() {
        Some(key) if key == subscriber => Ok(message),
        key => Err(Refusal::WrongKey {
            key: key.map(str::to_string),
            expected: subscriber.to_string(),
        }),
    }
}

/// The dead letter for `input`: its original bytes, where it came from, and why.
pub fn dead_letter(input: &Input, service: &str, reason: &str) -> Output {
    let key = input.key.as_deref().unwrap_or_default();
    let value = input.payload.as_deref().unwrap_or_default();
    let (kept_key, kept_value) =
        (cut(key, DEAD_LETTER_KEY_BYTES), cut(value, DEAD_LETTER_VALUE_BYTES));
    let letter = DeadLetter {
        original_key: kept_key.to_vec(),
        original_value: kept_value.to_vec(),
        source_topic: input.topic.clone(),
        source_partition: input.partition,
        source_offset: input.offset,
        reason: cut_str(reason, DEAD_LETTER_REASON_BYTES).to_string(),
        service: service.to_string(),
        failed_at: Some(now_timestamp()),
        original_value_size: value.len() as u64,
        original_key_size: key.len() as u64,
        original_value_sha256: sha256_hex(value),
        truncated: kept_key.len() < key.len() || kept_value.len() < value.len(),
    };
    let header_bytes: usize = input.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    Output {
        topic: topup_proto::topics::DLQ,
        partition: None,
        key: kept_key.to_vec(),
        payload: Some(letter.encode_to_vec()),
        headers: if header_bytes <= DEAD_LETTER_HEADER_BYTES {
            input.headers.clone()
        } else {
            Vec::new()
        },
    }
}

/// `letter` (a dead letter) as it is written when the dead-letter topic refused it whole:
/// where the record came from, why, its sizes and SHA-256, but none of its bytes, so that
/// it fits any topic that takes a record of a few hundred bytes. Anything else unchanged.
pub(crate) fn bare(mut letter: Output) -> Output {
    if letter.topic != topup_proto::topics::DLQ {
        return letter;
    }
    if let Some(mut inner) = letter.payload.as_deref().and_then(|p| DeadLetter::decode(p).ok()) {
        inner.truncated |= !inner.original_key.is_empty() || !inner.original_value.is_empty();
        inner.original_key.clear();
        inner.original_value.clear();
        inner.reason = cut_str(&inner.reason, DEAD_LETTER_BARE_REASON_BYTES).to_string();
        letter.payload = Some(inner.encode_to_vec());
    }
    letter.key.clear();
    letter.headers.clear();
    letter
}

/// Most of a refused record's value a dead letter copies. With the key, reason and header
/// caps below, a dead letter stays far below librdkafka's 1,000,000-byte `message.max.bytes`
/// however large the input was: a letter too big to send would abort its transaction and
/// leave the partition stuck for every instance that takes it.
pub const DEAD_LETTER_VALUE_BYTES: usize = 64 * 1024;
const DEAD_LETTER_KEY_BYTES: usize = 1024;
const DEAD_LETTER_REASON_BYTES: usize = 4096;
const DEAD_LETTER_HEADER_BYTES: usize = 16 * 1024;
const DEAD_LETTER_BARE_REASON_BYTES: usize = 256;

fn cut(bytes: &[u8], most: usize) -> &[u8] {
    &bytes[..bytes.len().min(most)]
}

fn cut_str(text: &str, most: usize) -> &str {
    let mut end = text.len().min(most);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The wall clock as a protobuf timestamp.
pub fn now_timestamp() -> Timestamp {
    timestamp_of(SystemTime::now())
}

/// A point in time as a protobuf timestamp (times before 1970 become 1970).
pub fn timestamp_of(time: SystemTime) -> Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp as a point in time (negative or invalid parts count as zero).
pub fn system_time(timestamp: &Timestamp) -> SystemTime {
    let seconds = u64::try_from(timestamp.seconds).unwrap_or(0);
    let nanos = u32::try_from(timestamp.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + std::time::Duration::new(seconds, nanos)
}
