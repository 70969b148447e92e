//! Simulated in-memory log store for the deterministic raft simulator.
//!
//! [`MemStore`] keeps two images of every group: the *current* one (what the
//! raft core sees) and the *durable* one (what survives a crash). Operations
//! are applied to the current image at once and queued in an op list; `sync`
//! replays the op list onto the durable image and clears it (the "synced
//! watermark" is the start of the list). [`MemStore::crash`] throws the current
//! image away and rebuilds it from the durable one plus whatever prefix of the
//! unsynced ops the caller says survived.
//!
//! What a torn write means here: the WAL writes each op as one or more records
//! in order, each record checksummed, so after a crash an op either survives
//! whole or is lost, except a multi-entry append, which the WAL may split into
//! several records: a torn append keeps a *prefix* of its entries (with the
//! conflicting-suffix truncation it implies), never a reordering or a hole.
//!
//! No randomness lives here: the simulator draws the choices (how many ops
//! survive, how many entries of the torn one) from its own seeded RNG, so every
//! run of a seed is identical. Costs are O(size of the op) per call and
//! O(state) per crash; nothing is copied on `sync` except the ops themselves.

use std::collections::{BTreeMap, VecDeque};

use crate::core::types::{Entry, GroupId, HardState, Index, Term};
use crate::error::Error;
use crate::storage::{GroupLogState, LogStore};

/// Checks the `LogStore::append` preconditions against a group whose log is
/// `compacted+1 ..= last`; shared by every backend so they refuse identically.
pub(crate) fn check_append(
    group: GroupId,
    compacted: Index,
    last: Index,
    entries: &[Entry],
) -> Result<(), Error> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    if first.index <= compacted || first.index > last + 1 {
        return Err(Error::LogAppendOutOfRange {
            group,
            first: first.index,
            min: compacted + 1,
            max: last + 1,
        });
    }
    for w in entries.windows(2) {
        if w[1].index != w[0].index + 1 {
            return Err(Error::LogNotContiguous {
                group,
                prev: w[0].index,
                index: w[1].index,
            });
        }
    }
    Ok(())
}

/// Checks the `LogStore::entries` preconditions.
pub(crate) fn check_range(
    group: GroupId,
    compacted: Index,
    last: Index,
    lo: Index,
    hi: Index,
) -> Result<(), Error> {
    if lo <= compacted {
        return Err(Error::Compacted { group, index: lo });
    }
    if lo > hi || hi > last + 1 {
        return Err(Error::LogRange {
            group,
            lo,
            hi,
            first: compacted + 1,
            last,
        });
    }
    Ok(())
}

/// One group's log image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MemGroup {
    hard_state: HardState,
    compacted_index: Index,
    compacted_term: Term,
    /// `entries[i].index == compacted_index + 1 + i`.
    entries: VecDeque<Entry>,
}

impl MemGroup {
    fn last_index(&self) -> Index {
        self.compacted_index + self.entries.len() as Index
    }

    fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.compacted_index {
            return Some(self.compacted_term);
        }
        if index < self.compacted_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.compacted_index - 1) as usize].term)
    }

    /// Appends already-validated entries, dropping a conflicting suffix.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        let keep = (first.index - self.compacted_index - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend(entries.iter().cloned());
        debug_assert_eq!(
            self.entries.back().map(|e| e.index),
            Some(self.last_index())
        );
    }

    /// The `LogStore::compact` rule: a prefix whose last entry matches `term`
    /// is dropped; otherwise (index beyond the log, or a different term at
    /// `index`: a snapshot that does not match the log) the whole log goes.
    fn compact(&mut self, index: Index, term: Term) {
        if index <= self.compacted_index {
            return;
        }
        if self.term_at(index) == Some(term) {
            let n = (index - self.compacted_index) as usize;
            self.entries.drain(..n);
        } else {
            self.entries.clear();
        }
        self.compacted_index = index;
        self.compacted_term = term;
    }

    fn state(&self) -> GroupLogState {
        GroupLogState {
            hard_state: self.hard_state,
            compacted_index: self.compacted_index,
            compacted_term: self.compacted_term,
            last_index: self.last_index(),
        }
    }
}

/// An operation issued to the store, as kept in the unsynced op list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemOp {
    Append(GroupId, Vec<Entry>),
    SetHardState(GroupId, HardState),
    Compact(GroupId, Index, Term),
    RemoveGroup(GroupId),
}

impl MemOp {
    fn apply(&self, groups: &mut BTreeMap<GroupId, MemGroup>) {
        match self {
            MemOp::Append(g, entries) => groups.entry(*g).or_default().append(entries),
            MemOp::SetHardState(g, hs) => groups.entry(*g).or_default().hard_state = *hs,
            MemOp::Compact(g, index, term) => groups.entry(*g).or_default().compact(*index, *term),
            MemOp::RemoveGroup(g) => {
                groups.remove(g);
            }
        }
    }
}

/// Which unsynced operations survive a crash. Only a prefix can survive:
/// ops `0..keep_ops` whole, then, if `torn_entries > 0` and op `keep_ops` is
/// a multi-entry append, its first `torn_entries` entries (capped below its
/// length, so a torn append always loses at least its last entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashPlan {
    pub keep_ops: usize,
    pub torn_entries: usize,
}

/// Deterministic in-memory `LogStore`.
#[derive(Debug, Default)]
pub struct MemStore {
    current: BTreeMap<GroupId, MemGroup>,
    durable: BTreeMap<GroupId, MemGroup>,
    /// Ops issued since the last successful sync, oldest first.
    unsynced: Vec<MemOp>,
    /// When set, the next `sync` fails and the store becomes failed.
    fail_next_sync: bool,
    failed: bool,
    syncs: u64,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Number of operations issued since the last successful sync.
    pub fn unsynced_ops(&self) -> &[MemOp] {
        &self.unsynced
    }

    /// Successful syncs so far (lets the simulator count fsyncs).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Makes the next `sync` fail as if fdatasync returned EIO: the store is
    /// failed from then on (every call errors), exactly as the WAL behaves.
    pub fn inject_sync_failure(&mut self) {
        self.fail_next_sync = true;
    }

    /// Simulates a crash and restart. `tear_last = false` drops every
    /// unsynced op; `tear_last = true` models a crash in the middle of the
    /// last write: every unsynced op but the last survives, and the last one
    /// survives only as a torn prefix (half its entries, rounded down, if it
    /// is a multi-entry append; otherwise it is lost).
    pub fn crash(&mut self, tear_last: bool) {
        let plan = if tear_last && !self.unsynced.is_empty() {
            let last = self.unsynced.len() - 1;
            let torn = match &self.unsynced[last] {
                MemOp::Append(_, e) => e.len() / 2,
                _ => 0,
            };
            CrashPlan {
                keep_ops: last,
                torn_entries: torn,
            }
        } else {
            CrashPlan::default()
        };
        self.crash_with(plan);
    }

    /// Simulates a crash and restart in which exactly the ops selected by
    /// `plan` survive (see [`CrashPlan`]). The failed state is cleared, as a
    /// restarted process starts with a fresh store.
    pub fn crash_with(&mut self, plan: CrashPlan) {
        let keep = plan.keep_ops.min(self.unsynced.len());
        for op in &self.unsynced[..keep] {
            op.apply(&mut self.durable);
        }
        if let Some(MemOp::Append(g, entries)) = self.unsynced.get(keep) {
            let n = plan.torn_entries.min(entries.len().saturating_sub(1));
            if n > 0 {
                MemOp::Append(*g, entries[..n].to_vec()).apply(&mut self.durable);
            }
        }
        self.unsynced.clear();
        self.current = self.durable.clone();
        self.failed = false;
        self.fail_next_sync = false;
    }

    fn check_alive(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::LogFailed {
                reason: "injected sync failure".into(),
            });
        }
        Ok(())
    }

    fn issue(&mut self, op: MemOp) {
        op.apply(&mut self.current);
        self.unsynced.push(op);
    }
}

impl LogStore for MemStore {
    type Error = Error;

    fn append(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), Error> {
        self.check_alive()?;
        if entries.is_empty() {
            return Ok(());
        }
        let (compacted, last) = self
            .current
            .get(&group)
            .map_or((0, 0), |g| (g.compacted_index, g.last_index()));
        check_append(group, compacted, last, entries)?;
        self.issue(MemOp::Append(group, entries.to_vec()));
        Ok(())
    }

    fn set_hard_state(&mut self, group: GroupId, hs: HardState) -> Result<(), Error> {
        self.check_alive()?;
        self.issue(MemOp::SetHardState(group, hs));
        Ok(())
    }

    fn compact(&mut self, group: GroupId, index: Index, term: Term) -> Result<(), Error> {
        self.check_alive()?;
        self.issue(MemOp::Compact(group, index, term));
        Ok(())
    }

    fn remove_group(&mut self, group: GroupId) -> Result<(), Error> {
        self.check_alive()?;
        if self.current.contains_key(&group) {
            self.issue(MemOp::RemoveGroup(group));
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.check_alive()?;
        if self.fail_next_sync {
            self.failed = true;
            return Err(Error::LogFailed {
                reason: "injected sync failure".into(),
            });
        }
        for op in self.unsynced.drain(..) {
            op.apply(&mut self.durable);
        }
        self.syncs += 1;
        debug_assert!(self.current == self.durable);
        Ok(())
    }

    fn group_state(&self, group: GroupId) -> Option<GroupLogState> {
        self.current.get(&group).map(MemGroup::state)
    }

    fn groups(&self) -> Vec<GroupId> {
        self.current.keys().copied().collect()
    }

    fn entries(&mut self, group: GroupId, lo: Index, hi: Index) -> Result<Vec<Entry>, Error> {
        self.check_alive()?;
        let g = self
            .current
            .get(&group)
            .ok_or(Error::LogUnknownGroup { group })?;
        check_range(group, g.compacted_index, g.last_index(), lo, hi)?;
        let start = (lo - g.compacted_index - 1) as usize;
        let end = (hi - g.compacted_index - 1) as usize;
        Ok(g.entries.range(start..end).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::EntryKind;
    use bytes::Bytes;

    fn ents(lo: Index, hi: Index, term: Term) -> Vec<Entry> {
        (lo..=hi)
            .map(|index| Entry {
                index,
                term,
                kind: EntryKind::Normal,
                data: Bytes::from(format!("{index}/{term}")),
            })
            .collect()
    }

    #[test]
    fn crash_drops_unsynced_ops() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 3, 1)).unwrap();
        s.sync().unwrap();
        s.append(1, &ents(4, 6, 1)).unwrap();
        s.set_hard_state(
            1,
            HardState {
                term: 2,
                vote: 3,
                disk: 900 + 2,
            },
        )
        .unwrap();
        s.crash(false);
        let st = s.group_state(1).unwrap();
        assert_eq!(st.last_index, 3);
        assert_eq!(st.hard_state, HardState::default());
    }

    #[test]
    fn torn_append_keeps_a_prefix_of_its_entries() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 5, 1)).unwrap();
        s.sync().unwrap();
        // An overwrite from index 3 that is torn after one entry: the
        // truncation and entry 3 (term 2) survive, entries 4.. are lost.
        s.append(1, &ents(3, 6, 2)).unwrap();
        s.crash_with(CrashPlan {
            keep_ops: 0,
            torn_entries: 1,
        });
        assert_eq!(s.group_state(1).unwrap().last_index, 3);
        let e = s.entries(1, 1, 4).unwrap();
        assert_eq!(e.iter().map(|e| e.term).collect::<Vec<_>>(), vec![1, 1, 2]);
    }

    #[test]
    fn tear_last_keeps_earlier_unsynced_ops() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 2, 1)).unwrap();
        s.append(2, &ents(1, 4, 1)).unwrap();
        s.crash(true);
        assert_eq!(s.group_state(1).unwrap().last_index, 2);
        assert_eq!(s.group_state(2).unwrap().last_index, 2);
    }

    #[test]
    fn torn_entries_never_keep_the_whole_append() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 2, 1)).unwrap();
        s.crash_with(CrashPlan {
            keep_ops: 0,
            torn_entries: 99,
        });
        assert_eq!(s.group_state(1).unwrap().last_index, 1);
    }

    #[test]
    fn injected_sync_failure_is_fatal_until_restart() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 1, 1)).unwrap();
        s.inject_sync_failure();
        assert!(s.sync().is_err());
        assert!(s.append(1, &ents(2, 2, 1)).is_err());
        assert!(s.sync().is_err());
        s.crash(false);
        assert!(s.group_state(1).is_none());
        s.append(1, &ents(1, 1, 1)).unwrap();
        s.sync().unwrap();
    }

    #[test]
    fn compact_with_mismatching_term_drops_the_whole_log() {
        let mut s = MemStore::new();
        s.append(1, &ents(1, 5, 1)).unwrap();
        s.compact(1, 3, 9).unwrap();
        let st = s.group_state(1).unwrap();
        assert_eq!(
            (st.compacted_index, st.compacted_term, st.last_index),
            (3, 9, 3)
        );
        s.append(1, &ents(4, 4, 9)).unwrap();
        assert_eq!(s.group_state(1).unwrap().last_index, 4);
    }
}
