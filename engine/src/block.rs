//! The block state machine of one block group: the operations carried in raft entries, the
//! data file they are applied to (sparse by default, allocated on first write; preallocated in
//! full with `BgSpec::preallocate`), the order in which applies may run
//! concurrently ([`Applier`]), the small meta file that records the latest snapshot, and the
//! crash-safe protocol that installs a received snapshot.
//!
//! # Entry payload
//! `op u8 | offset u64 LE | len u32 LE | data` — data only for WRITE (raw bytes, never copied into
//! another structure). TRIM and WRITE_ZEROES carry no data.
//!
//! # Apply is an idempotent overwrite
//! WRITE is a write of the bytes, TRIM and WRITE_ZEROES punch a hole
//! (`fallocate(PUNCH_HOLE|KEEP_SIZE)`, reads return zeroes on every replica, so replicas stay
//! byte-identical), WRITE_ZEROES with `NO_HOLE` uses `FALLOC_FL_ZERO_RANGE`. They run on the
//! core's io_uring (`dataio`), several at once, ordered by [`Applier`]. The file is buffered by
//! default; with `data_direct_io` it is opened with O_DIRECT (requests in whole 4 KiB blocks,
//! an unaligned write is a read-modify-write on the core thread). Applying an entry twice, or
//! applying entries `a..=b` over a file that already holds the effect of some of them (or of
//! later ones), ends in the same state as applying `a..=b` once to the state at `a - 1`, as long
//! as they are re-applied in log order up to at least the latest index the file may hold. That
//! is what makes these rules safe:
//! - **Restart**: the data file is only `fdatasync`ed at snapshot time; a node restarts from the
//!   snapshot index in its meta file and replays the log from there (the WAL keeps every entry
//!   after the snapshot, fsynced before any acknowledgement).
//! - **Fuzzy snapshot copies**: a leader streams its live data file while it keeps applying; the
//!   receiver replays the log from the snapshot's index (the leader keeps
//!   `snapshot_keep_entries` below its snapshot for this).
//!
//! # Meta file (`bg-<id>.meta`)
//! `magic "BDBGMETA" | version u32 | index u64 | term u64 | conf_len u32 | conf | crc32 u32`,
//! written to a temporary file, `fdatasync`ed, renamed over the old one, then the directory is
//! fsynced. It is written *after* the data file was `fdatasync`ed and *before* the WAL is told
//! to compact, so the log never loses entries the data file does not hold yet. A snapshot save
//! runs the sync and the meta write off the core thread and tells raft (which then compacts)
//! only when both are done; an install holds the group's meta lock, so a save that started
//! before it never writes its older meta over the installed one.
//!
//! # Installing a received snapshot (crash-safe)
//! The data file and the meta file must change together: new data with the old meta would
//! replay the old log suffix over the new state. Two files cannot be renamed atomically, so the
//! install is write-ahead ([`install_snapshot_files`], off the core thread):
//! 1. write the install marker `bg-<id>.install` (the snapshot's meta, same format and same
//!    tmp + fdatasync + rename + directory fsync as the meta file). From here on the install
//!    is decided: the complete copy `bg-<id>.data.incoming` was fdatasynced before (the
//!    receiver's `finish`), and no new transfer may truncate it while the marker exists;
//! 2. rename the copy over `bg-<id>.data`, fsync the directory;
//! 3. write the meta file with the snapshot's meta;
//! 4. remove the marker, fsync the directory.
//!
//! On start, [`recover_install`] rolls an interrupted install forward: with a marker, it redoes
//! the rename if the copy is still there (step 2 not durable) and writes the meta from the
//! marker (step 3), then removes the marker. Rolling back is not possible after step 2 (the
//! old data file is gone), and is not needed before it: the copy is complete. Without a
//! marker, a leftover copy is an interrupted download and is deleted. So a restart finds
//! either the old data file with the old meta (crash before step 1 was durable) or the new
//! data file with the new meta, never a mix (tested at every step).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use raftlog::core::{Configuration, GroupId, Index, SnapshotMeta, Term};

use crate::dataio::{fallocate, AlignedBuf, IoBuf, IoKind, IoReq, DIRECT_ALIGN};
use crate::error::{Error, Result};

const OP_WRITE: u8 = 1;
const OP_TRIM: u8 = 2;
const OP_WRITE_ZEROES: u8 = 3;
const OP_WRITE_ZEROES_NO_HOLE: u8 = 4;
const OP_HEADER_BYTES: usize = 13;

/// A replicated block operation (the payload of a `Normal` raft entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockOp {
    Write {
        offset: u64,
        data: Bytes,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    /// `may_trim` false = the range must stay allocated (NBD `NO_HOLE`).
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
    },
}

impl BlockOp {
    pub fn name(&self) -> &'static str {
        match self {
            BlockOp::Write { .. } => "write",
            BlockOp::Trim { .. } => "trim",
            BlockOp::WriteZeroes { .. } => "write_zeroes",
        }
    }

    pub fn offset(&self) -> u64 {
        match self {
            BlockOp::Write { offset, .. }
            | BlockOp::Trim { offset, .. }
            | BlockOp::WriteZeroes { offset, .. } => *offset,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            BlockOp::Write { data, .. } => data.len() as u64,
            BlockOp::Trim { len, .. } | BlockOp::WriteZeroes { len, .. } => *len as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits a write into pieces of at most `bytes_max` (each piece is one raft entry: the WAL
    /// bounds a record, and smaller entries pipeline better). Other ops are one entry.
    pub fn split(self, bytes_max: usize) -> Vec<BlockOp> {
        match self {
            BlockOp::Write { offset, data } if data.len() > bytes_max => {
                let mut out = Vec::with_capacity(data.len().div_ceil(bytes_max));
                let mut at = 0;
                while at < data.len() {
                    let end = (at + bytes_max).min(data.len());
                    out.push(BlockOp::Write {
                        offset: offset + at as u64,
                        data: data.slice(at..end),
                    });
                    at = end;
                }
                out
            }
            op => vec![op],
        }
    }

    pub fn encode(&self) -> Bytes {
        let (code, offset, len, data) = match self {
            BlockOp::Write { offset, data } => (OP_WRITE, *offset, data.len() as u32, Some(data)),
            BlockOp::Trim { offset, len } => (OP_TRIM, *offset, *len, None),
            BlockOp::WriteZeroes {
                offset,
                len,
                may_trim,
            } => {
                let code = if *may_trim {
                    OP_WRITE_ZEROES
                } else {
                    OP_WRITE_ZEROES_NO_HOLE
                };
                (code, *offset, *len, None)
            }
        };
        let mut b = BytesMut::with_capacity(OP_HEADER_BYTES + data.map_or(0, |d| d.len()));
        b.put_u8(code);
        b.put_u64_le(offset);
        b.put_u32_le(len);
        if let Some(d) = data {
            b.put_slice(d);
        }
        b.freeze()
    }

    /// Decodes a payload; `None` if it is malformed (the payload came from our own log or a
    /// validated peer frame, so this only guards against bugs and corruption).
    pub fn decode(b: &Bytes) -> Option<BlockOp> {
        if b.len() < OP_HEADER_BYTES {
            return None;
        }
        let offset = u64::from_le_bytes(b[1..9].try_into().ok()?);
        let len = u32::from_le_bytes(b[9..13].try_into().ok()?);
        match b[0] {
            OP_WRITE if b.len() == OP_HEADER_BYTES + len as usize => Some(BlockOp::Write {
                offset,
                data: b.slice(OP_HEADER_BYTES..),
            }),
            OP_TRIM if b.len() == OP_HEADER_BYTES => Some(BlockOp::Trim { offset, len }),
            OP_WRITE_ZEROES | OP_WRITE_ZEROES_NO_HOLE if b.len() == OP_HEADER_BYTES => {
                Some(BlockOp::WriteZeroes {
                    offset,
                    len,
                    may_trim: b[0] == OP_WRITE_ZEROES,
                })
            }
            _ => None,
        }
    }
}

/// Paths of a block group's files inside its core directory.
pub fn data_path(core_dir: &Path, bg: GroupId) -> PathBuf {
    core_dir.join(format!("bg-{bg}.data"))
}
pub fn meta_path(core_dir: &Path, bg: GroupId) -> PathBuf {
    core_dir.join(format!("bg-{bg}.meta"))
}
pub fn incoming_path(core_dir: &Path, bg: GroupId) -> PathBuf {
    core_dir.join(format!("bg-{bg}.data.incoming"))
}
pub fn install_marker_path(core_dir: &Path, bg: GroupId) -> PathBuf {
    core_dir.join(format!("bg-{bg}.install"))
}

/// The data file of one block group: a volume of `size` bytes.
pub struct DataFile {
    bg: GroupId,
    path: PathBuf,
    /// Shared with the requests in flight on it (see `dataio::IoReq::file`).
    file: Arc<File>,
    size: u64,
    /// Opened with O_DIRECT: every request is whole [`DIRECT_ALIGN`] blocks from aligned memory.
    direct: bool,
}

impl DataFile {
    /// Opens the data file, creating it when missing: sparse (thin: space is allocated on first
    /// write), or with `preallocate` allocated in full (thick: ENOSPC shows up here, at creation,
    /// and not in the middle of an apply that the log already committed). With `direct`, the
    /// file is opened with O_DIRECT unless the filesystem refuses it (tmpfs: EINVAL), then
    /// buffered with a log line.
    pub fn open(
        core_dir: &Path,
        bg: GroupId,
        size: u64,
        direct: bool,
        preallocate: bool,
    ) -> Result<DataFile> {
        let path = data_path(core_dir, bg);
        let file_err = |op, source| Error::File {
            bg,
            path: path.clone(),
            op,
            offset: 0,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| file_err("open", e))?;
        let len = file.metadata().map_err(|e| file_err("stat", e))?.len();
        // A replica's data file has the group's size from its creation on (a snapshot install
        // brings the leader's copy, of the same size). A configured size that differs is this
        // node's mistake: growing the file to it would export a larger volume than the other
        // replicas hold and, once this node leads, acknowledge writes past their end (they then
        // stop on "write outside the volume" at every start). Only an empty file (created,
        // never sized: a crash right after creating it) is sized here.
        if len != 0 && len != size {
            return Err(Error::Config {
                what: format!(
                    "bg {bg}: the replica's data file {} holds {len} bytes (the group's size), \
                     but this node's configuration says {size}; a block group's size is fixed \
                     when it is created: set the size back to {len}",
                    path.display()
                ),
            });
        }
        if len != size && !preallocate {
            file.set_len(size).map_err(|e| file_err("set_len", e))?;
            file.sync_all().map_err(|e| file_err("fsync", e))?;
            sync_dir(core_dir).map_err(|e| file_err("fsync dir", e))?;
        } else if len != size {
            if let Err(e) = fallocate(&file, 0, 0, size) {
                // Filesystems without fallocate (tmpfs on old kernels) still get a file of the
                // right length; it is sparse.
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(file_err("fallocate", e));
                }
                file.set_len(size).map_err(|e| file_err("set_len", e))?;
            }
            file.sync_all().map_err(|e| file_err("fsync", e))?;
            sync_dir(core_dir).map_err(|e| file_err("fsync dir", e))?;
        }
        let (file, direct) = if direct {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
            {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        bg,
                        path = %path.display(),
                        "data file: the filesystem refuses O_DIRECT; using buffered I/O"
                    );
                    (file, false)
                }
                Err(e) => return Err(file_err("open O_DIRECT", e)),
            }
        } else {
            (file, false)
        };
        Ok(DataFile {
            bg,
            path,
            file: Arc::new(file),
            size,
            direct,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of disk the data file occupies (allocated blocks; less than `size` when thin).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Refuses an op outside the volume (the core checks client requests first; an entry in
    /// the log that fails this is corruption or a bug).
    pub fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                bg: self.bg,
                op,
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn err(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::File {
            bg: self.bg,
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    /// The bytes an op on `offset..offset + len` touches on disk: with O_DIRECT, whole blocks
    /// (a partial block is read, patched and written back). Two ops whose ranges overlap must
    /// not be in flight together (see [`Applier`]).
    pub fn io_range(&self, offset: u64, len: u64) -> (u64, u64) {
        if self.direct {
            (
                offset / DIRECT_ALIGN * DIRECT_ALIGN,
                (offset + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN,
            )
        } else {
            (offset, offset + len)
        }
    }

    /// The request applying `op` (an idempotent overwrite; see the module docs), or `None`
    /// when it must be applied with [`apply_sync`](Self::apply_sync): an O_DIRECT write that
    /// does not cover whole blocks needs a read-modify-write.
    pub fn apply_req(&self, token: u64, op: &BlockOp) -> Option<IoReq> {
        let (kind, offset, buf) = match op {
            BlockOp::Write { offset, data } if self.direct => {
                if !offset.is_multiple_of(DIRECT_ALIGN)
                    || !(data.len() as u64).is_multiple_of(DIRECT_ALIGN)
                {
                    return None;
                }
                let mut buf = AlignedBuf::zeroed(data.len());
                buf.copy_from_slice(data);
                (IoKind::Write, *offset, IoBuf::Aligned(buf))
            }
            BlockOp::Write { offset, data } => {
                (IoKind::Write, *offset, IoBuf::Shared(data.clone()))
            }
            BlockOp::Trim { offset, len } => (
                IoKind::Fallocate {
                    mode: zero_mode(true),
                    len: *len as u64,
                },
                *offset,
                IoBuf::None,
            ),
            BlockOp::WriteZeroes {
                offset,
                len,
                may_trim,
            } => (
                IoKind::Fallocate {
                    mode: zero_mode(*may_trim),
                    len: *len as u64,
                },
                *offset,
                IoBuf::None,
            ),
        };
        Some(IoReq {
            token,
            file: self.file.clone(),
            kind,
            offset,
            buf,
        })
    }

    /// Applies `op` now, on the calling thread.
    pub fn apply_sync(&self, op: &BlockOp) -> Result<()> {
        self.check(op.name(), op.offset(), op.len())?;
        match op {
            BlockOp::Write { offset, data } => self.write_sync(*offset, data),
            BlockOp::Trim { offset, len } => self.zero_sync(*offset, *len as u64, true),
            BlockOp::WriteZeroes {
                offset,
                len,
                may_trim,
            } => self.zero_sync(*offset, *len as u64, *may_trim),
        }
    }

    fn zero_sync(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, zero_mode(may_trim), offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.zero_fill(offset, len),
            Err(e) => Err(self.err("fallocate", offset, e)),
        }
    }

    /// Writes zeroes over the range: what TRIM and WRITE_ZEROES fall back to where the
    /// filesystem cannot punch holes or zero ranges, so every replica holds the same bytes.
    pub fn zero_fill(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut at = offset;
        while at < offset + len {
            let n = ((offset + len - at) as usize).min(zeros.len());
            self.write_sync(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// `pwrite`, or with O_DIRECT a read-modify-write of the whole blocks the range touches.
    fn write_sync(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.direct {
            return self
                .file
                .write_all_at(data, offset)
                .map_err(|e| self.err("pwrite", offset, e));
        }
        if data.is_empty() {
            return Ok(());
        }
        let (a0, a1) = self.io_range(offset, data.len() as u64);
        let mut buf = AlignedBuf::zeroed((a1 - a0) as usize);
        let block = DIRECT_ALIGN as usize;
        let last = buf.len() - block;
        if offset != a0 {
            self.file
                .read_exact_at(&mut buf[..block], a0)
                .map_err(|e| self.err("pread (read-modify-write)", a0, e))?;
        }
        if offset + data.len() as u64 != a1 && (last != 0 || offset == a0) {
            let at = a0 + last as u64;
            self.file
                .read_exact_at(&mut buf[last..], at)
                .map_err(|e| self.err("pread (read-modify-write)", at, e))?;
        }
        let start = (offset - a0) as usize;
        buf[start..start + data.len()].copy_from_slice(data);
        self.file
            .write_all_at(&buf, a0)
            .map_err(|e| self.err("pwrite", a0, e))
    }

    /// The request reading `offset..offset + len` (whole blocks with O_DIRECT); its result is
    /// [`read_result`](Self::read_result).
    pub fn read_req(&self, token: u64, offset: u64, len: u32) -> IoReq {
        let (a0, a1) = self.io_range(offset, len as u64);
        let buf = if self.direct && a1 > a0 {
            IoBuf::Aligned(AlignedBuf::zeroed((a1 - a0) as usize))
        } else {
            IoBuf::Vec(vec![0u8; len as usize])
        };
        IoReq {
            token,
            file: self.file.clone(),
            kind: IoKind::Read,
            offset: if self.direct { a0 } else { offset },
            buf,
        }
    }

    /// The bytes a completed [`read_req`](Self::read_req) for `offset..offset + len` read.
    pub fn read_result(req: IoReq, offset: u64, len: u32) -> Bytes {
        match req.buf {
            IoBuf::Vec(v) => Bytes::from(v),
            IoBuf::Aligned(a) => {
                let start = (offset - req.offset) as usize;
                Bytes::copy_from_slice(&a[start..start + len as usize])
            }
            IoBuf::None | IoBuf::Shared(_) => unreachable!("a read request owns its buffer"),
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.err("fdatasync", 0, e))
    }

    /// `sync`, with the dirty pages written back first one range of `range_bytes` at a time
    /// (`sync_file_range` WAIT_BEFORE | WRITE | WAIT_AFTER), so the disk queue never holds more
    /// than one range of them: on a disk whose flush is a host fsync (virtio, write-back cache),
    /// a WAL write issued meanwhile waits for one range's writeback instead of the whole file's.
    /// Durability still comes from the final fdatasync (sync_file_range flushes neither the
    /// device cache nor metadata).
    pub fn sync_in_ranges(&self, range_bytes: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let range_bytes = range_bytes.max(DIRECT_ALIGN);
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let mut off = 0u64;
        while off < self.size {
            let len = range_bytes.min(self.size - off);
            // SAFETY: plain syscall on a descriptor `self.file` keeps open.
            let r = unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), off as i64, len as i64, flags)
            };
            if r != 0 {
                return Err(self.err("sync_file_range", off, io::Error::last_os_error()));
            }
            off += len;
        }
        self.sync()
    }

    /// Another handle on the same open file (for a `sync` off the core thread).
    pub fn try_clone_file(&self) -> Result<DataFile> {
        Ok(DataFile {
            bg: self.bg,
            path: self.path.clone(),
            file: self.file.clone(),
            size: self.size,
            direct: self.direct,
        })
    }

    /// A second descriptor for streaming the file to a peer while applies continue.
    pub fn reopen_read_only(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| self.err("open for snapshot", 0, e))
    }
}

fn zero_mode(may_trim: bool) -> libc::c_int {
    if may_trim {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// Orders the applies of one block group on an asynchronous disk.
///
/// Raft hands committed entries over in log order; their writes then run concurrently on the
/// core's ring. Two rules keep the result equal to applying them one by one:
/// - an op starts only when no op in flight touches an overlapping byte range (on disk, see
///   [`DataFile::io_range`]), and ops start in log order, so of two overlapping ops the later
///   one is issued only after the earlier one completed;
/// - [`applied`](Self::applied) is the highest index such that every entry up to it completed:
///   what reads (`applied >= read index`) and snapshots (a data-file sync covers it) rely on.
///
/// A client's write is acknowledged when its own entries completed (they are committed, and on
/// disk in the page cache or the device).
#[derive(Default)]
pub struct Applier {
    /// Entries handed over and not yet all complete, in log order: (index, term, complete).
    order: VecDeque<(Index, Term, bool)>,
    /// Ops not started yet, in log order.
    queue: VecDeque<(Index, BlockOp)>,
    /// On-disk ranges of the ops in flight.
    inflight: Vec<(u64, u64, Index)>,
    applied: Index,
    queued_bytes: u64,
}

impl Applier {
    pub fn new(applied: Index) -> Applier {
        Applier {
            applied,
            ..Applier::default()
        }
    }

    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Nothing queued or in flight.
    pub fn is_idle(&self) -> bool {
        self.order.is_empty()
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Data bytes of queued writes (not yet started).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    fn note(&mut self, index: Index, term: Term, complete: bool) {
        let last = self.order.back().map_or(self.applied, |e| e.0);
        assert!(
            index > last,
            "entries applied out of order: {index} after {last}"
        );
        self.order.push_back((index, term, complete));
        self.advance();
    }

    /// Entry `index` has nothing to write (configuration, no-op, empty op): complete at once,
    /// though `applied` passes it only once every earlier entry completed.
    pub fn push_done(&mut self, index: Index, term: Term) {
        self.note(index, term, true);
    }

    /// Entry `index` writes `op`; it starts when [`next`](Self::next) hands it out.
    pub fn push(&mut self, index: Index, term: Term, op: BlockOp) {
        self.note(index, term, false);
        if let BlockOp::Write { data, .. } = &op {
            self.queued_bytes += data.len() as u64;
        }
        self.queue.push_back((index, op));
    }

    /// The next op that may start now (the oldest queued one, unless it overlaps an op in
    /// flight); it counts as in flight until [`complete`](Self::complete).
    pub fn next(&mut self, data: &DataFile) -> Option<(Index, BlockOp)> {
        let (_, op) = self.queue.front()?;
        let (s, e) = data.io_range(op.offset(), op.len());
        if self.inflight.iter().any(|&(s2, e2, _)| s < e2 && s2 < e) {
            return None;
        }
        let (index, op) = self.queue.pop_front().expect("front exists");
        if let BlockOp::Write { data, .. } = &op {
            self.queued_bytes -= data.len() as u64;
        }
        self.inflight.push((s, e, index));
        Some((index, op))
    }

    /// The op of entry `index` completed; returns the entry's term.
    pub fn complete(&mut self, index: Index) -> Term {
        let at = self
            .inflight
            .iter()
            .position(|e| e.2 == index)
            .unwrap_or_else(|| panic!("completion of entry {index}, which is not in flight"));
        self.inflight.swap_remove(at);
        let pos = self
            .order
            .binary_search_by_key(&index, |e| e.0)
            .unwrap_or_else(|_| panic!("completion of entry {index}, which was never handed over"));
        self.order[pos].2 = true;
        let term = self.order[pos].1;
        self.advance();
        term
    }

    fn advance(&mut self) {
        while let Some(&(index, _, true)) = self.order.front() {
            self.applied = index;
            self.order.pop_front();
        }
    }

    /// An installed snapshot replaced the data file: everything through `index` is applied.
    pub fn reset(&mut self, index: Index) {
        assert!(
            self.is_idle(),
            "snapshot installed while applies are pending"
        );
        self.applied = self.applied.max(index);
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

const META_MAGIC: &[u8; 8] = b"BDBGMETA";
const META_VERSION: u32 = 1;

/// Writes the snapshot meta durably (see the module docs for the order of operations).
pub fn write_meta(core_dir: &Path, bg: GroupId, meta: &SnapshotMeta) -> Result<()> {
    write_meta_at(core_dir, bg, &meta_path(core_dir, bg), meta)
}

/// Writes the install marker of a snapshot about to replace the data file (step 1 of
/// [`install_snapshot_files`]).
pub fn write_install_marker(core_dir: &Path, bg: GroupId, meta: &SnapshotMeta) -> Result<()> {
    write_meta_at(core_dir, bg, &install_marker_path(core_dir, bg), meta)
}

/// `meta` in the meta format at `path`, atomically: tmp file, fdatasync, rename, dir fsync.
fn write_meta_at(core_dir: &Path, bg: GroupId, path: &Path, meta: &SnapshotMeta) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let conf = meta.conf.encode();
    let mut b = Vec::with_capacity(40 + conf.len());
    b.extend_from_slice(META_MAGIC);
    b.extend_from_slice(&META_VERSION.to_le_bytes());
    b.extend_from_slice(&meta.index.to_le_bytes());
    b.extend_from_slice(&meta.term.to_le_bytes());
    b.extend_from_slice(&(conf.len() as u32).to_le_bytes());
    b.extend_from_slice(&conf);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let err = |op, p: &Path, source| Error::File {
        bg,
        path: p.to_path_buf(),
        op,
        offset: 0,
        source,
    };
    let f = File::create(&tmp).map_err(|e| err("create", &tmp, e))?;
    f.write_all_at(&b, 0).map_err(|e| err("write", &tmp, e))?;
    f.sync_data().map_err(|e| err("fdatasync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("rename", path, e))?;
    sync_dir(core_dir).map_err(|e| err("fsync dir", core_dir, e))
}

/// Reads the snapshot meta; `Ok(None)` when the group never took or installed a snapshot.
pub fn read_meta(core_dir: &Path, bg: GroupId) -> Result<Option<SnapshotMeta>> {
    read_meta_at(bg, meta_path(core_dir, bg))
}

/// Reads the install marker; `Ok(None)` when no install is in progress.
pub fn read_install_marker(core_dir: &Path, bg: GroupId) -> Result<Option<SnapshotMeta>> {
    read_meta_at(bg, install_marker_path(core_dir, bg))
}

fn read_meta_at(bg: GroupId, path: PathBuf) -> Result<Option<SnapshotMeta>> {
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::File {
                bg,
                path,
                op: "read",
                offset: 0,
                source,
            })
        }
    };
    let corrupt = |reason: &str| Error::MetaCorrupt {
        bg,
        path: path.clone(),
        reason: reason.to_string(),
    };
    if b.len() < 36 || &b[..8] != META_MAGIC {
        return Err(corrupt("bad magic or too short"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
    if u32_at(8) != META_VERSION {
        return Err(corrupt(&format!("unknown version {}", u32_at(8))));
    }
    let conf_len = u32_at(28) as usize;
    if body.len() != 32 + conf_len {
        return Err(corrupt("length does not match the configuration length"));
    }
    let conf =
        Configuration::decode(&body[32..]).map_err(|_| corrupt("configuration does not decode"))?;
    Ok(Some(SnapshotMeta {
        index: u64_at(12),
        term: u64_at(20),
        conf,
    }))
}

/// Steps of [`install_snapshot_files`] (see the module docs).
pub const INSTALL_STEPS: usize = 4;

/// Replaces the data file of `bg` by the complete copy `bg-<id>.data.incoming` and records
/// `meta` as its snapshot, crash-safely (see the module docs). Blocking (several fsyncs): runs
/// off the core thread, with the group's meta lock held.
pub fn install_snapshot_files(core_dir: &Path, bg: GroupId, meta: &SnapshotMeta) -> Result<()> {
    install_snapshot_files_until(core_dir, bg, meta, INSTALL_STEPS)
}

/// The first `steps` steps of [`install_snapshot_files`] only: what a crash after them leaves
/// on disk (for the crash tests).
#[doc(hidden)]
pub fn install_snapshot_files_until(
    core_dir: &Path,
    bg: GroupId,
    meta: &SnapshotMeta,
    steps: usize,
) -> Result<()> {
    if steps == 0 {
        return Ok(());
    }
    write_install_marker(core_dir, bg, meta)?;
    if steps == 1 {
        return Ok(());
    }
    rename_incoming_over_data(core_dir, bg)?;
    if steps == 2 {
        return Ok(());
    }
    write_meta(core_dir, bg, meta)?;
    if steps == 3 {
        return Ok(());
    }
    remove_install_marker(core_dir, bg)
}

fn install_file_err(bg: GroupId, op: &'static str, p: &Path, source: io::Error) -> Error {
    Error::File {
        bg,
        path: p.to_path_buf(),
        op,
        offset: 0,
        source,
    }
}

/// Install step 2: the complete copy becomes the data file, durably.
fn rename_incoming_over_data(core_dir: &Path, bg: GroupId) -> Result<()> {
    let data = data_path(core_dir, bg);
    std::fs::rename(incoming_path(core_dir, bg), &data)
        .map_err(|e| install_file_err(bg, "rename snapshot over", &data, e))?;
    sync_dir(core_dir).map_err(|e| install_file_err(bg, "fsync dir", core_dir, e))
}

/// Install step 4: the install is complete, durably.
fn remove_install_marker(core_dir: &Path, bg: GroupId) -> Result<()> {
    let marker = install_marker_path(core_dir, bg);
    std::fs::remove_file(&marker).map_err(|e| install_file_err(bg, "remove", &marker, e))?;
    sync_dir(core_dir).map_err(|e| install_file_err(bg, "fsync dir", core_dir, e))
}

/// Finishes an install a crash interrupted (see the module docs), or deletes the copy of an
/// interrupted download. Call on start, before opening the data file and reading the meta;
/// returns the meta of the install it completed.
pub fn recover_install(core_dir: &Path, bg: GroupId) -> Result<Option<SnapshotMeta>> {
    let err = |op, p: &Path, source| install_file_err(bg, op, p, source);
    let inc = incoming_path(core_dir, bg);
    let Some(meta) = read_install_marker(core_dir, bg)? else {
        return match std::fs::remove_file(&inc) {
            Ok(()) => {
                tracing::info!(bg, path = %inc.display(), "deleted an interrupted snapshot download");
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("remove", &inc, e)),
        };
    };
    tracing::warn!(
        bg,
        index = meta.index,
        term = meta.term,
        "completing a snapshot install interrupted by a crash"
    );
    match std::fs::metadata(&inc) {
        Ok(_) => rename_incoming_over_data(core_dir, bg)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("stat", &inc, e)),
    }
    write_meta(core_dir, bg, &meta)?;
    remove_install_marker(core_dir, bg)?;
    Ok(Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataio::{DataIo, DataIoBackend};

    /// Thin (the default): a new data file has the volume's size but occupies nothing until
    /// written, and a punched hole gives the space back; thick allocates it all at creation.
    #[test]
    fn thin_files_allocate_on_write_and_thick_ones_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let thin = DataFile::open(dir.path(), 1, size, false, false).unwrap();
        assert_eq!(thin.size(), size);
        assert_eq!(std::fs::metadata(thin.path()).unwrap().len(), size);
        assert!(
            thin.allocated_bytes() < 64 << 10,
            "{}",
            thin.allocated_bytes()
        );
        let f = OpenOptions::new().write(true).open(thin.path()).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let written = thin.allocated_bytes();
        assert!((1 << 20..2 << 20).contains(&written), "{written}");
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            1 << 20,
        )
        .unwrap();
        assert!(
            thin.allocated_bytes() < written,
            "{}",
            thin.allocated_bytes()
        );
        let thick = DataFile::open(dir.path(), 2, size, false, true).unwrap();
        assert!(
            thick.allocated_bytes() >= size,
            "{}",
            thick.allocated_bytes()
        );
    }

    /// The data file's size is the group's from creation on: reopening it with another
    /// configured size, larger or smaller, is refused with both sizes named, and changes nothing.
    #[test]
    fn reopening_with_another_size_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let created = 1u64 << 20;
        drop(DataFile::open(dir.path(), 9, created, false, true).unwrap());
        for other in [created * 2, created / 2] {
            let err = match DataFile::open(dir.path(), 9, other, false, true) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("opening bg 9 with {other} bytes instead of {created} succeeded"),
            };
            assert!(
                err.contains(&created.to_string()) && err.contains(&other.to_string()),
                "{err}"
            );
            assert!(err.contains("bg 9"), "{err}");
            let len = std::fs::metadata(data_path(dir.path(), 9)).unwrap().len();
            assert_eq!(len, created, "the refused open left the file as it was");
        }
        let f = DataFile::open(dir.path(), 9, created, false, true).unwrap();
        assert_eq!(f.size(), created);
    }

    #[test]
    fn ops_round_trip_and_reject_garbage() {
        let ops = [
            BlockOp::Write {
                offset: 4096,
                data: Bytes::from_static(b"hello"),
            },
            BlockOp::Trim {
                offset: 1 << 20,
                len: 65536,
            },
            BlockOp::WriteZeroes {
                offset: 0,
                len: 512,
                may_trim: false,
            },
            BlockOp::WriteZeroes {
                offset: 0,
                len: 512,
                may_trim: true,
            },
        ];
        for op in ops {
            assert_eq!(BlockOp::decode(&op.encode()), Some(op.clone()));
            let enc = op.encode();
            assert_eq!(BlockOp::decode(&enc.slice(..enc.len() - 1)), None);
        }
        assert_eq!(BlockOp::decode(&Bytes::from_static(&[9; 13])), None);
    }

    #[test]
    fn split_covers_the_write_exactly() {
        let data = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let parts = BlockOp::Write {
            offset: 100,
            data: data.clone(),
        }
        .split(4096);
        assert_eq!(parts.len(), 3);
        let mut joined = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.offset(), 100 + 4096 * i as u64);
            if let BlockOp::Write { data, .. } = p {
                joined.extend_from_slice(data);
            }
        }
        assert_eq!(joined, data);
    }

    /// Reads through the request path the core uses, on the given backend.
    fn read(io: &mut DataIo, f: &DataFile, offset: u64, len: u32) -> Bytes {
        io.submit(f.read_req(1, offset, len)).unwrap();
        io.kick().unwrap();
        let mut done = io.wait_and_reap().unwrap();
        assert_eq!(done.len(), 1);
        let d = done.pop().unwrap();
        d.result.unwrap();
        DataFile::read_result(d.req, offset, len)
    }

    /// Applies through the request path the core uses (or the synchronous one it falls back
    /// to for unaligned O_DIRECT writes).
    fn apply(io: &mut DataIo, f: &DataFile, op: &BlockOp) {
        match f.apply_req(1, op) {
            Some(req) => {
                io.submit(req).unwrap();
                io.kick().unwrap();
                let done = io.wait_and_reap().unwrap();
                assert_eq!(done.len(), 1);
                done.into_iter().next().unwrap().result.unwrap();
            }
            None => f.apply_sync(op).unwrap(),
        }
    }

    #[test]
    fn data_file_apply_read_buffered_and_direct() {
        // A model of the volume checked after every op, with unaligned writes and reads
        // (read-modify-write under O_DIRECT).
        for (direct, backend) in [
            (false, DataIoBackend::Auto),
            (true, DataIoBackend::Auto),
            (true, DataIoBackend::Sync),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let f = DataFile::open(dir.path(), 7, 1 << 20, direct, true).unwrap();
            let mut io = DataIo::open(backend, 8, 0).unwrap();
            let mut model = vec![0u8; 1 << 20];
            let ops = [
                BlockOp::Write {
                    offset: 8192,
                    data: Bytes::from(vec![0xab; 8192]),
                },
                BlockOp::Write {
                    offset: 100,
                    data: Bytes::from(vec![0x11; 5000]),
                },
                BlockOp::Write {
                    offset: 12288 + 17,
                    data: Bytes::from(vec![0x22; 30]),
                },
                BlockOp::Trim {
                    offset: 8192,
                    len: 4096,
                },
                BlockOp::WriteZeroes {
                    offset: 12288,
                    len: 1024,
                    may_trim: false,
                },
                BlockOp::Write {
                    offset: 4095,
                    data: Bytes::from(vec![0x33; 2]),
                },
                BlockOp::Write {
                    offset: (1 << 20) - 4096,
                    data: Bytes::from(vec![0x44; 4096]),
                },
            ];
            for op in &ops {
                apply(&mut io, &f, op);
                let (o, l) = (op.offset() as usize, op.len() as usize);
                match op {
                    BlockOp::Write { data, .. } => model[o..o + l].copy_from_slice(data),
                    _ => model[o..o + l].fill(0),
                }
                for (ro, rl) in [(0u64, 20480u32), (4000, 200), (12288 + 10, 50)] {
                    let r = read(&mut io, &f, ro, rl);
                    assert_eq!(
                        &r[..],
                        &model[ro as usize..ro as usize + rl as usize],
                        "direct {direct}: after {op:?}, read {ro}+{rl}"
                    );
                }
            }
            let r = read(&mut io, &f, (1 << 20) - 4096, 4096);
            assert!(r.iter().all(|b| *b == 0x44));
            let err = f.apply_sync(&BlockOp::Write {
                offset: (1 << 20) - 1,
                data: Bytes::from_static(b"xy"),
            });
            assert!(matches!(err, Err(Error::OutOfRange { bg: 7, .. })));
        }
    }

    #[test]
    fn sync_in_ranges_covers_a_file_whose_size_is_not_a_multiple_of_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let size = (1 << 20) + 3 * 4096;
        let f = DataFile::open(dir.path(), 4, size, false, true).unwrap();
        f.file.write_at(b"head", 0).unwrap();
        f.file.write_at(b"tail", size - 4).unwrap();
        f.sync_in_ranges(64 << 10).unwrap();
        // A range below one block is raised to one block (0 would never advance).
        f.sync_in_ranges(0).unwrap();
        let back = f.reopen_read_only().unwrap();
        let mut b = [0u8; 4];
        back.read_exact_at(&mut b, size - 4).unwrap();
        assert_eq!(&b, b"tail");
        back.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"head");
    }

    #[test]
    fn applier_orders_overlapping_ops_and_tracks_the_applied_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let f = DataFile::open(dir.path(), 1, 1 << 20, false, true).unwrap();
        let w = |offset, n| BlockOp::Write {
            offset,
            data: Bytes::from(vec![1u8; n]),
        };
        let mut a = Applier::new(10);
        a.push(11, 2, w(0, 4096));
        a.push(12, 2, w(8192, 4096));
        a.push_done(13, 2);
        a.push(14, 2, w(4000, 200)); // overlaps 11
        a.push(15, 2, w(65536, 10)); // behind 14: ops start in log order
        assert_eq!(a.queued_bytes(), 4096 * 2 + 210);
        assert_eq!(a.next(&f).map(|x| x.0), Some(11));
        assert_eq!(a.next(&f).map(|x| x.0), Some(12));
        assert_eq!(a.next(&f), None, "14 overlaps 11, in flight");
        assert_eq!(a.complete(12), 2);
        assert_eq!(a.applied(), 10, "11 is still in flight");
        assert_eq!(a.complete(11), 2);
        assert_eq!(a.applied(), 13);
        assert_eq!(a.next(&f).map(|x| x.0), Some(14));
        assert_eq!(a.next(&f).map(|x| x.0), Some(15));
        assert!(!a.has_queued());
        a.complete(15);
        assert_eq!(a.applied(), 13);
        a.complete(14);
        assert_eq!(a.applied(), 15);
        assert!(a.is_idle());
        a.reset(40);
        assert_eq!(a.applied(), 40);

        // With O_DIRECT, ops in the same 4 KiB block overlap on disk.
        let d = DataFile::open(dir.path(), 2, 1 << 20, true, true).unwrap();
        if d.is_direct() {
            let mut a = Applier::new(0);
            a.push(1, 1, w(0, 10));
            a.push(2, 1, w(4000, 10));
            assert!(a.next(&d).is_some());
            assert_eq!(a.next(&d), None);
        }
    }

    /// A crash after each step of the install protocol, then the recovery a restart runs:
    /// the group is either wholly old (data, meta) or wholly new, and a second recovery (a
    /// crash during the first) changes nothing.
    #[test]
    fn snapshot_install_is_crash_safe_at_every_step() {
        let old_meta = SnapshotMeta {
            index: 10,
            term: 1,
            conf: Configuration::new([1, 2, 3]),
        };
        let new_meta = SnapshotMeta {
            index: 500,
            term: 4,
            conf: Configuration::new([1, 2, 3]),
        };
        let size = 64 << 10;
        for steps in 0..=INSTALL_STEPS {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            std::fs::write(data_path(d, 3), vec![0xaa; size]).unwrap();
            write_meta(d, 3, &old_meta).unwrap();
            std::fs::write(incoming_path(d, 3), vec![0xbb; size]).unwrap();
            install_snapshot_files_until(d, 3, &new_meta, steps).unwrap();
            // Restart.
            for round in 0..2 {
                let completed = recover_install(d, 3).unwrap();
                let meta = read_meta(d, 3).unwrap().unwrap();
                let data = DataFile::open(d, 3, size as u64, false, true).unwrap();
                let mut io = DataIo::open(DataIoBackend::Sync, 1, 0).unwrap();
                let bytes = read(&mut io, &data, 0, size as u32);
                let byte = bytes[0];
                assert!(
                    bytes.iter().all(|b| *b == byte),
                    "steps {steps}: mixed data"
                );
                if steps == 0 {
                    assert_eq!((byte, &meta), (0xaa, &old_meta), "steps {steps}");
                } else {
                    assert_eq!((byte, &meta), (0xbb, &new_meta), "steps {steps}");
                }
                assert_eq!(
                    completed.is_some(),
                    round == 0 && (1..INSTALL_STEPS).contains(&steps),
                    "steps {steps} round {round}"
                );
                assert!(!install_marker_path(d, 3).exists());
                assert!(!incoming_path(d, 3).exists());
            }
        }
    }

    #[test]
    fn meta_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_meta(dir.path(), 7).unwrap(), None);
        let meta = SnapshotMeta {
            index: 42,
            term: 3,
            conf: Configuration::new([1, 2, 3]),
        };
        write_meta(dir.path(), 7, &meta).unwrap();
        assert_eq!(read_meta(dir.path(), 7).unwrap(), Some(meta));
        let p = meta_path(dir.path(), 7);
        let mut b = std::fs::read(&p).unwrap();
        b[14] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(
            read_meta(dir.path(), 7),
            Err(Error::MetaCorrupt { .. })
        ));
    }
}
