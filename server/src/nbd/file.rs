//! A [`BlockBackend`] over a regular file, for tests and dev tools that want data to survive.
//!
//! Durability follows NBD exactly: a write is `pwrite`; FUA adds `fdatasync` before the reply;
//! FLUSH is `fdatasync`, which covers writes from every connection because they share the file
//! (hence `flush_covers_all_connections`). Trim and hole-punching zeroes use
//! `fallocate(PUNCH_HOLE)` where the filesystem has it. Blocking calls run on tokio's blocking
//! pool so they never stall the reactor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use engine::dataio::fallocate;

use super::backend::{BackendResult, BlockBackend};
use crate::error::Error;

/// Size of the zero buffer used when zeroing must be done by writing.
const ZERO_WRITE_BYTES: usize = 1 << 20;

struct Inner {
    file: File,
    path: PathBuf,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` works on this filesystem.
    punch_hole: bool,
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` has not failed with `EOPNOTSUPP` yet.
    zero_range: AtomicBool,
}

/// A file exported as a block device; its size is the file's length when opened.
pub struct FileBackend {
    inner: Arc<Inner>,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens an existing file; its current length is the export size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| file_error(&path, "open", 0, source))?;
        let size = file
            .metadata()
            .map_err(|source| file_error(&path, "stat", 0, source))?
            .len();
        Ok(Self::with_file(file, path, size, read_only))
    }

    /// Opens `path`, creating it if missing, and sets its length to `size` (existing data
    /// below `size` is kept).
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| file_error(&path, "open", 0, source))?;
        file.set_len(size)
            .map_err(|source| file_error(&path, "set_len", size, source))?;
        Ok(Self::with_file(file, path, size, false))
    }

    fn with_file(file: File, path: PathBuf, size: u64, read_only: bool) -> Self {
        // Probe past the end of the file, where punching a hole changes nothing.
        let punch_hole = !read_only
            && fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                size,
                4096,
            )
            .is_ok();
        Self {
            inner: Arc::new(Inner {
                file,
                path,
                punch_hole,
                zero_range: AtomicBool::new(true),
            }),
            size,
            read_only,
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The server checks ranges before calling; this keeps direct callers from growing the file.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> BackendResult<()> {
        if offset.checked_add(len).is_some_and(|end| end <= self.size) {
            return Ok(());
        }
        let source = io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes past the end of a {}-byte export", self.size),
        );
        Err(file_error(&self.inner.path, op, offset, source))
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        offset: u64,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> BackendResult<T> {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || f(&inner)).await;
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(file_error(&self.inner.path, op, offset, source)),
            Err(e) => Err(file_error(
                &self.inner.path,
                op,
                offset,
                io::Error::other(e),
            )),
        }
    }
}

fn file_error(path: &Path, op: &'static str, offset: u64, source: io::Error) -> Error {
    Error::File {
        path: path.to_path_buf(),
        op,
        offset,
        source,
    }
}

fn write_zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_WRITE_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Inner {
    fn zero(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
        if may_trim && self.punch_hole {
            return fallocate(
                &self.file,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
        }
        if self.zero_range.load(Ordering::Relaxed) {
            match fallocate(
                &self.file,
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        write_zero_bytes(&self.file, offset, len)
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn flush_covers_all_connections(&self) -> bool {
        true
    }

    fn can_fast_zero(&self, may_trim: bool) -> bool {
        // Only hole punching is sure to beat writing; ZERO_RANGE may silently fall back.
        may_trim && self.inner.punch_hole
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.check("pread", offset, u64::from(len))?;
        self.blocking("pread", offset, move |inner| {
            let mut buf = vec![0u8; len as usize];
            inner.file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.check("pwrite", offset, data.len() as u64)?;
        self.blocking("pwrite", offset, move |inner| {
            inner.file.write_all_at(&data, offset)?;
            if fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.blocking("fdatasync", 0, |inner| inner.file.sync_data())
            .await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.check("trim", offset, u64::from(len))?;
        if !self.inner.punch_hole {
            return Ok(()); // Trim is advisory; without hole punching there is nothing cheap to do.
        }
        self.blocking("trim", offset, move |inner| {
            fallocate(
                &inner.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                u64::from(len),
            )?;
            if fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        self.check("write_zeroes", offset, u64::from(len))?;
        self.blocking("write_zeroes", offset, move |inner| {
            inner.zero(offset, u64::from(len), may_trim)?;
            if fua {
                inner.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_zeroing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        rt.block_on(async {
            let f = FileBackend::create(&path, 1 << 20).unwrap();
            assert_eq!(f.size(), 1 << 20);
            f.write(4093, Bytes::from(vec![7u8; 8192]), true)
                .await
                .unwrap();
            f.flush().await.unwrap();
            assert!(f.read(4093, 8192).await.unwrap().iter().all(|&b| b == 7));
            for may_trim in [true, false] {
                f.write(0, Bytes::from(vec![9u8; 65536]), false)
                    .await
                    .unwrap();
                f.write_zeroes(100, 60000, true, may_trim).await.unwrap();
                let back = f.read(0, 65536).await.unwrap();
                assert!(back[..100].iter().all(|&b| b == 9));
                assert!(
                    back[100..60100].iter().all(|&b| b == 0),
                    "may_trim={may_trim}"
                );
                assert!(back[60100..].iter().all(|&b| b == 9));
            }
        });
        // Reopening sees the data: it went to the file, not a cache of ours.
        let f = FileBackend::open(&path, true).unwrap();
        assert!(f.read_only());
        let back = rt.block_on(f.read(60100, 10)).unwrap();
        assert!(back.iter().all(|&b| b == 9));
    }

    #[test]
    fn errors_name_the_file() {
        let err = FileBackend::open("/nonexistent/bd/disk.raw", false)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/bd/disk.raw") && text.contains("open"),
            "{text}"
        );
    }

    #[test]
    fn out_of_range_calls_fail_without_growing_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let f = FileBackend::create(&path, 4096).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(f.write(4095, Bytes::from_static(b"ab"), false))
            .unwrap_err();
        assert_eq!(err.errno(), crate::nbd::Errno::Inval);
        assert!(rt.block_on(f.read(u64::MAX, 1)).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    }
}
