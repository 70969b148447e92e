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
use transport::{SnapshotOffer, SnapshotReceiver, SnapshotSink, SnapshotSource};

use crate::block::incoming_path;

/// Bytes between fdatasyncs of an incoming snapshot (the resume granularity).
const SYNC_EVERY_BYTES: u64 = 16 << 20;

/// Reads a data file for `send_snapshot`.
pub struct FileSource(pub File);

impl SnapshotSource for FileSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
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
        // Holes of a sparse source arrive as zeroes; skipping all-zero chunks keeps the copy
        // sparse too (the file was created at full length, so they read as zero).
        if data.iter().any(|b| *b != 0) {
            self.file.write_all_at(data, offset)?;
        }
        self.written = offset + data.len() as u64;
        if self.written - self.durable >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.durable = self.written;
            self.record(false);
        }
        Ok(())
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
