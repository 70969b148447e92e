//! placeholder docs
pub mod endpoint;
pub mod error;
pub mod snapshot;
pub mod throttle;
pub mod tls;
pub mod wire;

pub use endpoint::{Config, Lane, PeerStats, Received, Transport};
pub use error::{Error, PeerName, Result};
pub use snapshot::{SnapshotOffer, SnapshotReceiver, SnapshotSent, SnapshotSink, SnapshotSource};
pub use tls::{init_ca, issue_cert, NodeIdentity, Security};
pub use wire::Frame;

pub type NodeId = u64;
pub type GroupId = u64;
