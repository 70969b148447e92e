//! One core: a thread with a tokio `current_thread` runtime that owns a WAL, a transport
//! endpoint, and the raft nodes and data files of the block groups hashed to it. Nothing here is
//! shared with other threads except the bounded request queue and the transport's channels.
//!
//! # The loop
//! Each iteration waits for one input — a durability completion, a client request, a frame from
//! a peer or the tick — then drains whatever else is already queued (bounded per iteration), and
//! flushes: for every group touched, `ready()` is drained: writes go to the WAL (all writes of the
//! iteration are queued before any is awaited, so the WAL commits them as one group), messages go
//! to a per-peer outbox, committed entries are applied to the data file, events are handled. At
//! the end the outbox is sent as one frame per peer and lane (the heartbeats of every group of
//! the core in one frame).
//!
//! # Durability
//! A single watcher task awaits the WAL completions in submission order and reports
//! `(group, seq)` back to the loop, which calls `on_write_durable(seq)`. The WAL is one ordered
//! stream, so a completion implies every earlier write of every group is durable too; that is
//! also why a write with nothing to persist (only held messages) may be reported once the
//! writes queued before it are.
//!
//! # Data-file I/O
//! Committed entries go to the group's `block::Applier`; `pump` starts the applies that may
//! start (no overlap with one in flight, log order) on the core's data ring (`dataio`), or
//! writes buffered ones right away on this thread while that cannot stall it (`inline`), and
//! `reap_data` handles completions: a finished apply answers its client and may advance the
//! group's applied index, which releases reads (also submitted to the ring) and bounds
//! snapshots. A received snapshot is installed off the thread once the group's applies drained
//! (LOADING); see `install_snapshot`.
//!
//! # Client requests
//! A request enters on the core that owns its group. The leader executes it: a block op is
//! proposed (split into entries of at most `entry_data_bytes_max`) and answered when every entry
//! is applied with the term it was proposed in; a read asks for `lease_read` (ReadIndex when the
//! lease is not valid), waits until the group applied that index, then reads. A follower
//! forwards the request to the leader's same core over the transport (`codec::ForwardRequest`);
//! the leader answers with a `ForwardResponse`. A request that finds no leader, or whose leader
//! lost leadership or did not answer within `forward_timeout_ms`, is parked and dispatched again
//! on the next tick or leader change, until `request_timeout_ms`, then fails. Retrying a write
//! that did commit is harmless: applies are idempotent overwrites. FLUSH (and FUA) need no work:
//! a write is acknowledged only after it is committed, i.e. in the WAL of a majority, fsynced.

mod hibernate;
mod inline;
mod refusals;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftlog::core::{
    ConfChangeStart, Configuration, Entry, EntryKind, Event, GroupId, Index, Message, MessageBody,
    NodeId, RaftNode, Restore, Role, SnapshotMeta, SplitMix64, Term,
};
use raftlog::storage::LogStore;
use raftlog::wal::{Durable, Wal, WalConfig, WalHandle, WalOp};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use transport::{Frame, Lane, Received, Security, Transport};

use crate::block::{self, Applier, BlockOp, DataFile};
use crate::codec::{
    self, ForwardOp, ForwardRequest, ForwardResponse, ForwardResult, HibernateFrame, Malformed,
    KIND_FORWARD_REQUEST, KIND_FORWARD_RESPONSE, KIND_HIBERNATE, KIND_RAFT,
};
use crate::config::{BgSpec, EngineConfig};
use crate::dataio::{self, DataIo, DataWaiter, IoDone, IoKind};
use crate::error::{Error, Result};
use crate::snapshot::{FileSource, Incoming};
use crate::status::{BgStatus, CoreCounters, LinkStat, PeerStat};
use hibernate::Hibernation;
use inline::InlineApplies;
use refusals::{Refusals, Refused};

/// Inputs drained per source per loop iteration, at most (keeps one busy source from starving
/// the others and bounds the work between two flushes).
const DRAIN_BATCH_MAX: usize = 1024;
/// Payload bytes of one raft frame, at most (below the transport's 16 MiB frame limit).
const FRAME_PAYLOAD_BYTES_MAX: usize = 8 << 20;
/// A snapshot writes the data file's dirty pages back this many file bytes at a time before its
/// fdatasync (`DataFile::sync_in_ranges`). Measured against one plain fdatasync (3 pairs, 256 MiB
/// BG and snapshot_log_bytes_max, docs/bench-nbd.md): 1 replica p99.9 6.3 ms instead of 13.3 ms
/// at the same IOPS; 3 replicas unchanged.
const SNAPSHOT_WRITEBACK_RANGE_BYTES: u64 = 8 << 20;
/// Rounds of (drain dirty groups, submit data I/O, reap completions) per flush, at most; more
/// completions are picked up by the next loop iteration.
const FLUSH_IO_ROUNDS_MAX: usize = 4;
/// `ready()` rounds per group per flush, at most (a group producing output forever is a bug; it
/// is continued at the next iteration instead of hanging the core).
const READY_ROUNDS_MAX: usize = 64;
/// A group with less log than this since its snapshot is not snapshotted for the log memory
/// budget (see `Core::enforce_log_memory`).
const BUDGET_SNAPSHOT_BYTES_MIN: usize = 1 << 20;

/// What a client asks of a block group.
#[derive(Debug)]
pub enum ClientOp {
    Read { offset: u64, len: u32 },
    Op(BlockOp),
    Flush,
}

/// A single-peer membership change (braft's add_peer / remove_peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerChange {
    Add(NodeId),
    Remove(NodeId),
}

/// A request from outside the core (the NBD front end, the HTTP status page).
pub enum CoreRequest {
    Client {
        bg: GroupId,
        op: ClientOp,
        reply: oneshot::Sender<Result<Bytes>>,
    },
    Status(oneshot::Sender<Vec<BgStatus>>),
    /// This core's connections to its peers.
    Links(oneshot::Sender<Vec<LinkStat>>),
    /// Take a snapshot of `bg` now; answers with the snapshot index.
    Snapshot {
        bg: GroupId,
        reply: oneshot::Sender<Result<Index>>,
    },
    /// Add or remove a peer of `bg` (led here); answers whether a change started (false: the
    /// configuration already is the requested one).
    ChangePeers {
        bg: GroupId,
        change: PeerChange,
        reply: oneshot::Sender<Result<bool>>,
    },
    /// Hand `bg`'s leadership (held here) to `to`, or to the most up-to-date voter; answers
    /// with the target once the transfer has started.
    TransferLeader {
        bg: GroupId,
        to: Option<NodeId>,
        reply: oneshot::Sender<Result<NodeId>>,
    },
    Shutdown,
}

/// Completions produced by the core's own tasks.
enum Internal {
    Durable(GroupId, u64),
    WalFailed(raftlog::Error),
    SnapshotSent {
        bg: GroupId,
        peer: NodeId,
        msg: Message,
        result: std::result::Result<transport::SnapshotSent, String>,
    },
    /// The off-thread part of a snapshot save finished: the data file is fdatasynced through
    /// `index` and, when `meta` is set, that meta file is durable too (`None` also when an
    /// install overtook the save and its meta was not written).
    SnapshotSaved {
        bg: GroupId,
        index: Index,
        meta: Option<SnapshotMeta>,
        result: Result<()>,
    },
    /// The off-thread install of a received snapshot finished (see `block`): the data file is
    /// the snapshot's and its meta is durable; `result` holds the reopened data file.
    SnapshotLoaded {
        bg: GroupId,
        meta: SnapshotMeta,
        result: Result<DataFile>,
    },
}

/// What a data-file request in flight is for.
enum IoWhat {
    Apply {
        bg: GroupId,
        index: Index,
    },
    Read {
        bg: GroupId,
        client: Client,
        offset: u64,
        len: u32,
    },
}

/// A received snapshot being installed (`snapshot_status` LOADING): the group applies and
/// serves nothing until it is done.
struct Loading {
    meta: SnapshotMeta,
    /// The install job runs (it starts once the applies handed out before it completed).
    started: bool,
}

/// A snapshot save whose data-file sync (and meta write) runs off the core thread.
struct Saving {
    index: Index,
    /// On-demand requests (`Engine::snapshot`) answered when the save completes.
    waiters: Vec<oneshot::Sender<Result<Index>>>,
}

enum ReplyTo {
    Local(oneshot::Sender<Result<Bytes>>),
    Remote { peer: NodeId, req_id: u64 },
}

/// A request being served, with everything needed to retry it.
struct Client {
    bg: GroupId,
    op: ForwardOp,
    reply: ReplyTo,
    started: Instant,
    deadline: Instant,
    last_err: String,
}

impl Client {
    fn op_name(&self) -> &'static str {
        match &self.op {
            ForwardOp::Read { .. } => "read",
            ForwardOp::Op(op) => op.name(),
        }
    }
    fn offset(&self) -> u64 {
        match &self.op {
            ForwardOp::Read { offset, .. } => *offset,
            ForwardOp::Op(op) => op.offset(),
        }
    }
}

/// A block op proposed on the leader: answered when `remaining` entries are applied.
struct Exec {
    client: Client,
    remaining: usize,
}

struct Group {
    spec: BgSpec,
    raft: RaftNode,
    data: DataFile,
    /// Orders this group's applies on the core's ring and knows what is applied.
    applier: Applier,
    loading: Option<Loading>,
    /// Leader: proposed entry index → (term, exec id).
    proposals: HashMap<Index, (Term, u64)>,
    execs: HashMap<u64, Exec>,
    /// Leader: reads waiting for ReadIndexReady, by ctx.
    reads: HashMap<u64, Client>,
    /// Reads whose read index is known, waiting for the apply to reach it.
    ready_reads: Vec<(Index, Client)>,
    /// Peers a snapshot is being streamed to.
    sending: BTreeSet<NodeId>,
    /// The snapshot save in progress, if any (at most one per group).
    saving: Option<Saving>,
    /// Meta file writes of this group hold this lock; an install bumps the count, so a save
    /// started before the install does not write its (older) meta over the installed one.
    meta_epoch: Arc<std::sync::Mutex<u64>>,
    last_snapshot_at: Instant,
}

pub(crate) struct CoreCtx {
    pub core: usize,
    pub cfg: Arc<EngineConfig>,
    pub requests: mpsc::Receiver<CoreRequest>,
    pub started: oneshot::Sender<Result<()>>,
    pub counters: Arc<CoreCounters>,
}

struct Core {
    core: usize,
    cfg: Arc<EngineConfig>,
    dir: std::path::PathBuf,
    me: NodeId,
    groups: BTreeMap<GroupId, Group>,
    dirty: BTreeSet<GroupId>,
    wal: WalHandle,
    transport: Rc<Transport>,
    incoming: Incoming,
    durable_tx: mpsc::UnboundedSender<(GroupId, u64, Option<Durable>)>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    parked: Vec<Client>,
    forwarded: HashMap<u64, (Client, NodeId, Instant)>,
    next_id: u64,
    /// Per peer: (control lane, data lane) messages of this flush.
    outbox: BTreeMap<NodeId, (Vec<Message>, Vec<Message>)>,
    /// Applies and reads of every group's data file (see `dataio`).
    dio: DataIo,
    dio_waiter: Option<Rc<DataWaiter>>,
    io_tokens: HashMap<u64, IoWhat>,
    /// Groups with applies or reads waiting for a free data-I/O slot.
    io_blocked: BTreeSet<GroupId>,
    /// Write bytes handed over by raft and not yet submitted, over every group of the core.
    apply_queued_bytes: u64,
    /// Which groups hibernate, and the peers' liveness ([`hibernate`]).
    hib: Hibernation,
    /// Traffic from nodes that are not members, reported at a bounded rate.
    refusals: Refusals,
    /// Whether buffered applies may be written on this thread now ([`inline`]).
    inline: InlineApplies,
    counters: Arc<CoreCounters>,
}

/// Runs core `ctx.core` until shutdown or a fatal error. Call inside a `LocalSet` on a
/// `current_thread` runtime with I/O and time enabled.
pub(crate) async fn run(ctx: CoreCtx) -> Result<()> {
    let CoreCtx {
        core,
        cfg,
        mut requests,
        started,
        counters,
    } = ctx;
    let setup = setup(core, &cfg, counters).await;
    let (mut c, wal_rc, mut net_rx, mut internal_rx, durable_rx) = match setup {
        Ok(s) => {
            let _ = started.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = started.send(Err(Error::Config {
                what: format!("core {core} failed to start: {e}"),
            }));
            return Err(e);
        }
    };
    let wal_task = tokio::task::spawn_local(raftlog::wal::run(wal_rc.clone()));
    let dio_waiter = c.dio_waiter.clone();
    tokio::task::spawn_local(watch_durable(durable_rx, c.internal_tx.clone()));
    let mut ticker = tokio::time::interval(cfg.tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<()> = async {
        loop {
            tokio::select! {
                biased;
                ev = internal_rx.recv() => {
                    if let Some(ev) = ev { c.on_internal(ev)?; }
                }
                _ = wait_data(&dio_waiter) => { c.reap_data()?; }
                r = requests.recv() => match r {
                    // The last flush hands raft's pending writes (e.g. the compaction a
                    // finished snapshot queued) to the WAL, which drains before the core stops.
                    None | Some(CoreRequest::Shutdown) => return c.flush().await,
                    Some(r) => c.on_request(r)?,
                },
                f = net_rx.recv() => {
                    if let Some(f) = f { c.on_frame(f); }
                }
                _ = ticker.tick() => {
                    c.on_tick()?;
                    c.enforce_log_memory();
                    c.counters.publish_wal(&wal_rc.borrow().status());
                }
            }
            for _ in 0..DRAIN_BATCH_MAX {
                match internal_rx.try_recv() {
                    Ok(ev) => c.on_internal(ev)?,
                    Err(_) => break,
                }
            }
            for _ in 0..DRAIN_BATCH_MAX {
                match requests.try_recv() {
                    Ok(CoreRequest::Shutdown) => return c.flush().await,
                    Ok(r) => c.on_request(r)?,
                    Err(_) => break,
                }
            }
            for _ in 0..DRAIN_BATCH_MAX {
                match net_rx.try_recv() {
                    Ok(f) => c.on_frame(f),
                    Err(_) => break,
                }
            }
            c.flush().await?;
        }
    }
    .await;
    if let Err(e) = &result {
        error!(core, error = %e, "core stopped on a fatal error");
    }
    c.fail_everything(core);
    // Closing tells peers at once (they re-elect without waiting for an idle timeout); the
    // transport bounds the drain that follows (`close_wait_max`) so a shutdown stays quick.
    c.transport.shutdown().await;
    c.wal.shutdown();
    match tokio::time::timeout(Duration::from_secs(10), wal_task).await {
        Ok(Ok(Err(e))) => warn!(core, error = %e, "wal writer ended with an error"),
        Ok(Err(e)) => warn!(core, error = %e, "wal writer task failed"),
        Err(_) => warn!(core, "wal writer did not finish within 10 s"),
        Ok(Ok(Ok(()))) => {}
    }
    // Applies still on the disk finish before the final sync (their buffers are the kernel's
    // until then).
    while c.dio.in_flight() > 0 {
        if let Err(e) = c
            .dio
            .kick()
            .and_then(|()| c.dio.wait_and_reap().map(|_| ()))
        {
            warn!(core, error = %e, "data I/O drain at shutdown failed");
            break;
        }
    }
    for g in c.groups.values() {
        if let Err(e) = g.data.sync() {
            warn!(core, error = %e, "data file sync at shutdown failed");
        }
    }
    info!(core, "core stopped");
    result
}

type Setup = (
    Core,
    Rc<RefCell<Wal>>,
    mpsc::Receiver<Received>,
    mpsc::UnboundedReceiver<Internal>,
    mpsc::UnboundedReceiver<(GroupId, u64, Option<Durable>)>,
);

/// The WAL settings of a core whose directory is `dir`.
fn wal_config(cfg: &EngineConfig, dir: &std::path::Path) -> WalConfig {
    let mut wcfg = WalConfig::new(dir.join("wal"));
    wcfg.log_segment_bytes_max = cfg.wal_segment_bytes_max;
    wcfg.raft_sync = cfg.raft_sync;
    wcfg.direct_io = cfg.wal_direct_io;
    wcfg.segment_zero_fill = cfg.wal_segment_zero_fill;
    wcfg.batches_in_flight_max = cfg.wal_batches_in_flight_max;
    wcfg.small_batches_in_flight_max = cfg.wal_small_batches_in_flight_max;
    wcfg
}

async fn setup(core: usize, cfg: &Arc<EngineConfig>, counters: Arc<CoreCounters>) -> Result<Setup> {
    let dir = cfg.core_dir(core);
    std::fs::create_dir_all(&dir).map_err(|source| Error::File {
        bg: 0,
        path: dir.clone(),
        op: "create core directory",
        offset: 0,
        source,
    })?;
    let mut wal = Wal::open(wal_config(cfg, &dir)).map_err(|source| Error::Wal { core, source })?;
    let dio = DataIo::open(cfg.data_io_backend, cfg.data_ios_in_flight_max, core)
        .map_err(|source| Error::DataIo { core, source })?;
    let dio_waiter = dio
        .waiter()
        .map_err(|source| Error::DataIo { core, source })?
        .map(Rc::new);
    let mut groups = BTreeMap::new();
    let mut sizes = HashMap::new();
    for spec in cfg.bgs.iter().filter(|b| cfg.core_of(b.id) == core) {
        let g = open_group(cfg, &dir, &mut wal, spec)?;
        sizes.insert(spec.id, spec.size_bytes);
        groups.insert(spec.id, g);
    }
    let incoming = Incoming::new(dir.clone(), sizes);
    let mut tcfg =
        transport::Config::new(cfg.node_id, EngineConfig::core_addr(cfg.quic_listen, core));
    tcfg.snapshot_chunk_bytes = cfg.snapshot_chunk_bytes;
    tcfg.snapshot_chunk_bytes_max = tcfg.snapshot_chunk_bytes_max.max(cfg.snapshot_chunk_bytes);
    tcfg.snapshot_bytes_per_sec_max = cfg.snapshot_bytes_per_sec_max;
    if cfg.quic_udp_payload_bytes != 0 {
        tcfg = tcfg.with_udp_payload_bytes(cfg.quic_udp_payload_bytes);
    }
    let security = match &cfg.tls_dir {
        Some(d) => Security::MutualTls(
            transport::NodeIdentity::load(d, cfg.node_id)
                .map_err(|source| Error::Transport { core, source })?,
        ),
        None => Security::InsecureLoopback,
    };
    let (transport, net_rx) = Transport::bind(tcfg, security, Some(Arc::new(incoming.clone())))
        .map_err(|source| Error::Transport { core, source })?;
    for (id, addr) in &cfg.peers {
        transport
            .add_peer(*id, EngineConfig::core_addr(*addr, core))
            .map_err(|source| Error::Transport { core, source })?;
    }
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let dirty = groups.keys().copied().collect();
    let hib = Hibernation::new(cfg, groups.keys().copied(), Instant::now());
    // Buffered applies only: with O_DIRECT data files every apply goes through the ring.
    let inline_applies = cfg.inline_applies && !cfg.data_direct_io;
    let c = Core {
        core,
        me: cfg.node_id,
        cfg: cfg.clone(),
        dir,
        groups,
        dirty,
        wal: wal.handle(),
        transport: Rc::new(transport),
        incoming,
        durable_tx,
        internal_tx,
        parked: Vec::new(),
        forwarded: HashMap::new(),
        next_id: 1,
        outbox: BTreeMap::new(),
        dio,
        dio_waiter,
        io_tokens: HashMap::new(),
        io_blocked: BTreeSet::new(),
        apply_queued_bytes: 0,
        hib,
        inline: InlineApplies::new(inline_applies, cfg.inline_apply_us_max),
        refusals: Refusals::default(),
        counters,
    };
    info!(
        core,
        groups = c.groups.len(),
        addr = %c.transport.local_addr(),
        data_io = c.dio.name(),
        data_direct_io = cfg.data_direct_io,
        inline_applies,
        "core started"
    );
    Ok((
        c,
        Rc::new(RefCell::new(wal)),
        net_rx,
        internal_rx,
        durable_rx,
    ))
}

/// Recovers one group: an interrupted snapshot install is finished first (see `block`), then
/// snapshot meta from its meta file, hard state and log from the WAL; the raft node then
/// re-applies every entry after the snapshot (idempotent, see `block`).
fn open_group(
    cfg: &EngineConfig,
    dir: &std::path::Path,
    wal: &mut Wal,
    spec: &BgSpec,
) -> Result<Group> {
    let bg = spec.id;
    block::recover_install(dir, bg)?;
    let data = DataFile::open(
        dir,
        bg,
        spec.size_bytes,
        cfg.data_direct_io,
        spec.preallocate,
    )?;
    let snapshot = block::read_meta(dir, bg)?;
    let st = wal.group_state(bg).unwrap_or_default();
    let entries = if st.last_index > st.compacted_index {
        wal.entries(bg, st.compacted_index + 1, st.last_index + 1)
            .map_err(|source| Error::Raft { bg, source })?
    } else {
        Vec::new()
    };
    info!(
        bg,
        snapshot_index = snapshot.as_ref().map_or(0, |m| m.index),
        log_first = st.compacted_index + 1,
        log_last = st.last_index,
        term = st.hard_state.term,
        "recovering block group"
    );
    let restore = Restore {
        hard_state: st.hard_state,
        snapshot,
        compacted: (st.compacted_index, st.compacted_term),
        entries,
        bootstrap: Configuration::new(spec.members.iter().copied()),
        // Used only when the replica's storage is new (no disk id in its hard state).
        new_disk: rand::random::<u64>().max(1),
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (cfg.node_id << 32)
        ^ bg;
    let raft = RaftNode::new(
        bg,
        cfg.node_id,
        cfg.raft_config(),
        Box::new(SplitMix64(seed)),
        restore,
    )
    .map_err(|source| Error::Raft { bg, source })?;
    let applier = Applier::new(raft.applied_index());
    Ok(Group {
        spec: spec.clone(),
        raft,
        data,
        applier,
        loading: None,
        proposals: HashMap::new(),
        execs: HashMap::new(),
        reads: HashMap::new(),
        ready_reads: Vec::new(),
        sending: BTreeSet::new(),
        saving: None,
        meta_epoch: Arc::new(std::sync::Mutex::new(0)),
        last_snapshot_at: Instant::now(),
    })
}

/// The meta-write lock of a group (it guards a counter: a poisoned lock holds nothing torn).
fn lock_epoch(m: &std::sync::Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Data-file completions (never, for the synchronous backend: its requests are reaped in the
/// flush that submitted them).
async fn wait_data(w: &Option<Rc<DataWaiter>>) {
    match w {
        Some(w) => w.wait().await,
        None => std::future::pending().await,
    }
}

/// Awaits WAL completions in submission order (see the module docs).
async fn watch_durable(
    mut rx: mpsc::UnboundedReceiver<(GroupId, u64, Option<Durable>)>,
    tx: mpsc::UnboundedSender<Internal>,
) {
    while let Some((bg, seq, d)) = rx.recv().await {
        if let Some(d) = d {
            if let Err(e) = d.await {
                let _ = tx.send(Internal::WalFailed(e));
                return;
            }
        }
        if tx.send(Internal::Durable(bg, seq)).is_err() {
            return;
        }
    }
}

impl Core {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn on_internal(&mut self, ev: Internal) -> Result<()> {
        match ev {
            Internal::Durable(bg, seq) => {
                if let Some(g) = self.groups.get_mut(&bg) {
                    g.raft.on_write_durable(seq);
                    self.dirty.insert(bg);
                }
            }
            Internal::WalFailed(source) => {
                return Err(Error::Wal {
                    core: self.core,
                    source,
                })
            }
            Internal::SnapshotSent {
                bg,
                peer,
                msg,
                result,
            } => {
                let Some(g) = self.groups.get_mut(&bg) else {
                    return Ok(());
                };
                g.sending.remove(&peer);
                match result {
                    Ok(sent) => {
                        info!(
                            bg,
                            peer,
                            bytes_sent = sent.bytes_sent,
                            zero_bytes = sent.zero_bytes,
                            attempts = sent.attempts,
                            "snapshot streamed; sending InstallSnapshot"
                        );
                        self.outbox.entry(peer).or_default().1.push(msg);
                    }
                    Err(reason) => {
                        warn!(bg, peer, %reason, "snapshot send failed");
                        g.raft.report_snapshot_failed(peer);
                        self.dirty.insert(bg);
                    }
                }
            }
            Internal::SnapshotSaved {
                bg,
                index,
                meta,
                result,
            } => self.finish_snapshot(bg, index, meta, result)?,
            Internal::SnapshotLoaded { bg, meta, result } => {
                self.finish_install(bg, meta, result)?
            }
        }
        Ok(())
    }

    fn on_request(&mut self, r: CoreRequest) -> Result<()> {
        match r {
            CoreRequest::Client { bg, op, reply } => {
                let now = Instant::now();
                let op = match op {
                    // Every acknowledged write is committed (fsynced in a majority's WAL), so
                    // there is nothing left to make durable.
                    ClientOp::Flush => {
                        let _ = reply.send(Ok(Bytes::new()));
                        return Ok(());
                    }
                    ClientOp::Read { offset, len } => ForwardOp::Read { offset, len },
                    ClientOp::Op(op) => ForwardOp::Op(op),
                };
                let client = Client {
                    bg,
                    op,
                    reply: ReplyTo::Local(reply),
                    started: now,
                    deadline: now + Duration::from_millis(self.cfg.request_timeout_ms),
                    last_err: "not dispatched yet".into(),
                };
                self.wake_group(bg);
                self.dispatch(client);
            }
            CoreRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            CoreRequest::Links(reply) => {
                let _ = reply.send(self.links());
            }
            CoreRequest::Snapshot { bg, reply } => self.take_snapshot(bg, Some(reply)),
            CoreRequest::TransferLeader { bg, to, reply } => {
                // A hibernating leader must tick again to send TimeoutNow and to give up the
                // transfer if the target never campaigns.
                self.wake_group(bg);
                let r = match self.groups.get_mut(&bg) {
                    None => Err(Error::UnknownBg { bg }),
                    Some(g) => g
                        .raft
                        .transfer_leadership(to)
                        .map_err(|source| Error::Raft { bg, source }),
                };
                if let Ok(target) = &r {
                    info!(bg, target, "leadership transfer started");
                    self.dirty.insert(bg);
                }
                let _ = reply.send(r);
            }
            CoreRequest::ChangePeers { bg, change, reply } => {
                self.wake_group(bg);
                // A replica can only live where this node has a link to.
                let stranger = match change {
                    PeerChange::Add(n) if n != self.me && !self.cfg.peers.contains_key(&n) => {
                        Some(n)
                    }
                    _ => None,
                };
                let r = match (self.groups.get_mut(&bg), stranger) {
                    (None, _) => Err(Error::UnknownBg { bg }),
                    (Some(_), Some(node)) => Err(Error::NotAPeer { bg, node }),
                    (Some(g), None) => match change {
                        PeerChange::Add(n) => g.raft.add_peer(n),
                        PeerChange::Remove(n) => g.raft.remove_peer(n),
                    }
                    .map(|start| start == ConfChangeStart::Started)
                    .map_err(|source| Error::Raft { bg, source }),
                };
                if let Ok(true) = r {
                    info!(bg, ?change, "membership change started");
                    self.dirty.insert(bg);
                }
                let _ = reply.send(r);
            }
            CoreRequest::Shutdown => {}
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Client requests
    // ------------------------------------------------------------------

    /// Origin side: execute here if leader, forward to a known leader, or park.
    fn dispatch(&mut self, client: Client) {
        if Instant::now() >= client.deadline {
            let e = Error::Unavailable {
                bg: client.bg,
                op: client.op_name(),
                offset: client.offset(),
                waited_ms: client.started.elapsed().as_millis() as u64,
                last: client.last_err.clone(),
            };
            self.reply(client, Err(e));
            return;
        }
        let Some(g) = self.groups.get(&client.bg) else {
            let bg = client.bg;
            self.reply(client, Err(Error::UnknownBg { bg }));
            return;
        };
        if g.raft.role() == Role::Leader {
            self.execute(client);
            return;
        }
        if !g.raft.conf().contains(self.me) {
            // Removed (its configuration, from the log, no longer names it) or waiting to be
            // added: no leader of the group would take its requests, so say so at once rather
            // than after the forward timeout.
            let bg = client.bg;
            self.reply(client, Err(Error::NotAMember { bg, node: self.me }));
            return;
        }
        match (g.raft.leader(), &client.reply) {
            (Some(l), ReplyTo::Local(_)) if l != self.me => self.forward(client, l),
            _ => self.retry_later(client, "no leader known".into()),
        }
    }

    fn forward(&mut self, mut client: Client, leader: NodeId) {
        let req_id = self.next_id();
        let req = ForwardRequest {
            req_id,
            op: client.op.clone(),
        };
        let frame = Frame::new(KIND_FORWARD_REQUEST, client.bg, req.encode());
        match self.transport.send(leader, frame, Lane::Data) {
            Ok(()) => {
                self.forwarded
                    .insert(req_id, (client, leader, Instant::now()));
            }
            Err(e) => {
                client.last_err = format!("forward to leader {leader}: {e}");
                self.parked.push(client);
            }
        }
    }

    /// A retryable failure: the origin parks the request; a forwarded one is answered
    /// NotLeader so that its origin retries.
    fn retry_later(&mut self, mut client: Client, why: String) {
        match client.reply {
            ReplyTo::Local(_) => {
                client.last_err = why;
                self.parked.push(client);
            }
            ReplyTo::Remote { peer, req_id } => {
                let resp = ForwardResponse {
                    req_id,
                    result: ForwardResult::NotLeader,
                };
                self.send_response(peer, client.bg, resp);
            }
        }
    }

    fn send_response(&self, peer: NodeId, bg: GroupId, resp: ForwardResponse) {
        let frame = Frame::new(KIND_FORWARD_RESPONSE, bg, resp.encode());
        if let Err(e) = self.transport.send(peer, frame, Lane::Data) {
            // The origin times the request out and retries.
            debug!(bg, peer, error = %e, "forward response not sent");
        }
    }

    fn reply(&mut self, client: Client, result: Result<Bytes>) {
        match client.reply {
            ReplyTo::Local(tx) => {
                let _ = tx.send(result);
            }
            ReplyTo::Remote { peer, req_id } => {
                let result = match result {
                    Ok(b) => ForwardResult::Ok(b),
                    Err(e) => ForwardResult::Failed(e.to_string()),
                };
                self.send_response(peer, client.bg, ForwardResponse { req_id, result });
            }
        }
    }

    /// Leader side.
    fn execute(&mut self, client: Client) {
        let bg = client.bg;
        let ctx = self.next_id();
        let exec_id = self.next_id();
        let limit = self.cfg.entry_data_bytes_max;
        let size = self.groups[&bg].data.size();
        let (offset, len) = match &client.op {
            ForwardOp::Read { offset, len } => (*offset, *len as u64),
            ForwardOp::Op(op) => (op.offset(), op.len()),
        };
        if offset.checked_add(len).is_none_or(|end| end > size) {
            let e = Error::OutOfRange {
                bg,
                op: client.op_name(),
                offset,
                len,
                size,
            };
            self.reply(client, Err(e));
            return;
        }
        self.dirty.insert(bg);
        let g = self
            .groups
            .get_mut(&bg)
            .expect("dispatch checked the group");
        match &client.op {
            ForwardOp::Read { .. } => match g.raft.lease_read(ctx) {
                Ok(()) => {
                    g.reads.insert(ctx, client);
                }
                Err(e) => self.retry_later(client, e.to_string()),
            },
            ForwardOp::Op(op) => {
                let pieces = op.clone().split(limit);
                let n = pieces.len();
                for p in pieces {
                    // Checked above against the replica's size, which is the group's (a node
                    // whose configured size differs refuses to open the group).
                    assert!(
                        p.offset() + p.len() <= g.data.size(),
                        "bg {bg}: proposing {} at {}+{} past the volume's {} bytes",
                        p.name(),
                        p.offset(),
                        p.len(),
                        g.data.size()
                    );
                    match g.raft.propose(p.encode(), None) {
                        Ok((index, term)) => {
                            g.proposals.insert(index, (term, exec_id));
                        }
                        Err(e) => {
                            // Entries already proposed may still commit; the retry writes the
                            // same bytes again (idempotent). Their completions find no exec.
                            self.retry_later(client, e.to_string());
                            return;
                        }
                    }
                }
                g.execs.insert(
                    exec_id,
                    Exec {
                        client,
                        remaining: n,
                    },
                );
            }
        }
    }

    // ------------------------------------------------------------------
    // Peers
    // ------------------------------------------------------------------

    /// A decoded frame, or None after logging why it was refused.
    fn decoded<T>(
        &self,
        from: NodeId,
        group_field: GroupId,
        r: std::result::Result<T, Malformed>,
    ) -> Option<T> {
        r.map_err(|e| {
            warn!(
                core = self.core,
                "{}",
                codec::describe(from, group_field, &e)
            )
        })
        .ok()
    }

    fn on_frame(&mut self, r: Received) {
        let from = r.from;
        let group_field = r.frame.group;
        self.heard_from(from);
        match r.frame.kind {
            KIND_RAFT => {
                let Some(msgs) =
                    self.decoded(from, group_field, codec::decode_messages(r.frame.payload))
                else {
                    return;
                };
                for m in msgs {
                    self.step(from, m);
                }
            }
            KIND_FORWARD_REQUEST => {
                let Some(req) =
                    self.decoded(from, group_field, ForwardRequest::decode(r.frame.payload))
                else {
                    return;
                };
                let now = Instant::now();
                let client = Client {
                    bg: group_field,
                    op: req.op,
                    reply: ReplyTo::Remote {
                        peer: from,
                        req_id: req.req_id,
                    },
                    started: now,
                    deadline: now + Duration::from_millis(self.cfg.forward_timeout_ms),
                    last_err: String::new(),
                };
                match self.groups.get(&group_field).map(|g| g.raft.role()) {
                    // Forwards come from the replicas of the group (see `step` on members).
                    Some(_) if !self.groups[&group_field].raft.conf().contains(from) => {
                        if let Some(unreported) =
                            self.refused(group_field, from, Refused::ForwardedRequest, now)
                        {
                            warn!(
                                core = self.core,
                                bg = group_field,
                                from,
                                unreported,
                                "forwarded request from a node that is not a member refused"
                            );
                        }
                        let e = Error::NotAMember {
                            bg: group_field,
                            node: from,
                        };
                        self.reply(client, Err(e));
                    }
                    Some(Role::Leader) => {
                        self.wake_group(group_field);
                        self.execute(client)
                    }
                    Some(_) => self.retry_later(client, String::new()),
                    None => self.reply(client, Err(Error::UnknownBg { bg: group_field })),
                }
            }
            KIND_FORWARD_RESPONSE => {
                let Some(resp) =
                    self.decoded(from, group_field, ForwardResponse::decode(r.frame.payload))
                else {
                    return;
                };
                // A late answer to a request that was already retried is ignored.
                let Some((client, leader, _)) = self.forwarded.remove(&resp.req_id) else {
                    return;
                };
                if leader != from {
                    warn!(
                        core = self.core,
                        from, leader, "forward response from the wrong node ignored"
                    );
                    self.forwarded
                        .insert(resp.req_id, (client, leader, Instant::now()));
                    return;
                }
                match resp.result {
                    ForwardResult::Ok(data) => self.reply(client, Ok(data)),
                    ForwardResult::NotLeader => {
                        self.retry_later(client, format!("node {from} is no longer the leader"))
                    }
                    ForwardResult::Failed(reason) => {
                        let e = Error::Remote {
                            bg: client.bg,
                            op: client.op_name(),
                            offset: client.offset(),
                            leader: from,
                            reason,
                        };
                        self.reply(client, Err(e));
                    }
                }
            }
            KIND_HIBERNATE => {
                if let Some(f) =
                    self.decoded(from, group_field, HibernateFrame::decode(r.frame.payload))
                {
                    self.on_hibernate_frame(from, f);
                }
            }
            k => warn!(
                core = self.core,
                from,
                kind = k,
                "frame of unknown kind dropped"
            ),
        }
    }

    /// Counts traffic of `from`, not a member of `bg`, refused; `Some(unreported)` when it is
    /// to be logged (see `refusals`).
    fn refused(&mut self, bg: GroupId, from: NodeId, what: Refused, now: Instant) -> Option<u64> {
        self.counters
            .raft_messages_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.refusals.note(bg, from, what, now)
    }

    fn step(&mut self, from: NodeId, m: Message) {
        if m.from != from || m.to != self.me {
            warn!(
                core = self.core,
                from,
                msg_from = m.from,
                msg_to = m.to,
                "raft message with a wrong sender or recipient dropped"
            );
            return;
        }
        let bg = m.group;
        let Some(g) = self.groups.get_mut(&bg) else {
            debug!(bg, from, "message for a group not hosted here dropped");
            return;
        };
        // Only members talk raft to a group (the transport authenticates nodes, not their
        // membership): a message from any other node — one that holds a cluster certificate
        // but no replica, or anyone on loopback in insecure mode — could otherwise depose the
        // leader with a higher term or become the leader a follower forwards to. A peer the
        // leader is adding counts from the start of its catch-up (`is_peer`).
        if !g.raft.is_peer(from) {
            if let Some(unreported) = self.refused(bg, from, Refused::RaftMessage, Instant::now()) {
                warn!(
                    core = self.core,
                    bg,
                    from,
                    unreported,
                    "raft message from a node that is not a member of the group dropped (reported \
                     once a minute per node and group; `unreported` counts the ones in between)"
                );
            }
            return;
        }
        if let MessageBody::InstallSnapshot { meta } = &m.body {
            // Step it only once its data is here: the core cannot abort an install it asked for.
            if meta.index > g.raft.commit_index() && !self.incoming.is_complete(bg, meta.index) {
                debug!(
                    bg,
                    from,
                    index = meta.index,
                    "InstallSnapshot before its data: dropped"
                );
                return;
            }
        }
        if self.hib.wake(bg, &mut g.raft, false) {
            self.counters
                .wakes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        g.raft.step(m);
        self.dirty.insert(bg);
    }

    // ------------------------------------------------------------------
    // Time
    // ------------------------------------------------------------------

    fn on_tick(&mut self) -> Result<()> {
        // Before the groups tick: hibernation judges idleness on the state the last flush left.
        self.hibernate_tick();
        self.inline.check_dirty();
        self.inline.publish(&self.counters, Instant::now());
        let interval = Duration::from_secs(self.cfg.snapshot_interval_s);
        let mut due = Vec::new();
        for (bg, g) in self.groups.iter_mut() {
            if self.hib.ticks(*bg) {
                g.raft.tick();
                self.dirty.insert(*bg);
            }
            if self.cfg.snapshot_interval_s > 0 && g.last_snapshot_at.elapsed() >= interval {
                due.push(*bg);
            }
        }
        for bg in due {
            self.take_snapshot(bg, None);
        }
        let now = Instant::now();
        let timeout = Duration::from_millis(self.cfg.forward_timeout_ms);
        let expired: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((client, leader, _)) = self.forwarded.remove(&id) {
                self.retry_later(
                    client,
                    format!(
                        "leader {leader} did not answer within {} ms",
                        timeout.as_millis()
                    ),
                );
            }
        }
        self.redispatch_parked();
        Ok(())
    }

    /// Keeps the in-memory raft logs of this core's groups within `log_memory_bytes_max` by
    /// snapshotting the groups with the most log since their last snapshot (a snapshot lets
    /// the core drop its log below the applied index, but for the tail it keeps for lagging
    /// followers). Groups already saving count as freed; a group with less than
    /// `BUDGET_SNAPSHOT_BYTES_MIN` to free is not worth a snapshot of its whole volume, so a
    /// budget smaller than the kept tails of all groups stays exceeded rather than making
    /// every write snapshot.
    fn enforce_log_memory(&mut self) {
        let max = self.cfg.log_memory_bytes_max;
        if max == 0 {
            return;
        }
        let total: usize = self.groups.values().map(|g| g.raft.log_bytes()).sum();
        if total <= max {
            return;
        }
        let mut expected = total;
        let mut candidates = Vec::new();
        for (bg, g) in &self.groups {
            let since = g.raft.log_bytes_since_snapshot();
            if g.saving.is_some() {
                expected = expected.saturating_sub(since);
            } else if since >= BUDGET_SNAPSHOT_BYTES_MIN
                && g.applier.applied() > g.raft.snapshot_meta().index
            {
                candidates.push((since, *bg));
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (since, bg) in candidates {
            if expected <= max {
                break;
            }
            info!(
                core = self.core,
                bg,
                log_bytes_total = total,
                log_memory_bytes_max = max,
                since_snapshot_bytes = since,
                "core over its log memory budget: snapshotting the group with the most log"
            );
            self.take_snapshot(bg, None);
            expected = expected.saturating_sub(since);
        }
    }

    fn redispatch_parked(&mut self) {
        for c in std::mem::take(&mut self.parked) {
            self.dispatch(c);
        }
    }

    // ------------------------------------------------------------------
    // Output
    // ------------------------------------------------------------------

    async fn flush(&mut self) -> Result<()> {
        let mut rounds = 0;
        loop {
            while let Some(bg) = self.dirty.pop_first() {
                for _ in 0..READY_ROUNDS_MAX {
                    let Some(g) = self.groups.get_mut(&bg) else {
                        break;
                    };
                    if !g.raft.has_ready() {
                        break;
                    }
                    let rd = g.raft.ready();
                    if let Some(w) = rd.write {
                        self.persist(bg, w).await?;
                    }
                    for m in rd.messages {
                        self.route(bg, m)?;
                    }
                    if let Some(meta) = rd.snapshot_to_install {
                        self.install_snapshot(bg, meta)?;
                    }
                    for e in rd.committed_entries {
                        self.apply(bg, e)?;
                    }
                    for ev in rd.events {
                        self.on_event(bg, ev)?;
                    }
                }
                self.pump(bg)?;
                self.maybe_start_install(bg);
                self.serve_ready_reads(bg)?;
            }
            self.dio.kick().map_err(|source| Error::DataIo {
                core: self.core,
                source,
            })?;
            // Backpressure: committed writes wait in memory for a data-I/O slot up to
            // `apply_queue_bytes_max`; beyond it the core waits for the disk.
            let over = self.apply_queued_bytes > self.cfg.apply_queue_bytes_max as u64
                && self.dio.in_flight() > 0;
            if over {
                if let Some(w) = self.dio_waiter.clone() {
                    w.wait().await;
                }
            }
            let reaped = self.reap_data()?;
            rounds += 1;
            if !(over || (reaped && rounds < FLUSH_IO_ROUNDS_MAX)) {
                break;
            }
        }
        self.send_outbox();
        Ok(())
    }

    async fn persist(&mut self, bg: GroupId, w: raftlog::core::Write) -> Result<()> {
        let core = self.core;
        let wal_err = |source| Error::Wal { core, source };
        let mut last = None;
        if let Some((index, term)) = w.compact {
            last = Some(
                self.wal
                    .submit(WalOp::Compact {
                        group: bg,
                        index,
                        term,
                    })
                    .await
                    .map_err(wal_err)?,
            );
        }
        if !w.entries.is_empty() {
            let op = WalOp::Append {
                group: bg,
                entries: w.entries,
            };
            last = Some(self.wal.submit(op).await.map_err(wal_err)?);
        }
        if let Some(hs) = w.hard_state {
            last = Some(
                self.wal
                    .submit(WalOp::SetHardState { group: bg, hs })
                    .await
                    .map_err(wal_err)?,
            );
        }
        // The watcher outlives the loop; a send can only fail while shutting down.
        let _ = self.durable_tx.send((bg, w.seq, last));
        Ok(())
    }

    fn route(&mut self, bg: GroupId, m: Message) -> Result<()> {
        if let MessageBody::InstallSnapshot { meta } = &m.body {
            return self.start_snapshot_send(bg, m.to, meta.clone(), m);
        }
        let slot = self.outbox.entry(m.to).or_default();
        if codec::is_control(&m) {
            slot.0.push(m);
        } else {
            slot.1.push(m);
        }
        Ok(())
    }

    fn send_outbox(&mut self) {
        for (peer, (control, data)) in std::mem::take(&mut self.outbox) {
            self.counters.raft_messages_sent.fetch_add(
                (control.len() + data.len()) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            for (lane, msgs) in [(Lane::Control, control), (Lane::Data, data)] {
                let mut start = 0;
                while start < msgs.len() {
                    let mut end = start;
                    let mut bytes = 0;
                    while end < msgs.len()
                        && (end == start
                            || bytes + codec::message_len(&msgs[end]) <= FRAME_PAYLOAD_BYTES_MAX)
                    {
                        bytes += codec::message_len(&msgs[end]);
                        end += 1;
                    }
                    let payload = codec::encode_messages(&msgs[start..end]);
                    if let Err(e) =
                        self.transport
                            .send(peer, Frame::new(KIND_RAFT, 0, payload), lane)
                    {
                        // Raft retransmits what is lost.
                        debug!(core = self.core, peer, error = %e, "raft frame dropped");
                    }
                    start = end;
                }
            }
        }
    }

    /// Hands a committed entry to the group's applier (see `block::Applier`); the write starts
    /// in `pump` and the client is answered when it completed (`entry_applied`).
    fn apply(&mut self, bg: GroupId, e: Entry) -> Result<()> {
        let g = self.groups.get_mut(&bg).expect("applying group exists");
        assert!(
            g.loading.is_none(),
            "bg {bg}: entry {} handed over during a snapshot install",
            e.index
        );
        let op = match e.kind {
            EntryKind::Normal => {
                let op = BlockOp::decode(&e.data);
                if op.is_none() {
                    error!(
                        bg,
                        index = e.index,
                        "undecodable block op in the log skipped"
                    );
                }
                op
            }
            _ => None,
        };
        match op {
            Some(op) if !op.is_empty() => {
                // An entry outside the volume leaves the replica diverged from its log: fatal.
                g.data.check(op.name(), op.offset(), op.len())?;
                if let BlockOp::Write { data, .. } = &op {
                    self.apply_queued_bytes += data.len() as u64;
                }
                g.applier.push(e.index, e.term, op);
            }
            _ => {
                g.applier.push_done(e.index, e.term);
                self.entry_applied(bg, e.index, e.term);
            }
        }
        Ok(())
    }

    /// Entry `index` (of `term`) took effect: answer the client once all its entries did.
    fn entry_applied(&mut self, bg: GroupId, index: Index, term: Term) {
        let g = self.groups.get_mut(&bg).expect("applying group exists");
        let Some((proposed_term, exec_id)) = g.proposals.remove(&index) else {
            return;
        };
        if proposed_term == term {
            let done = match g.execs.get_mut(&exec_id) {
                Some(x) => {
                    x.remaining -= 1;
                    x.remaining == 0
                }
                None => false,
            };
            if done {
                let x = g.execs.remove(&exec_id).expect("present");
                self.reply(x.client, Ok(Bytes::new()));
            }
        } else if let Some(x) = g.execs.remove(&exec_id) {
            self.retry_later(
                x.client,
                format!("entry {index} was replaced by term {term}"),
            );
        }
    }

    /// Starts the group's applies that may start (see `block::Applier`), while the core has
    /// data-I/O slots. Buffered writes are written right here when [`inline`] allows it.
    fn pump(&mut self, bg: GroupId) -> Result<()> {
        let mut sync_done = Vec::new();
        let now = Instant::now();
        let mut inline = self.inline.allowed(now);
        // Taken before this call's first inline write, read again only after a slow one.
        let mut switches_before = None;
        loop {
            let Some(g) = self.groups.get_mut(&bg) else {
                return Ok(());
            };
            if !self.dio.has_room() {
                if g.applier.has_queued() {
                    self.io_blocked.insert(bg);
                }
                break;
            }
            let Some((index, op)) = g.applier.next(&g.data) else {
                break;
            };
            if let BlockOp::Write { data, .. } = &op {
                self.apply_queued_bytes -= data.len() as u64;
            }
            self.next_id += 1;
            let token = self.next_id;
            match g.data.apply_req(token, &op) {
                // A write (buffered: inline applies are off with `data_direct_io`): the request
                // the ring would get, performed right here the way the synchronous backend does
                // (in bounded pieces).
                Some(mut req) if inline && matches!(req.kind, IoKind::Write) => {
                    let before = *switches_before.get_or_insert_with(inline::voluntary_switches);
                    let t0 = Instant::now();
                    dataio::perform(&mut req).map_err(|e| g.data.err("pwrite", req.offset, e))?;
                    let t1 = Instant::now();
                    self.inline
                        .record(t1 - t0, t1, || inline::voluntary_switches() > before);
                    inline = self.inline.allowed(t1);
                    // Completed before the next `next()`, so an overlapping op may start at once.
                    sync_done.push((index, g.applier.complete(index)));
                }
                Some(req) => {
                    self.io_tokens.insert(token, IoWhat::Apply { bg, index });
                    self.dio.submit(req).map_err(|source| Error::DataIo {
                        core: self.core,
                        source,
                    })?;
                }
                None => {
                    // An unaligned O_DIRECT write: read-modify-write now, in order (nothing
                    // overlapping is in flight).
                    g.data.apply_sync(&op)?;
                    sync_done.push((index, g.applier.complete(index)));
                }
            }
        }
        if !sync_done.is_empty() {
            self.dirty.insert(bg);
        }
        for (index, term) in sync_done {
            self.entry_applied(bg, index, term);
        }
        Ok(())
    }

    /// Handles every finished data-file request; returns whether there was any.
    fn reap_data(&mut self) -> Result<bool> {
        let done = self.dio.reap().map_err(|source| Error::DataIo {
            core: self.core,
            source,
        })?;
        if done.is_empty() {
            return Ok(false);
        }
        for d in done {
            self.on_io_done(d)?;
        }
        // Slots were freed: groups that found none try again.
        self.dirty.append(&mut self.io_blocked);
        Ok(true)
    }

    fn on_io_done(&mut self, d: IoDone) -> Result<()> {
        let what = self
            .io_tokens
            .remove(&d.req.token)
            .expect("every data request in flight has a token");
        match what {
            IoWhat::Apply { bg, index } => {
                let g = self.groups.get_mut(&bg).expect("applying group exists");
                match (d.result, d.req.kind) {
                    (Ok(()), _) => {}
                    (Err(e), IoKind::Fallocate { len, .. })
                        if e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                    {
                        // No hole punching here: zeroes, so every replica reads the same.
                        g.data.zero_fill(d.req.offset, len)?;
                    }
                    // A failed apply leaves the replica diverged from its log: fatal for the
                    // core (as a failed WAL write), never retried.
                    (Err(e), _) => return Err(g.data.err(d.req.op_name(), d.req.offset, e)),
                }
                let term = g.applier.complete(index);
                self.entry_applied(bg, index, term);
                self.dirty.insert(bg);
            }
            IoWhat::Read {
                bg,
                client,
                offset,
                len,
            } => {
                let r = match d.result {
                    Ok(()) => Ok(DataFile::read_result(d.req, offset, len)),
                    Err(e) => Err(match self.groups.get(&bg) {
                        Some(g) => g.data.err("pread", d.req.offset, e),
                        None => Error::UnknownBg { bg },
                    }),
                };
                self.reply(client, r);
            }
        }
        Ok(())
    }

    /// Starts the reads whose read index the group applied (every write through it completed,
    /// so the read sees them), while the core has data-I/O slots. Nothing is served while a
    /// snapshot is being installed.
    fn serve_ready_reads(&mut self, bg: GroupId) -> Result<()> {
        let Some(g) = self.groups.get_mut(&bg) else {
            return Ok(());
        };
        if g.ready_reads.is_empty() || g.loading.is_some() {
            return Ok(());
        }
        let applied = g.applier.applied();
        let mut later = Vec::new();
        let mut answered = Vec::new();
        for (index, client) in std::mem::take(&mut g.ready_reads) {
            if index > applied {
                later.push((index, client));
                continue;
            }
            let ForwardOp::Read { offset, len } = client.op else {
                answered.push(client);
                continue;
            };
            if !self.dio.has_room() {
                self.io_blocked.insert(bg);
                later.push((index, client));
                continue;
            }
            self.next_id += 1;
            let token = self.next_id;
            self.dio
                .submit(g.data.read_req(token, offset, len))
                .map_err(|source| Error::DataIo {
                    core: self.core,
                    source,
                })?;
            self.io_tokens.insert(
                token,
                IoWhat::Read {
                    bg,
                    client,
                    offset,
                    len,
                },
            );
        }
        g.ready_reads = later;
        for c in answered {
            self.reply(c, Ok(Bytes::new()));
        }
        Ok(())
    }

    fn on_event(&mut self, bg: GroupId, ev: Event) -> Result<()> {
        match ev {
            Event::BecameLeader { term } => {
                info!(bg, term, "became leader");
                self.retry_forwarded_to_others(bg, self.me);
                self.redispatch_parked();
            }
            Event::BecameFollower { term, leader } => {
                debug!(bg, term, ?leader, "following");
                self.abandon_leader_work(bg, "leadership moved");
                if let Some(l) = leader {
                    self.retry_forwarded_to_others(bg, l);
                    self.redispatch_parked();
                }
            }
            Event::LeaderStepDown { term } => {
                info!(bg, term, "stepped down");
                self.abandon_leader_work(bg, "leader stepped down");
            }
            Event::ReadIndexReady { ctx, index } => {
                let g = self.groups.get_mut(&bg).expect("group exists");
                if let Some(c) = g.reads.remove(&ctx) {
                    g.ready_reads.push((index, c));
                }
            }
            Event::ReadIndexFailed { ctx, reason } => {
                let g = self.groups.get_mut(&bg).expect("group exists");
                if let Some(c) = g.reads.remove(&ctx) {
                    self.retry_later(c, format!("read index failed: {reason:?}"));
                }
            }
            Event::SnapshotSuggested { applied } => {
                debug!(bg, applied, "snapshot suggested");
                self.take_snapshot(bg, None);
            }
            Event::ConfigurationCommitted { index, conf } => {
                info!(bg, index, voters = ?conf.voters, "configuration committed");
            }
            Event::ConfChangeDone { result } => info!(bg, ?result, "membership change done"),
            Event::TransferEnded { target, succeeded } => {
                info!(bg, target, succeeded, "leader transfer ended")
            }
        }
        Ok(())
    }

    /// A new leader is known: requests forwarded to another node will not be answered by a
    /// leader (it lost leadership or died), so retry them now instead of waiting for
    /// `forward_timeout_ms`. A write that old node did commit is written again (idempotent).
    fn retry_forwarded_to_others(&mut self, bg: GroupId, leader: NodeId) {
        let stale: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (c, to, _))| c.bg == bg && *to != leader)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some((client, to, _)) = self.forwarded.remove(&id) {
                self.parked.push(Client {
                    last_err: format!("node {to} is no longer the leader"),
                    ..client
                });
            }
        }
    }

    /// Leadership is gone: pending proposals and reads are retried through the new leader.
    fn abandon_leader_work(&mut self, bg: GroupId, why: &str) {
        let g = self.groups.get_mut(&bg).expect("group exists");
        g.proposals.clear();
        let mut clients: Vec<Client> = g.execs.drain().map(|(_, x)| x.client).collect();
        clients.extend(g.reads.drain().map(|(_, c)| c));
        clients.extend(g.ready_reads.drain(..).map(|(_, c)| c));
        for c in clients {
            self.retry_later(c, why.to_string());
        }
    }

    // ------------------------------------------------------------------
    // Snapshots
    // ------------------------------------------------------------------

    /// Starts a snapshot save at the applied index `A` unless one is running (then an on-demand
    /// `reply` waits for that one). Order, as before but with the slow part off the core thread:
    /// a blocking-pool task fdatasyncs the data file (every apply through `A` completed on the
    /// ring before it starts) and, when the meta at `A` is known up front, writes the meta file
    /// atomically; only its completion ([`Core::finish_snapshot`]) tells raft
    /// (`on_snapshot_saved`), whose WAL compaction goes out with the next `ready()`. So the meta
    /// is durable before the WAL is compacted, and a crash at any point restarts from a meta
    /// whose index the data file holds, replaying the log from there (see `block`).
    fn take_snapshot(&mut self, bg: GroupId, reply: Option<oneshot::Sender<Result<Index>>>) {
        let dir = self.dir.clone();
        let Some(g) = self.groups.get_mut(&bg) else {
            if let Some(r) = reply {
                let _ = r.send(Err(Error::UnknownBg { bg }));
            }
            return;
        };
        g.last_snapshot_at = Instant::now();
        if let Some(s) = &mut g.saving {
            reply.into_iter().for_each(|r| s.waiters.push(r));
            return;
        }
        // Not during an install (the data file is being replaced); and only what completed
        // on disk counts as applied (the sync below covers it).
        let applied = g.applier.applied();
        if g.loading.is_some() {
            if let Some(r) = reply {
                let _ = r.send(Ok(g.raft.snapshot_meta().index));
            }
            return;
        }
        if applied <= g.raft.snapshot_meta().index {
            if let Some(r) = reply {
                let _ = r.send(Ok(g.raft.snapshot_meta().index));
            }
            return;
        }
        // The meta `on_snapshot_saved(applied)` will return: the term at `applied` and the
        // configuration in force there, which is the latest one unless a newer one was
        // appended after `applied` (then the meta is written on the core at completion).
        let meta = match g.raft.term_at(applied) {
            Some(term) if g.raft.status().conf_index <= applied => Some(SnapshotMeta {
                index: applied,
                term,
                conf: g.raft.conf().clone(),
            }),
            _ => None,
        };
        g.saving = Some(Saving {
            index: applied,
            waiters: reply.into_iter().collect(),
        });
        debug!(bg, index = applied, "snapshot save started");
        // A duplicate descriptor of the data file: fdatasync flushes the file, whichever
        // descriptor asks. A failure to get one is reported like a failed sync (fatal).
        let file = g.data.try_clone_file();
        let lock = g.meta_epoch.clone();
        let epoch = *lock_epoch(&lock);
        let tx = self.internal_tx.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<Option<SnapshotMeta>> {
            file?.sync_in_ranges(SNAPSHOT_WRITEBACK_RANGE_BYTES)?;
            let Some(m) = meta else { return Ok(None) };
            let e = lock_epoch(&lock);
            if *e != epoch {
                return Ok(None);
            }
            block::write_meta(&dir, bg, &m)?;
            Ok(Some(m))
        });
        tokio::task::spawn_local(async move {
            let (meta, result) = match job.await {
                Ok(Ok(m)) => (m, Ok(())),
                Ok(Err(e)) => (None, Err(e)),
                Err(e) => (
                    None,
                    Err(Error::Config {
                        what: format!("bg {bg}: snapshot save task failed: {e}"),
                    }),
                ),
            };
            // The loop outlives its tasks but for shutdown, where the save is moot: the WAL
            // was not compacted, so a restart replays from the previous (or this) meta.
            let _ = tx.send(Internal::SnapshotSaved {
                bg,
                index: applied,
                meta,
                result,
            });
        });
    }

    /// The data file is durable through `index` (and `meta`, if any, is on disk): tell raft,
    /// which queues the WAL compaction for the next `ready()`, and answer the waiters.
    fn finish_snapshot(
        &mut self,
        bg: GroupId,
        index: Index,
        written: Option<SnapshotMeta>,
        result: Result<()>,
    ) -> Result<()> {
        // A failed data-file sync or meta write leaves the group's durability unknown: fatal
        // for the core, as before (`run` fails every request still waiting).
        result?;
        let dir = self.dir.clone();
        let Some(g) = self.groups.get_mut(&bg) else {
            return Ok(());
        };
        let waiters = g.saving.take().map_or_else(Vec::new, |s| {
            debug_assert_eq!(s.index, index);
            s.waiters
        });
        let current = g.raft.snapshot_meta().index;
        let answer = if index <= current || g.loading.is_some() {
            // A snapshot was (or is being) installed meanwhile; its meta is (or will be) on
            // disk (the save skipped its own meta write, see `meta_epoch`) and the data file
            // is the installed one.
            current
        } else {
            match g.raft.on_snapshot_saved(index) {
                Ok(meta) => {
                    if written.as_ref() != Some(&meta) {
                        // The configuration changed after `index` was applied (or the term
                        // was unknown): write the meta here, still before the compaction.
                        block::write_meta(&dir, bg, &meta)?;
                    }
                    info!(bg, index = meta.index, term = meta.term, "snapshot saved");
                    self.dirty.insert(bg);
                    meta.index
                }
                Err(e) => {
                    // The meta file (if written) records `index`, which the synced data file
                    // holds; the WAL was not compacted, so a restart replays from there.
                    warn!(bg, index, error = %e, "snapshot not taken");
                    g.raft.snapshot_meta().index
                }
            }
        };
        for w in waiters {
            let _ = w.send(Ok(answer));
        }
        Ok(())
    }

    fn start_snapshot_send(
        &mut self,
        bg: GroupId,
        peer: NodeId,
        meta: SnapshotMeta,
        msg: Message,
    ) -> Result<()> {
        let g = self.groups.get_mut(&bg).expect("group exists");
        if !g.sending.insert(peer) {
            return Ok(());
        }
        let file = g.data.reopen_read_only()?;
        let size = g.data.size();
        let transport = self.transport.clone();
        let tx = self.internal_tx.clone();
        info!(
            bg,
            peer,
            index = meta.index,
            bytes = size,
            "streaming snapshot"
        );
        tokio::task::spawn_local(async move {
            let mut src = FileSource(file);
            let result = transport
                .send_snapshot(peer, bg, meta.index, size, &mut src)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Internal::SnapshotSent {
                bg,
                peer,
                msg,
                result,
            });
        });
        Ok(())
    }

    /// Follower: raft asks to install a received snapshot. The group stops applying and
    /// serving (LOADING); once the applies handed out before are done, `maybe_start_install`
    /// runs the install off the core thread.
    fn install_snapshot(&mut self, bg: GroupId, meta: SnapshotMeta) -> Result<()> {
        let g = self.groups.get_mut(&bg).expect("group exists");
        if !self.incoming.is_complete(bg, meta.index) {
            // Unreachable through `step`'s gate; without data the install cannot complete.
            error!(
                bg,
                index = meta.index,
                "asked to install a snapshot whose data is missing"
            );
            return Ok(());
        }
        // No new transfer may truncate the copy from now on (see `block`'s install protocol).
        self.incoming.begin_install(bg);
        info!(
            bg,
            index = meta.index,
            term = meta.term,
            "installing snapshot"
        );
        g.loading = Some(Loading {
            meta,
            started: false,
        });
        Ok(())
    }

    /// Starts the install job of a LOADING group whose earlier applies all completed: on the
    /// blocking pool, holding the group's meta lock, it runs the crash-safe protocol of
    /// `block::install_snapshot_files` and reopens the data file; the core's other groups keep
    /// running meanwhile. `finish_install` takes it from there.
    fn maybe_start_install(&mut self, bg: GroupId) {
        let Some(g) = self.groups.get_mut(&bg) else {
            return;
        };
        let Some(loading) = g.loading.as_mut() else {
            return;
        };
        if loading.started || !g.applier.is_idle() {
            return;
        }
        loading.started = true;
        let meta = loading.meta.clone();
        let dir = self.dir.clone();
        let size = g.spec.size_bytes;
        let direct = self.cfg.data_direct_io;
        let preallocate = g.spec.preallocate;
        let lock = g.meta_epoch.clone();
        let tx = self.internal_tx.clone();
        let job_meta = meta.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<DataFile> {
            let mut epoch = lock_epoch(&lock);
            *epoch += 1;
            block::install_snapshot_files(&dir, bg, &job_meta)?;
            drop(epoch);
            DataFile::open(&dir, bg, size, direct, preallocate)
        });
        tokio::task::spawn_local(async move {
            let result = match job.await {
                Ok(r) => r,
                Err(e) => Err(Error::Config {
                    what: format!("bg {bg}: snapshot install task failed: {e}"),
                }),
            };
            // Only fails at shutdown; a restart completes the install (`recover_install`).
            let _ = tx.send(Internal::SnapshotLoaded { bg, meta, result });
        });
    }

    /// The installed data file and meta are durable: the group resumes from the snapshot.
    fn finish_install(
        &mut self,
        bg: GroupId,
        meta: SnapshotMeta,
        result: Result<DataFile>,
    ) -> Result<()> {
        // A failed install leaves the group's files in an unknown state: fatal for the core;
        // the restart finishes the install from its marker.
        let data = result?;
        let g = self.groups.get_mut(&bg).expect("group exists");
        debug_assert_eq!(g.loading.as_ref().map(|l| &l.meta), Some(&meta));
        g.data = data;
        g.applier.reset(meta.index);
        g.loading = None;
        self.incoming.take(bg);
        info!(
            bg,
            index = meta.index,
            term = meta.term,
            "snapshot installed"
        );
        g.raft.on_snapshot_installed(meta);
        g.last_snapshot_at = Instant::now();
        self.dirty.insert(bg);
        Ok(())
    }

    // ------------------------------------------------------------------
    // Status and shutdown
    // ------------------------------------------------------------------

    fn links(&self) -> Vec<LinkStat> {
        self.cfg
            .peers
            .keys()
            .filter_map(|&peer| {
                let p = self.transport.peer_stats(peer)?;
                Some(LinkStat {
                    core: self.core,
                    peer,
                    connected: p.connected,
                    frames_sent: p.frames_sent,
                    frames_received: p.frames_received,
                    frames_dropped: p.frames_dropped,
                    bytes_sent: p.bytes_sent,
                    udp_datagrams_sent: p.udp_datagrams_sent,
                    udp_datagrams_received: p.udp_datagrams_received,
                    lost_packets: p.lost_packets,
                    udp_payload_bytes: p.udp_payload_bytes,
                    rtt_us: p.rtt_us,
                })
            })
            .collect()
    }

    fn status(&self) -> Vec<BgStatus> {
        self.groups
            .values()
            .map(|g| {
                let s = g.raft.status();
                let download = match self.incoming.progress(g.spec.id) {
                    Some((done, total, false)) => (done, total),
                    _ => (0, 0),
                };
                let snapshot_status = match self.incoming.progress(g.spec.id) {
                    _ if g.loading.is_some() => "LOADING".to_string(),
                    Some((done, total, false)) => format!("DOWNLOADING {done}/{total}"),
                    _ if g.saving.is_some() => "SAVING".to_string(),
                    _ if !g.sending.is_empty() => format!("SENDING to {:?}", g.sending),
                    _ => "IDLE".to_string(),
                };
                BgStatus {
                    bg: g.spec.id,
                    name: g.spec.name(),
                    core: self.core,
                    node: s.id,
                    state: s.state.name().to_string(),
                    term: s.term,
                    leader: s.leader,
                    voters: s.conf.voters.iter().copied().collect(),
                    conf_index: s.conf_index,
                    conf_changing: s.conf_change_in_progress,
                    first_log_index: s.first_log_index,
                    last_log_index: s.last_log_index,
                    disk_index: s.disk_index,
                    known_applied_index: s.known_applied_index,
                    last_committed_index: s.last_committed_index,
                    last_snapshot_index: s.last_snapshot_index,
                    last_snapshot_term: s.last_snapshot_term,
                    readonly: s.readonly,
                    snapshot_status,
                    size_bytes: g.spec.size_bytes,
                    pending_requests: g.execs.len() + g.reads.len() + g.ready_reads.len(),
                    log_bytes: g.raft.log_bytes(),
                    hibernating: self.hib.asleep(g.spec.id),
                    member: s.conf.contains(s.id),
                    allocated_bytes: g.data.allocated_bytes(),
                    disk_id: s.disk,
                    rebuilding: s.rebuilding,
                    rebuild_bytes_done: download.0,
                    rebuild_bytes_total: download.1,
                    under_replicated: s.peers.iter().any(|p| p.rebuilding),
                    peers: s
                        .peers
                        .iter()
                        .map(|p| PeerStat {
                            id: p.id,
                            next_index: p.next_index,
                            match_index: p.match_index,
                            state: p.state.name().to_string(),
                            connected: self.transport.is_connected(p.id),
                            voter: p.voter,
                            disk_id: p.disk,
                            counted: p.counted,
                            rebuilding: p.rebuilding,
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn fail_everything(&mut self, core: usize) {
        let mut clients: Vec<Client> = std::mem::take(&mut self.parked);
        clients.extend(self.forwarded.drain().map(|(_, (c, _, _))| c));
        for g in self.groups.values_mut() {
            clients.extend(g.execs.drain().map(|(_, x)| x.client));
            clients.extend(g.reads.drain().map(|(_, c)| c));
            clients.extend(g.ready_reads.drain(..).map(|(_, c)| c));
        }
        for c in clients {
            let bg = c.bg;
            self.reply(c, Err(Error::ShuttingDown { bg, core }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_gets_the_engines_wal_settings() {
        let mut cfg = EngineConfig::new(1, "/d".into(), "127.0.0.1:7000".parse().unwrap());
        let w = wal_config(&cfg, std::path::Path::new("/d/core-0"));
        let defaults = WalConfig::new("x");
        assert_eq!(w.dir, std::path::Path::new("/d/core-0/wal"));
        assert_eq!(w.batches_in_flight_max, defaults.batches_in_flight_max);
        assert_eq!(
            w.small_batches_in_flight_max,
            defaults.small_batches_in_flight_max
        );
        cfg.wal_batches_in_flight_max = 7;
        cfg.wal_small_batches_in_flight_max = 3;
        cfg.wal_segment_bytes_max = 32 << 20;
        cfg.raft_sync = false;
        cfg.wal_direct_io = false;
        cfg.wal_segment_zero_fill = false;
        let w = wal_config(&cfg, std::path::Path::new("/d/core-0"));
        assert_eq!(
            (w.batches_in_flight_max, w.small_batches_in_flight_max),
            (7, 3)
        );
        assert_eq!(w.log_segment_bytes_max, 32 << 20);
        assert!(!w.raft_sync && !w.direct_io && !w.segment_zero_fill);
    }
}
