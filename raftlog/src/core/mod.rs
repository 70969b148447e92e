//! The raft consensus core: one pure state machine per group.
//!
//! Inputs: [`RaftNode::step`] (a message), [`RaftNode::tick`], proposals,
//! admin requests (membership, leader transfer, reset_peers, readonly,
//! vote), read requests, and storage completions
//! ([`RaftNode::on_write_durable`], [`RaftNode::on_snapshot_installed`],
//! [`RaftNode::on_snapshot_saved`]). Outputs: [`RaftNode::ready`] returns the
//! write to persist, messages to send, entries to apply, a snapshot to
//! install and events.
//!
//! We write our own core rather than use raft-rs or openraft because bd needs
//! braft's semantics (stickiness, readonly mode, catch-up before membership
//! changes, vote hints, reset_peers) and a core that a deterministic
//! simulator can drive through every fault with no hidden clock or thread.

mod log;
pub mod message;
pub mod node;
pub mod progress;
pub mod types;

pub use message::{ConfChangeError, Event, Message, MessageBody, ReadFailure, Ready, Write};
pub use node::{
    BrokenRule, ConfChangeStart, PeerStatus, RaftConfig, RaftNode, RandomSource, Restore, Role,
    SplitMix64, Status,
};
pub use progress::ProgressState;
pub use types::{
    Configuration, Entry, EntryKind, GroupId, HardState, Index, NodeId, SnapshotMeta, Term,
};
