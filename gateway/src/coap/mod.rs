//! CoAP ingress (RFC 7252, RFC 7641 Observe, RFC 7959 block-wise), issue 15.
//!
//! - [`msg`]: the checked codec (decode into a typed `Message`, encoders for what the gateway
//!   sends).
//! - `resource`: the pure request table (`/ps/{topic}`, `/.well-known/core`, queries).
//! - [`core`]: the sans-IO core the UDP driver drives through [`crate::ingress::DatagramCore`]:
//!   peers, deduplication, acknowledgement after durable, separate responses and
//!   retransmission, Observe.
//!
//! - [`block`], [`link`]: the block-wise tables (Block1 reassembly, Block2 body cache) and the
//!   `/.well-known/core` body, used by the core.
//!
//! The UDP driver (`io::udp`) and the `[coap]` config section wire the core into the gateway.
//!
//! Invariants kept here: every use of the `coap-lite` crate stays inside [`msg`], so a borrowed
//! checked view can replace its decoder behind the same API; nothing in this module panics on
//! bytes from the network.

pub mod block;
pub mod core;
pub mod link;
pub mod msg;
mod resource;
