//! One notable occurrence, one call: a service describes what happened as a value whose
//! [`InternalEvent::emit`] writes the log line and counts it (vector's `InternalEvent`), so
//! the two never drift apart. Each service declares its events beside its metrics, in its
//! `metrics.rs`.

/// Something worth a log line and a counter.
pub trait InternalEvent {
    /// Logs and counts the occurrence.
    fn emit(self);
}

/// Logs and counts `event`.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}
