//! The per-core write-ahead log: one append-only stream of segment files
//! shared by every raft group (block group) on a core, with a per-group
//! in-memory index (the tikv raft-engine layout), written through io_uring
//! with group commit.
//!
//! # What it owns
//! A directory of segment files `NNNNNNNNNNNNNNNNNNNN.wal` (see
//! [`format`](mod@format) for the record layout), the index of every group's live
//! entries, hard state and compaction point, a bounded cache of recent
//! entries, and the core's io_uring (or the fallback I/O threads).
//!
//! # How data flows
//! 1. Producers — raft groups on this core or other threads — submit
//!    [`WalOp`]s through a [`WalHandle`] (lock-free queue, bounded by
//!    `append_buffer_bytes_max`, producers wait when it is full), or the
//!    owner calls the blocking [`LogStore`] methods directly.
//! 2. The writer (the core's thread: [`run`] on a tokio `current_thread`
//!    runtime, or [`Wal::drive`] from any loop) drains the queue, validates
//!    each op, encodes it into the batch being filled and updates the index
//!    at once, so entries can be read back (from the cache) before they are
//!    durable — the leader replicates while its own write is in flight.
//! 3. While fewer than `batches_in_flight_max` batches are on the disk
//!    (`small_batches_in_flight_max` for batches under
//!    `small_batch_bytes_max`: a flush costs about the same whatever it
//!    carries, so a small batch gains more from growing behind the ones on
//!    the disk than from overlapping them), the
//!    pending batch is closed and goes out at once, at its own offset of the
//!    segment, as one durable write: with `direct_io` (the default) one
//!    `O_DIRECT` write SQE with `RWF_DSYNC`, the batch padded to 4096 bytes
//!    by a `Pad` record; else one buffered write SQE linked
//!    (`IOSQE_IO_LINK`) to one `fdatasync` SQE. When the disk's slots are
//!    full, the next batch fills until one frees. That is the group
//!    commit: one sync for every append of every group that arrived
//!    meanwhile, with several syncs overlapping (a virtualised disk
//!    completes overlapping requests far faster than a chain of single
//!    ones). Requests drained together while slots are
//!    free are spread over those slots, so a burst of appenders does not
//!    all end up in one batch.
//! 4. Chains complete in any order; batches are acknowledged strictly in
//!    order: when a batch and every earlier one are durable, its
//!    [`Durable`]s resolve, its buffer bytes are released, the cache may
//!    evict written entries, and segments nothing live needs are purged.
//!    A batch of the next segment is not submitted before every batch of
//!    the previous one (its seal included) is durable, so in-flight batches
//!    always share one segment and a segment's seal is durable before the
//!    next segment holds anything (what recovery relies on).
//!
//! # Segment files
//! Each segment is preallocated. A direct write into a freshly preallocated
//! (unwritten) extent costs a journal commit, so segments are files whose
//! every block was written before: a purged segment's file kept for reuse
//! (`segments_recycle_max`, renamed `free-N.walfree`; the sequence number is
//! in every record's crc, so its old records end the log instead of passing
//! as new ones, see [`format`](mod@format)), else one a thread zero-filled in the
//! background (`segment_zero_fill`, see `segment::Preparer`), else a plain
//! preallocated one. A free file is renamed to the next segment's name,
//! and the directory synced, on a thread of its own ahead of the rotation
//! (`segment::Adopter`), so the core does not wait for that journal commit
//! (unless it fills a whole segment before the thread is done).
//! Reuse saves the zero-fill's extra write of every
//! segment: on the 3-replica benchmark, where three WALs share one disk,
//! pre-written segments without background zeroing gave 12% more write IOPS
//! and a 4x lower p99.9 than zero-filling (docs/wal.md).
//!
//! # Hard state: meta records in the same stream
//! Term and vote are `HardState` records in the WAL itself, not a separate
//! meta file. One stream means one fsync covers "vote + entries" together
//! and their order is the order they were issued (a separate file would
//! need its own fsync and an ordering argument between two files); each
//! record is checksummed whole, so an update is atomic (old or new value,
//! never a mix); recovery takes the latest one. The purge rule counts a
//! group's latest hard-state record as live; a compaction writes it again
//! when it is older, and rewriting carries it forward, so it is never lost
//! when old segments go.
//!
//! # Disk usage stays bounded
//! A segment can be deleted once it is older than every group's pin: the
//! older of its latest hard-state record and the point where its history
//! restarts, which a compaction moves up to the record of its first live
//! entry (the compact record stores that point so recovery can skip the
//! group's older records; see the purge rule in `index`). A group that
//! compacts after its snapshots therefore frees its old segments itself.
//! One idle group would pin its old segment forever, so when the
//! directory holds more than `segments_soft_max` segments, the live
//! records of groups pinning the oldest half are rewritten into the head
//! (cold-group rewrite), after which the old segments are purged.
//!
//! # Failures
//! A failed write or fdatasync is fatal: the store refuses every later call
//! (after EIO Linux may have dropped the dirty pages, so a retried fsync can
//! report success for data that is gone). ENOSPC surfaces when a segment
//! is preallocated, before anything is written; it is fatal too (the ops
//! already accepted could not be made durable) but leaves every file intact.
//!
//! # Why hand-written
//! No library fits: tikv's raft-engine has the right layout but does
//! blocking pwrite+fsync from whichever thread leads a write group and owns
//! its threads; it cannot be embedded in a per-core io_uring event loop.
//! Other embedded logs are per-group files (one fsync per group) or KV
//! stores whose compaction would fight the raft log's append/truncate/
//! compact pattern.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::core::types::{Entry, GroupId, HardState, Index, Term};
use crate::error::Error;
use crate::storage::mem::{check_append, check_range};
use crate::storage::{GroupLogState, LogStore};

mod buf;
pub mod format;
mod handle;
mod index;
mod io;
mod recovery;
mod segment;

pub use buf::{AlignedBuf, DIRECT_ALIGN};
pub use handle::{Durable, WalHandle, WalOp};
pub use io::{probed_ring, IoBackend};
#[doc(hidden)]
pub use io::{PowerLossReport, PowerLossSim};
pub use segment::fallocate;

use format::{RecordHeader, ENTRY_ROW_LEN};
use handle::{Reply, Shared};
use index::{group_at, Cache, EntryLoc, GroupIndex};
use io::{Io, Job, SyncMode};
use recovery::Segment;
use segment::io_err;

/// Configuration; every limit is named `*_max` with its unit.
#[derive(Clone, Debug)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// Size of each segment file (preallocated).
    pub log_segment_bytes_max: u64,
    /// Bytes of operations submitted but not yet durable (queue + batch
    /// being filled + batches in flight); producers wait beyond it.
    pub append_buffer_bytes_max: usize,
    /// Bytes of recent entry data kept in memory for replication reads.
    pub entry_cache_bytes_max: usize,
    /// Largest record; bigger appends are split into several records, and
    /// one entry must fit in a record.
    pub record_bytes_max: usize,
    /// A batch is closed (and queued for writing) once it reaches this size.
    pub batch_bytes_max: usize,
    /// Above this many segment files, cold groups are rewritten to the head.
    pub segments_soft_max: usize,
    /// Bytes of cold-group data rewritten per writer pass (bounds the pause).
    pub rewrite_bytes_max: usize,
    /// `false` skips every fdatasync: for benchmarks only, never durable.
    pub raft_sync: bool,
    pub io_backend: IoBackend,
    /// Write batches through an `O_DIRECT` descriptor with `RWF_DSYNC`
    /// (4096-aligned, each batch padded to a 4096 multiple) instead of a
    /// buffered write linked to an fdatasync. Durable either way; direct
    /// I/O skips the page cache and, on an already-written block, the
    /// journal commit of an fdatasync. Falls back to buffered writes with a
    /// warning when the filesystem refuses `O_DIRECT`.
    pub direct_io: bool,
    /// With direct I/O: a background thread (idle I/O priority) zero-fills
    /// the next segment file while the current one is written, so that
    /// batch writes overwrite written blocks (no journal commit per batch);
    /// `open` zero-fills the first one before it returns. Costs the
    /// segment's size in extra disk writes; a rotation that finds the
    /// zero-filled file not ready yet uses a plain preallocated one.
    pub segment_zero_fill: bool,
    /// Purged segment files kept for reuse as later segments, at most (0 =
    /// delete them). A reused file was written all over in its earlier
    /// life, so batches overwrite written blocks like in a zero-filled one,
    /// without the zero-fill's extra writes; the sequence number in every
    /// record's crc keeps its old records from passing as new ones. The
    /// zero-fill then only runs while no purged file is at hand (a growing
    /// log, the first segments of a new store).
    pub segments_recycle_max: usize,
    /// Batches (each one write + fdatasync) on the disk at once, in
    /// `1..=format::WINDOW_MAX`. Written into every record: recovery
    /// accepts a hole only among the last this-many batches of the log.
    pub batches_in_flight_max: usize,
    /// A batch smaller than `small_batch_bytes_max` goes to the disk only
    /// while fewer than this many batches are there (capped by
    /// `batches_in_flight_max`). A flush costs about the same whatever it
    /// carries, so small batches gain more from growing while one is on
    /// the disk than from overlapping; big ones gain bandwidth from
    /// overlapping (measured in docs/wal.md).
    pub small_batches_in_flight_max: usize,
    /// See `small_batches_in_flight_max`.
    pub small_batch_bytes_max: usize,
    /// Fault injection for tests: the write of the batch after this many
    /// completed batches fails with EIO (nothing is written).
    #[doc(hidden)]
    pub inject_eio_after_batches: Option<u64>,
    /// Tests only: replace the disk by a simulation that completes batches
    /// out of order and loses power (see [`PowerLossSim`]).
    #[doc(hidden)]
    pub power_loss_sim: Option<PowerLossSim>,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            log_segment_bytes_max: 64 << 20,
            append_buffer_bytes_max: 32 << 20,
            entry_cache_bytes_max: 64 << 20,
            record_bytes_max: 1 << 20,
            batch_bytes_max: 4 << 20,
            segments_soft_max: 16,
            rewrite_bytes_max: 8 << 20,
            raft_sync: true,
            io_backend: IoBackend::Auto,
            direct_io: true,
            // Measured better on the dev VM (docs/wal.md).
            segment_zero_fill: true,
            // As many as a cold-group rewrite frees at most, so the log's
            // files stay at the high-water mark they reach anyway
            // (`segments_soft_max` plus the active one) instead of being
            // deleted and created (and zero-filled) again.
            segments_recycle_max: 16,
            // 4 measured best on the dev VM (docs/wal.md): more chains
            // mean smaller batches and more fsyncs for the same appenders.
            batches_in_flight_max: 4,
            // Measured on the dev VM (docs/wal.md): 4 KiB x 64 appenders
            // +30/-1/+14% in 3 pairs against 4 for every batch, 64 KiB
            // entries unchanged (they still use all 4).
            small_batches_in_flight_max: 2,
            small_batch_bytes_max: 256 << 10,
            inject_eio_after_batches: None,
            power_loss_sim: None,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::WalConfig { what });
        let min_record = format::record_len(ENTRY_ROW_LEN + 1);
        if self.record_bytes_max < min_record || self.record_bytes_max > format::PAYLOAD_BYTES_MAX {
            return bad(format!(
                "record_bytes_max {} must be in {min_record}..={}",
                self.record_bytes_max,
                format::PAYLOAD_BYTES_MAX
            ));
        }
        // Room for the start record, a record, the seal and direct-I/O
        // padding (see `Wal::tail_reserve`).
        if self.log_segment_bytes_max < 2 * self.record_bytes_max as u64 + 16384 {
            return bad(format!(
                "log_segment_bytes_max {} must hold two records of record_bytes_max {} plus 16384",
                self.log_segment_bytes_max, self.record_bytes_max
            ));
        }
        if self.batch_bytes_max == 0 || self.batch_bytes_max > (1 << 30) {
            return bad(format!(
                "batch_bytes_max {} must be in 1..=2^30",
                self.batch_bytes_max
            ));
        }
        if self.batches_in_flight_max == 0
            || self.batches_in_flight_max > format::WINDOW_MAX as usize
        {
            return bad(format!(
                "batches_in_flight_max {} must be in 1..={}",
                self.batches_in_flight_max,
                format::WINDOW_MAX
            ));
        }
        if self.small_batches_in_flight_max == 0 {
            return bad("small_batches_in_flight_max must be > 0".into());
        }
        if self.append_buffer_bytes_max == 0 {
            return bad("append_buffer_bytes_max must be > 0".into());
        }
        if self.segments_soft_max < 2 {
            return bad(format!(
                "segments_soft_max {} must be >= 2",
                self.segments_soft_max
            ));
        }
        Ok(())
    }
}

/// A snapshot of the store's state and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalStatus {
    /// Whether batches are fdatasync'ed (`raft_sync`).
    pub sync: bool,
    pub backend: &'static str,
    /// Whether batches go out with `O_DIRECT` + `RWF_DSYNC`.
    pub direct_io: bool,
    pub segments: usize,
    /// Bytes the segment files occupy.
    pub bytes: u64,
    pub active_segment: u64,
    pub groups: usize,
    pub cached_bytes: usize,
    pub buffered_bytes: usize,
    pub batches: u64,
    pub fsyncs: u64,
    /// Batches on the disk right now, and the most seen at once.
    pub batches_in_flight: usize,
    pub batches_in_flight_seen_max: usize,
    pub appended_entries: u64,
    pub appended_bytes: u64,
    pub rewritten_bytes: u64,
    pub purged_segments: u64,
    /// Segments started on a file zero-filled in the background.
    pub zero_filled_segments: u64,
    /// Segments started on the file of a purged one (`segments_recycle_max`).
    pub recycled_segments: u64,
    /// Purged segment files waiting for reuse.
    pub free_segments: usize,
    /// Rotations whose file a background thread had already renamed to the
    /// segment's name and made durable (no directory sync on the writer's
    /// thread; `segment::Adopter`).
    pub segments_taken_ahead: u64,
    /// A free file is being, or has been, renamed to the next segment's name
    /// that way (it is not counted in `free_segments` meanwhile).
    pub next_segment_ahead: bool,
    /// Sum over written batches of the time from handing the write to the I/O backend to
    /// reaping its completion, in microseconds (divide by `batches` for the mean): the disk's
    /// latency as the writer sees it, including the wait for the writer to notice.
    pub batch_disk_us: u64,
    /// Bytes of entries read from segment files (not from the cache), and
    /// how many of them were read with `O_DIRECT` (see `recovery::Segment`).
    pub read_bytes: u64,
    pub read_bytes_direct: u64,
    /// Torn tails cut at open: (file, offset).
    pub truncated_at_open: Vec<(PathBuf, u64)>,
    /// Why the store failed, if it did.
    pub failed: Option<String>,
}

#[derive(Default)]
struct Batch {
    /// Segment.
    seq: u64,
    /// Number within the segment (written into its records' headers).
    no: u64,
    /// Token for the I/O backend.
    id: u64,
    /// Its write (and fdatasync) finished; acknowledged once every earlier
    /// batch is done too.
    done: bool,
    /// Bytes submitted (`buf` is inside the I/O job meanwhile).
    len: u64,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: AlignedBuf,
    replies: Vec<Reply>,
    /// Producer bytes to release when the batch is durable.
    credit: usize,
    /// Stream position (total bytes encoded) at the batch's end.
    end_lsn: u64,
    /// Segments below this are unneeded once this batch is durable.
    purge_below: u64,
    /// When it was handed to the I/O backend.
    submitted_at: Option<std::time::Instant>,
}

#[derive(Default)]
struct Stats {
    batches: u64,
    /// Batches handed to the I/O backend.
    submitted: u64,
    inflight_seen_max: usize,
    fsyncs: u64,
    appended_entries: u64,
    appended_bytes: u64,
    rewritten_bytes: u64,
    purged_segments: u64,
    zero_filled_segments: u64,
    recycled_segments: u64,
    segments_taken_ahead: u64,
    /// Sum over written batches of the time from submission to the completion being reaped.
    batch_disk_us: u64,
    /// Entry bytes read from segment files, and of those read with `O_DIRECT`.
    read_bytes: u64,
    read_bytes_direct: u64,
}

/// The WAL of one core. See the module docs.
pub struct Wal {
    cfg: WalConfig,
    dir: File,
    shared: Arc<Shared>,
    io: Io,
    groups: BTreeMap<GroupId, GroupIndex>,
    segments: BTreeMap<u64, Segment>,
    /// Segment receiving `pending`.
    active: u64,
    pending: Batch,
    /// Closed batches waiting for the disk, oldest first.
    ready: VecDeque<Batch>,
    /// Batches on the disk (their buffers are inside the I/O jobs) or done
    /// but waiting for an earlier one, oldest first; at most
    /// `batches_in_flight_max`, all of the same segment.
    inflight: VecDeque<Batch>,
    spare_bufs: Vec<AlignedBuf>,
    /// Batches are written with direct I/O (`cfg.direct_io`, unless the
    /// filesystem refused it).
    direct: bool,
    /// Batches `0..acked_in_active` of the active segment are durable
    /// (stamped into each record for recovery).
    acked_in_active: u64,
    /// Total bytes encoded since open.
    lsn: u64,
    /// Stream position up to which batches completed (durable when syncing).
    done_lsn: u64,
    /// (segment, offset) written up to: cached entries below may be evicted.
    written: (u64, u64),
    cache: Cache,
    failed: Option<String>,
    stats: Stats,
    truncated_at_open: Vec<(PathBuf, u64)>,
    /// Zero-fills the next segment in the background
    /// (`segment_zero_fill`).
    preparer: Option<segment::Preparer>,
    /// A free file being renamed to the next segment's name off the
    /// writer's thread (`segment::Adopter`).
    adopter: Option<segment::Adopter>,
    /// Purged segment files kept for reuse (`segments_recycle_max`), oldest
    /// first.
    free: VecDeque<PathBuf>,
    /// Set by `close_unsealed`: drop without writing anything more.
    abandon: bool,
    /// Active segment when cold-group rewrite was last found futile.
    rewrite_futile_at: Option<u64>,
}

impl Wal {
    /// Opens (recovering whatever `cfg.dir` holds) and starts a new segment.
    pub fn open(cfg: WalConfig) -> Result<Wal, Error> {
        cfg.validate()?;
        let dir = segment::open_dir(&cfg.dir)?;
        // A zero-fill the previous session did not finish or use.
        let _ = std::fs::remove_file(cfg.dir.join(segment::PREPARED_NAME));
        let rec = recovery::recover(&cfg.dir, &dir, cfg.direct_io)?;
        let free = Self::free_files(&cfg, rec.next_seq)?;
        let io = Io::open(
            cfg.io_backend,
            cfg.batches_in_flight_max,
            cfg.power_loss_sim.clone(),
        )
        .map_err(|e| io_err("set up I/O", &cfg.dir, 0, e))?;
        if !cfg.raft_sync {
            tracing::warn!(
                dir = %cfg.dir.display(),
                "wal: raft_sync = false: fdatasync is skipped, acknowledged writes are NOT durable (benchmarks only)"
            );
        }
        tracing::info!(
            dir = %cfg.dir.display(),
            backend = io.name(),
            segments = rec.segments.len(),
            groups = rec.groups.len(),
            direct_io = cfg.direct_io,
            segment_zero_fill = cfg.direct_io && cfg.segment_zero_fill,
            "wal: opened"
        );
        let shared = Arc::new(Shared::new(cfg.append_buffer_bytes_max));
        let mut wal = Wal {
            dir,
            shared,
            io,
            groups: rec.groups,
            segments: rec.segments,
            active: rec.next_seq,
            pending: Batch::default(),
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
            spare_bufs: Vec::new(),
            direct: cfg.direct_io,
            acked_in_active: 0,
            lsn: 0,
            done_lsn: 0,
            written: (0, 0),
            cache: Cache::default(),
            failed: None,
            stats: Stats::default(),
            truncated_at_open: rec.truncated,
            abandon: false,
            preparer: None,
            adopter: None,
            free,
            rewrite_futile_at: None,
            cfg,
        };
        if wal.cfg.direct_io && wal.cfg.segment_zero_fill && wal.free.is_empty() {
            // The first segment too: a fresh store would otherwise pay a
            // journal commit per batch until its first rotation.
            let mut p = segment::Preparer::spawn(&wal.cfg.dir, wal.cfg.log_segment_bytes_max);
            p.wait();
            wal.preparer = Some(p);
        }
        if let Err(e) = wal.start_segment(rec.next_seq) {
            // Nothing of this session reached the disk: drop without sealing.
            wal.abandon = true;
            return Err(e);
        }
        wal.sync_all()?;
        Ok(wal)
    }

    /// A handle for producers (cloneable, usable from any thread).
    pub fn handle(&self) -> WalHandle {
        WalHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn status(&self) -> WalStatus {
        WalStatus {
            sync: self.cfg.raft_sync,
            backend: self.io.name(),
            direct_io: self.direct,
            segments: self.segments.len(),
            bytes: self.segments.values().map(|s| s.len).sum(),
            active_segment: self.active,
            groups: self.groups.len(),
            cached_bytes: self.cache.bytes,
            buffered_bytes: self.shared.queued_bytes(),
            batches: self.stats.batches,
            fsyncs: self.stats.fsyncs,
            batches_in_flight: self.inflight.len(),
            batches_in_flight_seen_max: self.stats.inflight_seen_max,
            appended_entries: self.stats.appended_entries,
            appended_bytes: self.stats.appended_bytes,
            rewritten_bytes: self.stats.rewritten_bytes,
            purged_segments: self.stats.purged_segments,
            zero_filled_segments: self.stats.zero_filled_segments,
            recycled_segments: self.stats.recycled_segments,
            free_segments: self.free.len(),
            segments_taken_ahead: self.stats.segments_taken_ahead,
            next_segment_ahead: self.adopter.is_some(),
            batch_disk_us: self.stats.batch_disk_us,
            read_bytes: self.stats.read_bytes,
            read_bytes_direct: self.stats.read_bytes_direct,
            truncated_at_open: self.truncated_at_open.clone(),
            failed: self.failed.clone(),
        }
    }

    /// The free segment files a previous session left (see
    /// `segments_recycle_max`): those of the configured segment size whose
    /// last life was a segment before `next_seq`, up to the limit, oldest
    /// first; the rest are deleted. A file named after `next_seq` or later
    /// (segments deleted by hand, the numbering restarted) could hold
    /// records that verify as a future segment's.
    fn free_files(cfg: &WalConfig, next_seq: u64) -> Result<VecDeque<PathBuf>, Error> {
        let mut found = Vec::new();
        let rd =
            std::fs::read_dir(&cfg.dir).map_err(|e| io_err("list directory", &cfg.dir, 0, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| io_err("list directory", &cfg.dir, 0, e))?;
            if let Some(seq) = ent.file_name().to_str().and_then(segment::parse_free_name) {
                found.push((seq, ent.path()));
            }
        }
        found.sort_unstable();
        let mut free = VecDeque::new();
        for (seq, path) in found {
            let fits = seq < next_seq
                && std::fs::metadata(&path).is_ok_and(|m| m.len() == cfg.log_segment_bytes_max);
            if fits && free.len() < cfg.segments_recycle_max {
                free.push_back(path);
            } else {
                std::fs::remove_file(&path)
                    .map_err(|e| io_err("remove free segment file", &path, 0, e))?;
            }
        }
        Ok(free)
    }

    fn check_alive(&self) -> Result<(), Error> {
        match &self.failed {
            Some(reason) => Err(Error::LogFailed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Makes the store failed: every waiter and every later call gets an
    /// error. Returns `e` for the caller to propagate.
    fn fail(&mut self, e: Error) -> Error {
        if self.failed.is_some() {
            return e;
        }
        let reason = e.to_string();
        tracing::error!(error = %reason, "wal: fatal error, the store refuses every further operation");
        self.failed = Some(reason.clone());
        let _ = self.shared.failed.set(reason.clone());
        let mk = || Error::LogFailed {
            reason: reason.clone(),
        };
        let mut batches: Vec<Batch> = self.ready.drain(..).collect();
        batches.push(std::mem::take(&mut self.pending));
        batches.extend(self.inflight.drain(..));
        for b in batches {
            for r in b.replies {
                let _ = r.send(Err(mk()));
            }
            self.shared.release(b.credit);
        }
        self.shared.fail_queued(|_| mk());
        e
    }

    // ---- encoding ----

    fn start_segment(&mut self, seq: u64) -> Result<(), Error> {
        let mut recycled = None;
        if let Some(a) = self.adopter.take() {
            if a.seq() == seq {
                let ahead = a.ready();
                recycled = a.take();
                if ahead && recycled.is_some() {
                    self.stats.segments_taken_ahead += 1;
                }
            } else {
                a.give_back();
            }
        }
        while recycled.is_none() {
            let Some(free) = self.free.pop_front() else {
                break;
            };
            recycled = segment::take_free(&self.cfg.dir, &self.dir, &free, seq);
        }
        if recycled.is_some() {
            self.stats.recycled_segments += 1;
        }
        let prepared = match (&recycled, &mut self.preparer) {
            (None, Some(p)) => p.take(&self.cfg.dir, &self.dir, seq),
            _ => None,
        };
        let zeroed = prepared.is_some();
        let prepared = recycled.or(prepared);
        let (file, path) = match prepared {
            Some(fp) => fp,
            None => segment::create(
                &self.cfg.dir,
                &self.dir,
                seq,
                self.cfg.log_segment_bytes_max,
            )?,
        };
        if zeroed {
            self.stats.zero_filled_segments += 1;
        }
        let file = Arc::new(file);
        let mut wfile = file.clone();
        if self.direct {
            match segment::open_direct(&path)? {
                Some(f) => wfile = Arc::new(f),
                None => {
                    tracing::warn!(
                        path = %path.display(),
                        "wal: the filesystem refuses O_DIRECT; writing batches buffered + fdatasync"
                    );
                    self.direct = false;
                }
            }
        }
        self.segments.insert(
            seq,
            Segment {
                path,
                file,
                rfile: self.direct.then(|| wfile.clone()),
                wfile,
                len: self.cfg.log_segment_bytes_max,
                v4: true,
            },
        );
        // The next rotation takes a purged file if one is free by then; the
        // zero-fill runs only when none is at hand now.
        self.adopt_ahead(seq + 1);
        if self.direct
            && self.cfg.segment_zero_fill
            && self.adopter.is_none()
            && self.free.is_empty()
        {
            let p = self.preparer.get_or_insert_with(|| {
                segment::Preparer::spawn(&self.cfg.dir, self.cfg.log_segment_bytes_max)
            });
            if !p.running() {
                *p = segment::Preparer::spawn(&self.cfg.dir, self.cfg.log_segment_bytes_max);
            }
        }
        self.active = seq;
        self.acked_in_active = 0;
        let buf = self.spare_bufs.pop().unwrap_or_default();
        self.pending = Batch {
            seq,
            no: 0,
            offset: 0,
            buf,
            end_lsn: self.lsn,
            ..Batch::default()
        };
        self.put(&RecordHeader::segment_start(seq), 0, |_| {})?;
        Ok(())
    }

    /// Has a free file renamed to segment `next`'s name in the background,
    /// if one is free and none is being prepared.
    fn adopt_ahead(&mut self, next: u64) {
        if self.adopter.is_some() || self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(free) = self.free.pop_front() else {
            return;
        };
        match segment::Adopter::spawn(&self.cfg.dir, &self.dir, free, next) {
            Ok(a) => self.adopter = Some(a),
            Err(free) => self.free.push_front(free),
        }
    }

    fn seal_len() -> u64 {
        format::record_len(0) as u64
    }

    /// Bytes kept free at the end of a segment for the seal and for
    /// direct-I/O padding: up to one pad before the batch holding the seal
    /// and one after it, each at most `DIRECT_ALIGN + record_len(0)`.
    fn tail_reserve(&self) -> u64 {
        let pads = if self.direct {
            2 * (DIRECT_ALIGN + format::record_len(0)) as u64
        } else {
            0
        };
        Self::seal_len() + pads
    }

    /// Encodes one record into the pending batch, moving to a new segment
    /// first if it would not fit (leaving room for the seal). Returns the
    /// segment and file offset of the payload.
    fn put(
        &mut self,
        h: &RecordHeader,
        payload_len: usize,
        payload: impl FnOnce(&mut AlignedBuf),
    ) -> Result<(u64, u64), Error> {
        self.put_inner(h, payload_len, |buf, h, seq| {
            format::encode(buf, h, seq, payload)
        })
    }

    /// [`Self::put`] with a payload that hashes itself
    /// ([`format::encode_prehashed`]).
    fn put_prehashed(
        &mut self,
        h: &RecordHeader,
        payload_len: usize,
        payload: impl FnOnce(&mut AlignedBuf) -> crc32fast::Hasher,
    ) -> Result<(u64, u64), Error> {
        self.put_inner(h, payload_len, |buf, h, seq| {
            format::encode_prehashed(buf, h, seq, payload)
        })
    }

    fn put_inner(
        &mut self,
        h: &RecordHeader,
        payload_len: usize,
        encode: impl FnOnce(&mut AlignedBuf, &RecordHeader, u64) -> usize,
    ) -> Result<(u64, u64), Error> {
        let len = format::record_len(payload_len);
        let end = self.pending.offset + self.pending.buf.len() as u64;
        if end + len as u64 + self.tail_reserve() > self.cfg.log_segment_bytes_max {
            self.rotate()?;
        }
        let start = self.pending.buf.len();
        let h = h.in_batch(
            self.pending.no,
            self.acked_in_active,
            self.cfg.batches_in_flight_max as u16,
        );
        let rel = encode(&mut self.pending.buf, &h, self.pending.seq);
        debug_assert_eq!(self.pending.buf.len() - start, len);
        self.lsn += len as u64;
        self.pending.end_lsn = self.lsn;
        Ok((self.pending.seq, self.pending.offset + (start + rel) as u64))
    }

    /// Seals the active segment and starts the next one. The sealed batch
    /// is durable before any batch of the new segment goes to the disk
    /// (`kick` waits for it).
    fn rotate(&mut self) -> Result<(), Error> {
        let seq = self.active;
        self.put_raw_seal(seq);
        self.close_pending();
        if let Err(e) = self.start_segment(seq + 1) {
            return Err(self.fail(e));
        }
        Ok(())
    }

    fn put_raw_seal(&mut self, seq: u64) {
        let h = RecordHeader::seal(seq).in_batch(
            self.pending.no,
            self.acked_in_active,
            self.cfg.batches_in_flight_max as u16,
        );
        format::encode(&mut self.pending.buf, &h, seq, |_| {});
        self.lsn += Self::seal_len();
        self.pending.end_lsn = self.lsn;
    }

    /// Moves the pending batch to the ready queue (padded to the direct-I/O
    /// alignment first, if batches are written directly).
    fn close_pending(&mut self) {
        if self.direct && !self.pending.buf.is_empty() {
            let end = self.pending.offset + self.pending.buf.len() as u64;
            let n = format::pad_len(end, DIRECT_ALIGN as u64);
            let h = RecordHeader::pad().in_batch(
                self.pending.no,
                self.acked_in_active,
                self.cfg.batches_in_flight_max as u16,
            );
            format::encode_pad(&mut self.pending.buf, &h, self.pending.seq, n as usize);
            self.lsn += n;
            self.pending.end_lsn = self.lsn;
        }
        let purge_below = self.purge_candidate();
        // A batch without bytes is never written, so its number is reused:
        // numbers on disk then count exactly the submitted batches.
        let next = Batch {
            seq: self.active,
            no: self.pending.no + (!self.pending.buf.is_empty()) as u64,
            offset: self.pending.offset + self.pending.buf.len() as u64,
            buf: self.spare_bufs.pop().unwrap_or_default(),
            end_lsn: self.lsn,
            ..Batch::default()
        };
        let mut b = std::mem::replace(&mut self.pending, next);
        b.purge_below = purge_below;
        self.ready.push_back(b);
    }

    /// The oldest segment still needed by the index as it stands now (which
    /// is exactly the state once every batch closed so far is durable).
    fn purge_candidate(&self) -> u64 {
        if self.segments.len() <= 1 {
            return 0;
        }
        self.groups
            .values()
            .map(|g| g.pin())
            .min()
            .unwrap_or(self.active)
            .min(self.active)
    }

    /// Writes `entries` as one or more records and indexes them (cached).
    fn write_entries(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), Error> {
        let mut i = 0;
        while i < entries.len() {
            let mut j = i;
            let mut payload = 0usize;
            while j < entries.len() {
                let more = ENTRY_ROW_LEN + entries[j].data.len();
                if j > i && format::record_len(payload + more) > self.cfg.record_bytes_max {
                    break;
                }
                payload += more;
                j += 1;
            }
            let chunk = &entries[i..j];
            let crcs: Vec<u32> = chunk.iter().map(|e| crc32fast::hash(&e.data)).collect();
            let (first, last) = (&chunk[0], &chunk[chunk.len() - 1]);
            let h =
                RecordHeader::entries(group, (first.index, first.term), (last.index, last.term));
            let (seq, mut off) = self.put_prehashed(&h, payload, |b| {
                let mut hasher = crc32fast::Hasher::new();
                for (e, crc) in chunk.iter().zip(&crcs) {
                    format::encode_entry_hashed(b, e.term, e.kind, &e.data, *crc, &mut hasher);
                }
                hasher
            })?;
            let mut locs = Vec::with_capacity(chunk.len());
            for (e, crc) in chunk.iter().zip(&crcs) {
                off += ENTRY_ROW_LEN as u64;
                locs.push(EntryLoc {
                    term: e.term,
                    kind: e.kind,
                    seg: seq,
                    offset: off,
                    len: e.data.len() as u32,
                    crc: *crc,
                    cached: Some(e.data.clone()),
                });
                off += e.data.len() as u64;
            }
            for (e, loc) in chunk.iter().zip(&locs) {
                self.cache.insert(group, e.index, loc);
            }
            let dropped = group_at(&mut self.groups, group, (seq, off)).append(first.index, locs);
            self.cache.dropped(dropped);
            i = j;
        }
        Ok(())
    }

    fn apply_append(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let (c, l) = self
            .groups
            .get(&group)
            .map_or((0, 0), |g| (g.compacted_index, g.last_index()));
        check_append(group, c, l, entries)?;
        let max = self.cfg.record_bytes_max;
        for e in entries {
            if format::record_len(ENTRY_ROW_LEN + e.data.len()) > max {
                return Err(Error::LogEntryTooLarge {
                    group,
                    index: e.index,
                    bytes: e.data.len(),
                    max: max - format::record_len(ENTRY_ROW_LEN),
                });
            }
        }
        self.write_entries(group, entries)?;
        self.stats.appended_entries += entries.len() as u64;
        self.stats.appended_bytes += entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
        Ok(())
    }

    fn apply_hard_state(&mut self, group: GroupId, hs: HardState) -> Result<(), Error> {
        let (seq, off) = self.put(&RecordHeader::hard_state(group, hs), 0, |_| {})?;
        group_at(&mut self.groups, group, (seq, off)).set_hard_state(hs, seq);
        Ok(())
    }

    fn apply_compact(&mut self, group: GroupId, index: Index, term: Term) -> Result<(), Error> {
        // A group the store does not know is created by the record (as a
        // snapshot install into a fresh group must survive a restart).
        if self
            .groups
            .get(&group)
            .is_some_and(|g| index <= g.compacted_index)
        {
            return Ok(());
        }
        // Where the group's history restarts: the record of the first entry
        // left after this compaction, else this record (module docs, index).
        let restart = self.groups.get(&group).and_then(|g| {
            (g.term_at(index) == Some(term))
                // The entry's table row: inside the record even when the
                // entry's data is empty.
                .then(|| {
                    g.get(index + 1)
                        .map(|e| (e.seg, e.offset - ENTRY_ROW_LEN as u64))
                })
                .flatten()
        });
        let payload = RecordHeader::restart_payload(restart);
        let (seq, off) = self.put(
            &RecordHeader::compact(group, index, term),
            payload.len(),
            |b| b.extend_from_slice(&payload),
        )?;
        let g = group_at(&mut self.groups, group, (seq, off));
        let dropped = g.compact(index, term);
        g.replay_from = restart.unwrap_or((seq, off));
        let stale_hs = g.hs_seg.filter(|&s| s < seq).map(|_| g.hard_state);
        self.cache.dropped(dropped);
        // The hard state's record would otherwise pin its old segment: write
        // it again next to the compaction point (a few bytes per snapshot).
        if let Some(hs) = stale_hs {
            self.apply_hard_state(group, hs)?;
        }
        Ok(())
    }

    fn apply_remove(&mut self, group: GroupId) -> Result<(), Error> {
        if !self.groups.contains_key(&group) {
            return Ok(());
        }
        self.put(&RecordHeader::remove(group), 0, |_| {})?;
        let g = self.groups.remove(&group).expect("checked above");
        self.cache.dropped(g.cached_bytes());
        Ok(())
    }

    fn apply(&mut self, op: &WalOp) -> Result<(), Error> {
        match op {
            WalOp::Append { group, entries } => self.apply_append(*group, entries),
            WalOp::SetHardState { group, hs } => self.apply_hard_state(*group, *hs),
            WalOp::Compact { group, index, term } => self.apply_compact(*group, *index, *term),
            WalOp::RemoveGroup { group } => self.apply_remove(*group),
        }
    }

    /// Closes the pending batch if it reached `batch_bytes_max`.
    fn maybe_close(&mut self) {
        if self.pending.buf.len() >= self.cfg.batch_bytes_max {
            self.close_pending();
        }
    }

    // ---- the writer ----

    /// One non-blocking step of the writer: reap a finished batch, drain
    /// the producers' queue into the pending batch, rewrite cold groups if
    /// needed, and put closed batches on the disk while it has free slots.
    pub fn drive(&mut self) -> Result<(), Error> {
        self.check_alive()?;
        self.reap(false)?;
        self.drain_queue()?;
        self.maybe_rewrite()?;
        self.kick()
    }

    /// Batches on the disk at most while one of `bytes` goes out.
    fn slots_for(&self, bytes: usize) -> usize {
        slots_for(&self.cfg, bytes)
    }

    /// Free disk slots for small batches, not yet claimed by closed ones
    /// (what a burst of queued requests is spread over).
    fn free_slots(&self) -> usize {
        self.slots_for(0)
            .saturating_sub(self.inflight.len() + self.ready.len())
    }

    /// Free disk slots for batches of `small_batch_bytes_max` or more.
    fn free_big_slots(&self) -> usize {
        self.slots_for(usize::MAX)
            .saturating_sub(self.inflight.len() + self.ready.len())
    }

    fn drain_queue(&mut self) -> Result<(), Error> {
        // Spread what is queued now over the free disk slots: with one
        // batch per slot the fsyncs overlap instead of one batch carrying
        // every appender while the other slots idle. Over the slots of big
        // batches when the queue holds enough for each to be big, else
        // over the small batches' slots (`small_batches_in_flight_max`).
        let queued = self.shared.queue.len();
        let big_free = self.free_big_slots();
        let big = big_free > 0
            && self.queued_request_bytes() / big_free >= self.cfg.small_batch_bytes_max;
        let free_now = |w: &Wal| {
            if big {
                w.free_big_slots()
            } else {
                w.free_slots()
            }
        };
        let free = free_now(self);
        let per_batch = if free > 1 && self.cfg.raft_sync {
            queued.div_ceil(free).max(1)
        } else {
            usize::MAX
        };
        while let Some(req) = self.shared.queue.pop() {
            match self.apply(&req.op) {
                Ok(()) => {
                    self.pending.replies.push(req.reply);
                    self.pending.credit += req.bytes;
                    if self.pending.replies.len() >= per_batch && free_now(self) > 1 {
                        self.close_pending();
                        self.kick()?;
                    } else {
                        self.maybe_close();
                    }
                }
                Err(e) => {
                    let fatal = self.failed.is_some();
                    let _ = req.reply.send(Err(e));
                    self.shared.release(req.bytes);
                    if fatal {
                        return self.check_alive();
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of the requests still in the producers' queue: everything
    /// reserved minus what the pending, closed and in-flight batches hold.
    fn queued_request_bytes(&self) -> usize {
        let held = self.pending.credit
            + self.ready.iter().map(|b| b.credit).sum::<usize>()
            + self.inflight.iter().map(|b| b.credit).sum::<usize>();
        self.shared.queued_bytes().saturating_sub(held)
    }

    /// Submits closed batches (closing the pending one first if nothing is
    /// closed) while the disk has free slots. A batch of a newer segment
    /// waits until every batch of the older one is acknowledged.
    fn kick(&mut self) -> Result<(), Error> {
        loop {
            if self.ready.is_empty() {
                if self.pending.buf.is_empty() && self.pending.replies.is_empty() {
                    return Ok(());
                }
                if self.inflight.len() >= self.slots_for(self.pending.buf.len()) {
                    return Ok(());
                }
                self.close_pending();
            }
            let front = self.ready.front().expect("non-empty");
            if front.buf.is_empty() {
                // Only no-op requests: durable as soon as everything before.
                let b = self.ready.pop_front().expect("non-empty");
                match self.inflight.back_mut() {
                    Some(last) => {
                        last.replies.extend(b.replies);
                        last.credit += b.credit;
                        last.end_lsn = b.end_lsn;
                        last.purge_below = last.purge_below.max(b.purge_below);
                    }
                    None => self.complete(b),
                }
                continue;
            }
            if self.inflight.len() >= self.slots_for(front.buf.len())
                || self.inflight.front().is_some_and(|f| f.seq != front.seq)
            {
                return Ok(());
            }
            let mut b = self.ready.pop_front().expect("non-empty");
            assert!(
                b.buf.len() <= u32::MAX as usize,
                "batch larger than one write"
            );
            let seg = self.segments.get(&b.seq).expect("batch segment exists");
            b.id = self.stats.submitted;
            b.len = b.buf.len() as u64;
            assert!(
                b.offset + b.len <= seg.len,
                "batch {}..{} beyond the end of {} ({} bytes)",
                b.offset,
                b.offset + b.len,
                seg.path.display(),
                seg.len
            );
            let sync = match (self.cfg.raft_sync, self.direct) {
                (false, _) => SyncMode::None,
                (true, false) => SyncMode::Fdatasync,
                (true, true) => SyncMode::Dsync,
            };
            if self.direct {
                let a = DIRECT_ALIGN as u64;
                assert!(
                    b.offset.is_multiple_of(a) && b.len.is_multiple_of(a),
                    "direct batch {}+{} not aligned",
                    b.offset,
                    b.len
                );
            }
            let job = Job {
                id: b.id,
                file: seg.wfile.clone(),
                path: seg.path.clone(),
                offset: b.offset,
                buf: std::mem::take(&mut b.buf),
                sync,
            };
            let path = seg.path.clone();
            let offset = b.offset;
            b.submitted_at = Some(std::time::Instant::now());
            self.inflight.push_back(b);
            self.stats.inflight_seen_max = self.stats.inflight_seen_max.max(self.inflight.len());
            if self.cfg.inject_eio_after_batches == Some(self.stats.submitted) {
                let e = std::io::Error::from_raw_os_error(libc::EIO);
                return Err(self.fail(io_err("write (injected)", &path, offset, e)));
            }
            self.stats.submitted += 1;
            if let Err(e) = self.io.submit(job) {
                return Err(self.fail(io_err("submit write", &path, offset, e)));
            }
        }
    }

    /// Handles finished batches (waiting for one with `block` if any is in
    /// flight) and acknowledges, in order, every batch whose predecessors
    /// are all done.
    fn reap(&mut self, block: bool) -> Result<(), Error> {
        let mut block = block;
        while !self.inflight.is_empty() {
            let done = match self.io.poll(block) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    let p = self.cfg.dir.clone();
                    return Err(self.fail(io_err("wait for I/O completion", &p, 0, e)));
                }
            };
            block = false;
            if let Err((op, e)) = done.result {
                let err = io_err(op, &done.job.path, done.job.offset, e);
                return Err(self.fail(err));
            }
            let mut buf = done.job.buf;
            buf.clear();
            if self.spare_bufs.len() <= self.cfg.batches_in_flight_max {
                self.spare_bufs.push(buf);
            }
            self.stats.fsyncs += self.cfg.raft_sync as u64;
            if let Some(b) = self.inflight.iter_mut().find(|b| b.id == done.job.id) {
                b.done = true;
                if let Some(t) = b.submitted_at {
                    self.stats.batch_disk_us += t.elapsed().as_micros() as u64;
                }
            }
            while self.inflight.front().is_some_and(|b| b.done) {
                let b = self.inflight.pop_front().expect("checked");
                self.written = (b.seq, b.offset + b.len);
                if b.seq == self.active {
                    self.acked_in_active = b.no + 1;
                }
                self.complete(b);
            }
        }
        Ok(())
    }

    fn complete(&mut self, b: Batch) {
        debug_assert!(b.end_lsn >= self.done_lsn);
        self.done_lsn = b.end_lsn;
        self.stats.batches += 1;
        for r in b.replies {
            let _ = r.send(Ok(()));
        }
        self.shared.release(b.credit);
        self.cache.evict(
            &mut self.groups,
            self.cfg.entry_cache_bytes_max,
            self.written,
        );
        self.purge(b.purge_below);
    }

    /// Deletes segments below `below` (never the active one), keeping up to
    /// `segments_recycle_max` of their files for reuse.
    fn purge(&mut self, below: u64) {
        let below = below.min(self.active);
        let old: Vec<u64> = self.segments.range(..below).map(|(s, _)| *s).collect();
        if old.is_empty() {
            return;
        }
        for seq in old {
            let seg = self.segments.remove(&seq).expect("listed");
            // Only whole files of this format: a torn tail cut at recovery
            // shortened its file, and records of format 3 carry no
            // sequence number to tell an old life from a new one.
            if seg.v4
                && seg.len == self.cfg.log_segment_bytes_max
                && self.free.len() < self.cfg.segments_recycle_max
            {
                match segment::make_free(&self.cfg.dir, &seg.path, seq) {
                    Ok(p) => {
                        self.free.push_back(p);
                        self.stats.purged_segments += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(path = %seg.path.display(), error = %e, "wal: cannot keep a purged segment for reuse; deleting it");
                    }
                }
            }
            if let Err(e) = std::fs::remove_file(&seg.path) {
                // Not a durability problem: the file only holds dead
                // records. Keep it and try again on the next purge.
                tracing::warn!(path = %seg.path.display(), error = %e, "wal: cannot delete purged segment");
                self.segments.insert(seq, seg);
                break;
            }
            self.stats.purged_segments += 1;
        }
        if self.failed.is_none() {
            self.adopt_ahead(self.active + 1);
        }
        // No directory fsync here: it would stall the core for a journal
        // commit at every rotation (3-replica benchmark, 2 pairs: write p99.9
        // 10.8-12.5 ms without it, 13.7-14.6 ms with it).
        // A crash that loses these renames and unlinks brings back sealed
        // segments holding only dead records, which recovery replays
        // harmlessly (ext4 commits them in order, so what survives is a
        // contiguous run of old segments); a free file is made durable under
        // its new name by `take_free` before anything is written into it.
    }

    /// Rewrites groups that pin the oldest segments into the head, each as
    /// one `GroupImage` record, so those segments can be purged.
    fn maybe_rewrite(&mut self) -> Result<(), Error> {
        if self.segments.len() <= self.cfg.segments_soft_max
            || self.rewrite_futile_at == Some(self.active)
        {
            return Ok(());
        }
        // Rewriting only brings the segment count down when the live data
        // fits well under the soft limit. Above it (groups that do not
        // compact), every pass would rewrite everything into new segments
        // that push the count over the limit again: an endless rewrite
        // storm. Check again once the writer moved to a new segment.
        let live: u64 = self
            .groups
            .values()
            .flat_map(|g| g.entries.iter())
            .map(|e| e.len as u64 + ENTRY_ROW_LEN as u64)
            .sum();
        let room = (self.cfg.segments_soft_max / 2) as u64 * self.cfg.log_segment_bytes_max;
        if live > room {
            self.rewrite_futile_at = Some(self.active);
            tracing::warn!(
                live_bytes = live,
                segments = self.segments.len(),
                segments_soft_max = self.cfg.segments_soft_max,
                "wal: live entries exceed half the segment soft limit; cold-group rewrite skipped (it cannot reduce the segment count) until groups compact"
            );
            return Ok(());
        }
        let keep = (self.cfg.segments_soft_max / 2) as u64;
        let threshold = self.active.saturating_sub(keep);
        let mut cold: Vec<(u64, GroupId)> = self
            .groups
            .iter()
            .map(|(g, gi)| (gi.pin(), *g))
            .filter(|&(p, _)| p < threshold)
            .collect();
        cold.sort_unstable();
        let mut budget = self.cfg.rewrite_bytes_max;
        for (_, g) in cold {
            let before = self.lsn;
            self.rewrite_group(g)?;
            let wrote = (self.lsn - before) as usize;
            self.stats.rewritten_bytes += wrote as u64;
            if wrote >= budget {
                break;
            }
            budget -= wrote;
        }
        Ok(())
    }

    /// Largest `GroupImage` record: it must fit in a fresh segment.
    fn image_bytes_max(&self) -> usize {
        (self.cfg.log_segment_bytes_max / 2) as usize
    }

    /// Writes `group`'s whole state (hard state, compaction point, every live
    /// entry) as one record that replaces everything before it at replay.
    /// One record, so a crash leaves either the old history or the image,
    /// never a half-reset group.
    fn rewrite_group(&mut self, group: GroupId) -> Result<(), Error> {
        let gi = &self.groups[&group];
        let (hs, ci, ct, last) = (
            gi.hard_state,
            gi.compacted_index,
            gi.compacted_term,
            gi.last_index(),
        );
        let payload = format::entries_payload_len(gi.entries.iter().map(|e| e.len as usize));
        if format::record_len(payload) > self.image_bytes_max() {
            // Stays pinned until raft compacts it; the soft limit is soft.
            tracing::warn!(
                group,
                bytes = payload,
                max = self.image_bytes_max(),
                "wal: group's live log is too large to rewrite; it pins old segments until compacted"
            );
            return Ok(());
        }
        let entries = self.read(group, ci + 1, last + 1)?;
        let crcs: Vec<u32> = entries.iter().map(|e| crc32fast::hash(&e.data)).collect();
        let h = RecordHeader::image(group, (ci, ct), last, hs);
        let (seq, mut off) = self.put(&h, payload, |b| {
            for (e, crc) in entries.iter().zip(&crcs) {
                format::encode_entry(b, e.term, e.kind, &e.data, *crc);
            }
        })?;
        let old = self.groups.remove(&group).expect("exists");
        self.cache.dropped(old.cached_bytes());
        let mut g = GroupIndex::image((seq, off), hs, (ci, ct));
        for (e, crc) in entries.iter().zip(&crcs) {
            off += ENTRY_ROW_LEN as u64;
            let loc = EntryLoc {
                term: e.term,
                kind: e.kind,
                seg: seq,
                offset: off,
                len: e.data.len() as u32,
                crc: *crc,
                cached: Some(e.data.clone()),
            };
            self.cache.insert(group, e.index, &loc);
            g.entries.push_back(loc);
            off += e.data.len() as u64;
        }
        self.groups.insert(group, g);
        if hs.disk != 0 {
            // The image's header has no room for the disk id: a hard-state record right after it
            // carries it. Should a crash keep the image and lose that record, the replica comes
            // back with no disk id, draws a new one and is rebuilt: wasteful, never unsafe.
            self.apply_hard_state(group, hs)?;
        }
        Ok(())
    }

    /// Puts everything pending on the disk and waits until it is durable.
    fn sync_all(&mut self) -> Result<(), Error> {
        self.check_alive()?;
        let target = self.lsn;
        loop {
            self.kick()?;
            if self.done_lsn >= target
                && self.inflight.is_empty()
                && self.ready.is_empty()
                && self.pending.replies.is_empty()
            {
                return Ok(());
            }
            self.reap(true)?;
        }
    }

    /// Keeps the owner path within `append_buffer_bytes_max`: writes out
    /// closed batches and waits while too much is unwritten.
    fn owner_backpressure(&mut self) -> Result<(), Error> {
        self.reap(false)?;
        if !self.ready.is_empty() {
            self.kick()?;
        }
        while self.lsn - self.done_lsn > self.cfg.append_buffer_bytes_max as u64 {
            if self.ready.is_empty() {
                self.close_pending();
            }
            self.kick()?;
            self.reap(true)?;
        }
        Ok(())
    }

    // ---- reading ----

    fn read(&mut self, group: GroupId, lo: Index, hi: Index) -> Result<Vec<Entry>, Error> {
        /// Largest single pread when coalescing neighbouring entries.
        const READ_SPAN_BYTES_MAX: u64 = 4 << 20;
        /// Spans at least this long are read with `O_DIRECT` (when batches
        /// are written so): a restart reading a group's whole log ran 4x
        /// faster so. Shorter ones stay buffered: reading every small span
        /// from the disk made the conformance suite, which reads many
        /// small ranges over and over, 2.2x slower than the page cache did.
        const DIRECT_READ_BYTES_MIN: u64 = 256 << 10;
        let g = self
            .groups
            .get(&group)
            .ok_or(Error::LogUnknownGroup { group })?;
        check_range(group, g.compacted_index, g.last_index(), lo, hi)?;
        let mut out = Vec::with_capacity((hi - lo) as usize);
        let mut i = lo;
        while i < hi {
            let loc = g.get(i).expect("in range");
            if let Some(data) = &loc.cached {
                out.push(Entry {
                    index: i,
                    term: loc.term,
                    kind: loc.kind,
                    data: data.clone(),
                });
                i += 1;
                continue;
            }
            debug_assert!((loc.seg, loc.offset) < self.written || self.written == (0, 0));
            let (seg_no, start) = (loc.seg, loc.offset);
            let mut end = start + loc.len as u64;
            let mut j = i + 1;
            while j < hi {
                let l = g.get(j).expect("in range");
                if l.cached.is_some()
                    || l.seg != seg_no
                    || l.offset < end
                    || l.offset + l.len as u64 - start > READ_SPAN_BYTES_MAX
                {
                    break;
                }
                end = l.offset + l.len as u64;
                j += 1;
            }
            let seg = self
                .segments
                .get(&seg_no)
                .expect("live entries' segments are never purged");
            let buf = match (&seg.rfile, self.direct) {
                (Some(f), true) if end - start >= DIRECT_READ_BYTES_MIN => {
                    self.stats.read_bytes_direct += end - start;
                    read_direct(f, &seg.path, start, end)?
                }
                _ => {
                    let mut buf = vec![0u8; (end - start) as usize];
                    seg.file
                        .read_exact_at(&mut buf, start)
                        .map_err(|e| io_err("read entries", &seg.path, start, e))?;
                    Bytes::from(buf)
                }
            };
            self.stats.read_bytes += end - start;
            for k in i..j {
                let l = g.get(k).expect("in range");
                let from = (l.offset - start) as usize;
                let data = buf.slice(from..from + l.len as usize);
                if crc32fast::hash(&data) != l.crc {
                    return Err(Error::WalCorrupt {
                        path: seg.path.clone(),
                        offset: l.offset,
                        reason: format!("entry data crc mismatch (group {group}, index {k})"),
                    });
                }
                out.push(Entry {
                    index: k,
                    term: l.term,
                    kind: l.kind,
                    data,
                });
            }
            i = j;
        }
        Ok(out)
    }

    // ---- shutdown ----

    /// Writes everything pending, seals the active segment and syncs.
    pub fn close(mut self) -> Result<(), Error> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), Error> {
        self.shared.closed.store(true, Ordering::Release);
        self.drain_queue()?;
        self.check_alive()?;
        let seq = self.active;
        self.put_raw_seal(seq);
        let r = self.sync_all();
        self.abandon = true;
        if let Some(a) = self.adopter.take() {
            a.give_back();
        }
        r
    }

    /// Drops the store as a crash would: whatever is not yet on the disk is
    /// lost and the active segment stays unsealed (recovery then cuts its
    /// tail). Batches already on the disk are waited for, since their
    /// buffers must outlive the kernel's use of them. For crash tests.
    pub fn close_unsealed(mut self) {
        self.abandon = true;
    }

    /// Path of the directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Sequence numbers of the segment files, oldest first.
    pub fn segment_seqs(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// Waiting for the writer: see [`WalWaiter`]. Needs a tokio runtime
    /// with I/O enabled.
    pub fn waiter(&self) -> Result<WalWaiter, Error> {
        // SAFETY: dup of a descriptor we own; the result is owned by the
        // waiter, so its lifetime does not depend on the backend's.
        let fd = unsafe { libc::dup(self.io.event_fd()) };
        if fd < 0 {
            return Err(io_err(
                "dup eventfd",
                &self.cfg.dir,
                0,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh descriptor from dup.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `owned` is a valid descriptor owned by the AsyncFd for its
        // whole lifetime, and `as_raw_fd` of an OwnedFd never changes.
        let efd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io_err("register eventfd", &self.cfg.dir, 0, e.into_parts().1))?;
        Ok(WalWaiter {
            shared: self.shared.clone(),
            efd,
        })
    }
}

/// Reads `start..end` of a segment through its `O_DIRECT` descriptor:
/// whole 4096-byte blocks into an aligned buffer, the range sliced out of
/// it (the blocks around the range belong to durable batches or padding: a
/// direct-I/O batch never shares a block with another).
fn read_direct(f: &File, path: &Path, start: u64, end: u64) -> Result<Bytes, Error> {
    let first = start / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
    let mut buf = AlignedBuf::default();
    segment::read_blocks(f, path, "read entries", &mut buf, first, end, end)?;
    let from = (start - first) as usize;
    Ok(Bytes::from_owner(buf).slice(from..from + (end - start) as usize))
}

/// Batches on the disk at most while one of `bytes` goes out: small ones
/// wait for `small_batches_in_flight_max` (see [`WalConfig`]).
fn slots_for(cfg: &WalConfig, bytes: usize) -> usize {
    if bytes < cfg.small_batch_bytes_max {
        cfg.small_batches_in_flight_max
            .min(cfg.batches_in_flight_max)
    } else {
        cfg.batches_in_flight_max
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if !self.abandon && self.failed.is_none() {
            if let Err(e) = self.close_inner() {
                tracing::error!(error = %e, "wal: closing cleanly failed");
            }
        }
        self.shared.closed.store(true, Ordering::Release);
        // The kernel may still be using the in-flight buffers.
        while self.io.busy() {
            if self.io.poll(true).is_err() {
                break;
            }
        }
        self.shared.fail_queued(|group| Error::WalClosed { group });
        let mut rest: Vec<Batch> = self.ready.drain(..).collect();
        rest.push(std::mem::take(&mut self.pending));
        for b in rest {
            for r in b.replies {
                let _ = r.send(Err(Error::WalClosed { group: 0 }));
            }
            self.shared.release(b.credit);
        }
    }
}

/// Lets an async writer loop sleep until there is work: a producer queued
/// something, or the disk finished a batch.
pub struct WalWaiter {
    shared: Arc<Shared>,
    efd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl WalWaiter {
    pub async fn wait(&self) {
        tokio::select! {
            _ = self.shared.wake_writer.notified() => {}
            r = self.efd.readable() => {
                if let Ok(mut guard) = r {
                    io::drain_event_fd(self.efd.get_ref().as_raw_fd());
                    guard.clear_ready();
                }
            }
        }
    }
}

/// The writer loop for a tokio `current_thread` runtime (with I/O enabled)
/// on the core: drives `wal` until [`WalHandle::shutdown`] was called and
/// everything queued is durable, or until a fatal error. `wal` stays
/// usable by other tasks (reads, `status`) between steps.
pub async fn run(wal: Rc<RefCell<Wal>>) -> Result<(), Error> {
    let waiter = wal.borrow().waiter()?;
    loop {
        {
            let mut w = wal.borrow_mut();
            w.drive()?;
            if w.shared.shutdown.load(Ordering::Acquire)
                && w.shared.queue.is_empty()
                && w.inflight.is_empty()
                && w.ready.is_empty()
                && w.pending.replies.is_empty()
                && w.lsn == w.done_lsn
            {
                return Ok(());
            }
        }
        waiter.wait().await;
    }
}

impl LogStore for Wal {
    type Error = Error;

    fn append(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), Error> {
        self.check_alive()?;
        self.apply_append(group, entries)?;
        self.maybe_close();
        self.owner_backpressure()
    }

    fn set_hard_state(&mut self, group: GroupId, hs: HardState) -> Result<(), Error> {
        self.check_alive()?;
        self.apply_hard_state(group, hs)?;
        self.owner_backpressure()
    }

    fn compact(&mut self, group: GroupId, index: Index, term: Term) -> Result<(), Error> {
        self.check_alive()?;
        self.apply_compact(group, index, term)?;
        self.owner_backpressure()
    }

    fn remove_group(&mut self, group: GroupId) -> Result<(), Error> {
        self.check_alive()?;
        self.apply_remove(group)?;
        self.owner_backpressure()
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.check_alive()?;
        self.reap(false)?;
        self.drain_queue()?;
        self.maybe_rewrite()?;
        self.sync_all()
    }

    fn group_state(&self, group: GroupId) -> Option<GroupLogState> {
        self.groups.get(&group).map(|g| GroupLogState {
            hard_state: g.hard_state,
            compacted_index: g.compacted_index,
            compacted_term: g.compacted_term,
            last_index: g.last_index(),
        })
    }

    fn groups(&self) -> Vec<GroupId> {
        self.groups.keys().copied().collect()
    }

    fn entries(&mut self, group: GroupId, lo: Index, hi: Index) -> Result<Vec<Entry>, Error> {
        self.check_alive()?;
        self.read(group, lo, hi)
    }
}
