//! What the NBD server needs from block storage: the [`BlockBackend`] trait (one per export),
//! the [`ExportRegistry`] that maps export names to backends, and [`Errno`], the NBD error codes
//! a backend failure turns into.
//!
//! The trait returns `impl Future + Send` so that a backend can be anything from an in-memory
//! buffer to a raft-replicated block group living on another thread (reached over channels, with
//! a follower forwarding to the leader); the server spawns one task per request and needs only
//! that the futures be `Send`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::error::Error;

/// NBD error codes (the `error` field of a reply). Values are fixed by the protocol, not by the
/// host's errno numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    /// Operation not permitted (e.g. a write on a read-only export).
    Perm,
    /// Input/output error: the catch-all for storage and replication failures.
    Io,
    /// Cannot allocate memory. The protocol asks servers to avoid it; we never send it ourselves.
    NoMem,
    /// Invalid argument: bad flags, out-of-range read or trim, oversized request.
    Inval,
    /// No space left: a write beyond the export's end, or storage full.
    NoSpc,
    /// Value too large (only meaningful with structured replies, which bd does not speak).
    Overflow,
    /// Not supported: only for a fast-zero request that cannot be served fast.
    NotSup,
    /// The server (or this export) is shutting down; the client should disconnect.
    Shutdown,
}

impl Errno {
    /// The code sent on the wire.
    pub const fn nbd_code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Maps a host I/O error the way the protocol recommends (`EDQUOT`/`EFBIG` are `ENOSPC`).
    pub fn from_io(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::NoSpc,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Errno::Perm,
            Some(libc::EINVAL) => Errno::Inval,
            Some(libc::ENOMEM) => Errno::NoMem,
            Some(libc::EOPNOTSUPP) => Errno::NotSup,
            Some(libc::ESHUTDOWN) => Errno::Shutdown,
            Some(_) => Errno::Io,
            // Errors made in Rust rather than by a syscall only have a kind.
            None => match err.kind() {
                io::ErrorKind::InvalidInput => Errno::Inval,
                io::ErrorKind::PermissionDenied => Errno::Perm,
                io::ErrorKind::StorageFull => Errno::NoSpc,
                io::ErrorKind::Unsupported => Errno::NotSup,
                _ => Errno::Io,
            },
        }
    }
}

/// Result of a backend operation.
pub type BackendResult<T> = Result<T, Error>;

/// Block storage behind one NBD export.
///
/// Offsets and lengths given to the I/O methods are already checked against [`size`] by the
/// server. Reads and writes are at most the server's `request_bytes_max`; trim and write-zeroes
/// carry no payload and may be as long as the protocol allows (4 GiB - 1), as the Linux client
/// sends them.
///
/// Durability contract (the NBD one): a write whose `fua` is true must be durable before its
/// future resolves; `flush` must make durable every write whose future resolved before `flush`
/// was called. If `flush_covers_all_connections` is true, that holds for writes made through any
/// connection (then the server advertises `NBD_FLAG_CAN_MULTI_CONN`).
///
/// Errors are `crate::Error`s; the client receives [`Error::errno`]. A backend that is going
/// away (its export removed, the node shutting down) should fail with [`Errno::Shutdown`].
///
/// [`size`]: BlockBackend::size
pub trait BlockBackend: Send + Sync + 'static {
    /// Export size in bytes.
    fn size(&self) -> u64;

    /// Whether writes, trims and write-zeroes are refused (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// Whether `flush` and FUA make writes of every connection durable and visible
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    fn flush_covers_all_connections(&self) -> bool;

    /// Whether `write_zeroes` with this `may_trim` is cheaper than writing zero bytes
    /// (deallocation, metadata-only zeroing). When false, requests with `NBD_CMD_FLAG_FAST_ZERO`
    /// fail fast with `ENOTSUP` without touching the data.
    fn can_fast_zero(&self, may_trim: bool) -> bool {
        let _ = may_trim;
        false
    }

    /// The runtime this export's requests should be served from, if it is not the NBD server's
    /// own: after the handshake, the connection moves there (its socket re-registered with that
    /// runtime), so a backend that lives on one thread serves the connection without a
    /// cross-thread hop per request. `None` (the default) keeps it on the server's runtime.
    fn home(&self) -> Option<tokio::runtime::Handle> {
        None
    }

    /// Reads `len` bytes at `offset`; the result must be exactly `len` bytes long.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BackendResult<Bytes>> + Send;

    /// Writes `data` at `offset`.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = BackendResult<()>> + Send;

    /// Hints that `len` bytes at `offset` are no longer needed; contents become unspecified.
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Makes `len` bytes at `offset` read as zero. `may_trim` false means the range must stay
    /// allocated (`NBD_CMD_FLAG_NO_HOLE`).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
}

/// Maps export names to backends. Exports may appear and disappear at runtime; a connection
/// keeps the backend it negotiated (an `Arc`) until it closes.
pub trait ExportRegistry: Send + Sync + 'static {
    /// The backend type of every export of this registry (use an enum to mix kinds).
    type Backend: BlockBackend;

    /// The backend serving `name`, if any.
    fn lookup(&self, name: &str) -> Option<Arc<Self::Backend>>;

    /// Names listed by `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
}

/// A registry backed by a map under a lock: enough for tests, dev tools and a node whose BG set
/// changes rarely.
pub struct Exports<B> {
    map: RwLock<BTreeMap<String, Arc<B>>>,
}

impl<B> Default for Exports<B> {
    fn default() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<B: BlockBackend> Exports<B> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an export; returns the backend it replaced.
    pub fn insert(&self, name: impl Into<String>, backend: Arc<B>) -> Option<Arc<B>> {
        self.write_map().insert(name.into(), backend)
    }

    /// Removes an export. Connections already using it keep their `Arc`.
    pub fn remove(&self, name: &str) -> Option<Arc<B>> {
        self.write_map().remove(name)
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<B>>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still safe to use.
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<B>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: BlockBackend> ExportRegistry for Exports<B> {
    type Backend = B;

    fn lookup(&self, name: &str) -> Option<Arc<B>> {
        self.read_map().get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.read_map().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_codes_match_the_protocol() {
        let table = [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ];
        for (errno, code) in table {
            assert_eq!(errno.nbd_code(), code, "{errno:?}");
        }
    }

    #[test]
    fn io_errors_map_like_the_spec_recommends() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(Errno::from_io(&e(libc::EDQUOT)), Errno::NoSpc);
        assert_eq!(Errno::from_io(&e(libc::EFBIG)), Errno::NoSpc);
        assert_eq!(Errno::from_io(&e(libc::EROFS)), Errno::Perm);
        assert_eq!(Errno::from_io(&e(libc::EIO)), Errno::Io);
        assert_eq!(Errno::from_io(&io::Error::other("x")), Errno::Io);
        let invalid = io::Error::new(io::ErrorKind::InvalidInput, "past the end");
        assert_eq!(Errno::from_io(&invalid), Errno::Inval);
    }
}
