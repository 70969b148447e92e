//! Segment files: naming, creation with preallocation, directory sync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::wal::buf::{AlignedBuf, DIRECT_ALIGN};
use crate::wal::format;

use crate::error::Error;

pub const SUFFIX: &str = ".wal";

/// `00000000000000000042.wal`: fixed width so names sort like numbers.
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

/// A purged segment kept for reuse (see [`take_free`]): not a segment name,
/// so recovery ignores it.
pub const FREE_SUFFIX: &str = ".walfree";

/// `free-00000000000000000042.walfree`: segment 42's file, purged and kept
/// for reuse.
pub fn free_name(seq: u64) -> String {
    format!("free-{seq:020}{FREE_SUFFIX}")
}

pub fn parse_free_name(name: &str) -> Option<u64> {
    parse_seq(name.strip_prefix("free-")?.strip_suffix(FREE_SUFFIX)?)
}

/// Moves the file of purged segment `seq` into the free pool; returns its
/// new path. Not made durable here: `Wal::purge` says why it need not be,
/// and `take_free` syncs the directory before the file is written again.
pub fn make_free(dir_path: &Path, path: &Path, seq: u64) -> io::Result<PathBuf> {
    let to = dir_path.join(free_name(seq));
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// Reuses a free file as segment `seq`, durably renamed. Every block of it
/// was written in its earlier life, so a direct write into it is a plain
/// overwrite (no unwritten extent to convert, no journal commit) without
/// the zero-fill's extra writes; the old records left in it cannot verify
/// as records of `seq` (the sequence number is in every record's crc), so
/// recovery sees the end of the log where this life's records end. `None`
/// (with a warning, the file removed) if it cannot be reused.
pub fn take_free(dir_path: &Path, dir: &File, free: &Path, seq: u64) -> Option<(File, PathBuf)> {
    let path = dir_path.join(file_name(seq));
    if let Err(e) = std::fs::rename(free, &path) {
        tracing::warn!(path = %free.display(), error = %e, "wal: cannot reuse a free segment file; removing it");
        let _ = std::fs::remove_file(free);
        return None;
    }
    // A crash before the directory sync leaves either name: a free file
    // (reused later) or a trailing segment without a valid start record
    // (removed by recovery).
    adopt(dir_path, dir, path, "reused segment file")
}

/// A free file being renamed to the next segment's name, the directory
/// synced, on a thread of its own while the current segment fills, so the
/// rotation only takes it: [`take_free`] on the writer's thread stalls the
/// core for the directory's journal commit (0.5 ms median, 7 ms seen, while
/// 64 KiB appends kept 4 MiB of batches on the disk). Until the rotation the
/// file is a trailing segment whose first block marks it as not started
/// ([`reserve_free`]), which recovery returns to the free files after a
/// crash without reading the rest; a clean close gives it back its free name
/// ([`Adopter::give_back`]).
pub struct Adopter {
    seq: u64,
    free: PathBuf,
    path: PathBuf,
    thread: Option<JoinHandle<Option<File>>>,
}

impl Adopter {
    /// Starts renaming `free` to segment `seq`; `Err(free)` if no thread
    /// could be started (the caller keeps the file in its pool).
    pub fn spawn(dir_path: &Path, dir: &File, free: PathBuf, seq: u64) -> Result<Adopter, PathBuf> {
        let Ok(dir) = dir.try_clone() else {
            return Err(free);
        };
        let (dp, f) = (dir_path.to_path_buf(), free.clone());
        match std::thread::Builder::new()
            .name("wal-next-segment".into())
            .spawn(move || reserve_free(&dp, &dir, &f, seq).map(|(file, _)| file))
        {
            Ok(t) => Ok(Adopter {
                seq,
                free,
                path: dir_path.join(file_name(seq)),
                thread: Some(t),
            }),
            Err(_) => Err(free),
        }
    }

    /// The segment this file is named after.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the rename and the directory sync are done.
    pub fn ready(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn join(&mut self) -> Option<File> {
        match self.thread.take()?.join() {
            Ok(f) => f,
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "wal: the thread renaming the next segment file panicked; creating the segment without it");
                // Whichever name it has now, it must not stay under the
                // segment's: the writer creates that file itself.
                let _ = std::fs::remove_file(&self.path);
                None
            }
        }
    }

    /// Segment `seq`, durably named and open, waiting for the thread if it
    /// is still running; `None` if the rename failed (warned, file removed).
    pub fn take(mut self) -> Option<(File, PathBuf)> {
        let f = self.join()?;
        Some((f, self.path.clone()))
    }

    /// Renames the file back to its free name, for the next session's pool.
    /// Not synced: if a crash loses the rename, recovery removes the file
    /// as a trailing segment without a valid start record.
    pub fn give_back(mut self) {
        if let Some(f) = self.join() {
            drop(f);
            if let Err(e) = std::fs::rename(&self.path, &self.free) {
                tracing::warn!(path = %self.path.display(), error = %e, "wal: cannot give the unused next segment file its free name back; the next open removes it");
            }
        }
    }
}

impl Drop for Adopter {
    fn drop(&mut self) {
        // The rename must not land after the store is gone (a reopen of the
        // directory would race with it).
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`take_free`] for a file taken ahead of the rotation ([`Adopter`]), whose
/// first block is then overwritten, durably, with a `Reserved` record of
/// `seq` ([`format::reserved_block`]). After a crash before the segment's
/// first batch lands, recovery returns the file to the free files on that
/// block alone instead of reading all of it for records of this life. The mark goes in only
/// once the new name is durable: before that, a crash can bring the file
/// back under the name of the segment it was (purge does not sync the
/// directory), whose start record must then still be there.
fn reserve_free(dir_path: &Path, dir: &File, free: &Path, seq: u64) -> Option<(File, PathBuf)> {
    let (f, path) = take_free(dir_path, dir, free, seq)?;
    let mark = f
        .write_all_at(&format::reserved_block(seq, DIRECT_ALIGN), 0)
        .and_then(|()| f.sync_data());
    if let Err(e) = mark {
        // Nothing durable depends on this file: it is dropped, not retried.
        // If the removal is lost in a crash, recovery removes the file as a
        // trailing segment without a start record.
        tracing::warn!(path = %path.display(), error = %e, "wal: cannot mark the next segment's file; removing it");
        drop(f);
        let _ = std::fs::remove_file(&path);
        return None;
    }
    Some((f, path))
}

/// Makes the rename of a prepared file to segment `path` durable and opens
/// it. On failure the file is removed (with a warning naming `what`), so the
/// caller can create the segment the plain way under the same name.
fn adopt(dir_path: &Path, dir: &File, path: PathBuf, what: &str) -> Option<(File, PathBuf)> {
    if let Err(e) = sync_dir(dir, dir_path) {
        tracing::warn!(file = what, error = %e, "wal: fsync of the directory after taking a prepared segment failed; removing it");
        let _ = std::fs::remove_file(&path);
        return None;
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => Some((f, path)),
        Err(e) => {
            tracing::warn!(file = what, path = %path.display(), error = %e, "wal: cannot open a prepared segment; removing it");
            let _ = std::fs::remove_file(&path);
            let _ = sync_dir(dir, dir_path);
            None
        }
    }
}

pub fn parse_name(name: &str) -> Option<u64> {
    parse_seq(name.strip_suffix(SUFFIX)?)
}

/// The 20-digit sequence number of a segment or free file name.
fn parse_seq(digits: &str) -> Option<u64> {
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

/// `fallocate(2)` of `len` bytes at `offset` with `mode` (`0` allocates; the
/// `FALLOC_FL_*` flags punch holes or zero ranges). Offsets beyond `off_t`
/// are `EINVAL`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
    let len = libc::off_t::try_from(len).map_err(|_| einval())?;
    // SAFETY: the descriptor is owned by `file`, which outlives the call; fallocate reads no
    // memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
        fallocate(&file, 0, 0, bytes).map_err(|e| io_err("fallocate", &path, bytes, e))?;
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

/// Reads `f` into `buf`, whose byte 0 is file offset `base`, from `base +
/// buf.len()` until `base + buf.len()` reaches `upto`: whole
/// [`DIRECT_ALIGN`] blocks from block-aligned offsets, as `O_DIRECT` needs
/// (a buffered descriptor reads the same). A read that stops short of
/// `eof` other than at a block boundary with data (the file changed under
/// the reader, or an odd filesystem) is an error naming `path` and the
/// offset: it must never look like the end of the data.
pub fn read_blocks(
    f: &File,
    path: &Path,
    what: &'static str,
    buf: &mut AlignedBuf,
    base: u64,
    upto: u64,
    eof: u64,
) -> Result<(), Error> {
    let align = DIRECT_ALIGN as u64;
    while base + (buf.len() as u64) < upto {
        let at = base + buf.len() as u64;
        let want = (upto - at).next_multiple_of(align);
        let got = buf
            .read_into(want as usize, |s| f.read_at(s, at))
            .map_err(|e| io_err(what, path, at, e))? as u64;
        if at + got < eof && (got == 0 || !(at + got).is_multiple_of(align)) {
            return Err(io_err(
                what,
                path,
                at + got,
                io::Error::other(format!(
                    "short read: {got} of {want} bytes at offset {at}, before offset {eof}"
                )),
            ));
        }
    }
    Ok(())
}

/// A second descriptor of segment `path` for `O_DIRECT` writes and entry
/// reads (the kernel invalidates cached pages a direct write covers, and
/// writes back dirty ones a direct read covers, so both descriptors see the
/// same bytes). `Ok(None)` when the filesystem refuses `O_DIRECT`.
pub fn open_direct(path: &Path) -> Result<Option<File>, Error> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(io_err("open segment for direct I/O", path, 0, e)),
    }
}

/// Name of the segment file being zero-filled in the background; renamed
/// to the next segment's name when the writer rotates to it. Not a segment
/// name, so recovery ignores it; `Wal::open` deletes a leftover one.
pub const PREPARED_NAME: &str = "next-segment.zeroing";

/// One segment file being zero-filled on a background thread: fallocate
/// leaves unwritten extents, and the first direct write into one needs a
/// journal commit to mark it written, which costs more than the write.
/// Over a zero-filled file, a batch's `RWF_DSYNC` write is a plain
/// overwrite (the data and a disk cache flush, no journal).
pub struct Preparer {
    path: PathBuf,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), Error>>>,
    /// The thread's result once `wait` joined it.
    joined: Option<std::thread::Result<Result<(), Error>>>,
}

impl Preparer {
    /// Starts zero-filling `PREPARED_NAME` in `dir_path` to `bytes`.
    pub fn spawn(dir_path: &Path, bytes: u64) -> Preparer {
        let path = dir_path.join(PREPARED_NAME);
        let cancel = Arc::new(AtomicBool::new(false));
        let (p, c) = (path.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("wal-zero-fill".into())
            .spawn(move || zero_fill(&p, bytes, &c))
            .ok();
        Preparer {
            path,
            cancel,
            thread,
            joined: None,
        }
    }

    /// Blocks until the zero-fill is done (used at open, where there is no
    /// current segment to fill meanwhile).
    pub fn wait(&mut self) {
        if let Some(t) = self.thread.take() {
            self.joined = Some(t.join());
        }
    }

    /// The zero-filled file renamed to segment `seq`, durably, if the
    /// thread is done and succeeded; `None` if it is still running (it goes
    /// on) or failed (with a warning; the caller creates the segment the
    /// plain way, where ENOSPC and the like surface as errors).
    pub fn take(&mut self, dir_path: &Path, dir: &File, seq: u64) -> Option<(File, PathBuf)> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            self.wait();
        }
        let r = self.joined.take()?;
        let ok = match r {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "wal: zero-filling the next segment failed; creating it without");
                false
            }
            Err(_) => {
                tracing::warn!("wal: the zero-fill thread panicked; creating the segment without");
                false
            }
        };
        let path = dir_path.join(file_name(seq));
        let moved = ok
            && std::fs::rename(&self.path, &path)
                .map_err(
                    |e| tracing::warn!(error = %e, "wal: cannot rename the zero-filled segment"),
                )
                .is_ok();
        if !moved {
            let _ = std::fs::remove_file(&self.path);
            return None;
        }
        // The directory sync makes the new name durable; a crash before it
        // leaves either name, both harmless (a trailing all-zero segment is
        // removed by recovery, the other name is deleted at open).
        adopt(dir_path, dir, path, "zero-filled segment")
    }

    /// Still zero-filling, or done and not yet taken.
    pub fn running(&self) -> bool {
        self.thread.is_some() || self.joined.is_some()
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        // Only while the file is still ours: once taken it was renamed or
        // removed, and the name may already belong to the next preparer.
        if !self.running() {
            return;
        }
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `path` (replacing a leftover) and writes `bytes` zeros with
/// direct I/O in 1 MiB writes (no page cache to flush), then syncs.
fn zero_fill(path: &Path, bytes: u64, cancel: &AtomicBool) -> Result<(), Error> {
    const CHUNK: usize = 1 << 20;
    // Idle I/O class: the zeros should use bandwidth the WAL leaves free,
    // not compete with its batches (honoured by the mq-deadline and bfq
    // schedulers; best effort, so a refusal is ignored).
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    // SAFETY: plain syscall; `0` is the calling thread.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        )
    };
    let _ = std::fs::remove_file(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)
        .map_err(|e| io_err("create segment to zero-fill", path, 0, e))?;
    // Direct writes come in whole blocks; a few bytes past the segment's
    // size are harmless.
    let bytes = bytes.next_multiple_of(DIRECT_ALIGN as u64);
    // Allocating first makes ENOSPC show up at once instead of after
    // writing zeros up to the last free block.
    if let Err(e) = fallocate(&file, 0, 0, bytes) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err("fallocate", path, bytes, e));
    }
    let mut zeros = AlignedBuf::default();
    zeros.resize(CHUNK, 0);
    let mut off = 0u64;
    while off < bytes {
        if cancel.load(Ordering::Relaxed) {
            return Err(io_err(
                "zero-fill segment",
                path,
                off,
                io::Error::from(io::ErrorKind::Interrupted),
            ));
        }
        let n = (bytes - off).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], off)
            .map_err(|e| io_err("zero-fill segment", path, off, e))?;
        off += n as u64;
    }
    file.sync_all()
        .map_err(|e| io_err("fsync zero-filled segment", path, 0, e))
}

pub fn open_dir(path: &Path) -> Result<File, Error> {
    std::fs::create_dir_all(path).map_err(|e| io_err("create directory", path, 0, e))?;
    File::open(path).map_err(|e| io_err("open directory", path, 0, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_preparer_leaves_its_successors_file_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir(tmp.path()).unwrap();
        let mut a = Preparer::spawn(tmp.path(), 64 << 10);
        a.wait();
        let (_, p1) = a.take(tmp.path(), &dir, 1).expect("first zero-filled file");
        assert_eq!(std::fs::read(&p1).unwrap(), vec![0u8; 64 << 10]);
        assert!(!a.running());
        let mut b = Preparer::spawn(tmp.path(), 64 << 10);
        b.wait();
        drop(a);
        assert!(tmp.path().join(PREPARED_NAME).exists());
        assert!(b.take(tmp.path(), &dir, 2).is_some());
        // Dropped while still owning its file: the file goes.
        let c = Preparer::spawn(tmp.path(), 64 << 10);
        drop(c);
        assert!(!tmp.path().join(PREPARED_NAME).exists());
    }

    #[test]
    fn free_names_round_trip_and_are_not_segment_names() {
        assert_eq!(free_name(42), "free-00000000000000000042.walfree");
        assert_eq!(parse_free_name(&free_name(42)), Some(42));
        assert_eq!(parse_name(&free_name(42)), None);
        assert_eq!(parse_free_name(&file_name(42)), None);
        assert_eq!(parse_free_name("free-42.walfree"), None);
    }

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
