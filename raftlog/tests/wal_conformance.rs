//! The WAL passes the log-store conformance suite on both I/O backends and
//! both write modes (direct I/O, the default, and buffered + fdatasync),
//! restarted both cleanly (sealed) and as after a crash (unsealed tail).

use raftlog::storage::conformance::{self, Harness};
use raftlog::wal::{IoBackend, Wal, WalConfig};

struct WalHarness {
    root: tempfile::TempDir,
    n: u32,
    backend: IoBackend,
    crash: bool,
    direct: bool,
    segments_soft_max: usize,
}

impl WalHarness {
    fn new(backend: IoBackend, crash: bool) -> WalHarness {
        WalHarness {
            root: tempfile::tempdir().unwrap(),
            n: 0,
            backend,
            crash,
            direct: true,
            segments_soft_max: 4,
        }
    }
    fn cfg(&self) -> WalConfig {
        let mut c = WalConfig::new(self.root.path().join(self.n.to_string()));
        // Small segments so the suite crosses segment boundaries.
        c.log_segment_bytes_max = 64 << 10;
        c.record_bytes_max = 16 << 10;
        c.batch_bytes_max = 8 << 10;
        c.segments_soft_max = self.segments_soft_max;
        c.entry_cache_bytes_max = 4 << 10;
        c.io_backend = self.backend;
        c.direct_io = self.direct;
        c
    }
}

impl Harness for WalHarness {
    type Store = Wal;
    fn open_fresh(&mut self) -> Wal {
        self.n += 1;
        Wal::open(self.cfg()).unwrap()
    }
    fn restart(&mut self, store: Wal) -> Wal {
        if self.crash {
            store.close_unsealed();
        } else {
            drop(store);
        }
        Wal::open(self.cfg()).unwrap()
    }
}

#[test]
fn wal_conformance_uring_clean_restart() {
    conformance::run_all(&mut WalHarness::new(IoBackend::Auto, false));
}

#[test]
fn wal_conformance_uring_crash_restart() {
    conformance::run_all(&mut WalHarness::new(IoBackend::Auto, true));
}

#[test]
fn wal_conformance_fallback_crash_restart() {
    conformance::run_all(&mut WalHarness::new(IoBackend::Fallback, true));
}

#[test]
fn wal_conformance_buffered_crash_restart() {
    let mut h = WalHarness::new(IoBackend::Auto, true);
    h.direct = false;
    conformance::run_all(&mut h);
}

/// Without the cold-group rewrite, segments are purged only because groups
/// compact (each compaction moves the group's restart point), so a group's
/// records older than its restart point survive in segments kept for the
/// groups that have not compacted lately, and recovery must skip them.
/// Many seeds, restarted as after a crash, against the model
/// (`BD_WAL_SOAK_SEEDS=N` for N seeds instead of 24).
#[test]
fn wal_randomized_purged_by_compaction_only() {
    for seed in 0..conformance::soak_seeds(24) {
        let mut h = WalHarness::new(IoBackend::Auto, true);
        h.segments_soft_max = 1 << 20;
        conformance::randomized_against_model_seeded(
            &mut h,
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            800,
        );
    }
}
