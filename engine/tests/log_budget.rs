//! The per-core log memory budget (`log_memory_bytes_max`): the raft core keeps every entry
//! since its group's last snapshot in memory, so a core with many groups snapshots its
//! largest groups once their logs together exceed the budget. Without a budget the same
//! writes stay in memory (the control run), so the test tells the two apart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use engine::{BgStatus, Engine, EngineConfig};

const GROUPS: u64 = 4;
const BG_BYTES: u64 = 8 << 20;
const WRITTEN_PER_GROUP: u64 = 4 << 20;
const BUDGET: usize = 6 << 20;

fn config(dir: &Path, budget: usize) -> EngineConfig {
    let mut c = single_node_config(dir, 0..GROUPS, BG_BYTES);
    c.tick_ms = 20;
    c.election_timeout_ms = 200;
    // Only the budget may trigger snapshots here.
    c.snapshot_interval_s = 0;
    c.snapshot_log_bytes_max = 1 << 30;
    c.snapshot_keep_bytes_max = 256 << 10;
    c.log_memory_bytes_max = budget;
    c
}

fn pattern(seed: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u64).wrapping_mul(131).wrapping_add(seed * 7) as u8)
            .collect::<Vec<_>>(),
    )
}

fn total_log_bytes(st: &[BgStatus]) -> usize {
    st.iter().map(|s| s.log_bytes).sum()
}

/// Writes `WRITTEN_PER_GROUP` to every group, then polls the status until `done` holds (or
/// 10 s pass) and returns the last status.
fn run(budget: usize, done: impl Fn(&[BgStatus]) -> bool) -> Vec<BgStatus> {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = Engine::start(config(dir.path(), budget)).unwrap();
    let st = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !e.status().await.iter().all(|s| s.state == "LEADER") {
            assert!(Instant::now() < deadline, "no leaders");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for bg in 0..GROUPS {
            let h = e.bg(bg).unwrap();
            for off in (0..WRITTEN_PER_GROUP).step_by(256 << 10) {
                h.write(off, pattern(bg + off, 256 << 10)).await.unwrap();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            let st = e.status().await;
            if done(&st) || Instant::now() > deadline {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Whatever was snapshotted, every byte reads back.
        for bg in 0..GROUPS {
            let h = e.bg(bg).unwrap();
            for off in (0..WRITTEN_PER_GROUP).step_by(256 << 10) {
                let r = h.read(off, 256 << 10).await.unwrap();
                assert!(r == pattern(bg + off, 256 << 10), "bg {bg} offset {off}");
            }
        }
        st
    });
    e.shutdown();
    st
}

#[test]
fn over_budget_core_snapshots_its_largest_groups() {
    let written = (GROUPS * WRITTEN_PER_GROUP) as usize;
    let st = run(BUDGET, |st| {
        total_log_bytes(st) <= BUDGET && st.iter().all(|s| s.snapshot_status == "IDLE")
    });
    let total = total_log_bytes(&st);
    let snapshotted = st.iter().filter(|s| s.last_snapshot_index > 0).count();
    eprintln!("budget {BUDGET}: {total} log bytes in memory after writing {written}; {snapshotted} groups snapshotted");
    assert!(
        total <= BUDGET,
        "log bytes {total} over the budget {BUDGET}: {st:#?}"
    );
    assert!(snapshotted >= 2, "{st:#?}");
    for s in &st {
        if s.last_snapshot_index > 0 {
            // The kept tail below the snapshot is bounded by snapshot_keep_bytes_max.
            assert!(s.log_bytes <= (256 << 10) + 64, "{s:#?}");
        }
    }
}

#[test]
fn without_a_budget_the_logs_stay_in_memory() {
    let written = (GROUPS * WRITTEN_PER_GROUP) as usize;
    let st = run(0, |_| true);
    let total = total_log_bytes(&st);
    assert!(total >= written, "log bytes {total} < written {written}");
    assert!(st.iter().all(|s| s.last_snapshot_index == 0), "{st:#?}");
}
