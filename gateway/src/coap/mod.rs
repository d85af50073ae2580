//! CoAP ingress (RFC 7252, RFC 7641 Observe, RFC 7959 block-wise), issue 15.
//!
//! - [`msg`]: the checked codec (decode into a typed `Message`, encoders for what the gateway
//!   sends).
//! - `resource`: the pure request table (`/ps/{topic}`, `/.well-known/core`, queries).
//! - [`core`]: the sans-IO core the UDP driver drives through [`crate::ingress::DatagramCore`]:
//!   peers, deduplication, acknowledgement after durable, separate responses and
//!   retransmission, Observe.
//!
//! Status: the core is complete for single-datagram bodies; Block1/Block2 (RFC 7959) come with
//! the block tables (a Block1 transfer beyond one block is answered 4.13 + Size1 until then).
//! The driver and the `[coap]` config section are wired elsewhere.
//!
//! Invariants kept here: every use of the `coap-lite` crate stays inside [`msg`], so a borrowed
//! checked view can replace its decoder behind the same API; nothing in this module panics on
//! bytes from the network.

pub mod block;
pub mod core;
pub mod link;
pub mod msg;
mod resource;
