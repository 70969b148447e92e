//! Hibernation of idle block groups (after TiKV's hibernate regions): a node holds thousands of
//! groups, most of them idle at any time, and an idle group that still ticks and heartbeats costs
//! every replica CPU and network for nothing. A hibernating group is not ticked at all, so it
//! sends nothing, until something wakes it.
//!
//! # Going to sleep (per group)
//! 1. A leader counts the ticks its group has been idle and settled: [`RaftNode::quiescent`]
//!    (every follower matches the last entry, which is committed, applied, of the leader's term,
//!    and has acknowledged a heartbeat that carried that commit index; no read, transfer,
//!    membership change or snapshot in flight) and no client request or snapshot send pending on
//!    the core. After `hibernate_idle_ms` of that it stops ticking the group (state `Asking`) and
//!    sends `Sleep { group, term, index, log_term }` to every follower, batched per peer in one
//!    frame of kind [`KIND_HIBERNATE`].
//! 2. A follower that follows that leader in that term and is itself quiescent at the same
//!    `(index, log_term)` (identical, committed, applied log) with no request of its own waiting
//!    for the group stops ticking it and answers `Ack` (batched too). Otherwise it says nothing.
//! 3. With every follower's `Ack` the leader's group is `Asleep`. Without them within half an
//!    election timeout it wakes again (and heartbeats at once, which wakes the followers that did
//!    acknowledge); it tries again after another idle period.
//!
//! # Waking (per group)
//! Any activity wakes a group, on the leader or a follower: a client request (local or
//! forwarded), any raft message for it (a woken leader's heartbeat or append wakes its followers;
//! a restarted follower's pre-vote wakes the leader), a leader that sees one of the group's
//! followers come back after silence. Waking calls [`RaftNode::resume`]: a woken leader does not
//! trust the lease it held before sleeping (its clock stood still while real time went on), so
//! its first read goes through ReadIndex; it heartbeats at once and must hear from a quorum
//! within one election timeout or step down (check-quorum restarts with nobody counted active).
//!
//! # Failure detection (per peer, not per group)
//! A sleeping leader sends no heartbeats, so its followers cannot tell from the group that its
//! node died. Instead every core tracks, per peer, when any frame last arrived from it, and sends
//! a `Ping` (one small frame per peer, for all groups) to every peer that nothing else was sent to
//! for a quarter of an election timeout. When nothing at all has arrived from a peer for an
//! election timeout, every sleeping group of the core whose leader is that peer wakes with
//! `resume(leader_silent = true)`: nothing from the node means nothing from the leader either for
//! that long (measured since this core started), so the follower's election timer counts as
//! expired — it grants votes (stickiness and the start-up vote withholding no longer hold it back)
//! and campaigns within its randomized extra wait. The old leader's lease, bounded by the same
//! election timeout minus the drift margin from a round the follower acknowledged, has run out by
//! then, exactly as if the follower had been ticking.
//!
//! # Degraded groups
//! A follower on a node that is silent (nothing heard for an election timeout) is left out: the
//! leader hibernates the group with the `Ack`s of the others if they and the leader are a
//! majority of the voters ([`RaftNode::quiescent_without`]). When the node is heard from again,
//! the leaders of its groups wake and heartbeat it, and it catches up by ordinary replication.
//! A follower that is alive but lagging still keeps its group awake (no `Ack` at a different
//! log), as does a group without a majority of live voters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use raftlog::core::{GroupId, NodeId, RaftNode, Role};
use tracing::{debug, info};
use transport::{Frame, Lane};

use super::Core;
use crate::codec::{HibernateFrame, HibernateWhat, SleepAt, KIND_HIBERNATE};
use crate::config::EngineConfig;

/// Where a group is in its hibernation cycle.
#[derive(Debug)]
enum Sleep {
    /// Ticked; a leader counts how long it has been idle.
    Awake { idle_ticks: u32 },
    /// Leader: not ticked; asked its followers to hibernate at `at` and waits for the `Ack`s of
    /// `waiting` for at most `ask_ticks_max` core ticks.
    Asking {
        at: SleepAt,
        waiting: BTreeSet<NodeId>,
        ticks: u32,
    },
    /// Not ticked until something wakes it.
    Asleep,
}

/// What this core knows about one peer's liveness.
#[derive(Debug)]
struct PeerLive {
    last_heard: Instant,
    /// Nothing heard for `silence`; the groups it led were woken.
    silent: bool,
    /// The transport's frames-sent count at the last look, and when it last changed.
    frames_sent: u64,
    last_sent: Instant,
}

/// The hibernation state of one core's groups and peers.
#[derive(Debug)]
pub(super) struct Hibernation {
    /// Idle ticks before a leader hibernates its group; 0 = hibernation off.
    idle_ticks: u32,
    ask_ticks_max: u32,
    /// A peer heard nothing from for this long is silent (the election timeout).
    silence: Duration,
    ping_every: Duration,
    groups: BTreeMap<GroupId, Sleep>,
    peers: BTreeMap<NodeId, PeerLive>,
}

impl Hibernation {
    pub fn new(
        cfg: &EngineConfig,
        groups: impl Iterator<Item = GroupId>,
        now: Instant,
    ) -> Hibernation {
        let et = cfg.election_timeout_ticks();
        Hibernation {
            idle_ticks: cfg.hibernate_idle_ticks(),
            ask_ticks_max: (et / 2).max(2),
            silence: Duration::from_millis(cfg.election_timeout_ms),
            ping_every: Duration::from_millis(cfg.election_timeout_ms / 4),
            groups: groups
                .map(|g| (g, Sleep::Awake { idle_ticks: 0 }))
                .collect(),
            // Silence is measured from this core's start: before it, this node may have heard
            // from a leader whose lease still runs.
            peers: cfg
                .peers
                .keys()
                .map(|p| {
                    let live = PeerLive {
                        last_heard: now,
                        silent: false,
                        frames_sent: 0,
                        last_sent: now,
                    };
                    (*p, live)
                })
                .collect(),
        }
    }

    fn enabled(&self) -> bool {
        self.idle_ticks > 0
    }

    /// Peers nothing was heard from for an election timeout.
    fn silent_peers(&self) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.silent)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether the core ticks `bg` (it does not while the group hibernates or asks to).
    pub fn ticks(&self, bg: GroupId) -> bool {
        matches!(self.groups.get(&bg), None | Some(Sleep::Awake { .. }))
    }

    pub fn asleep(&self, bg: GroupId) -> bool {
        matches!(self.groups.get(&bg), Some(Sleep::Asleep))
    }

    /// Wakes `bg` if it hibernates or asks to (see [`RaftNode::resume`]). Returns whether the
    /// group was woken. (An awake group's idle count is left alone: every heartbeat response
    /// passes through here, and idleness is judged by [`RaftNode::quiescent`] at each tick.)
    pub fn wake(&mut self, bg: GroupId, raft: &mut RaftNode, leader_silent: bool) -> bool {
        let Some(s) = self.groups.get_mut(&bg) else {
            return false;
        };
        if matches!(s, Sleep::Awake { .. }) {
            return false;
        }
        *s = Sleep::Awake { idle_ticks: 0 };
        raft.resume(leader_silent);
        true
    }
}

impl Core {
    /// Wakes `bg` for local activity (a client request).
    pub(super) fn wake_group(&mut self, bg: GroupId) {
        if let Some(g) = self.groups.get_mut(&bg) {
            if self.hib.wake(bg, &mut g.raft, false) {
                self.counters.wakes.fetch_add(1, Ordering::Relaxed);
                debug!(bg, "woken by a client request");
                self.dirty.insert(bg);
            }
        }
    }

    /// Every frame from `from` proves its node alive. A peer back from silence (restarted or
    /// reconnected) may hold replicas that do not know their leader: the leaders here of groups
    /// it is a member of wake and heartbeat it.
    pub(super) fn heard_from(&mut self, from: NodeId) {
        let Some(p) = self.hib.peers.get_mut(&from) else {
            return;
        };
        p.last_heard = Instant::now();
        if !std::mem::replace(&mut p.silent, false) {
            return;
        }
        info!(core = self.core, peer = from, "peer heard from again");
        let mut woken = 0;
        for (bg, g) in self.groups.iter_mut() {
            if g.raft.role() == Role::Leader
                && g.raft.conf().contains(from)
                && self.hib.wake(*bg, &mut g.raft, false)
            {
                self.dirty.insert(*bg);
                woken += 1;
            }
        }
        self.counters.wakes.fetch_add(woken, Ordering::Relaxed);
    }

    /// At each tick, before the groups tick: peers' liveness (pings out, silent leaders' groups
    /// woken), idle leaders asking to hibernate, asks that timed out, counters.
    pub(super) fn hibernate_tick(&mut self) {
        let now = Instant::now();
        let mut stats_frames = 0;
        let mut stats_bytes = 0;
        let mut newly_silent = Vec::new();
        let enabled = self.hib.enabled();
        let (ping_every, silence) = (self.hib.ping_every, self.hib.silence);
        for (id, p) in self.hib.peers.iter_mut() {
            let st = self.transport.peer_stats(*id).unwrap_or_default();
            stats_frames += st.frames_sent;
            stats_bytes += st.bytes_sent;
            if !enabled {
                continue;
            }
            if st.frames_sent != p.frames_sent {
                p.frames_sent = st.frames_sent;
                p.last_sent = now;
            } else if now.duration_since(p.last_sent) >= ping_every {
                let ping = HibernateFrame {
                    what: HibernateWhat::Ping,
                    groups: Vec::new(),
                };
                if self
                    .transport
                    .send(
                        *id,
                        Frame::new(KIND_HIBERNATE, 0, ping.encode()),
                        Lane::Control,
                    )
                    .is_ok()
                {
                    self.counters.pings_sent.fetch_add(1, Ordering::Relaxed);
                }
                p.last_sent = now;
            }
            if !p.silent && now.duration_since(p.last_heard) >= silence {
                p.silent = true;
                newly_silent.push(*id);
            }
        }
        self.counters
            .frames_sent
            .store(stats_frames, Ordering::Relaxed);
        self.counters
            .bytes_sent
            .store(stats_bytes, Ordering::Relaxed);
        self.counters
            .groups
            .store(self.groups.len() as u64, Ordering::Relaxed);
        for peer in newly_silent {
            self.wake_led_by_silent(peer);
        }
        if !self.hib.enabled() {
            return;
        }
        let mut sleeps: BTreeMap<NodeId, Vec<SleepAt>> = BTreeMap::new();
        let mut timed_out = Vec::new();
        let mut asleep = 0;
        let busy: BTreeSet<GroupId> = self.busy_groups();
        // Members on silent nodes are left out: a group with a dead follower sleeps too, as long
        // as the rest are a majority. `heard_from` wakes it when the node comes back.
        let silent = self.hib.silent_peers();
        for (bg, g) in self.groups.iter_mut() {
            let Some(s) = self.hib.groups.get_mut(bg) else {
                continue;
            };
            match s {
                Sleep::Asleep => asleep += 1,
                Sleep::Asking { ticks, .. } => {
                    *ticks += 1;
                    if *ticks >= self.hib.ask_ticks_max {
                        timed_out.push(*bg);
                    }
                }
                Sleep::Awake { idle_ticks } => {
                    let idle = g.raft.role() == Role::Leader
                        && g.execs.is_empty()
                        && g.reads.is_empty()
                        && g.ready_reads.is_empty()
                        && g.proposals.is_empty()
                        && g.sending.is_empty()
                        && !busy.contains(bg);
                    let at = if idle {
                        g.raft.quiescent_without(&silent)
                    } else {
                        None
                    };
                    let Some((index, log_term)) = at else {
                        *idle_ticks = 0;
                        continue;
                    };
                    *idle_ticks += 1;
                    if *idle_ticks < self.hib.idle_ticks {
                        continue;
                    }
                    let at = SleepAt {
                        group: *bg,
                        term: g.raft.term(),
                        index,
                        log_term,
                    };
                    let conf = g.raft.conf();
                    let waiting: BTreeSet<NodeId> = conf
                        .voters
                        .iter()
                        .chain(&conf.voters_outgoing)
                        .chain(&conf.learners)
                        .copied()
                        .filter(|n| *n != self.me && !silent.contains(n))
                        .collect();
                    for f in &waiting {
                        sleeps.entry(*f).or_default().push(at);
                    }
                    *s = if waiting.is_empty() {
                        asleep += 1;
                        Sleep::Asleep
                    } else {
                        Sleep::Asking {
                            at,
                            waiting,
                            ticks: 0,
                        }
                    };
                }
            }
        }
        for bg in timed_out {
            debug!(
                bg,
                "followers did not all agree to hibernate; staying awake"
            );
            let g = self.groups.get_mut(&bg).expect("group exists");
            self.hib.wake(bg, &mut g.raft, false);
            self.dirty.insert(bg);
        }
        self.counters
            .groups_hibernating
            .store(asleep, Ordering::Relaxed);
        self.send_hibernate(HibernateWhat::Sleep, sleeps);
    }

    /// Groups with a client request of this node parked or forwarded: they need the retries
    /// that only run while the group's leader is awake.
    fn busy_groups(&self) -> BTreeSet<GroupId> {
        let mut busy: BTreeSet<GroupId> = self.parked.iter().map(|c| c.bg).collect();
        busy.extend(self.forwarded.values().map(|(c, _, _)| c.bg));
        busy
    }

    /// `peer` was silent for an election timeout: its node (or the path to it) is down, so the
    /// hibernating groups it leads here wake with their election timers expired.
    fn wake_led_by_silent(&mut self, peer: NodeId) {
        let mut woken = 0;
        for (bg, g) in self.groups.iter_mut() {
            if g.raft.leader() == Some(peer)
                && g.raft.role() != Role::Leader
                && self.hib.wake(*bg, &mut g.raft, true)
            {
                self.dirty.insert(*bg);
                woken += 1;
            }
        }
        info!(
            core = self.core,
            peer,
            woken,
            silence_ms = self.hib.silence.as_millis() as u64,
            "nothing heard from peer for an election timeout; woke the hibernating groups it leads"
        );
        self.counters.wakes.fetch_add(woken, Ordering::Relaxed);
    }

    /// A hibernation frame from `from` (its liveness was already noted).
    pub(super) fn on_hibernate_frame(&mut self, from: NodeId, f: HibernateFrame) {
        match f.what {
            HibernateWhat::Ping => {}
            HibernateWhat::Sleep => {
                let busy = self.busy_groups();
                let mut acks = Vec::new();
                for at in f.groups {
                    let Some(g) = self.groups.get_mut(&at.group) else {
                        continue;
                    };
                    let agrees = g.raft.role() == Role::Follower
                        && g.raft.leader() == Some(from)
                        && g.raft.term() == at.term
                        && g.raft.quiescent() == Some((at.index, at.log_term))
                        && g.raft.conf().contains(from)
                        && !busy.contains(&at.group)
                        && self.hib.groups.contains_key(&at.group);
                    if agrees {
                        self.hib.groups.insert(at.group, Sleep::Asleep);
                        acks.push(at);
                    } else {
                        debug!(
                            bg = at.group,
                            from, "not hibernating: not settled with the leader"
                        );
                    }
                }
                if !acks.is_empty() {
                    self.send_hibernate(HibernateWhat::Ack, BTreeMap::from([(from, acks)]));
                }
            }
            HibernateWhat::Ack => {
                for at in f.groups {
                    let Some(Sleep::Asking {
                        at: asked, waiting, ..
                    }) = self.hib.groups.get_mut(&at.group)
                    else {
                        continue;
                    };
                    if *asked != at || !waiting.remove(&from) || !waiting.is_empty() {
                        continue;
                    }
                    // Anything that happened since the ask woke the group (state `Awake`), so
                    // the leader is still settled at `at`; checked anyway, it is cheap.
                    let silent = self.hib.silent_peers();
                    let g = self.groups.get_mut(&at.group).expect("group exists");
                    if g.raft.role() == Role::Leader
                        && g.raft.term() == at.term
                        && g.raft.quiescent_without(&silent) == Some((at.index, at.log_term))
                    {
                        self.hib.groups.insert(at.group, Sleep::Asleep);
                        debug!(bg = at.group, index = at.index, "hibernating");
                    } else {
                        self.hib.wake(at.group, &mut g.raft, false);
                        self.dirty.insert(at.group);
                    }
                }
            }
        }
    }

    fn send_hibernate(&mut self, what: HibernateWhat, by_peer: BTreeMap<NodeId, Vec<SleepAt>>) {
        for (peer, groups) in by_peer {
            // Bounded like a raft frame: at most FRAME_MESSAGES_MAX groups per frame.
            for chunk in groups.chunks(crate::codec::FRAME_MESSAGES_MAX as usize) {
                let f = HibernateFrame {
                    what,
                    groups: chunk.to_vec(),
                };
                // Sent on the control lane, behind the heartbeats queued before it. A lost frame
                // only delays hibernation (the leader's ask times out and it stays awake).
                if let Err(e) = self.transport.send(
                    peer,
                    Frame::new(KIND_HIBERNATE, 0, f.encode()),
                    Lane::Control,
                ) {
                    debug!(core = self.core, peer, error = %e, "hibernate frame dropped");
                }
            }
        }
    }
}
