//! The core's in-memory view of a group's log: entries after the compaction
//! point, plus the configurations they carry.

use super::types::{Configuration, Entry, EntryKind, Index, Term};
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub(crate) struct MemLog {
    /// Entries `<= compacted_index` are gone (covered by a snapshot or the
    /// empty prefix of a new log); `compacted_term` is the term at that index.
    compacted_index: Index,
    compacted_term: Term,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Configuration in force at `compacted_index`.
    base_conf: (Index, Configuration),
    /// Configuration entries after `compacted_index`, ascending.
    confs: Vec<(Index, Configuration)>,
}

impl MemLog {
    pub fn new(compacted_index: Index, compacted_term: Term, base_conf: Configuration) -> MemLog {
        MemLog {
            compacted_index,
            compacted_term,
            entries: VecDeque::new(),
            bytes: 0,
            base_conf: (compacted_index, base_conf),
            confs: Vec::new(),
        }
    }

    pub fn compacted(&self) -> (Index, Term) {
        (self.compacted_index, self.compacted_term)
    }

    pub fn first_index(&self) -> Index {
        self.compacted_index + 1
    }

    pub fn last_index(&self) -> Index {
        self.compacted_index + self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.compacted_term, |e| e.term)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes of the entries at or below `index` still held.
    pub fn bytes_through(&self, index: Index) -> usize {
        self.entries
            .iter()
            .take_while(|e| e.index <= index)
            .map(|e| e.size_bytes())
            .sum()
    }

    /// The lowest compaction point at or below `index` that keeps at most `bytes_max` bytes of
    /// the entries in (point, index].
    pub fn keep_from_within(&self, index: Index, bytes_max: usize) -> Index {
        let mut kept = 0usize;
        let mut from = index.min(self.last_index());
        while from > self.compacted_index {
            let e = &self.entries[(from - self.compacted_index - 1) as usize];
            if kept + e.size_bytes() > bytes_max {
                break;
            }
            kept += e.size_bytes();
            from -= 1;
        }
        from
    }

    /// Term of the entry at `index`, if known (the compaction point counts).
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.compacted_index {
            return Some(self.compacted_term);
        }
        if index < self.compacted_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.compacted_index - 1) as usize].term)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.compacted_index || index > self.last_index() {
            return None;
        }
        Some(&self.entries[(index - self.compacted_index - 1) as usize])
    }

    /// Entries from `lo` on, at most `entries_max` of them and at most
    /// `bytes_max` bytes (but always at least one if any exists).
    pub fn slice(&self, lo: Index, hi: Index, entries_max: usize, bytes_max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = lo.max(self.first_index());
        debug_assert_eq!(i, lo, "slice below the compaction point");
        while i <= hi && out.len() < entries_max {
            let e = self.entry(i).expect("slice within the log");
            if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
                break;
            }
            bytes += e.size_bytes();
            out.push(e.clone());
            i += 1;
        }
        out
    }

    pub fn append(&mut self, e: Entry) {
        assert_eq!(e.index, self.last_index() + 1, "log append out of order");
        assert!(e.term >= self.last_term(), "log terms must not decrease");
        if e.kind == EntryKind::Config {
            let conf = Configuration::decode(&e.data).expect("config entry decodes");
            self.confs.push((e.index, conf));
        }
        self.bytes += e.size_bytes();
        self.entries.push_back(e);
    }

    /// Removes entries `>= index`.
    pub fn truncate_from(&mut self, index: Index) {
        assert!(index > self.compacted_index, "truncating compacted entries");
        while self.last_index() >= index {
            let e = self.entries.pop_back().expect("non-empty");
            self.bytes -= e.size_bytes();
        }
        self.confs.retain(|(i, _)| *i < index);
    }

    /// Drops entries `<= index`; `index` must be within the log.
    pub fn compact_to(&mut self, index: Index) {
        if index <= self.compacted_index {
            return;
        }
        assert!(index <= self.last_index(), "compacting beyond the log");
        let term = self.term(index).expect("in log");
        let conf = self.conf_at(index).1.clone();
        let base_index = self.conf_at(index).0;
        while self.compacted_index < index {
            let e = self.entries.pop_front().expect("non-empty");
            self.bytes -= e.size_bytes();
            self.compacted_index += 1;
        }
        self.compacted_term = term;
        self.confs.retain(|(i, _)| *i > index);
        self.base_conf = (base_index, conf);
    }

    /// Replaces the whole log by an empty one after `index` (snapshot install).
    pub fn reset(&mut self, index: Index, term: Term, conf: Configuration) {
        *self = MemLog::new(index, term, conf);
    }

    /// Index and configuration in force at `index` (the latest configuration
    /// entry at or before it).
    pub fn conf_at(&self, index: Index) -> (Index, &Configuration) {
        match self.confs.iter().rev().find(|(i, _)| *i <= index) {
            Some((i, c)) => (*i, c),
            None => (self.base_conf.0, &self.base_conf.1),
        }
    }

    pub fn last_conf(&self) -> (Index, &Configuration) {
        self.conf_at(Index::MAX)
    }

    /// Overrides the configuration in force (reset_peers): it is recorded
    /// as the base, as if it had been in a snapshot.
    pub fn force_conf(&mut self, conf: Configuration) {
        let at = self.last_index();
        self.confs.clear();
        self.base_conf = (at, conf);
    }

    /// Index of the last entry of `term` at or below `hint` (fast backtracking).
    pub fn last_index_of_term_at_most(&self, term: Term, hint: Index) -> Option<Index> {
        let mut i = hint.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t == term => return Some(i),
                Some(t) if t < term => return None,
                Some(_) if i > self.compacted_index => i -= 1,
                _ => return None,
            }
        }
    }

    /// First index of the run of `term` that contains `index`.
    pub fn first_index_of_term(&self, index: Index) -> Index {
        let term = self.term(index).expect("in log");
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }
}
