//! A tiny deterministic cluster harness for scenario tests of the raft core.
//!
//! N `RaftNode`s of group 1 exchange messages through an in-memory queue
//! that the test controls (deliver, drop, cut directed links, filter) and
//! persist to an instant in-memory "disk". Durability of a node's writes can
//! be stalled to observe what the core does before its own write is durable.

#![allow(dead_code)]

use bytes::Bytes;
use raftlog::core::{
    Configuration, Entry, EntryKind, Event, HardState, Index, Message, MessageBody, NodeId,
    RaftConfig, RaftNode, Restore, Role, SnapshotMeta, SplitMix64, Term,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub const GROUP: u64 = 1;

/// Drops the messages it matches.
pub type Filter = Box<dyn Fn(&Message) -> bool>;
/// Edits a message in flight.
pub type Rewrite = Box<dyn Fn(&mut Message)>;

/// What a node's host has made durable.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    pub compacted: (Index, Term),
    /// Entries after `compacted`, consecutive.
    pub entries: Vec<Entry>,
    pub snapshot: Option<SnapshotMeta>,
}

impl Disk {
    pub fn last_index(&self) -> Index {
        self.entries.last().map_or(self.compacted.0, |e| e.index)
    }

    fn term(&self, index: Index) -> Option<Term> {
        if index == self.compacted.0 {
            return Some(self.compacted.1);
        }
        self.entries
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.term)
    }

    /// Storage contract: compacting to a point whose term does not match
    /// discards the whole log.
    fn compact(&mut self, index: Index, term: Term) {
        if self.term(index) == Some(term) {
            self.entries.retain(|e| e.index > index);
        } else {
            self.entries.clear();
        }
        self.compacted = (index, term);
    }

    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index > self.compacted.0 && first.index <= self.last_index() + 1,
            "disk append of {} does not attach to the log (compacted {:?}, last {})",
            first.index,
            self.compacted,
            self.last_index()
        );
        self.entries.retain(|e| e.index < first.index);
        self.entries.extend(entries.iter().cloned());
    }

    pub fn restore(&self, bootstrap: Configuration) -> Restore {
        Restore {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            compacted: self.compacted,
            entries: self.entries.clone(),
            bootstrap,
            new_disk: 0,
        }
    }
}

/// Per-node host state kept by the harness.
#[derive(Default)]
pub struct Host {
    pub disk: Disk,
    /// Write seqs persisted but not yet reported durable (disk stalled).
    pub undurable: Vec<u64>,
    pub stalled: bool,
    pub applied: Vec<Entry>,
    pub events: Vec<Event>,
    /// Snapshots the core asked to install, not yet installed.
    pub to_install: Option<SnapshotMeta>,
    /// Whether `to_install` is installed at once (default) or held.
    pub hold_snapshots: bool,
    pub down: bool,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, RaftNode>,
    pub hosts: BTreeMap<NodeId, Host>,
    pub cfgs: BTreeMap<NodeId, RaftConfig>,
    pub bootstrap: Configuration,
    pub queue: VecDeque<Message>,
    /// Directed links (from, to) that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Every message delivered or dropped, in send order.
    pub sent: Vec<Message>,
    /// Messages matching this predicate are dropped.
    pub filter: Option<Filter>,
    /// Applied to every message that gets through (e.g. to strip entries).
    pub rewrite: Option<Rewrite>,
    /// When false, messages stay queued until the test delivers them.
    pub auto_deliver: bool,
    seed: u64,
    /// Disk ids handed to nodes that start on new storage, so far.
    disks_made: u64,
}

pub fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

pub fn data(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

impl Cluster {
    /// `n` voters with ids 1..=n, all with `cfg`.
    pub fn new(n: u64, cfg: RaftConfig, seed: u64) -> Cluster {
        let ids: Vec<NodeId> = (1..=n).collect();
        Cluster::with_members(&ids, &ids, cfg, seed)
    }

    /// Nodes `ids`, bootstrapped with `bootstrap_voters` (nodes outside it
    /// start with an empty configuration and wait to be added).
    pub fn with_members(
        ids: &[NodeId],
        bootstrap_voters: &[NodeId],
        cfg: RaftConfig,
        seed: u64,
    ) -> Cluster {
        let bootstrap = Configuration::new(bootstrap_voters.iter().copied());
        let mut c = Cluster {
            nodes: BTreeMap::new(),
            hosts: BTreeMap::new(),
            cfgs: BTreeMap::new(),
            bootstrap: bootstrap.clone(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            sent: Vec::new(),
            filter: None,
            rewrite: None,
            auto_deliver: true,
            seed,
            disks_made: 0,
        };
        for &id in ids {
            let conf = if bootstrap_voters.contains(&id) {
                bootstrap.clone()
            } else {
                Configuration::default()
            };
            let restore = Restore {
                bootstrap: conf,
                ..Default::default()
            };
            c.start_with(id, cfg.clone(), restore);
        }
        c
    }

    /// (Re)starts node `id` from `restore`.
    /// A node starting on new storage (no disk id in its hard state) gets a
    /// disk id never used before in this cluster.
    pub fn start_with(&mut self, id: NodeId, cfg: RaftConfig, mut restore: Restore) {
        if restore.hard_state.disk == 0 && restore.new_disk == 0 {
            self.disks_made += 1;
            restore.new_disk = (id << 32) | self.disks_made;
        }
        let rng = SplitMix64(self.seed.wrapping_mul(1000).wrapping_add(id));
        let node = RaftNode::new(GROUP, id, cfg.clone(), Box::new(rng), restore.clone())
            .expect("valid node");
        let disk = Disk {
            hard_state: restore.hard_state,
            compacted: restore.snapshot.as_ref().map_or(restore.compacted, |s| {
                if s.index > restore.compacted.0 {
                    (s.index, s.term)
                } else {
                    restore.compacted
                }
            }),
            entries: restore.entries.clone(),
            snapshot: restore.snapshot.clone(),
        };
        let mut disk = disk;
        let c = disk.compacted.0;
        disk.entries.retain(|e| e.index > c);
        self.nodes.insert(id, node);
        self.hosts.insert(
            id,
            Host {
                disk,
                ..Default::default()
            },
        );
        self.cfgs.insert(id, cfg);
    }

    /// Restarts `id` from what its disk holds (unsynced writes are lost).
    pub fn restart(&mut self, id: NodeId) {
        let restore = self.hosts[&id].disk.restore(self.bootstrap.clone());
        let cfg = self.cfgs[&id].clone();
        self.start_with(id, cfg, restore);
    }

    /// Restarts `id` on new, empty storage (its disk was replaced or its data
    /// directory deleted), with the cluster's bootstrap configuration as a host
    /// restarted with the same settings would: it gets a new disk id.
    pub fn wipe(&mut self, id: NodeId) {
        let restore = Restore {
            bootstrap: self.bootstrap.clone(),
            ..Default::default()
        };
        let cfg = self.cfgs[&id].clone();
        self.start_with(id, cfg, restore);
    }

    pub fn node(&self, id: NodeId) -> &RaftNode {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut RaftNode {
        self.nodes.get_mut(&id).expect("node")
    }

    pub fn host(&self, id: NodeId) -> &Host {
        &self.hosts[&id]
    }

    pub fn host_mut(&mut self, id: NodeId) -> &mut Host {
        self.hosts.get_mut(&id).expect("host")
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    // ------------------------------------------------------------------
    // Network
    // ------------------------------------------------------------------

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    /// Isolates `id` from every other node.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.ids().into_iter().filter(|x| *x != id).collect();
        self.partition(&[id], &others);
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    fn link_up(&self, m: &Message) -> bool {
        !self.cut.contains(&(m.from, m.to))
            && self.hosts.get(&m.to).is_some_and(|h| !h.down)
            && self.hosts.get(&m.from).is_some_and(|h| !h.down)
            && !self.filter.as_ref().is_some_and(|f| f(m))
    }

    // ------------------------------------------------------------------
    // Host loop
    // ------------------------------------------------------------------

    /// Drains node `id`'s Ready until it has nothing more: persists the
    /// write, reports it durable (unless stalled), queues messages, records
    /// applied entries and events, installs snapshots.
    pub fn process(&mut self, id: NodeId) {
        if self.hosts[&id].down {
            return;
        }
        for _ in 0..10_000 {
            let node = self.nodes.get_mut(&id).expect("node");
            if !node.has_ready() {
                return;
            }
            let rd = node.ready();
            let host = self.hosts.get_mut(&id).expect("host");
            if let Some(w) = &rd.write {
                if let Some((i, t)) = w.compact {
                    host.disk.compact(i, t);
                }
                host.disk.append(&w.entries);
                if let Some(hs) = w.hard_state {
                    host.disk.hard_state = hs;
                }
                host.undurable.push(w.seq);
            }
            for m in rd.messages {
                assert_eq!(m.from, id);
                self.queue.push_back(m);
            }
            host.applied.extend(rd.committed_entries);
            host.events.extend(rd.events);
            if let Some(meta) = rd.snapshot_to_install {
                host.to_install = Some(meta);
            }
            if !host.stalled {
                if let Some(&seq) = host.undurable.last() {
                    host.undurable.clear();
                    node.on_write_durable(seq);
                }
            }
            if !host.hold_snapshots {
                if let Some(meta) = host.to_install.take() {
                    self.install_snapshot(id, meta);
                }
            }
        }
        panic!("node {id} never ran out of Ready output");
    }

    /// The host of `id` loads and persists `meta`, then tells the core.
    pub fn install_snapshot(&mut self, id: NodeId, meta: SnapshotMeta) {
        let host = self.hosts.get_mut(&id).expect("host");
        host.disk.snapshot = Some(meta.clone());
        self.nodes
            .get_mut(&id)
            .expect("node")
            .on_snapshot_installed(meta);
    }

    /// Stalls (or resumes) the durability of `id`'s writes. Resuming reports
    /// everything written so far durable.
    pub fn set_stalled(&mut self, id: NodeId, stalled: bool) {
        let host = self.hosts.get_mut(&id).expect("host");
        host.stalled = stalled;
        if !stalled {
            if let Some(&seq) = host.undurable.last() {
                host.undurable.clear();
                self.nodes.get_mut(&id).expect("node").on_write_durable(seq);
            }
        }
    }

    pub fn process_all(&mut self) {
        for id in self.ids() {
            self.process(id);
        }
    }

    /// Delivers the next queued message (or drops it per the network).
    /// Returns false when the queue is empty.
    pub fn deliver_one(&mut self) -> bool {
        let Some(m) = self.queue.pop_front() else {
            return false;
        };
        self.sent.push(m.clone());
        if self.link_up(&m) {
            let mut m = m;
            if let Some(rw) = &self.rewrite {
                rw(&mut m);
            }
            let to = m.to;
            if let Some(n) = self.nodes.get_mut(&to) {
                n.step(m);
            }
            self.process(to);
        }
        true
    }

    /// Runs until no node has output and no message is queued.
    pub fn settle(&mut self) {
        for _ in 0..1_000_000 {
            self.process_all();
            if !self.auto_deliver || !self.deliver_one() {
                self.process_all();
                if self.queue.is_empty() || !self.auto_deliver {
                    return;
                }
            }
        }
        panic!("cluster never settled");
    }

    /// Drops every queued message (they are recorded in `sent`).
    pub fn drop_queued(&mut self) {
        self.sent.extend(self.queue.drain(..));
    }

    /// Takes the queued messages out, for the test to inspect or reorder.
    pub fn take_queued(&mut self) -> Vec<Message> {
        self.process_all();
        self.queue.drain(..).collect()
    }

    /// Steps `m` into its destination directly (bypassing the network).
    /// Steps `m` into its recipient. When the sender is a node of this cluster,
    /// the message carries the disk ids that node would put in it (its own, and
    /// the one its configuration binds the recipient to).
    pub fn inject(&mut self, mut m: Message) {
        let to = m.to;
        if let Some(from) = self.nodes.get(&m.from) {
            m.disk = from.disk();
            m.to_disk = from.conf().disk(to);
        }
        self.nodes.get_mut(&to).expect("node").step(m);
        self.process(to);
    }

    /// One tick on every live node (ascending id), then settle.
    pub fn tick(&mut self) {
        for id in self.ids() {
            if !self.hosts[&id].down {
                self.nodes.get_mut(&id).expect("node").tick();
            }
        }
        self.settle();
    }

    pub fn ticks(&mut self, n: u32) {
        for _ in 0..n {
            self.tick();
        }
    }

    /// Ticks only `ids`.
    pub fn tick_only(&mut self, ids: &[NodeId]) {
        for &id in ids {
            self.nodes.get_mut(&id).expect("node").tick();
        }
        self.settle();
    }

    // ------------------------------------------------------------------
    // Queries and helpers
    // ------------------------------------------------------------------

    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(id, n)| n.role() == Role::Leader && !self.hosts[id].down)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn leader(&self) -> Option<NodeId> {
        let l = self.leaders();
        // Several leaders may exist transiently in different terms; take
        // the one with the highest term.
        l.into_iter().max_by_key(|id| self.nodes[id].term())
    }

    /// Ticks until a leader exists (at most `max_ticks`).
    pub fn run_until_leader(&mut self, max_ticks: u32) -> NodeId {
        for _ in 0..max_ticks {
            self.tick();
            if let Some(l) = self.leader() {
                return l;
            }
        }
        panic!("no leader within {max_ticks} ticks");
    }

    /// Elects a leader and lets its no-op commit everywhere.
    pub fn elect(&mut self) -> NodeId {
        let l = self.run_until_leader(200);
        self.settle();
        self.tick();
        l
    }

    /// Proposes `s` on `leader` and settles.
    pub fn propose(&mut self, leader: NodeId, s: &str) -> Index {
        let (idx, _) = self
            .node_mut(leader)
            .propose(data(s), None)
            .expect("proposal accepted");
        self.settle();
        idx
    }

    pub fn events(&self, id: NodeId) -> &[Event] {
        &self.hosts[&id].events
    }

    pub fn clear_events(&mut self) {
        for h in self.hosts.values_mut() {
            h.events.clear();
        }
    }

    pub fn applied_index(&self, id: NodeId) -> Index {
        self.hosts[&id]
            .applied
            .last()
            .map_or(self.nodes[&id].snapshot_meta().index, |e| e.index)
    }

    /// Messages with `pred` among everything sent so far.
    pub fn count_sent(&self, pred: impl Fn(&Message) -> bool) -> usize {
        self.sent.iter().filter(|m| pred(m)).count()
    }
}

pub fn is_append(m: &Message) -> bool {
    matches!(m.body, MessageBody::AppendEntries { .. })
}

pub fn append_len(m: &Message) -> Option<usize> {
    match &m.body {
        MessageBody::AppendEntries { entries, .. } => Some(entries.len()),
        _ => None,
    }
}

pub fn entry(index: Index, term: Term) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("{index}@{term}")),
    }
}

pub fn noop(index: Index, term: Term) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Noop,
        data: Bytes::new(),
    }
}

/// The disk id of the storage [`restore_log`] describes.
pub const RESTORED_DISK: u64 = 0xD15C;

/// A Restore with the given hard state and log (from index 1), on storage
/// with disk id [`RESTORED_DISK`], of a group whose members are all bound
/// to that disk id.
pub fn restore_log(term: Term, vote: NodeId, terms: &[Term], bootstrap: &[NodeId]) -> Restore {
    Restore {
        hard_state: HardState {
            term,
            vote,
            disk: RESTORED_DISK,
        },
        snapshot: None,
        compacted: (0, 0),
        entries: terms
            .iter()
            .enumerate()
            .map(|(i, t)| entry(i as Index + 1, *t))
            .collect(),
        // Members of a running group, each bound to the storage it runs on.
        bootstrap: Configuration {
            disks: bootstrap.iter().map(|id| (*id, RESTORED_DISK)).collect(),
            ..Configuration::new(bootstrap.iter().copied())
        },
        new_disk: 0,
    }
}
