//! Plain data types shared by the raft core, the log stores and the hosts.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};

/// Identity of a replica (a BD's peer id within a group).
pub type NodeId = u64;
/// Identity of a raft group (a block group).
pub type GroupId = u64;
pub type Term = u64;
pub type Index = u64;
/// Identity of one replica's storage: a random non-zero id drawn when the replica's files are
/// created and kept with its raft meta. A replica that comes back with another one (its disk was
/// replaced or wiped) is not the member that voted and acknowledged under the old one.
pub type DiskId = u64;

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
    /// This replica's storage identity (0 = none yet: a new replica, or one
    /// written before disk ids existed; the core then draws one).
    pub disk: DiskId,
}

/// A group's membership. When `voters_outgoing` is non-empty the group is in
/// joint consensus: every decision needs a majority of both sets.
///
/// `disks` binds members to the storage they voted and acknowledged with: a
/// leader counts a member toward a quorum only while it answers with that
/// disk id, and a voter grants votes only to candidates (and with a view of
/// itself) that agree with it. A voter without a binding is unbound: a group
/// whose voters are not all bound (a new group, or one written before disk
/// ids existed) elects its leader only by every voter's vote, and that leader
/// binds them all in its first entry. `rebuilding` lists learners that were
/// voters until their storage was found replaced or behind what they had
/// acknowledged; the leader makes them voters again once they hold its
/// whole committed log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Configuration {
    pub voters: BTreeSet<NodeId>,
    pub voters_outgoing: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub disks: BTreeMap<NodeId, DiskId>,
    pub rebuilding: BTreeSet<NodeId>,
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
        let mut c = Configuration {
            voters: self.voters.clone(),
            voters_outgoing: BTreeSet::new(),
            learners: self.learners.clone(),
            disks: self.disks.clone(),
            rebuilding: self.rebuilding.clone(),
        };
        c.retain_members();
        c
    }

    /// The membership alone: the same sets, no disk bindings or rebuilding marks.
    pub fn without_disks(&self) -> Configuration {
        Configuration {
            voters: self.voters.clone(),
            voters_outgoing: self.voters_outgoing.clone(),
            learners: self.learners.clone(),
            ..Default::default()
        }
    }

    /// The disk id `id` is bound to (0 = unbound).
    pub fn disk(&self, id: NodeId) -> DiskId {
        self.disks.get(&id).copied().unwrap_or(0)
    }

    /// Whether every voter is bound to a disk id.
    pub fn all_voters_bound(&self) -> bool {
        self.all_voters().iter().all(|v| self.disk(*v) != 0)
    }

    /// Drops bindings and rebuilding marks of nodes that are no longer members.
    pub fn retain_members(&mut self) {
        let members = self.all_members();
        self.disks.retain(|id, _| members.contains(id));
        let learners = &self.learners;
        self.rebuilding.retain(|id| learners.contains(id));
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

    /// Upper bound of the bytes [`encode`](Self::encode) writes.
    pub fn encoded_len_max(&self) -> usize {
        let lists = self.voters.len() + self.voters_outgoing.len() + self.learners.len();
        12 + 8 * lists + 8 + 16 * self.disks.len() + 8 * self.rebuilding.len()
    }

    /// Encoding used for `EntryKind::Config` entries and snapshot metadata:
    /// three length-prefixed little-endian u64 lists (voters, outgoing
    /// voters, learners), then, when there are any, the disk bindings (a
    /// count and (node, disk) pairs) and the rebuilding list. Bindings of
    /// non-members and rebuilding marks of non-learners are left out. A
    /// configuration without either encodes as before disk ids existed, and
    /// the three-list form decodes with none.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len_max());
        for set in [&self.voters, &self.voters_outgoing, &self.learners] {
            out.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for id in set {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        let disks: Vec<(&NodeId, &DiskId)> = self
            .disks
            .iter()
            .filter(|(id, disk)| **disk != 0 && self.contains(**id))
            .collect();
        let rebuilding: Vec<&NodeId> = self
            .rebuilding
            .iter()
            .filter(|id| self.learners.contains(id))
            .collect();
        if !disks.is_empty() || !rebuilding.is_empty() {
            out.extend_from_slice(&(disks.len() as u32).to_le_bytes());
            for (id, disk) in disks {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&disk.to_le_bytes());
            }
            out.extend_from_slice(&(rebuilding.len() as u32).to_le_bytes());
            for id in rebuilding {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        Bytes::from(out)
    }

    pub fn decode(mut b: &[u8]) -> Result<Configuration, ConfigDecodeError> {
        fn u32_at(b: &mut &[u8]) -> Result<usize, ConfigDecodeError> {
            if b.len() < 4 {
                return Err(ConfigDecodeError);
            }
            let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
            *b = &b[4..];
            Ok(n)
        }
        fn ids(b: &mut &[u8], n: usize, width: usize) -> Result<(), ConfigDecodeError> {
            if b.len() < n.checked_mul(width).ok_or(ConfigDecodeError)? {
                return Err(ConfigDecodeError);
            }
            Ok(())
        }
        fn u64_at(b: &mut &[u8]) -> u64 {
            let v = u64::from_le_bytes(b[..8].try_into().unwrap());
            *b = &b[8..];
            v
        }
        let mut sets: [BTreeSet<NodeId>; 3] = Default::default();
        for set in sets.iter_mut() {
            let n = u32_at(&mut b)?;
            ids(&mut b, n, 8)?;
            for _ in 0..n {
                set.insert(u64_at(&mut b));
            }
        }
        let [voters, voters_outgoing, learners] = sets;
        let mut conf = Configuration {
            voters,
            voters_outgoing,
            learners,
            ..Default::default()
        };
        if !b.is_empty() {
            let n = u32_at(&mut b)?;
            ids(&mut b, n, 16)?;
            for _ in 0..n {
                let id = u64_at(&mut b);
                let disk = u64_at(&mut b);
                if disk == 0 || !conf.contains(id) || conf.disks.insert(id, disk).is_some() {
                    return Err(ConfigDecodeError);
                }
            }
            let n = u32_at(&mut b)?;
            ids(&mut b, n, 8)?;
            for _ in 0..n {
                let id = u64_at(&mut b);
                if !conf.learners.contains(&id) {
                    return Err(ConfigDecodeError);
                }
                conf.rebuilding.insert(id);
            }
        }
        if !b.is_empty() {
            return Err(ConfigDecodeError);
        }
        Ok(conf)
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
