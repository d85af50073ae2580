//! Observability: what the gateway reports about itself (the admin listener's data).
//!
//! [`model`] is the protocol-neutral shape every ingress reports in; [`status`] the `/status`
//! document.

pub mod cli;
pub mod model;
pub mod status;
