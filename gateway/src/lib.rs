//! sensorgate: an MQTT-SN gateway and protocol bridge with store-and-forward.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
//!
//! Layout: [`config`] (validated before anything binds), [`mqttsn`] (the sans-IO protocol
//! core and its codec), [`io`] (thin adapters owning sockets), [`app`] (wiring and lifecycle).

pub mod app;
pub mod config;
pub mod io;
pub mod mqttsn;
pub mod preflight;
