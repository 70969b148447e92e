//! The one error type of the `server` crate.
//!
//! Every variant names what it is about (export, peer, address, offset, node) so that a log line or an
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
    #[error("NBD peer {peer} ({}): {reason}", export_text(export))]
    NbdProtocol {
        peer: SocketAddr,
        export: Option<String>,
        reason: String,
    },

    /// Socket I/O with an NBD client failed; its connection is closed.
    #[error("NBD peer {peer} ({}): {op}: {source}", export_text(export))]
    NbdIo {
        peer: SocketAddr,
        export: Option<String>,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A block operation failed inside a backend; `errno` is what the NBD client is told.
    #[error("export {export}: {op} at offset {offset} failed ({}): {detail}", errno_name(*errno))]
    Backend {
        export: String,
        op: &'static str,
        offset: u64,
        errno: Errno,
        detail: String,
    },

    /// The configuration file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },

    /// The configuration (file and flags together) is invalid.
    #[error("config: {what}")]
    Config { what: String },

    /// The engine (raft groups, WAL, transport) failed.
    #[error("engine: {0}")]
    Engine(#[from] engine::Error),

    /// Certificate management failed.
    #[error("certificates: {0}")]
    Certs(#[from] transport::Error),

    /// The HTTP status listener could not be bound.
    #[error("HTTP: cannot listen on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// The local dev cluster could not be started or supervised.
    #[error("dev cluster: node {node}: {reason}")]
    Dev { node: u64, reason: String },

    /// A file used as block storage failed an I/O call.
    #[error("file {path}: {op} at offset {offset}: {source}")]
    File {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// `bdctl`: a node's HTTP endpoint could not be reached or refused the action.
    #[error("node {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },

    /// `bdctl`: the cluster as a whole did not do what was asked (no leader found, a
    /// leadership transfer that did not complete in time).
    #[error("{0}")]
    AdminOutcome(String),
}

/// `export "bg0"`, or `no export yet` for a connection still in its handshake.
fn export_text(export: &Option<String>) -> String {
    match export {
        Some(name) => format!("export \"{name}\""),
        None => "no export yet".to_string(),
    }
}

/// The errno's C name, as in `errno(3)`.
fn errno_name(e: Errno) -> &'static str {
    match e {
        Errno::Perm => "EPERM",
        Errno::Io => "EIO",
        Errno::NoMem => "ENOMEM",
        Errno::Inval => "EINVAL",
        Errno::NoSpc => "ENOSPC",
        Errno::Overflow => "EOVERFLOW",
        Errno::NotSup => "ENOTSUP",
        Errno::Shutdown => "ESHUTDOWN",
    }
}

impl Error {
    /// The NBD error code a client should see when this error ends one of its requests.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Backend { errno, .. } => *errno,
            Error::File { source, .. } => Errno::from_io(source),
            Error::NbdConfig { .. } => Errno::Inval,
            Error::Config { .. } => Errno::Inval,
            Error::Engine(_)
            | Error::NbdBind { .. }
            | Error::NbdProtocol { .. }
            | Error::NbdIo { .. }
            | Error::ConfigFile { .. }
            | Error::Certs(_)
            | Error::HttpBind { .. }
            | Error::Dev { .. }
            | Error::Admin { .. }
            | Error::AdminOutcome(_) => Errno::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_errors_show_the_export_and_errno_by_name() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let e = Error::NbdProtocol {
            peer,
            export: Some("bg0".into()),
            reason: "bad magic".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD peer 127.0.0.1:5000 (export \"bg0\"): bad magic"
        );
        let e = Error::NbdProtocol {
            peer,
            export: None,
            reason: "bad magic".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD peer 127.0.0.1:5000 (no export yet): bad magic"
        );
        let e = Error::Backend {
            export: "bg0".into(),
            op: "write",
            offset: 4096,
            errno: Errno::NoSpc,
            detail: "disk full".into(),
        };
        assert_eq!(
            e.to_string(),
            "export bg0: write at offset 4096 failed (ENOSPC): disk full"
        );
    }
}
