//! One-node engines (the group's only member is itself): applies run concurrently on the
//! core's io_uring (or inline on the core thread), yet overlapping writes take effect in log
//! order, reads see every applied
//! write, buffered and O_DIRECT alike; and a node that crashed at any step of a snapshot
//! install comes back with a consistent data file and snapshot index.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use engine::{block, Engine, EngineConfig};
use raftlog::core::{Configuration, SnapshotMeta};

const BG_BYTES: u64 = 4 << 20;

fn config(dir: &Path, direct: bool) -> EngineConfig {
    let mut c = single_node_config(dir, [0], BG_BYTES);
    c.tick_ms = 10;
    c.election_timeout_ms = 100;
    c.data_direct_io = direct;
    // Few slots, so applies also wait for slots and not only for overlaps.
    c.data_ios_in_flight_max = 8;
    c
}

async fn wait_leader(e: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !e.status().await.iter().any(|s| s.state == "LEADER") {
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pattern(seed: u32, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed * 7) as u8)
            .collect::<Vec<_>>(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// 300 writes (aligned and not, many overlapping), zeroes and trims, all in flight at once:
/// the volume must end as if they were applied one by one in submission order, and reads
/// issued in the middle of the stream must see at least everything acknowledged before them.
///
/// Buffered writes run both inline on the core thread (the default) and on the data ring;
/// the status counters must say which happened.
#[test]
fn concurrent_overlapping_applies_take_effect_in_log_order() {
    for (direct, inline) in [(false, true), (false, false), (true, true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), direct);
        cfg.inline_applies = inline;
        let e = Engine::start(cfg).unwrap();
        let rt = rt();
        rt.block_on(async {
            wait_leader(&e).await;
            let h = e.bg(0).unwrap();
            let mut model = vec![0u8; 1 << 20];
            let mut tasks = Vec::new();
            for i in 0..300u32 {
                let offset = (i as u64 * 1536) % (1 << 19) + (i as u64 % 3) * 100;
                let len = 512 + (i as usize * 997) % 20000;
                let h = h.clone();
                // Spawned in order on a current-thread runtime: each task's first poll
                // queues its request, so the core proposes them in this order.
                match i % 10 {
                    7 => {
                        model[offset as usize..offset as usize + len].fill(0);
                        tasks.push(tokio::spawn(async move {
                            h.write_zeroes(offset, len as u32, i % 20 == 7).await
                        }));
                    }
                    9 => {
                        model[offset as usize..offset as usize + len].fill(0);
                        tasks.push(tokio::spawn(
                            async move { h.trim(offset, len as u32).await },
                        ));
                    }
                    _ => {
                        let data = pattern(i, len);
                        model[offset as usize..offset as usize + len].copy_from_slice(&data);
                        tasks.push(tokio::spawn(async move { h.write(offset, data).await }));
                    }
                }
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let r = h.read(0, 1 << 20).await.unwrap();
            let first_bad = r.iter().zip(&model).position(|(a, b)| a != b);
            assert_eq!(
                first_bad, None,
                "direct {direct}: volume differs from the model"
            );
            // Read-your-writes for an unaligned write followed at once by its read.
            h.write(12345, pattern(1000, 777)).await.unwrap();
            assert_eq!(h.read(12345, 777).await.unwrap(), pattern(1000, 777));
            // The counters are published every tick (10 ms here).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let st = &e.core_stats()[0];
            // The WAL's counters reach the status too: every write became at least one entry.
            assert!(st.wal_appended_entries >= 300, "{st:?}");
            assert!(
                st.wal_batches > 0 && st.wal_batches <= st.wal_appended_entries,
                "{st:?}"
            );
            assert!(st.wal_batch_disk_us > 0 && st.wal_segments > 0, "{st:?}");
            if direct || !inline {
                assert_eq!(
                    st.applies_inline, 0,
                    "direct {direct} inline {inline}: {st:?}"
                );
                assert!(!st.inline_applies_active, "{st:?}");
            } else {
                // 240 writes; a few may have gone to the ring during a backoff.
                assert!(st.applies_inline > 100, "{st:?}");
            }
        });
        e.shutdown();
    }
}

/// For every step of the install protocol: a node runs, takes a snapshot, writes more, stops;
/// then a snapshot copy (another byte pattern) is installed by hand up to that step, as if the
/// node crashed there. On restart the group must hold either its old data with its old log
/// replayed (no step durable) or exactly the installed copy at the installed index, and it
/// must keep working.
#[test]
fn restart_after_a_crash_at_each_install_step_is_consistent() {
    for steps in 0..=block::INSTALL_STEPS {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), false);
        let core_dir = cfg.core_dir(0);
        let rt = rt();
        let e = Engine::start(cfg.clone()).unwrap();
        let (index, term) = rt.block_on(async {
            wait_leader(&e).await;
            let h = e.bg(0).unwrap();
            h.write(0, pattern(1, 65536)).await.unwrap();
            e.snapshot(0).await.unwrap();
            h.write(65536, pattern(2, 65536)).await.unwrap();
            let s = &e.status().await[0];
            (s.last_committed_index, s.term)
        });
        e.shutdown();
        // The copy a leader would have streamed: the state at `index`, made distinguishable.
        let copy = vec![0x5a; BG_BYTES as usize];
        std::fs::write(block::incoming_path(&core_dir, 0), &copy).unwrap();
        let meta = SnapshotMeta {
            index,
            term,
            conf: Configuration::new([1]),
        };
        block::install_snapshot_files_until(&core_dir, 0, &meta, steps).unwrap();

        let e = Engine::start(cfg).unwrap();
        rt.block_on(async {
            wait_leader(&e).await;
            let h = e.bg(0).unwrap();
            let s = &e.status().await[0];
            let r = h.read(0, 131072).await.unwrap();
            if steps == 0 {
                assert_eq!(&r[..65536], &pattern(1, 65536)[..], "steps {steps}");
                assert_eq!(&r[65536..], &pattern(2, 65536)[..], "steps {steps}");
                assert!(s.last_snapshot_index < index, "steps {steps}: {s:?}");
            } else {
                assert!(r.iter().all(|b| *b == 0x5a), "steps {steps}: mixed state");
                assert_eq!(s.last_snapshot_index, index, "steps {steps}: {s:?}");
            }
            assert!(!block::install_marker_path(&core_dir, 0).exists());
            assert!(!block::incoming_path(&core_dir, 0).exists());
            h.write(4096, pattern(3, 4096)).await.unwrap();
            assert_eq!(h.read(4096, 4096).await.unwrap(), pattern(3, 4096));
        });
        e.shutdown();
    }
}
