//! Snapshot transfer between replicas of a block group.
//!
//! Sending: the leader streams its live data file ([`FileSource`]) through
//! `Transport::send_snapshot` — a fuzzy copy, which is correct because applies are idempotent
//! overwrites and the receiver replays the log from the snapshot index (see `block`). Only after
//! the stream finished does the leader deliver the `InstallSnapshot` raft message.
//!
//! Receiving: [`Incoming`] (one per core, the transport's `SnapshotReceiver`) writes chunks into
//! `bg-<id>.data.incoming`, never into the live data file, so an interrupted transfer leaves the
//! replica's state untouched. Every `SYNC_EVERY_BYTES` it fdatasyncs and records the durable
//! offset, so a broken stream resumes from there (same sender, group and snapshot id). On
//! `finish` the file is fdatasynced and marked complete. The core steps an `InstallSnapshot`
//! message only when the matching complete file exists (otherwise it drops the message and the
//! leader retries). Installing it (LOADING) runs off the core thread with `block`'s crash-safe
//! protocol (install marker, rename over the data file, meta file, marker removed), holding
//! the group's meta lock, so an off-thread snapshot save started earlier cannot overwrite the
//! meta with its older one; offers for the group are refused meanwhile
//! ([`Incoming::begin_install`]); then the core calls `on_snapshot_installed`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use raftlog::core::{GroupId, NodeId};
use transport::{Run, SnapshotOffer, SnapshotReceiver, SnapshotSink, SnapshotSource};

use crate::block::incoming_path;

/// Bytes between fdatasyncs of an incoming snapshot (the resume granularity).
const SYNC_EVERY_BYTES: u64 = 16 << 20;

/// Reads a data file for `send_snapshot`. Its holes (never written, trimmed, or preallocated and
/// unwritten: `SEEK_DATA` treats them alike) travel as zero runs, so a mostly empty volume costs
/// about its data, not its size.
pub struct FileSource(pub File);

impl SnapshotSource for FileSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn run_at(&mut self, offset: u64) -> io::Result<Run> {
        use std::os::fd::AsRawFd;
        let fd = self.0.as_raw_fd();
        let at = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let seek = |whence| {
            // SAFETY: lseek on a descriptor `self.0` keeps open; the file offset it moves is
            // not used by the positional reads.
            let r = unsafe { libc::lseek(fd, at, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            // Only zeros from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Run::Zeros(u64::MAX)),
            // A filesystem without hole reporting: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Run::Data(u64::MAX)),
            Err(e) => Err(e),
            Ok(data) if data > offset => Ok(Run::Zeros(data - offset)),
            Ok(_) => Ok(Run::Data(
                seek(libc::SEEK_HOLE)?.saturating_sub(offset).max(1),
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Transfer {
    from: NodeId,
    snapshot_id: u64,
    total_len: u64,
    durable: u64,
    complete: bool,
    /// The core is installing this copy: offers for the group are refused until it is done.
    installing: bool,
}

/// Incoming snapshots of one core. Shared between the transport's tasks and the core loop; the
/// lock is taken per chunk of a snapshot, never on the block I/O path.
#[derive(Clone)]
pub struct Incoming {
    core_dir: PathBuf,
    /// Volume size of every group on this core (offers of another size are refused).
    sizes: Arc<HashMap<GroupId, u64>>,
    state: Arc<Mutex<HashMap<GroupId, Transfer>>>,
}

impl Incoming {
    pub fn new(core_dir: PathBuf, sizes: HashMap<GroupId, u64>) -> Incoming {
        Incoming {
            core_dir,
            sizes: Arc::new(sizes),
            state: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, Transfer>> {
        // Entries are plain values replaced whole: a poisoned lock holds nothing half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a complete copy for `(group, snapshot_id)` is waiting to be installed.
    pub fn is_complete(&self, group: GroupId, snapshot_id: u64) -> bool {
        self.lock()
            .get(&group)
            .is_some_and(|t| t.complete && t.snapshot_id == snapshot_id)
    }

    /// The core starts installing the complete copy of `group`: from now until [`take`], no
    /// offer may truncate or rewrite it (the install may rename it at any moment, and after a
    /// crash the install marker relies on it; see `block`).
    ///
    /// [`take`]: Incoming::take
    pub fn begin_install(&self, group: GroupId) {
        if let Some(t) = self.lock().get_mut(&group) {
            t.installing = true;
        }
    }

    /// The complete copy was installed (renamed away): forget it.
    pub fn take(&self, group: GroupId) {
        self.lock().remove(&group);
    }

    /// `"DOWNLOADING x/y"` while a transfer for `group` is in progress.
    pub fn progress(&self, group: GroupId) -> Option<(u64, u64, bool)> {
        self.lock()
            .get(&group)
            .map(|t| (t.durable, t.total_len, t.complete))
    }
}

impl SnapshotReceiver for Incoming {
    fn open(&self, offer: &SnapshotOffer) -> io::Result<Box<dyn SnapshotSink>> {
        let Some(&size) = self.sizes.get(&offer.group) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("bg {} is not hosted on this core", offer.group),
            ));
        };
        if offer.total_len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bg {}: snapshot of {} bytes offered, the volume is {size} bytes",
                    offer.group, offer.total_len
                ),
            ));
        }
        let path = incoming_path(&self.core_dir, offer.group);
        let mut state = self.lock();
        if state.get(&offer.group).is_some_and(|t| t.installing) {
            // The sender retries the transfer later (the install takes a few fsyncs).
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "bg {}: a snapshot is being installed; offer {} refused",
                    offer.group, offer.snapshot_id
                ),
            ));
        }
        let resume = state
            .get(&offer.group)
            .copied()
            .filter(|t| t.from == offer.from && t.snapshot_id == offer.snapshot_id && !t.complete);
        let (file, start) = match resume {
            Some(t) => (OpenOptions::new().write(true).open(&path)?, t.durable),
            None => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)?;
                f.set_len(size)?;
                (f, 0)
            }
        };
        state.insert(
            offer.group,
            Transfer {
                from: offer.from,
                snapshot_id: offer.snapshot_id,
                total_len: size,
                durable: start,
                complete: false,
                installing: false,
            },
        );
        tracing::info!(
            bg = offer.group,
            from = offer.from,
            snapshot_id = offer.snapshot_id,
            resume_at = start,
            "snapshot download started"
        );
        Ok(Box::new(Sink {
            incoming: self.clone(),
            group: offer.group,
            snapshot_id: offer.snapshot_id,
            file,
            durable: start,
            written: start,
        }))
    }
}

struct Sink {
    incoming: Incoming,
    group: GroupId,
    snapshot_id: u64,
    file: File,
    durable: u64,
    written: u64,
}

impl Sink {
    /// Everything before `end` has arrived; fdatasync every `SYNC_EVERY_BYTES`.
    fn advance(&mut self, end: u64) -> io::Result<()> {
        self.written = end;
        if self.written - self.durable >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.durable = self.written;
            self.record(false);
        }
        Ok(())
    }

    fn record(&self, complete: bool) {
        let mut st = self.incoming.lock();
        if let Some(t) = st.get_mut(&self.group) {
            if t.snapshot_id == self.snapshot_id {
                t.durable = self.durable;
                t.complete = complete;
            }
        }
    }
}

impl SnapshotSink for Sink {
    fn durable_offset(&self) -> u64 {
        self.durable
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        // All-zero chunks are skipped like zero runs (below), keeping the copy sparse.
        if data.iter().any(|b| *b != 0) {
            self.file.write_all_at(data, offset)?;
        }
        self.advance(offset + data.len() as u64)
    }

    /// Nothing to write: the file was created at full length, so a range nothing was written to
    /// reads as zero. After a resume, bytes an earlier attempt wrote past the durable offset may
    /// still be there; they are that same group's data file at a moment after the snapshot
    /// index too, and replaying the log from the snapshot index makes every byte right (the same
    /// argument as for the fuzzy copy itself, see `block`).
    fn write_zeros(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.advance(offset + len)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.durable = self.written;
        self.record(true);
        tracing::info!(
            bg = self.group,
            snapshot_id = self.snapshot_id,
            bytes = self.written,
            "snapshot download complete"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `len` bytes of `src` the way the transport does: zero runs as zeros, data runs
    /// through `read_at`; returns the bytes and how many came from zero runs.
    fn stream(src: &mut FileSource, len: u64) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut zeros = 0;
        let mut at = 0u64;
        while at < len {
            match src.run_at(at).unwrap() {
                Run::Zeros(n) => {
                    let n = n.min(len - at);
                    out.resize(out.len() + n as usize, 0);
                    zeros += n;
                    at += n;
                }
                Run::Data(n) => {
                    let n = n.min(len - at).min(1 << 20);
                    let mut buf = vec![0u8; n as usize];
                    src.read_at(at, &mut buf).unwrap();
                    out.extend_from_slice(&buf);
                    at += n;
                }
            }
        }
        (out, zeros)
    }

    #[test]
    fn file_source_reports_holes_and_streams_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let f = File::create(&path).unwrap();
        let len = 8u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 100], (5 << 20) + 10).unwrap();
        let want = std::fs::read(&path).unwrap();
        let mut src = FileSource(File::open(&path).unwrap());
        assert_eq!(src.run_at(0).unwrap(), Run::Zeros(1 << 20));
        assert!(matches!(src.run_at(1 << 20).unwrap(), Run::Data(n) if n >= 4096));
        assert_eq!(src.run_at(6 << 20).unwrap(), Run::Zeros(u64::MAX));
        let (got, zeros) = stream(&mut src, len);
        assert!(got == want, "streamed bytes differ from the file");
        // Everything but the two written blocks (and whatever the filesystem allocates around
        // them) travels as zero runs.
        assert!(
            zeros >= len - (1 << 20),
            "only {zeros} of {len} bytes as zero runs"
        );
    }

    /// Data files are preallocated (fallocate: unwritten extents); never written, they read as
    /// zeros and are holes to `SEEK_DATA` as well (unless their pages were read into the cache).
    #[test]
    fn a_preallocated_never_written_range_is_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        crate::dataio::fallocate(&f, 0, 0, 4 << 20).unwrap();
        f.write_all_at(&[5u8; 4096], 1 << 20).unwrap();
        let mut src = FileSource(f);
        assert_eq!(src.run_at(0).unwrap(), Run::Zeros(1 << 20));
        assert_eq!(src.run_at((1 << 20) + 4096).unwrap(), Run::Zeros(u64::MAX));
    }
}
