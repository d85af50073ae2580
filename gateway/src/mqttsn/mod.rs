//! MQTT-SN v1.2: the wire codec and the sans-IO gateway core.

pub mod codec;
pub mod core;
