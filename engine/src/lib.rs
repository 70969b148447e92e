//! bd's thread-per-core engine: it owns the raft groups (block groups, "BGs") of a node and
//! their block state machines, and runs them on one pinned thread per core.
//!
//! # What it owns
//! - `cores` threads, each with a tokio `current_thread` runtime (`core`), one WAL
//!   (`data_dir/core-N/wal`, [`raftlog::wal`]), one QUIC endpoint (core-0 port + N), and the BGs
//!   with `id % cores == N`: their [`raftlog::core::RaftNode`]s and data files
//!   (`data_dir/core-N/bg-<id>.data`, meta in `bg-<id>.meta`, see [`block`]).
//! - Nothing is shared between cores: requests reach a core through its bounded queue
//!   (`request_queue_max`), peers reach it through its own endpoint (core N talks to core N of
//!   every peer, so every node of a cluster runs the same number of cores).
//!
//! # Write path
//! NBD client → `server` (NBD connection task) → [`BgHandle::write`] → the owning core's queue →
//! leader: `RaftNode::propose` (one entry per `entry_data_bytes_max`); follower: forwarded to the
//! leader's same core over QUIC ([`codec`]) → `ready()` → WAL append (group commit with every
//! other BG of the core) and AppendEntries to the followers (one frame per peer per flush) →
//! committed on a majority's fsynced WAL → applied to the data file (a buffered `pwrite` on the
//! core thread while the machine's dirty pages are low, `core/inline.rs`, else a write on the
//! core's io_uring, [`dataio`]; overlapping applies in log order, `block::Applier`) → the reply
//! once that apply completed.
//!
//! # Read path
//! [`BgHandle::read`] → the owning core → leader: `lease_read` (ReadIndex when the lease is not
//! valid) → once every entry through the read index completed its apply, a read of the data
//! file on the core's io_uring → reply (follower: forwarded,
//! the leader's data comes back in the response frame).
//!
//! # Hibernation
//! A group idle for `hibernate_idle_ms` stops ticking and heartbeating on every replica until
//! activity wakes it; failure detection is then per peer node, not per group (`core/hibernate.rs`).
//!
//! # Durability
//! A write is acknowledged only after it is committed (in the fsynced WAL of a majority) and
//! applied on the leader, so FLUSH and FUA have nothing left to do. Data files are synced lazily,
//! at snapshots (off the core thread, on tokio's blocking pool; the WAL is compacted only once
//! that sync and the meta write are durable); until then the WAL holds the entries, and a
//! restart re-applies them from the snapshot index (applies are idempotent overwrites).

pub mod block;
pub mod codec;
pub mod config;
mod core;
pub mod dataio;
pub mod error;
pub mod snapshot;
pub mod status;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use raftlog::core::{GroupId, Index, NodeId};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

pub use block::BlockOp;
pub use config::{BgSpec, EngineConfig};
pub use core::PeerChange;
pub use error::{Error, ErrorKind, Result};
pub use status::{BgStatus, CoreStat, LinkStat, PeerStat};

use crate::core::{ClientOp, CoreCtx, CoreRequest};
use crate::status::CoreCounters;

/// A running engine. Dropping it without [`Engine::shutdown`] leaves the core threads running
/// until the process exits (their request queues stay open through the [`BgHandle`]s).
pub struct Engine {
    cfg: Arc<EngineConfig>,
    cores: Vec<mpsc::Sender<CoreRequest>>,
    /// Each core thread's runtime, for tasks that should live next to a core's groups.
    runtimes: Vec<tokio::runtime::Handle>,
    counters: Vec<Arc<CoreCounters>>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    failed: watch::Receiver<Option<String>>,
}

impl Engine {
    /// Validates `cfg`, starts every core and waits until each has recovered its WAL and groups
    /// and bound its endpoint. Call from outside any core (e.g. the server's main runtime; this
    /// blocks the calling thread while the cores start).
    pub fn start(cfg: EngineConfig) -> Result<Engine> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| Error::File {
            bg: 0,
            path: cfg.data_dir.clone(),
            op: "create data directory",
            offset: 0,
            source,
        })?;
        let (fail_tx, failed) = watch::channel(None);
        let fail_tx = Arc::new(fail_tx);
        let mut cores = Vec::new();
        let mut runtimes = Vec::new();
        let mut counters = Vec::new();
        let mut threads = Vec::new();
        let mut starts = Vec::new();
        for core in 0..cfg.cores {
            let (tx, rx) = mpsc::channel(cfg.request_queue_max);
            let (started_tx, started_rx) = oneshot::channel();
            let core_counters = Arc::new(CoreCounters::default());
            counters.push(core_counters.clone());
            let ctx = CoreCtx {
                core,
                cfg: cfg.clone(),
                requests: rx,
                started: started_tx,
                counters: core_counters,
            };
            let pin = cfg.pin_cores;
            let fail_tx = fail_tx.clone();
            // Built here rather than on the thread so that its handle is known before the core
            // runs: front ends spawn connection tasks onto it (`BgHandle::home`).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Thread { core, source })?;
            runtimes.push(rt.handle().clone());
            let t = std::thread::Builder::new()
                .name(format!("bd-core-{core}"))
                .spawn(move || {
                    if pin {
                        pin_to_cpu(core);
                    }
                    let local = tokio::task::LocalSet::new();
                    if let Err(e) = local.block_on(&rt, core::run(ctx)) {
                        let _ = fail_tx.send(Some(e.to_string()));
                    }
                })
                .map_err(|source| Error::Thread { core, source })?;
            cores.push(tx);
            threads.push(t);
            starts.push(started_rx);
        }
        let engine = Engine {
            cfg,
            cores,
            runtimes,
            counters,
            threads: std::sync::Mutex::new(threads),
            failed,
        };
        for (core, rx) in starts.into_iter().enumerate() {
            let r = rx.blocking_recv().unwrap_or_else(|_| {
                Err(Error::Config {
                    what: format!("core {core} exited during startup"),
                })
            });
            if let Err(e) = r {
                engine.stop_threads();
                return Err(e);
            }
        }
        info!(
            node = engine.cfg.node_id,
            cores = engine.cfg.cores,
            bgs = engine.cfg.bgs.len(),
            "engine started"
        );
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// A handle on block group `bg` for the NBD front end (cheap to clone, `Send`).
    pub fn bg(&self, bg: GroupId) -> Option<BgHandle> {
        let spec = self.cfg.bgs.iter().find(|b| b.id == bg)?;
        let core = self.cfg.core_of(bg);
        Some(BgHandle {
            bg,
            core,
            size: spec.size_bytes,
            tx: self.cores[core].clone(),
            home: self.runtimes[core].clone(),
        })
    }

    /// Status of every block group, ordered by id.
    pub async fn status(&self) -> Vec<BgStatus> {
        let mut out = self.ask_every_core(CoreRequest::Status).await;
        out.sort_by_key(|s| s.bg);
        out
    }

    /// Sends `request` to every core in turn and concatenates the answers; a core that has
    /// stopped contributes nothing.
    async fn ask_every_core<T>(
        &self,
        request: impl Fn(oneshot::Sender<Vec<T>>) -> CoreRequest,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for tx in &self.cores {
            let (reply, rx) = oneshot::channel();
            if tx.send(request(reply)).await.is_ok() {
                if let Ok(v) = rx.await {
                    out.extend(v);
                }
            }
        }
        out
    }

    /// Every core's QUIC connection to every peer node, ordered by core then peer.
    pub async fn links(&self) -> Vec<LinkStat> {
        self.ask_every_core(CoreRequest::Links).await
    }

    /// Per core: what it sent to its peers and how many of its groups hibernate.
    pub fn core_stats(&self) -> Vec<CoreStat> {
        self.counters
            .iter()
            .enumerate()
            .map(|(core, c)| c.stat(core))
            .collect()
    }

    /// Takes a snapshot of `bg` now (on demand); returns its index.
    pub async fn snapshot(&self, bg: GroupId) -> Result<Index> {
        let h = self.bg(bg).ok_or(Error::UnknownBg { bg })?;
        let (reply, rx) = oneshot::channel();
        h.tx.send(CoreRequest::Snapshot { bg, reply })
            .await
            .map_err(|_| h.gone())?;
        rx.await.map_err(|_| h.gone())?
    }

    /// Starts handing `bg`'s leadership to `to` (None: the most up-to-date other voter), as
    /// braft's `transfer_leader`; returns the target. This node must be the leader
    /// (`Error::Raft` with `raftlog::Error::NotLeader` names the leader it knows otherwise).
    /// The transfer completes asynchronously: the target campaigns once it has the whole log,
    /// and the leader resumes if no election happened within an election timeout.
    pub async fn transfer_leader(&self, bg: GroupId, to: Option<NodeId>) -> Result<NodeId> {
        let h = self.bg(bg).ok_or(Error::UnknownBg { bg })?;
        let (reply, rx) = oneshot::channel();
        h.tx.send(CoreRequest::TransferLeader { bg, to, reply })
            .await
            .map_err(|_| h.gone())?;
        rx.await.map_err(|_| h.gone())?
    }

    /// Starts a membership change of `bg` (braft's add_peer / remove_peer), held here as its
    /// leader. `Ok(true)`: the change runs (a new peer first catches up on the log, then the
    /// configuration entry commits; `BgStatus::voters` shows the result, `conf_changing` that it
    /// runs. The catch-up fails after `catchup_timeout_ticks` of no snapshot on its way to the
    /// peer if it never catches up); `Ok(false)`: the configuration
    /// is already the requested one. A peer to add must be this node or one of its `peers`,
    /// and hold the group (a replica declared with `join` on that node).
    pub async fn change_peers(&self, bg: GroupId, change: PeerChange) -> Result<bool> {
        let h = self.bg(bg).ok_or(Error::UnknownBg { bg })?;
        let (reply, rx) = oneshot::channel();
        h.tx.send(CoreRequest::ChangePeers { bg, change, reply })
            .await
            .map_err(|_| h.gone())?;
        rx.await.map_err(|_| h.gone())?
    }

    /// Resolves with a message when a core stops on a fatal error (e.g. a failed WAL fsync).
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    /// Stops every core: in-flight requests fail with `ShuttingDown`, the WAL drains, data files
    /// are synced. Blocks until the threads have exited (call it outside any async context, e.g.
    /// from `spawn_blocking`). Calling it again does nothing.
    pub fn shutdown(&self) {
        self.stop_threads();
    }

    fn stop_threads(&self) {
        for tx in &self.cores {
            // The queue may be full of client requests: keep trying for a while (the core
            // drains it), then give up on that core rather than hang the shutdown.
            let mut msg = CoreRequest::Shutdown;
            for _ in 0..200 {
                match tx.try_send(msg) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
        let threads: Vec<JoinHandle<()>> = match self.threads.lock() {
            Ok(mut t) => t.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        for t in threads {
            if t.join().is_err() {
                error!("a core thread panicked");
            }
        }
    }
}

fn pin_to_cpu(core: usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it; sched_setaffinity
    // reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        warn!(core, error = %std::io::Error::last_os_error(), "could not pin core thread (continuing unpinned)");
    }
}

/// A block group as the NBD front end sees it. Every call goes through the owning core's
/// bounded queue and waits for the answer; the core retries internally (leader changes,
/// forwarding) until `request_timeout_ms`.
#[derive(Clone)]
pub struct BgHandle {
    bg: GroupId,
    core: usize,
    size: u64,
    tx: mpsc::Sender<CoreRequest>,
    home: tokio::runtime::Handle,
}

impl BgHandle {
    pub fn id(&self) -> GroupId {
        self.bg
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The runtime of the core thread that owns this group. A task spawned on it reaches the
    /// group without crossing threads: its requests and their replies are a local queue push and
    /// a local wake instead of two cross-thread wake-ups, which is most of the cost of a small
    /// request. Its tasks stop when the core stops.
    pub fn home(&self) -> &tokio::runtime::Handle {
        &self.home
    }

    fn gone(&self) -> Error {
        Error::ShuttingDown {
            bg: self.bg,
            core: self.core,
        }
    }

    async fn call(&self, op: ClientOp) -> Result<Bytes> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CoreRequest::Client {
                bg: self.bg,
                op,
                reply,
            })
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Linearizable read of `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.call(ClientOp::Read { offset, len }).await
    }

    /// Returns once the write is committed and applied on the leader.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.call(ClientOp::Op(BlockOp::Write { offset, data }))
            .await
            .map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        self.call(ClientOp::Op(BlockOp::Trim { offset, len }))
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<()> {
        self.call(ClientOp::Op(BlockOp::WriteZeroes {
            offset,
            len,
            may_trim,
        }))
        .await
        .map(|_| ())
    }

    /// Every acknowledged write is already durable on a majority; this only orders the flush
    /// after the requests queued before it on the core.
    pub async fn flush(&self) -> Result<()> {
        self.call(ClientOp::Flush).await.map(|_| ())
    }
}

/// How long a caller should wait at most for one request (the core's own retry budget plus a
/// margin), for front ends that want their own timeout.
pub fn request_deadline(cfg: &EngineConfig) -> Duration {
    Duration::from_millis(cfg.request_timeout_ms + 2 * cfg.forward_timeout_ms)
}
