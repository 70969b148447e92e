//! Three engines in one process on loopback (insecure transport): writes through every node
//! (followers forward), reads back everywhere, a snapshot on demand (saved off the core thread;
//! the log is compacted once it is durable), a leadership transfer to a chosen follower (and
//! the ways it is refused), and a restart that recovers the data from the WAL and the data file.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use engine::{Engine, EngineConfig};

const BG_BYTES: u64 = 16 << 20;

fn config(dir: &Path, id: u64, addrs: &BTreeMap<u64, SocketAddr>) -> EngineConfig {
    let mut c = node_config(dir, id, addrs, [0], BG_BYTES);
    c.tick_ms = 20;
    c.election_timeout_ms = 300;
    c.wal_segment_bytes_max = 8 << 20;
    // Small, so the snapshot below visibly compacts the log.
    c.snapshot_keep_entries = 2;
    c
}

async fn wait_leader(engines: &[&Engine]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for e in engines {
            for s in e.status().await {
                if s.state == "LEADER" {
                    return s.node;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

#[test]
fn three_engines_replicate_forward_snapshot_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = cluster_addrs(3);
    let t0 = Instant::now();
    let mut snapshot_at = (0, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut engines: Vec<Engine> = (1..=3)
        .map(|id| Engine::start(config(dir.path(), id, &addrs)).unwrap())
        .collect();
    rt.block_on(async {
        let refs: Vec<&Engine> = engines.iter().collect();
        let leader = wait_leader(&refs).await;
        eprintln!("leader after {:?}", t0.elapsed());
        // Write through every node (two of them forward), 1 MiB each so entries are split.
        for (i, e) in engines.iter().enumerate() {
            let h = e.bg(0).unwrap();
            h.write(i as u64 * (1 << 20), pattern(i as u8, 1 << 20))
                .await
                .unwrap();
        }
        let h = engines[2].bg(0).unwrap();
        h.write_zeroes(4096, 8192, false).await.unwrap();
        h.trim(1 << 20, 65536).await.unwrap();
        h.flush().await.unwrap();
        for e in &engines {
            let h = e.bg(0).unwrap();
            let r = h.read(0, 3 << 20).await.unwrap();
            let mut want = Vec::new();
            for i in 0..3u8 {
                want.extend_from_slice(&pattern(i, 1 << 20));
            }
            want[4096..4096 + 8192].fill(0);
            want[1 << 20..(1 << 20) + 65536].fill(0);
            assert!(
                r[..] == want[..],
                "node {} reads what was written",
                e.config().node_id
            );
        }
        let out_of_range = h.write(BG_BYTES - 1, Bytes::from_static(b"xy")).await;
        assert!(out_of_range.is_err(), "a write past the end fails");
        // The data-file sync and meta write run off the core thread; the answer comes only
        // once they are durable and raft compacted its log.
        let idx = engines[(leader - 1) as usize].snapshot(0).await.unwrap();
        assert!(idx > 0, "snapshot index {idx}");
        let s = &engines[(leader - 1) as usize].status().await[0];
        assert_eq!(s.last_snapshot_index, idx, "{s:?}");
        assert_eq!(s.snapshot_status, "IDLE", "{s:?}");
        assert!(
            s.first_log_index > 1 && s.first_log_index <= idx,
            "log compacted below the snapshot: {s:?}"
        );
        snapshot_at = (leader, idx);

        // Leadership transfer (braft's transfer_leader): refused off the leader (naming it),
        // for an unknown BG and for a node that is not a voter; then handed to a chosen
        // follower, which wins the election, and writes keep working through the old leader.
        let target = if leader == 3 { 1 } else { leader + 1 };
        let follower = &engines[(target - 1) as usize];
        match follower.transfer_leader(0, Some(target)).await {
            Err(engine::Error::Raft {
                source: raftlog::Error::NotLeader { leader: l, .. },
                ..
            }) => assert_eq!(l, Some(leader)),
            other => panic!("transfer on a follower: {other:?}"),
        }
        let old = &engines[(leader - 1) as usize];
        assert!(matches!(
            old.transfer_leader(7, None).await,
            Err(engine::Error::UnknownBg { bg: 7 })
        ));
        assert!(matches!(
            old.transfer_leader(0, Some(99)).await,
            Err(engine::Error::Raft {
                source: raftlog::Error::UnknownPeer { peer: 99, .. },
                ..
            })
        ));
        let term_before = old.status().await[0].term;
        assert_eq!(old.transfer_leader(0, Some(target)).await.unwrap(), target);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = &follower.status().await[0];
            if s.state == "LEADER" {
                assert!(s.term > term_before, "{s:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {target} never took over: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let h = old.bg(0).unwrap();
        h.write(5 << 20, pattern(9, 4096)).await.unwrap();
        assert!(follower.bg(0).unwrap().read(5 << 20, 4096).await.unwrap() == pattern(9, 4096));
    });
    eprintln!("phase 1 done after {:?}", t0.elapsed());
    // Restart every node: state comes back from the meta file, the data file and the WAL.
    for e in engines.drain(..) {
        e.shutdown();
    }
    eprintln!("shutdown done after {:?}", t0.elapsed());
    let engines: Vec<Engine> = (1..=3)
        .map(|id| Engine::start(config(dir.path(), id, &addrs)).unwrap())
        .collect();
    rt.block_on(async {
        let refs: Vec<&Engine> = engines.iter().collect();
        wait_leader(&refs).await;
        // The meta file and the WAL compaction survived the restart.
        let (node, idx) = snapshot_at;
        let s = &engines[(node - 1) as usize].status().await[0];
        assert!(s.last_snapshot_index >= idx, "{s:?}");
        assert!(s.first_log_index > 1, "WAL compacted: {s:?}");
        for e in &engines {
            let r = e.bg(0).unwrap().read(2 << 20, 1 << 20).await.unwrap();
            assert!(
                r == pattern(2, 1 << 20),
                "node {} after restart",
                e.config().node_id
            );
        }
    });
    for e in engines {
        e.shutdown();
    }
}
