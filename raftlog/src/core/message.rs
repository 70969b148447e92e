//! Messages exchanged by the replicas of one group, plus the inputs and
//! outputs the host exchanges with the core.

use super::types::{DiskId, Entry, GroupId, HardState, Index, NodeId, SnapshotMeta, Term};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub group: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// The sender's storage identity.
    pub disk: DiskId,
    /// The disk id the sender's configuration binds the recipient to (0 =
    /// unbound or unknown): a voter asked by a candidate that knows it by
    /// another disk id is not the member the candidate counts on.
    pub to_disk: DiskId,
    pub body: MessageBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    RequestVote {
        pre_vote: bool,
        last_log_index: Index,
        last_log_term: Term,
        /// Sent after TimeoutNow: voters skip leader stickiness for it.
        leadership_transfer: bool,
    },
    RequestVoteResponse {
        pre_vote: bool,
        granted: bool,
    },
    AppendEntries {
        prev_log_index: Index,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
        /// Heartbeat round the leader was in when it sent this (ReadIndex and
        /// leases count acknowledgements per round).
        round: u64,
    },
    AppendEntriesResponse {
        success: bool,
        /// On success: the follower's log matches the leader's up to here.
        match_index: Index,
        /// On failure: the `prev_log_index` that was rejected.
        rejected_index: Index,
        /// On failure: where the leader should retry (fast backtracking):
        /// the first index of `conflict_term` in the follower's log, or the
        /// follower's last index + 1 when its log is too short
        /// (`conflict_term == 0`).
        conflict_index: Index,
        conflict_term: Term,
        round: u64,
        /// The follower is in read-only mode: the leader stops sending it
        /// new entries (braft semantics).
        readonly: bool,
    },
    Heartbeat {
        /// min(leader commit, follower match): a follower never learns a
        /// commit index beyond what it is known to hold.
        commit: Index,
        round: u64,
    },
    HeartbeatResponse {
        round: u64,
        readonly: bool,
        /// The follower's last log index (lets the leader resume a probe).
        last_index: Index,
    },
    /// The host moves the snapshot bytes; this carries only the metadata.
    InstallSnapshot {
        meta: SnapshotMeta,
    },
    InstallSnapshotResponse {
        index: Index,
        success: bool,
    },
    /// Leader transfer: "campaign now, you are up to date".
    TimeoutNow,
}

impl MessageBody {
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::RequestVote { pre_vote: true, .. } => "PreVote",
            MessageBody::RequestVote { .. } => "RequestVote",
            MessageBody::RequestVoteResponse { pre_vote: true, .. } => "PreVoteResponse",
            MessageBody::RequestVoteResponse { .. } => "RequestVoteResponse",
            MessageBody::AppendEntries { .. } => "AppendEntries",
            MessageBody::AppendEntriesResponse { .. } => "AppendEntriesResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
            MessageBody::InstallSnapshotResponse { .. } => "InstallSnapshotResponse",
            MessageBody::TimeoutNow => "TimeoutNow",
        }
    }
}

/// One durable write the host must perform, in order, before it reports
/// `on_write_durable(seq)`. Within a write: `compact`, then `entries`, then
/// `hard_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Write {
    pub seq: u64,
    pub compact: Option<(Index, Term)>,
    /// Consecutive entries; the first may overwrite an existing suffix.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
}

impl Write {
    pub fn is_empty(&self) -> bool {
        self.compact.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// Things the host may want to react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    BecameLeader {
        term: Term,
    },
    BecameFollower {
        term: Term,
        leader: Option<NodeId>,
    },
    /// Leadership lost (stepped down or removed): pending proposals may or
    /// may not commit.
    LeaderStepDown {
        term: Term,
    },
    /// A configuration entry committed (it applies with the entries).
    ConfigurationCommitted {
        index: Index,
        conf: super::types::Configuration,
    },
    /// A membership change requested through the admin API finished.
    ConfChangeDone {
        result: Result<(), ConfChangeError>,
    },
    /// A read with this context may be served once `applied >= index`.
    ReadIndexReady {
        ctx: u64,
        index: Index,
    },
    ReadIndexFailed {
        ctx: u64,
        reason: ReadFailure,
    },
    /// A leadership transfer ended (`to` became leader or the attempt timed out).
    TransferEnded {
        target: NodeId,
        succeeded: bool,
    },
    /// The log since the last snapshot exceeds `snapshot_log_bytes_max`.
    SnapshotSuggested {
        applied: Index,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChangeError {
    CatchupTimeout,
    LeadershipLost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    NotLeader,
    QueueFull,
}

/// Everything the core produced since the last `ready()`.
#[derive(Debug, Default)]
pub struct Ready {
    /// Persist (in order with earlier writes), then call `on_write_durable`.
    pub write: Option<Write>,
    /// Send now.
    pub messages: Vec<Message>,
    /// Apply in order; `Normal` entries are the application's, `Config` and
    /// `Noop` entries need no action from a block state machine.
    pub committed_entries: Vec<Entry>,
    /// Load this snapshot's data (received by the host's transport), make it
    /// durable, then call `on_snapshot_installed`. Handed out only once every
    /// earlier write is durable (`on_write_durable`), so the term the snapshot
    /// came with is stored before the snapshot is.
    pub snapshot_to_install: Option<SnapshotMeta>,
    pub events: Vec<Event>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.write.is_none()
            && self.messages.is_empty()
            && self.committed_entries.is_empty()
            && self.snapshot_to_install.is_none()
            && self.events.is_empty()
    }
}
