//! Start-up checks of what a valid config will meet on this host: can the state directory be
//! created and written, and can the spool ever accept a message on its file system.
//!
//! Run by `check-config` (which must not create anything) and by `run` before anything binds.
//! The checks see what the running user can tell without creating anything: `stat`, `access(2)`
//! and `statvfs` on the directory, or on its nearest existing ancestor when it does not exist
//! yet. They cannot be exact (another user runs the service, a disk fills later); the spool and
//! the session store still report what really happens when they open.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::AccessFlags;

use crate::config::{Config, units};
use crate::io::session_store::SESSIONS_DIR;

/// What kind of failure ended the program; the binary maps each to its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The config is wrong (or wrong for this host).
    Config,
    /// The running user may not do what the config asks.
    Permission,
    /// A directory or file cannot be created or written.
    CantCreate,
    /// A resource is taken (an address in use, a state directory locked by another instance).
    Unavailable,
    /// The state directory holds data this version cannot read (a spool segment of another
    /// format version).
    Data,
    /// Anything else (a failure while running).
    Other,
}

/// Why the gateway would not start with this config on this host.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The state directory, or a directory it needs, exists but is not a directory.
    #[error(
        "state_dir: {} is {what}, not a directory; remove it or set [gateway] state_dir to a directory",
        path.display()
    )]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The directory (or the ancestor it would be created in) is on a read-only file system.
    #[error(
        "state_dir: {} on a read-only file system, so the spool and sessions cannot be written; \
         mount it read-write or set [gateway] state_dir to a writable place",
        located(dir, path, "is")
    )]
    ReadOnly {
        /// The directory sensorgate needs.
        dir: PathBuf,
        /// The existing directory that was checked (`dir` or the ancestor it would be created
        /// in).
        path: PathBuf,
    },
    /// The running user may not write (or create entries in) the directory.
    #[error(
        "state_dir: {} not writable by the user running sensorgate ({user}); \
         give that user write access (e.g. chown it) or set [gateway] state_dir elsewhere",
        located(dir, path, "is")
    )]
    NotWritable {
        /// The directory sensorgate needs.
        dir: PathBuf,
        /// The existing directory that was checked (`dir` or the ancestor it would be created
        /// in).
        path: PathBuf,
        /// The user, as far as it can be told (`uid N`).
        user: String,
    },
    /// `[spool] min_free_bytes` can never be met on the file system holding the spool.
    #[error(
        "[spool] min_free_bytes = {min_free} is larger than the whole file system holding {} \
         ({total} without the blocks reserved for root): the spool would refuse every \
         message; lower min_free_bytes or put state_dir on a larger file system",
        path.display(),
        min_free = units::format_size(*min_free),
        total = approx_size(*total)
    )]
    MinFreeTooLarge {
        /// The directory whose file system was measured.
        path: PathBuf,
        /// The configured watermark, in bytes.
        min_free: u64,
        /// The file system's size less the blocks reserved for root, in bytes.
        total: u64,
    },
    /// The check itself failed (a path that cannot be inspected).
    #[error("state_dir: cannot inspect {}: {error}", path.display())]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The OS error (not a `source`: the message already says it).
        error: io::Error,
    },
    /// The HTTPS listener's certificate, key or client CA cannot be used (the message names
    /// the key and the file).
    #[error(transparent)]
    HttpTls(#[from] crate::http::tls::TlsError),
    /// The `[http.jwt]` key file cannot be used (the message names the key and the file).
    #[error(transparent)]
    HttpJwt(#[from] crate::http::jwt::JwtKeyError),
}

impl PreflightError {
    /// The class of this failure (its exit status).
    pub fn class(&self) -> ErrorClass {
        match self {
            PreflightError::NotADirectory { .. } | PreflightError::ReadOnly { .. } => {
                ErrorClass::CantCreate
            }
            PreflightError::NotWritable { .. } => ErrorClass::Permission,
            PreflightError::MinFreeTooLarge { .. }
            | PreflightError::HttpTls(_)
            | PreflightError::HttpJwt(_) => ErrorClass::Config,
            PreflightError::Inspect { error, .. } => class_of_io(error),
        }
    }
}

/// The class of an OS error met while creating, opening or binding something.
pub fn class_of_io(error: &io::Error) -> ErrorClass {
    match error.kind() {
        io::ErrorKind::PermissionDenied => ErrorClass::Permission,
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable => ErrorClass::Unavailable,
        io::ErrorKind::ReadOnlyFilesystem
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::AlreadyExists
        | io::ErrorKind::StorageFull
        | io::ErrorKind::NotFound => ErrorClass::CantCreate,
        _ => ErrorClass::Other,
    }
}

/// Checks that the state directory can be used and that the spool's free-space watermark can
/// be met; the first problem found is returned.
///
/// # Errors
/// [`PreflightError`] naming the path, what will happen and what to do.
pub fn check(config: &Config) -> Result<(), PreflightError> {
    let state_dir = &config.gateway.state_dir;
    let spool_dir = &config.spool.spool.dir;
    for dir in [state_dir, spool_dir, &state_dir.join(SESSIONS_DIR)] {
        let existing = nearest_existing_dir(dir)?;
        match nix::unistd::access(&existing, AccessFlags::W_OK | AccessFlags::X_OK) {
            Ok(()) => {}
            Err(Errno::EROFS) => {
                return Err(PreflightError::ReadOnly {
                    dir: dir.clone(),
                    path: existing,
                });
            }
            Err(Errno::EACCES | Errno::EPERM) => {
                return Err(PreflightError::NotWritable {
                    dir: dir.clone(),
                    path: existing,
                    user: running_user(),
                });
            }
            Err(errno) => {
                return Err(PreflightError::Inspect {
                    path: existing,
                    error: errno.into(),
                });
            }
        }
    }
    let min_free = config.spool.spool.min_free_bytes;
    if min_free > 0 {
        let existing = nearest_existing_dir(spool_dir)?;
        let stat = nix::sys::statvfs::statvfs(&existing).map_err(|e| PreflightError::Inspect {
            path: existing.clone(),
            error: e.into(),
        })?;
        // The spool refuses while the available bytes (statvfs `f_bavail`, which leaves out
        // the blocks reserved for root, 5% on ext4 by default) are below the watermark; they
        // never exceed the file system's size less that reserve.
        let reserved = stat.blocks_free().saturating_sub(stat.blocks_available());
        let total = stat
            .blocks()
            .saturating_sub(reserved)
            .saturating_mul(stat.fragment_size());
        if min_free > total {
            return Err(PreflightError::MinFreeTooLarge {
                path: existing,
                min_free,
                total,
            });
        }
    }
    // The TLS and JWT key files are read now, so `check-config` reports a wrong one as `run`
    // would.
    if let Some(http) = &config.http {
        if let Some(files) = &http.tls {
            crate::http::tls::server_config(files, http.http2)?;
        }
        // The JWT key file likewise (the start and every SIGHUP read it again).
        if let Some(jwt) = &http.jwt {
            crate::http::jwt::JwtVerifier::load(jwt)?;
        }
    }
    Ok(())
}

/// `"<path> is"` when `dir` exists, else `"<dir> would be created in <path>, which is"`.
fn located(dir: &Path, path: &Path, verb: &str) -> String {
    if dir == path {
        format!("{} {verb}", path.display())
    } else {
        format!(
            "{} would be created in {}, which {verb}",
            dir.display(),
            path.display()
        )
    }
}

/// `dir` itself when it exists, else its nearest existing ancestor (where it would be created).
fn nearest_existing_dir(dir: &Path) -> Result<PathBuf, PreflightError> {
    let mut probe = dir;
    loop {
        let path = if probe.as_os_str().is_empty() {
            Path::new(".")
        } else {
            probe
        };
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(path.to_owned()),
            Ok(meta) => {
                return Err(PreflightError::NotADirectory {
                    path: path.to_owned(),
                    what: if meta.is_file() {
                        "a regular file"
                    } else {
                        "not a directory"
                    },
                });
            }
            // A missing path, or one below a file (ENOTDIR): look at the parent.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                match probe.parent() {
                    Some(parent) => probe = parent,
                    None => return Ok(PathBuf::from("/")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PreflightError::NotWritable {
                    dir: dir.to_owned(),
                    path: path.to_owned(),
                    user: running_user(),
                });
            }
            Err(error) => {
                return Err(PreflightError::Inspect {
                    path: path.to_owned(),
                    error,
                });
            }
        }
    }
}

/// A byte count rounded for people (`"251.9GiB"`); exact sizes are rarely round.
fn approx_size(bytes: u64) -> String {
    for (factor, unit) in units::SIZE_UNITS {
        if bytes >= factor {
            // Lossy on purpose: one decimal is all a reader needs.
            #[allow(clippy::cast_precision_loss)]
            let value = bytes as f64 / factor as f64;
            return format!("{value:.1}{unit}");
        }
    }
    format!("{bytes}B")
}

/// The running user as `uid N` (the owner of `/proc/self` is the effective uid).
fn running_user() -> String {
    std::fs::metadata("/proc/self").map_or_else(
        |_| "this user".to_owned(),
        |meta| format!("uid {}", meta.uid()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_dir_is_checked_at_its_nearest_existing_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        assert_eq!(nearest_existing_dir(&deep).unwrap(), tmp.path());
        assert_eq!(nearest_existing_dir(Path::new("")).unwrap(), Path::new("."));
    }

    #[test]
    fn a_file_in_the_way_is_not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state");
        std::fs::write(&file, b"x").unwrap();
        let err = nearest_existing_dir(&file.join("spool")).unwrap_err();
        assert!(
            matches!(&err, PreflightError::NotADirectory { path, what: "a regular file" } if *path == file),
            "{err}"
        );
        assert_eq!(err.class(), ErrorClass::CantCreate);
    }

    #[test]
    fn sizes_are_rounded_for_people() {
        assert_eq!(approx_size(270_553_174_016), "252.0GiB");
        assert_eq!(approx_size(1536), "1.5KiB");
        assert_eq!(approx_size(12), "12B");
    }
}
