//! Observability: what the gateway reports about itself, served by the admin listener.
//!
//! ```text
//!  ingress drivers ──IngressQuery (bounded, answered between loop turns)──┐
//!  spool, drains, upstream link info, router (relaxed atomics) ───────────┤
//!                                                     snapshot::Sources::gather ─> Snapshot
//!                                                        │        │         │
//!                                          metrics (Prometheus)  status (JSON)  health
//!  monitor (1 s): link / spool changes ──> events (bounded ring) ──┘
//! ```
//!
//! - [`model`]: the protocol-neutral shape every ingress reports in (sessions by state,
//!   counters by reason, clients).
//! - [`snapshot`]: reads everything at one moment; the health verdict.
//! - [`metrics`], [`status`]: the two renderings; [`admin`]: the HTTP listener;
//!   [`events`] + [`monitor`]: notable events; [`process`]: the process's resource use.
//! - [`logging`]: journald or stderr, and the reloadable level filter; [`systemd`]:
//!   `Type=notify` readiness, `STATUS=` lines and the watchdog, from the same snapshot.

pub mod admin;
pub mod cli;
pub mod events;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod process;
pub mod snapshot;
pub mod status;
pub mod systemd;
