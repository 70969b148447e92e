//! The log-store contract every backend meets: the per-core WAL ([`crate::wal`])
//! and the simulated in-memory backend ([`mem::MemStore`]) used by the raft
//! simulator. `conformance` holds the test suite both must pass.
//!
//! Rules a backend guarantees (the raft core's safety rests on them):
//! - Operations take effect in the order they are issued, per group and
//!   across groups.
//! - After `sync()` returns `Ok`, every earlier operation survives a crash.
//!   Operations after the last successful sync may be lost on a crash, but
//!   only as a suffix: if an operation survives, every earlier one does too.
//! - `append` with a first index `<= last_index` first discards the old
//!   entries from that index on (a conflicting suffix).
//! - A failed sync is fatal: the store refuses every later call.

use crate::core::types::{Entry, GroupId, HardState, Index, Term};

pub mod conformance;
pub mod mem;

/// What a group's log looks like after recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupLogState {
    pub hard_state: HardState,
    /// Entries `<= compacted_index` have been dropped; `compacted_term` is the
    /// term of the entry at `compacted_index` (0 when nothing was compacted).
    pub compacted_index: Index,
    pub compacted_term: Term,
    /// Index of the last entry (== compacted_index when the log is empty).
    pub last_index: Index,
}

pub trait LogStore {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Appends `entries` (consecutive indexes) to `group`'s log. The first
    /// entry's index must be in `compacted_index + 1 ..= last_index + 1`.
    fn append(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), Self::Error>;
    /// Replaces `group`'s term and vote atomically.
    fn set_hard_state(&mut self, group: GroupId, hs: HardState) -> Result<(), Self::Error>;
    /// Drops `group`'s entries `<= index` (after a snapshot covering them).
    /// `term` is the term of the entry at `index`. If `index` is beyond the
    /// last entry, or the log's entry at `index` has a term other than
    /// `term`, the whole log is dropped (installing a snapshot that does not
    /// match the log: raft's rule is to discard it) and the next append must
    /// start at `index + 1`.
    fn compact(&mut self, group: GroupId, index: Index, term: Term) -> Result<(), Self::Error>;
    /// Removes `group` and all its entries (the group was deleted).
    fn remove_group(&mut self, group: GroupId) -> Result<(), Self::Error>;
    /// Makes every operation issued so far durable.
    fn sync(&mut self) -> Result<(), Self::Error>;

    /// The recovered or current state of `group` (None if unknown).
    fn group_state(&self, group: GroupId) -> Option<GroupLogState>;
    /// Every group the store holds anything for, in ascending order.
    fn groups(&self) -> Vec<GroupId>;
    /// Entries `lo..hi` of `group` (must be within the log).
    fn entries(&mut self, group: GroupId, lo: Index, hi: Index) -> Result<Vec<Entry>, Self::Error>;
}
