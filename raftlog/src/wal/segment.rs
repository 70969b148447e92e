//! Segment files: naming, creation with preallocation, directory sync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

pub const SUFFIX: &str = ".wal";

/// `00000000000000000042.wal`: fixed width so names sort like numbers.
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn io_err(op: &'static str, path: &Path, offset: u64, source: io::Error) -> Error {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        return Error::WalNoSpace {
            op,
            path: path.to_path_buf(),
            bytes: offset,
            source,
        };
    }
    Error::WalIo {
        op,
        path: path.to_path_buf(),
        offset,
        source,
    }
}

/// Makes creations and deletions of files in `dir` durable.
pub fn sync_dir(dir: &File, path: &Path) -> Result<(), Error> {
    dir.sync_all()
        .map_err(|e| io_err("fsync directory", path, 0, e))
}

/// Creates segment `seq` with `bytes` preallocated, durably (file and
/// directory entry). On failure (ENOSPC included) the partial file is
/// removed, so nothing on disk changes.
pub fn create(dir_path: &Path, dir: &File, seq: u64, bytes: u64) -> Result<(File, PathBuf), Error> {
    let path = dir_path.join(file_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io_err("create segment", &path, 0, e))?;
    let prepare = || -> Result<(), Error> {
        // Preallocating means a batch's fdatasync does not also have to
        // persist a file size change, and ENOSPC shows up here, before any
        // record is written, instead of in the middle of a batch.
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
        if r != 0 {
            return Err(io_err(
                "fallocate",
                &path,
                bytes,
                io::Error::last_os_error(),
            ));
        }
        file.sync_all()
            .map_err(|e| io_err("fsync new segment", &path, 0, e))?;
        sync_dir(dir, dir_path)
    };
    if let Err(e) = prepare() {
        drop(file);
        let _ = std::fs::remove_file(&path);
        let _ = sync_dir(dir, dir_path);
        return Err(e);
    }
    Ok((file, path))
}

/// A second descriptor of segment `path` for `O_DIRECT` writes (reads keep
/// using the buffered one: the kernel invalidates cached pages a direct
/// write covers). `Ok(None)` when the filesystem refuses `O_DIRECT`.
pub fn open_direct(path: &Path) -> Result<Option<File>, Error> {
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(io_err("open segment for direct I/O", path, 0, e)),
    }
}

pub fn open_dir(path: &Path) -> Result<File, Error> {
    std::fs::create_dir_all(path).map_err(|e| io_err("create directory", path, 0, e))?;
    File::open(path).map_err(|e| io_err("open directory", path, 0, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(file_name(42), "00000000000000000042.wal");
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_name("42.wal"), None);
        assert_eq!(parse_name("0000000000000000004x.wal"), None);
        assert!(file_name(9) < file_name(10));
    }
}
