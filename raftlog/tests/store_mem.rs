//! The simulator's in-memory store passes the log-store conformance suite.

use raftlog::storage::conformance::{self, Harness};
use raftlog::storage::mem::MemStore;

struct MemHarness;

impl Harness for MemHarness {
    type Store = MemStore;
    fn open_fresh(&mut self) -> MemStore {
        MemStore::new()
    }
    fn restart(&mut self, mut store: MemStore) -> MemStore {
        store.crash(false);
        store
    }
}

/// Restarting keeps every unsynced op but tears the last one.
struct TornHarness;

impl Harness for TornHarness {
    type Store = MemStore;
    fn open_fresh(&mut self) -> MemStore {
        MemStore::new()
    }
    fn restart(&mut self, mut store: MemStore) -> MemStore {
        store.crash(true);
        store
    }
}

#[test]
fn mem_store_conformance() {
    conformance::run_all(&mut MemHarness);
}

#[test]
fn mem_store_conformance_with_torn_crashes() {
    conformance::run_all(&mut TornHarness);
}
