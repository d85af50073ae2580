//! The few filesystem operations the spool needs, behind a trait so that tests can inject
//! torn writes, failing fsyncs, ENOSPC and crashes ([`super::memfs`]), and the real
//! implementation ([`StdFs`]) on top of `std::fs`.
//!
//! Files are positional (`read_at` / `write_all_at` take `&self`), so one handle can be
//! shared: the writer appends while readers read and a sync runs without any lock held.

use std::any::Any;
use std::fs::{File, OpenOptions};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One open file.
#[allow(clippy::len_without_is_empty)] // A length in bytes of a file, not a collection.
pub trait SpoolFile: Send + Sync + 'static {
    /// Reads up to `buf.len()` bytes at `offset`; fewer at the end of the file.
    ///
    /// # Errors
    /// The OS error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// The OS error; part of `buf` may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    ///
    /// # Errors
    /// The OS error: the state of data written since the last successful sync is unknown.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    ///
    /// # Errors
    /// The OS error.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length.
    ///
    /// # Errors
    /// The OS error.
    fn len(&self) -> io::Result<u64>;
}

/// A directory of spool files.
pub trait Fs: Send + Sync + 'static {
    /// The open-file type.
    type File: SpoolFile;
    /// Creates `dir` and its parents.
    ///
    /// # Errors
    /// The OS error.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    ///
    /// # Errors
    /// The OS error.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and writing, creating it (empty) if `create`.
    ///
    /// # Errors
    /// The OS error; `NotFound` when it does not exist and `create` is false.
    fn open(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    /// Removes the file `path`.
    ///
    /// # Errors
    /// The OS error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    ///
    /// # Errors
    /// The OS error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (creations, removals, renames) durable.
    ///
    /// # Errors
    /// The OS error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (created if missing), held until the returned value
    /// is dropped.
    ///
    /// # Errors
    /// `WouldBlock` when another holder has it; other OS errors.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
    /// Bytes available to this process on the filesystem holding `dir`.
    ///
    /// # Errors
    /// The OS error.
    fn available_bytes(&self, dir: &Path) -> io::Result<u64>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdFs;

impl SpoolFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl Fs for StdFs {
    type File = File;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = self.open(path, true)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Box::new(lock)),
            Err((_, Errno::EWOULDBLOCK)) => Err(io::ErrorKind::WouldBlock.into()),
            Err((_, errno)) => Err(errno.into()),
        }
    }

    fn available_bytes(&self, dir: &Path) -> io::Result<u64> {
        let stat = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
        Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
    }
}
