//! The one error type of the raftlog crate.

use crate::core::types::{GroupId, Index, NodeId, Term};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- raft core: why a request was refused ----
    #[error("group {group}: not the leader (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    #[error("group {group}: term changed (expected {expected}, now {current})")]
    TermMismatch {
        group: GroupId,
        expected: Term,
        current: Term,
    },
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
    ProposalQueueFull {
        group: GroupId,
        pending: usize,
        max: usize,
    },
    #[error("group {group}: entry {index} compacted")]
    Compacted { group: GroupId, index: Index },
    // ---- log store (wal) ----
    // Variants below are shared by every `LogStore` backend (`Log*`) or
    // specific to the on-disk WAL (`Wal*`). Messages name the group, file and
    // offset involved so an operator can find the bad bytes.
    #[error(
        "log store: group {group}: append of index {first} outside the allowed range {min}..={max}"
    )]
    LogAppendOutOfRange {
        group: GroupId,
        first: Index,
        min: Index,
        max: Index,
    },
    #[error("log store: group {group}: entries not consecutive: index {index} follows {prev}")]
    LogNotContiguous {
        group: GroupId,
        prev: Index,
        index: Index,
    },
    #[error("log store: group {group}: entries {lo}..{hi} outside the log {first}..={last}")]
    LogRange {
        group: GroupId,
        lo: Index,
        hi: Index,
        first: Index,
        last: Index,
    },
    #[error("log store: group {group}: unknown group")]
    LogUnknownGroup { group: GroupId },
    #[error("log store: group {group}: entry {index} is {bytes} bytes, over the record limit of {max} bytes")]
    LogEntryTooLarge {
        group: GroupId,
        index: Index,
        bytes: usize,
        max: usize,
    },
    #[error("log store: failed earlier and refuses every call: {reason}")]
    LogFailed { reason: String },
    #[error("wal: {op} {path} at offset {offset}: {source}")]
    WalIo {
        op: &'static str,
        path: std::path::PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("wal: no space left on device: {op} {path} ({bytes} bytes); nothing was written, free space and reopen")]
    WalNoSpace {
        op: &'static str,
        path: std::path::PathBuf,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("wal: corrupt log: {path} at offset {offset}: {reason}")]
    WalCorrupt {
        path: std::path::PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal: invalid configuration: {what}")]
    WalConfig { what: String },
    #[error("wal: the writer stopped before the operation on group {group} became durable")]
    WalClosed { group: GroupId },
}
