//! bd's node-to-node transport: QUIC (quinn) with mutual TLS, carrying opaque raft frames and snapshot
//! chunks between bd-servers.
//!
//! # What it owns
//! - One [`Transport`] = one QUIC endpoint on one UDP socket. The engine creates one per core (each with its
//!   own bind address); the crate does not know about cores.
//! - Peers ([`Transport::add_peer`]) and one connection per peer pair. Both ends may dial; when both
//!   connections come up, both ends keep the one dialed by the lower node id and close the other (the higher
//!   id also waits `dial_defer` before dialing, so usually only one is made). A node with a peer address
//!   keeps dialing with exponential backoff and jitter whenever it has no live connection; keep-alives and
//!   the idle timeout detect dead connections.
//! - Restarts: each [`Transport`] draws a random non-zero incarnation at bind and sends it in its hello. A
//!   connection from a peer whose incarnation differs from the live connection's means the peer restarted
//!   (say after SIGKILL, so the old connection only dies at the idle timeout): the new connection wins over
//!   the tie-break above and the old one is closed ([`wire::code::PEER_RESTARTED`]).
//! - Framing and validation ([`wire`]), the cluster CA and node certificates ([`tls`]), the snapshot
//!   throttle ([`throttle`]). Encoding raft messages (rkyv) is the engine's job: a [`Frame`] payload is opaque.
//!
//! # Send path
//! [`Transport::send`] puts a frame into the peer's queue without waiting: a control lane (heartbeats, votes)
//! and a data lane, each bounded in bytes (`control_queue_bytes_max`, `peer_queue_bytes_max`). A full lane
//! **drops the frame** and counts it in [`PeerStats::frames_dropped`] (raft tolerates loss; blocking would stall
//! every group of the core behind one slow peer). One writer task per peer drains the queue — control lane
//! first, up to `flush_bytes_max` — into a single write on the connection's unidirectional frame stream, so
//! frames queued together cost one write. Frames of one lane arrive in queue order. Frames queued while
//! there is no connection wait (within the bounds) and go out once connected; a batch whose write fails is
//! dropped and counted, not resent.
//!
//! # Receive path
//! Each connection's frame stream is read into a buffer and cut into frames; each becomes a
//! [`Received`] `{ from, frame }` on the channel returned by [`Transport::bind`]. When the channel is full the
//! reader waits, and QUIC flow control pushes back on the sender. A malformed frame (length shorter than
//! the header or above `frame_bytes_max`, a stream ending mid-frame, an unknown stream kind) closes that
//! peer's connection with code [`wire::code::PROTOCOL`] and a `warn` log line; other peers are unaffected.
//! Nothing on this path panics on peer input.
//!
//! # Snapshot path
//! [`Transport::send_snapshot`] opens a bidirectional stream per attempt (lower priority than the frame
//! stream, so heartbeats and appends keep flowing): it offers `(group, snapshot_id, total_len)`, the
//! receiver's [`SnapshotReceiver`] opens a [`SnapshotSink`] and answers with the sink's durable offset, and
//! the sender streams chunks `offset | len | crc32 | bytes` of `snapshot_chunk_bytes` from its
//! [`SnapshotSource`], paced by a token bucket (`snapshot_bytes_per_sec_max`, shared by all transfers of
//! the endpoint). Where the source reports a run of zeros (a hole of a sparse data file,
//! [`SnapshotSource::run_at`]) a header `offset | len with the high bit set | 0` stands for the whole run,
//! with no payload and no throttle cost. The receiver checks each chunk (contiguous offset, size, crc) before writing it to the sink;
//! a bad chunk resets the stream (not the connection). If the stream or connection breaks, the sender
//! waits for the connection to return and re-offers; the receiver answers with its new durable offset and
//! the transfer continues from there. The send completes when the sink's `finish` succeeded.
//!
//! # Authentication
//! Every node holds a certificate signed by the cluster CA ([`init_ca`], [`issue_cert`]) naming it as
//! `node-<id>.bd.local`, with ServerAuth and ClientAuth usages. The acceptor requires and chain-verifies the
//! client certificate (`WebPkiClientVerifier`); a client without one, or with one from another CA, fails the
//! handshake and is logged (`warn`, with the remote address). The dialer verifies the server certificate
//! against the CA *and* the name of the node it meant to dial. Because with TLS 1.3 the client believes it
//! is connected before the server has checked its certificate, the first application message is a hello
//! carrying the claimed node id (and the sender's incarnation): the acceptor checks it against the
//! certificate, then answers with its own id and incarnation; a mismatch closes the connection ([`wire::code::HELLO_REJECTED`]) with a log line, and the dialer sends
//! no frame before the answer. [`Security::InsecureLoopback`] (self-signed, no verification, node id taken
//! on trust) exists for the local dev cluster only: [`Transport::bind`] refuses it on a non-loopback address
//! and logs a warning saying it is insecure.
pub mod endpoint;
pub mod error;
pub mod snapshot;
pub mod throttle;
pub mod tls;
pub mod wire;

pub use endpoint::{
    Config, Lane, PeerStats, Received, Transport, UDP_PAYLOAD_BYTES_ETHERNET,
    UDP_PAYLOAD_BYTES_LIMIT, UDP_PAYLOAD_BYTES_MIN,
};
pub use error::{Error, PeerName, Result};
pub use snapshot::{
    Run, SnapshotOffer, SnapshotReceiver, SnapshotSent, SnapshotSink, SnapshotSource,
};
pub use tls::{init_ca, issue_cert, NodeIdentity, Security};
pub use wire::Frame;

pub type NodeId = u64;
pub type GroupId = u64;
