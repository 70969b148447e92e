//! The raft state machine of one group.
//!
//! Everything here is a function of the inputs: `tick`, `step`, proposals,
//! admin requests and storage completions. Outputs accumulate until the host
//! calls [`RaftNode::ready`]. The only source of randomness (election jitter)
//! is the injected [`RandomSource`].
//!
//! Durability protocol: every change of term, vote or log goes into a
//! [`Write`] with a sequence number. Messages whose meaning depends on that
//! state being durable (votes, append acknowledgements, anything a follower
//! or candidate says) are held until the host reports the write durable with
//! [`RaftNode::on_write_durable`]. A leader sends AppendEntries before its
//! own write completes (it persists in parallel with replication) and counts
//! itself toward a quorum only for entries that are durable.

use super::log::MemLog;
use super::message::{ConfChangeError, Event, Message, MessageBody, ReadFailure, Ready, Write};
use super::progress::{Progress, ProgressState};
use super::types::{
    Configuration, DiskId, Entry, EntryKind, GroupId, HardState, Index, NodeId, SnapshotMeta, Term,
};
use crate::Error;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod identity;

/// Election jitter source. Hosts pass a seeded generator (the simulator) or
/// one seeded from the OS (a server).
pub trait RandomSource: Send {
    fn next_u64(&mut self) -> u64;
}

/// SplitMix64: a tiny seeded generator good enough for election jitter.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl RandomSource for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Test-only: break one safety rule on purpose so that tests can prove the
/// simulator notices. Never set outside tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BrokenRule {
    #[default]
    None,
    /// Commit an entry of an earlier term by counting replicas (the bug of
    /// Figure 8 in the Raft paper).
    CommitPreviousTermByCount,
    /// Grant votes (and pre-votes) without checking the candidate's log.
    VoteSkipsLogCheck,
    /// A leader resumed after hibernation keeps the lease of the rounds a
    /// quorum acknowledged before its pause (its clock stood still, so the
    /// lease looks fresh while the others may have elected a new leader).
    ResumeKeepsLease,
    /// A new leader starts membership changes before an entry of its term
    /// has committed (the single-server change bug, see `conf_for_change`).
    ConfChangeBeforeTermCommit,
    /// Ignore storage identities: a replica that came back with empty
    /// storage votes at once (no first-election-timeout wait) and is
    /// counted like the member that voted and acknowledged before it.
    AmnesiacVotes,
}

/// Settings of one group. Times are in ticks of the host's clock.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// Base election timeout; each wait is drawn from [base, 2 * base).
    pub election_timeout_ticks: u32,
    /// Leader heartbeat period (braft: election timeout / heartbeat factor).
    pub heartbeat_interval_ticks: u32,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Serve `lease_read` from the leader lease (requires `check_quorum`).
    pub lease_read: bool,
    /// Upper bound of clock drift between replicas over one election
    /// timeout; the lease is `election_timeout_ticks - max_clock_drift_ticks`.
    pub max_clock_drift_ticks: u32,
    pub append_entries_max: usize,
    pub append_bytes_max: usize,
    pub inflight_messages_max: usize,
    pub inflight_bytes_max: usize,
    /// A new peer is caught up when within this many entries of the leader.
    pub catchup_margin: u64,
    pub catchup_timeout_ticks: u32,
    /// A snapshot send with no answer for this long is retried.
    pub snapshot_timeout_ticks: u32,
    /// Suggest a snapshot when the log since the last one exceeds this.
    pub snapshot_log_bytes_max: usize,
    /// Entries kept below a new snapshot for followers that lag a little.
    pub snapshot_keep_entries: u64,
    /// ... but no more than this many bytes of them: with large entries the count alone
    /// could keep hundreds of MiB in memory per group (1024 entries of 256 KiB).
    pub snapshot_keep_bytes_max: usize,
    /// Proposals accepted but not yet committed, at most.
    pub uncommitted_entries_max: usize,
    pub apply_batch_entries_max: usize,
    pub read_queue_max: usize,
    #[doc(hidden)]
    pub broken_rule: BrokenRule,
}

impl Default for RaftConfig {
    fn default() -> RaftConfig {
        RaftConfig {
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            lease_read: true,
            max_clock_drift_ticks: 2,
            append_entries_max: 256,
            append_bytes_max: 1 << 20,
            inflight_messages_max: 64,
            inflight_bytes_max: 16 << 20,
            catchup_margin: 100,
            catchup_timeout_ticks: 100,
            snapshot_timeout_ticks: 200,
            snapshot_log_bytes_max: 64 << 20,
            snapshot_keep_entries: 1024,
            snapshot_keep_bytes_max: 16 << 20,
            uncommitted_entries_max: 4096,
            apply_batch_entries_max: 1024,
            read_queue_max: 4096,
            broken_rule: BrokenRule::None,
        }
    }
}

impl RaftConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.election_timeout_ticks < 2 {
            return Err("election_timeout_ticks must be at least 2".into());
        }
        if self.heartbeat_interval_ticks == 0
            || self.heartbeat_interval_ticks >= self.election_timeout_ticks
        {
            return Err("heartbeat_interval_ticks must be in 1..election_timeout_ticks".into());
        }
        if self.max_clock_drift_ticks >= self.election_timeout_ticks {
            return Err("max_clock_drift_ticks must be below election_timeout_ticks".into());
        }
        if self.lease_read && !self.check_quorum {
            return Err("lease_read requires check_quorum".into());
        }
        for (name, v) in [
            ("append_entries_max", self.append_entries_max),
            ("append_bytes_max", self.append_bytes_max),
            ("inflight_messages_max", self.inflight_messages_max),
            ("inflight_bytes_max", self.inflight_bytes_max),
            ("uncommitted_entries_max", self.uncommitted_entries_max),
            ("apply_batch_entries_max", self.apply_batch_entries_max),
            ("read_queue_max", self.read_queue_max),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

/// What a node starts from: the durable state the host recovered.
#[derive(Clone, Debug, Default)]
pub struct Restore {
    pub hard_state: HardState,
    /// The latest durable snapshot (its data already loaded by the host).
    pub snapshot: Option<SnapshotMeta>,
    /// The log store's compaction point and the entries after it.
    pub compacted: (Index, Term),
    pub entries: Vec<Entry>,
    /// The initial configuration, used when neither the snapshot nor the
    /// log holds one (braft's initial_conf). Empty for a node that should
    /// wait to be added by a leader.
    pub bootstrap: Configuration,
    /// The disk id to take when `hard_state.disk` is 0 (new storage): a
    /// random non-zero value drawn by the host. Required then.
    pub new_disk: DiskId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "FOLLOWER",
            Role::PreCandidate => "PRE_CANDIDATE",
            Role::Candidate => "CANDIDATE",
            Role::Leader => "LEADER",
        }
    }
}

/// Result of a membership request that was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChangeStart {
    /// Running; `Event::ConfChangeDone` reports the outcome.
    Started,
    /// The requested configuration is the current one: nothing to do.
    NoOp,
}

/// braft's raft_stat for one follower, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: NodeId,
    pub next_index: Index,
    pub match_index: Index,
    pub state: ProgressState,
    pub voter: bool,
    pub readonly: bool,
    /// The disk id the peer answers with (0 = not heard from this term).
    pub disk: DiskId,
    /// Counted toward quorums: a voter answering with the disk id it is bound to.
    pub counted: bool,
    /// Being rebuilt: a learner the leader makes a voter again once it holds
    /// the committed log, or a voter whose storage was found replaced (or
    /// behind what it acknowledged) and is about to become one.
    pub rebuilding: bool,
}

/// braft's raft_stat fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub group: GroupId,
    pub id: NodeId,
    pub state: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub conf: Configuration,
    pub conf_index: Index,
    pub first_log_index: Index,
    pub last_log_index: Index,
    /// Last index durable on this node's disk.
    pub disk_index: Index,
    pub known_applied_index: Index,
    pub last_committed_index: Index,
    pub last_snapshot_index: Index,
    pub last_snapshot_term: Term,
    pub readonly: bool,
    pub transferring_to: Option<NodeId>,
    pub conf_change_in_progress: bool,
    pub peers: Vec<PeerStatus>,
    /// This replica's storage identity.
    pub disk: DiskId,
    /// This replica's configuration does not count it as the member it
    /// names (bound to another disk id, or a rebuilding learner): it neither
    /// votes nor campaigns until the leader makes it a voter again.
    pub rebuilding: bool,
}

#[derive(Debug)]
struct PendingRead {
    ctx: u64,
    /// Commit index when the read arrived (filled in once the leader has
    /// committed an entry of its term).
    index: Index,
    round: u64,
}

#[derive(Debug)]
enum ConfPhase {
    /// New voters receive the log as non-voters until they are close.
    CatchingUp { target: Configuration, ticks: u32 },
    /// The entry at `index` (joint or final) is appended, not yet committed.
    Appended { index: Index, target: Configuration },
}

#[derive(Debug)]
struct Transfer {
    target: NodeId,
    ticks: u32,
    timeout_now_sent: bool,
}

/// A write handed to the host and not yet durable: its seq, the last index
/// and term it wrote, and the messages to release once it is durable.
type InflightWrite = (u64, Option<(Index, Term)>, Vec<Message>);

pub struct RaftNode {
    id: NodeId,
    group: GroupId,
    cfg: RaftConfig,
    rng: Box<dyn RandomSource>,
    /// This replica's storage identity (durable in its hard state).
    disk: DiskId,
    /// The disk id was drawn at this start (the storage was new).
    fresh_disk: bool,

    role: Role,
    term: Term,
    vote: NodeId,
    leader: Option<NodeId>,
    log: MemLog,
    commit: Index,
    /// Entries up to here were handed to the host for applying.
    applied: Index,
    /// Entries up to here are durable locally.
    durable: Index,
    snapshot: SnapshotMeta,

    // Timers (ticks).
    election_elapsed: u32,
    randomized_timeout: u32,
    heartbeat_elapsed: u32,
    /// Ticks since this node started (votes are withheld during the first
    /// election timeout: a restarted node may have acknowledged a leader
    /// whose lease is still running).
    uptime_ticks: u64,
    /// Monotonic tick counter for leases.
    now: u64,

    votes: BTreeMap<NodeId, bool>,
    /// Candidate: the disk id each voter answered with (the new leader binds them).
    vote_disks: BTreeMap<NodeId, DiskId>,
    /// Candidate: the write carrying our own vote is not durable yet.
    self_vote_seq: Option<u64>,
    /// Follower: the highest heartbeat round of this term's leader processed
    /// since start; responses carry it (see `Progress::match_round`).
    round_seen: u64,

    progress: BTreeMap<NodeId, Progress>,
    /// Leader: round number of the latest heartbeat broadcast, and the tick
    /// at which each recent round started (for the lease).
    round: u64,
    round_ticks: VecDeque<(u64, u64)>,
    /// Leader: the round in progress when the commit index or a follower's
    /// match index last moved. Heartbeats carry the commit index, so a
    /// follower that acknowledged a later round has learned the settled
    /// commit index (see [`RaftNode::quiescent`]).
    settled_round: u64,
    pending_reads: VecDeque<PendingRead>,
    /// Leader: a TimeoutNow went out this term, so the lease can no longer
    /// be trusted (the target may win without waiting for the lease).
    lease_broken: bool,
    transfer: Option<Transfer>,
    conf_change: Option<ConfPhase>,
    /// reset_peers overrode the configuration; a leader writes it out.
    conf_forced: bool,
    readonly_self: bool,
    /// Follower: a snapshot is being installed by the host.
    installing: Option<SnapshotMeta>,
    snapshot_suggested_at: usize,
    /// Bytes of the in-memory log at or below the snapshot index (the kept
    /// margin): they do not count toward the next snapshot suggestion.
    bytes_below_snapshot: usize,

    // Outputs.
    next_write_seq: u64,
    write: Write,
    inflight_writes: VecDeque<InflightWrite>,
    msgs: Vec<Message>,
    held_msgs: Vec<Message>,
    events: Vec<Event>,
    snapshot_to_install: Option<SnapshotMeta>,
    /// Leader: new entries to broadcast at the next `ready`.
    need_broadcast: bool,
    /// Leader: a read is waiting for a new heartbeat round.
    read_round_wanted: bool,
    /// Sender of the message being stepped (a transfer succeeded when the
    /// target is the one who deposed us).
    stepping_from: NodeId,
}

impl RaftNode {
    pub fn new(
        group: GroupId,
        id: NodeId,
        cfg: RaftConfig,
        rng: Box<dyn RandomSource>,
        restore: Restore,
    ) -> Result<RaftNode, Error> {
        if id == 0 {
            return Err(Error::Invalid {
                group,
                what: "node id 0 is reserved".into(),
            });
        }
        cfg.validate()
            .map_err(|what| Error::Invalid { group, what })?;
        let fresh_disk = restore.hard_state.disk == 0;
        let disk = if fresh_disk {
            restore.new_disk
        } else {
            restore.hard_state.disk
        };
        if disk == 0 {
            return Err(Error::Invalid {
                group,
                what: "new storage needs a non-zero disk id (Restore::new_disk)".into(),
            });
        }
        let snapshot = restore.snapshot.clone().unwrap_or_default();
        let (mut c_index, mut c_term) = restore.compacted;
        let mut entries = restore.entries;
        // Set when the store's log must be discarded in favour of the snapshot.
        let mut stale_log = false;
        // A snapshot newer than the log's compaction point: keep the log
        // suffix only if it matches the snapshot.
        if snapshot.index > c_index {
            let matches = entries
                .iter()
                .find(|e| e.index == snapshot.index)
                .is_some_and(|e| e.term == snapshot.term);
            // A matching log also keeps its entries below the snapshot (the
            // snapshot_keep_entries kept for lagging followers).
            if !matches {
                entries.clear();
                c_index = snapshot.index;
                c_term = snapshot.term;
                stale_log = true;
            }
        }
        let base_conf = if restore.snapshot.is_some() {
            snapshot.conf.clone()
        } else {
            restore.bootstrap.clone()
        };
        let mut log = MemLog::new(c_index, c_term, base_conf);
        for e in entries {
            if e.index <= c_index {
                continue;
            }
            log.append(e);
        }
        let durable = log.last_index();
        let mut node = RaftNode {
            id,
            group,
            cfg,
            rng,
            disk,
            fresh_disk,
            role: Role::Follower,
            term: restore.hard_state.term,
            vote: restore.hard_state.vote,
            leader: None,
            commit: snapshot.index,
            applied: snapshot.index,
            durable,
            snapshot,
            log,
            election_elapsed: 0,
            randomized_timeout: 0,
            heartbeat_elapsed: 0,
            uptime_ticks: 0,
            now: 0,
            votes: BTreeMap::new(),
            vote_disks: BTreeMap::new(),
            self_vote_seq: None,
            round_seen: 0,
            progress: BTreeMap::new(),
            round: 0,
            round_ticks: VecDeque::new(),
            settled_round: 0,
            pending_reads: VecDeque::new(),
            lease_broken: false,
            transfer: None,
            conf_change: None,
            conf_forced: false,
            readonly_self: false,
            installing: None,
            snapshot_suggested_at: 0,
            bytes_below_snapshot: 0,
            next_write_seq: 1,
            write: Write::default(),
            inflight_writes: VecDeque::new(),
            msgs: Vec::new(),
            held_msgs: Vec::new(),
            events: Vec::new(),
            snapshot_to_install: None,
            need_broadcast: false,
            read_round_wanted: false,
            stepping_from: 0,
        };
        node.note_snapshot_bytes();
        node.reset_election_timer();
        if stale_log {
            // The store still holds a log that does not reach the snapshot
            // (a crash before the compaction was durable): have the host
            // discard it, or the next append would not attach.
            node.write.compact = Some((c_index, c_term));
        }
        if fresh_disk {
            // The first write makes the new disk id durable with the rest of the raft meta.
            node.persist_hard_state();
        }
        Ok(node)
    }

    // ------------------------------------------------------------------
    // Accessors
    // ------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn group(&self) -> GroupId {
        self.group
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn commit_index(&self) -> Index {
        self.commit
    }
    pub fn applied_index(&self) -> Index {
        self.applied
    }
    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }
    pub fn durable_index(&self) -> Index {
        self.durable
    }
    /// This replica's storage identity.
    pub fn disk(&self) -> DiskId {
        self.disk
    }

    /// Whether `id` takes part in the group as this node sees it: a member of its
    /// configuration, or a peer this leader is bringing in (catching up before its
    /// configuration entry is appended). A host that admits only members' messages must admit
    /// these too, or a new peer's acknowledgements never reach the leader and the change
    /// times out.
    pub fn is_peer(&self, id: NodeId) -> bool {
        self.conf().contains(id)
            || matches!(
                &self.conf_change,
                Some(ConfPhase::CatchingUp { target, .. } | ConfPhase::Appended { target, .. })
                    if target.contains(id)
            )
    }

    pub fn conf(&self) -> &Configuration {
        self.log.last_conf().1
    }
    /// Index of the entry that holds [`conf`](Self::conf) (0: the bootstrap one).
    pub fn conf_index(&self) -> Index {
        self.log.last_conf().0
    }
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.snapshot
    }
    pub fn config(&self) -> &RaftConfig {
        &self.cfg
    }
    /// Term of the entry at `index`, if the in-memory log still holds it.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        self.log.term(index)
    }
    pub fn entry(&self, index: Index) -> Option<&Entry> {
        self.log.entry(index)
    }
    pub fn first_index(&self) -> Index {
        self.log.first_index()
    }
    pub fn is_readonly(&self) -> bool {
        if self.readonly_self {
            return true;
        }
        if self.role != Role::Leader {
            return false;
        }
        let conf = self.conf();
        !conf.has_quorum(|id| {
            if id == self.id {
                !self.readonly_self
            } else {
                self.progress.get(&id).is_some_and(|p| !p.readonly)
            }
        })
    }

    /// Bytes of entry payload this group holds in memory (its whole log since the compaction
    /// point). Hosts running many groups budget this (e.g. by taking snapshots of the largest).
    pub fn log_bytes(&self) -> usize {
        self.log.bytes()
    }

    /// Bytes of the log above the last snapshot: what a new snapshot could free (less the
    /// entries it keeps below itself and those not yet applied).
    pub fn log_bytes_since_snapshot(&self) -> usize {
        self.log.bytes() - self.bytes_below_snapshot
    }

    pub fn status(&self) -> Status {
        let (conf_index, conf) = self.log.last_conf();
        let peers = if self.role == Role::Leader {
            self.progress
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, p)| PeerStatus {
                    id: *id,
                    next_index: p.next_index,
                    match_index: p.match_index,
                    state: p.state,
                    voter: conf.is_voter(*id),
                    readonly: p.readonly,
                    disk: p.disk,
                    counted: conf.is_voter(*id) && self.counts(*id),
                    rebuilding: conf.rebuilding.contains(id)
                        || (conf.is_voter(*id) && self.replaced(*id)),
                })
                .collect()
        } else {
            Vec::new()
        };
        Status {
            group: self.group,
            id: self.id,
            state: self.role,
            term: self.term,
            leader: self.leader,
            conf: conf.clone(),
            conf_index,
            first_log_index: self.log.first_index(),
            last_log_index: self.log.last_index(),
            disk_index: self.durable,
            known_applied_index: self.applied,
            last_committed_index: self.commit,
            last_snapshot_index: self.snapshot.index,
            last_snapshot_term: self.snapshot.term,
            readonly: self.is_readonly(),
            transferring_to: self.transfer.as_ref().map(|t| t.target),
            conf_change_in_progress: self.conf_change.is_some(),
            peers,
            disk: self.disk,
            rebuilding: !self.disk_ok(conf) || conf.rebuilding.contains(&self.id),
        }
    }

    // ------------------------------------------------------------------
    // Outputs
    // ------------------------------------------------------------------

    /// Whether `ready` would return anything.
    pub fn has_ready(&self) -> bool {
        !self.write.is_empty()
            || !self.msgs.is_empty()
            || !self.held_msgs.is_empty()
            || !self.events.is_empty()
            || self.snapshot_ready_to_install()
            || self.need_broadcast
            || self.read_round_wanted
            || self.applied < self.apply_limit()
    }

    /// A snapshot to install is handed to the host only once every write made before it is
    /// durable. The install makes the snapshot durable by itself (data and meta files), while
    /// the term the snapshot came with travels in a hard-state write: installing first, a crash
    /// in between would restart the node with a snapshot from a term above its stored term.
    fn snapshot_ready_to_install(&self) -> bool {
        self.snapshot_to_install.is_some() && self.inflight_writes.is_empty()
    }

    fn apply_limit(&self) -> Index {
        if self.installing.is_some() {
            return self.applied;
        }
        self.commit.min(self.durable)
    }

    /// Drains everything produced since the last call.
    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader && self.need_broadcast {
            self.need_broadcast = false;
            self.broadcast_append();
        }
        if self.role == Role::Leader && self.read_round_wanted {
            self.read_round_wanted = false;
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
        let mut rd = Ready::default();
        let held = std::mem::take(&mut self.held_msgs);
        if !self.write.is_empty() || !held.is_empty() {
            let mut w = std::mem::take(&mut self.write);
            w.seq = self.next_write_seq;
            self.next_write_seq += 1;
            let last = w.entries.last().map(|e| (e.index, e.term));
            self.inflight_writes.push_back((w.seq, last, held));
            rd.write = Some(w);
        }
        rd.messages = std::mem::take(&mut self.msgs);
        let limit = self.apply_limit();
        if self.applied < limit {
            let hi = limit.min(self.applied + self.cfg.apply_batch_entries_max as Index);
            rd.committed_entries = self.log.slice(self.applied + 1, hi, usize::MAX, usize::MAX);
            for e in rd
                .committed_entries
                .iter()
                .filter(|e| e.kind == EntryKind::Config)
            {
                let conf = Configuration::decode(&e.data).expect("config entry decodes");
                self.events.push(Event::ConfigurationCommitted {
                    index: e.index,
                    conf,
                });
            }
            self.applied = hi;
            self.after_apply(hi);
        }
        // After this ready's own write was queued above: that write must be durable too.
        if self.snapshot_ready_to_install() {
            rd.snapshot_to_install = self.snapshot_to_install.take();
        }
        rd.events = std::mem::take(&mut self.events);
        rd
    }

    /// The host made write `seq` (and every earlier one) durable.
    pub fn on_write_durable(&mut self, seq: u64) {
        while let Some((s, _, _)) = self.inflight_writes.front() {
            if *s > seq {
                break;
            }
            let (s, last, msgs) = self.inflight_writes.pop_front().expect("front");
            if let Some((index, term)) = last {
                // A later truncation may have replaced these entries.
                if self.log.term(index) == Some(term) && index > self.durable {
                    self.durable = index;
                }
            }
            self.msgs.extend(msgs);
            if self.self_vote_seq.is_some_and(|v| v <= s) {
                self.self_vote_seq = None;
                if self.role == Role::Candidate || self.role == Role::PreCandidate {
                    self.votes.insert(self.id, true);
                    self.check_election();
                }
            }
        }
        if self.role == Role::Leader {
            let d = self.durable;
            if let Some(p) = self.progress.get_mut(&self.id) {
                p.maybe_update(d);
            }
            self.maybe_commit();
        }
    }

    /// A message from this replica (its disk id, and the one its
    /// configuration binds `to` to).
    fn message(&self, to: NodeId, term: Term, body: MessageBody) -> Message {
        Message {
            group: self.group,
            from: self.id,
            to,
            term,
            disk: self.disk,
            to_disk: self.conf().disk(to),
            body,
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        let m = self.message(to, self.term, body);
        self.msgs.push(m);
    }

    /// Sends `body` once everything written so far is durable.
    fn send_after_write(&mut self, to: NodeId, body: MessageBody) {
        let m = self.message(to, self.term, body);
        self.held_msgs.push(m);
    }

    fn persist_hard_state(&mut self) {
        self.write.hard_state = Some(HardState {
            term: self.term,
            vote: self.vote,
            disk: self.disk,
        });
    }

    // ------------------------------------------------------------------
    // Time
    // ------------------------------------------------------------------

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let base = self.cfg.election_timeout_ticks;
        self.randomized_timeout = base + (self.rng.next_u64() % base as u64) as u32;
    }

    pub fn tick(&mut self) {
        self.now += 1;
        self.uptime_ticks += 1;
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => {
                if self.election_elapsed >= self.randomized_timeout && self.can_campaign() {
                    self.campaign(false);
                }
            }
        }
    }

    /// A node campaigns if it votes in its latest configuration, or in the
    /// latest committed one: a leader that appended its own removal and then
    /// crashed may hold the longest log, and without it campaigning (votes
    /// are still counted by the latest configuration, which ignores its own)
    /// the others, who cannot win its vote, would wait forever.
    ///
    /// A configuration that binds this node to another disk id counts it as a
    /// replica it no longer is (its storage was replaced): it does not campaign
    /// by that configuration.
    fn can_campaign(&self) -> bool {
        let committed_conf = self.log.conf_at(self.commit).1;
        let voter_in = |c: &Configuration| c.is_voter(self.id) && self.disk_ok(c);
        (voter_in(self.conf()) || voter_in(committed_conf)) && self.installing.is_none()
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        if self.heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
        for p in self.progress.values_mut() {
            if p.state == ProgressState::Snapshot {
                p.snapshot_ticks += 1;
                if p.snapshot_ticks >= self.cfg.snapshot_timeout_ticks {
                    p.snapshot_failed();
                }
            }
        }
        if self.election_elapsed >= self.cfg.election_timeout_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                let me = self.id;
                let active = |id: NodeId| {
                    id == me
                        || (self.counts(id)
                            && self.progress.get(&id).is_some_and(|p| p.recent_active))
                };
                if !self.conf().has_quorum(active) {
                    self.become_follower(self.term, None);
                    return;
                }
                for p in self.progress.values_mut() {
                    p.recent_active = false;
                }
            }
        }
        if let Some(t) = &mut self.transfer {
            t.ticks += 1;
            if t.ticks >= self.cfg.election_timeout_ticks {
                let target = t.target;
                self.transfer = None;
                self.events.push(Event::TransferEnded {
                    target,
                    succeeded: false,
                });
            }
        }
        let mut abort = false;
        if let Some(ConfPhase::CatchingUp { target, ticks }) = &mut self.conf_change {
            // A new peer is usually built from a snapshot, and streaming a whole volume takes
            // far longer than catching up on a log: the clock stops while a snapshot is on its
            // way to a new voter (the transfer has its own timeout, `snapshot_timeout_ticks`,
            // after which the peer probes again and the clock runs), as braft waits for an
            // installing replicator.
            let current = self.log.last_conf().1;
            let installing = target
                .voters
                .iter()
                .filter(|id| !current.voters.contains(id))
                .any(|id| {
                    self.progress
                        .get(id)
                        .is_some_and(|p| p.state == ProgressState::Snapshot)
                });
            if !installing {
                *ticks += 1;
            }
            abort = *ticks >= self.cfg.catchup_timeout_ticks;
        }
        if abort {
            self.abort_conf_change(ConfChangeError::CatchupTimeout);
        } else {
            self.maybe_finish_catchup();
        }
        self.maybe_rebuild();
    }

    // ------------------------------------------------------------------
    // Hibernation (the host stops ticking idle groups)
    // ------------------------------------------------------------------

    /// Whether the group is idle and settled here, so that the host may stop
    /// ticking it: `Some((last index, its term))`, else `None`.
    ///
    /// Every role needs nothing to hand out (`has_ready` is false), nothing
    /// being written or installed, and a last entry that is durable,
    /// committed and applied. A follower also needs a known leader. A leader
    /// also needs its last entry to be of its own term, no pending read,
    /// transfer or membership change, and every follower and learner
    /// replicating with `match == last`, nothing in flight, and an
    /// acknowledged heartbeat round started after the commit index and the
    /// match indexes last moved (so each follower has learned the commit
    /// index too). A leader and its followers that report the same
    /// `(index, term)` hold identical, fully committed and applied logs.
    pub fn quiescent(&self) -> Option<(Index, Term)> {
        self.quiescent_without(&BTreeSet::new())
    }

    /// [`quiescent`](Self::quiescent), for a leader that leaves out the
    /// members in `absent` (the host knows their nodes are down): they need
    /// not match, as long as the leader and the members it does count are a
    /// majority of the voters. The absent ones catch up by ordinary
    /// replication once the host wakes the group for their return.
    pub fn quiescent_without(&self, absent: &BTreeSet<NodeId>) -> Option<(Index, Term)> {
        if self.has_ready() || !self.inflight_writes.is_empty() || self.installing.is_some() {
            return None;
        }
        let last = self.log.last_index();
        if self.commit != last || self.durable != last || self.applied != last {
            return None;
        }
        let last_term = self.log.last_term();
        let settled = match self.role {
            Role::Follower => self.leader.is_some(),
            Role::Leader => {
                last_term == self.term
                    && self.pending_reads.is_empty()
                    && self.transfer.is_none()
                    && self.conf_change.is_none()
                    && !self.conf_forced
                    && self
                        .conf()
                        .voters
                        .iter()
                        .filter(|v| !absent.contains(v))
                        .count()
                        > self.conf().voters.len() / 2
                    && self
                        .progress
                        .iter()
                        .filter(|(id, _)| **id != self.id && !absent.contains(id))
                        .all(|(_, p)| {
                            p.state == ProgressState::Replicate
                                && p.match_index == last
                                && p.inflight.is_empty()
                                && p.acked_round > self.settled_round
                        })
            }
            Role::PreCandidate | Role::Candidate => false,
        };
        settled.then_some((last, last_term))
    }

    /// The host did not tick this node for a while (it hibernated the
    /// group) and ticks it again from now. The node's clock stood still
    /// meanwhile while real time went on, so:
    ///
    /// - A leader no longer trusts its lease (a round acknowledged before
    ///   the pause may be older than the lease in real time): lease reads
    ///   wait for a round started now. It starts a fresh check-quorum window
    ///   with no follower counted active, so a leader that cannot reach a
    ///   quorum any more steps down one election timeout after waking, and
    ///   it heartbeats at once so that hibernated followers wake and answer.
    /// - A follower keeps its election timer (its leader is presumed alive
    ///   and asleep; the leader's next message resets the timer), unless
    ///   `leader_silent`: the host measured at least an election timeout,
    ///   since its own start, in which nothing at all arrived from the
    ///   leader's node, so nothing from the leader either. The timer then
    ///   counts as expired, as it would be had the node been ticked through
    ///   the silence: it grants votes at once and campaigns within its
    ///   randomized extra wait. The leader's lease (started no later than
    ///   the last message it sent) has run out by then, as with ticking.
    pub fn resume(&mut self, leader_silent: bool) {
        match self.role {
            Role::Leader => {
                if self.cfg.broken_rule != BrokenRule::ResumeKeepsLease {
                    self.round_ticks.clear();
                }
                self.election_elapsed = 0;
                let me = self.id;
                for (id, p) in self.progress.iter_mut() {
                    if *id != me {
                        p.recent_active = false;
                    }
                }
                self.heartbeat_elapsed = 0;
                self.broadcast_heartbeat();
            }
            _ if leader_silent => {
                let et = self.cfg.election_timeout_ticks;
                self.election_elapsed = self.election_elapsed.max(et);
                self.uptime_ticks = self.uptime_ticks.max(et as u64);
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------------
    // Elections
    // ------------------------------------------------------------------

    fn campaign(&mut self, transfer: bool) {
        if self.cfg.pre_vote && !transfer {
            self.become_pre_candidate();
        } else {
            self.become_candidate(transfer);
        }
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.vote_disks.clear();
        self.reset_election_timer();
        self.votes.insert(self.id, true);
        let (li, lt) = (self.log.last_index(), self.log.last_term());
        let voters: Vec<NodeId> = self
            .conf()
            .all_voters()
            .into_iter()
            .filter(|id| *id != self.id)
            .collect();
        for id in voters {
            let body = MessageBody::RequestVote {
                pre_vote: true,
                last_log_index: li,
                last_log_term: lt,
                leadership_transfer: false,
            };
            let m = self.message(id, self.term + 1, body);
            self.held_msgs.push(m);
        }
        self.check_election();
    }

    fn become_candidate(&mut self, transfer: bool) {
        assert_ne!(self.role, Role::Leader, "a leader does not campaign");
        self.role = Role::Candidate;
        self.term += 1;
        self.vote = self.id;
        self.leader = None;
        self.round_seen = 0;
        self.votes.clear();
        self.vote_disks.clear();
        self.reset_election_timer();
        self.persist_hard_state();
        // Our own vote counts only once the write carrying it is durable.
        self.self_vote_seq = Some(self.next_write_seq);
        let (li, lt) = (self.log.last_index(), self.log.last_term());
        let voters: Vec<NodeId> = self
            .conf()
            .all_voters()
            .into_iter()
            .filter(|id| *id != self.id)
            .collect();
        for id in voters {
            self.send_after_write(
                id,
                MessageBody::RequestVote {
                    pre_vote: false,
                    last_log_index: li,
                    last_log_term: lt,
                    leadership_transfer: transfer,
                },
            );
        }
    }

    /// Votes are counted by the latest configuration. While some voter is
    /// unbound (a new group, or one from before disk ids), nobody can tell a
    /// voter that lost its storage (and its vote and log with it) from a new
    /// one, so a majority is not enough: the election needs every voter, and
    /// the winner binds them all to the disks they voted with. Once bound, a
    /// vote counts only from the disk the voter is bound to.
    fn check_election(&mut self) {
        let conf = self.conf().clone();
        let unanimous =
            !conf.all_voters_bound() && self.cfg.broken_rule != BrokenRule::AmnesiacVotes;
        let granted = |id: NodeId| self.votes.get(&id) == Some(&true);
        let won = if unanimous {
            conf.all_voters().into_iter().all(granted)
        } else {
            conf.has_quorum(granted)
        };
        if won {
            match self.role {
                Role::PreCandidate => self.become_candidate(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
            return;
        }
        // Lost: a majority of some voter set rejected us (any voter, when it takes all).
        let rejected = |id: NodeId| self.votes.get(&id) == Some(&false);
        let lost = if unanimous {
            conf.all_voters().into_iter().any(rejected)
        } else {
            !conf.has_quorum(|id| !rejected(id))
        };
        if lost {
            let term = self.term;
            self.become_follower(term, None);
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        let was_leader = self.role == Role::Leader;
        if term > self.term {
            self.term = term;
            self.vote = 0;
            self.round_seen = 0;
            self.persist_hard_state();
        }
        let changed = self.role != Role::Follower || self.leader != leader;
        self.role = Role::Follower;
        self.leader = leader;
        self.votes.clear();
        self.self_vote_seq = None;
        self.reset_election_timer();
        if was_leader {
            self.leader_cleanup();
            self.events.push(Event::LeaderStepDown { term: self.term });
        }
        if changed {
            self.events.push(Event::BecameFollower {
                term: self.term,
                leader,
            });
        }
    }

    fn leader_cleanup(&mut self) {
        self.progress.clear();
        for r in std::mem::take(&mut self.pending_reads) {
            self.events.push(Event::ReadIndexFailed {
                ctx: r.ctx,
                reason: ReadFailure::NotLeader,
            });
        }
        if let Some(t) = self.transfer.take() {
            let succeeded = self.stepping_from == t.target;
            self.events.push(Event::TransferEnded {
                target: t.target,
                succeeded,
            });
        }
        if self.conf_change.take().is_some() {
            self.events.push(Event::ConfChangeDone {
                result: Err(ConfChangeError::LeadershipLost),
            });
        }
        self.round_ticks.clear();
        self.need_broadcast = false;
    }

    fn become_leader(&mut self) {
        assert_eq!(self.role, Role::Candidate);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.votes.clear();
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.lease_broken = false;
        self.round = 0;
        self.round_ticks.clear();
        self.settled_round = 0;
        self.progress.clear();
        let next = self.log.last_index() + 1;
        for id in self.conf().all_members() {
            let mut p = Progress::new(next);
            p.disk = self.vote_disks.get(&id).copied().unwrap_or(0);
            self.progress.insert(id, p);
        }
        let durable = self.durable;
        let me = self
            .progress
            .entry(self.id)
            .or_insert_with(|| Progress::new(next));
        me.maybe_update(durable);
        me.become_replicate();
        me.recent_active = true;
        self.events.push(Event::BecameLeader { term: self.term });
        // An entry of our own term lets earlier entries commit. After
        // reset_peers it carries the forced configuration into the log; in a
        // group with unbound voters (every one of them voted for us), the
        // configuration binding each to the disk it voted with.
        let unbound = !self.conf().all_voters_bound();
        if self.conf_forced || unbound {
            self.conf_forced = false;
            let mut conf = self.conf().clone();
            for v in conf.all_voters() {
                let disk = if v == self.id {
                    self.disk
                } else {
                    self.vote_disks.get(&v).copied().unwrap_or(0)
                };
                if disk != 0 && conf.disk(v) == 0 {
                    conf.disks.insert(v, disk);
                }
            }
            self.append_leader_entry(EntryKind::Config, conf.encode());
        } else {
            self.append_leader_entry(EntryKind::Noop, Bytes::new());
        }
        self.need_broadcast = true;
        self.broadcast_heartbeat();
    }

    fn log_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        if self.cfg.broken_rule == BrokenRule::VoteSkipsLogCheck {
            return true;
        }
        let (li, lt) = (self.log.last_index(), self.log.last_term());
        last_term > lt || (last_term == lt && last_index >= li)
    }

    /// Leader stickiness: a node that heard from a live leader within the
    /// election timeout, or that started less than an election timeout ago,
    /// refuses to help depose it.
    fn in_lease(&self) -> bool {
        if self.role == Role::Leader {
            return true;
        }
        let amnesiac_at_once = self.fresh_disk && self.cfg.broken_rule == BrokenRule::AmnesiacVotes;
        (self.leader.is_some() && self.election_elapsed < self.cfg.election_timeout_ticks)
            || (self.uptime_ticks < self.cfg.election_timeout_ticks as u64 && !amnesiac_at_once)
    }

    // ------------------------------------------------------------------
    // Messages
    // ------------------------------------------------------------------

    pub fn step(&mut self, m: Message) {
        if m.group != self.group || m.to != self.id || m.from == self.id {
            return;
        }
        self.stepping_from = m.from;
        // Term handling first.
        if m.term > self.term {
            match &m.body {
                MessageBody::RequestVote {
                    pre_vote,
                    leadership_transfer,
                    ..
                } => {
                    if !leadership_transfer && self.in_lease() {
                        self.send_vote_response(&m, *pre_vote, false);
                        return;
                    }
                    if !pre_vote {
                        self.become_follower(m.term, None);
                    }
                }
                MessageBody::RequestVoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {
                    // A granted pre-vote carries the term we would campaign in.
                }
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
                | MessageBody::TimeoutNow => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } => {
                    // Tell a stale leader about the newer term.
                    self.send_after_write(
                        m.from,
                        MessageBody::AppendEntriesResponse {
                            success: false,
                            match_index: 0,
                            rejected_index: 0,
                            conflict_index: 0,
                            conflict_term: 0,
                            round: 0,
                            readonly: self.readonly_self,
                        },
                    );
                }
                MessageBody::RequestVote { pre_vote, .. } => {
                    let pv = *pre_vote;
                    self.send_vote_response(&m, pv, false);
                }
                _ => {}
            }
            return;
        }

        if self.role == Role::Leader {
            let round = match m.body {
                MessageBody::AppendEntriesResponse { round, .. }
                | MessageBody::HeartbeatResponse { round, .. } => Some(round),
                MessageBody::InstallSnapshotResponse { .. } => Some(0),
                _ => None,
            };
            if let Some(round) = round {
                if !self.observe_disk(m.from, m.disk, round) {
                    return;
                }
            }
        }
        match m.body.clone() {
            MessageBody::RequestVote {
                pre_vote,
                last_log_index,
                last_log_term,
                ..
            } => self.handle_vote_request(&m, pre_vote, last_log_index, last_log_term),
            MessageBody::RequestVoteResponse { pre_vote, granted } => {
                let expect = if pre_vote {
                    Role::PreCandidate
                } else {
                    Role::Candidate
                };
                if self.role == expect {
                    let term_ok = if pre_vote {
                        m.term == self.term + 1 || !granted
                    } else {
                        true
                    };
                    if term_ok {
                        // A vote from other storage than the voter is bound to is not
                        // that member's vote.
                        let bound = self.conf().disk(m.from);
                        let same_disk = bound == 0
                            || bound == m.disk
                            || self.cfg.broken_rule == BrokenRule::AmnesiacVotes;
                        self.votes.insert(m.from, granted && same_disk);
                        self.vote_disks.insert(m.from, m.disk);
                        self.check_election();
                    }
                }
            }
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                round,
            } => {
                self.follow(m.from);
                // Responses carry the highest round processed, not this message's: a
                // response then never claims an earlier round than one it follows, so the
                // leader can tell a stale answer from storage that went back in time.
                self.round_seen = self.round_seen.max(round);
                self.handle_append(
                    m.from,
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                );
            }
            MessageBody::Heartbeat { commit, round } => {
                self.follow(m.from);
                self.round_seen = self.round_seen.max(round);
                if self.installing.is_none() {
                    let c = commit.min(self.log.last_index());
                    self.advance_follower_commit(c);
                }
                self.send_after_write(
                    m.from,
                    MessageBody::HeartbeatResponse {
                        round: self.round_seen,
                        readonly: self.readonly_self,
                        last_index: self.log.last_index(),
                    },
                );
            }
            MessageBody::InstallSnapshot { meta } => {
                self.follow(m.from);
                self.handle_install_snapshot(m.from, meta);
            }
            MessageBody::TimeoutNow => {
                if self.role != Role::Leader && self.can_campaign() {
                    self.campaign(true);
                }
            }
            MessageBody::AppendEntriesResponse {
                success,
                match_index,
                rejected_index,
                conflict_index,
                conflict_term,
                round,
                readonly,
            } => {
                if self.role == Role::Leader {
                    self.handle_append_response(
                        m.from,
                        success,
                        match_index,
                        rejected_index,
                        conflict_index,
                        conflict_term,
                        round,
                        readonly,
                    );
                }
            }
            MessageBody::HeartbeatResponse {
                round,
                readonly,
                last_index,
            } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(m.from, round, readonly, last_index);
                }
            }
            MessageBody::InstallSnapshotResponse { index, success } => {
                if self.role == Role::Leader {
                    self.handle_snapshot_response(m.from, index, success);
                }
            }
        }
    }

    fn send_vote_response(&mut self, m: &Message, pre_vote: bool, granted: bool) {
        // A granted pre-vote answers in the candidate's future term; all
        // other answers carry ours.
        let term = if pre_vote && granted {
            m.term
        } else {
            self.term
        };
        let resp = self.message(
            m.from,
            term,
            MessageBody::RequestVoteResponse { pre_vote, granted },
        );
        self.held_msgs.push(resp);
    }

    fn handle_vote_request(&mut self, m: &Message, pre_vote: bool, li: Index, lt: Term) {
        let up_to_date = self.log_up_to_date(li, lt) && self.vote_identity_ok(m);
        let grant = if pre_vote {
            // Stickiness was checked with the term; a pre-vote for a term we
            // already are in can only come from a lagging candidate.
            up_to_date && m.term > self.term
        } else {
            // A pre-candidate has not voted in its term either (pre-votes
            // leave term and vote alone), so it may grant too.
            up_to_date
                && (self.vote == 0 || self.vote == m.from)
                && matches!(self.role, Role::Follower | Role::PreCandidate)
        };
        if grant && !pre_vote {
            if self.role == Role::PreCandidate {
                // Stop pre-campaigning against the candidate we vote for.
                self.become_follower(self.term, None);
            }
            self.vote = m.from;
            self.persist_hard_state();
            self.reset_election_timer();
        }
        self.send_vote_response(m, pre_vote, grant);
    }

    /// Accept `leader` as the leader of the current term.
    fn follow(&mut self, leader: NodeId) {
        if self.role != Role::Follower {
            // A candidate of the same term lost to `leader`.
            assert_ne!(self.role, Role::Leader, "two leaders in term {}", self.term);
            self.become_follower(self.term, Some(leader));
        } else if self.leader != Some(leader) {
            self.leader = Some(leader);
            self.events.push(Event::BecameFollower {
                term: self.term,
                leader: Some(leader),
            });
        }
        self.election_elapsed = 0;
    }

    fn advance_follower_commit(&mut self, c: Index) {
        if c > self.commit {
            self.commit = c;
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
    ) {
        if self.installing.is_some() {
            // The leader learns our state after the snapshot is installed.
            return;
        }

        let reject = |node: &mut RaftNode, ci: Index, ct: Term| {
            node.send_after_write(
                from,
                MessageBody::AppendEntriesResponse {
                    success: false,
                    match_index: 0,
                    rejected_index: prev_index,
                    conflict_index: ci,
                    conflict_term: ct,
                    round: node.round_seen,
                    readonly: node.readonly_self,
                },
            );
        };
        let accept = |node: &mut RaftNode, idx: Index| {
            node.send_after_write(
                from,
                MessageBody::AppendEntriesResponse {
                    success: true,
                    match_index: idx,
                    rejected_index: 0,
                    conflict_index: 0,
                    conflict_term: 0,
                    round: node.round_seen,
                    readonly: node.readonly_self,
                },
            );
        };
        if prev_index < self.commit {
            // Everything up to our commit index is known to match; skip the
            // part of the batch we already hold as committed.
            let skip = (self.commit - prev_index) as usize;
            if skip >= entries.len() {
                let c = self.commit;
                accept(self, c);
                return;
            }
            let new_prev = self.commit;
            let new_prev_term = self.log.term(new_prev).expect("commit within log");
            let rest = entries[skip..].to_vec();
            return self.handle_append(from, new_prev, new_prev_term, rest, leader_commit);
        }
        match self.log.term(prev_index) {
            None => {
                let last = self.log.last_index();
                reject(self, last + 1, 0);
                return;
            }
            Some(t) if t != prev_term => {
                let ci = self
                    .log
                    .first_index_of_term(prev_index)
                    .max(self.commit + 1);
                reject(self, ci, t);
                return;
            }
            Some(_) => {}
        }
        let last_new = prev_index + entries.len() as Index;
        let mut to_write = Vec::new();
        for e in entries {
            match self.log.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(
                        e.index > self.commit,
                        "conflict at committed index {}",
                        e.index
                    );
                    self.log.truncate_from(e.index);
                    if self.durable >= e.index {
                        self.durable = e.index - 1;
                    }
                    // Entries of this write not yet handed out are gone too.
                    self.write.entries.retain(|w| w.index < e.index);
                }
                None => {}
            }
            self.log.append(e.clone());
            to_write.push(e);
        }
        self.write.entries.extend(to_write);
        self.advance_follower_commit(leader_commit.min(last_new));
        accept(self, last_new);
    }

    fn handle_install_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        if self.installing.is_some() {
            return;
        }
        if meta.index <= self.commit {
            // Already have it all; let the leader move on.
            let c = self.commit;
            self.send_after_write(
                from,
                MessageBody::InstallSnapshotResponse {
                    index: c,
                    success: true,
                },
            );
            return;
        }
        self.installing = Some(meta.clone());
        self.snapshot_to_install = Some(meta);
    }

    /// The host loaded and persisted the snapshot it was asked to install.
    pub fn on_snapshot_installed(&mut self, meta: SnapshotMeta) {
        if self.installing.as_ref() != Some(&meta) {
            return;
        }
        self.installing = None;
        if self.log.term(meta.index) == Some(meta.term) {
            self.log.compact_to(meta.index);
        } else {
            self.log.reset(meta.index, meta.term, meta.conf.clone());
            self.durable = meta.index;
            self.write.entries.clear();
        }
        if self.durable < meta.index {
            self.durable = meta.index;
        }
        self.write.compact = Some((meta.index, meta.term));
        self.commit = self.commit.max(meta.index);
        self.applied = self.applied.max(meta.index);
        self.snapshot = meta.clone();
        self.note_snapshot_bytes();
        if let Some(leader) = self.leader {
            self.send_after_write(
                leader,
                MessageBody::InstallSnapshotResponse {
                    index: meta.index,
                    success: true,
                },
            );
        }
    }

    // ------------------------------------------------------------------
    // Leader: replication
    // ------------------------------------------------------------------

    fn append_leader_entry(&mut self, kind: EntryKind, data: Bytes) -> Index {
        let e = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            kind,
            data,
        };
        let idx = e.index;
        self.log.append(e.clone());
        self.write.entries.push(e);
        self.need_broadcast = true;
        idx
    }

    /// Every node the leader replicates to, except itself.
    fn replication_targets(&self) -> Vec<NodeId> {
        self.progress
            .keys()
            .copied()
            .filter(|id| *id != self.id)
            .collect()
    }

    fn broadcast_append(&mut self) {
        let ids = self.replication_targets();
        for id in ids {
            self.send_append(id, false);
        }
        // A single-voter group commits on its own durability.
        self.maybe_commit();
    }

    /// Sends AppendEntries to `to` while the limits allow. With `force` an
    /// (possibly empty) probe goes out even when there is nothing new.
    fn send_append(&mut self, to: NodeId, mut force: bool) {
        loop {
            let last = self.log.last_index();
            let Some(p) = self.progress.get(&to) else {
                return;
            };
            if !p.can_send(self.cfg.inflight_messages_max, self.cfg.inflight_bytes_max) {
                return;
            }
            let next = p.next_index;
            // braft: a read-only follower gets no new entries until it leaves
            // read-only mode.
            let has_new = next <= last && !p.readonly;
            if !has_new && !force {
                return;
            }
            let prev = next - 1;
            let Some(prev_term) = self.log.term(prev) else {
                self.send_snapshot(to);
                return;
            };
            let entries = if has_new {
                self.log.slice(
                    next,
                    last,
                    self.cfg.append_entries_max,
                    self.cfg.append_bytes_max,
                )
            } else {
                Vec::new()
            };
            let n = entries.len();
            let bytes: usize = entries.iter().map(|e| e.size_bytes()).sum();
            let (commit, round) = (self.commit, self.round);
            let p = self.progress.get_mut(&to).expect("progress");
            p.sent(prev + n as Index, bytes, n);
            let pipelined = p.state == ProgressState::Replicate;
            self.send(
                to,
                MessageBody::AppendEntries {
                    prev_log_index: prev,
                    prev_log_term: prev_term,
                    entries,
                    leader_commit: commit,
                    round,
                },
            );
            force = false;
            if !pipelined || n == 0 {
                return;
            }
        }
    }

    fn send_snapshot(&mut self, to: NodeId) {
        let meta = self.snapshot.clone();
        assert!(
            meta.index >= self.log.compacted().0,
            "no snapshot covers the compacted log"
        );
        let p = self.progress.get_mut(&to).expect("progress");
        p.become_snapshot(meta.index);
        self.send(to, MessageBody::InstallSnapshot { meta });
    }

    fn broadcast_heartbeat(&mut self) {
        self.round += 1;
        self.round_ticks.push_back((self.round, self.now));
        while self.round_ticks.len() > 4 * self.cfg.election_timeout_ticks as usize + 16 {
            self.round_ticks.pop_front();
        }
        let ids = self.replication_targets();
        let round = self.round;
        for id in ids {
            let p = &self.progress[&id];
            let commit = self.commit.min(p.match_index);
            self.send(id, MessageBody::Heartbeat { commit, round });
        }
        self.check_reads();
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        match_index: Index,
        rejected_index: Index,
        conflict_index: Index,
        conflict_term: Term,
        round: u64,
        readonly: bool,
    ) {
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.heard(round, readonly);
        if success {
            if match_index >= p.match_index {
                p.match_round = p.match_round.max(round);
            }
            let updated = p.maybe_update(match_index);
            if updated {
                self.settled_round = self.round;
            }
            if updated || p.state == ProgressState::Probe {
                if p.state == ProgressState::Probe {
                    p.become_replicate();
                }
                self.maybe_commit();
                self.maybe_send_timeout_now(from);
                self.maybe_finish_catchup();
            }
            self.send_append(from, false);
        } else {
            if rejected_index == 0 && conflict_index == 0 {
                return; // a term rejection, handled by the term check
            }
            let p = self.progress.get_mut(&from).expect("progress");
            // Answered after the round that showed it holding match_index, the follower
            // lacks (or holds other) entries at or below it.
            let lacks = if conflict_term == 0 {
                conflict_index <= p.match_index
            } else {
                rejected_index <= p.match_index
            };
            if p.match_index > 0 && round > p.match_round && lacks {
                self.forgot(from);
                self.send_append(from, true);
                self.check_reads();
                return;
            }
            let p = self.progress.get_mut(&from).expect("progress");
            if rejected_index < p.match_index || p.state == ProgressState::Snapshot {
                return; // stale
            }
            if p.state == ProgressState::Probe && rejected_index + 1 != p.next_index {
                return; // stale: we already moved on
            }
            let mut next = conflict_index;
            if conflict_term > 0 {
                if let Some(i) = self
                    .log
                    .last_index_of_term_at_most(conflict_term, rejected_index)
                {
                    next = i + 1;
                }
            }
            let p = self.progress.get_mut(&from).expect("progress");
            p.become_probe();
            p.next_index = next.clamp(p.match_index + 1, rejected_index.max(p.match_index + 1));
            self.send_append(from, true);
        }
        self.check_reads();
    }

    fn handle_heartbeat_response(
        &mut self,
        from: NodeId,
        round: u64,
        readonly: bool,
        last_index: Index,
    ) {
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.heard(round, readonly);
        if p.match_index > 0 && round > p.match_round && last_index < p.match_index {
            self.forgot(from);
            self.send_append(from, true);
            self.check_reads();
            return;
        }
        let leader_last = self.log.last_index();
        let p = self.progress.get_mut(&from).expect("progress");
        match p.state {
            ProgressState::Probe => {
                p.probe_sent = false;
                if p.match_index < leader_last || last_index != p.match_index {
                    self.send_append(from, true);
                }
            }
            ProgressState::Replicate => {
                // The follower lacks entries we pipelined: they were lost
                // (or are late; resending is harmless).
                if last_index + 1 < p.next_index {
                    p.become_probe();
                    self.send_append(from, true);
                } else {
                    // The follower holds what we sent but a full window
                    // means its acknowledgements may have been lost: free
                    // one slot (etcd) so the next append's ack reopens it.
                    if !p.can_send(self.cfg.inflight_messages_max, self.cfg.inflight_bytes_max) {
                        p.free_first_one();
                    }
                    self.send_append(from, false);
                }
            }
            ProgressState::Snapshot => {}
        }
        self.check_reads();
    }

    fn handle_snapshot_response(&mut self, from: NodeId, index: Index, success: bool) {
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.recent_active = true;
        if p.state != ProgressState::Snapshot {
            return;
        }
        if success && index >= p.match_index {
            p.match_round = p.match_round.max(self.round);
        }
        if success && p.maybe_update(index) {
            self.settled_round = self.round;
        }
        let p = self.progress.get_mut(&from).expect("progress");
        p.become_probe();
        self.send_append(from, true);
    }

    /// The host could not deliver a snapshot to `peer`.
    pub fn report_snapshot_failed(&mut self, peer: NodeId) {
        if let Some(p) = self.progress.get_mut(&peer) {
            if p.state == ProgressState::Snapshot {
                p.snapshot_failed();
            }
        }
    }

    /// The host's transport lost contact with `peer`: stop pipelining.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        if let Some(p) = self.progress.get_mut(&peer) {
            if p.state == ProgressState::Replicate {
                p.become_probe();
            }
        }
    }

    fn maybe_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let conf = self.conf().clone();
        let me = self.id;
        let durable = self.durable;
        let q = conf.quorum_index(|id| {
            if id == me {
                durable
            } else if self.counts(id) {
                self.progress.get(&id).map_or(0, |p| p.match_index)
            } else {
                0
            }
        });
        if q <= self.commit {
            return;
        }
        let q_term = self.log.term(q);
        let allowed = q_term == Some(self.term)
            || (self.cfg.broken_rule == BrokenRule::CommitPreviousTermByCount && q_term.is_some());
        if !allowed {
            return;
        }
        self.commit = q;
        self.settled_round = self.round;
        self.need_broadcast = true;
        self.check_reads();
        self.check_conf_commit();
    }

    // ------------------------------------------------------------------
    // Proposals
    // ------------------------------------------------------------------

    /// Appends `data` if this node is the leader. With `expected_term`, the
    /// proposal is refused when the term moved on (braft Task's ABA guard).
    /// Returns the index (and term) the entry got: it is committed when it is
    /// applied with that term.
    pub fn propose(
        &mut self,
        data: Bytes,
        expected_term: Option<Term>,
    ) -> Result<(Index, Term), Error> {
        self.check_can_propose(expected_term)?;
        let idx = self.append_leader_entry(EntryKind::Normal, data);
        Ok((idx, self.term))
    }

    fn check_can_propose(&self, expected_term: Option<Term>) -> Result<(), Error> {
        let group = self.group;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                group,
                leader: self.leader,
            });
        }
        if let Some(t) = expected_term {
            if t != self.term {
                return Err(Error::TermMismatch {
                    group,
                    expected: t,
                    current: self.term,
                });
            }
        }
        if self.transfer.is_some() {
            return Err(Error::TransferInProgress { group });
        }
        if self.is_readonly() {
            return Err(Error::ReadOnly { group });
        }
        let pending = (self.log.last_index() - self.commit) as usize;
        if pending >= self.cfg.uncommitted_entries_max {
            return Err(Error::ProposalQueueFull {
                group,
                pending,
                max: self.cfg.uncommitted_entries_max,
            });
        }
        Ok(())
    }

    fn after_apply(&mut self, applied: Index) {
        let since = self.log_bytes_since_snapshot();
        if since > self.cfg.snapshot_log_bytes_max && self.snapshot_suggested_at < since {
            self.snapshot_suggested_at = since + self.cfg.snapshot_log_bytes_max / 2;
            self.events.push(Event::SnapshotSuggested { applied });
        }
    }

    // ------------------------------------------------------------------
    // Snapshots
    // ------------------------------------------------------------------

    /// The host saved a snapshot of its state machine covering every entry
    /// up to `index` (which it has applied). The log before it is compacted,
    /// keeping `snapshot_keep_entries` for followers that lag a little.
    pub fn on_snapshot_saved(&mut self, index: Index) -> Result<SnapshotMeta, Error> {
        let group = self.group;
        if index > self.applied {
            return Err(Error::Invalid {
                group,
                what: format!("snapshot at {index} beyond applied {}", self.applied),
            });
        }
        if index <= self.snapshot.index {
            return Ok(self.snapshot.clone());
        }
        let term = self
            .log
            .term(index)
            .ok_or(Error::Compacted { group, index })?;
        let conf = self.log.conf_at(index).1.clone();
        self.snapshot = SnapshotMeta { index, term, conf };
        // Followers lagging by more than the margin get the snapshot.
        let keep_from = index.saturating_sub(self.cfg.snapshot_keep_entries).max(
            self.log
                .keep_from_within(index, self.cfg.snapshot_keep_bytes_max),
        );
        if keep_from > self.log.compacted().0 {
            let t = self.log.term(keep_from).expect("in log");
            self.log.compact_to(keep_from);
            self.write.compact = Some((keep_from, t));
        }
        self.snapshot_suggested_at = 0;
        self.note_snapshot_bytes();
        Ok(self.snapshot.clone())
    }

    /// Recomputes `bytes_below_snapshot`. Valid until the next compaction
    /// or snapshot (truncation never reaches below the commit index).
    fn note_snapshot_bytes(&mut self) {
        self.bytes_below_snapshot = self.log.bytes_through(self.snapshot.index);
    }

    // ------------------------------------------------------------------
    // Membership
    // ------------------------------------------------------------------

    pub fn add_peer(&mut self, peer: NodeId) -> Result<ConfChangeStart, Error> {
        let mut c = self.conf_for_change()?;
        c.learners.remove(&peer);
        c.rebuilding.remove(&peer);
        c.voters.insert(peer);
        self.change_conf(c)
    }

    pub fn remove_peer(&mut self, peer: NodeId) -> Result<ConfChangeStart, Error> {
        let mut c = self.conf_for_change()?;
        if !c.contains(peer) {
            return Err(Error::UnknownPeer {
                group: self.group,
                peer,
            });
        }
        c.voters.remove(&peer);
        c.learners.remove(&peer);
        self.change_conf(c)
    }

    pub fn add_learner(&mut self, peer: NodeId) -> Result<ConfChangeStart, Error> {
        let mut c = self.conf_for_change()?;
        if c.voters.contains(&peer) {
            return Err(Error::Invalid {
                group: self.group,
                what: format!("peer {peer} is a voter"),
            });
        }
        c.learners.insert(peer);
        self.change_conf(c)
    }

    /// Replaces the voters (and learners) with `voters` (`learners`): joint
    /// consensus unless a single voter changes.
    pub fn change_peers(
        &mut self,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) -> Result<ConfChangeStart, Error> {
        let current = self.conf_for_change()?;
        self.change_conf(Configuration {
            voters,
            voters_outgoing: BTreeSet::new(),
            rebuilding: current
                .rebuilding
                .intersection(&learners)
                .copied()
                .collect(),
            learners,
            disks: current.disks,
        })
    }

    fn conf_for_change(&self) -> Result<Configuration, Error> {
        let group = self.group;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                group,
                leader: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(Error::Busy {
                group,
                what: "leadership transfer in progress",
            });
        }
        if self.conf_change.is_some() || self.conf().is_joint() || self.conf_uncommitted() {
            return Err(Error::Busy {
                group,
                what: "another configuration change is running",
            });
        }
        // A new leader may still carry, or meet in other logs, a configuration entry of an
        // earlier term that never committed. Appending its own change before an entry of its
        // term commits can then let two configurations that differ in two members each count
        // a majority of their own, with disjoint quorums (the single-server membership change
        // bug, Ongaro, raft-dev 2015). Committing one entry of its term first settles which
        // history wins; the no-op a leader appends on election does that quickly.
        if !self.committed_in_term()
            && self.cfg.broken_rule != BrokenRule::ConfChangeBeforeTermCommit
        {
            return Err(Error::Busy {
                group,
                what: "the leader has not committed an entry of its term yet",
            });
        }
        Ok(self.conf().clone())
    }

    fn conf_uncommitted(&self) -> bool {
        self.log.last_conf().0 > self.commit
    }

    fn change_conf(&mut self, mut target: Configuration) -> Result<ConfChangeStart, Error> {
        let group = self.group;
        target.retain_members();
        if target.voters.is_empty() {
            return Err(Error::Invalid {
                group,
                what: "a configuration needs at least one voter".into(),
            });
        }
        if target.voters.contains(&0) || target.learners.contains(&0) {
            return Err(Error::Invalid {
                group,
                what: "node id 0 is reserved".into(),
            });
        }
        if target.voters.iter().any(|v| target.learners.contains(v)) {
            return Err(Error::Invalid {
                group,
                what: "a peer cannot be voter and learner".into(),
            });
        }
        if &target == self.conf() {
            return Ok(ConfChangeStart::NoOp);
        }
        let next = self.log.last_index() + 1;
        for id in target.all_members() {
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(next));
        }
        self.conf_change = Some(ConfPhase::CatchingUp { target, ticks: 0 });
        let ids = self.replication_targets();
        for id in ids {
            self.send_append(id, true);
        }
        self.maybe_finish_catchup();
        Ok(ConfChangeStart::Started)
    }

    fn maybe_finish_catchup(&mut self) {
        let Some(ConfPhase::CatchingUp { target, .. }) = &self.conf_change else {
            return;
        };
        let current = self.conf().clone();
        let last = self.log.last_index();
        let margin = self.cfg.catchup_margin;
        let caught_up = target
            .voters
            .iter()
            .filter(|id| !current.voters.contains(id))
            .all(|id| {
                *id == self.id
                    || self
                        .progress
                        .get(id)
                        .is_some_and(|p| p.match_index + margin >= last && p.match_index > 0)
            });
        if !caught_up {
            return;
        }
        // Checked when the change started, and it stays true for the rest of the term.
        assert!(
            self.committed_in_term()
                || self.cfg.broken_rule == BrokenRule::ConfChangeBeforeTermCommit,
            "group {}: configuration entry appended before an entry of term {} committed",
            self.group,
            self.term
        );
        let mut target = target.clone();
        self.bind_new_members(&mut target, &current);
        let changed: usize = target.voters.symmetric_difference(&current.voters).count();
        let entry_conf = if changed <= 1 {
            target.clone()
        } else {
            let mut joint = Configuration {
                voters: target.voters.clone(),
                voters_outgoing: current.voters.clone(),
                learners: target.learners.clone(),
                disks: target.disks.clone(),
                rebuilding: target.rebuilding.clone(),
            };
            for v in &current.voters {
                if current.disk(*v) != 0 {
                    joint.disks.insert(*v, current.disk(*v));
                }
            }
            joint
        };
        let idx = self.append_leader_entry(EntryKind::Config, entry_conf.encode());
        self.on_conf_appended();
        self.conf_change = Some(ConfPhase::Appended { index: idx, target });
    }

    fn abort_conf_change(&mut self, err: ConfChangeError) {
        self.conf_change = None;
        let members = self.conf().all_members();
        self.progress.retain(|id, _| members.contains(id));
        self.events.push(Event::ConfChangeDone { result: Err(err) });
    }

    /// A configuration entry was appended on the leader: track exactly its
    /// members.
    fn on_conf_appended(&mut self) {
        let next = self.log.last_index() + 1;
        let members = self.conf().all_members();
        for id in &members {
            self.progress
                .entry(*id)
                .or_insert_with(|| Progress::new(next));
        }
        let me = self.id;
        self.progress
            .retain(|id, _| members.contains(id) || *id == me);
        self.maybe_commit();
    }

    /// Called when the commit index moves on the leader.
    fn check_conf_commit(&mut self) {
        let (ci, conf) = self.log.last_conf();
        let conf = conf.clone();
        if ci == 0 || ci > self.commit {
            return;
        }
        match &self.conf_change {
            Some(ConfPhase::Appended { index, target }) if *index <= self.commit => {
                let target = target.clone();
                if conf.is_joint() {
                    // Leave the joint configuration automatically.
                    let final_conf = conf.leave_joint();
                    let idx = self.append_leader_entry(EntryKind::Config, final_conf.encode());
                    self.conf_change = Some(ConfPhase::Appended { index: idx, target });
                    self.on_conf_appended();
                } else {
                    self.conf_change = None;
                    self.events.push(Event::ConfChangeDone { result: Ok(()) });
                    if !conf.is_voter(self.id) {
                        self.become_follower(self.term, None);
                    }
                }
            }
            None if conf.is_joint() => {
                // A new leader inherited a joint configuration: finish it.
                let final_conf = conf.leave_joint();
                if self.log.last_conf().0 == ci {
                    self.append_leader_entry(EntryKind::Config, final_conf.encode());
                    self.on_conf_appended();
                }
            }
            None if !conf.is_voter(self.id) => self.become_follower(self.term, None),
            _ => {}
        }
    }

    /// Unsafe: forces this node's configuration to `voters` without
    /// consensus, for when a majority is lost for good. Two nodes reset to
    /// overlapping minorities can both elect leaders and diverge; committed
    /// entries the surviving nodes lack are lost.
    pub fn reset_peers(&mut self, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        let group = self.group;
        if voters.is_empty() || voters.contains(&0) {
            return Err(Error::Invalid {
                group,
                what: "reset_peers needs non-zero peer ids".into(),
            });
        }
        // Bindings the node knows are kept: a member it still counts keeps its identity.
        let mut conf = Configuration {
            voters,
            disks: self.conf().disks.clone(),
            ..Default::default()
        };
        conf.retain_members();
        if self.role == Role::Leader {
            self.become_follower(self.term, None);
        }
        self.log.force_conf(conf);
        self.conf_forced = true;
        self.conf_change = None;
        // Campaign soon rather than after a full timeout.
        self.election_elapsed = self.randomized_timeout;
        self.leader = None;
        self.uptime_ticks = self
            .uptime_ticks
            .max(self.cfg.election_timeout_ticks as u64);
        Ok(())
    }

    // ------------------------------------------------------------------
    // Leader transfer
    // ------------------------------------------------------------------

    /// Hands leadership to `target` (None = the most up-to-date voter).
    /// Proposals are refused until the transfer ends; if no election
    /// happened within an election timeout the leader resumes.
    pub fn transfer_leadership(&mut self, target: Option<NodeId>) -> Result<NodeId, Error> {
        let group = self.group;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                group,
                leader: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(Error::TransferInProgress { group });
        }
        if self.conf_change.is_some() {
            return Err(Error::Busy {
                group,
                what: "a configuration change is running",
            });
        }
        let conf = self.conf().clone();
        let target = match target {
            Some(t) if t == self.id => return Ok(t),
            Some(t) => {
                if !conf.is_voter(t) {
                    return Err(Error::UnknownPeer { group, peer: t });
                }
                if !self.counts(t) {
                    return Err(Error::Busy {
                        group,
                        what: "the target does not answer from the storage it is bound to",
                    });
                }
                t
            }
            None => {
                let best = conf
                    .all_voters()
                    .into_iter()
                    .filter(|id| *id != self.id && self.counts(*id))
                    .max_by_key(|id| {
                        (
                            self.progress.get(id).map_or(0, |p| p.match_index),
                            std::cmp::Reverse(*id),
                        )
                    });
                best.ok_or(Error::Invalid {
                    group,
                    what: "no other voter to transfer to".into(),
                })?
            }
        };
        self.transfer = Some(Transfer {
            target,
            ticks: 0,
            timeout_now_sent: false,
        });
        self.maybe_send_timeout_now(target);
        if self.transfer.as_ref().is_some_and(|t| !t.timeout_now_sent) {
            self.send_append(target, true);
        }
        Ok(target)
    }

    fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        let last = self.log.last_index();
        let Some(t) = &mut self.transfer else { return };
        if t.target != peer || t.timeout_now_sent {
            return;
        }
        if self
            .progress
            .get(&peer)
            .is_some_and(|p| p.match_index == last)
        {
            t.timeout_now_sent = true;
            self.lease_broken = true;
            self.send(peer, MessageBody::TimeoutNow);
        }
    }

    // ------------------------------------------------------------------
    // Readonly mode and election hints
    // ------------------------------------------------------------------

    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly_self = readonly;
    }

    /// braft's vote(): use `election_timeout_ticks` from now on and campaign
    /// at the next tick, making this node likely to be the next leader.
    pub fn vote(&mut self, election_timeout_ticks: u32) -> Result<(), Error> {
        let group = self.group;
        if election_timeout_ticks <= self.cfg.max_clock_drift_ticks
            || election_timeout_ticks <= self.cfg.heartbeat_interval_ticks
        {
            return Err(Error::Invalid {
                group,
                what: "election timeout must exceed the heartbeat interval and the clock drift"
                    .into(),
            });
        }
        if !self.conf().is_voter(self.id) || !self.disk_ok(self.conf()) {
            return Err(Error::UnknownPeer {
                group,
                peer: self.id,
            });
        }
        self.cfg.election_timeout_ticks = election_timeout_ticks;
        if self.role != Role::Leader {
            self.election_elapsed = self.randomized_timeout.saturating_sub(1);
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Linearizable reads
    // ------------------------------------------------------------------

    /// ReadIndex: `Event::ReadIndexReady { ctx, index }` fires once a quorum
    /// confirmed this node is still the leader; serve the read once the
    /// state machine applied `index`.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), Error> {
        let group = self.group;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                group,
                leader: self.leader,
            });
        }
        if self.pending_reads.len() >= self.cfg.read_queue_max {
            return Err(Error::ProposalQueueFull {
                group,
                pending: self.pending_reads.len(),
                max: self.cfg.read_queue_max,
            });
        }
        // Only acknowledgements of a round started after the read arrived
        // count; reads arriving before the next `ready` share that round.
        self.read_round_wanted = true;
        self.pending_reads.push_back(PendingRead {
            ctx,
            index: 0,
            round: self.round + 1,
        });
        self.check_reads();
        Ok(())
    }

    /// Lease read: answered at once while the leader lease holds (requires
    /// `lease_read` and check-quorum), otherwise falls back to ReadIndex.
    pub fn lease_read(&mut self, ctx: u64) -> Result<(), Error> {
        if self.role == Role::Leader && self.lease_valid() && self.committed_in_term() {
            let index = self.commit;
            self.events.push(Event::ReadIndexReady { ctx, index });
            return Ok(());
        }
        self.read_index(ctx)
    }

    fn committed_in_term(&self) -> bool {
        self.log.term(self.commit) == Some(self.term)
    }

    /// The lease runs from the start of the latest round a quorum acknowledged.
    pub fn lease_valid(&self) -> bool {
        if !(self.cfg.lease_read && self.cfg.check_quorum)
            || self.role != Role::Leader
            || self.lease_broken
        {
            return false;
        }
        let Some(round) = self.quorum_acked_round() else {
            return false;
        };
        let Some(&(_, start)) = self.round_ticks.iter().find(|(r, _)| *r == round) else {
            return false;
        };
        let lease = (self.cfg.election_timeout_ticks - self.cfg.max_clock_drift_ticks) as u64;
        self.now < start + lease
    }

    fn quorum_acked_round(&self) -> Option<u64> {
        let me = self.id;
        let round = self.round;
        let q = self.conf().quorum_index(|id| {
            if id == me {
                round
            } else if self.counts(id) {
                self.progress.get(&id).map_or(0, |p| p.acked_round)
            } else {
                0
            }
        });
        (q > 0).then_some(q)
    }

    fn check_reads(&mut self) {
        if self.role != Role::Leader || self.pending_reads.is_empty() {
            return;
        }
        if !self.committed_in_term() {
            return;
        }
        let acked = self.quorum_acked_round().unwrap_or(0);
        let commit = self.commit;
        for r in self.pending_reads.iter_mut() {
            if r.index == 0 {
                r.index = commit;
            }
        }
        while let Some(r) = self.pending_reads.front() {
            if r.round > acked {
                break;
            }
            let r = self.pending_reads.pop_front().expect("front");
            self.events.push(Event::ReadIndexReady {
                ctx: r.ctx,
                index: r.index,
            });
        }
    }
}
