//! Snapshot streams: integrity, resume after interruption, rejection, corrupt chunks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use transport::wire::{self, code};
use transport::{Error, Frame, Lane, Security, SnapshotReceiver, Transport};

fn random_bytes(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        let r = rand::random::<u64>().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    Bytes::from(v)
}

#[tokio::test]
async fn transfer_of_a_few_mib_arrives_byte_identical() {
    let pki = Pki::new();
    let nodes = mesh(&pki, &[1, 2]);
    // Not a multiple of the chunk size, so the short last chunk is exercised.
    let data = random_bytes(4 * 1024 * 1024 + 12_345);
    let mut source = data.clone();
    let sent = nodes[0]
        .t
        .send_snapshot(2, 77, 5, data.len() as u64, &mut source)
        .await
        .unwrap();
    assert_eq!(sent.attempts, 1);
    assert_eq!(sent.start_offsets, vec![0]);
    assert_eq!(sent.bytes_sent, data.len() as u64);
    let part = nodes[1]
        .snaps
        .get(1, 77, 5)
        .expect("receiver saw the offer");
    let part = part.lock().unwrap();
    assert!(part.finished);
    assert!(part.data == data, "snapshot bytes differ");
}

/// A source with holes: data islands between runs of zeros it reports through `run_at`.
struct Sparse {
    data: Bytes,
    holes: Vec<std::ops::Range<u64>>,
}

impl transport::SnapshotSource for Sparse {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }

    fn run_at(&mut self, offset: u64) -> std::io::Result<transport::Run> {
        for h in &self.holes {
            if h.contains(&offset) {
                return Ok(transport::Run::Zeros(h.end - offset));
            }
            if h.start > offset {
                return Ok(transport::Run::Data(h.start - offset));
            }
        }
        Ok(transport::Run::Data(u64::MAX))
    }
}

#[tokio::test]
async fn holes_of_a_sparse_source_travel_as_zero_runs() {
    let pki = Pki::new();
    let nodes = mesh(&pki, &[1, 2]);
    let total = 16u64 << 20;
    // Holes at the start, in the middle (one not chunk-aligned, one longer than a chunk) and at
    // the end; data islands between them.
    let holes = vec![
        0..(3 << 20),
        (5 << 20) + 777..(9 << 20),
        (9 << 20) + 4096..(9 << 20) + 8192,
        (12 << 20)..total,
    ];
    let mut bytes = random_bytes(total as usize).to_vec();
    for h in &holes {
        bytes[h.start as usize..h.end as usize].fill(0);
    }
    let data = Bytes::from(bytes);
    let mut source = Sparse {
        data: data.clone(),
        holes: holes.clone(),
    };
    let sent = nodes[0]
        .t
        .send_snapshot(2, 8, 1, total, &mut source)
        .await
        .unwrap();
    let hole_bytes: u64 = holes.iter().map(|h| h.end - h.start).sum();
    assert_eq!(sent.zero_bytes, hole_bytes, "{sent:?}");
    assert_eq!(sent.bytes_sent, total - hole_bytes, "{sent:?}");
    let part = nodes[1].snaps.get(1, 8, 1).unwrap();
    let part = part.lock().unwrap();
    assert!(part.finished);
    assert!(part.data == data, "snapshot bytes differ");
}

#[tokio::test]
async fn interrupted_transfer_resumes_from_the_receivers_offset() {
    let pki = Pki::new();
    let nodes: Vec<Node> = [1u64, 2]
        .iter()
        .map(|&id| {
            let mut cfg = fast_config(id);
            // Slow enough that the watcher below can cut the connection mid-transfer.
            cfg.snapshot_bytes_per_sec_max = 16 << 20;
            start(cfg, Security::MutualTls(pki.identity(id)))
        })
        .collect();
    nodes[0].t.add_peer(2, nodes[1].t.local_addr()).unwrap();
    nodes[1].t.add_peer(1, nodes[0].t.local_addr()).unwrap();
    let total = 6 * 1024 * 1024;
    let data = random_bytes(total);
    let mut source = data.clone();
    let cut_at = 1024 * 1024;

    let send = nodes[0]
        .t
        .send_snapshot(2, 3, 42, total as u64, &mut source);
    let cut = async {
        loop {
            let got = nodes[1]
                .snaps
                .get(1, 3, 42)
                .map(|p| p.lock().unwrap().data.len())
                .unwrap_or(0);
            if got >= cut_at {
                nodes[0].t.disconnect(2);
                return got;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (sent, cut_seen) = tokio::join!(send, cut);
    let sent = sent.unwrap();
    assert!(cut_seen >= cut_at && cut_seen < total, "cut at {cut_seen}");
    assert!(sent.attempts >= 2, "{sent:?}");
    let resumed = sent.start_offsets[1];
    assert!(
        resumed >= cut_at as u64,
        "resumed from {resumed}, but {cut_seen} bytes had arrived: {sent:?}"
    );
    assert!(
        sent.bytes_sent < total as u64 + cut_at as u64,
        "a resume must not resend what the receiver already had: {sent:?}"
    );
    let part = nodes[1].snaps.get(1, 3, 42).unwrap();
    let part = part.lock().unwrap();
    assert_eq!(part.opens[0], 0);
    assert_eq!(part.opens[1], resumed);
    assert!(part.finished);
    assert!(
        part.data == data,
        "resumed snapshot differs from the source"
    );
}

#[tokio::test]
async fn offer_resumes_from_durable_partial_data() {
    let pki = Pki::new();
    let nodes = mesh(&pki, &[1, 2]);
    let data = random_bytes(1024 * 1024);
    let durable = 300_000;
    // As if an earlier attempt (before a restart) had stored the first bytes durably.
    nodes[1].snaps.parts.lock().unwrap().insert(
        (1, 9, 1),
        Arc::new(std::sync::Mutex::new(Partial {
            data: data[..durable].to_vec(),
            ..Default::default()
        })),
    );
    let mut source = data.clone();
    let sent = nodes[0]
        .t
        .send_snapshot(2, 9, 1, data.len() as u64, &mut source)
        .await
        .unwrap();
    assert_eq!(sent.start_offsets, vec![durable as u64]);
    assert_eq!(sent.bytes_sent, (data.len() - durable) as u64);
    let part = nodes[1].snaps.get(1, 9, 1).unwrap();
    assert!(part.lock().unwrap().data == data);
}

#[tokio::test]
async fn receiver_without_snapshot_support_rejects_the_offer() {
    let pki = Pki::new();
    let a = start(fast_config(1), Security::MutualTls(pki.identity(1)));
    let (b, _rx) = Transport::bind(
        fast_config(2),
        Security::MutualTls(pki.identity(2)),
        None::<Arc<dyn SnapshotReceiver>>,
    )
    .unwrap();
    a.t.add_peer(2, b.local_addr()).unwrap();
    b.add_peer(1, a.t.local_addr()).unwrap();
    let mut source = Bytes::from_static(b"0123456789");
    let err =
        a.t.send_snapshot(2, 1, 1, 10, &mut source)
            .await
            .unwrap_err();
    assert!(matches!(err, Error::Snapshot { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("node 2 at 127.0.0.1:") && msg.contains("rejected"),
        "{msg}"
    );
}

#[tokio::test]
async fn failing_source_fails_the_send_without_retrying() {
    struct Broken;
    impl transport::SnapshotSource for Broken {
        fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let pki = Pki::new();
    let nodes = mesh(&pki, &[1, 2]);
    let err = nodes[0]
        .t
        .send_snapshot(2, 1, 1, 1000, &mut Broken)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SnapshotSource { offset: 0, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn corrupt_or_misplaced_chunks_reset_the_stream_and_nothing_else() {
    let pki = Pki::new();
    let mut nodes = mesh(&pki, &[1, 2]);
    let server = nodes[0].t.local_addr();
    let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
    assert_eq!(hello(&conn, 3).await, Ok(1));

    let payload = b"chunk payload";
    let good = wire::ChunkHeader::for_bytes(0, payload);
    let bad_crc = wire::ChunkHeader {
        crc: good.crc ^ 1,
        ..good
    };
    let misplaced = wire::ChunkHeader { offset: 5, ..good };
    let oversized = wire::ChunkHeader {
        len: 64 << 20,
        ..good
    };
    // Zero runs: one with a crc (a zero run carries none), one past the end of the snapshot.
    let zero_with_crc = wire::ChunkHeader {
        crc: 1,
        ..wire::ChunkHeader::zero_run(0, 4096)
    };
    let zero_past_end = wire::ChunkHeader::zero_run(0, wire::ZERO_RUN_BYTES_MAX);
    for (snapshot_id, header, total_len) in [
        (1u64, bad_crc, 1 << 30),
        (2, misplaced, 1 << 30),
        (3, oversized, 1 << 30),
        (4, zero_with_crc, 1 << 30),
        (5, zero_past_end, 1 << 20),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let offer = wire::SnapshotOfferWire {
            group: 1,
            snapshot_id,
            total_len,
        };
        let mut msg = vec![wire::STREAM_SNAPSHOT];
        msg.extend_from_slice(&offer.encode());
        send.write_all(&msg).await.unwrap();
        let mut reply = [0u8; wire::SNAPSHOT_REPLY_BYTES];
        recv.read_exact(&mut reply).await.unwrap();
        assert_eq!(
            wire::decode_snapshot_reply(&reply),
            Ok((wire::SNAPSHOT_RESUME_AT, 0))
        );
        send.write_all(&header.encode()).await.unwrap();
        send.write_all(payload).await.unwrap();
        let err = tokio::time::timeout(WAIT, recv.read_exact(&mut reply))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&code::SNAPSHOT_ABORTED.to_string()),
            "snapshot {snapshot_id}: expected a reset, got {err}"
        );
        let part = nodes[0].snaps.get(3, 1, snapshot_id).unwrap();
        assert!(part.lock().unwrap().data.is_empty() && !part.lock().unwrap().finished);
    }
    // The connection itself survives, and so does everyone else's traffic.
    assert!(conn.close_reason().is_none());
    nodes[1]
        .t
        .send(1, Frame::new(1, 1, "ok"), Lane::Control)
        .unwrap();
    assert_eq!(recv(&mut nodes[0]).await.from, 2);
}
