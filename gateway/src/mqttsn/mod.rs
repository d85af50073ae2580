//! MQTT-SN v1.2: the wire codec, the sans-IO gateway core, and the persisted session format.

pub mod codec;
pub mod core;
pub mod persist;
