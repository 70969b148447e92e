//! The block state machine of one block group: the operations carried in raft entries, the
//! preallocated data file they are applied to, and the small meta file that records the latest
//! snapshot.
//!
//! # Entry payload
//! `op u8 | offset u64 LE | len u32 LE | data` — data only for WRITE (raw bytes, never copied into
//! another structure). TRIM and WRITE_ZEROES carry no data.
//!
//! # Apply is an idempotent overwrite
//! WRITE is `pwrite`, TRIM and WRITE_ZEROES punch a hole (`fallocate(PUNCH_HOLE|KEEP_SIZE)`,
//! reads return zeroes on every replica, so replicas stay byte-identical), WRITE_ZEROES with
//! `NO_HOLE` uses `FALLOC_FL_ZERO_RANGE`. Applying an entry twice, or applying entries `a..=b`
//! over a file that already holds the effect of some of them (or of later ones), ends in the same
//! state as applying `a..=b` once to the state at `a - 1`, as long as they are re-applied in log
//! order up to at least the latest index the file may hold. That is what makes these rules safe:
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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use raftlog::core::{Configuration, GroupId, SnapshotMeta};

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

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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

/// The data file of one block group: a volume of `size` bytes.
pub struct DataFile {
    bg: GroupId,
    path: PathBuf,
    file: File,
    size: u64,
}

impl DataFile {
    /// Opens the data file, creating and preallocating it when missing. Preallocation (rather
    /// than a sparse file) makes ENOSPC show up here, at creation, and not in the middle of an
    /// apply that the log already committed.
    pub fn open(core_dir: &Path, bg: GroupId, size: u64) -> Result<DataFile> {
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
        if len != size {
            if len > size {
                return Err(Error::Config {
                    what: format!(
                        "bg {bg}: data file {} holds {len} bytes, more than the configured size {size}",
                        path.display()
                    ),
                });
            }
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
        Ok(DataFile {
            bg,
            path,
            file,
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
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

    fn err(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::File {
            bg: self.bg,
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    /// Applies one operation (idempotent overwrite; see the module docs).
    pub fn apply(&self, op: &BlockOp) -> Result<()> {
        self.check(op.name(), op.offset(), op.len())?;
        match op {
            BlockOp::Write { offset, data } => self
                .file
                .write_all_at(data, *offset)
                .map_err(|e| self.err("pwrite", *offset, e)),
            BlockOp::Trim { offset, len } => self.zero(*offset, *len as u64, true),
            BlockOp::WriteZeroes {
                offset,
                len,
                may_trim,
            } => self.zero(*offset, *len as u64, *may_trim),
        }
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Same bytes on every replica whatever the filesystem supports.
                let zeros = vec![0u8; (len as usize).min(1 << 20)];
                let mut at = offset;
                while at < offset + len {
                    let n = ((offset + len - at) as usize).min(zeros.len());
                    self.file
                        .write_all_at(&zeros[..n], at)
                        .map_err(|e| self.err("pwrite zeroes", at, e))?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(self.err("fallocate", offset, e)),
        }
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.check("read", offset, len as u64)?;
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| self.err("pread", offset, e))?;
        Ok(Bytes::from(buf))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.err("fdatasync", 0, e))
    }

    /// Another handle on the same open file (for a `sync` off the core thread).
    pub fn try_clone_file(&self) -> Result<DataFile> {
        let file = self.file.try_clone().map_err(|e| self.err("dup", 0, e))?;
        Ok(DataFile {
            bg: self.bg,
            path: self.path.clone(),
            file,
            size: self.size,
        })
    }

    /// A second descriptor for streaming the file to a peer while applies continue.
    pub fn reopen_read_only(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| self.err("open for snapshot", 0, e))
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

const META_MAGIC: &[u8; 8] = b"BDBGMETA";
const META_VERSION: u32 = 1;

/// Writes the snapshot meta durably (see the module docs for the order of operations).
pub fn write_meta(core_dir: &Path, bg: GroupId, meta: &SnapshotMeta) -> Result<()> {
    let path = meta_path(core_dir, bg);
    let tmp = core_dir.join(format!("bg-{bg}.meta.tmp"));
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
    std::fs::rename(&tmp, &path).map_err(|e| err("rename", &path, e))?;
    sync_dir(core_dir).map_err(|e| err("fsync dir", core_dir, e))
}

/// Reads the snapshot meta; `Ok(None)` when the group never took or installed a snapshot.
pub fn read_meta(core_dir: &Path, bg: GroupId) -> Result<Option<SnapshotMeta>> {
    let path = meta_path(core_dir, bg);
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn data_file_apply_read_and_meta_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = DataFile::open(dir.path(), 7, 1 << 20).unwrap();
        f.apply(&BlockOp::Write {
            offset: 8192,
            data: Bytes::from(vec![0xab; 8192]),
        })
        .unwrap();
        f.apply(&BlockOp::Trim {
            offset: 8192,
            len: 4096,
        })
        .unwrap();
        f.apply(&BlockOp::WriteZeroes {
            offset: 12288,
            len: 1024,
            may_trim: false,
        })
        .unwrap();
        let r = f.read(8192, 8192).unwrap();
        assert!(r[..5120].iter().all(|b| *b == 0));
        assert!(r[5120..].iter().all(|b| *b == 0xab));
        let err = f.apply(&BlockOp::Write {
            offset: (1 << 20) - 1,
            data: Bytes::from_static(b"xy"),
        });
        assert!(matches!(err, Err(Error::OutOfRange { bg: 7, .. })));

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
