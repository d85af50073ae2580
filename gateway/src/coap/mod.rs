//! CoAP ingress (RFC 7252, RFC 7641 Observe, RFC 7959 block-wise), issue 15.
//!
//! Status: only the codec ([`msg`]) exists so far. It is **not wired into the running gateway
//! yet**: the sans-IO core, the UDP driver and the `[coap]` config section come in later work
//! packages (see the CoAP design plan), so no socket answers CoAP today.
//!
//! Invariants kept here: every use of the `coap-lite` crate stays inside [`msg`], so a borrowed
//! checked view can replace its decoder behind the same API; nothing in this module panics on
//! bytes from the network.

pub mod block;
pub mod core;
pub mod link;
pub mod msg;
mod resource;
