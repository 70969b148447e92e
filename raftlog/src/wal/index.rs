//! The in-memory index of every group's log: where each live entry lives on
//! disk, the group's hard state and compaction point, and which segments the
//! group still needs (the purge rule).
//!
//! The same code applies records live and at recovery.
//!
//! # The purge rule
//! Each group remembers where its history restarts (`replay_from`): its
//! first record since it was created or reset (a `GroupImage` record,
//! written by the cold-group rewrite, replaces the group's whole state in
//! one checksummed record), moved by every compaction to the record holding
//! the first live entry (or to the compact record itself when none is
//! left). The compact record stores that position, and a compaction also
//! writes the group's hard state again when its record is older, so the
//! group needs nothing before its restart point except its latest hard
//! state. Its pin ([`GroupIndex::pin`]) is the older of the two, and a
//! segment may be deleted once it is older than every group's pin. A group
//! that compacts (raft does after every snapshot) thus frees its old
//! segments without rewriting anything; one that never compacts is moved by
//! the cold-group rewrite.
//!
//! Purging deletes a prefix of the segments, so every record of a group
//! from its restart point on survives, in order. Records of the group older
//! than that may survive in segments kept for other groups; recovery skips
//! its entries, compact and image records before the restart point named by
//! its latest compact record (hard-state records are never skipped: the
//! latest wins). Replay starting mid-history meets the first record with
//! the log before it unknown: the log restarts at that record's first
//! index ([`GroupIndex::append`]) and the compact record that follows fixes
//! the compaction point and its term. Recovery refuses a group whose
//! compaction term is still unknown at the end (the rule guarantees it
//! cannot happen).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::core::types::{EntryKind, GroupId, HardState, Index, Term};

/// Where one entry's data is, and its cached copy while it is recent.
#[derive(Clone, Debug)]
pub struct EntryLoc {
    pub term: Term,
    pub kind: EntryKind,
    pub seg: u64,
    /// File offset of the entry's data.
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub cached: Option<Bytes>,
}

#[derive(Clone, Debug, Default)]
pub struct GroupIndex {
    pub hard_state: HardState,
    pub compacted_index: Index,
    pub compacted_term: Term,
    /// Segment of the latest hard-state (or image) record.
    pub hs_seg: Option<u64>,
    /// Where the group's history restarts: (segment, a byte offset inside
    /// the record); see the module docs.
    pub replay_from: (u64, u64),
    /// Replay only: the entries up to `compacted_index` are not known (the
    /// records that wrote them were purged) and `compacted_term` is not
    /// known either until a compact record sets it.
    pub prefix_unknown: bool,
    /// `entries[i]` is index `compacted_index + 1 + i`.
    pub entries: VecDeque<EntryLoc>,
}

impl GroupIndex {
    pub fn last_index(&self) -> Index {
        self.compacted_index + self.entries.len() as Index
    }

    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.compacted_index {
            return Some(self.compacted_term);
        }
        if index < self.compacted_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.compacted_index - 1) as usize].term)
    }

    pub fn get(&self, index: Index) -> Option<&EntryLoc> {
        if index <= self.compacted_index {
            return None;
        }
        self.entries
            .get((index - self.compacted_index - 1) as usize)
    }

    /// The oldest segment holding a record this group needs (see the
    /// module docs).
    pub fn pin(&self) -> u64 {
        self.hs_seg
            .map_or(self.replay_from.0, |s| s.min(self.replay_from.0))
    }

    /// A new, empty group whose first record is at `at`.
    pub fn new(at: (u64, u64)) -> GroupIndex {
        GroupIndex {
            replay_from: at,
            ..GroupIndex::default()
        }
    }

    /// The group as an image record at `at` (segment `at.0`) sets it: hard
    /// state `hs`, compacted to `compacted` (index, term), no entries yet.
    pub fn image(at: (u64, u64), hs: HardState, compacted: (Index, Term)) -> GroupIndex {
        let mut g = GroupIndex::new(at);
        g.set_hard_state(hs, at.0);
        (g.compacted_index, g.compacted_term) = compacted;
        g
    }

    /// The group's hard state, as a record in segment `seq` sets it (the
    /// purge rule keeps that segment: see [`Self::pin`]).
    pub fn set_hard_state(&mut self, hs: HardState, seq: u64) {
        self.hard_state = hs;
        self.hs_seg = Some(seq);
    }

    /// Appends entries starting at `first`, dropping any suffix from `first`
    /// on. Live appends were validated (`first` in `compacted+1..=last+1`).
    /// At recovery `first` may lie beyond `last + 1`: the records between
    /// were purged, so the log restarts at `first` with an unknown prefix
    /// (a later compact record covers it). While the prefix is unknown, a
    /// record starting inside it truncates there, as it did when written.
    /// Otherwise a record starting at or below a known compaction point has
    /// its covered entries skipped. Returns the cached bytes dropped.
    pub fn append(&mut self, first: Index, new: impl IntoIterator<Item = EntryLoc>) -> usize {
        let mut dropped = 0;
        let mut new = new.into_iter();
        let mut first = first;
        if self.prefix_unknown && first <= self.compacted_index {
            dropped += drain_cached(self.entries.drain(..));
            self.compacted_index = first - 1;
        }
        while first <= self.compacted_index {
            if new.next().is_none() {
                return dropped;
            }
            first += 1;
        }
        if first > self.last_index() + 1 {
            dropped += drain_cached(self.entries.drain(..));
            self.compacted_index = first - 1;
            self.compacted_term = 0;
            self.prefix_unknown = true;
        } else {
            let keep = (first - self.compacted_index - 1) as usize;
            dropped += drain_cached(self.entries.drain(keep..));
        }
        self.entries.extend(new);
        dropped
    }

    /// The `LogStore::compact` rule. Returns the cached bytes dropped.
    pub fn compact(&mut self, index: Index, term: Term) -> usize {
        if self.prefix_unknown && index == self.compacted_index {
            // Replay: the compact record names the term the gap left unknown.
            self.compacted_term = term;
            self.prefix_unknown = false;
            return 0;
        }
        if index <= self.compacted_index {
            return 0;
        }
        self.prefix_unknown = false;
        let dropped = if self.term_at(index) == Some(term) {
            let n = (index - self.compacted_index) as usize;
            drain_cached(self.entries.drain(..n))
        } else {
            drain_cached(self.entries.drain(..))
        };
        self.compacted_index = index;
        self.compacted_term = term;
        dropped
    }

    pub fn cached_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.cached.as_ref().map_or(0, |b| b.len()))
            .sum()
    }
}

/// The group's index entry, created (its history starting at `at`) if new.
pub fn group_at(
    groups: &mut BTreeMap<GroupId, GroupIndex>,
    group: GroupId,
    at: (u64, u64),
) -> &mut GroupIndex {
    groups.entry(group).or_insert_with(|| GroupIndex::new(at))
}

fn drain_cached(it: impl Iterator<Item = EntryLoc>) -> usize {
    it.map(|e| e.cached.map_or(0, |b| b.len())).sum()
}

/// Recent entries' data, kept in the index's `EntryLoc::cached` and evicted
/// oldest first once over the byte limit. Only entries already written may
/// be evicted: until then the cache is the only copy that can be read.
#[derive(Debug, Default)]
pub struct Cache {
    /// Cached entries in insertion order: (group, index, seg, offset).
    /// Items whose entry was since dropped are stale and skipped.
    fifo: VecDeque<(GroupId, Index, u64, u64)>,
    pub bytes: usize,
}

impl Cache {
    pub fn insert(&mut self, group: GroupId, index: Index, loc: &EntryLoc) {
        self.fifo.push_back((group, index, loc.seg, loc.offset));
        self.bytes += loc.len as usize;
    }

    pub fn dropped(&mut self, bytes: usize) {
        assert!(bytes <= self.bytes, "cache accounting underflow");
        self.bytes -= bytes;
    }

    /// Evicts until under `max` bytes, stopping at the first entry not yet
    /// written (`written` = (segment, offset) written up to).
    pub fn evict(
        &mut self,
        groups: &mut BTreeMap<GroupId, GroupIndex>,
        max: usize,
        written: (u64, u64),
    ) {
        while let Some(&(g, index, seg, offset)) = self.fifo.front() {
            let live = groups
                .get_mut(&g)
                .and_then(|gi| {
                    if index <= gi.compacted_index {
                        return None;
                    }
                    gi.entries
                        .get_mut((index - gi.compacted_index - 1) as usize)
                })
                .filter(|e| e.seg == seg && e.offset == offset && e.cached.is_some());
            match live {
                None => {
                    self.fifo.pop_front();
                }
                Some(e) => {
                    if self.bytes <= max || (seg, offset) >= written {
                        break;
                    }
                    let b = e.cached.take().expect("filtered on cached");
                    self.bytes -= b.len();
                    self.fifo.pop_front();
                }
            }
        }
        // Stale items behind a live head are removed in bulk now and then so
        // the queue stays proportional to what is cached.
        if self.fifo.len() > 4096 && self.fifo.len() > 4 * (self.bytes / 64 + 1) {
            self.fifo.retain(|&(g, index, seg, offset)| {
                groups
                    .get(&g)
                    .and_then(|gi| gi.get(index))
                    .is_some_and(|e| e.seg == seg && e.offset == offset && e.cached.is_some())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(term: Term, seg: u64, offset: u64, cached: bool) -> EntryLoc {
        EntryLoc {
            term,
            kind: EntryKind::Normal,
            seg,
            offset,
            len: 3,
            crc: 0,
            cached: cached.then(|| Bytes::from_static(b"abc")),
        }
    }

    #[test]
    fn append_over_a_gap_restarts_the_log() {
        let mut g = GroupIndex::default();
        g.append(1, [loc(1, 1, 0, false), loc(1, 1, 8, false)]);
        g.append(10, [loc(2, 2, 0, false)]);
        assert_eq!((g.compacted_index, g.last_index()), (9, 10));
    }

    #[test]
    fn replay_from_mid_history_restarts_and_learns_the_term() {
        // The first surviving record starts at 55: the log below is unknown.
        let mut g = GroupIndex::default();
        g.append(55, [loc(2, 3, 0, false), loc(2, 3, 8, false)]);
        assert!(g.prefix_unknown);
        assert_eq!((g.compacted_index, g.compacted_term), (54, 0));
        // A later record truncated at 11 when it was written: it does so again.
        g.append(11, [loc(3, 4, 0, false)]);
        assert_eq!((g.compacted_index, g.last_index()), (10, 11));
        assert_eq!(g.get(11).unwrap().term, 3);
        // The compact record names the term the gap left unknown.
        g.compact(10, 1);
        assert!(!g.prefix_unknown);
        assert_eq!((g.compacted_index, g.compacted_term), (10, 1));
        assert_eq!(g.last_index(), 11);
    }

    #[test]
    fn append_below_compaction_skips_covered_entries() {
        let mut g = GroupIndex::default();
        g.compact(5, 1);
        g.append(
            4,
            [
                loc(1, 2, 0, false),
                loc(1, 2, 8, false),
                loc(1, 2, 16, false),
            ],
        );
        assert_eq!((g.compacted_index, g.last_index()), (5, 6));
        assert_eq!(g.get(6).unwrap().offset, 16);
    }

    #[test]
    fn eviction_stops_at_unwritten_entries() {
        let mut groups = BTreeMap::new();
        let mut g = GroupIndex::default();
        let entries = [loc(1, 1, 0, true), loc(1, 1, 100, true), loc(1, 2, 0, true)];
        g.append(1, entries.clone());
        groups.insert(7, g);
        let mut c = Cache::default();
        for (i, e) in entries.iter().enumerate() {
            c.insert(7, i as Index + 1, e);
        }
        c.evict(&mut groups, 0, (1, 100));
        assert_eq!(c.bytes, 6);
        assert!(groups[&7].get(1).unwrap().cached.is_none());
        assert!(groups[&7].get(2).unwrap().cached.is_some());
        c.evict(&mut groups, 0, (3, 0));
        assert_eq!(c.bytes, 0);
    }
}
