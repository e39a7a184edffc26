//! The whole platform in one process: the embedded Kafka (librdkafka's mock cluster), the
//! three services, and a carrier simulator that plays a few hundred subscribers.

pub mod brokers;
pub mod embedded;
pub mod simulator;
pub mod summary;
