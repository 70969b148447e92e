//! What the application plugs into the snapshot path: a source on the sending node, a receiver (and the
//! sinks it opens) on the receiving node.

use std::io;

use bytes::Bytes;

use crate::{GroupId, NodeId};

/// Produces a snapshot's bytes at any offset, so a transfer can resume wherever the receiver left off.
///
/// Called from the task that awaits [`crate::Transport::send_snapshot`], one chunk
/// (`snapshot_chunk_bytes`) at a time; a slow read only slows that transfer.
pub trait SnapshotSource: Send {
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`; the range is always within `total_len`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// What starts at `offset`: data, or a run of bytes known to be zero (a hole of a sparse file),
    /// each with its length (it may run past `total_len`; the sender stops there). Zero runs travel
    /// as a header without payload. The default knows of no holes.
    fn run_at(&mut self, offset: u64) -> io::Result<Run> {
        let _ = offset;
        Ok(Run::Data(u64::MAX))
    }
}

/// A stretch of a snapshot source (see [`SnapshotSource::run_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// This many bytes (or more) that may hold anything.
    Data(u64),
    /// This many bytes that are all zero.
    Zeros(u64),
}

impl SnapshotSource for Bytes {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl SnapshotSource for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

fn read_slice(data: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let src = start
        .checked_add(buf.len())
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of snapshot"))?;
    buf.copy_from_slice(src);
    Ok(())
}

/// A snapshot offered by a peer (sent again on every resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOffer {
    pub from: NodeId,
    pub group: GroupId,
    pub snapshot_id: u64,
    pub total_len: u64,
}

/// The receiving application: decides whether to take a snapshot and where its bytes go.
pub trait SnapshotReceiver: Send + Sync + 'static {
    /// Called for every offer, including the re-offer after a reconnect. To make a transfer resumable, return
    /// a sink over the partial data kept from the earlier attempt of the same `(from, group, snapshot_id)`;
    /// its [`SnapshotSink::durable_offset`] tells the sender where to continue. An error rejects the offer
    /// (the sender's `send_snapshot` fails without retrying).
    fn open(&self, offer: &SnapshotOffer) -> io::Result<Box<dyn SnapshotSink>>;
}

/// Where one transfer's verified chunks go. Called from the transport's connection task, one chunk at a
/// time, in offset order; keep each call short (a write of one chunk).
pub trait SnapshotSink: Send {
    /// Bytes `0..durable_offset` are stored durably already; the sender resumes from here. Called once,
    /// right after `open`. Must not exceed the offer's `total_len`.
    fn durable_offset(&self) -> u64;
    /// Stores `data` at `offset`. Offsets arrive contiguously from `durable_offset`, each chunk crc-checked.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Stores `len` zero bytes at `offset` (a zero run of the source), in the same contiguous order
    /// as [`SnapshotSink::write_at`]. The default writes them through `write_at` in pieces of at
    /// most 1 MiB; a sink over a sparse file can do less.
    fn write_zeros(&mut self, offset: u64, len: u64) -> io::Result<()> {
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(PIECE) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(PIECE);
            self.write_at(at, &zeros[..n as usize])?;
            at += n;
        }
        Ok(())
    }
    /// All `total_len` bytes have arrived: make them durable and hand the snapshot to the application.
    /// The sender's `send_snapshot` succeeds only after this returned `Ok`.
    fn finish(&mut self) -> io::Result<()>;
}

/// What a completed `send_snapshot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSent {
    /// Streams opened (1 when nothing was interrupted).
    pub attempts: u32,
    /// The offset the receiver asked to start from, per attempt.
    pub start_offsets: Vec<u64>,
    /// Payload bytes written to the network over all attempts.
    pub bytes_sent: u64,
    /// Bytes sent as zero runs (a header each, no payload) over all attempts.
    pub zero_bytes: u64,
}
