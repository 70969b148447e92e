//! On-the-wire formats. All integers are little-endian.
//!
//! Every stream starts with a one-byte stream kind. Layouts:
//! - hello (first bidirectional stream of a connection, dialer → acceptor and back):
//!   `magic u32 | version u16 | node u64 | incarnation u64` (22 bytes) each way. The incarnation is a
//!   random non-zero id drawn by each [`crate::Transport`] at bind: a peer answering with a new one has
//!   restarted, so its older connections are dead even if QUIC has not noticed yet.
//! - [`STREAM_FRAMES`] (unidirectional): a sequence of frames `len u32 | kind u8 | group u64 | payload`,
//!   where `len` counts the 9 header bytes plus the payload and is bounded by `frame_bytes_max`.
//! - [`STREAM_SNAPSHOT`] (bidirectional): sender writes an offer `group u64 | snapshot_id u64 | total_len u64`,
//!   the receiver answers `status u8 | offset u64`; then the sender writes chunks
//!   `offset u64 | len u32 | crc32 u32 | bytes` and finishes the stream; the receiver answers a final status.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{GroupId, NodeId};

/// ALPN token: a peer speaking another protocol (or another version) fails the TLS handshake.
pub const ALPN: &[u8] = b"bd-transport/1";
pub const HELLO_MAGIC: u32 = 0x4244_5431;
/// Version 2 added the incarnation to the hello; version 3 zero-run chunks in snapshot streams
/// ([`ChunkHeader::zeros`]); version 4 marks the raft frames whose messages carry the sender's
/// disk id and the one it binds the recipient to (engine::codec; the frames are opaque here, but
/// a version 3 node would misread them, so the hello refuses the mix).
pub const PROTOCOL_VERSION: u16 = 4;
/// magic u32 + version u16: read and checked first, so a peer of another version gets a precise error
/// rather than a short read.
pub const HELLO_HEAD_BYTES: usize = 6;
pub const HELLO_BYTES: usize = 22;

pub const STREAM_FRAMES: u8 = 1;
pub const STREAM_SNAPSHOT: u8 = 2;

pub const FRAME_LEN_BYTES: usize = 4;
/// kind u8 + group u64.
pub const FRAME_HEADER_BYTES: usize = 9;

pub const SNAPSHOT_OFFER_BYTES: usize = 24;
pub const SNAPSHOT_REPLY_BYTES: usize = 9;
pub const CHUNK_HEADER_BYTES: usize = 16;

/// Receiver → sender statuses on a snapshot stream.
pub const SNAPSHOT_RESUME_AT: u8 = 0;
pub const SNAPSHOT_REJECTED: u8 = 1;
pub const SNAPSHOT_DONE: u8 = 2;

/// Application close / reset codes, visible to the peer in its `ConnectionError::ApplicationClosed`.
pub mod code {
    pub const SHUTDOWN: u32 = 0;
    /// Both sides dialed; this connection lost the deterministic tie-break.
    pub const DUPLICATE: u32 = 1;
    pub const HELLO_REJECTED: u32 = 2;
    pub const PROTOCOL: u32 = 3;
    /// Closed on request of the local application (`Transport::disconnect`).
    pub const BY_REQUEST: u32 = 4;
    pub const SNAPSHOT_ABORTED: u32 = 5;
    /// The peer came back with a new incarnation: this older connection to its previous process is dead.
    pub const PEER_RESTARTED: u32 = 6;
}

/// A decoding failure with the reason, for the log line that accompanies closing the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One opaque message for a raft group. The transport never looks inside `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message kind, chosen by the engine (the transport only carries it).
    pub kind: u8,
    pub group: GroupId,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: u8, group: GroupId, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            group,
            payload: payload.into(),
        }
    }

    /// Bytes this frame occupies on the wire, length prefix included.
    pub fn wire_len(&self) -> usize {
        FRAME_LEN_BYTES + FRAME_HEADER_BYTES + self.payload.len()
    }

    /// The value of the length prefix (what `frame_bytes_max` bounds).
    pub fn body_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }

    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.wire_len());
        buf.put_slice(&self.header());
        buf.put_slice(&self.payload);
    }

    /// The bytes that precede the payload on the wire (length prefix, kind, group), so that a
    /// sender can hand the payload to the stream as it is instead of copying it behind them.
    pub fn header(&self) -> [u8; FRAME_LEN_BYTES + FRAME_HEADER_BYTES] {
        let mut h = [0u8; FRAME_LEN_BYTES + FRAME_HEADER_BYTES];
        h[..4].copy_from_slice(&(self.body_len() as u32).to_le_bytes());
        h[4] = self.kind;
        h[5..].copy_from_slice(&self.group.to_le_bytes());
        h
    }
}

/// Takes one complete frame off the front of `buf`, or returns `Ok(None)` if more bytes are needed.
/// The length prefix is checked before any payload is buffered, so an oversized claim is refused
/// without allocating for it.
pub fn decode_frame(
    buf: &mut BytesMut,
    frame_bytes_max: usize,
) -> Result<Option<Frame>, Malformed> {
    if buf.len() < FRAME_LEN_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len < FRAME_HEADER_BYTES {
        return Err(Malformed(format!(
            "frame length {len} is shorter than the {FRAME_HEADER_BYTES}-byte header"
        )));
    }
    if len > frame_bytes_max {
        return Err(Malformed(format!(
            "frame length {len} exceeds frame_bytes_max {frame_bytes_max}"
        )));
    }
    if buf.len() < FRAME_LEN_BYTES + len {
        return Ok(None);
    }
    buf.advance(FRAME_LEN_BYTES);
    let mut body = buf.split_to(len);
    let kind = body.get_u8();
    let group = body.get_u64_le();
    Ok(Some(Frame {
        kind,
        group,
        payload: body.freeze(),
    }))
}

/// The hello each side sends first: who it is and which process (incarnation) of that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub node: NodeId,
    /// Random, non-zero, drawn once per [`crate::Transport`] (see [`fresh_incarnation`]).
    pub incarnation: u64,
}

/// A random non-zero incarnation id.
pub fn fresh_incarnation() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6..14].copy_from_slice(&self.node.to_le_bytes());
        out[14..].copy_from_slice(&self.incarnation.to_le_bytes());
        out
    }

    /// Decodes exactly [`HELLO_BYTES`] bytes; anything else (another length, magic or version, or
    /// incarnation 0) is malformed.
    pub fn decode(raw: &[u8]) -> Result<Hello, Malformed> {
        if raw.len() != HELLO_BYTES {
            return Err(Malformed(format!(
                "hello of {} bytes (expected {HELLO_BYTES})",
                raw.len()
            )));
        }
        check_hello_head(&raw[..HELLO_HEAD_BYTES])?;
        let node = u64::from_le_bytes(raw[6..14].try_into().expect("8 bytes"));
        let incarnation = u64::from_le_bytes(raw[14..].try_into().expect("8 bytes"));
        if incarnation == 0 {
            return Err(Malformed("hello with incarnation 0".into()));
        }
        Ok(Hello { node, incarnation })
    }
}

/// Checks the magic and version at the start of a hello (the first [`HELLO_HEAD_BYTES`] bytes).
pub fn check_hello_head(head: &[u8]) -> Result<(), Malformed> {
    if head.len() != HELLO_HEAD_BYTES {
        return Err(Malformed(format!(
            "hello head of {} bytes (expected {HELLO_HEAD_BYTES})",
            head.len()
        )));
    }
    let magic = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if magic != HELLO_MAGIC {
        return Err(Malformed(format!("bad hello magic {magic:#010x}")));
    }
    let version = u16::from_le_bytes(head[4..6].try_into().expect("2 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(Malformed(format!(
            "unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})"
        )));
    }
    Ok(())
}

/// A hello for `node` from a fresh incarnation, for tools and tests that speak the protocol by hand (each
/// call looks like a newly started process).
pub fn encode_hello(node: NodeId) -> [u8; HELLO_BYTES] {
    Hello {
        node,
        incarnation: fresh_incarnation(),
    }
    .encode()
}

/// The node id of a hello (see [`Hello::decode`] for the checks).
pub fn decode_hello(raw: &[u8; HELLO_BYTES]) -> Result<NodeId, Malformed> {
    Hello::decode(raw).map(|h| h.node)
}

/// A snapshot offer as sent at the start of a snapshot stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOfferWire {
    pub group: GroupId,
    pub snapshot_id: u64,
    pub total_len: u64,
}

impl SnapshotOfferWire {
    pub fn encode(&self) -> [u8; SNAPSHOT_OFFER_BYTES] {
        let mut out = [0u8; SNAPSHOT_OFFER_BYTES];
        out[..8].copy_from_slice(&self.group.to_le_bytes());
        out[8..16].copy_from_slice(&self.snapshot_id.to_le_bytes());
        out[16..].copy_from_slice(&self.total_len.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8; SNAPSHOT_OFFER_BYTES]) -> SnapshotOfferWire {
        SnapshotOfferWire {
            group: u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")),
            snapshot_id: u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes")),
            total_len: u64::from_le_bytes(raw[16..].try_into().expect("8 bytes")),
        }
    }
}

pub fn encode_snapshot_reply(status: u8, offset: u64) -> [u8; SNAPSHOT_REPLY_BYTES] {
    let mut out = [0u8; SNAPSHOT_REPLY_BYTES];
    out[0] = status;
    out[1..].copy_from_slice(&offset.to_le_bytes());
    out
}

pub fn decode_snapshot_reply(raw: &[u8; SNAPSHOT_REPLY_BYTES]) -> Result<(u8, u64), Malformed> {
    let status = raw[0];
    if !matches!(
        status,
        SNAPSHOT_RESUME_AT | SNAPSHOT_REJECTED | SNAPSHOT_DONE
    ) {
        return Err(Malformed(format!("unknown snapshot reply status {status}")));
    }
    Ok((
        status,
        u64::from_le_bytes(raw[1..].try_into().expect("8 bytes")),
    ))
}

/// The high bit of a chunk header's length field: a zero run (see [`ChunkHeader::zeros`]).
const ZERO_RUN_FLAG: u32 = 1 << 31;
/// Longest zero run one chunk header stands for.
pub const ZERO_RUN_BYTES_MAX: u32 = ZERO_RUN_FLAG - 1;

/// Header of one snapshot chunk: `offset u64 | len u32 | crc u32`. A data chunk's `len` bytes
/// follow it and `crc` is their crc32 (IEEE, as crc32fast computes it). A zero run (the high bit
/// of the length field set) stands for `len` zero bytes and carries none: a hole of the source
/// costs a header instead of its size in crc work, network bytes and throttle budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub zeros: bool,
}

impl ChunkHeader {
    pub fn for_bytes(offset: u64, bytes: &[u8]) -> ChunkHeader {
        ChunkHeader {
            offset,
            len: bytes.len() as u32,
            crc: crc32fast::hash(bytes),
            zeros: false,
        }
    }

    /// `len` zero bytes at `offset` (at most [`ZERO_RUN_BYTES_MAX`]).
    pub fn zero_run(offset: u64, len: u32) -> ChunkHeader {
        assert!(len <= ZERO_RUN_BYTES_MAX, "zero run of {len} bytes");
        ChunkHeader {
            offset,
            len,
            crc: 0,
            zeros: true,
        }
    }

    pub fn encode(&self) -> [u8; CHUNK_HEADER_BYTES] {
        let mut out = [0u8; CHUNK_HEADER_BYTES];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        let len = if self.zeros {
            self.len | ZERO_RUN_FLAG
        } else {
            self.len
        };
        out[8..12].copy_from_slice(&len.to_le_bytes());
        out[12..].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8; CHUNK_HEADER_BYTES]) -> ChunkHeader {
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        ChunkHeader {
            offset: u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")),
            len: len & !ZERO_RUN_FLAG,
            crc: u32::from_le_bytes(raw[12..].try_into().expect("4 bytes")),
            zeros: len & ZERO_RUN_FLAG != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let frames: Vec<Frame> = (0..20u8)
            .map(|i| Frame::new(i, 1000 + i as u64, vec![i; i as usize * 7]))
            .collect();
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        let wire = wire.freeze();
        for step in [1usize, 3, 13, 64, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                buf.extend_from_slice(piece);
                while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split step {step}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_and_short_lengths_are_malformed_before_buffering() {
        let mut buf = BytesMut::from(&(1u32 << 30).to_le_bytes()[..]);
        assert!(decode_frame(&mut buf, 1 << 20).is_err());
        let mut buf = BytesMut::from(&3u32.to_le_bytes()[..]);
        assert!(decode_frame(&mut buf, 1 << 20).is_err());
        let mut buf = BytesMut::from(&100u32.to_le_bytes()[..]);
        assert_eq!(decode_frame(&mut buf, 1 << 20), Ok(None));
    }

    #[test]
    fn hello_checks_length_magic_version_and_incarnation() {
        let h = Hello {
            node: 42,
            incarnation: 0x0123_4567_89ab_cdef,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert_eq!(decode_hello(&encode_hello(42)), Ok(42));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(Hello::decode(&bad).is_err());
        let mut bad = h.encode();
        bad[4] = 9;
        let err = Hello::decode(&bad).unwrap_err();
        assert!(err.0.contains("unsupported protocol version 9"), "{err}");
        // Version 2 (no zero runs in snapshot streams) is refused too.
        bad[4] = 2;
        let err = Hello::decode(&bad).unwrap_err();
        assert!(err.0.contains("unsupported protocol version 2"), "{err}");
        assert!(check_hello_head(&bad[..HELLO_HEAD_BYTES]).is_err());
        assert_eq!(check_hello_head(&h.encode()[..HELLO_HEAD_BYTES]), Ok(()));
        // A version-1 hello (14 bytes) is refused by its version, and by its length.
        let mut v1 = [0u8; 14];
        v1[..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert!(check_hello_head(&v1[..HELLO_HEAD_BYTES]).is_err());
        assert!(Hello::decode(&v1).is_err());
        assert!(Hello::decode(&[h.encode().as_slice(), &[0]].concat()).is_err());
        let zero = Hello {
            node: 42,
            incarnation: 0,
        };
        assert!(Hello::decode(&zero.encode()).is_err());
        assert_ne!(fresh_incarnation(), 0);
    }

    #[test]
    fn chunk_header_and_offer_round_trip() {
        let h = ChunkHeader::for_bytes(1 << 40, b"abc");
        assert_eq!(ChunkHeader::decode(&h.encode()), h);
        let z = ChunkHeader::zero_run(7, ZERO_RUN_BYTES_MAX);
        assert_eq!(ChunkHeader::decode(&z.encode()), z);
        assert!(!ChunkHeader::decode(&h.encode()).zeros);
        assert_eq!(h.crc, crc32fast::hash(b"abc"));
        let o = SnapshotOfferWire {
            group: 7,
            snapshot_id: 9,
            total_len: 1 << 33,
        };
        assert_eq!(SnapshotOfferWire::decode(&o.encode()), o);
        assert_eq!(
            decode_snapshot_reply(&encode_snapshot_reply(SNAPSHOT_DONE, 5)),
            Ok((SNAPSHOT_DONE, 5))
        );
        assert!(decode_snapshot_reply(&encode_snapshot_reply(77, 5)).is_err());
    }
}
