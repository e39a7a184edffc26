//! The evaluator's metrics, declared once, and the events that log and count them.
use std::sync::OnceLock;

use topup_domain::{Money, SubscriberId};
use topup_kafka::ops::{LabeledCounter, LatencyHistogram};
use topup_kafka::InternalEvent;
use topup_proto::v1::TopUpCommand;

/// Metrics served on `/metrics` and exported over OTLP.
struct Metrics {
    /// `topup_topups_issued_total`.
    topups_issued: LabeledCounter,
    /// `topup_topups_reissued_total`: commands issued again after waiting too long for a
    /// result.
    topups_reissued: LabeledCounter,
    /// `topup_credits_overdue_total`: charged top-ups the carrier did not credit in time.
    credits_overdue: LabeledCounter,
    /// `topup_command_latency_seconds`: balance observed → command issued.
    command_latency: LatencyHistogram,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        topups_issued: LabeledCounter::new("topups_issued", "Top-up commands issued"),
        topups_reissued: LabeledCounter::new(
            "topups_reissued",
            "Top-up commands issued again under the same id after waiting too long for a result",
        ),
        credits_overdue: LabeledCounter::new(
            "credits_overdue",
            "Charged top-ups whose credit by the carrier was not seen within the deadline",
        ),
        command_latency: LatencyHistogram::new(
            "command_latency_seconds",
            "From the balance's observed_at to the top-up command",
        ),
    })
}

/// Top-up commands issued in this process so far.
pub fn topups_issued() -> u64 {
    metrics().topups_issued.sum(&[])
}

/// A balance fell below the threshold (or a monthly top-up came due): a command is issued.
pub(crate) struct TopUpIssued<'a> {
    pub(crate) subscriber: &'a SubscriberId,
    pub(crate) command: &'a TopUpCommand,
}

impl InternalEvent for TopUpIssued<'_> {
    fn emit(self) {
        let metrics = metrics();
        metrics.topups_issued.inc(&[]);
        if let Some(seconds) = topup_kafka::ops::seconds_since(self.command.observed_at.as_ref()) {
            metrics.command_latency.observe(seconds);
        }
        let amount = self.command.amount.as_ref().and_then(|m| Money::try_from(m).ok());
        tracing::info!(
            subscriber = %self.subscriber,
            command_id = %self.command.command_id,
            amount = %amount.map(|m| m.to_string()).unwrap_or_default(),
            "balance below threshold: top-up issued"
        );
    }
}

/// A top-up waited too long for its result: its command is issued again under the same id.
pub(crate) struct TopUpReissued<'a> {
    pub(crate) subscriber: &'a SubscriberId,
    pub(crate) command_id: &'a str,
    pub(crate) after_secs: i64,
}

impl InternalEvent for TopUpReissued<'_> {
    fn emit(self) {
        metrics().topups_reissued.inc(&[]);
        tracing::warn!(
            subscriber = %self.subscriber,
            command_id = %self.command_id,
            after_secs = self.after_secs,
            "top-up without a result for too long: command issued again under the same id"
        );
    }
}

/// A charged top-up was not credited by the carrier in time: the subscriber and operators
/// are told.
pub(crate) struct CreditOverdue<'a> {
    pub(crate) subscriber: &'a SubscriberId,
    pub(crate) command_id: &'a str,
}

impl InternalEvent for CreditOverdue<'_> {
    fn emit(self) {
        metrics().credits_overdue.inc(&[]);
        tracing::error!(
            subscriber = %self.subscriber,
            command_id = %self.command_id,
            "a charged top-up was not credited by the carrier in time"
        );
    }
}
