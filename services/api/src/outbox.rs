//! The outbox relay: publishes the rule changes the handlers committed to the database
//! (table `outbox`, written in the same transaction as the change) to `topup.rules.v1`, and
//! deletes each row once Kafka has acknowledged it. A change is therefore in the database
//! and on Kafka, or (until the relay gets to it) in the database and on its way — never on
//! Kafka only, and never lost when the API dies between its commit and the publish.
//!
//! One API instance relays at a time (a lease in `outbox_lease`, renewed as it works and
//! taken over once it has run out), and it publishes each subscriber's rows in version
//! order, one after the other: the evaluator sees a subscriber's changes in the order they
//! were made. A row published but not yet deleted when the API dies is published again;
//! the evaluator takes a rule that has not changed as no change.
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use topup_proto::topics;

use crate::store::Db;

/// How long a relay's lease lasts; renewed on every round.
const LEASE: Duration = Duration::from_secs(30);
/// How often an idle relay looks at the outbox without being told to.
const IDLE: Duration = Duration::from_secs(1);
/// Rows read per round.
const ROUND: i64 = 500;

/// What the handlers and the relay share: the handlers wake the relay after a commit; the
/// relay tells waiting handlers when it has published.
#[derive(Debug, Default)]
pub struct Outbox {
    wake: Notify,
    published: Notify,
}

impl Outbox {
    /// After a commit that put a row in the outbox.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until the change to `version` of `subscriber`'s rule is on Kafka, at most
    /// `wait`; true if it is. The change is committed either way and will be published.
    pub async fn until_published(
        &self,
        db: &Db,
        subscriber: &str,
        version: i64,
        wait: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the look, so that a round ending in between is not missed.
            let published = self.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            match db.in_outbox(subscriber, version).await {
                Ok(false) => return true,
                Ok(true) => {}
                Err(error) => {
                    tracing::warn!(%error, "reading the outbox");
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, published).await.is_err() {
                return false;
            }
        }
    }
}

fn now_ms() -> i64 {
    topup_kafka::now_timestamp().seconds.saturating_mul(1000)
}

/// Publishes what is in the outbox until `shutdown`.
pub async fn relay(
    db: Db,
    producer: FutureProducer,
    outbox: Arc<Outbox>,
    holder: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let waiting = outbox.wake.notified();
        let round = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            round = relay_round(&db, &producer, &holder) => round,
        };
        outbox.published.notify_waiters();
        let pause = match round {
            Ok(published) if published > 0 => {
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(_) => IDLE,
            Err(error) => {
                tracing::warn!(%error, ?backoff, "the outbox relay could not publish; trying again");
                backoff = (backoff * 2).min(Duration::from_secs(10));
                backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = waiting => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One round: publishes what waits in order, deletes what Kafka took, renewing the lease
/// before every send and stopping as soon as it is another's. A send ends within 20 s
/// (10 s to be queued, `message.timeout.ms` 10 s to be delivered), inside the 30 s the
/// renewal just before it gave: no successor can publish before it has landed. Answers how
/// many rows were published.
async fn relay_round(db: &Db, producer: &FutureProducer, holder: &str) -> anyhow::Result<usize> {
    let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let renew = || db.take_lease(holder, now_ms(), now_ms().saturating_add(lease_ms));
    if !renew().await? {
        return Ok(0);
    }
    let rows = db.outbox(ROUND).await?;
    for (n, row) in rows.iter().enumerate() {
        if n > 0 && !renew().await? {
            return Ok(n);
        }
        producer
            .send(
                FutureRecord::to(topics::RULES).key(&row.subscriber_id).payload(&row.record),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| anyhow::anyhow!("publishing to {}: {error}", topics::RULES))?;
        db.published(&row.subscriber_id, row.version).await?;
    }
    Ok(rows.len())
}
