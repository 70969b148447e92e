//! Plain data types shared by the raft core, the log stores and the hosts.

use bytes::Bytes;
use std::collections::BTreeSet;

/// Identity of a replica (a BD's peer id within a group).
pub type NodeId = u64;
/// Identity of a raft group (a block group).
pub type GroupId = u64;
pub type Term = u64;
pub type Index = u64;

/// What an entry carries. Stored as one byte in the log formats, so the
/// discriminants are part of the on-disk format and must never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// Written by every new leader so that it can commit entries of earlier
    /// terms (they only commit through an entry of the leader's own term).
    Noop = 0,
    /// Opaque application data (a block write, a trim, ...).
    Normal = 1,
    /// `data` is an encoded [`Configuration`]; it takes effect when appended.
    Config = 2,
}

impl EntryKind {
    pub fn from_u8(v: u8) -> Option<EntryKind> {
        match v {
            0 => Some(EntryKind::Noop),
            1 => Some(EntryKind::Normal),
            2 => Some(EntryKind::Config),
            _ => None,
        }
    }
}

/// One log entry. `data` is reference counted so that replication to many
/// followers and the log store share one copy of the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    pub kind: EntryKind,
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry counts for in the in-flight and batching limits.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 24
    }
}

/// Durable per-group raft meta. Config lives in the log and snapshot, not here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    /// The candidate voted for in `term` (0 = none; node ids are never 0).
    pub vote: NodeId,
}

/// A group's membership. When `voters_outgoing` is non-empty the group is in
/// joint consensus: every decision needs a majority of both sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Configuration {
    pub voters: BTreeSet<NodeId>,
    pub voters_outgoing: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

/// Errors decoding a configuration entry.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigDecodeError;

impl Configuration {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Configuration {
        Configuration {
            voters: voters.into_iter().collect(),
            ..Default::default()
        }
    }

    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Every node that votes in either half of a joint configuration.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.voters_outgoing).copied().collect()
    }

    /// Every node the leader replicates to (voters of both halves and learners).
    pub fn all_members(&self) -> BTreeSet<NodeId> {
        let mut s = self.all_voters();
        s.extend(self.learners.iter().copied());
        s
    }

    /// The configuration a joint one leaves to: its incoming voters.
    pub fn leave_joint(&self) -> Configuration {
        Configuration {
            voters: self.voters.clone(),
            voters_outgoing: BTreeSet::new(),
            learners: self.learners.clone(),
        }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Whether `acked` holds a majority of every voter set in force.
    pub fn has_quorum(&self, acked: impl Fn(NodeId) -> bool) -> bool {
        fn majority(set: &BTreeSet<NodeId>, acked: &impl Fn(NodeId) -> bool) -> bool {
            if set.is_empty() {
                return true;
            }
            set.iter().filter(|id| acked(**id)).count() > set.len() / 2
        }
        majority(&self.voters, &acked)
            && (self.voters_outgoing.is_empty() || majority(&self.voters_outgoing, &acked))
    }

    /// Largest index `i` such that a quorum (of every voter set in force)
    /// has `matched(id) >= i`.
    pub fn quorum_index(&self, matched: impl Fn(NodeId) -> Index) -> Index {
        fn one(set: &BTreeSet<NodeId>, matched: &impl Fn(NodeId) -> Index) -> Index {
            if set.is_empty() {
                return Index::MAX;
            }
            let mut v: Vec<Index> = set.iter().map(|id| matched(*id)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v[set.len() / 2]
        }
        one(&self.voters, &matched).min(one(&self.voters_outgoing, &matched))
    }

    /// Encoding used for `EntryKind::Config` entries and snapshot metadata:
    /// three length-prefixed little-endian u64 lists.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(
            12 + 8 * (self.voters.len() + self.voters_outgoing.len() + self.learners.len()),
        );
        for set in [&self.voters, &self.voters_outgoing, &self.learners] {
            out.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for id in set {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        Bytes::from(out)
    }

    pub fn decode(mut b: &[u8]) -> Result<Configuration, ConfigDecodeError> {
        let mut sets: [BTreeSet<NodeId>; 3] = Default::default();
        for set in sets.iter_mut() {
            if b.len() < 4 {
                return Err(ConfigDecodeError);
            }
            let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
            b = &b[4..];
            if b.len() < n.checked_mul(8).ok_or(ConfigDecodeError)? {
                return Err(ConfigDecodeError);
            }
            for _ in 0..n {
                set.insert(u64::from_le_bytes(b[..8].try_into().unwrap()));
                b = &b[8..];
            }
        }
        if !b.is_empty() {
            return Err(ConfigDecodeError);
        }
        let [voters, voters_outgoing, learners] = sets;
        Ok(Configuration {
            voters,
            voters_outgoing,
            learners,
        })
    }
}

/// Metadata of a snapshot: the state machine image covers every entry up to
/// and including `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub conf: Configuration,
}
