//! An in-memory [`Fs`] for tests: it models what a crash keeps (synced data, then any prefix
//! of the unsynced writes, the last one possibly torn) and injects write failures, fsync
//! failures and ENOSPC.

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::Rng;

use super::fs::{Fs, SpoolFile};

/// An unsynced change to a file.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Changes since the last successful sync, in order.
    pending: Vec<Op>,
    /// What reads see.
    current: Vec<u8>,
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(offset, bytes) => {
            let offset = usize::try_from(*offset).unwrap_or(usize::MAX);
            let end = offset + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset..end].copy_from_slice(bytes);
        }
        Op::SetLen(len) => data.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

/// Faults to inject; all off by default.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Writes fail with ENOSPC (after writing a part of their bytes, like a full disk does).
    pub enospc: bool,
    /// Writes fail with EIO, writing nothing.
    pub eio_writes: bool,
    /// `sync_data` fails with EIO (the data stays unsynced).
    pub fail_sync: bool,
    /// What `available_bytes` reports.
    pub available: u64,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, Arc<Mutex<FileState>>>,
    locks: HashSet<PathBuf>,
    faults: Faults,
    /// Bytes written through `write_all_at`, for write-amplification checks.
    written: u64,
    syncs: u64,
}

/// The in-memory filesystem; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    state: Arc<Mutex<State>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemFs {
    /// An empty filesystem with no faults and unlimited space.
    #[must_use]
    pub fn new() -> Self {
        let fs = Self::default();
        fs.set_faults(Faults {
            available: u64::MAX,
            ..Faults::default()
        });
        fs
    }

    /// Sets the faults injected from now on.
    pub fn set_faults(&self, faults: Faults) {
        lock(&self.state).faults = faults;
    }

    /// The faults injected now.
    #[must_use]
    pub fn faults(&self) -> Faults {
        lock(&self.state).faults.clone()
    }

    /// Total bytes written and syncs done.
    pub fn io_counts(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.written, s.syncs)
    }

    /// Simulates a power loss: every file keeps its synced content plus a random prefix of
    /// its unsynced changes, the last kept write possibly torn; locks are released. Handles
    /// opened before the crash must not be used afterwards.
    pub fn crash(&self, rng: &mut impl Rng) {
        let mut s = lock(&self.state);
        s.locks.clear();
        let files = std::mem::take(&mut s.files);
        for (path, file) in files {
            let f = lock(&file);
            let mut data = f.durable.clone();
            let keep = rng.random_range(0..=f.pending.len());
            for (i, op) in f.pending.iter().take(keep).enumerate() {
                match op {
                    Op::Write(offset, bytes) if i + 1 == keep && !bytes.is_empty() => {
                        let cut = rng.random_range(0..=bytes.len());
                        apply(&mut data, &Op::Write(*offset, bytes[..cut].to_vec()));
                    }
                    op => apply(&mut data, op),
                }
            }
            let fresh = FileState {
                durable: data.clone(),
                pending: Vec::new(),
                current: data,
            };
            s.files.insert(path, Arc::new(Mutex::new(fresh)));
        }
    }

    /// Flips one bit of the durable and current content of `path` at `offset`.
    pub fn corrupt(&self, path: &Path, offset: usize) {
        let s = lock(&self.state);
        if let Some(file) = s.files.get(path) {
            let mut f = lock(file);
            if let Some(b) = f.durable.get_mut(offset) {
                *b ^= 0x40;
            }
            if let Some(b) = f.current.get_mut(offset) {
                *b ^= 0x40;
            }
        }
    }

    /// XORs `mask` into the durable and current content of `path` from `offset` on (bit rot of
    /// several bytes); bytes beyond the end are left alone.
    pub fn corrupt_with(&self, path: &Path, offset: usize, mask: &[u8]) {
        let s = lock(&self.state);
        if let Some(file) = s.files.get(path) {
            let mut f = lock(file);
            for (i, m) in mask.iter().enumerate() {
                if let Some(b) = f.durable.get_mut(offset + i) {
                    *b ^= m;
                }
                if let Some(b) = f.current.get_mut(offset + i) {
                    *b ^= m;
                }
            }
        }
    }

    /// The current content of `path` (empty if absent).
    pub fn contents(&self, path: &Path) -> Vec<u8> {
        let s = lock(&self.state);
        s.files
            .get(path)
            .map_or_else(Vec::new, |f| lock(f).current.clone())
    }

    /// The current length of `path` (0 if absent).
    pub fn file_len(&self, path: &Path) -> usize {
        let s = lock(&self.state);
        s.files.get(path).map_or(0, |f| lock(f).current.len())
    }

    /// The paths of the files that exist.
    #[must_use]
    pub fn file_names(&self) -> Vec<PathBuf> {
        lock(&self.state).files.keys().cloned().collect()
    }
}

/// A handle to one in-memory file.
#[derive(Debug)]
pub struct MemFile {
    file: Arc<Mutex<FileState>>,
    fs: Arc<Mutex<State>>,
}

impl SpoolFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = lock(&self.file);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(f.current.len());
        let n = buf.len().min(f.current.len() - start);
        buf[..n].copy_from_slice(&f.current[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let faults = {
            let mut s = lock(&self.fs);
            s.written += buf.len() as u64;
            s.faults.clone()
        };
        if faults.eio_writes {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut f = lock(&self.file);
        if faults.enospc {
            let part = buf[..buf.len() / 2].to_vec();
            f.pending.push(Op::Write(offset, part.clone()));
            apply(&mut f.current, &Op::Write(offset, part));
            return Err(io::Error::from_raw_os_error(28));
        }
        let op = Op::Write(offset, buf.to_vec());
        apply(&mut f.current, &op);
        f.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let fail = {
            let mut s = lock(&self.fs);
            s.syncs += 1;
            s.faults.fail_sync
        };
        if fail {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut f = lock(&self.file);
        f.durable = f.current.clone();
        f.pending.clear();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut f = lock(&self.file);
        let op = Op::SetLen(len);
        apply(&mut f.current, &op);
        f.pending.push(op);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.file).current.len() as u64)
    }
}

/// Releases a lock of the in-memory filesystem.
struct MemLock {
    fs: Arc<Mutex<State>>,
    path: PathBuf,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        lock(&self.fs).locks.remove(&self.path);
    }
}

impl Fs for MemFs {
    type File = MemFile;

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = lock(&self.state);
        Ok(s.files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<MemFile> {
        let mut s = lock(&self.state);
        let file = match s.files.get(path) {
            Some(f) => Arc::clone(f),
            None if create => {
                if s.faults.eio_writes {
                    return Err(io::Error::from_raw_os_error(5));
                }
                let f = Arc::new(Mutex::new(FileState::default()));
                s.files.insert(path.to_path_buf(), Arc::clone(&f));
                f
            }
            None => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(MemFile {
            file,
            fs: Arc::clone(&self.state),
        })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state)
            .files
            .remove(path)
            .map(drop)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let f = s.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        s.files.insert(to.to_path_buf(), f);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let mut s = lock(&self.state);
        if !s.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(MemLock {
            fs: Arc::clone(&self.state),
            path: path.to_path_buf(),
        }))
    }

    fn available_bytes(&self, _dir: &Path) -> io::Result<u64> {
        Ok(lock(&self.state).faults.available)
    }
}
