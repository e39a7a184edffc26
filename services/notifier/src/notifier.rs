//! Where a message leaves. A `NotificationCommand` is checked against the subscriber's
//! delivery history ([`Policy`]: duplicates, rate limits, quiet hours), rendered in their
//! language and delivered on each of their channels. Every attempt, suppression and
//! deferral publishes a `DeliveryReceipt`; when every channel fails for good, one more
//! receipt says the subscriber could not be told (`UNDELIVERABLE`), for alerting.
//!
//! The history lives in the `topup.notifier-state.v1` changelog (same partition as the
//! notification), so de-duplication and rate limits hold across restarts. Messages held
//! over quiet hours and channels waiting for a retry are in it too; the pipeline's tick
//! sends them when due.
use std::time::SystemTime;

use topup_domain::{mask_contact, CodeKey, SubscriberId};
use topup_kafka::{
    decode, system_time, timestamp_of, Answer, Changelog, Input, Output, Processor, Refusal,
};
use topup_proto::notifier::v1::{Pending, SubscriberDeliveries};
use topup_proto::topics;
use topup_proto::v1::{
    ChannelKind, DeliveryReceipt, DeliveryStatus, NotificationCommand, NotificationKind,
};

use crate::channel::{Channel, ChannelError, Delivery};
use crate::metrics::ReceiptWritten;
use crate::policy::{Admission, Policy};
use crate::templates::render;

/// The notifier's processor.
pub struct Notifier<C> {
    channel: C,
    policy: Policy,
    /// Opens the sealed codes of confirmation-code notifications.
    code_key: Option<CodeKey>,
    /// Subscribers delivered to at once within a batch.
    concurrency: usize,
}

use topup_domain::SEALED_CODE_PARAMETER as SEALED_CODE;

/// The notification as the templates see it: a sealed confirmation code opened into "code".
/// Never stored or logged; the sealed form is what the state and records keep.
fn opened(n: &NotificationCommand, key: Option<&CodeKey>) -> Result<NotificationCommand, Refusal> {
    let Some(sealed) = n.parameters.get(SEALED_CODE) else {
        return Ok(n.clone());
    };
    let key = key.ok_or_else(|| {
        Refusal::invalid(
            "parameters.code_sealed",
            "CONFIRMATION_CODE_KEY is not set, so the code cannot be opened",
        )
    })?;
    let code = key
        .open(&n.subscriber_id, sealed)
        .map_err(|e| Refusal::invalid("parameters.code_sealed", e.to_string()))?;
    let mut open = n.clone();
    open.parameters.remove(SEALED_CODE);
    open.parameters.insert("code".into(), code);
    Ok(open)
}

#[allow(clippy::too_many_arguments)]
fn receipt(
    n: &NotificationCommand,
    channel: ChannelKind,
    status: DeliveryStatus,
    attempt: u32,
    destination: String,
    detail: String,
) -> Output {
    topup_kafka::emit(ReceiptWritten {
        notification: n,
        channel,
        status,
        attempt,
        destination: &destination,
        detail: &detail,
    });
    let receipt = DeliveryReceipt {
        notification_id: n.notification_id.clone(),
        subscriber_id: n.subscriber_id.clone(),
        kind: n.kind,
        channel: channel as i32,
        status: status as i32,
        attempt,
        destination,
        detail,
        locale: n.locale.clone(),
        at: Some(topup_kafka::now_timestamp()),
    };
    Output::message(topics::DELIVERIES, &n.subscriber_id, &receipt)
}

fn suppressed(n: &NotificationCommand, detail: &str) -> Output {
    receipt(
        n,
        ChannelKind::Unspecified,
        DeliveryStatus::Suppressed,
        0,
        String::new(),
        detail.into(),
    )
}

/// Every channel of `n`, none tried yet.
fn all_channels(n: &NotificationCommand, due: SystemTime) -> Pending {
    let count = u32::try_from(n.channels.len()).unwrap_or(u32::MAX);
    Pending {
        notification: Some(n.clone()),
        channels: (0..count).collect(),
        attempts: vec![0; n.channels.len()],
        due: Some(timestamp_of(due)),
        delivered_somewhere: false,
    }
}

fn validate(input: &Input, key: Option<&CodeKey>) -> Result<NotificationCommand, Refusal> {
    let n: NotificationCommand = decode(input, |n: &NotificationCommand| &n.subscriber_id)?;
    SubscriberId::parse(&n.subscriber_id)?;
    if n.notification_id.is_empty() {
        return Err(Refusal::invalid("notification_id", "is required"));
    }
    match NotificationKind::try_from(n.kind) {
        Ok(NotificationKind::Unspecified) | Err(_) => {
            Err(Refusal::invalid("kind", format!("{} is not a known notification kind", n.kind)))
        }
        Ok(NotificationKind::ConfirmationCode) if !n.parameters.contains_key(SEALED_CODE) => {
            Err(Refusal::invalid("parameters.code_sealed", "a confirmation code is required"))
        }
        Ok(_) => {
            // A code that cannot be opened is refused now, not at each delivery attempt.
            opened(&n, key)?;
            Ok(n)
        }
    }
}

impl<C: Channel> Notifier<C> {
    /// A notifier delivering through `channel` under `policy`, to one subscriber at a time
    /// (see [`Notifier::with_concurrency`]).
    pub fn new(channel: C, policy: Policy) -> Self {
        Self { channel, policy, code_key: None, concurrency: 1 }
    }

    /// Delivers to at most `n` subscribers at once (`NOTIFIER_CONCURRENCY`).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Opens confirmation codes with `key` (without one, they are refused to the DLQ).
    pub fn with_code_key(mut self, key: Option<CodeKey>) -> Self {
        self.code_key = key;
        self
    }

    /// One attempt on each channel still to deliver; a receipt per attempt. Returns what is
    /// left to retry (channels of one notification are retried together, at the earliest
    /// backoff among them).
    async fn attempt(
        &self,
        pending: Pending,
        now: SystemTime,
        out: &mut Vec<Output>,
    ) -> Option<Pending> {
        let n = pending.notification?;
        let rendered = match opened(&n, self.code_key.as_ref()) {
            Ok(open) => render(&open),
            Err(refusal) => {
                // Checked when it arrived; a key changed since then is the only way here.
                tracing::error!(notification_id = %n.notification_id, reason = %refusal, "cannot render");
                return None;
            }
        };
        let mut left = Pending {
            notification: None,
            channels: Vec::new(),
            attempts: Vec::new(),
            due: None,
            delivered_somewhere: pending.delivered_somewhere,
        };
        let mut next: Option<SystemTime> = None;
        for (i, &index) in pending.channels.iter().enumerate() {
            let attempt = pending.attempts.get(i).copied().unwrap_or(0) + 1;
            let Some(channel) = usize::try_from(index).ok().and_then(|i| n.channels.get(i)) else {
                continue;
            };
            let kind = ChannelKind::try_from(channel.kind).unwrap_or(ChannelKind::Unspecified);
            let masked = mask_contact(&channel.address);
            let delivery = Delivery {
                notification_id: &n.notification_id,
                notification: NotificationKind::try_from(n.kind)
                    .unwrap_or(NotificationKind::Unspecified),
                kind,
                address: &channel.address,
                masked: &masked,
                subscriber_id: &n.subscriber_id,
                locale: rendered.locale,
                subject: &rendered.subject,
                text: &rendered.text,
                urgent: n.urgent,
            };
            // What this attempt comes to: the receipt's status and detail.
            let (status, detail) = match self.channel.deliver(&delivery).await {
                Ok(()) => {
                    left.delivered_somewhere = true;
                    (DeliveryStatus::Delivered, String::new())
                }
                Err(ChannelError::Transient(detail))
                    if attempt < self.policy.retry.max_attempts =>
                {
                    let wait = self.policy.retry.backoff(attempt);
                    left.channels.push(index);
                    left.attempts.push(attempt);
                    next = Some(next.map_or(now + wait, |t| t.min(now + wait)));
                    (DeliveryStatus::Failed, format!("{detail}; retry in {wait:?}"))
                }
                Err(error) => (DeliveryStatus::Failed, error.to_string()),
            };
            out.push(receipt(&n, kind, status, attempt, masked, detail));
        }
        match next {
            Some(due) => {
                left.due = Some(timestamp_of(due));
                left.notification = Some(n);
                Some(left)
            }
            None => {
                if !left.delivered_somewhere {
                    out.push(receipt(
                        &n,
                        ChannelKind::Unspecified,
                        DeliveryStatus::Undeliverable,
                        0,
                        String::new(),
                        "every channel failed".into(),
                    ));
                }
                None
            }
        }
    }

    /// Checks `n` against the subscriber's history and records what was decided; receipts
    /// for what is not delivered now go to `out`. Returns what to deliver now.
    fn admit(
        &self,
        input: &Input,
        n: &NotificationCommand,
        state: &mut SubscriberDeliveries,
        out: &mut Vec<Output>,
    ) -> Option<Pending> {
        // The record's time, so that a replay decides the same way.
        let now = system_time(&input.time());
        match self.policy.admit(state, n, now) {
            Admission::Duplicate => out.push(suppressed(n, "duplicate notification id")),
            Admission::RateLimited(reason) => {
                self.policy.remember(state, n, false, now);
                out.push(suppressed(n, &reason));
            }
            _ if n.channels.is_empty() => {
                self.policy.remember(state, n, false, now);
                out.push(suppressed(n, "subscriber has no notification channel"));
            }
            Admission::Deferred { until, zone } => {
                self.policy.remember(state, n, true, now);
                let until_text = chrono::DateTime::<chrono::Utc>::from(until).with_timezone(&zone);
                out.push(receipt(
                    n,
                    ChannelKind::Unspecified,
                    DeliveryStatus::Deferred,
                    0,
                    String::new(),
                    format!(
                        "quiet hours in {zone}: held until {}",
                        until_text.format("%Y-%m-%d %H:%M %Z")
                    ),
                ));
                state.pending.push(all_channels(n, until));
            }
            Admission::Deliver => {
                self.policy.remember(state, n, true, now);
                return Some(all_channels(n, now));
            }
        }
        None
    }
}

fn is_due(pending: &Pending, now: SystemTime) -> bool {
    pending.due.as_ref().is_none_or(|d| system_time(d) <= now)
}

impl<C: Channel> Processor for Notifier<C> {
    type Event = NotificationCommand;
    type State = SubscriberDeliveries;
    type Batch = ();
    const CHANGELOG: Option<Changelog<SubscriberDeliveries>> =
        Some(Changelog::whole(topics::NOTIFIER_STATE));

    fn decode(&self, input: &Input) -> Result<(String, NotificationCommand), Refusal> {
        let n = validate(input, self.code_key.as_ref())?;
        Ok((n.subscriber_id.clone(), n))
    }

    async fn begin_batch(&self, _batch: &[Input]) {}

    /// Decides against the history (quick), then delivers. Different subscribers are
    /// delivered to at once (at most `concurrency`), each subscriber's messages one after
    /// the other in their order.
    async fn process(
        &self,
        input: &Input,
        _batch: &(),
        state: &mut Option<SubscriberDeliveries>,
        n: NotificationCommand,
    ) -> Answer {
        let state = state.get_or_insert_with(|| SubscriberDeliveries {
            subscriber_id: n.subscriber_id.clone(),
            ..Default::default()
        });
        let mut out = Vec::new();
        if let Some(pending) = self.admit(input, &n, state, &mut out) {
            if let Some(left) = self.attempt(pending, SystemTime::now(), &mut out).await {
                state.pending.push(left);
            }
        }
        Ok(out)
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn due_at(&self, state: &SubscriberDeliveries, now: SystemTime) -> Option<SystemTime> {
        // A delivery without a due time is due at once.
        state.pending.iter().map(|p| p.due.as_ref().map_or(now, system_time)).min()
    }

    /// Delivers what was held over quiet hours or waits for a retry, once it is due.
    async fn on_due(
        &self,
        _key: &str,
        state: &mut Option<SubscriberDeliveries>,
        now: SystemTime,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(state) = state.as_mut() else { return out };
        let (ready, waiting): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut state.pending).into_iter().partition(|p| is_due(p, now));
        state.pending = waiting;
        for pending in ready {
            if let Some(rest) = self.attempt(pending, now, &mut out).await {
                state.pending.push(rest);
            }
        }
        out
    }
}
