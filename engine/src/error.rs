//! The one error type of the `engine` crate.
//!
//! Variants name the block group, peer, file or offset they are about, so a log line can be acted
//! on without a backtrace. [`Error::kind`] tells the NBD front end which errno a client sees.

use std::io;
use std::path::PathBuf;

use raftlog::core::{GroupId, NodeId};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of its allowed range.
    #[error("engine config: {what}")]
    Config { what: String },

    /// A file of a block group (data, meta, incoming snapshot) failed an I/O call.
    #[error("bg {bg}: file {path}: {op} at offset {offset}: {source}")]
    File {
        bg: GroupId,
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// A block group's meta file is unreadable (bad magic, version or checksum).
    #[error("bg {bg}: meta file {path} is corrupt: {reason}")]
    MetaCorrupt {
        bg: GroupId,
        path: PathBuf,
        reason: String,
    },

    /// The WAL or the raft core refused something.
    #[error("bg {bg}: raft: {source}")]
    Raft {
        bg: GroupId,
        #[source]
        source: raftlog::Error,
    },

    /// The core's WAL failed (fatal for the core: after a failed fsync nothing is trusted).
    #[error("core {core}: wal: {source}")]
    Wal {
        core: usize,
        #[source]
        source: raftlog::Error,
    },

    /// The core's data-file I/O ring failed (fatal for the core, as for the WAL).
    #[error("core {core}: data-file I/O: {source}")]
    DataIo {
        core: usize,
        #[source]
        source: io::Error,
    },

    /// The node-to-node transport could not start or refused a call.
    #[error("core {core}: transport: {source}")]
    Transport {
        core: usize,
        #[source]
        source: transport::Error,
    },

    /// The block group is not hosted on this node.
    #[error("bg {bg}: not hosted on this node")]
    UnknownBg { bg: GroupId },

    /// A replica outside the group's configuration (removed, or not added yet) cannot serve it.
    #[error(
        "bg {bg}: node {node} is not a member of the group (removed, or not added yet); use \
         the export on a member"
    )]
    NotAMember { bg: GroupId, node: NodeId },

    /// A membership change names a node this one has no address for.
    #[error(
        "bg {bg}: node {node} is not a peer of this node (no peer address), so it cannot hold \
         a replica; list it among the peers of every node first"
    )]
    NotAPeer { bg: GroupId, node: NodeId },

    /// A request is outside the volume (the front end checks first; this is the last guard).
    #[error(
        "bg {bg}: {op} of {len} bytes at offset {offset} is outside the volume of {size} bytes"
    )]
    OutOfRange {
        bg: GroupId,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },

    /// No leader could serve the request within the retry budget.
    #[error(
        "bg {bg}: {op} at offset {offset}: no leader answered within {waited_ms} ms (last: {last})"
    )]
    Unavailable {
        bg: GroupId,
        op: &'static str,
        offset: u64,
        waited_ms: u64,
        last: String,
    },

    /// The leader failed the operation (the message is the leader's).
    #[error("bg {bg}: {op} at offset {offset} failed on leader {leader}: {reason}")]
    Remote {
        bg: GroupId,
        op: &'static str,
        offset: u64,
        leader: NodeId,
        reason: String,
    },

    /// The core that owns the block group is shutting down or has stopped.
    #[error("bg {bg}: core {core} is shutting down")]
    ShuttingDown { bg: GroupId, core: usize },

    /// A core thread could not be started.
    #[error("core {core}: cannot start: {source}")]
    Thread {
        core: usize,
        #[source]
        source: io::Error,
    },
}

/// How a failed request should be reported to a block client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Invalid request (EINVAL).
    Invalid,
    /// No space / out of range write (ENOSPC).
    NoSpace,
    /// Node shutting down (ESHUTDOWN).
    Shutdown,
    /// Anything else (EIO).
    Io,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::OutOfRange { .. } | Error::Config { .. } | Error::NotAPeer { .. } => {
                ErrorKind::Invalid
            }
            Error::File { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ErrorKind::NoSpace
            }
            Error::ShuttingDown { .. } => ErrorKind::Shutdown,
            _ => ErrorKind::Io,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
