//! bd's NBD server: how stock Linux tools (the kernel's nbd client, qemu, libnbd, fio) reach a
//! block group.
//!
//! This module owns the NBD protocol end to end: the fixed newstyle handshake
//! ([`handshake`](self)), the transmission phase with pipelined, concurrently served requests
//! ([`transmission`](self)), limits on everything a client can make us hold, graceful shutdown,
//! and the storage-facing contract ([`BlockBackend`], [`ExportRegistry`]). It knows nothing of
//! raft: a block group plugs in as a backend.
//!
//! We write the server ourselves because no Rust NBD server crate fits: the ones that exist are
//! synchronous (a thread per connection, no pipelining), GPL-licensed, or stop at the basic
//! commands without FUA/flush semantics, write-zeroes or `NBD_OPT_GO`.
//!
//! What is supported, the limits and how to try it are in `docs/nbd.md`.

mod backend;
mod connection;
mod file;
mod handshake;
mod mem;
pub mod proto;
mod server;
mod transmission;

pub use backend::{BackendResult, BlockBackend, Errno, ExportRegistry, Exports};
pub use file::FileBackend;
pub use mem::MemBackend;
pub use server::{
    shutdown_channel, NbdConfig, NbdServer, NbdServerHandle, ShutdownSignal, ShutdownTrigger,
    WRITE_DRAIN_BYTES_MAX,
};
