//! sensorgate: an MQTT-SN gateway and protocol bridge with store-and-forward.

// Denied, not forbidden, so that `io::batch` alone may allow it (see its module doc: the
// `recvmmsg` call `nix` cannot make correctly).
#![deny(unsafe_code)]
#![warn(missing_docs)]
//!
//! Layout: [`config`] (validated before anything binds), [`mqttsn`] (the sans-IO protocol
//! core and its codec), [`coap`] (the CoAP ingress core), [`http`] (the HTTP ingress), [`ingress`] (the seam every
//! datagram core implements), [`io`]
//! (thin adapters owning sockets), [`serial`] (MQTT-SN over serial lines), [`app`] (wiring and lifecycle).

pub mod app;
pub mod coap;
pub mod config;
pub mod dtls;
pub mod fleet;
pub mod http;
pub mod identity;
pub mod ingress;
pub mod io;
pub mod live;
pub mod mqttsn;
pub mod observe;
pub mod preflight;
pub mod reload;
pub mod security;
pub mod serial;
