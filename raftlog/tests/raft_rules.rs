//! Focused scenario tests for the raft core, one or more per rule of
//! issue 2 (braft / etcd semantics). Each test builds the smallest cluster
//! that exhibits the rule with the harness in `common` and asserts the rule
//! itself (who sent what, which term, which index committed), not merely
//! that the cluster made progress.

mod common;

use bytes::Bytes;
use common::*;
use raftlog::core::{
    ConfChangeError, ConfChangeStart, Configuration, Entry, EntryKind, Event, HardState, Index,
    Message, MessageBody, NodeId, ProgressState, RaftConfig, RaftNode, Restore, Role, SnapshotMeta,
    SplitMix64, Term,
};
use raftlog::Error;
use std::collections::BTreeSet;

fn cfg() -> RaftConfig {
    RaftConfig::default()
}

fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        group: GROUP,
        from,
        to,
        term,
        body,
    }
}

fn vote_req(pre_vote: bool, last_log_index: Index, last_log_term: Term) -> MessageBody {
    MessageBody::RequestVote {
        pre_vote,
        last_log_index,
        last_log_term,
        leadership_transfer: false,
    }
}

/// Drives a standalone node's Ready loop (instant disk) and returns the
/// messages it sent.
fn drive(n: &mut RaftNode) -> Vec<Message> {
    let mut out = Vec::new();
    while n.has_ready() {
        let rd = n.ready();
        out.extend(rd.messages);
        if let Some(w) = rd.write {
            n.on_write_durable(w.seq);
        }
        if let Some(meta) = rd.snapshot_to_install {
            n.on_snapshot_installed(meta);
        }
    }
    out
}

/// The vote response `n` sent to `to`, if any: (granted, term).
fn vote_resp(msgs: &[Message], to: NodeId, pre: bool) -> Option<(bool, Term)> {
    msgs.iter().find_map(|m| match m.body {
        MessageBody::RequestVoteResponse { pre_vote, granted } if m.to == to && pre_vote == pre => {
            Some((granted, m.term))
        }
        _ => None,
    })
}

fn followers(c: &Cluster, leader: NodeId) -> Vec<NodeId> {
    c.ids().into_iter().filter(|id| *id != leader).collect()
}

fn peer_state(c: &Cluster, leader: NodeId, peer: NodeId) -> ProgressState {
    c.node(leader)
        .status()
        .peers
        .iter()
        .find(|p| p.id == peer)
        .expect("peer tracked")
        .state
}

fn peer_match(c: &Cluster, leader: NodeId, peer: NodeId) -> Index {
    c.node(leader)
        .status()
        .peers
        .iter()
        .find(|p| p.id == peer)
        .expect("peer tracked")
        .match_index
}

/// Configurations carried by Config entries in `id`'s log, in order.
fn config_entries(c: &Cluster, id: NodeId) -> Vec<(Index, Configuration)> {
    let n = c.node(id);
    (n.first_index()..=n.last_index())
        .filter_map(|i| n.entry(i))
        .filter(|e| e.kind == EntryKind::Config)
        .map(|e| (e.index, Configuration::decode(&e.data).expect("decodes")))
        .collect()
}

fn read_ready(c: &Cluster, id: NodeId, ctx: u64) -> Option<Index> {
    c.events(id).iter().find_map(|e| match e {
        Event::ReadIndexReady { ctx: x, index } if *x == ctx => Some(*index),
        _ => None,
    })
}

fn big(n: usize) -> Bytes {
    Bytes::from(vec![b'x'; n])
}

// ======================================================================
// Election
// ======================================================================

/// Three fresh nodes elect exactly one leader in term 1; the others follow
/// it, and its no-op commits everywhere.
#[test]
fn election_elects_a_single_leader() {
    let mut c = Cluster::new(3, cfg(), 1);
    let l = c.elect();
    assert_eq!(c.leaders(), vec![l]);
    assert_eq!(c.node(l).term(), 1);
    for f in followers(&c, l) {
        assert_eq!(c.node(f).role(), Role::Follower);
        assert_eq!(c.node(f).leader(), Some(l));
        assert_eq!(c.node(f).term(), 1);
    }
    // The new leader's no-op (index 1, term 1) is committed and applied.
    c.tick();
    for id in c.ids() {
        assert_eq!(c.node(id).commit_index(), 1, "node {id}");
        let e = &c.host(id).applied[0];
        assert_eq!((e.index, e.term, e.kind), (1, 1, EntryKind::Noop));
    }
}

/// Election timeouts are drawn from [base, 2 * base): isolated nodes start
/// campaigning at different ticks.
#[test]
fn election_timeouts_are_randomized() {
    let mut c = Cluster::new(5, cfg(), 7);
    for id in c.ids() {
        c.isolate(id);
    }
    let base = cfg().election_timeout_ticks;
    let mut first_campaign = std::collections::BTreeMap::new();
    for t in 1..=2 * base {
        c.tick();
        for id in c.ids() {
            if c.node(id).role() != Role::Follower {
                first_campaign.entry(id).or_insert(t);
            }
        }
    }
    assert_eq!(
        first_campaign.len(),
        5,
        "every node campaigned: {first_campaign:?}"
    );
    for (&id, &t) in &first_campaign {
        assert!(
            t >= base && t < 2 * base,
            "node {id} campaigned at tick {t}"
        );
    }
    let distinct: BTreeSet<u32> = first_campaign.values().copied().collect();
    assert!(
        distinct.len() >= 2,
        "all nodes timed out together: {first_campaign:?}"
    );
}

/// With pre-vote, a node cut off from the cluster keeps its term however
/// long it campaigns, so it cannot disrupt the leader when it returns.
#[test]
fn prevote_partitioned_node_keeps_its_term() {
    let mut c = Cluster::new(3, cfg(), 2);
    let l = c.elect();
    let f = followers(&c, l)[0];
    let term = c.node(f).term();
    c.isolate(f);
    c.ticks(100);
    assert_eq!(c.node(f).term(), term, "pre-vote must not bump the term");
    assert_ne!(c.node(f).role(), Role::Leader);
    // Healing does not depose the leader.
    c.heal();
    c.ticks(5);
    assert_eq!(c.leader(), Some(l));
    assert_eq!(c.node(l).term(), term);
    assert_eq!(c.node(f).leader(), Some(l));
}

/// Without pre-vote the same partitioned node increments its term on each
/// election timeout.
#[test]
fn without_prevote_partitioned_node_bumps_its_term() {
    let cfg = RaftConfig {
        pre_vote: false,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 2);
    let l = c.elect();
    let f = followers(&c, l)[0];
    let term = c.node(f).term();
    c.isolate(f);
    c.ticks(100);
    // At least 100 / 20 elections, each in a new term.
    assert!(
        c.node(f).term() >= term + 5,
        "term {} -> {}",
        term,
        c.node(f).term()
    );
    assert_eq!(c.node(f).role(), Role::Candidate);
}

/// Leader stickiness: a follower that heard from the leader within the
/// election timeout rejects both pre-votes and votes of a higher term and
/// does not adopt that term; once the leader has been silent for an
/// election timeout it grants.
#[test]
fn sticky_follower_rejects_votes_while_leader_is_alive() {
    let mut c = Cluster::new(3, cfg(), 3);
    let l = c.elect();
    let fs = followers(&c, l);
    let (f, cand) = (fs[0], fs[1]);
    let term = c.node(f).term();
    let (li, lt) = (
        c.node(cand).last_index(),
        c.node(cand).term_at(c.node(cand).last_index()).unwrap(),
    );
    c.auto_deliver = false;
    for pre in [true, false] {
        c.inject(msg(cand, f, term + 1, vote_req(pre, li, lt)));
        let out = c.take_queued();
        assert_eq!(
            vote_resp(&out, cand, pre),
            Some((false, term)),
            "pre_vote={pre}"
        );
        assert_eq!(c.node(f).term(), term, "a sticky follower keeps its term");
        assert_eq!(c.node(f).leader(), Some(l));
    }
    // The leader goes silent for an election timeout: f now grants.
    c.cut.insert((l, f));
    for _ in 0..cfg().election_timeout_ticks {
        c.node_mut(f).tick();
    }
    c.drop_queued();
    for pre in [true, false] {
        c.inject(msg(cand, f, term + 1, vote_req(pre, li, lt)));
        let out = c.take_queued();
        assert_eq!(
            vote_resp(&out, cand, pre),
            Some((true, term + 1)),
            "pre_vote={pre}"
        );
    }
    assert_eq!(c.node(f).term(), term + 1);
}

/// A node past its start-up window, with log terms [1, 1, 2].
fn voter_with_log() -> RaftNode {
    let restore = restore_log(2, 0, &[1, 1, 2], &[1, 2, 3]);
    let mut n = RaftNode::new(GROUP, 1, cfg(), Box::new(SplitMix64(5)), restore).unwrap();
    for _ in 0..cfg().election_timeout_ticks {
        n.tick();
    }
    drive(&mut n);
    n
}

/// Votes and pre-votes are granted only to candidates whose log is at
/// least as up to date, compared by (lastLogTerm, lastLogIndex).
#[test]
fn vote_and_prevote_check_log_up_to_date() {
    // (candidate last index, last term, granted)
    let cases = [
        (5, 1, false), // longer but older last term
        (2, 2, false), // same last term, shorter
        (3, 2, true),  // identical
        (4, 2, true),  // same term, longer
        (1, 3, true),  // newer last term wins even if shorter
    ];
    for pre in [true, false] {
        for (li, lt, want) in cases {
            let mut n = voter_with_log();
            n.step(msg(2, 1, 3, vote_req(pre, li, lt)));
            let out = drive(&mut n);
            let (granted, _) = vote_resp(&out, 2, pre).expect("answered");
            assert_eq!(granted, want, "pre_vote={pre} candidate=({li},{lt})");
            if !pre {
                // A real vote request of a higher term is adopted either way,
                // and a grant is recorded durably.
                assert_eq!(n.term(), 3);
                assert_eq!(n.status().state, Role::Follower);
            } else {
                assert_eq!(n.term(), 2, "a pre-vote never changes the term");
            }
        }
    }
}

/// A candidate counts its own vote only once the write carrying its term
/// and vote is durable: a single-voter group whose disk stalls stays a
/// candidate, and becomes leader of the same term when the write lands.
#[test]
fn candidate_self_vote_counts_only_when_durable() {
    let mut c = Cluster::new(1, cfg(), 4);
    c.host_mut(1).stalled = true;
    for _ in 0..2 * cfg().election_timeout_ticks {
        c.tick();
        if c.node(1).role() == Role::Candidate {
            break;
        }
    }
    assert_eq!(c.node(1).role(), Role::Candidate);
    let term = c.node(1).term();
    assert_eq!(c.host(1).disk.hard_state, HardState { term, vote: 1 });
    c.settle();
    assert_eq!(c.node(1).role(), Role::Candidate, "vote not durable yet");
    c.set_stalled(1, false);
    c.settle();
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(c.node(1).term(), term);
}

/// A node that just started withholds its vote for one election timeout
/// (it may have acknowledged a leader whose lease still runs), and does not
/// adopt the requester's term meanwhile.
#[test]
fn new_node_withholds_vote_for_one_election_timeout() {
    let restore = restore_log(1, 0, &[1], &[1, 2, 3]);
    let mut n = RaftNode::new(GROUP, 1, cfg(), Box::new(SplitMix64(9)), restore).unwrap();
    for pre in [true, false] {
        n.step(msg(2, 1, 2, vote_req(pre, 1, 1)));
        let out = drive(&mut n);
        assert_eq!(vote_resp(&out, 2, pre), Some((false, 1)), "pre_vote={pre}");
        assert_eq!(n.term(), 1);
    }
    for _ in 0..cfg().election_timeout_ticks - 1 {
        n.tick();
    }
    drive(&mut n);
    n.step(msg(2, 1, 2, vote_req(false, 1, 1)));
    let out = drive(&mut n);
    assert_eq!(
        vote_resp(&out, 2, false),
        Some((false, 1)),
        "still in the window"
    );
    n.tick();
    drive(&mut n);
    n.step(msg(2, 1, 2, vote_req(false, 1, 1)));
    let out = drive(&mut n);
    assert_eq!(vote_resp(&out, 2, false), Some((true, 2)), "window over");
    assert_eq!(n.term(), 2);
}

// ======================================================================
// Stepdown
// ======================================================================

/// A leader that sees a higher term steps down and adopts it.
#[test]
fn leader_steps_down_on_higher_term() {
    let mut c = Cluster::new(3, cfg(), 5);
    let l = c.elect();
    let f = followers(&c, l)[0];
    let term = c.node(l).term();
    let round = 0;
    c.inject(msg(
        f,
        l,
        term + 3,
        MessageBody::HeartbeatResponse {
            round,
            readonly: false,
            last_index: 0,
        },
    ));
    assert_eq!(c.node(l).role(), Role::Follower);
    assert_eq!(c.node(l).term(), term + 3);
    assert!(c
        .events(l)
        .contains(&Event::LeaderStepDown { term: term + 3 }));
    assert_eq!(
        c.host(l).disk.hard_state,
        HardState {
            term: term + 3,
            vote: 0
        }
    );
}

/// Check-quorum: a leader cut off from the majority steps down within two
/// election timeouts.
#[test]
fn check_quorum_isolated_leader_steps_down() {
    let mut c = Cluster::new(3, cfg(), 6);
    let l = c.elect();
    c.isolate(l);
    let mut stepped = None;
    for t in 1..=2 * cfg().election_timeout_ticks {
        c.tick();
        if c.node(l).role() != Role::Leader {
            stepped = Some(t);
            break;
        }
    }
    let t = stepped.expect("the isolated leader stepped down");
    assert!(t > 1, "it must not step down before a check round ({t})");
    assert!(c
        .events(l)
        .iter()
        .any(|e| matches!(e, Event::LeaderStepDown { .. })));
}

/// Without check-quorum an isolated leader stays leader indefinitely.
#[test]
fn without_check_quorum_isolated_leader_stays() {
    let cfg = RaftConfig {
        check_quorum: false,
        lease_read: false,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 6);
    let l = c.elect();
    let term = c.node(l).term();
    c.isolate(l);
    c.ticks(100);
    assert_eq!(c.node(l).role(), Role::Leader);
    assert_eq!(c.node(l).term(), term);
}

/// A leader that removes itself keeps leading until the change commits,
/// then steps down; the rest elect a leader among themselves.
#[test]
fn removed_leader_steps_down_after_removal_commits() {
    let mut c = Cluster::new(3, cfg(), 8);
    let l = c.elect();
    c.auto_deliver = false;
    assert!(matches!(
        c.node_mut(l).remove_peer(l),
        Ok(ConfChangeStart::Started)
    ));
    c.process(l);
    // Appended (single change, no joint), not committed: still leader.
    let confs = config_entries(&c, l);
    let (ci, conf) = confs.last().expect("config entry appended").clone();
    assert!(!conf.voters.contains(&l) && !conf.is_joint());
    assert_eq!(c.node(l).role(), Role::Leader);
    assert!(c.node(l).commit_index() < ci);
    c.auto_deliver = true;
    c.settle();
    assert!(c.node(l).commit_index() >= ci);
    assert_eq!(c.node(l).role(), Role::Follower);
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    // The removed node never campaigns again; the others elect a leader.
    c.ticks(60);
    let l2 = c.leader().expect("new leader");
    assert_ne!(l2, l);
    assert_ne!(c.node(l).role(), Role::Leader);
}

// ======================================================================
// Replication
// ======================================================================

/// In replicate state the leader pipelines AppendEntries without waiting
/// for acknowledgements, but never more than inflight_messages_max.
#[test]
fn pipelining_limited_by_inflight_messages() {
    let cfg = RaftConfig {
        append_entries_max: 1,
        inflight_messages_max: 3,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 10);
    let l = c.elect();
    let f = followers(&c, l)[0];
    assert_eq!(peer_state(&c, l, f), ProgressState::Replicate);
    c.cut.insert((f, l)); // f receives but its answers vanish
    let mark = c.sent.len();
    for i in 0..10 {
        c.propose(l, &format!("e{i}"));
    }
    let to_f = c.sent[mark..]
        .iter()
        .filter(|m| m.to == f && append_len(m).is_some_and(|n| n > 0))
        .count();
    assert_eq!(to_f, 3, "exactly inflight_messages_max outstanding");
    // The other follower acknowledged everything: it got all ten.
    let g = followers(&c, l)[1];
    assert_eq!(c.node(g).last_index(), c.node(l).last_index());
}

/// The same with the byte limit: entries of 124 counted bytes and a limit
/// of 249 bytes allow three messages (the window is checked before a send).
#[test]
fn pipelining_limited_by_inflight_bytes() {
    let cfg = RaftConfig {
        append_entries_max: 1,
        inflight_messages_max: 100,
        inflight_bytes_max: 2 * 124 + 1,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 10);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.cut.insert((f, l));
    let mark = c.sent.len();
    for _ in 0..10 {
        c.node_mut(l).propose(big(100), None).unwrap();
        c.settle();
    }
    let sizes: Vec<usize> = c.sent[mark..]
        .iter()
        .filter(|m| m.to == f && append_len(m).is_some_and(|n| n > 0))
        .map(|m| match &m.body {
            MessageBody::AppendEntries { entries, .. } => {
                entries.iter().map(|e| e.size_bytes()).sum()
            }
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(sizes, vec![124, 124, 124]);
}

/// Acknowledgements lost while the window is full must not stall the
/// follower forever: once it answers heartbeats again the leader resumes.
#[test]
fn lost_acks_do_not_stall_the_pipeline() {
    let cfg = RaftConfig {
        append_entries_max: 1,
        inflight_messages_max: 3,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 10);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.cut.insert((f, l));
    for i in 0..10 {
        c.propose(l, &format!("e{i}"));
    }
    c.heal();
    c.ticks(5);
    assert_eq!(c.node(f).last_index(), c.node(l).last_index());
    assert_eq!(peer_match(&c, l, f), c.node(l).last_index());
}

/// Batching: a follower catching up receives batches of at most
/// append_entries_max entries and at most append_bytes_max bytes.
#[test]
fn batching_limits_entries_and_bytes_per_message() {
    for (entries_max, bytes_max, want_max) in [(4, 1 << 20, 4), (100, 3 * 124, 3)] {
        let cfg = RaftConfig {
            append_entries_max: entries_max,
            append_bytes_max: bytes_max,
            ..cfg()
        };
        let mut c = Cluster::new(3, cfg, 11);
        let l = c.elect();
        let f = followers(&c, l)[0];
        c.partition(&[l], &[f]);
        for _ in 0..20 {
            c.node_mut(l).propose(big(100), None).unwrap();
        }
        c.settle();
        c.heal();
        let mark = c.sent.len();
        c.ticks(5);
        assert_eq!(c.node(f).last_index(), c.node(l).last_index());
        let lens: Vec<usize> = c.sent[mark..]
            .iter()
            .filter(|m| m.to == f)
            .filter_map(append_len)
            .filter(|n| *n > 0)
            .collect();
        assert!(lens.iter().all(|n| *n <= want_max), "{lens:?}");
        assert_eq!(
            lens.iter().max(),
            Some(&want_max),
            "batches fill up: {lens:?}"
        );
        assert!(lens.iter().sum::<usize>() >= 20);
    }
}

/// Distinct (prev_log_index, prev_log_term) of the AppendEntries `leader`
/// sent to `to` until `to` first accepted one: the probe points of the
/// match search, one per round trip.
fn probe_points(c: &Cluster, leader: NodeId, to: NodeId) -> Vec<(Index, Term)> {
    let mut points = Vec::new();
    for m in &c.sent {
        match &m.body {
            MessageBody::AppendEntriesResponse { success: true, .. } if m.from == to => break,
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                ..
            } if m.from == leader && m.to == to => {
                if !points.contains(&(*prev_log_index, *prev_log_term)) {
                    points.push((*prev_log_index, *prev_log_term));
                }
            }
            _ => {}
        }
    }
    points
}

/// Fast backtracking: a follower with a long divergent suffix of an old
/// term answers with its conflict term's first index, so the leader skips
/// the whole run at once: one rejection instead of one per entry.
#[test]
fn fast_backtracking_repairs_divergent_suffix_in_few_round_trips() {
    let mut terms_ok = vec![1];
    terms_ok.extend(std::iter::repeat_n(3, 20));
    let mut terms_bad = vec![1];
    terms_bad.extend(std::iter::repeat_n(2, 50));
    let mut c = Cluster::new(3, cfg(), 12);
    c.start_with(1, cfg(), restore_log(3, 0, &terms_ok, &[1, 2, 3]));
    c.start_with(2, cfg(), restore_log(3, 0, &terms_ok, &[1, 2, 3]));
    c.start_with(3, cfg(), restore_log(3, 0, &terms_bad, &[1, 2, 3]));
    let l = c.run_until_leader(100);
    assert_ne!(l, 3, "node 3's log is not up to date");
    c.settle();
    // Two probe points: the leader's last index, then straight past the
    // follower's whole term-2 run (without the hint: 20 probes).
    assert_eq!(probe_points(&c, l, 3), vec![(21, 3), (1, 1)]);
    // Node 3's log now equals the leader's: the term-2 suffix is gone.
    assert_eq!(c.node(3).last_index(), c.node(l).last_index());
    for i in 1..=c.node(l).last_index() {
        assert_eq!(c.node(3).term_at(i), c.node(l).term_at(i), "index {i}");
    }
    assert_eq!(c.host(3).disk.last_index(), c.node(l).last_index());
    assert!(c.host(3).disk.entries.iter().all(|e| e.term != 2));
}

/// The conflict term exists in the leader's log too: the leader resumes
/// after its own last entry of that term.
#[test]
fn fast_backtracking_uses_leaders_last_entry_of_conflict_term() {
    // Leader: 1 2 2 3 3 3 ... ; follower: 1 2 2 2 2 2 2 2 ...
    let mut terms_ok = vec![1, 2, 2];
    terms_ok.extend(std::iter::repeat_n(3, 10));
    let mut terms_bad = vec![1];
    terms_bad.extend(std::iter::repeat_n(2, 30));
    let mut c = Cluster::new(3, cfg(), 13);
    c.start_with(1, cfg(), restore_log(3, 0, &terms_ok, &[1, 2, 3]));
    c.start_with(2, cfg(), restore_log(3, 0, &terms_ok, &[1, 2, 3]));
    c.start_with(3, cfg(), restore_log(3, 0, &terms_bad, &[1, 2, 3]));
    let l = c.run_until_leader(100);
    c.settle();
    // The retry after the rejection starts right after index 3, the last
    // term-2 entry the leader holds.
    assert_eq!(probe_points(&c, l, 3), vec![(13, 3), (3, 2)]);
    for i in 1..=c.node(l).last_index() {
        assert_eq!(c.node(3).term_at(i), c.node(l).term_at(i), "index {i}");
    }
}

/// Progress: probe (one AppendEntries at a time) until the follower's match
/// point is found, then replicate; an unreachable report returns to probe.
#[test]
fn progress_probe_then_replicate() {
    let mut c = Cluster::new(3, cfg(), 14);
    let l = c.elect();
    let f = followers(&c, l)[0];
    assert_eq!(peer_state(&c, l, f), ProgressState::Replicate);
    c.node_mut(l).report_unreachable(f);
    assert_eq!(peer_state(&c, l, f), ProgressState::Probe);
    c.cut.insert((l, f));
    let mark = c.sent.len();
    for i in 0..5 {
        c.propose(l, &format!("p{i}"));
    }
    let probes = c.sent[mark..]
        .iter()
        .filter(|m| m.to == f && is_append(m))
        .count();
    assert_eq!(probes, 1, "probe: one AppendEntries outstanding");
    assert_eq!(peer_state(&c, l, f), ProgressState::Probe);
    c.heal();
    c.ticks(2);
    assert_eq!(peer_state(&c, l, f), ProgressState::Replicate);
    assert_eq!(peer_match(&c, l, f), c.node(l).last_index());
}

/// Figure 8 of the Raft paper: an entry of an earlier term is on a majority
/// but must not commit by counting replicas; it commits only together with
/// an entry of the leader's term.
#[test]
fn figure8_old_term_entry_commits_only_through_current_term() {
    fn run(broken: bool) -> (Cluster, NodeId) {
        let cfg = RaftConfig {
            append_entries_max: 1,
            broken_rule: if broken {
                raftlog::core::BrokenRule::CommitPreviousTermByCount
            } else {
                Default::default()
            },
            ..cfg()
        };
        let mut c = Cluster::new(5, cfg.clone(), 15);
        let all = [1, 2, 3, 4, 5];
        // S1, S2 hold index 2 of term 2 (S1's old leadership); S3, S4 lack
        // it; S5 holds a conflicting index 2 of term 3.
        c.start_with(1, cfg.clone(), restore_log(3, 0, &[1, 2], &all));
        c.start_with(2, cfg.clone(), restore_log(3, 0, &[1, 2], &all));
        c.start_with(3, cfg.clone(), restore_log(3, 0, &[1], &all));
        c.start_with(4, cfg.clone(), restore_log(3, 0, &[1], &all));
        c.start_with(5, cfg.clone(), restore_log(3, 5, &[1, 3], &all));
        c.isolate(5);
        // Entries of the new leader's term never arrive anywhere (they are
        // stripped from AppendEntries, which otherwise get through).
        c.rewrite = Some(Box::new(|m: &mut Message| {
            if let MessageBody::AppendEntries { entries, .. } = &mut m.body {
                entries.retain(|e| e.term < 4);
            }
        }));
        let l = c.run_until_leader(100);
        assert!(l == 1 || l == 2, "only S1 and S2 have an up-to-date log");
        assert_eq!(c.node(l).term(), 4);
        c.ticks(3);
        (c, l)
    }
    let (mut c, l) = run(false);
    // Four of five replicas hold (2, term 2)...
    for id in 1..=4 {
        assert_eq!(c.node(id).term_at(2), Some(2), "node {id}");
    }
    for f in [1, 2, 3, 4].into_iter().filter(|x| *x != l) {
        assert_eq!(peer_match(&c, l, f), 2);
    }
    // ... yet it is not committed: S5 could still win and overwrite it.
    assert_eq!(c.node(l).commit_index(), 0);
    // Once the term-4 no-op replicates, both commit together.
    c.rewrite = None;
    c.ticks(3);
    assert_eq!(c.node(l).commit_index(), 3);
    assert_eq!(c.node(l).term_at(3), Some(4));

    // The scenario has teeth: with the rule broken, index 2 commits by count.
    let (c, l) = run(true);
    assert_eq!(c.node(l).commit_index(), 2);
}

/// The leader persists its log in parallel with replication: with its own
/// disk stalled, two followers' acknowledgements commit the entry, but the
/// leader applies it only once its own write is durable.
#[test]
fn leader_persists_in_parallel_and_applies_only_durable_entries() {
    let mut c = Cluster::new(3, cfg(), 16);
    let l = c.elect();
    c.host_mut(l).stalled = true;
    let mark = c.sent.len();
    let (idx, _) = c.node_mut(l).propose(data("x"), None).unwrap();
    c.settle();
    assert!(c.node(l).durable_index() < idx, "leader write not durable");
    // The entry went to both followers before the leader's write was durable.
    for f in followers(&c, l) {
        let sent = c.sent[mark..].iter().any(|m| {
            m.to == f
                && matches!(&m.body, MessageBody::AppendEntries { entries, .. }
                    if entries.iter().any(|e| e.index == idx))
        });
        assert!(sent, "sent to {f}");
        assert_eq!(c.node(f).last_index(), idx);
    }
    assert_eq!(c.node(l).commit_index(), idx, "committed by the followers");
    assert!(
        c.applied_index(l) < idx,
        "not applied before local durability"
    );
    c.set_stalled(l, false);
    c.settle();
    assert_eq!(c.applied_index(l), idx);
    assert_eq!(c.node(l).durable_index(), idx);
}
