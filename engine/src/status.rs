//! Status of the block groups of a node: braft's raft_stat fields plus the engine's own, as a
//! serialisable struct (for `/status.json`) and as braft-like text (for `/raft_stat`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use raftlog::core::{GroupId, Index, NodeId, Term};
use serde::Serialize;

/// A follower as the leader sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerStat {
    pub id: NodeId,
    pub next_index: Index,
    pub match_index: Index,
    pub state: String,
    pub connected: bool,
    /// A voter (not a learner).
    pub voter: bool,
    /// The disk id the peer answers with (0: not heard from in this term).
    pub disk_id: u64,
    /// Counted toward quorums: a voter answering from the disk it is bound to.
    pub counted: bool,
    /// Being rebuilt: its storage was found replaced or behind what it acknowledged; it is (or is
    /// about to be) a learner that becomes a voter again once it holds the committed log.
    pub rebuilding: bool,
}

/// One block group on this node.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BgStatus {
    pub bg: GroupId,
    /// The NBD export name.
    pub name: String,
    pub core: usize,
    pub node: NodeId,
    /// LEADER / FOLLOWER / CANDIDATE / ...
    pub state: String,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    pub conf_index: Index,
    /// A membership change started here (as leader) has not finished: its new peer is
    /// catching up, or its configuration entry is not committed yet.
    pub conf_changing: bool,
    pub first_log_index: Index,
    pub last_log_index: Index,
    pub disk_index: Index,
    pub known_applied_index: Index,
    pub last_committed_index: Index,
    pub last_snapshot_index: Index,
    pub last_snapshot_term: Term,
    pub readonly: bool,
    /// IDLE, DOWNLOADING done/total, or SENDING to \[peers\].
    pub snapshot_status: String,
    pub size_bytes: u64,
    /// Client requests executing on this node as leader.
    pub pending_requests: usize,
    /// Bytes of raft log this group holds in memory (counted against the core's
    /// `log_memory_bytes_max`).
    pub log_bytes: usize,
    /// Hibernating: not ticked, no heartbeats, until activity wakes it (`core::hibernate`).
    pub hibernating: bool,
    /// This node is a member (voter or learner) of the group's configuration as it knows it; a
    /// removed replica, or one waiting to be added, answers client requests with an error at once.
    pub member: bool,
    /// Bytes of disk this replica's data file occupies (below `size_bytes` when thin).
    pub allocated_bytes: u64,
    /// This replica's storage identity (random, created with its files, kept in its raft meta).
    pub disk_id: u64,
    /// This replica is being rebuilt: its configuration binds it to other storage than its own, or
    /// lists it as a rebuilding learner. It neither votes nor counts until it is a voter again.
    pub rebuilding: bool,
    /// Bytes of the snapshot this replica is receiving, so far and in all (0 and 0 when none).
    pub rebuild_bytes_done: u64,
    pub rebuild_bytes_total: u64,
    /// Leader: some member is being rebuilt (a rebuilding learner, or a voter found answering from
    /// other storage than the one it is bound to), so the group has fewer copies than members. A
    /// member that is merely down or not heard from yet in this term does not set it.
    pub under_replicated: bool,
    pub peers: Vec<PeerStat>,
}

/// What one core sent to its peers since it started, and how many of its groups hibernate.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CoreStat {
    pub core: usize,
    /// Raft messages (of every group) sent to peers; many travel in one frame.
    pub raft_messages_sent: u64,
    /// Frames written to peers (raft batches, forwarded requests and responses, hibernation
    /// frames and liveness pings), as counted by the transport.
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Liveness pings among `frames_sent` (sent to a peer nothing else went to for a while).
    pub pings_sent: u64,
    pub groups: u64,
    pub groups_hibernating: u64,
    /// Hibernating groups woken (by a request, a raft message, or a silent leader node).
    pub wakes: u64,
    /// Raft messages dropped and forwarded requests refused because their node is not a member
    /// of the group (a replica removed while cut off keeps campaigning; the log reports each
    /// node and group once a minute).
    pub raft_messages_refused: u64,
    /// Buffered applies go on the core thread now (`inline_applies`; off with too many dirty
    /// pages on the machine or after a slow inline write).
    pub inline_applies_active: bool,
    /// Buffered applies written on the core thread instead of the data ring.
    pub applies_inline: u64,
    /// Inline writes slower than `inline_apply_us_max` (each sends applies back to the ring for
    /// a few seconds).
    pub inline_slow_writes: u64,
    /// Times inline applies stopped because the machine's dirty pages reached the background
    /// writeback threshold.
    pub inline_dirty_refusals: u64,
    /// The core's WAL (refreshed every tick): durable batches written, entries and bytes
    /// appended, the summed time batches spent on the disk (divide by `wal_batches` for the
    /// mean write latency the WAL sees), segment files.
    pub wal_batches: u64,
    pub wal_appended_entries: u64,
    pub wal_appended_bytes: u64,
    pub wal_batch_disk_us: u64,
    pub wal_segments: u64,
    /// Segments started on a purged segment's file, on a zero-filled one, and purged files
    /// waiting for reuse (docs/wal.md).
    pub wal_recycled_segments: u64,
    pub wal_zero_filled_segments: u64,
    pub wal_free_segments: u64,
}

/// One core's QUIC connection to a peer node: the transport's counters and QUIC's view of the
/// path, so an operator can see that packets have the size the network was declared to carry
/// (`quic_udp_payload_bytes`) and whether any are lost.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LinkStat {
    pub core: usize,
    pub peer: u64,
    pub connected: bool,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Frames dropped because a queue was full or a write failed (raft resends).
    pub frames_dropped: u64,
    pub bytes_sent: u64,
    /// Of the current connection only (a reconnect starts them again).
    pub udp_datagrams_sent: u64,
    pub udp_datagrams_received: u64,
    pub lost_packets: u64,
    /// Payload size of the UDP datagrams sent now (0 while disconnected).
    pub udp_payload_bytes: u16,
    pub rtt_us: u64,
}

impl LinkStat {
    /// One `/raft_stat` line.
    pub fn raft_stat_text(&self) -> String {
        format!(
            "[core {} -> node {}] connected: {} frames_sent: {} frames_received: {} \
             frames_dropped: {} bytes_sent: {} udp_datagrams_sent: {} udp_datagrams_received: {} \
             lost_packets: {} udp_payload_bytes: {} rtt_us: {}\n",
            self.core,
            self.peer,
            self.connected,
            self.frames_sent,
            self.frames_received,
            self.frames_dropped,
            self.bytes_sent,
            self.udp_datagrams_sent,
            self.udp_datagrams_received,
            self.lost_packets,
            self.udp_payload_bytes,
            self.rtt_us
        )
    }
}

impl BgStatus {
    /// braft's `/raft_stat` layout, one `key: value` per line.
    pub fn raft_stat_text(&self) -> String {
        let mut s = String::new();
        let leader = self.leader.map_or("none".to_string(), |l| l.to_string());
        let _ = writeln!(s, "[{}] (bg {}, core {})", self.name, self.bg, self.core);
        let _ = writeln!(s, "peer_id: {}", self.node);
        let _ = writeln!(s, "state: {}", self.state);
        let _ = writeln!(s, "readonly: {}", self.readonly);
        let _ = writeln!(s, "term: {}", self.term);
        let _ = writeln!(s, "leader: {leader}");
        let voters: Vec<String> = self.voters.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(s, "conf_index: {}", self.conf_index);
        if self.conf_changing {
            let _ = writeln!(s, "conf_changing: true");
        }
        let _ = writeln!(s, "peers: {}", voters.join(" "));
        let _ = writeln!(
            s,
            "storage: [{}, {}]",
            self.first_log_index, self.last_log_index
        );
        let _ = writeln!(s, "disk_index: {}", self.disk_index);
        let _ = writeln!(s, "known_applied_index: {}", self.known_applied_index);
        let _ = writeln!(s, "last_committed_index: {}", self.last_committed_index);
        let _ = writeln!(s, "snapshot_status: {}", self.snapshot_status);
        let _ = writeln!(
            s,
            "last_snapshot_index: {}\nlast_snapshot_term: {}",
            self.last_snapshot_index, self.last_snapshot_term
        );
        let _ = writeln!(s, "size_bytes: {}", self.size_bytes);
        let _ = writeln!(s, "allocated_bytes: {}", self.allocated_bytes);
        let _ = writeln!(s, "pending_requests: {}", self.pending_requests);
        let _ = writeln!(s, "log_bytes: {}", self.log_bytes);
        let _ = writeln!(s, "hibernating: {}", self.hibernating);
        let _ = writeln!(s, "disk_id: {:016x}", self.disk_id);
        if !self.member {
            let _ = writeln!(s, "member: false");
        }
        if self.rebuilding {
            let _ = writeln!(
                s,
                "rebuilding: {}/{} bytes",
                self.rebuild_bytes_done, self.rebuild_bytes_total
            );
        }
        if self.under_replicated {
            let _ = writeln!(s, "under_replicated: true");
        }
        for p in &self.peers {
            let _ = writeln!(
                s,
                "replicator_{}: next_index={} match_index={} state={} connected={} voter={} disk_id={:016x} counted={}{}",
                p.id,
                p.next_index,
                p.match_index,
                p.state,
                p.connected,
                p.voter,
                p.disk_id,
                p.counted,
                if p.rebuilding { " rebuilding" } else { "" }
            );
        }
        s
    }
}

impl CoreStat {
    /// One `/raft_stat` line.
    pub fn raft_stat_text(&self) -> String {
        format!(
            "[core {}] raft_messages_sent: {} frames_sent: {} bytes_sent: {} pings_sent: {} \
             groups: {} groups_hibernating: {} wakes: {} raft_messages_refused: {} \
             inline_applies_active: {} applies_inline: {} \
             inline_slow_writes: {} inline_dirty_refusals: {} wal_batches: {} \
             wal_appended_entries: {} wal_appended_bytes: {} wal_batch_disk_us: {} \
             wal_segments: {} wal_recycled_segments: {} wal_zero_filled_segments: {} \
             wal_free_segments: {}\n",
            self.core,
            self.raft_messages_sent,
            self.frames_sent,
            self.bytes_sent,
            self.pings_sent,
            self.groups,
            self.groups_hibernating,
            self.wakes,
            self.raft_messages_refused,
            self.inline_applies_active,
            self.applies_inline,
            self.inline_slow_writes,
            self.inline_dirty_refusals,
            self.wal_batches,
            self.wal_appended_entries,
            self.wal_appended_bytes,
            self.wal_batch_disk_us,
            self.wal_segments,
            self.wal_recycled_segments,
            self.wal_zero_filled_segments,
            self.wal_free_segments
        )
    }
}

/// The live counters behind [`CoreStat`]: written by the core thread, read by status requests
/// from any thread.
#[derive(Debug, Default)]
pub(crate) struct CoreCounters {
    pub raft_messages_sent: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub pings_sent: AtomicU64,
    pub groups: AtomicU64,
    pub groups_hibernating: AtomicU64,
    pub wakes: AtomicU64,
    pub raft_messages_refused: AtomicU64,
    pub inline_applies_active: std::sync::atomic::AtomicBool,
    pub applies_inline: AtomicU64,
    pub inline_slow_writes: AtomicU64,
    pub inline_dirty_refusals: AtomicU64,
    pub wal_batches: AtomicU64,
    pub wal_appended_entries: AtomicU64,
    pub wal_appended_bytes: AtomicU64,
    pub wal_batch_disk_us: AtomicU64,
    pub wal_segments: AtomicU64,
    pub wal_recycled_segments: AtomicU64,
    pub wal_zero_filled_segments: AtomicU64,
    pub wal_free_segments: AtomicU64,
}

impl CoreCounters {
    pub fn stat(&self, core: usize) -> CoreStat {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoreStat {
            core,
            raft_messages_sent: get(&self.raft_messages_sent),
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            pings_sent: get(&self.pings_sent),
            groups: get(&self.groups),
            groups_hibernating: get(&self.groups_hibernating),
            wakes: get(&self.wakes),
            raft_messages_refused: get(&self.raft_messages_refused),
            inline_applies_active: self.inline_applies_active.load(Ordering::Relaxed),
            applies_inline: get(&self.applies_inline),
            inline_slow_writes: get(&self.inline_slow_writes),
            inline_dirty_refusals: get(&self.inline_dirty_refusals),
            wal_batches: get(&self.wal_batches),
            wal_appended_entries: get(&self.wal_appended_entries),
            wal_appended_bytes: get(&self.wal_appended_bytes),
            wal_batch_disk_us: get(&self.wal_batch_disk_us),
            wal_segments: get(&self.wal_segments),
            wal_recycled_segments: get(&self.wal_recycled_segments),
            wal_zero_filled_segments: get(&self.wal_zero_filled_segments),
            wal_free_segments: get(&self.wal_free_segments),
        }
    }

    /// Copies the WAL's counters (on the core thread, every tick).
    pub fn publish_wal(&self, st: &raftlog::wal::WalStatus) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.wal_batches, st.batches);
        set(&self.wal_appended_entries, st.appended_entries);
        set(&self.wal_appended_bytes, st.appended_bytes);
        set(&self.wal_batch_disk_us, st.batch_disk_us);
        set(&self.wal_segments, st.segments as u64);
        set(&self.wal_recycled_segments, st.recycled_segments);
        set(&self.wal_zero_filled_segments, st.zero_filled_segments);
        set(&self.wal_free_segments, st.free_segments as u64);
    }
}
