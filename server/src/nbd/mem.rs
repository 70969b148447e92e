//! An in-memory [`BlockBackend`] for tests and dev tools.
//!
//! Storage is sparse: the export is cut into fixed chunks allocated on first write, so a large
//! export costs only what has been written. Trim and hole-punching write-zeroes free whole
//! chunks, which makes zeroing fast. Memory is volatile by nature, so FLUSH and FUA only need
//! ordering, which the lock gives; `flush_covers_all_connections` is true because every
//! connection shares the one buffer.

use std::sync::RwLock;

use bytes::{Bytes, BytesMut};

use super::backend::{BackendResult, BlockBackend, Errno};
use crate::error::Error;

/// Allocation unit. Small enough that sparse use stays cheap, large enough that the chunk table
/// of a 1 GiB export is 16 Ki entries.
const CHUNK_BYTES: usize = 64 << 10;

/// Sparse in-memory block device.
pub struct MemBackend {
    size: u64,
    read_only: bool,
    chunks: RwLock<Vec<Option<Box<[u8]>>>>,
}

impl MemBackend {
    /// An all-zero export of `size` bytes.
    pub fn new(size: u64) -> Self {
        let count = size.div_ceil(CHUNK_BYTES as u64) as usize;
        Self {
            size,
            read_only: false,
            chunks: RwLock::new(vec![None; count]),
        }
    }

    /// A read-only export holding `data`.
    pub fn read_only_from(data: &[u8]) -> Self {
        let mut m = Self::new(data.len() as u64);
        m.store(0, data, true);
        m.read_only = true;
        m
    }

    /// Bytes currently allocated (for tests of trim and sparseness).
    pub fn allocated_bytes(&self) -> u64 {
        let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
        chunks.iter().flatten().count() as u64 * CHUNK_BYTES as u64
    }

    /// The server checks ranges before calling; this keeps direct callers from panicking.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> BackendResult<()> {
        if offset.checked_add(len).is_some_and(|end| end <= self.size) {
            return Ok(());
        }
        Err(Error::Backend {
            export: "(memory)".into(),
            op,
            offset,
            errno: Errno::Inval,
            detail: format!("{len} bytes past the end of a {}-byte export", self.size),
        })
    }

    fn load(&self, offset: u64, out: &mut [u8]) {
        let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, out.len(), |index, within, at, n| {
            let dst = &mut out[at..at + n];
            match &chunks[index] {
                Some(chunk) => dst.copy_from_slice(&chunk[within..within + n]),
                None => dst.fill(0),
            }
        });
    }

    /// Writes `data` at `offset`. Zeroes landing on a hole stay a hole unless `keep_allocated`.
    fn store(&self, offset: u64, data: &[u8], keep_allocated: bool) {
        let mut chunks = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, data.len(), |index, within, at, n| {
            let src = &data[at..at + n];
            let slot = &mut chunks[index];
            if slot.is_none() {
                if src.iter().all(|&b| b == 0) && !keep_allocated {
                    return; // Writing zeroes over a hole changes nothing.
                }
                *slot = Some(vec![0u8; CHUNK_BYTES].into_boxed_slice());
            }
            if let Some(chunk) = slot {
                chunk[within..within + n].copy_from_slice(src);
            }
        });
    }

    fn zero(&self, offset: u64, len: u64, may_free: bool, zero_partial: bool) {
        let mut chunks = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = (pos / CHUNK_BYTES as u64) as usize;
            let within = (pos % CHUNK_BYTES as u64) as usize;
            let n = (CHUNK_BYTES - within).min((end - pos) as usize);
            let whole = within == 0 && n == CHUNK_BYTES;
            let slot = &mut chunks[index];
            if whole && may_free {
                *slot = None;
            } else if let Some(chunk) = slot {
                if zero_partial || whole {
                    chunk[within..within + n].fill(0);
                }
            } else if !may_free {
                *slot = Some(vec![0u8; CHUNK_BYTES].into_boxed_slice());
            }
            pos += n as u64;
        }
    }
}

/// Splits `[offset, offset+len)` into per-chunk pieces: (chunk index, offset within the chunk,
/// offset within the caller's buffer, length).
fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut at = 0usize;
    while at < len {
        let pos = offset + at as u64;
        let index = (pos / CHUNK_BYTES as u64) as usize;
        let within = (pos % CHUNK_BYTES as u64) as usize;
        let n = (CHUNK_BYTES - within).min(len - at);
        f(index, within, at, n);
        at += n;
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn flush_covers_all_connections(&self) -> bool {
        true
    }

    fn can_fast_zero(&self, _may_trim: bool) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.check("read", offset, u64::from(len))?;
        let mut buf = BytesMut::zeroed(len as usize);
        self.load(offset, &mut buf);
        Ok(buf.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BackendResult<()> {
        self.check("write", offset, data.len() as u64)?;
        self.store(offset, &data, false);
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> BackendResult<()> {
        self.check("trim", offset, u64::from(len))?;
        // Trim only frees whole chunks; the spec lets partial ranges keep their contents.
        self.zero(offset, u64::from(len), true, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        self.check("write_zeroes", offset, u64::from(len))?;
        self.zero(offset, u64::from(len), may_trim, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn reads_back_writes_across_chunk_boundaries() {
        block_on(async {
            let m = MemBackend::new(4 * CHUNK_BYTES as u64);
            let data: Vec<u8> = (0..CHUNK_BYTES + 100)
                .map(|i| (i % 251) as u8 + 1)
                .collect();
            let off = CHUNK_BYTES as u64 - 50;
            m.write(off, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            let back = m.read(off, data.len() as u32).await.unwrap();
            assert_eq!(&back[..], &data[..]);
            let before = m.read(off - 10, 10).await.unwrap();
            assert!(before.iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn zeroes_free_whole_chunks_unless_no_hole() {
        block_on(async {
            let size = 4 * CHUNK_BYTES as u64;
            let m = MemBackend::new(size);
            m.write(0, Bytes::from(vec![0xab; size as usize]), false)
                .await
                .unwrap();
            assert_eq!(m.allocated_bytes(), size);
            m.write_zeroes(10, 2 * CHUNK_BYTES as u32, false, true)
                .await
                .unwrap();
            // Chunk 1 is wholly covered and freed; chunks 0 and 2 are zeroed in part.
            assert_eq!(m.allocated_bytes(), 3 * CHUNK_BYTES as u64);
            let back = m.read(0, size as u32).await.unwrap();
            assert!(back[..10].iter().all(|&b| b == 0xab));
            assert!(back[10..10 + 2 * CHUNK_BYTES].iter().all(|&b| b == 0));
            assert!(back[10 + 2 * CHUNK_BYTES..].iter().all(|&b| b == 0xab));

            m.write_zeroes(0, size as u32, false, false).await.unwrap();
            assert_eq!(
                m.allocated_bytes(),
                size,
                "NO_HOLE keeps the range allocated"
            );
            assert!(m
                .read(0, size as u32)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0));

            m.trim(0, size as u32, false).await.unwrap();
            assert_eq!(m.allocated_bytes(), 0);
        });
    }

    #[test]
    fn out_of_range_calls_fail_instead_of_panicking() {
        block_on(async {
            let m = MemBackend::new(CHUNK_BYTES as u64);
            let err = m.read(CHUNK_BYTES as u64 - 1, 2).await.unwrap_err();
            assert_eq!(err.errno(), Errno::Inval);
            assert!(m
                .write(u64::MAX, Bytes::from_static(b"x"), false)
                .await
                .is_err());
            assert!(m
                .write_zeroes(1, CHUNK_BYTES as u32, false, true)
                .await
                .is_err());
            assert!(m.trim(CHUNK_BYTES as u64, 1, false).await.is_err());
        });
    }

    #[test]
    fn odd_sized_export_is_fully_addressable() {
        block_on(async {
            let size = CHUNK_BYTES as u64 + 3;
            let m = MemBackend::new(size);
            m.write(size - 3, Bytes::from_static(b"xyz"), true)
                .await
                .unwrap();
            assert_eq!(&m.read(size - 3, 3).await.unwrap()[..], b"xyz");
        });
    }
}
