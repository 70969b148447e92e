//! The one error type of the `server` crate.
//!
//! Every variant names what it is about (export, peer, address, offset) so that a log line or an
//! operator message can be acted on without a backtrace. Variants that a block backend returns
//! also carry the NBD errno the client sees, via [`Error::errno`].

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::nbd::Errno;

/// Errors of bd-server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NBD listener could not be bound.
    #[error("NBD: cannot listen on {addr}: {source}")]
    NbdBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// An NBD server limit or setting is out of its allowed range.
    #[error("NBD config: {field} {reason}")]
    NbdConfig { field: &'static str, reason: String },

    /// An NBD client broke the protocol; its connection is closed (only that one).
    #[error("NBD peer {peer} (export {export:?}): {reason}")]
    NbdProtocol {
        peer: SocketAddr,
        export: Option<String>,
        reason: String,
    },

    /// Socket I/O with an NBD client failed; its connection is closed.
    #[error("NBD peer {peer} (export {export:?}): {op}: {source}")]
    NbdIo {
        peer: SocketAddr,
        export: Option<String>,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A block operation failed inside a backend; `errno` is what the NBD client is told.
    #[error("export {export}: {op} at offset {offset} failed ({errno:?}): {detail}")]
    Backend {
        export: String,
        op: &'static str,
        offset: u64,
        errno: Errno,
        detail: String,
    },

    /// A file used as block storage failed an I/O call.
    #[error("file {path}: {op} at offset {offset}: {source}")]
    File {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The NBD error code a client should see when this error ends one of its requests.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Backend { errno, .. } => *errno,
            Error::File { source, .. } => Errno::from_io(source),
            Error::NbdConfig { .. } => Errno::Inval,
            Error::NbdBind { .. } | Error::NbdProtocol { .. } | Error::NbdIo { .. } => Errno::Io,
        }
    }
}
