//! sensorgate's northbound side: the message type, the topic rules, and the upstream
//! connections that carry messages to brokers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amqp;
pub mod durable;
pub mod message;
pub mod mqtt;
pub mod route;
pub mod router;
pub mod spool;
pub mod telemetry;
pub mod topic;
pub mod upstream;
