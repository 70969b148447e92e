//! The NBD backend of a replicated block group: every call goes to the engine core that owns the
//! group ([`engine::BgHandle`]), which executes it on the leader or forwards it there.
//!
//! Durability: the engine acknowledges a write only once it is committed (fsynced in the WAL of
//! a majority) and applied on the leader, so a FUA write needs nothing extra and FLUSH only has
//! to order itself after the writes already answered — which holds across every connection and
//! every node, hence `CAN_MULTI_CONN`.

use bytes::Bytes;
use engine::{BgHandle, ErrorKind};

use crate::error::Error;
use crate::nbd::{BackendResult, BlockBackend, Errno};

/// One block group as an NBD export.
pub struct BgBackend {
    name: String,
    handle: BgHandle,
}

impl BgBackend {
    pub fn new(name: String, handle: BgHandle) -> BgBackend {
        BgBackend { name, handle }
    }

    fn err(&self, op: &'static str, offset: u64, e: engine::Error) -> Error {
        let errno = match e.kind() {
            ErrorKind::Invalid => Errno::Inval,
            ErrorKind::NoSpace => Errno::NoSpc,
            ErrorKind::Shutdown => Errno::Shutdown,
            ErrorKind::Io => Errno::Io,
        };
        tracing::warn!(export = %self.name, op, offset, error = %e, "block request failed");
        Error::Backend {
            export: self.name.clone(),
            op,
            offset,
            errno,
            detail: e.to_string(),
        }
    }
}

impl BlockBackend for BgBackend {
    fn size(&self) -> u64 {
        self.handle.size()
    }

    fn flush_covers_all_connections(&self) -> bool {
        true
    }

    fn can_fast_zero(&self, _may_trim: bool) -> bool {
        // Zeroing is a replicated fallocate (punch hole or zero range), never a data write.
        true
    }

    fn home(&self) -> Option<tokio::runtime::Handle> {
        Some(self.handle.home().clone())
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.handle
            .read(offset, len)
            .await
            .map_err(|e| self.err("read", offset, e))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BackendResult<()> {
        self.handle
            .write(offset, data)
            .await
            .map_err(|e| self.err("write", offset, e))
    }

    async fn flush(&self) -> BackendResult<()> {
        self.handle
            .flush()
            .await
            .map_err(|e| self.err("flush", 0, e))
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> BackendResult<()> {
        self.handle
            .trim(offset, len)
            .await
            .map_err(|e| self.err("trim", offset, e))
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        self.handle
            .write_zeroes(offset, len, may_trim)
            .await
            .map_err(|e| self.err("write_zeroes", offset, e))
    }
}
