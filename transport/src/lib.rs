//! placeholder docs (rewritten below)
pub mod error;
pub mod tls;
pub mod wire;

pub use error::{Error, PeerName, Result};
pub type NodeId = u64;
pub type GroupId = u64;
