//! What every durable log of the gateway shares: the record [`frame`]ing (CRC-checked
//! records, resynchronisation after damage, torn-tail detection) and the filesystem seam
//! ([`Fs`], with [`StdFs`] on `std::fs` and, for tests, [`memfs::MemFs`] that injects torn
//! writes, failing fsyncs, ENOSPC and crashes).
//!
//! Users: the spool (`crate::spool`, segment format versions 2 and 3) and the gateway's session
//! store (`sensorgate::io::session_store`, log format version 2).

pub mod frame;

pub use crate::spool::{Fs, SpoolFile, StdFs};

/// The fault-injecting in-memory filesystem, for the tests of this crate and (with the
/// `test-util` feature) of the gateway's.
#[cfg(any(test, feature = "test-util"))]
pub mod memfs {
    pub use crate::spool::memfs::{Faults, MemFile, MemFs};
}
