//! Linearizability checker for a single `u64` register with read, write and
//! compare-and-swap, used by the deterministic raft simulator to validate the
//! client-visible history of each seed.
//!
//! # What is checked
//!
//! A [`History`] records, for every operation, the client that issued it, the
//! simulated time it was invoked and, if the client got an answer, the time it
//! returned and its result. The history is *linearizable* if some total order
//! of its operations
//!
//! 1. is a legal run of a sequential register starting at the initial value
//!    (reads return the current value, a CAS succeeds exactly when the current
//!    value equals `expected`), and
//! 2. respects real time: if `a` returned before `b` was invoked, `a` comes
//!    first.
//!
//! Operations without an answer (the client timed out and gave up, or the
//! history ended while they were in flight) may or may not have taken effect,
//! at any point after their invocation -- possibly long after the client moved
//! on. Such writes and CASes get an infinite return time and are *optional*:
//! the order may place them anywhere after their invocation, or leave them out.
//! Unanswered reads cannot affect anything and are ignored.
//!
//! Times are simulator ticks. Two events at the same tick are treated as
//! concurrent (`a` must precede `b` only if `a` returned strictly before `b`
//! was invoked), which can only hide a violation, never invent one. The one
//! exception is a client's own ops: a client issues one op at a time, so its
//! answered op precedes everything it invokes afterwards even at the same tick.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's memoization (the "WGL" algorithm of
//! knossos and porcupine). A depth-first search extends a partial
//! linearization one op at a time; an op may go next if every op that must
//! precede it is already placed, i.e. it was invoked no later than the earliest
//! return among the answered ops not yet placed. Each configuration (set of
//! placed ops, register value) is expanded at most once, which bounds the work
//! by the number of distinct configurations rather than the number of orders.
//! The search succeeds as soon as every answered op is placed.
//!
//! Pruning that keeps typical simulator histories close to linear time:
//! - A read, or a failed CAS, that agrees with the current value is placed at
//!   once without branching: it does not change the register, and moving it
//!   earlier in any valid linearization keeps that linearization valid.
//! - When exactly one op can go next it is placed without a branch point; in
//!   particular ops that completed before everything else started are
//!   linearized greedily.
//! - Candidates are tried in invocation order, answered ops before unanswered
//!   ones. An unanswered op is only tried when it would change the register to
//!   a value that some op that could go next needs (a read of that value, a CAS
//!   expecting it, or a failed CAS that needs the current value to go away):
//!   any linearization can be rearranged so that every unanswered op it
//!   contains is immediately followed by such an op. A lost write therefore
//!   costs nothing until some op observes it; without this rule each dead end
//!   is re-explored with every lost write inserted at every point.
//!
//! The search is bounded by `search_steps_max` (one step = placing one op);
//! running out yields [`CheckResult::Inconclusive`] instead of hanging.
//! Memory grows with the configurations visited, roughly
//! `steps * (ops / 8 + 64)` bytes in the worst case.
//!
//! On a violation the checker binary-searches the shortest prefix of the
//! history (cut at a return) that is already not linearizable -- the op whose
//! return closes that prefix is the one that could not be linearized -- and
//! describes the longest partial linearization of that prefix it found.

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};

/// Identifies a client of the register; any stable number the simulator uses.
pub type ClientId = u64;

/// An operation on the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write(u64),
    /// Sets the register to `new` if it holds `expected`.
    Cas {
        expected: u64,
        new: u64,
    },
}

/// What the client was told when its operation returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpResult {
    Read(u64),
    Write,
    /// Whether the CAS took effect.
    Cas(bool),
}

/// Handle of an operation in a [`History`]; displayed as `#index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(usize);

impl OpId {
    /// Position of the op in [`History::records`] (order of invocation calls).
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How an operation ended, as far as the client knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still in flight. At check time this is treated like [`Outcome::Unknown`].
    Pending,
    Completed {
        time: u64,
        result: OpResult,
    },
    /// The client gave up; the op may take effect at any later point or never.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub client: ClientId,
    pub op: Op,
    pub invoke: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Default)]
struct ClientState {
    in_flight: Option<OpId>,
    /// Latest invoke or return time seen for the client; its ops are sequential.
    last_time: u64,
}

/// A concurrent history of register operations, built as the simulation runs.
///
/// Misuse (a client with two ops in flight, a return not after its invocation,
/// a result of the wrong kind, completing an op twice) is a bug in the harness
/// and panics, because checking such a history would give meaningless answers.
#[derive(Clone, Debug, Default)]
pub struct History {
    records: Vec<Record>,
    clients: BTreeMap<ClientId, ClientState>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `client` invoked `op` at `time`.
    pub fn invoke(&mut self, client: ClientId, op: Op, time: u64) -> OpId {
        let id = OpId(self.records.len());
        let state = self.clients.entry(client).or_default();
        if let Some(prev) = state.in_flight {
            panic!(
                "client {client} invoked {op:?} at t={time} while {prev} is still in flight \
                 (complete it or time it out first)"
            );
        }
        assert!(
            time >= state.last_time,
            "client {client} invoked {op:?} at t={time}, before its previous op's t={}",
            state.last_time
        );
        state.in_flight = Some(id);
        state.last_time = time;
        self.records.push(Record {
            client,
            op,
            invoke: time,
            outcome: Outcome::Pending,
        });
        id
    }

    /// Records that op `id` returned `result` at `time` (strictly after its invocation).
    pub fn complete(&mut self, id: OpId, result: OpResult, time: u64) {
        let rec = self.pending_mut(id);
        assert!(
            time > rec.invoke,
            "{id} returned at t={time}, not after its invocation at t={}",
            rec.invoke
        );
        let kinds_match = matches!(
            (rec.op, result),
            (Op::Read, OpResult::Read(_))
                | (Op::Write(_), OpResult::Write)
                | (Op::Cas { .. }, OpResult::Cas(_))
        );
        assert!(kinds_match, "{id} is {:?} but returned {result:?}", rec.op);
        rec.outcome = Outcome::Completed { time, result };
        let client = rec.client;
        let state = self
            .clients
            .get_mut(&client)
            .expect("client of a recorded op");
        state.in_flight = None;
        state.last_time = time;
    }

    /// Records that the client gave up on op `id`; the client may invoke its next op.
    pub fn timeout(&mut self, id: OpId) {
        let rec = self.pending_mut(id);
        rec.outcome = Outcome::Unknown;
        let client = rec.client;
        let state = self
            .clients
            .get_mut(&client)
            .expect("client of a recorded op");
        state.in_flight = None;
    }

    fn pending_mut(&mut self, id: OpId) -> &mut Record {
        let rec = self
            .records
            .get_mut(id.0)
            .unwrap_or_else(|| panic!("{id} was never invoked"));
        assert_eq!(
            rec.outcome,
            Outcome::Pending,
            "{id} already ended; it cannot end again"
        );
        rec
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// All ops in invocation-call order; `records()[id.index()]` is op `id`.
    pub fn records(&self) -> &[Record] {
        &self.records
    }
}

/// Verdict of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    NotLinearizable {
        /// Multi-line, human-readable account of where the history breaks.
        explanation: String,
    },
    /// The search needed more than `search_steps_max` steps.
    Inconclusive,
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable)
    }
}

/// Checks whether `history` is linearizable for a register that starts at
/// `initial`, placing at most `search_steps_max` ops during the search.
///
/// A violation found within the budget is reported even if explaining it
/// (which re-runs the search on prefixes, each with the same budget) runs out.
pub fn check(history: &History, initial: u64, search_steps_max: u64) -> CheckResult {
    let problem = Problem::new(&history.records, |_, rec| full_status(rec), initial);
    match Search::new(&problem, search_steps_max, false).run() {
        Verdict::Linearizable => CheckResult::Linearizable,
        Verdict::OutOfBudget => CheckResult::Inconclusive,
        Verdict::Violation => CheckResult::NotLinearizable {
            explanation: explain(history, initial, search_steps_max),
        },
    }
}

/// How one record takes part in a particular search.
#[derive(Clone, Copy)]
enum Status {
    Skip,
    Completed { ret: u64, result: OpResult },
    Unknown,
}

fn full_status(rec: &Record) -> Status {
    match rec.outcome {
        Outcome::Completed { time, result } => Status::Completed { ret: time, result },
        // An unanswered read tells us nothing and changes nothing.
        Outcome::Pending | Outcome::Unknown if rec.op == Op::Read => Status::Skip,
        Outcome::Pending | Outcome::Unknown => Status::Unknown,
    }
}

/// An op's effect as the search sees it. Unanswered ops are `Write` or
/// `CasOk`: an unanswered CAS that fails is indistinguishable from one that
/// never happened, so only its successful form is worth placing.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Read(u64),
    Write(u64),
    CasOk { expected: u64, new: u64 },
    CasFailed { expected: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Item {
    id: OpId,
    kind: Kind,
    inv: u64,
    /// Return time; meaningless unless `completed`.
    ret: u64,
    completed: bool,
    /// The client's previous answered op, which must be placed first.
    client_prev: Option<u32>,
}

/// A history prepared for the search.
struct Problem {
    /// Answered ops sorted by invocation, then unanswered ops sorted by invocation.
    items: Vec<Item>,
    /// Indices of the answered items sorted by return time.
    by_ret: Vec<u32>,
    /// Number of answered items (`items[..completed]`).
    completed: usize,
    initial: u64,
}

impl Problem {
    fn new(records: &[Record], status: impl Fn(usize, &Record) -> Status, initial: u64) -> Self {
        let mut items = Vec::with_capacity(records.len());
        let mut last_completed: BTreeMap<ClientId, u32> = BTreeMap::new();
        for (index, rec) in records.iter().enumerate() {
            let (completed, ret, kind) = match status(index, rec) {
                Status::Skip => continue,
                Status::Completed { ret, result } => {
                    let kind = match (rec.op, result) {
                        (Op::Read, OpResult::Read(v)) => Kind::Read(v),
                        (Op::Write(v), _) => Kind::Write(v),
                        (Op::Cas { expected, new }, OpResult::Cas(true)) => {
                            Kind::CasOk { expected, new }
                        }
                        (Op::Cas { expected, .. }, _) => Kind::CasFailed { expected },
                        // History::complete rejects results of the wrong kind.
                        (Op::Read, _) => unreachable!("read {index} with a non-read result"),
                    };
                    (true, ret, kind)
                }
                Status::Unknown => {
                    let kind = match rec.op {
                        Op::Write(v) => Kind::Write(v),
                        Op::Cas { expected, new } => Kind::CasOk { expected, new },
                        Op::Read => continue,
                    };
                    (false, u64::MAX, kind)
                }
            };
            let pos = u32::try_from(items.len()).expect("history too large");
            let client_prev = last_completed.get(&rec.client).copied();
            if completed {
                last_completed.insert(rec.client, pos);
            }
            items.push(Item {
                id: OpId(index),
                kind,
                inv: rec.invoke,
                ret,
                completed,
                client_prev,
            });
        }

        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (!items[i].completed, items[i].inv, items[i].ret, items[i].id));
        let mut new_pos = vec![0u32; items.len()];
        for (pos, &old) in order.iter().enumerate() {
            new_pos[old] = pos as u32;
        }
        let items: Vec<Item> = order
            .iter()
            .map(|&old| Item {
                client_prev: items[old].client_prev.map(|p| new_pos[p as usize]),
                ..items[old]
            })
            .collect();
        let completed = items.iter().filter(|it| it.completed).count();
        let mut by_ret: Vec<u32> = (0..completed as u32).collect();
        by_ret.sort_by_key(|&i| (items[i as usize].ret, i));
        Problem {
            items,
            by_ret,
            completed,
            initial,
        }
    }

    /// The history cut right after the `k`-th return (in `returns` order):
    /// ops invoked later are dropped and ops answered later become unanswered.
    fn prefix(records: &[Record], returns: &[usize], k: usize, initial: u64) -> Self {
        let cut = match records[returns[k - 1]].outcome {
            Outcome::Completed { time, .. } => time,
            _ => unreachable!("`returns` lists answered ops only"),
        };
        let mut answered = vec![false; records.len()];
        for &r in &returns[..k] {
            answered[r] = true;
        }
        Problem::new(
            records,
            |index, rec| match full_status(rec) {
                _ if rec.invoke > cut => Status::Skip,
                status @ Status::Completed { .. } if answered[index] => status,
                _ if rec.op == Op::Read => Status::Skip,
                _ => Status::Unknown,
            },
            initial,
        )
    }
}

enum Verdict {
    Linearizable,
    Violation,
    OutOfBudget,
}

enum Settled {
    /// Every answered op is placed.
    Done,
    /// The ops worth branching on were appended to the options buffer.
    Branch,
    OutOfBudget,
}

/// Enough to undo everything placed after it.
#[derive(Clone, Copy)]
struct Snapshot {
    value: u64,
    next_inv: usize,
    next_ret: usize,
    done: usize,
    path_len: usize,
}

/// A branch point: its options are `options[next..]` up to the next frame's start.
#[derive(Clone, Copy)]
struct Frame {
    snapshot: Snapshot,
    start: usize,
    next: usize,
}

struct Search<'p> {
    p: &'p Problem,
    placed: Vec<u64>,
    value: u64,
    /// First unplaced answered item (items are sorted by invocation).
    next_inv: usize,
    /// First unplaced entry of `by_ret`: its return time is the deadline.
    next_ret: usize,
    /// Number of answered items placed.
    done: usize,
    /// The partial linearization, in order; doubles as the undo log.
    path: Vec<u32>,
    steps: u64,
    max_steps: u64,
    /// Longest partial linearization seen (by answered ops), if tracking.
    track_best: bool,
    best_path: Vec<u32>,
    best_done: usize,
    /// Scratch buffer of `settle`, kept to avoid an allocation per call.
    wanted: Vec<u64>,
}

/// The memo key type: which items are placed, and the register value.
type Seen = HashSet<(Box<[u64]>, u64), BuildHasherDefault<FxHasher>>;

impl<'p> Search<'p> {
    fn new(p: &'p Problem, max_steps: u64, track_best: bool) -> Self {
        Search {
            p,
            placed: vec![0; p.items.len().div_ceil(64)],
            value: p.initial,
            next_inv: 0,
            next_ret: 0,
            done: 0,
            path: Vec::new(),
            steps: 0,
            max_steps,
            track_best,
            best_path: Vec::new(),
            best_done: 0,
            wanted: Vec::new(),
        }
    }

    fn is_placed(&self, i: usize) -> bool {
        self.placed[i / 64] >> (i % 64) & 1 == 1
    }

    /// The earliest return among unplaced answered ops; only ops invoked no
    /// later than this may go next. Requires `done < completed`.
    fn deadline(&self) -> u64 {
        self.p.items[self.p.by_ret[self.next_ret] as usize].ret
    }

    fn ready(&self, i: usize, deadline: u64) -> bool {
        let it = &self.p.items[i];
        !self.is_placed(i)
            && it.inv <= deadline
            && it.client_prev.is_none_or(|c| self.is_placed(c as usize))
    }

    /// Appends item `i` to the linearization; the caller has checked it is legal.
    fn place(&mut self, i: usize) {
        self.placed[i / 64] |= 1 << (i % 64);
        let it = self.p.items[i];
        match it.kind {
            Kind::Write(v) | Kind::CasOk { new: v, .. } => self.value = v,
            Kind::Read(_) | Kind::CasFailed { .. } => {}
        }
        self.path.push(i as u32);
        self.steps += 1;
        if it.completed {
            self.done += 1;
            let nc = self.p.completed;
            while self.next_inv < nc && self.is_placed(self.next_inv) {
                self.next_inv += 1;
            }
            while self.next_ret < nc && self.is_placed(self.p.by_ret[self.next_ret] as usize) {
                self.next_ret += 1;
            }
            if self.track_best && self.done > self.best_done {
                self.best_done = self.done;
                self.best_path.clone_from(&self.path);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            value: self.value,
            next_inv: self.next_inv,
            next_ret: self.next_ret,
            done: self.done,
            path_len: self.path.len(),
        }
    }

    fn restore(&mut self, s: Snapshot) {
        for k in s.path_len..self.path.len() {
            let i = self.path[k] as usize;
            self.placed[i / 64] &= !(1 << (i % 64));
        }
        self.path.truncate(s.path_len);
        self.value = s.value;
        self.next_inv = s.next_inv;
        self.next_ret = s.next_ret;
        self.done = s.done;
    }

    /// Places every op that can go next without a real choice, then leaves in
    /// `options[start..]` the ops worth branching on (possibly none: a dead end).
    fn settle(&mut self, options: &mut Vec<u32>, start: usize) -> Settled {
        let p = self.p;
        let nc = p.completed;
        'settle: loop {
            if self.done == nc {
                return Settled::Done;
            }
            if self.steps > self.max_steps {
                return Settled::OutOfBudget;
            }
            options.truncate(start);
            let deadline = self.deadline();
            // Values some ready op needs the register to hold before it can go,
            // and whether some ready failed CAS needs it to change at all.
            let mut wanted = std::mem::take(&mut self.wanted);
            wanted.clear();
            let mut want_change = false;
            for i in self.next_inv..nc {
                let it = &p.items[i];
                if it.inv > deadline {
                    break;
                }
                if !self.ready(i, deadline) {
                    continue;
                }
                match it.kind {
                    Kind::Read(v) if v == self.value => {
                        self.place(i);
                        self.wanted = wanted;
                        continue 'settle;
                    }
                    Kind::CasFailed { expected } if expected != self.value => {
                        self.place(i);
                        self.wanted = wanted;
                        continue 'settle;
                    }
                    Kind::Write(_) => options.push(i as u32),
                    Kind::CasOk { expected, .. } if expected == self.value => {
                        options.push(i as u32)
                    }
                    // Inconsistent with the current value: needs another op first.
                    Kind::Read(v) | Kind::CasOk { expected: v, .. } => wanted.push(v),
                    Kind::CasFailed { .. } => want_change = true,
                }
            }
            let unknown = || {
                p.items
                    .iter()
                    .enumerate()
                    .skip(nc)
                    .take_while(|(_, it)| it.inv <= deadline)
                    .filter(|&(j, _)| self.ready(j, deadline))
            };
            for (_, it) in unknown() {
                if let Kind::CasOk { expected, .. } = it.kind {
                    wanted.push(expected);
                }
            }
            // An unanswered op is only worth placing right before an op that
            // depends on the value it leaves; otherwise it can be dropped (the
            // next op overwrites it) or moved after the next op (module docs).
            for (j, it) in unknown() {
                let leaves = match it.kind {
                    Kind::Write(v) => v,
                    Kind::CasOk { expected, new } if expected == self.value => new,
                    _ => continue,
                };
                // Placing one that leaves the register unchanged only forbids
                // placing it later.
                if leaves != self.value && (want_change || wanted.contains(&leaves)) {
                    options.push(j as u32);
                }
            }
            self.wanted = wanted;
            if options.len() == start + 1 {
                let only = options.pop().expect("one option") as usize;
                self.place(only);
                continue;
            }
            return Settled::Branch;
        }
    }

    fn run(&mut self) -> Verdict {
        let mut options: Vec<u32> = Vec::new();
        match self.settle(&mut options, 0) {
            Settled::Done => return Verdict::Linearizable,
            Settled::OutOfBudget => return Verdict::OutOfBudget,
            Settled::Branch => {}
        }
        let mut seen = Seen::default();
        let mut frames = vec![Frame {
            snapshot: self.snapshot(),
            start: 0,
            next: 0,
        }];
        loop {
            let Some(top) = frames.last_mut() else {
                return Verdict::Violation;
            };
            let Some(&candidate) = options.get(top.next) else {
                // Every option of this branch point failed: backtrack.
                let frame = *top;
                frames.pop();
                self.restore(frame.snapshot);
                options.truncate(frame.start);
                continue;
            };
            top.next += 1;
            let snapshot = self.snapshot();
            let start = options.len();
            self.place(candidate as usize);
            match self.settle(&mut options, start) {
                Settled::Done => return Verdict::Linearizable,
                Settled::OutOfBudget => return Verdict::OutOfBudget,
                Settled::Branch => {}
            }
            // Settling is deterministic, so memoizing settled configurations is
            // as good as memoizing every configuration, and cheaper.
            if seen.insert((self.placed.clone().into_boxed_slice(), self.value)) {
                frames.push(Frame {
                    snapshot,
                    start,
                    next: start,
                });
            } else {
                self.restore(snapshot);
                options.truncate(start);
            }
        }
    }
}

/// Builds the explanation of a history already known not to be linearizable.
fn explain(history: &History, initial: u64, max_steps: u64) -> String {
    let records = &history.records;
    let mut returns: Vec<usize> = (0..records.len())
        .filter(|&i| matches!(records[i].outcome, Outcome::Completed { .. }))
        .collect();
    returns.sort_by_key(|&i| match records[i].outcome {
        Outcome::Completed { time, .. } => (time, records[i].invoke, i),
        _ => unreachable!("filtered to answered ops"),
    });

    // Cutting a linearizable history after any return leaves it linearizable,
    // so "the prefix up to the k-th return violates" is monotone in k and the
    // shortest violating prefix can be binary-searched.
    let (mut lo, mut hi) = (1, returns.len());
    let mut minimized = true;
    while lo < hi {
        let mid = (lo + hi) / 2;
        let prefix = Problem::prefix(records, &returns, mid, initial);
        match Search::new(&prefix, max_steps, false).run() {
            Verdict::Violation => hi = mid,
            Verdict::Linearizable => lo = mid + 1,
            Verdict::OutOfBudget => {
                minimized = false;
                break;
            }
        }
    }
    let k = if minimized { hi } else { returns.len() };
    let culprit = OpId(returns[k - 1]);
    let cut = match records[culprit.0].outcome {
        Outcome::Completed { time, .. } => time,
        _ => unreachable!("`returns` lists answered ops only"),
    };

    let mut out = String::new();
    if minimized {
        let _ = writeln!(
            out,
            "not linearizable: the history up to the return of {culprit} at t={cut} (the \
             first {k} of {} returns) cannot be linearized, but every shorter prefix can:",
            returns.len()
        );
    } else {
        let _ = writeln!(
            out,
            "not linearizable (the search budget ran out while looking for the shortest \
             violating prefix, so this describes the whole history)"
        );
    }
    let _ = writeln!(out, "  {}", describe(records, culprit, true));
    if let Outcome::Completed {
        result: OpResult::Read(v),
        ..
    } = records[culprit.0].outcome
    {
        let written = v == initial
            || records.iter().any(|r| {
                r.invoke <= cut && matches!(r.op, Op::Write(w) | Op::Cas { new: w, .. } if w == v)
            });
        if !written {
            let _ = writeln!(
                out,
                "  {v} is not the initial value and no op invoked by t={cut} writes it"
            );
        }
    }

    let problem = if minimized {
        Problem::prefix(records, &returns, k, initial)
    } else {
        Problem::new(records, |_, rec| full_status(rec), initial)
    };
    let mut search = Search::new(&problem, max_steps, true);
    if !matches!(search.run(), Verdict::Violation) {
        // Cannot happen with the same budget; keep what we have rather than panic.
        return out;
    }
    const TAIL: usize = 8;
    let best = search.best_path;
    let _ = writeln!(
        out,
        "longest partial linearization found places {} of {} answered ops{}:",
        search.best_done,
        problem.completed,
        if best.len() > TAIL {
            format!(" (last {TAIL} of {} placements shown)", best.len())
        } else {
            String::new()
        }
    );
    let mut replay = Search::new(&problem, u64::MAX, false);
    for (n, &i) in best.iter().enumerate() {
        replay.place(i as usize);
        if n + TAIL >= best.len() {
            let it = &problem.items[i as usize];
            let _ = writeln!(
                out,
                "  {}  => register {}",
                describe(records, it.id, it.completed),
                replay.value
            );
        }
    }
    if best.is_empty() {
        let _ = writeln!(out, "  (nothing)  => register {}", replay.value);
    }
    let _ = writeln!(
        out,
        "then none of the answered ops that could go next agrees with register {}:",
        replay.value
    );
    let deadline = replay.deadline();
    for i in replay.next_inv..problem.completed {
        let it = &problem.items[i];
        if it.inv > deadline {
            break;
        }
        if replay.ready(i, deadline) {
            let _ = writeln!(out, "  {}", describe(records, it.id, true));
        }
    }
    out
}

/// One line about an op, e.g. `#7 (client 2) read = 5, invoked t=10, returned t=14`.
/// `answered` is false when the search treats the op as unanswered.
fn describe(records: &[Record], id: OpId, answered: bool) -> String {
    let rec = &records[id.0];
    let op = match rec.op {
        Op::Read => "read".to_string(),
        Op::Write(v) => format!("write({v})"),
        Op::Cas { expected, new } => format!("cas({expected} -> {new})"),
    };
    let end = match rec.outcome {
        Outcome::Completed { time, result } if answered => {
            let shown = match result {
                OpResult::Read(v) => format!(" = {v}"),
                OpResult::Write => String::new(),
                OpResult::Cas(ok) => format!(" = {ok}"),
            };
            format!("{shown}, invoked t={}, returned t={time}", rec.invoke)
        }
        Outcome::Completed { time, .. } => format!(
            ", invoked t={}, answered at t={time} after the prefix (so unanswered here)",
            rec.invoke
        ),
        Outcome::Pending | Outcome::Unknown => {
            format!(", invoked t={}, never answered", rec.invoke)
        }
    };
    format!("{id} (client {}) {op}{end}", rec.client)
}

/// FxHash-style hasher: the memo is hashed on every branch point and SipHash
/// would be a measurable share of the search; keys are not attacker-chosen.
#[derive(Default)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::time::{Duration, Instant};

    const BUDGET: u64 = 1_000_000;

    /// Adds an answered op.
    fn ok(h: &mut History, client: ClientId, op: Op, inv: u64, result: OpResult, ret: u64) -> OpId {
        let id = h.invoke(client, op, inv);
        h.complete(id, result, ret);
        id
    }

    /// Adds an op the client gave up on.
    fn lost(h: &mut History, client: ClientId, op: Op, inv: u64) -> OpId {
        let id = h.invoke(client, op, inv);
        h.timeout(id);
        id
    }

    fn assert_linearizable(h: &History, initial: u64) {
        match check(h, initial, BUDGET) {
            CheckResult::Linearizable => {}
            other => panic!("expected linearizable, got {other:?}\n{:#?}", h.records()),
        }
    }

    fn assert_violation(h: &History, initial: u64) -> String {
        match check(h, initial, BUDGET) {
            CheckResult::NotLinearizable { explanation } => explanation,
            other => panic!("expected a violation, got {other:?}\n{:#?}", h.records()),
        }
    }

    /// The explanation blames `id` as the op closing the shortest violating prefix.
    fn assert_blames(explanation: &str, id: OpId) {
        let first_line = explanation.lines().next().unwrap_or_default();
        assert!(
            first_line.contains(&format!("up to the return of {id} at")),
            "expected {id} to be blamed:\n{explanation}"
        );
    }

    use Op::{Cas, Read, Write};

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(&History::new(), 0);
    }

    #[test]
    fn sequential_valid_history() {
        let mut h = History::new();
        ok(&mut h, 1, Read, 0, OpResult::Read(5), 1);
        ok(&mut h, 1, Write(1), 2, OpResult::Write, 3);
        ok(&mut h, 2, Read, 4, OpResult::Read(1), 5);
        ok(
            &mut h,
            1,
            Cas {
                expected: 1,
                new: 2,
            },
            6,
            OpResult::Cas(true),
            7,
        );
        ok(
            &mut h,
            2,
            Cas {
                expected: 1,
                new: 3,
            },
            8,
            OpResult::Cas(false),
            9,
        );
        ok(&mut h, 3, Read, 10, OpResult::Read(2), 11);
        assert_linearizable(&h, 5);
        // Same ops, but the register started elsewhere: the first read is wrong.
        let explanation = assert_violation(&h, 0);
        assert_blames(&explanation, OpId(0));
    }

    #[test]
    fn concurrent_overlapping_ops_can_be_reordered() {
        let mut h = History::new();
        // Client 1's write overlaps client 2's read that already sees it and
        // client 3's read that does not yet: write must fall inside [2, 5].
        ok(&mut h, 1, Write(1), 0, OpResult::Write, 10);
        ok(&mut h, 2, Read, 1, OpResult::Read(1), 5);
        ok(&mut h, 3, Read, 2, OpResult::Read(0), 12);
        // Two overlapping writes take effect in the opposite order of invocation.
        ok(&mut h, 1, Write(2), 20, OpResult::Write, 30);
        ok(&mut h, 2, Write(3), 21, OpResult::Write, 31);
        ok(&mut h, 3, Read, 32, OpResult::Read(2), 33);
        assert_linearizable(&h, 0);
    }

    #[test]
    fn stale_read_after_completed_write_is_a_violation() {
        let mut h = History::new();
        ok(&mut h, 1, Write(1), 0, OpResult::Write, 5);
        let stale = ok(&mut h, 2, Read, 6, OpResult::Read(0), 7);
        let explanation = assert_violation(&h, 0);
        assert_blames(&explanation, stale);
        assert!(explanation.contains("register 1"), "{explanation}");
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let mut h = History::new();
        ok(&mut h, 1, Write(1), 0, OpResult::Write, 5);
        let bogus = ok(&mut h, 2, Read, 2, OpResult::Read(42), 7);
        ok(&mut h, 1, Write(42), 8, OpResult::Write, 9);
        let explanation = assert_violation(&h, 0);
        assert_blames(&explanation, bogus);
        assert!(
            explanation.contains("42 is not the initial value and no op invoked by t=7 writes it"),
            "{explanation}"
        );
    }

    #[test]
    fn cas_results_must_agree_with_the_register() {
        let cas01 = Cas {
            expected: 0,
            new: 1,
        };
        // Two concurrent CAS(0 -> 1): exactly one may win.
        let mut h = History::new();
        ok(&mut h, 1, cas01, 0, OpResult::Cas(true), 10);
        ok(&mut h, 2, cas01, 1, OpResult::Cas(false), 11);
        ok(&mut h, 3, Read, 12, OpResult::Read(1), 13);
        assert_linearizable(&h, 0);

        let mut h = History::new();
        ok(&mut h, 1, cas01, 0, OpResult::Cas(true), 10);
        ok(&mut h, 2, cas01, 1, OpResult::Cas(true), 11);
        assert_violation(&h, 0);

        // A CAS that failed although the register certainly held `expected`.
        let mut h = History::new();
        ok(&mut h, 1, Write(5), 0, OpResult::Write, 1);
        let failed = ok(
            &mut h,
            2,
            Cas {
                expected: 5,
                new: 6,
            },
            2,
            OpResult::Cas(false),
            3,
        );
        assert_blames(&assert_violation(&h, 0), failed);

        // ...unless a concurrent write may have changed it first.
        ok(&mut h, 3, Write(7), 2, OpResult::Write, 4);
        assert_linearizable(&h, 0);

        // A CAS that succeeded although the register certainly did not hold `expected`.
        let mut h = History::new();
        ok(&mut h, 1, Write(5), 0, OpResult::Write, 1);
        let won = ok(
            &mut h,
            2,
            Cas {
                expected: 4,
                new: 6,
            },
            2,
            OpResult::Cas(true),
            3,
        );
        assert_blames(&assert_violation(&h, 0), won);

        // A successful CAS's new value must be visible afterwards.
        let mut h = History::new();
        ok(&mut h, 1, cas01, 0, OpResult::Cas(true), 1);
        let read = ok(&mut h, 2, Read, 2, OpResult::Read(0), 3);
        assert_blames(&assert_violation(&h, 0), read);
    }

    #[test]
    fn unknown_write_that_must_have_happened_is_linearizable() {
        let mut h = History::new();
        lost(&mut h, 1, Write(7), 0);
        ok(&mut h, 2, Read, 10, OpResult::Read(7), 11);
        ok(&mut h, 2, Read, 12, OpResult::Read(7), 13);
        assert_linearizable(&h, 0);
    }

    #[test]
    fn unknown_write_may_take_effect_after_the_client_moved_on() {
        let mut h = History::new();
        lost(&mut h, 1, Write(7), 0);
        // The client's own next op and another client still see the old value...
        ok(&mut h, 1, Read, 20, OpResult::Read(0), 21);
        ok(&mut h, 2, Read, 22, OpResult::Read(0), 23);
        // ...and only then does the delayed write land.
        ok(&mut h, 2, Read, 30, OpResult::Read(7), 31);
        assert_linearizable(&h, 0);
    }

    #[test]
    fn unknown_write_that_never_happened_is_linearizable() {
        let mut h = History::new();
        lost(&mut h, 1, Write(7), 0);
        ok(&mut h, 1, Write(8), 20, OpResult::Write, 21);
        ok(&mut h, 2, Read, 22, OpResult::Read(8), 23);
        ok(&mut h, 3, Read, 24, OpResult::Read(8), 25);
        assert_linearizable(&h, 0);
    }

    #[test]
    fn unknown_write_read_before_its_invocation_is_a_violation() {
        let mut h = History::new();
        let early = ok(&mut h, 2, Read, 0, OpResult::Read(7), 5);
        lost(&mut h, 1, Write(7), 10);
        let explanation = assert_violation(&h, 0);
        assert_blames(&explanation, early);
    }

    #[test]
    fn unknown_write_can_take_effect_at_most_once() {
        // 0 -> 7 (lost write) -> 8 -> 7 would need the lost write to land twice.
        let mut h = History::new();
        lost(&mut h, 1, Write(7), 0);
        ok(&mut h, 2, Read, 10, OpResult::Read(7), 11);
        ok(&mut h, 2, Write(8), 12, OpResult::Write, 13);
        let again = ok(&mut h, 3, Read, 14, OpResult::Read(7), 15);
        assert_blames(&assert_violation(&h, 0), again);
    }

    #[test]
    fn unknown_cas_only_takes_effect_if_it_could_succeed() {
        let mut h = History::new();
        lost(
            &mut h,
            1,
            Cas {
                expected: 0,
                new: 5,
            },
            0,
        );
        ok(&mut h, 2, Read, 10, OpResult::Read(5), 11);
        assert_linearizable(&h, 0);

        // The register held 1 from before the CAS was invoked, so it cannot win.
        let mut h = History::new();
        ok(&mut h, 2, Write(1), 0, OpResult::Write, 1);
        lost(
            &mut h,
            1,
            Cas {
                expected: 0,
                new: 5,
            },
            2,
        );
        let read = ok(&mut h, 2, Read, 10, OpResult::Read(5), 11);
        assert_blames(&assert_violation(&h, 0), read);
    }

    #[test]
    fn in_flight_ops_at_the_end_are_unknown_and_reads_are_dropped() {
        let mut h = History::new();
        h.invoke(1, Write(3), 0);
        // An unanswered read with an impossible "result" cannot exist; it is just ignored.
        h.invoke(2, Read, 1);
        ok(&mut h, 3, Read, 5, OpResult::Read(3), 6);
        assert_linearizable(&h, 0);
        // A timed-out read is ignored the same way.
        let mut h = History::new();
        lost(&mut h, 1, Read, 0);
        ok(&mut h, 1, Read, 5, OpResult::Read(0), 6);
        assert_linearizable(&h, 0);
    }

    #[test]
    fn same_tick_is_concurrent_across_clients_but_ordered_within_a_client() {
        // Client 2's read is invoked at the tick client 1's write returns: it may
        // have been linearized before the write.
        let mut h = History::new();
        ok(&mut h, 1, Write(1), 0, OpResult::Write, 5);
        ok(&mut h, 2, Read, 5, OpResult::Read(0), 6);
        assert_linearizable(&h, 0);
        // Client 1's own next op comes after its write, whatever the tick.
        let mut h = History::new();
        ok(&mut h, 1, Write(1), 0, OpResult::Write, 5);
        let own = ok(&mut h, 1, Read, 5, OpResult::Read(0), 6);
        assert_blames(&assert_violation(&h, 0), own);
    }

    #[test]
    fn explanation_names_the_first_op_that_breaks_the_history() {
        let mut h = History::new();
        for i in 0..20u64 {
            ok(
                &mut h,
                i % 3,
                Write(i + 1),
                10 * i,
                OpResult::Write,
                10 * i + 4,
            );
            ok(
                &mut h,
                i % 3 + 10,
                Read,
                10 * i + 5,
                OpResult::Read(i + 1),
                10 * i + 9,
            );
        }
        // Reads 3 after 20 was written and completed...
        let stale = ok(&mut h, 1, Read, 200, OpResult::Read(3), 201);
        // ...and later ops also conflict, but the blame goes to the first.
        ok(&mut h, 2, Read, 202, OpResult::Read(4), 203);
        let explanation = assert_violation(&h, 0);
        assert_blames(&explanation, stale);
        assert!(
            explanation.contains("first 41 of 42 returns"),
            "{explanation}"
        );
        assert!(
            explanation.contains("places 40 of 41 answered ops"),
            "{explanation}"
        );
    }

    #[test]
    fn search_budget_yields_inconclusive_instead_of_hanging() {
        // Six overlapping writes and a read of the first one's value: the search
        // has to try orders before it finds one that ends with write(1).
        let mut h = History::new();
        for c in 0..6u64 {
            ok(&mut h, c, Write(c + 1), c, OpResult::Write, 10);
        }
        ok(&mut h, 9, Read, 11, OpResult::Read(1), 12);
        assert_eq!(check(&h, 0, 3), CheckResult::Inconclusive);
        assert_eq!(check(&h, 0, BUDGET), CheckResult::Linearizable);
    }

    #[test]
    fn many_concurrent_writes_with_an_impossible_read_are_refuted() {
        // 10! orders of the writes could precede the read; memoizing on (placed
        // set, value) cuts that to 10 * 2^9 configurations.
        let mut h = History::new();
        for c in 0..10u64 {
            ok(&mut h, c, Write(c + 1), c, OpResult::Write, 100);
        }
        ok(&mut h, 99, Read, 101, OpResult::Read(1000), 102);
        assert_violation(&h, 0);
    }

    #[test]
    #[should_panic(expected = "still in flight")]
    fn a_client_cannot_have_two_ops_in_flight() {
        let mut h = History::new();
        h.invoke(1, Read, 0);
        h.invoke(1, Read, 1);
    }

    #[test]
    #[should_panic(expected = "returned Cas(true)")]
    fn results_must_match_the_op_kind() {
        let mut h = History::new();
        let id = h.invoke(1, Write(1), 0);
        h.complete(id, OpResult::Cas(true), 1);
    }

    // ---- randomized histories from real sequential executions ----

    struct GenConfig {
        clients: usize,
        ops: usize,
        /// Percentage of ops whose client gives up (for writes and CASes: lost
        /// or delayed effect; for reads: dropped).
        lost_pct: u32,
        /// `None`: every write / CAS writes a fresh value. `Some(n)`: values in `0..n`.
        values: Option<u64>,
    }

    #[derive(Clone, Copy)]
    enum Shape {
        Read,
        Write,
        Cas,
    }

    struct Planned {
        client: ClientId,
        shape: Shape,
        inv: u64,
        /// When it takes effect; `None` if it never does (only for lost ops).
        lin: Option<u64>,
        /// Return time; `None` if the client gives up.
        ret: Option<u64>,
        op: Op,
        result: Option<OpResult>,
    }

    fn value(rng: &mut ChaCha8Rng, fresh: &mut u64, values: Option<u64>) -> u64 {
        match values {
            None => {
                *fresh += 1;
                *fresh
            }
            Some(n) => rng.random_range(0..n),
        }
    }

    /// A history produced by actually running ops against a sequential register
    /// at a random point inside each op's interval. Initial value is 0; fresh
    /// values start at 1001, so in fresh-value mode no value is written twice.
    fn generate(seed: u64, cfg: &GenConfig) -> (History, Vec<Planned>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut clock: Vec<u64> = (0..cfg.clients).map(|_| rng.random_range(0..5)).collect();
        let mut plan = Vec::with_capacity(cfg.ops);
        for _ in 0..cfg.ops {
            // The client that became idle first goes next, so clients interleave.
            let c = (0..cfg.clients).min_by_key(|&c| clock[c]).expect("clients");
            let inv = clock[c] + rng.random_range(0..3);
            let shape = match rng.random_range(0..10) {
                0..=4 => Shape::Read,
                5..=7 => Shape::Write,
                _ => Shape::Cas,
            };
            let (lin, ret) = if rng.random_range(0..100) < cfg.lost_pct {
                clock[c] = inv + 20; // the client's timeout
                let lin = rng.random_bool(0.5).then(|| inv + rng.random_range(0..60));
                (lin, None)
            } else {
                let lin = inv + rng.random_range(0..8);
                let ret = lin + rng.random_range(1..8);
                clock[c] = ret;
                (Some(lin), Some(ret))
            };
            plan.push(Planned {
                client: c as ClientId,
                shape,
                inv,
                lin,
                ret,
                op: Op::Read,
                result: None,
            });
        }
        // Execute in linearization-point order. If a returned before b was
        // invoked then a.lin < b.lin, so this order respects real time.
        let mut order: Vec<usize> = (0..plan.len()).collect();
        order.sort_by_key(|&i| (plan[i].lin.is_none(), plan[i].lin, i));
        let mut register = 0u64;
        let mut fresh = 1000u64;
        for i in order {
            let takes_effect = plan[i].lin.is_some();
            let (op, result) = match plan[i].shape {
                Shape::Read => (Op::Read, OpResult::Read(register)),
                Shape::Write => {
                    let v = value(&mut rng, &mut fresh, cfg.values);
                    if takes_effect {
                        register = v;
                    }
                    (Op::Write(v), OpResult::Write)
                }
                Shape::Cas => {
                    let expected = if rng.random_bool(0.6) {
                        register
                    } else {
                        value(&mut rng, &mut fresh, cfg.values)
                    };
                    let new = value(&mut rng, &mut fresh, cfg.values);
                    let success = expected == register;
                    if takes_effect && success {
                        register = new;
                    }
                    (Op::Cas { expected, new }, OpResult::Cas(success))
                }
            };
            plan[i].op = op;
            plan[i].result = plan[i].ret.map(|_| result);
        }
        let mut h = History::new();
        for p in &plan {
            let id = h.invoke(p.client, p.op, p.inv);
            match (p.ret, p.result) {
                (Some(ret), Some(result)) => h.complete(id, result, ret),
                _ => h.timeout(id),
            }
        }
        (h, plan)
    }

    fn set_read_result(h: &History, id: OpId, v: u64) -> History {
        let mut h = h.clone();
        match &mut h.records[id.0].outcome {
            Outcome::Completed { result, .. } => *result = OpResult::Read(v),
            other => panic!("{id} is not an answered read: {other:?}"),
        }
        h
    }

    #[test]
    fn real_executions_are_linearizable() {
        let configs = [
            GenConfig {
                clients: 3,
                ops: 40,
                lost_pct: 10,
                values: Some(3),
            },
            GenConfig {
                clients: 5,
                ops: 120,
                lost_pct: 5,
                values: None,
            },
            GenConfig {
                clients: 5,
                ops: 120,
                lost_pct: 5,
                values: Some(4),
            },
            GenConfig {
                clients: 8,
                ops: 100,
                lost_pct: 20,
                values: Some(5),
            },
        ];
        for (n, cfg) in configs.iter().enumerate() {
            for seed in 0..100 {
                let (h, _) = generate(seed, cfg);
                assert!(
                    check(&h, 0, BUDGET).is_linearizable(),
                    "config {n} seed {seed}: {:?}",
                    check(&h, 0, BUDGET)
                );
            }
        }
    }

    #[test]
    fn mutated_reads_are_detected() {
        let cfg = GenConfig {
            clients: 5,
            ops: 120,
            lost_pct: 5,
            values: None,
        };
        let (mut never_written, mut overwritten) = (0, 0);
        for seed in 0..40 {
            let (h, plan) = generate(seed, &cfg);
            let answered = |p: &Planned| p.ret.is_some();
            // Ops that certainly changed the register: answered writes and winning CASes.
            let setters: Vec<(u64, u64, u64)> = plan
                .iter()
                .filter(|p| answered(p))
                .filter_map(|p| match (p.op, p.result) {
                    (Op::Write(v), _) | (Op::Cas { new: v, .. }, Some(OpResult::Cas(true))) => {
                        Some((p.inv, p.ret.expect("answered"), v))
                    }
                    _ => None,
                })
                .collect();
            for (i, p) in plan.iter().enumerate() {
                let (Some(OpResult::Read(seen)), inv) = (p.result, p.inv) else {
                    continue;
                };
                let id = OpId(i);
                // 1. A value nobody ever wrote.
                if i % 7 == 0 {
                    let explanation = assert_violation(&set_read_result(&h, id, 999), 0);
                    assert_blames(&explanation, id);
                    never_written += 1;
                }
                // 2. A value that was certainly overwritten before the read began:
                // w1 returned before w2 was invoked, w2 returned before the read
                // was invoked, and with fresh values only w1 ever wrote w1's value.
                let Some(&(w2_inv, _, _)) = setters
                    .iter()
                    .filter(|&&(_, ret, _)| ret < inv)
                    .max_by_key(|&&(w_inv, _, _)| w_inv)
                else {
                    continue;
                };
                let Some(&(_, _, stale)) = setters
                    .iter()
                    .filter(|&&(_, ret, _)| ret < w2_inv)
                    .max_by_key(|&&(_, ret, _)| ret)
                else {
                    continue;
                };
                if stale == seen || i % 3 != 0 {
                    continue;
                }
                let explanation = assert_violation(&set_read_result(&h, id, stale), 0);
                assert_blames(&explanation, id);
                overwritten += 1;
            }
        }
        // Guard against the loops above silently testing nothing.
        assert!(
            never_written > 50 && overwritten > 50,
            "{never_written} {overwritten}"
        );
    }

    /// Exhaustive reference checker: tries every order, no memo or pruning.
    /// `a` must precede `b` iff `a` was answered and returned before `b` was
    /// invoked, or `a` is an earlier op of the same client.
    fn brute_force(h: &History, initial: u64) -> bool {
        struct B {
            client: ClientId,
            op: Op,
            inv: u64,
            ret: Option<u64>,
            result: Option<OpResult>,
        }
        let ops: Vec<B> = h
            .records()
            .iter()
            .filter_map(|r| {
                let (ret, result) = match r.outcome {
                    Outcome::Completed { time, result } => (Some(time), Some(result)),
                    _ if r.op == Op::Read => return None,
                    _ => (None, None),
                };
                Some(B {
                    client: r.client,
                    op: r.op,
                    inv: r.invoke,
                    ret,
                    result,
                })
            })
            .collect();
        let precedes = |a: usize, b: usize| match ops[a].ret {
            Some(ret) => ret < ops[b].inv || (ops[a].client == ops[b].client && a < b),
            None => false,
        };
        fn go(
            ops: &[B],
            precedes: &dyn Fn(usize, usize) -> bool,
            placed: &mut [bool],
            value: u64,
        ) -> bool {
            if (0..ops.len()).all(|i| placed[i] || ops[i].ret.is_none()) {
                return true;
            }
            for x in 0..ops.len() {
                if placed[x] || (0..ops.len()).any(|y| y != x && !placed[y] && precedes(y, x)) {
                    continue;
                }
                let next = match (ops[x].op, ops[x].result) {
                    (Op::Read, Some(OpResult::Read(v))) => (v == value).then_some(value),
                    (Op::Write(v), _) => Some(v),
                    (Op::Cas { expected, new }, Some(OpResult::Cas(ok))) => {
                        ((value == expected) == ok).then_some(if ok { new } else { value })
                    }
                    (Op::Cas { expected, new }, None) => {
                        Some(if value == expected { new } else { value })
                    }
                    _ => None,
                };
                if let Some(next) = next {
                    placed[x] = true;
                    if go(ops, precedes, placed, next) {
                        return true;
                    }
                    placed[x] = false;
                }
            }
            false
        }
        go(&ops, &precedes, &mut vec![false; ops.len()], initial)
    }

    /// Small random histories with arbitrary (often wrong) results, same-tick
    /// ties, lost and in-flight ops.
    fn random_small_history(rng: &mut ChaCha8Rng) -> History {
        let clients = rng.random_range(2..=3);
        let mut clock: Vec<u64> = (0..clients).map(|_| rng.random_range(0..3)).collect();
        let mut stopped = vec![false; clients];
        let mut h = History::new();
        for _ in 0..rng.random_range(3..=7) {
            let c = rng.random_range(0..clients);
            if stopped[c] {
                continue;
            }
            let inv = clock[c] + rng.random_range(0..3);
            let (op, result) = match rng.random_range(0..3) {
                0 => (Op::Read, OpResult::Read(rng.random_range(0..3))),
                1 => (Op::Write(rng.random_range(0..3)), OpResult::Write),
                _ => (
                    Op::Cas {
                        expected: rng.random_range(0..3),
                        new: rng.random_range(0..3),
                    },
                    OpResult::Cas(rng.random_bool(0.5)),
                ),
            };
            let id = h.invoke(c as ClientId, op, inv);
            match rng.random_range(0..20) {
                0..=4 => {
                    h.timeout(id);
                    clock[c] = inv + rng.random_range(0..3);
                }
                5 => stopped[c] = true, // still in flight when the history ends
                _ => {
                    let ret = inv + rng.random_range(1..5);
                    h.complete(id, result, ret);
                    clock[c] = ret;
                }
            }
        }
        h
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut linearizable, mut violations) = (0, 0);
        for n in 0..5000 {
            let h = random_small_history(&mut rng);
            let initial = rng.random_range(0..3);
            let expected = brute_force(&h, initial);
            let got = check(&h, initial, BUDGET);
            assert_eq!(
                got.is_linearizable(),
                expected,
                "history {n} (initial {initial}): checker says {got:?}\n{:#?}",
                h.records()
            );
            assert_ne!(got, CheckResult::Inconclusive);
            if expected {
                linearizable += 1;
            } else {
                violations += 1;
            }
        }
        println!("small random histories: {linearizable} linearizable, {violations} violations");
        assert!(
            linearizable > 500 && violations > 500,
            "{linearizable} {violations}"
        );
    }

    #[test]
    fn three_hundred_ops_five_clients_check_quickly() {
        for (label, values) in [("fresh values", None), ("values in 0..4", Some(4))] {
            let cfg = GenConfig {
                clients: 5,
                ops: 300,
                lost_pct: 3,
                values,
            };
            let (mut total, mut worst) = (Duration::ZERO, Duration::ZERO);
            let (mut lost, mut max_steps) = (0, 0);
            let seeds = 100;
            for seed in 0..seeds {
                let (h, plan) = generate(seed, &cfg);
                lost += plan.iter().filter(|p| p.ret.is_none()).count();
                let start = Instant::now();
                let result = check(&h, 0, BUDGET);
                let elapsed = start.elapsed();
                assert_eq!(result, CheckResult::Linearizable, "seed {seed}");
                total += elapsed;
                worst = worst.max(elapsed);

                // Wall time is noisy on shared machines; the step count is not.
                // About one step per op is the ideal; allowing ~16x guards the
                // pruning (without the lost-op filter some seeds need 5-12k).
                let problem = Problem::new(&h.records, |_, rec| full_status(rec), 0);
                let mut search = Search::new(&problem, BUDGET, false);
                assert!(matches!(search.run(), Verdict::Linearizable));
                assert!(search.steps <= 5_000, "seed {seed}: {} steps", search.steps);
                max_steps = max_steps.max(search.steps);
            }
            println!(
                "300 ops / 5 clients, {label}, ~{} ops without answer per history: \
                 mean {:?}, worst {:?}, most search steps {max_steps}",
                lost / seeds as usize,
                total / seeds as u32,
                worst
            );
        }
    }
}
