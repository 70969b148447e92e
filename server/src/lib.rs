//! bd-server: the process that serves block groups to NBD clients.
//!
//! # What it owns
//! - [`nbd`]: the NBD protocol server (handshake, transmission, limits), generic over a backend.
//! - [`backend`]: the backend of a replicated block group, a thin adapter over
//!   [`engine::BgHandle`].
//! - [`http`]: `/raft_stat`, `/status.json` and the admin actions (`POST /bgs/<id>/snapshot`,
//!   `transfer_leader`, `add_peer`, `remove_peer`); [`metrics`]: `/metrics` for Prometheus;
//!   [`dashboard`]: `/dashboard`, an HTML page of the same; [`ctl`]: `bdctl`, the admin
//!   actions' command-line client (with `move-replica`, the move-BG job).
//! - [`config`] and [`cli`]: the TOML config, flags, `run`, `init-ca`, `issue-cert`; [`dev`]: the
//!   local 3-process cluster; [`units`]: sizes with units (`64MiB`) for flags and config keys.
//!
//! # Data flow
//! Write: NBD connection task → `BgBackend::write` ([`backend::BgBackend`], a
//! [`nbd::BlockBackend`]) → engine core queue → raft (leader;
//! a follower's core forwards to the leader over QUIC) → WAL fsync on a majority → apply to the
//! data file on the leader → NBD reply. Read: the same path to the leader, which answers after a
//! lease/ReadIndex check once its state machine applied the read index. The engine's crate docs
//! describe the core side.
pub mod backend;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod dashboard;
pub mod dev;
pub mod error;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod units;

pub use error::Error;
