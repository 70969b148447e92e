//! The in-memory index of every group's log: where each live entry lives on
//! disk, the group's hard state and compaction point, and which segments the
//! group still needs (the purge rule).
//!
//! The same code applies records live and at recovery.
//!
//! # The purge rule
//! Each group remembers `base_seg`: the segment of its first record since it
//! was created or last reset (a `GroupImage` record, written by cold-group
//! rewrite, replaces the group's whole state in one checksummed record). A
//! segment may be deleted once it is older than every group's `base_seg`:
//! then, for every live group, every record since its last reset survives,
//! so replay rebuilds exactly the live history. Records older than a group's
//! reset may survive in segments kept for other groups; replaying them can
//! meet gaps (their predecessors were purged), so replay is lenient there
//! (see [`GroupIndex::append`]) and the reset then overwrites the result.

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
    /// Segment of the group's first record since creation or last reset.
    pub base_seg: u64,
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

    /// A new, empty group whose first record is in segment `seq`.
    pub fn new(seq: u64) -> GroupIndex {
        GroupIndex {
            base_seg: seq,
            ..GroupIndex::default()
        }
    }

    /// Appends entries starting at `first`, dropping any suffix from `first`
    /// on. Live appends were validated (`first` in `compacted+1..=last+1`).
    /// At recovery `first` may lie beyond `last + 1` (the records between
    /// were in purged segments, so a later compact record covers them: the
    /// log restarts at `first`), or at or below the compaction point (the
    /// covered entries are skipped). Returns the cached bytes dropped.
    pub fn append(&mut self, first: Index, new: impl IntoIterator<Item = EntryLoc>) -> usize {
        let mut dropped = 0;
        let mut new = new.into_iter();
        let mut first = first;
        while first <= self.compacted_index {
            if new.next().is_none() {
                return 0;
            }
            first += 1;
        }
        if first > self.last_index() + 1 {
            dropped += drain_cached(self.entries.drain(..));
            self.compacted_index = first - 1;
            // Unknown until the compact record that covers the gap replays.
            self.compacted_term = 0;
        } else {
            let keep = (first - self.compacted_index - 1) as usize;
            dropped += drain_cached(self.entries.drain(keep..));
        }
        self.entries.extend(new);
        dropped
    }

    /// The `LogStore::compact` rule. Returns the cached bytes dropped.
    pub fn compact(&mut self, index: Index, term: Term) -> usize {
        if index <= self.compacted_index {
            return 0;
        }
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

/// The group's index entry, created (based at `seq`) if new.
pub fn group_at(
    groups: &mut BTreeMap<GroupId, GroupIndex>,
    group: GroupId,
    seq: u64,
) -> &mut GroupIndex {
    groups.entry(group).or_insert_with(|| GroupIndex::new(seq))
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
