//! The files vpnd reads and writes while it serves: the configuration and
//! what it names (the users file, CRLs, the LDAP CA) on each reload or
//! change, and the saved sessions.
//!
//! Once vpnd serves it runs as `nobody`, which may read none of them (an
//! admin's 0600 files under a 0700 directory); the broker reads and writes
//! them for it, each request checked against the files the configuration
//! names (`broker/server.rs`). [`set`] puts that in place; until then, and
//! in tests, these are the plain file system calls.
//!
//! A leaf: nothing here knows the rest of the crate.

use std::{io, path::Path, sync::OnceLock, time::SystemTime};

/// How files are reached once set.
pub trait Access: Send + Sync {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn modified(&self, path: &Path) -> io::Result<SystemTime>;
    /// Replaces `path` whole (a new 0600 file, synced, renamed over it).
    fn write_private(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
}

static ACCESS: OnceLock<Box<dyn Access>> = OnceLock::new();

/// From now on files are reached through `access` (set once).
pub fn set(access: Box<dyn Access>) {
    let _ = ACCESS.set(access);
}

pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    match ACCESS.get() {
        Some(a) => a.read(path),
        None => std::fs::read(path),
    }
}

pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn modified(path: &Path) -> io::Result<SystemTime> {
    match ACCESS.get() {
        Some(a) => a.modified(path),
        None => std::fs::metadata(path)?.modified(),
    }
}

pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    match ACCESS.get() {
        Some(a) => a.write_private(path, bytes),
        None => write_private_here(path, bytes),
    }
}

/// [`write_private`] with the process's own rights.
pub fn write_private_here(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
