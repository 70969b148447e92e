//! raftlog: the Raft consensus core and the durable log of bd.
//!
//! - [`core`]: one pure, deterministic state machine per raft group. It owns
//!   no clock, RNG, thread or I/O: hosts feed it messages, ticks, proposals and
//!   storage completions, and drain its outputs (messages, writes, entries to
//!   apply, snapshots, events). This is what the simulator in `tests/` drives.
//! - [`storage`]: the contract a log store meets and a simulated in-memory
//!   store; [`wal`]: the real per-core segmented write-ahead log on io_uring.

pub mod core;
pub mod error;
pub mod storage;
pub mod wal;

pub use error::Error;
