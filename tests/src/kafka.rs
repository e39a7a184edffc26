//! The Kafka a test runs on: Apache Kafka by default, a KRaft broker of the test's own (one
//! combined node, or a controller and three brokers for the tests that take brokers down);
//! librdkafka's mock cluster with `TOPUP_TEST_KAFKA=mock` (quicker, for local runs; not a
//! conformant broker, docs/guarantees.md). The brokers themselves: [`topup::brokers`].
//!
//! A broker per test, not one shared broker with names namespaced per test: every service
//! has fixed topic names, group ids and transactional ids, and the ledgers read whole
//! topics; a broker of its own keeps each scenario exactly as a deployment sees it. Measured
//! here: a single node is ready (a transaction committed and a group joined) in 8–12 s, two
//! at once in 10–14 s each.
use anyhow::bail;
pub use topup::brokers::{BrokerKind, Brokers as TestKafka};

/// Which Kafka the tests use (`TOPUP_TEST_KAFKA`: `apache`, the default, or `mock`), with
/// `nodes` brokers (1 or 3) when it is Apache Kafka.
pub fn kind(nodes: u32) -> anyhow::Result<BrokerKind> {
    match std::env::var("TOPUP_TEST_KAFKA").as_deref() {
        Err(_) | Ok("") | Ok("apache") if nodes == 1 => Ok(BrokerKind::Apache),
        Err(_) | Ok("") | Ok("apache") => Ok(BrokerKind::Apache3),
        Ok("mock") => Ok(BrokerKind::Mock),
        Ok(other) => bail!("TOPUP_TEST_KAFKA={other:?}: use apache (the default) or mock"),
    }
}
