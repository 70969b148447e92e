//! Faults against 3-process clusters on loopback (issue 4's remaining tests): a follower killed
//! and caught up by log replication, the whole cluster killed mid-write and restarted, a follower whose data directory is deleted and rebuilt by
//! InstallSnapshot, hostile NBD input next to a working client, and random UDP datagrams and
//! QUIC connections with garbage streams and frames sent to a node's peer port.
//!
//! Each test owns its random free ports, a temporary directory and its processes (killed on
//! drop, passing or not). The fuzzing tests are seeded: `BD_FAULT_SEED=N` replays a run.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use server::nbd::proto::*;

const BLOCK: u64 = 65536;
/// Time a restarted node has to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    let s = std::env::var("BD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0062_6466_6175_6c74);
    println!("BD_FAULT_SEED={s}");
    s
}

fn read_block(file: &std::fs::File, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut buf, block * BLOCK).unwrap();
    buf
}

/// Asserts that 64 KiB block `b` of `file` is filled with `byte`.
fn assert_block(file: &std::fs::File, b: u64, byte: u64, what: &str) {
    let buf = read_block(file, b);
    if let Some(at) = buf.iter().position(|x| *x as u64 != byte) {
        panic!(
            "{what}: block {b} holds {:#x} at byte {at}, expected {byte:#x}",
            buf[at]
        );
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Writes through `via` and reads back through `check`: the cluster still commits.
fn assert_commits(c: &Cluster, via: usize, check: usize, blocks: std::ops::Range<u64>) {
    let acked = write_blocks(&c.nodes[via].uri(), blocks.clone());
    assert_eq!(
        acked.len() as u64,
        blocks.end - blocks.start,
        "writes through node {} were not all acknowledged\n{}",
        via + 1,
        c.logs()
    );
    qemu_io(&c.nodes[check].uri(), &block_reads(blocks));
}

#[test]
fn killed_follower_catches_up_by_log_not_snapshot() {
    // Default snapshot settings (interval 3600 s, log limit 256 MiB): nobody takes a snapshot,
    // so the leader's log holds everything the follower misses.
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let other = (l + 2) % 3;
    assert_eq!(write_blocks(&c.nodes[l].uri(), 0..8).len(), 8);
    let before = c.commit_index();
    let s = c.nodes[f]
        .wait_applied(before, CATCH_UP)
        .expect("follower applies the first writes");
    let applied_before = s["known_applied_index"].as_u64().unwrap();
    let snap_before = s["last_snapshot_index"].as_u64().unwrap();

    c.kill(f);
    // While it is down: 32 new blocks through the other follower (forwarded), and the first
    // 4 blocks it already holds are zeroed, so a stale copy would show.
    let acked = write_blocks(&c.nodes[other].uri(), 8..40);
    assert_eq!(acked.len(), 32, "writes with two nodes up\n{}", c.logs());
    qemu_io(
        &c.nodes[other].uri(),
        &[format!("write -z 0 {}", 4 * BLOCK), "flush".into()],
    );
    let commit = c.commit_index();
    assert!(
        commit >= applied_before + 33,
        "the follower must miss at least 33 entries: applied {applied_before}, commit {commit}"
    );
    let ls = c.nodes[c.leader()].status().unwrap();
    assert!(
        ls["first_log_index"].as_u64().unwrap() <= applied_before + 1,
        "precondition: the leader's log covers what the follower misses: {ls}"
    );
    let log_before = c.nodes[f].log();

    c.spawn(f);
    let s = c.nodes[f]
        .wait_applied(commit, CATCH_UP)
        .unwrap_or_else(|| panic!("node {} did not catch up to {commit}\n{}", f + 1, c.logs()));
    eprintln!("caught up by log: {s}");
    // No snapshot was sent or installed: the follower's snapshot index is unchanged, and
    // neither its log nor the leader's mentions a transfer.
    assert_eq!(
        s["last_snapshot_index"].as_u64().unwrap(),
        snap_before,
        "{s}"
    );
    assert_eq!(s["snapshot_status"], "IDLE", "{s}");
    let log_after = c.nodes[f].log();
    for needle in ["snapshot installed", "snapshot download started"] {
        assert_eq!(
            count(&log_after, needle),
            count(&log_before, needle),
            "node {} logged `{needle}` while catching up\n{}",
            f + 1,
            c.logs()
        );
    }
    let leader_now = c.leader();
    assert_eq!(
        count(&c.nodes[leader_now].log(), "streaming snapshot"),
        0,
        "the leader streamed a snapshot\n{}",
        c.logs()
    );

    // Reads through the caught-up node (forwarded to the leader) ...
    let mut reads = vec![format!("read -P 0 0 {}", 4 * BLOCK)];
    reads.extend(block_reads(4..40));
    qemu_io(&c.nodes[f].uri(), &reads);
    // ... and its own data file, which only log replication can have filled.
    let data = std::fs::File::open(c.nodes[f].data_file()).unwrap();
    for b in 0..4 {
        assert_block(&data, b, 0, "zeroed while down");
    }
    for b in 4..40 {
        assert_block(&data, b, pattern(b), "caught-up follower");
    }
}

/// All three nodes SIGKILLed together during a write workload: after all three restart, a
/// leader is elected and every acknowledged write reads back through every node. Each node
/// recovers its WAL from an unsealed last segment (a crash), which is where recovery reads past
/// the end of the records and cuts a torn tail.
#[test]
fn whole_cluster_killed_mid_write_keeps_every_acknowledged_write() {
    let mut c = Cluster::start(&[]);
    let uri = c.nodes[c.leader()].uri();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (uri, stop, written) = (uri.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut next = 0u64;
            // Blocks 0..900 of the 64 MiB BG (the last 100 stay for after).
            while !stop.load(Ordering::SeqCst) && next + 10 <= 900 {
                acked.extend(write_blocks(&uri, next..next + 10));
                next += 10;
                written.store(next, Ordering::SeqCst);
            }
            acked
        })
    };
    // Kill while batches keep coming: after 100 blocks, long before the 900.
    c.wait_until(
        "the workload stalled",
        Duration::from_secs(60),
        Duration::from_millis(5),
        || written.load(Ordering::SeqCst) >= 100,
    );
    for i in 0..3 {
        c.kill(i);
    }
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    assert!(
        acked.len() >= 10,
        "only {} writes were acknowledged before the kill\n{}",
        acked.len(),
        c.logs()
    );
    eprintln!("{} writes acknowledged before the kill", acked.len());
    for i in 0..3 {
        c.spawn(i);
    }
    let l = c.leader();
    eprintln!("node {} leads after the restart", l + 1);
    let reads = block_reads(acked.iter().copied());
    for n in 0..3 {
        qemu_io(&c.nodes[n].uri(), &reads);
    }
    // The cluster still commits after the restart.
    assert_commits(&c, (l + 1) % 3, (l + 2) % 3, 900..910);
}

#[test]
fn follower_with_deleted_data_is_rebuilt_by_install_snapshot() {
    // Snapshots every second keeping 16 entries: the leader's log soon starts past index 1,
    // so an empty node can only be rebuilt by InstallSnapshot.
    let mut c = Cluster::start(&[
        "--snapshot-interval-s",
        "1",
        "--snapshot-keep-entries",
        "16",
    ]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let other = (l + 2) % 3;
    assert_eq!(write_blocks(&c.nodes[l].uri(), 0..64).len(), 64);
    c.nodes[f]
        .wait_applied(c.commit_index(), CATCH_UP)
        .expect("follower applies the first writes");

    c.kill(f);
    std::fs::remove_dir_all(&c.nodes[f].dir).unwrap();
    assert!(!c.nodes[f].dir.exists());
    let acked = write_blocks(&c.nodes[other].uri(), 64..96);
    assert_eq!(acked.len(), 32, "writes with two nodes up\n{}", c.logs());
    // Wait for the leader to compact its log past the first entries.
    c.wait_until(
        "the leader never compacted its log",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || c.nodes[c.leader()].stat("first_log_index").unwrap_or(0) > 1,
    );
    let commit = c.commit_index();
    let log_before = c.nodes[f].log();
    assert_eq!(count(&log_before, "snapshot installed"), 0);

    c.spawn(f);
    let s = c.nodes[f]
        .wait_applied(commit, CATCH_UP)
        .unwrap_or_else(|| {
            panic!(
                "node {} was not rebuilt up to {commit}\n{}",
                f + 1,
                c.logs()
            )
        });
    eprintln!("rebuilt: {s}");
    let log_after = c.nodes[f].log();
    assert!(
        count(&log_after, "snapshot download complete") >= 1
            && count(&log_after, "snapshot installed") >= 1,
        "node {} caught up without installing a snapshot\n{}",
        f + 1,
        c.logs()
    );
    assert!(s["last_snapshot_index"].as_u64().unwrap() > 0, "{s}");
    // The volume is mostly never written: its holes travelled as zero runs, not as bytes.
    let streamed: Vec<(u64, u64)> = c
        .nodes
        .iter()
        .flat_map(|n| {
            n.log()
                .lines()
                .filter(|l| l.contains("snapshot streamed"))
                .map(|l| (field(l, "bytes_sent"), field(l, "zero_bytes")))
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("snapshots streamed (bytes_sent, zero_bytes): {streamed:?}");
    assert!(
        streamed
            .iter()
            .any(|&(data, zeros)| zeros > 0 && data < zeros),
        "no snapshot travelled mostly as zero runs: {streamed:?}"
    );

    // Its data file equals the other two for everything written, and holds the patterns.
    let files: Vec<std::fs::File> = c
        .nodes
        .iter()
        .map(|n| std::fs::File::open(n.data_file()).unwrap())
        .collect();
    for b in 0..96 {
        let mine = read_block(&files[f], b);
        for (i, file) in files.iter().enumerate() {
            assert!(
                read_block(file, b) == mine,
                "block {b}: node {} and rebuilt node {} differ",
                i + 1,
                f + 1
            );
        }
        assert_block(&files[f], b, pattern(b), "rebuilt node");
    }
    assert_commits(&c, f, other, 96..100);
}

/// One hostile NBD conversation (noise, a valid conversation cut short, bit-flipped, or
/// followed by noise), then EOF; the server must close the connection promptly. The valid
/// conversation writes at 32 MiB + i * 4 KiB: bit flips of those offsets either stay at or
/// above 32 MiB, fall below 16 KiB, or leave the volume, so they never touch the good client's
/// region [8 MiB, 16 MiB).
fn hostile_nbd(addr: SocketAddr, rng: &mut ChaCha8Rng) {
    let mut valid: Vec<u8> = Vec::new();
    valid.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = |option: u32, data: &[u8]| {
        valid.extend_from_slice(&IHAVEOPT.to_be_bytes());
        valid.extend_from_slice(&option.to_be_bytes());
        valid.extend_from_slice(&(data.len() as u32).to_be_bytes());
        valid.extend_from_slice(data);
    };
    let mut go = Vec::new();
    go.extend_from_slice(&3u32.to_be_bytes());
    go.extend_from_slice(b"bg0");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    opt(OPT_LIST, &[]);
    opt(OPT_INFO, &go);
    opt(OPT_GO, &go);
    for i in 0..5u64 {
        let kind = [CMD_WRITE, CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES, CMD_FLUSH][i as usize];
        let len = if kind == CMD_FLUSH { 0 } else { 1024 };
        let h = RequestHeader {
            flags: 0,
            kind,
            cookie: i,
            offset: (32 << 20) + i * 4096,
            len,
        };
        valid.extend_from_slice(&h.encode());
        if kind == CMD_WRITE {
            valid.extend_from_slice(&[0xaa; 1024]);
        }
    }
    let bytes = mangled(&valid, rng);
    let mut s = TcpStream::connect(addr).expect("the node accepts connections");
    // The server may close first (that is the point): write errors are expected then.
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the node kept a hostile connection open after EOF ({} bytes sent)",
            bytes.len()
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn hostile_nbd_input_leaves_the_node_serving() {
    let seed = seed();
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    // A follower: the hostile requests that get through are forwarded to the leader.
    let t = (l + 1) % 3;
    let uri = c.nodes[t].uri();
    let addr = c.nodes[t].nbd;

    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (uri, stop) = (uri.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) || rounds == 0 {
                let off = 8 * MIB + (rounds % 128) * BLOCK;
                let p = rounds % 250 + 1;
                qemu_io(
                    &uri,
                    &[
                        format!("write -P {p} {off} 64k"),
                        format!("read -P {p} {off} 64k"),
                    ],
                );
                rounds += 1;
            }
            rounds
        })
    };

    const CONNECTIONS: u64 = 240;
    const PARALLEL: u64 = 8;
    let workers: Vec<_> = (0..PARALLEL)
        .map(|w| {
            std::thread::spawn(move || {
                for i in (w..CONNECTIONS).step_by(PARALLEL as usize) {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    hostile_nbd(addr, &mut rng);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            stop.store(true, Ordering::SeqCst);
            panic!("a hostile connection was not handled\n{}", c.logs());
        }
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = good
        .join()
        .unwrap_or_else(|_| panic!("the good client failed\n{}", c.logs()));
    eprintln!("good client: {rounds} write+read rounds during {CONNECTIONS} hostile connections");
    assert!(rounds > 0);

    c.assert_all_alive();
    // A new client is served by the attacked node, and the cluster still replicates.
    assert_commits(&c, t, l, 200..204);
    let other = (l + 2) % 3;
    assert_commits(&c, other, t, 204..208);
    c.assert_all_alive();
}

/// The garbage a raw QUIC peer sends on a stream after a valid hello; each must get its
/// connection closed by the node.
fn garbage_streams(rng: &mut ChaCha8Rng) -> Vec<(&'static str, Vec<u8>)> {
    let mut noise = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    let frames = transport::wire::STREAM_FRAMES;
    let mut huge = vec![frames];
    huge.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    huge.extend(noise(256));
    let mut short = vec![frames];
    short.extend_from_slice(&3u32.to_le_bytes());
    short.extend(noise(32));
    let mut unknown = vec![0xEEu8];
    unknown.extend(noise(64));
    let mut truncated = vec![frames];
    truncated.extend_from_slice(&100u32.to_le_bytes());
    truncated.extend_from_slice(&[1, 2, 3]);
    let mut random = vec![frames];
    random.extend(noise(4000));
    vec![
        ("absurd frame length", huge),
        ("frame shorter than its header", short),
        ("unknown stream kind", unknown),
        ("stream ending inside a frame", truncated),
        ("random bytes on a frame stream", random),
    ]
}

/// Well-framed frames with engine-level garbage: random kinds, groups and payloads, and
/// bit-flipped forwarded reads.
fn garbage_frames(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    use engine::codec::{ForwardOp, ForwardRequest, KIND_FORWARD_REQUEST};
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&[transport::wire::STREAM_FRAMES]);
    for i in 0..n {
        let frame = if i % 3 == 0 {
            let req = ForwardRequest {
                req_id: rng.random(),
                op: ForwardOp::Read {
                    offset: rng.random_range(0..64) * BLOCK,
                    len: 4096,
                },
            };
            let mut p = req.encode().to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..p.len());
                p[at] ^= 1 << rng.random_range(0..8);
            }
            transport::Frame::new(KIND_FORWARD_REQUEST, 0, p)
        } else {
            let kind = if rng.random_bool(0.8) {
                rng.random_range(1..=3)
            } else {
                rng.random()
            };
            let group = if rng.random_bool(0.8) {
                0
            } else {
                rng.random()
            };
            let mut p = vec![0u8; rng.random_range(0..2000)];
            rng.fill_bytes(&mut p);
            transport::Frame::new(kind, group, p)
        };
        frame.encode_into(&mut out);
    }
    out.to_vec()
}

/// Well-formed messages from node 99, which is not a member of bg0 (insecure mode takes the id a
/// client claims on trust): a heartbeat and an AppendEntries with a higher term (which would
/// depose the leader), votes with the largest terms (`u64::MAX` used to crash every node on
/// `term + 1`) and a forwarded write of 0x5a to block `poison`.
fn crafted_frames(victim: u64, term: u64, poison: u64) -> Vec<u8> {
    use engine::codec::{
        encode_messages, ForwardOp, ForwardRequest, KIND_FORWARD_REQUEST, KIND_RAFT, TERM_INDEX_MAX,
    };
    use raftlog::core::{Message, MessageBody};
    let m = |term, body| Message {
        group: 0,
        from: 99,
        to: victim,
        term,
        disk: 99,
        to_disk: 0,
        body,
    };
    let vote = |term| {
        m(
            term,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: TERM_INDEX_MAX,
                last_log_term: TERM_INDEX_MAX,
                leadership_transfer: true,
            },
        )
    };
    let msgs = [
        vec![m(
            term + 5,
            MessageBody::Heartbeat {
                commit: 0,
                round: 0,
            },
        )],
        vec![m(
            term + 6,
            MessageBody::AppendEntries {
                prev_log_index: 0,
                prev_log_term: 0,
                entries: Vec::new(),
                leader_commit: 0,
                round: 0,
            },
        )],
        vec![vote(u64::MAX)],
        vec![vote(TERM_INDEX_MAX)],
        vec![m(term + 7, MessageBody::TimeoutNow)],
    ];
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(&[transport::wire::STREAM_FRAMES]);
    for batch in &msgs {
        transport::Frame::new(KIND_RAFT, 0, encode_messages(batch)).encode_into(&mut out);
    }
    let write = ForwardRequest {
        req_id: 7,
        op: ForwardOp::Op(engine::BlockOp::Write {
            offset: poison * BLOCK,
            data: bytes::Bytes::from(vec![0x5a; BLOCK as usize]),
        }),
    };
    transport::Frame::new(KIND_FORWARD_REQUEST, 0, write.encode()).encode_into(&mut out);
    out.to_vec()
}

async fn quic_connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    let crypto = transport::tls::client_crypto(&transport::Security::InsecureLoopback).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_with(cfg, addr, "localhost").unwrap(),
    )
    .await
    .expect("QUIC handshake in time")
    .expect("QUIC handshake")
}

/// Sends a hello claiming node `claim`; returns the node id the server answers with.
async fn quic_hello(conn: &quinn::Connection, claim: u64) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&transport::wire::encode_hello(claim))
        .await
        .unwrap();
    send.finish().unwrap();
    let mut ack = [0u8; transport::wire::HELLO_BYTES];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut ack))
        .await
        .expect("hello answer in time")
        .expect("hello answer");
    transport::wire::decode_hello(&ack).expect("a valid hello answer")
}

async fn assert_closed(conn: &quinn::Connection, what: &str) {
    let r = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(r.is_ok(), "the node kept a connection open after: {what}");
}

/// Random datagrams, half of them shaped like QUIC long-header Initial packets (version 1,
/// plausible connection id lengths) so they reach the packet parser rather than being dropped
/// as short garbage.
fn udp_noise(target: SocketAddr, rng: &mut ChaCha8Rng, n: usize) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..n {
        let len = if i % 2 == 0 {
            rng.random_range(1..1500)
        } else {
            1200
        };
        let mut d = vec![0u8; len];
        rng.fill_bytes(&mut d);
        if i % 2 == 1 {
            d[0] = 0xc0 | (d[0] & 0x3f);
            d[1..5].copy_from_slice(&1u32.to_be_bytes());
            d[5] = rng.random_range(0..=20);
        }
        let _ = s.send_to(&d, target);
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn random_udp_and_quic_garbage_leave_the_node_replicating() {
    let seed = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let victim = c.nodes[l].quic;
    let victim_id = c.nodes[l].id;

    // 1. Random datagrams at the leader's QUIC port.
    udp_noise(victim, &mut rng, 4000);
    c.assert_all_alive();
    assert_commits(&c, f, l, 0..4);

    // 2. QUIC connections (insecure mode accepts any client) with garbage.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let streams = garbage_streams(&mut rng);
    let frames = garbage_frames(&mut rng, 600);
    let term_before = c.nodes[l].stat("term").unwrap();
    // Block 100 holds its pattern; the non-member's forwarded write must not change it.
    assert_commits(&c, l, f, 100..101);
    let crafted = crafted_frames(victim_id, term_before, 100);
    let mut hello_noise = [0u8; 64];
    rng.fill_bytes(&mut hello_noise);
    rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Random bytes instead of a hello.
        let conn = quic_connect(&ep, victim).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello_noise).await.unwrap();
        send.finish().unwrap();
        assert_closed(&conn, "random bytes instead of a hello").await;
        // Malformed streams after a valid hello (as a node that is not a member).
        for (what, bytes) in &streams {
            let conn = quic_connect(&ep, victim).await;
            assert_eq!(quic_hello(&conn, 99).await, victim_id);
            let mut s = conn.open_uni().await.unwrap();
            // The node may close the connection while we still write.
            let _ = s.write_all(bytes).await;
            let _ = s.finish();
            assert_closed(&conn, what).await;
        }
        // Well-framed frames whose contents are garbage: the engine refuses them one by one.
        let conn = quic_connect(&ep, victim).await;
        assert_eq!(quic_hello(&conn, 99).await, victim_id);
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&frames).await.unwrap();
        s.finish().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.stopped()).await;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        // Well-formed raft messages and a forwarded write from a node that is not a member.
        let conn = quic_connect(&ep, victim).await;
        assert_eq!(quic_hello(&conn, 99).await, victim_id);
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&crafted).await.unwrap();
        s.finish().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.stopped()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        ep.wait_idle().await;
    });
    // The garbage frames did reach the engine (and were refused with a log line each).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = count(&c.nodes[l].log(), "refused:");
    while refused < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        refused = count(&c.nodes[l].log(), "refused:");
    }
    assert!(
        refused >= 100,
        "only {refused} garbage frames were refused by the engine\n{}",
        c.logs()
    );
    eprintln!("{refused} garbage frames refused by the victim's engine");

    // 3. Nobody adopted the non-member's terms or followed it, and its write was refused.
    c.assert_all_alive();
    for n in &c.nodes {
        let s = n.status().unwrap();
        let term = s["term"].as_u64().unwrap();
        assert!(
            term < term_before + 5 && s["leader"] != 99,
            "node {} took the non-member's term or leadership (term {term_before} before): {s}\n{}",
            n.id,
            c.logs()
        );
    }
    qemu_io(
        &c.nodes[f].uri(),
        &[format!("read -P {} {} 64k", pattern(100), 100 * BLOCK)],
    );
    // 4. The cluster still replicates through every node and nothing crashed.
    c.assert_all_alive();
    for (i, via) in [l, f, (l + 2) % 3].into_iter().enumerate() {
        let b = 8 + 4 * i as u64;
        assert_commits(&c, via, (via + 1) % 3, b..b + 4);
    }
    c.assert_all_alive();
}

/// The number after `name=` in a log line (0 if absent).
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
