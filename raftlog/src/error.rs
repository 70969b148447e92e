//! The one error type of the raftlog crate.

use crate::core::types::{GroupId, Index, NodeId, Term};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- raft core: why a request was refused ----
    #[error("group {group}: not the leader (leader hint: {leader:?})")]
    NotLeader { group: GroupId, leader: Option<NodeId> },
    #[error("group {group}: term changed (expected {expected}, now {current})")]
    TermMismatch { group: GroupId, expected: Term, current: Term },
    #[error("group {group}: busy: {what}")]
    Busy { group: GroupId, what: &'static str },
    #[error("group {group}: leadership transfer in progress")]
    TransferInProgress { group: GroupId },
    #[error("group {group}: read-only mode")]
    ReadOnly { group: GroupId },
    #[error("group {group}: invalid request: {what}")]
    Invalid { group: GroupId, what: String },
    #[error("group {group}: peer {peer} is not a member")]
    UnknownPeer { group: GroupId, peer: NodeId },
    #[error("group {group}: too many pending proposals ({pending} >= {max})")]
    ProposalQueueFull { group: GroupId, pending: usize, max: usize },
    #[error("group {group}: entry {index} compacted")]
    Compacted { group: GroupId, index: Index },
    // ---- log store (wal) ----
}
