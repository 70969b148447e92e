//! The reusable `LogStore` conformance suite: every backend (the WAL, the
//! simulator's `MemStore`, any future one) runs [`run_all`] from its tests.
//!
//! A backend plugs in through [`Harness`]: how to open an empty store and how
//! to restart one (drop it the way a crash or shutdown would, then recover).
//! Each case states the rule it checks in its doc comment; the randomized
//! case compares the backend against [`MemStore`], whose own semantics are
//! pinned down by the hand-written cases (they run against it too).

use std::fmt::Debug;

use bytes::Bytes;

use crate::core::types::{Entry, EntryKind, GroupId, HardState, Index, Term};
use crate::storage::mem::MemStore;
use crate::storage::{GroupLogState, LogStore};

/// How the suite gets stores of the backend under test.
pub trait Harness {
    type Store: LogStore;
    /// A new, empty store (each call starts from nothing).
    fn open_fresh(&mut self) -> Self::Store;
    /// Drops `store` without any further sync (as a crash or a shutdown
    /// would) and reopens it: the result must hold every synced operation and
    /// at most a prefix of the later ones.
    fn restart(&mut self, store: Self::Store) -> Self::Store;
}

/// A named conformance case.
pub type Case<H> = (&'static str, fn(&mut H));

/// Every case, by name, so a failure message says which rule broke.
pub fn cases<H: Harness>() -> Vec<Case<H>> {
    vec![
        ("append_and_read", append_and_read::<H>),
        ("overwrite_suffix", overwrite_suffix::<H>),
        ("compact_prefix", compact_prefix::<H>),
        (
            "compact_beyond_or_mismatch",
            compact_beyond_or_mismatch::<H>,
        ),
        ("read_ranges", read_ranges::<H>),
        ("invalid_appends_refused", invalid_appends_refused::<H>),
        ("hard_state", hard_state::<H>),
        ("groups_interleaved", groups_interleaved::<H>),
        ("remove_group", remove_group::<H>),
        (
            "restart_shows_synced_state",
            restart_shows_synced_state::<H>,
        ),
        (
            "restart_loses_only_a_suffix",
            restart_loses_only_a_suffix::<H>,
        ),
        ("randomized_against_model", randomized_against_model::<H>),
    ]
}

/// Runs every case; panics naming the first case that fails.
pub fn run_all<H: Harness>(h: &mut H) {
    for (name, case) in cases::<H>() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(h)));
        if let Err(e) = r {
            eprintln!("log store conformance case `{name}` failed");
            std::panic::resume_unwind(e);
        }
    }
}

/// Entries `lo..=hi` of `term`; the payload encodes group, index and term
/// so a misplaced entry is visible.
pub fn make_entries(group: GroupId, lo: Index, hi: Index, term: Term) -> Vec<Entry> {
    (lo..=hi)
        .map(|index| Entry {
            index,
            term,
            kind: if index % 7 == 0 {
                EntryKind::Noop
            } else {
                EntryKind::Normal
            },
            data: Bytes::from(format!("g{group}/i{index}/t{term}").repeat((index % 5) as usize)),
        })
        .collect()
}

fn ok<T, E: Debug>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("unexpected log store error: {e:?}"))
}

fn state<S: LogStore>(s: &S, g: GroupId) -> GroupLogState {
    s.group_state(g)
        .unwrap_or_else(|| panic!("group {g} missing"))
}

fn all<S: LogStore>(s: &mut S, g: GroupId) -> Vec<Entry> {
    let st = state(s, g);
    ok(s.entries(g, st.compacted_index + 1, st.last_index + 1))
}

/// Everything observable about a store, for whole-state comparisons.
pub type Image = Vec<(GroupId, GroupLogState, Vec<Entry>)>;

pub fn image<S: LogStore>(s: &mut S) -> Image {
    s.groups()
        .into_iter()
        .map(|g| (g, state(s, g), all(s, g)))
        .collect()
}

/// Compares two images, reporting the first difference compactly (entry
/// payloads can be kilobytes).
pub fn assert_same_image(got: &Image, want: &Image, ctx: &str) {
    if got == want {
        return;
    }
    let gids = |i: &Image| i.iter().map(|g| g.0).collect::<Vec<_>>();
    if gids(got) != gids(want) {
        panic!(
            "{ctx}: groups differ: got {:?}, want {:?}",
            gids(got),
            gids(want)
        );
    }
    for ((g, gs, ge), (_, ws, we)) in got.iter().zip(want) {
        if gs != ws {
            panic!("{ctx}: group {g}: state {gs:?}, want {ws:?}");
        }
        for (a, b) in ge.iter().zip(we) {
            if a != b {
                panic!(
                    "{ctx}: group {g}: entry {} differs: got (term {}, {:?}, {} bytes), want (term {}, {:?}, {} bytes)",
                    b.index, a.term, a.kind, a.data.len(), b.term, b.kind, b.data.len()
                );
            }
        }
    }
    unreachable!("images differ but no difference found");
}

/// Appended entries read back exactly, in any sub-range.
pub fn append_and_read<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    assert!(s.groups().is_empty());
    assert_eq!(s.group_state(1), None);
    let e = make_entries(1, 1, 10, 1);
    ok(s.append(1, &e[..4]));
    ok(s.append(1, &e[4..]));
    ok(s.append(1, &[]));
    let st = state(&s, 1);
    assert_eq!((st.compacted_index, st.last_index), (0, 10));
    assert_eq!(ok(s.entries(1, 1, 11)), e);
    assert_eq!(ok(s.entries(1, 3, 6)), e[2..5].to_vec());
    ok(s.sync());
    assert_eq!(ok(s.entries(1, 1, 11)), e);
}

/// An append starting at or below the last index replaces the old suffix.
pub fn overwrite_suffix<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.append(1, &make_entries(1, 1, 10, 1)));
    ok(s.sync());
    ok(s.append(1, &make_entries(1, 6, 7, 2)));
    assert_eq!(state(&s, 1).last_index, 7);
    let mut want = make_entries(1, 1, 5, 1);
    want.extend(make_entries(1, 6, 7, 2));
    assert_eq!(all(&mut s, 1), want);
    // Overwrite of the very first entry.
    ok(s.append(1, &make_entries(1, 1, 2, 3)));
    assert_eq!(all(&mut s, 1), make_entries(1, 1, 2, 3));
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(all(&mut s, 1), make_entries(1, 1, 2, 3));
}

/// `compact` drops a prefix and remembers the term at the compaction point;
/// compacting at or below an earlier point is a no-op.
pub fn compact_prefix<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.append(1, &make_entries(1, 1, 10, 2)));
    ok(s.compact(1, 4, 2));
    let st = state(&s, 1);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (4, 2, 10)
    );
    assert_eq!(all(&mut s, 1), make_entries(1, 5, 10, 2));
    ok(s.compact(1, 3, 2));
    assert_eq!(state(&s, 1).compacted_index, 4);
    ok(s.compact(1, 10, 2));
    let st = state(&s, 1);
    assert_eq!((st.compacted_index, st.last_index), (10, 10));
    ok(s.append(1, &make_entries(1, 11, 12, 3)));
    ok(s.sync());
    let mut s = h.restart(s);
    let st = state(&s, 1);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (10, 2, 12)
    );
    assert_eq!(all(&mut s, 1), make_entries(1, 11, 12, 3));
}

/// A snapshot beyond the log, or one whose term differs from the entry at
/// its index, drops the whole log; the next append starts after it.
pub fn compact_beyond_or_mismatch<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.append(1, &make_entries(1, 1, 5, 1)));
    ok(s.compact(1, 20, 4));
    let st = state(&s, 1);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (20, 4, 20)
    );
    assert!(s.append(1, &make_entries(1, 6, 6, 4)).is_err());
    ok(s.append(1, &make_entries(1, 21, 22, 4)));
    ok(s.append(2, &make_entries(2, 1, 5, 1)));
    ok(s.compact(2, 3, 7));
    let st = state(&s, 2);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (3, 7, 3)
    );
    // Compacting a group the store never saw creates it (snapshot install).
    ok(s.compact(3, 100, 5));
    assert_eq!(state(&s, 3).last_index, 100);
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(all(&mut s, 1), make_entries(1, 21, 22, 4));
    let st = state(&s, 2);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (3, 7, 3)
    );
    let st = state(&s, 3);
    assert_eq!(
        (st.compacted_index, st.compacted_term, st.last_index),
        (100, 5, 100)
    );
}

/// Reads inside the log succeed (empty ranges too); reads of compacted or
/// missing entries, or of an unknown group, fail.
pub fn read_ranges<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.append(1, &make_entries(1, 1, 10, 1)));
    ok(s.compact(1, 3, 1));
    assert_eq!(ok(s.entries(1, 4, 4)), vec![]);
    assert_eq!(ok(s.entries(1, 11, 11)), vec![]);
    assert_eq!(ok(s.entries(1, 4, 11)), make_entries(1, 4, 10, 1));
    assert!(s.entries(1, 3, 5).is_err());
    assert!(s.entries(1, 1, 2).is_err());
    assert!(s.entries(1, 5, 12).is_err());
    assert!(s.entries(1, 6, 5).is_err());
    assert!(s.entries(9, 1, 1).is_err());
}

/// Appends that leave a gap, go below the compaction point, or are not
/// consecutive are refused and change nothing.
pub fn invalid_appends_refused<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    assert!(s.append(1, &make_entries(1, 2, 3, 1)).is_err());
    ok(s.append(1, &make_entries(1, 1, 5, 1)));
    ok(s.compact(1, 2, 1));
    assert!(s.append(1, &make_entries(1, 7, 8, 1)).is_err());
    assert!(s.append(1, &make_entries(1, 2, 3, 2)).is_err());
    let mut gap = make_entries(1, 6, 7, 1);
    gap[1].index = 9;
    assert!(s.append(1, &gap).is_err());
    assert_eq!(all(&mut s, 1), make_entries(1, 3, 5, 1));
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(all(&mut s, 1), make_entries(1, 3, 5, 1));
}

/// The latest hard state wins, per group, across restarts; a group with only
/// a hard state exists.
pub fn hard_state<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.set_hard_state(
        1,
        HardState {
            term: 1,
            vote: 2,
            disk: 900 + 1,
        },
    ));
    ok(s.set_hard_state(
        2,
        HardState {
            term: 5,
            vote: 0,
            disk: 900 + 5,
        },
    ));
    ok(s.set_hard_state(
        1,
        HardState {
            term: 3,
            vote: 4,
            disk: 900 + 3,
        },
    ));
    assert_eq!(s.groups(), vec![1, 2]);
    assert_eq!(
        state(&s, 1).hard_state,
        HardState {
            term: 3,
            vote: 4,
            disk: 900 + 3
        }
    );
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(
        state(&s, 1).hard_state,
        HardState {
            term: 3,
            vote: 4,
            disk: 900 + 3
        }
    );
    assert_eq!(
        state(&s, 2).hard_state,
        HardState {
            term: 5,
            vote: 0,
            disk: 900 + 5
        }
    );
    assert_eq!(state(&s, 2).last_index, 0);
    ok(s.set_hard_state(
        1,
        HardState {
            term: 4,
            vote: 0,
            disk: 900 + 4,
        },
    ));
    ok(s.sync());
    let s = h.restart(s);
    assert_eq!(
        state(&s, 1).hard_state,
        HardState {
            term: 4,
            vote: 0,
            disk: 900 + 4
        }
    );
}

/// Many groups interleaved in one store keep separate logs.
pub fn groups_interleaved<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    for round in 0..5u64 {
        for g in [7u64, 3, 11, 1] {
            let lo = round * 3 + 1;
            ok(s.append(g, &make_entries(g, lo, lo + 2, 1 + round / 2)));
        }
    }
    ok(s.append(3, &make_entries(3, 4, 4, 9)));
    ok(s.compact(11, 6, 1));
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(s.groups(), vec![1, 3, 7, 11]);
    for g in [1u64, 7, 11] {
        assert_eq!(state(&s, g).last_index, 15);
        let e = ok(s.entries(g, 7, 16));
        assert!(e
            .iter()
            .all(|e| e.data.starts_with(format!("g{g}/").as_bytes()) || e.data.is_empty()));
        assert_eq!(e.len(), 9);
    }
    assert_eq!(state(&s, 3).last_index, 4);
    assert_eq!(ok(s.entries(3, 4, 5)), make_entries(3, 4, 4, 9));
    assert_eq!(state(&s, 11).compacted_index, 6);
}

/// `remove_group` forgets a group entirely; the id can be reused afresh.
pub fn remove_group<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    ok(s.append(1, &make_entries(1, 1, 5, 1)));
    ok(s.set_hard_state(
        1,
        HardState {
            term: 1,
            vote: 1,
            disk: 900 + 1,
        },
    ));
    ok(s.append(2, &make_entries(2, 1, 5, 1)));
    ok(s.remove_group(1));
    ok(s.remove_group(42));
    assert_eq!(s.groups(), vec![2]);
    assert_eq!(s.group_state(1), None);
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(s.groups(), vec![2]);
    ok(s.append(1, &make_entries(1, 1, 2, 6)));
    ok(s.sync());
    let mut s = h.restart(s);
    assert_eq!(all(&mut s, 1), make_entries(1, 1, 2, 6));
    assert_eq!(state(&s, 1).hard_state, HardState::default());
}

/// After sync + restart the store shows exactly the state before restart.
pub fn restart_shows_synced_state<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    let s0 = image(&mut s);
    let mut s = h.restart(s);
    assert_eq!(image(&mut s), s0);
    for g in 1..=4u64 {
        ok(s.set_hard_state(
            g,
            HardState {
                term: g,
                vote: g,
                disk: 900 + g,
            },
        ));
        ok(s.append(g, &make_entries(g, 1, 20 + g, 1)));
    }
    ok(s.compact(2, 10, 1));
    ok(s.append(3, &make_entries(3, 15, 16, 2)));
    ok(s.remove_group(4));
    ok(s.sync());
    let before = image(&mut s);
    let mut s = h.restart(s);
    assert_eq!(image(&mut s), before);
    let mut s = h.restart(s);
    assert_eq!(image(&mut s), before);
}

/// Unsynced operations may be lost on restart, but only as a suffix.
pub fn restart_loses_only_a_suffix<H: Harness>(h: &mut H) {
    let mut s = h.open_fresh();
    let mut model = MemStore::new();
    ok(s.append(1, &make_entries(1, 1, 5, 1)));
    ok(model.append(1, &make_entries(1, 1, 5, 1)));
    ok(s.sync());
    ok(model.sync());
    let mut candidates = vec![image(&mut model)];
    type Op = Box<dyn Fn(&mut dyn DynStore)>;
    let ops: Vec<Op> = vec![
        Box::new(|s| s.do_append(1, &make_entries(1, 6, 8, 1))),
        Box::new(|s| {
            s.do_set_hard_state(
                1,
                HardState {
                    term: 2,
                    vote: 1,
                    disk: 900 + 2,
                },
            )
        }),
        Box::new(|s| s.do_append(1, &make_entries(1, 4, 4, 2))),
        Box::new(|s| s.do_append(2, &make_entries(2, 1, 3, 1))),
        Box::new(|s| s.do_compact(1, 3, 1)),
        Box::new(|s| s.do_remove_group(2)),
    ];
    for op in &ops {
        op(&mut s);
        op(&mut model);
        candidates.push(image(&mut model));
    }
    let mut s = h.restart(s);
    let got = image(&mut s);
    assert!(
        candidates.contains(&got),
        "state after restart is not a prefix of the issued ops: {got:?}"
    );
}

/// Object-safe view used to issue the same op to the store and the model.
trait DynStore {
    fn do_append(&mut self, g: GroupId, e: &[Entry]);
    fn do_set_hard_state(&mut self, g: GroupId, hs: HardState);
    fn do_compact(&mut self, g: GroupId, i: Index, t: Term);
    fn do_remove_group(&mut self, g: GroupId);
}

impl<S: LogStore> DynStore for S {
    fn do_append(&mut self, g: GroupId, e: &[Entry]) {
        ok(LogStore::append(self, g, e))
    }
    fn do_set_hard_state(&mut self, g: GroupId, hs: HardState) {
        ok(LogStore::set_hard_state(self, g, hs))
    }
    fn do_compact(&mut self, g: GroupId, i: Index, t: Term) {
        ok(LogStore::compact(self, g, i, t))
    }
    fn do_remove_group(&mut self, g: GroupId) {
        ok(LogStore::remove_group(self, g))
    }
}

/// Small deterministic generator (xorshift64*), so the suite needs no RNG
/// dependency and every run of it is the same.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seeded random mix of every operation on several groups, synced and
/// restarted at random points, must match the model at every step.
pub fn randomized_against_model<H: Harness>(h: &mut H) {
    randomized_against_model_seeded(h, 0x9e37_79b9_7f4a_7c15, 600);
}

/// Seeds a soak test runs: `BD_WAL_SOAK_SEEDS` if set (the long sweep the
/// README documents), else `default`.
pub fn soak_seeds(default: u64) -> u64 {
    std::env::var("BD_WAL_SOAK_SEEDS")
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .expect("BD_WAL_SOAK_SEEDS: a number of seeds")
        })
        .unwrap_or(default)
}

/// [`randomized_against_model`] with another seed and number of steps.
pub fn randomized_against_model_seeded<H: Harness>(h: &mut H, seed: u64, steps: u64) {
    let mut rng = Rng(seed | 1);
    let mut s = h.open_fresh();
    let mut model = MemStore::new();
    let groups = [1u64, 2, 3, 5, 8];
    for step in 0..steps {
        let g = groups[rng.below(groups.len() as u64) as usize];
        let st = model.group_state(g).unwrap_or_default();
        let op = rng.below(20);
        match op {
            0..=11 => {
                // Mostly appends at the end, sometimes overwriting a suffix.
                let lo = if st.last_index > st.compacted_index && rng.below(4) == 0 {
                    st.last_index - rng.below(st.last_index - st.compacted_index)
                } else {
                    st.last_index + 1
                };
                let n = 1 + rng.below(6);
                let term = st.hard_state.term.max(1) + rng.below(2);
                let mut e = make_entries(g, lo, lo + n - 1, term);
                if rng.below(10) == 0 {
                    // A larger payload now and then.
                    e[0].data = Bytes::from(vec![step as u8; 3000 + rng.below(9000) as usize]);
                }
                ok(s.append(g, &e));
                ok(model.append(g, &e));
            }
            12..=13 => {
                let hs = HardState {
                    term: st.hard_state.term + rng.below(2),
                    vote: rng.below(4),
                    disk: 1 + rng.below(3),
                };
                ok(s.set_hard_state(g, hs));
                ok(model.set_hard_state(g, hs));
            }
            14..=15 => {
                if st.last_index > st.compacted_index {
                    let i = st.compacted_index + 1 + rng.below(st.last_index - st.compacted_index);
                    let t = ok(model.entries(g, i, i + 1))[0].term;
                    ok(s.compact(g, i, t));
                    ok(model.compact(g, i, t));
                }
            }
            16 => {
                if rng.below(4) == 0 {
                    ok(s.remove_group(g));
                    ok(model.remove_group(g));
                }
            }
            17..=18 => {
                ok(s.sync());
                ok(model.sync());
            }
            _ => {
                ok(s.sync());
                ok(model.sync());
                s = h.restart(s);
            }
        }
        let last_op = format!("step {step}, group {g}, op {op}");
        assert_same_image(
            &image(&mut s),
            &image(&mut model),
            &format!("diverged after {last_op}"),
        );
    }
    ok(s.sync());
    let mut s = h.restart(s);
    assert_same_image(
        &image(&mut s),
        &image(&mut model),
        "after the final restart",
    );
}
