//! Crash test with real processes: a child process appends through the
//! async producer API (fsync on, many groups, compaction, small segments so
//! it rotates, rewrites and purges) and prints every acknowledged (durable)
//! index; the parent SIGKILLs it at seeded random moments, reopens the WAL
//! and checks that every acknowledged entry came back intact. Several rounds
//! run on the same directory, so each child also recovers the previous
//! crash.
//!
//! The child is this same test binary, re-executed with `CHILD_ENV` set.

#[path = "support/payload.rs"]
mod payload;

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use raftlog::core::types::{Entry, EntryKind};
use raftlog::storage::LogStore;
use raftlog::wal::{self, Wal, WalConfig};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "BD_WAL_CRASH_CHILD_DIR";
const GROUPS: u64 = 12;
const KEEP_ENTRIES: u64 = 40;

fn cfg(dir: &str) -> WalConfig {
    let mut c = WalConfig::new(dir);
    c.log_segment_bytes_max = 256 << 10;
    c.record_bytes_max = 64 << 10;
    c.segments_soft_max = 6;
    c.entry_cache_bytes_max = 128 << 10;
    c
}

/// The payload of entry `index` of `group`, of a length that depends on both.
fn payload(group: u64, index: u64) -> Bytes {
    payload::tagged(
        group,
        index,
        16 + ((group * 31 + index * 17) % 3000) as usize,
    )
}

fn entry(group: u64, index: u64) -> Entry {
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        data: payload(group, index),
    }
}

fn child(dir: &str) -> ! {
    let w = Wal::open(cfg(dir)).expect("child recovery");
    let start: Vec<u64> = (0..GROUPS)
        .map(|g| w.group_state(g).map_or(0, |s| s.last_index))
        .collect();
    let w = Rc::new(RefCell::new(w));
    let h = w.borrow().handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        tokio::task::spawn_local(wal::run(w.clone()));
        let mut tasks = Vec::new();
        for g in 0..GROUPS {
            let h = h.clone();
            let mut next = start[g as usize] + 1;
            tasks.push(tokio::task::spawn_local(async move {
                loop {
                    let n = 1 + (next % 3);
                    let batch: Vec<Entry> = (next..next + n).map(|i| entry(g, i)).collect();
                    h.append(g, batch).await.expect("append");
                    next += n;
                    println!("ack {g} {}", next - 1);
                    if next > KEEP_ENTRIES && next.is_multiple_of(10) {
                        h.compact(g, next - KEEP_ENTRIES, 1).await.expect("compact");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    unreachable!("the child runs until killed");
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_entry() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap().to_string();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xbd03);
    let mut acked = vec![0u64; GROUPS as usize];
    let mut total_acks = 0;
    let mut free_seen = 0;
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_at_random_moments_loses_no_acknowledged_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (first_ack, got_first) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ack ") {
                    let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                    acks.push((it.next().unwrap(), it.next().unwrap()));
                    if acks.len() == 1 {
                        let _ = first_ack.send(());
                    }
                }
            }
            acks
        });
        // Start the clock once the child is appending (recovery and start-up
        // time vary a lot on a loaded machine), then kill at a random moment.
        got_first
            .recv_timeout(Duration::from_secs(60))
            .expect("the child acknowledged nothing within 60 s");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        total_acks += acks.len();
        for (g, i) in acks {
            acked[g as usize] = acked[g as usize].max(i);
        }
        let mut w = Wal::open(cfg(&dir)).expect("recovery after SIGKILL");
        // Purged files the child left for reuse (the next child starts its
        // segments on them, so later kills tear reused files too).
        free_seen += w.status().free_segments;
        for g in 0..GROUPS {
            let st = w.group_state(g).unwrap_or_default();
            assert!(
                st.last_index >= acked[g as usize],
                "round {round}: group {g} recovered up to {} but {} was acknowledged",
                st.last_index,
                acked[g as usize]
            );
            let got = w
                .entries(g, st.compacted_index + 1, st.last_index + 1)
                .unwrap();
            for e in got {
                assert_eq!(
                    e,
                    entry(g, e.index),
                    "round {round}: group {g} entry {} differs",
                    e.index
                );
            }
        }
        // A clean close between rounds too: the next child recovers a sealed
        // log one round and a torn one the next.
        if round % 2 == 0 {
            drop(w);
        } else {
            w.close_unsealed();
        }
    }
    eprintln!(
        "{total_acks} acknowledged appends over 6 SIGKILLs, all recovered; free segment files seen at reopen: {free_seen}"
    );
    assert!(free_seen > 0, "no round purged a segment for reuse");
}
