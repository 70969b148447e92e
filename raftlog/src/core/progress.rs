//! The leader's view of one follower's replication.

use super::types::{DiskId, Index};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// One AppendEntries at a time until the follower's match point is found.
    Probe,
    /// Pipelined: next_index advances optimistically, bounded by the
    /// in-flight limits.
    Replicate,
    /// A snapshot is being sent; no AppendEntries until it completes.
    Snapshot,
}

impl ProgressState {
    pub fn name(self) -> &'static str {
        match self {
            ProgressState::Probe => "probe",
            ProgressState::Replicate => "replicate",
            ProgressState::Snapshot => "snapshot",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub match_index: Index,
    pub next_index: Index,
    pub state: ProgressState,
    /// Probe: an AppendEntries is outstanding; wait for a reply or a
    /// heartbeat response before sending another.
    pub probe_sent: bool,
    /// Replicate: (last index, bytes) of each AppendEntries in flight.
    pub inflight: VecDeque<(Index, usize)>,
    pub inflight_bytes: usize,
    /// Snapshot: the index being sent and the ticks spent on it.
    pub snapshot_index: Index,
    pub snapshot_ticks: u32,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Highest heartbeat round the follower acknowledged.
    pub acked_round: u64,
    pub readonly: bool,
    /// The disk id the follower last answered with (0 = not heard yet).
    pub disk: DiskId,
    /// Highest round stamped on an answer from `disk`: an answer from another disk stamped
    /// with no later round was sent by an earlier life of the follower (its old storage) and
    /// is dropped.
    pub disk_round: u64,
    /// Highest round stamped on a response that showed the follower holding
    /// `match_index` (for a snapshot, the leader's round when it was
    /// acknowledged): a response stamped with a later round that shows less
    /// comes from storage that lost what it acknowledged.
    pub match_round: u64,
    /// The follower was found holding less than it acknowledged (a restored
    /// backup of its storage): demote and rebuild it.
    pub forgot: bool,
}

impl Progress {
    pub fn new(next_index: Index) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            snapshot_index: 0,
            snapshot_ticks: 0,
            recent_active: false,
            acked_round: 0,
            readonly: false,
            disk: 0,
            disk_round: 0,
            match_round: 0,
            forgot: false,
        }
    }

    /// Records a response from the follower: it is alive, acknowledged
    /// heartbeat `round`, and is or is not read-only.
    pub fn heard(&mut self, round: u64, readonly: bool) {
        self.recent_active = true;
        self.readonly = readonly;
        self.acked_round = self.acked_round.max(round);
    }

    pub fn become_probe(&mut self) {
        // After a snapshot the follower holds at least the snapshot.
        let floor = if self.state == ProgressState::Snapshot {
            self.match_index.max(self.snapshot_index)
        } else {
            self.match_index
        };
        self.state = ProgressState::Probe;
        self.next_index = floor + 1;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// The snapshot send failed or timed out: the follower is not known to
    /// hold it, so probe from what it acknowledged (etcd clears
    /// PendingSnapshot before BecomeProbe on failure).
    pub fn snapshot_failed(&mut self) {
        self.snapshot_index = 0;
        self.become_probe();
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    pub fn become_snapshot(&mut self, index: Index) {
        self.state = ProgressState::Snapshot;
        self.snapshot_index = index;
        self.snapshot_ticks = 0;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Records an acknowledgement up to `index`; false if it was stale.
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        if self.next_index < index + 1 {
            self.next_index = index + 1;
        }
        self.free_inflight_to(index);
        updated
    }

    pub fn free_inflight_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.inflight.front() {
            if last > index {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes -= bytes;
        }
    }

    /// Forgets the oldest in-flight append (its ack is presumed lost).
    pub fn free_first_one(&mut self) {
        if let Some((_, bytes)) = self.inflight.pop_front() {
            self.inflight_bytes -= bytes;
        }
    }

    pub fn can_send(&self, inflight_messages_max: usize, inflight_bytes_max: usize) -> bool {
        match self.state {
            ProgressState::Probe => !self.probe_sent,
            ProgressState::Replicate => {
                self.inflight.len() < inflight_messages_max
                    && self.inflight_bytes < inflight_bytes_max
            }
            ProgressState::Snapshot => false,
        }
    }

    /// Accounts for an AppendEntries just sent covering up to `last`.
    pub fn sent(&mut self, last: Index, bytes: usize, entries: usize) {
        match self.state {
            ProgressState::Replicate => {
                if entries > 0 {
                    self.next_index = last + 1;
                    self.inflight.push_back((last, bytes));
                    self.inflight_bytes += bytes;
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => unreachable!("no appends while sending a snapshot"),
        }
    }
}
