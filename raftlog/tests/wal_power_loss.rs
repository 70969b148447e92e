//! Power loss with several batches in flight, on a simulated disk
//! (`WalConfig::power_loss_sim`): batches complete in random order, and at a
//! seeded moment the power goes — each batch still in flight is dropped,
//! written whole, torn (random 512-byte sectors) or zeroed, in arbitrary
//! order, and nothing more is written. Async appenders on many groups
//! append, set hard state and compact until then; several such sessions run
//! on the same directory (each recovering the previous cut), then a plain
//! open checks the end state. Every acknowledged operation must survive
//! every recovery, and recovery must never refuse: everything the cut
//! damaged was unacknowledged, so it is a legitimately torn tail.
//!
//! Both write modes: direct I/O (batches padded to 4096 bytes) and
//! buffered.

#[path = "support/logs.rs"]
mod logs;
#[path = "support/payload.rs"]
mod payload;

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use logs::with_logs;
use raftlog::core::types::{Entry, EntryKind, HardState};
use raftlog::storage::LogStore;
use raftlog::wal::{self, PowerLossReport, PowerLossSim, Wal, WalConfig};

const GROUPS: u64 = 6;
const SESSIONS: u64 = 3;

/// Entry `index` of `group`: some entries span several sectors.
fn payload(group: u64, index: u64) -> Bytes {
    payload::tagged(
        group,
        index,
        16 + ((group * 131 + index * 977) % 6000) as usize,
    )
}

fn cfg(dir: &Path, direct: bool, segments_soft_max: usize) -> WalConfig {
    let mut c = WalConfig::new(dir);
    // Small segments and batches: many batches, rotations and purges.
    c.log_segment_bytes_max = 64 << 10;
    c.record_bytes_max = 16 << 10;
    c.batch_bytes_max = 8 << 10;
    c.segments_soft_max = segments_soft_max;
    c.segments_recycle_max = 4;
    c.entry_cache_bytes_max = 32 << 10;
    c.direct_io = direct;
    c
}

/// What the appenders were told is durable, per group.
#[derive(Clone, Default)]
struct Acked {
    last_index: Vec<u64>,
    compacted: Vec<u64>,
    hs_term: Vec<u64>,
}

/// Opens `cfg` (recovering) with warnings captured; panics if recovery
/// refuses.
fn open_logged(cfg: WalConfig, what: &str) -> (Wal, String) {
    let (w, text) = with_logs(|| Wal::open(cfg));
    match w {
        Ok(w) => (w, text),
        Err(e) => panic!("{what}: recovery refused a power-cut log: {e}\n{text}"),
    }
}

/// Every acknowledged operation is in the recovered store.
fn check(w: &mut Wal, acked: &Acked, what: &str) {
    for g in 0..GROUPS {
        let gi = g as usize;
        if acked.last_index[gi] == 0 && acked.hs_term[gi] == 0 {
            continue;
        }
        let st = w
            .group_state(g)
            .unwrap_or_else(|| panic!("{what}: group {g} lost"));
        assert!(
            st.last_index >= acked.last_index[gi],
            "{what}: group {g} last index {} < acknowledged {}",
            st.last_index,
            acked.last_index[gi]
        );
        assert!(
            st.compacted_index >= acked.compacted[gi],
            "{what}: group {g} compaction {} < acknowledged {}",
            st.compacted_index,
            acked.compacted[gi]
        );
        assert!(
            st.hard_state.term >= acked.hs_term[gi],
            "{what}: group {g} hard state term {} < acknowledged {}",
            st.hard_state.term,
            acked.hs_term[gi]
        );
        let lo = st.compacted_index + 1;
        let hi = acked.last_index[gi] + 1;
        if lo < hi {
            let got = w.entries(g, lo, hi).unwrap();
            for e in got {
                assert_eq!(
                    e.data,
                    payload(g, e.index),
                    "{what}: group {g} entry {} corrupt",
                    e.index
                );
            }
        }
    }
}

/// One session: recover, check, then append until the power cut fails the
/// store. Returns the recovery warnings.
/// Runs one session until the power cut; returns its logs and how many
/// segments it started on a recycled (purged) file.
fn session(c: WalConfig, sim: PowerLossSim, acked: &mut Acked, what: &str) -> (String, u64) {
    let mut c = c;
    c.power_loss_sim = Some(sim);
    let (mut w, logs) = open_logged(c, what);
    check(&mut w, acked, what);
    let start: Vec<(u64, u64)> = (0..GROUPS)
        .map(|g| {
            w.group_state(g)
                .map_or((0, 0), |s| (s.last_index, s.hard_state.term))
        })
        .collect();
    let w = Rc::new(RefCell::new(w));
    let h = w.borrow().handle();
    let shared = Rc::new(RefCell::new(acked.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let writer = tokio::task::spawn_local(wal::run(w.clone()));
        let mut tasks = Vec::new();
        for g in 0..GROUPS {
            let (h, shared) = (h.clone(), shared.clone());
            let (mut last, mut term) = start[g as usize];
            tasks.push(tokio::task::spawn_local(async move {
                let gi = g as usize;
                // Bounded: the cut comes long before, this only stops a
                // broken simulation from running forever.
                for _ in 0..10_000 {
                    let idx = last + 1;
                    let n = 1 + (idx % 3);
                    let entries: Vec<Entry> = (idx..idx + n)
                        .map(|index| Entry {
                            index,
                            term: 1,
                            kind: EntryKind::Normal,
                            data: payload(g, index),
                        })
                        .collect();
                    if h.append(g, entries).await.is_err() {
                        return;
                    }
                    last = idx + n - 1;
                    shared.borrow_mut().last_index[gi] = last;
                    if idx % 5 == 0 {
                        term += 1;
                        let hs = HardState {
                            term,
                            vote: g,
                            disk: g + 1,
                        };
                        if h.set_hard_state(g, hs).await.is_err() {
                            return;
                        }
                        shared.borrow_mut().hs_term[gi] = term;
                    }
                    if idx % 7 == 0 && last > 10 {
                        if h.compact(g, last - 10, 1).await.is_err() {
                            return;
                        }
                        let mut a = shared.borrow_mut();
                        a.compacted[gi] = a.compacted[gi].max(last - 10);
                    }
                }
                panic!("{g}: the power cut never came");
            }));
        }
        for t in tasks {
            t.await.expect("appender");
        }
        h.shutdown();
        assert!(
            writer.await.expect("writer").is_err(),
            "the cut fails the store"
        );
    });
    *acked = shared.borrow().clone();
    let recycled = w.borrow().status().recycled_segments;
    drop(h);
    drop(w);
    (logs, recycled)
}

/// The groups compact as they go, so segments are purged (compaction moves
/// each group's restart point) and later ones start on purged files.
/// `segments_soft_max` 4 keeps the cold-group rewrite from ever finding
/// room; 8 lets it rewrite too, and with cuts after up to `cut_jobs_max`
/// batches (instead of 60) the sessions run longer.
fn power_loss(
    direct: bool,
    seeds: std::ops::Range<u64>,
    segments_soft_max: usize,
    cut_jobs_max: u64,
) {
    let report = Arc::new(Mutex::new(PowerLossReport::default()));
    let mut holes_with_records_after = 0;
    let mut recycled = 0;
    for seed in seeds {
        let tmp = tempfile::tempdir().unwrap();
        let mut acked = Acked {
            last_index: vec![0; GROUPS as usize],
            compacted: vec![0; GROUPS as usize],
            hs_term: vec![0; GROUPS as usize],
        };
        let mut all_logs = String::new();
        for s in 0..SESSIONS {
            let k = seed * SESSIONS + s;
            let sim = PowerLossSim {
                seed: k,
                // Mostly mid-stream, sometimes right after open.
                cut_after_jobs: 1 + (k * 7919) % cut_jobs_max,
                report: report.clone(),
            };
            let what = format!("direct={direct} seed {seed} session {s}");
            let c = cfg(tmp.path(), direct, segments_soft_max);
            let (logs, r) = session(c, sim, &mut acked, &what);
            all_logs += &logs;
            recycled += r;
        }
        let what = format!("direct={direct} seed {seed} final open");
        let (mut w, logs) = open_logged(cfg(tmp.path(), direct, segments_soft_max), &what);
        all_logs += &logs;
        check(&mut w, &acked, &what);
        assert!(
            acked.last_index.iter().any(|&l| l > 0),
            "{what}: nothing was ever acknowledged"
        );
        holes_with_records_after += all_logs
            .lines()
            .filter(|l| l.contains("valid_records_after_hole=") && !l.contains("_hole=0"))
            .count();
    }
    let r = report.lock().unwrap().clone();
    eprintln!(
        "direct={direct}: {r:?}, holes with records after them: {holes_with_records_after}, \
         segments on recycled files: {recycled}"
    );
    // Cuts then also hit segments whose unwritten parts hold an earlier
    // life's records, which must never pass as acknowledged ones.
    assert!(recycled > 0, "segments on recycled files: {recycled}");
    // The simulation must have exercised what it is for.
    assert!(
        r.cuts > 0 && r.dropped > 0 && r.whole > 0 && r.torn > 0 && r.zeroed > 0,
        "{r:?}"
    );
    assert!(
        holes_with_records_after > 0,
        "no cut ever left a later batch on disk behind a lost one"
    );
}

/// `BD_WAL_SOAK_SEEDS=N` runs N seeds from `start` instead of `default` (the
/// long sweep the README documents).
fn seeds(start: u64, default: u64) -> std::ops::Range<u64> {
    start..start + raftlog::storage::conformance::soak_seeds(default)
}

#[test]
fn acknowledged_writes_survive_power_loss_direct_io() {
    power_loss(true, seeds(0, 12), 4, 60);
}

#[test]
fn acknowledged_writes_survive_power_loss_buffered() {
    power_loss(false, seeds(100, 6), 4, 60);
}

#[test]
fn acknowledged_writes_survive_power_loss_in_recycled_segments() {
    power_loss(true, seeds(0, 16), 8, 400);
    power_loss(false, seeds(0, 16), 8, 400);
}
