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
use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;
use std::time::SystemTime;

use topup_domain::{mask_contact, CodeKey, SubscriberId};
use topup_kafka::{
    apply_whole, decode, system_time, timestamp_of, Input, KafkaArgs, Output, Processor, Refusal,
    StateStore,
};
use topup_proto::notifier::v1::{Pending, SubscriberDeliveries};
use topup_proto::topics;
use topup_proto::v1::{
    ChannelKind, DeliveryReceipt, DeliveryStatus, NotificationCommand, NotificationKind,
};

use crate::channel::{Channel, ChannelError, Delivery};
use crate::metrics::{self, count};
use crate::policy::{Admission, Policy};
use crate::templates::render;

/// One delivery of a batch: the answer it belongs to, its receipts, what is left to retry.
type Delivered = (usize, Vec<Output>, Option<Pending>);

/// The notifier's processor.
pub struct Notifier<C> {
    channel: C,
    policy: Policy,
    store: StateStore<SubscriberDeliveries>,
    /// Earliest due time of anything pending; `None` when nothing is.
    next_due: Option<SystemTime>,
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
        Refusal::new(
            "parameters.code_sealed: CONFIRMATION_CODE_KEY is not set, so the code cannot be opened",
        )
    })?;
    let code = key
        .open(&n.subscriber_id, sealed)
        .map_err(|e| Refusal::new(format!("parameters.code_sealed: {e}")))?;
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
    metrics::receipt(channel, status);
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
    count(&metrics::SUPPRESSED);
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
        return Err(Refusal::new("notification_id: is required"));
    }
    match NotificationKind::try_from(n.kind) {
        Ok(NotificationKind::Unspecified) | Err(_) => {
            Err(Refusal::new(format!("kind: {} is not a known notification kind", n.kind)))
        }
        Ok(NotificationKind::ConfirmationCode) if !n.parameters.contains_key(SEALED_CODE) => {
            Err(Refusal::new("parameters.code_sealed: a confirmation code is required"))
        }
        Ok(_) => {
            // A code that cannot be opened is refused now, not at each delivery attempt.
            opened(&n, key)?;
            Ok(n)
        }
    }
}

impl<C: Channel> Notifier<C> {
    /// A notifier delivering through `channel` under `policy`, its history in the changelog.
    pub fn new(channel: C, policy: Policy, kafka: KafkaArgs) -> Self {
        Self {
            channel,
            policy,
            store: StateStore::new(kafka, topics::NOTIFIER_STATE, apply_whole),
            next_due: None,
            code_key: None,
            concurrency: 16,
        }
    }

    /// Delivers to at most `n` subscribers at once (default 16).
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
                tracing::error!(notification_id = %n.notification_id, reason = %refusal.0, "cannot render");
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
            match self.channel.deliver(&delivery).await {
                Ok(()) => {
                    count(&metrics::DELIVERED);
                    left.delivered_somewhere = true;
                    out.push(receipt(
                        &n,
                        kind,
                        DeliveryStatus::Delivered,
                        attempt,
                        masked,
                        String::new(),
                    ));
                }
                Err(ChannelError::Transient(detail))
                    if attempt < self.policy.retry.max_attempts =>
                {
                    count(&metrics::FAILED);
                    let wait = self.policy.retry.backoff(attempt);
                    tracing::warn!(subscriber = %n.subscriber_id, destination = %masked, attempt, ?wait, %detail, "delivery failed; will retry");
                    out.push(receipt(
                        &n,
                        kind,
                        DeliveryStatus::Failed,
                        attempt,
                        masked,
                        format!("{detail}; retry in {wait:?}"),
                    ));
                    left.channels.push(index);
                    left.attempts.push(attempt);
                    next = Some(next.map_or(now + wait, |t| t.min(now + wait)));
                }
                Err(error) => {
                    count(&metrics::FAILED);
                    tracing::warn!(subscriber = %n.subscriber_id, destination = %masked, attempt, %error, "delivery failed for good");
                    out.push(receipt(
                        &n,
                        kind,
                        DeliveryStatus::Failed,
                        attempt,
                        masked,
                        error.to_string(),
                    ));
                }
            }
        }
        match next {
            Some(due) => {
                left.due = Some(timestamp_of(due));
                left.notification = Some(n);
                Some(left)
            }
            None => {
                if !left.delivered_somewhere {
                    count(&metrics::UNDELIVERABLE);
                    tracing::error!(subscriber = %n.subscriber_id, notification_id = %n.notification_id, "every channel failed: the subscriber could not be told");
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
        &mut self,
        input: &Input,
        n: &NotificationCommand,
        out: &mut Vec<Output>,
    ) -> Option<Pending> {
        // The record's time, so that a replay decides the same way.
        let now = system_time(&input.time());
        let states = self.store.partition_mut(input.partition);
        let mut state = states.remove(&n.subscriber_id).unwrap_or_else(|| SubscriberDeliveries {
            subscriber_id: n.subscriber_id.clone(),
            ..Default::default()
        });
        let mut deliver = None;
        match self.policy.admit(&state, n, now) {
            Admission::Duplicate => out.push(suppressed(n, "duplicate notification id")),
            Admission::RateLimited(reason) => {
                self.policy.remember(&mut state, n, false, now);
                out.push(suppressed(n, &reason));
            }
            _ if n.channels.is_empty() => {
                self.policy.remember(&mut state, n, false, now);
                out.push(suppressed(n, "subscriber has no notification channel"));
            }
            Admission::Deferred { until, zone } => {
                count(&metrics::DEFERRED);
                self.policy.remember(&mut state, n, true, now);
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
                let pending = all_channels(n, until);
                self.schedule(&pending);
                state.pending.push(pending);
            }
            Admission::Deliver => {
                self.policy.remember(&mut state, n, true, now);
                deliver = Some(all_channels(n, now));
            }
        }
        self.store.partition_mut(input.partition).insert(n.subscriber_id.clone(), state);
        deliver
    }

    fn schedule(&mut self, pending: &Pending) {
        if let Some(due) = pending.due.as_ref().map(system_time) {
            self.next_due = Some(self.next_due.map_or(due, |t| t.min(due)));
        }
    }
}

impl<C: Channel> Processor for Notifier<C> {
    async fn assigned(&mut self, partitions: &BTreeSet<i32>) -> topup_kafka::Result<()> {
        self.store.restore(partitions).await?;
        // Look at everything restored on the next tick.
        self.next_due = Some(SystemTime::UNIX_EPOCH);
        Ok(())
    }

    fn revoked(&mut self, partitions: &BTreeSet<i32>) {
        self.store.revoke(partitions);
    }

    async fn process(&mut self, input: &Input, out: &mut Vec<Output>) -> Result<(), Refusal> {
        let answer = self.process_batch(std::slice::from_ref(input)).await.pop();
        out.extend(answer.unwrap_or_else(|| Ok(Vec::new()))?);
        Ok(())
    }

    /// Decides every record in order (policy and history, which are quick), then delivers:
    /// different subscribers at once (at most `concurrency`), each subscriber's messages one
    /// after the other in their order. A subscriber's history is written once per batch,
    /// with the answer of their last record (the batch commits as one transaction).
    async fn process_batch(&mut self, batch: &[Input]) -> Vec<Result<Vec<Output>, Refusal>> {
        let mut answers = Vec::with_capacity(batch.len());
        let mut before: HashMap<(i32, String), Option<SubscriberDeliveries>> = HashMap::new();
        let mut last_of: HashMap<(i32, String), usize> = HashMap::new();
        let mut deliveries: BTreeMap<(i32, String), Vec<(usize, Pending)>> = BTreeMap::new();
        for (index, input) in batch.iter().enumerate() {
            let answer = validate(input, self.code_key.as_ref())
                .inspect_err(|_| count(&metrics::DEAD_LETTERS))
                .map(|n| {
                    let key = (input.partition, n.subscriber_id.clone());
                    before.entry(key.clone()).or_insert_with(|| {
                        self.store.partition_mut(input.partition).get(&n.subscriber_id).cloned()
                    });
                    last_of.insert(key.clone(), index);
                    let mut out = Vec::new();
                    if let Some(pending) = self.admit(input, &n, &mut out) {
                        deliveries.entry(key).or_default().push((index, pending));
                    }
                    out
                });
            answers.push(answer);
        }
        let this = &*self;
        let delivered: Vec<((i32, String), Vec<Delivered>)> =
            futures::stream::iter(deliveries.into_iter().map(|(key, jobs)| async move {
                let mut done = Vec::with_capacity(jobs.len());
                for (index, pending) in jobs {
                    let mut out = Vec::new();
                    let left = this.attempt(pending, SystemTime::now(), &mut out).await;
                    done.push((index, out, left));
                }
                (key, done)
            }))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for ((partition, subscriber), done) in delivered {
            for (index, out, left) in done {
                if let Some(Ok(outputs)) = answers.get_mut(index) {
                    outputs.extend(out);
                }
                if let Some(left) = left {
                    self.schedule(&left);
                    if let Some(state) = self.store.partition_mut(partition).get_mut(&subscriber) {
                        state.pending.push(left);
                    }
                }
            }
        }
        for (key, index) in last_of {
            let (partition, subscriber) = &key;
            let now = self.store.partition_mut(*partition).get(subscriber).cloned();
            if now.is_some() && before.get(&key).cloned().flatten() != now {
                if let (Some(state), Some(Ok(outputs))) = (now, answers.get_mut(index)) {
                    outputs.push(self.store.record(*partition, subscriber, &state));
                }
            }
        }
        answers
    }

    async fn tick(&mut self, now: SystemTime) -> Vec<Output> {
        let mut out = Vec::new();
        if self.next_due.is_none_or(|due| due > now) {
            return out;
        }
        // Take what is due out of the states; note when the rest is due.
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for (partition, states) in self.store.partitions_mut() {
            for (subscriber, state) in states.iter_mut() {
                let (ready, waiting): (Vec<Pending>, Vec<Pending>) =
                    std::mem::take(&mut state.pending)
                        .into_iter()
                        .partition(|p| p.due.as_ref().is_none_or(|d| system_time(d) <= now));
                for p in &waiting {
                    if let Some(d) = p.due.as_ref().map(system_time) {
                        next = Some(next.map_or(d, |t| t.min(d)));
                    }
                }
                state.pending = waiting;
                if !ready.is_empty() {
                    due.push((partition, subscriber.clone(), ready));
                }
            }
        }
        self.next_due = next;
        for (partition, subscriber, ready) in due {
            let mut left = Vec::new();
            for pending in ready {
                if let Some(rest) = self.attempt(pending, now, &mut out).await {
                    left.push(rest);
                }
            }
            for pending in &left {
                self.schedule(pending);
            }
            let states = self.store.partition_mut(partition);
            let Some(state) = states.get_mut(&subscriber) else { continue };
            state.pending.extend(left);
            let state = state.clone();
            out.push(self.store.record(partition, &subscriber, &state));
        }
        out
    }
}
