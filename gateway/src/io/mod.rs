//! IO adapters: thin tasks that move bytes between sockets and the sans-IO cores.

pub mod batch;
pub mod kernel_drops;
pub mod session_store;
pub mod tcp;
pub mod udp;
