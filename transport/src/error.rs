//! The crate's single error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::NodeId;

/// A peer as named in error messages: its node id and, when known, its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerName {
    pub node: NodeId,
    pub addr: Option<SocketAddr>,
}

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "node {} at {}", self.node, addr),
            None => write!(f, "node {} (address unknown)", self.node),
        }
    }
}

/// Everything that can go wrong in the transport. Variants that involve a peer name it (node id and address).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("no {what} found in {path}")]
    MissingPem { what: &'static str, path: PathBuf },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "insecure mode refused on non-loopback address {addr}: it is only for a local dev cluster"
    )]
    InsecureNotLoopback { addr: SocketAddr },
    #[error("unknown peer node {node}")]
    UnknownPeer { node: NodeId },
    #[error("send queue to {peer} is full ({queued_bytes} bytes queued, limit {limit_bytes}); frame dropped")]
    QueueFull {
        peer: PeerName,
        queued_bytes: usize,
        limit_bytes: usize,
    },
    #[error("frame of {len} bytes to {peer} exceeds frame_bytes_max {max}")]
    FrameTooLarge {
        peer: PeerName,
        len: usize,
        max: usize,
    },
    #[error("incoming connection from {addr} rejected: {reason}")]
    Rejected { addr: SocketAddr, reason: String },
    #[error("connecting to {peer}: {reason}")]
    Connect { peer: PeerName, reason: String },
    #[error("connection to {peer}: {source}")]
    Connection {
        peer: PeerName,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("stream with {peer}: {reason}")]
    Stream { peer: PeerName, reason: String },
    #[error("protocol violation by {peer}: {reason}")]
    Protocol { peer: PeerName, reason: String },
    #[error("snapshot {snapshot_id} of group {group} to {peer}: {reason}")]
    Snapshot {
        peer: PeerName,
        group: u64,
        snapshot_id: u64,
        reason: String,
    },
    #[error("snapshot source for group {group} at offset {offset}: {source}")]
    SnapshotSource {
        group: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("transport is shut down")]
    Shutdown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
