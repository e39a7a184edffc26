//! The one error type of the Kafka plumbing.

/// What can go wrong talking to Kafka. All of these end the current pipeline incarnation;
/// the pipeline then starts afresh (new consumer, new producer, state restored).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A blocking client call could not be run.
    #[error("blocking kafka call did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Something took longer than its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A processor broke its contract (a bug): the incarnation ends rather than lose records.
    #[error("processor: {0}")]
    Processor(String),
    /// A record could not be processed, for a reason that passes, even after retries.
    #[error("transient failure outlasted its retries: {0}")]
    Transient(String),
    /// A processor could not rebuild its state.
    #[error("restoring state: {0}")]
    Restore(String),
    /// A local state store cannot be read or written.
    #[error("state store: {0}")]
    Store(String),
    /// The service's settings cannot work; the message says which one and why.
    #[error("configuration: {0}")]
    Config(String),
}

/// Result with this crate's error.
pub type Result<T> = std::result::Result<T, Error>;
