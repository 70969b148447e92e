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

/// A message between members of a [`restore_log`] group (every one on
/// storage [`RESTORED_DISK`]); `Cluster::inject` replaces the disk ids with
/// the sender's own.
fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        group: GROUP,
        from,
        to,
        term,
        disk: RESTORED_DISK,
        to_disk: RESTORED_DISK,
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
/// The configuration entries in `id`'s log that change the membership (not
/// those that only bind members to their disk ids, as a new group's first
/// leader does).
fn config_entries(c: &Cluster, id: NodeId) -> Vec<(Index, Configuration)> {
    let n = c.node(id);
    let mut members = c.bootstrap.without_disks();
    (n.first_index()..=n.last_index())
        .filter_map(|i| n.entry(i))
        .filter(|e| e.kind == EntryKind::Config)
        .map(|e| (e.index, Configuration::decode(&e.data).expect("decodes")))
        .filter(|(_, conf)| {
            let changed = conf.without_disks() != members;
            members = conf.without_disks();
            changed
        })
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
/// it, and its first entry commits everywhere: a configuration with the same
/// voters, each bound to the disk id it voted with.
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
    // The new leader's binding (index 1, term 1) is committed and applied.
    c.tick();
    for id in c.ids() {
        assert_eq!(c.node(id).commit_index(), 1, "node {id}");
        let e = &c.host(id).applied[0];
        assert_eq!((e.index, e.term, e.kind), (1, 1, EntryKind::Config));
        let conf = Configuration::decode(&e.data).unwrap();
        assert_eq!(conf.without_disks(), Configuration::new([1, 2, 3]));
        for v in [1, 2, 3] {
            assert_eq!(conf.disk(v), c.node(v).disk(), "node {v}'s binding");
        }
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
    assert_eq!(
        c.host(1).disk.hard_state,
        HardState {
            term,
            vote: 1,
            disk: c.node(1).disk()
        }
    );
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
            vote: 0,
            disk: c.node(l).disk(),
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
/// A new leader refuses a membership change until an entry of its own term
/// has committed. Otherwise a configuration entry of an earlier term that
/// never committed (kept in some logs) and the new leader's change can each
/// count a majority of their own with disjoint quorums, and a committed entry
/// is lost (Ongaro's single-server change bug; simulator seeds 7053530 and
/// 7073735 built exactly that before the rule).
#[test]
fn new_leader_changes_membership_only_after_committing_in_its_term() {
    let mut c = Cluster::new(3, cfg(), 11);
    let l1 = c.elect();
    c.propose(l1, "x");
    // Followers' acknowledgements are lost: whoever leads next cannot
    // commit its no-op.
    c.filter = Some(Box::new(|m: &Message| {
        matches!(m.body, MessageBody::AppendEntriesResponse { .. })
    }));
    c.isolate(l1);
    let mut l2 = None;
    for _ in 0..200 {
        c.tick();
        l2 = c
            .leader()
            .filter(|&l| l != l1 && c.node(l).term() > c.node(l1).term());
        if l2.is_some() {
            break;
        }
    }
    let l2 = l2.expect("a new leader among the other two");
    let term = c.node(l2).term();
    assert!(c.node(l2).commit_index() < c.node(l2).last_index());
    let last = c.node(l2).last_index();
    for r in [
        c.node_mut(l2).remove_peer(l1),
        c.node_mut(l2).add_learner(9),
    ] {
        match r {
            Err(Error::Busy { what, .. }) => assert!(what.contains("not committed"), "{what}"),
            other => panic!("membership change accepted before a commit in term {term}: {other:?}"),
        }
    }
    assert_eq!(c.node(l2).last_index(), last, "nothing appended");
    // Once its no-op commits, the same change goes ahead.
    c.filter = None;
    c.ticks(3);
    assert_eq!(c.node(l2).term(), term);
    assert!(c.node(l2).commit_index() >= last);
    assert!(matches!(
        c.node_mut(l2).remove_peer(l1),
        Ok(ConfChangeStart::Started)
    ));
    c.settle();
    c.ticks(3);
    assert!(!c.node(l2).conf().voters.contains(&l1));
}

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
            } if m.from == leader
                && m.to == to
                && !points.contains(&(*prev_log_index, *prev_log_term)) =>
            {
                points.push((*prev_log_index, *prev_log_term));
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

// ======================================================================
// Snapshots
// ======================================================================

/// The host saved a snapshot of `id`'s state machine at its applied index.
fn take_snapshot(c: &mut Cluster, id: NodeId) -> SnapshotMeta {
    let applied = c.node(id).applied_index();
    let meta = c.node_mut(id).on_snapshot_saved(applied).expect("snapshot");
    c.host_mut(id).disk.snapshot = Some(meta.clone());
    c.process(id);
    meta
}

/// on_snapshot_saved records the metadata (index, term, configuration)
/// and compacts the log, keeping snapshot_keep_entries entries up to the
/// snapshot for followers that lag a little.
#[test]
fn snapshot_compacts_log_keeping_recent_entries() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 5,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 20);
    let l = c.elect();
    for i in 0..20 {
        c.propose(l, &format!("s{i}"));
    }
    assert_eq!(c.node(l).applied_index(), 21);
    let err = c.node_mut(l).on_snapshot_saved(22);
    assert!(
        matches!(err, Err(Error::Invalid { .. })),
        "beyond applied: {err:?}"
    );
    let meta = take_snapshot(&mut c, l);
    assert_eq!(meta.index, 21);
    assert_eq!(meta.term, c.node(l).term());
    assert_eq!(meta.conf.without_disks(), Configuration::new([1, 2, 3]));
    assert_eq!(c.node(l).first_index(), 17, "entries 17..=21 kept");
    assert_eq!(
        c.node(l).term_at(16),
        Some(1),
        "the compaction point keeps its term"
    );
    assert!(c.node(l).entry(16).is_none());
    assert!(c.node(l).entry(17).is_some());
    let disk = &c.host(l).disk;
    assert_eq!(disk.compacted, (16, 1));
    assert_eq!(disk.entries.first().map(|e| e.index), Some(17));
    let st = c.node(l).status();
    assert_eq!((st.last_snapshot_index, st.last_snapshot_term), (21, 1));
}

/// snapshot_keep_bytes_max caps the entries kept below a snapshot by size too:
/// with large entries the count alone would keep too much in memory.
#[test]
fn snapshot_keeps_no_more_than_keep_bytes_max_below_it() {
    let big = "x".repeat(100); // 124 bytes per entry with the per-entry overhead
    let by_bytes = RaftConfig {
        snapshot_keep_entries: 10,
        snapshot_keep_bytes_max: 300,
        ..cfg()
    };
    let mut c = Cluster::new(3, by_bytes, 20);
    let l = c.elect();
    for _ in 0..20 {
        c.propose(l, &big);
    }
    assert_eq!(c.node(l).applied_index(), 21);
    let meta = take_snapshot(&mut c, l);
    assert_eq!(meta.index, 21);
    assert_eq!(
        c.node(l).first_index(),
        20,
        "two entries (248 bytes) fit in 300 bytes, a third would not"
    );
    assert_eq!(c.node(l).log_bytes(), 2 * 124);
    assert_eq!(c.host(l).disk.compacted, (19, 1));
    // Small entries: the count is the tighter limit.
    let by_count = RaftConfig {
        snapshot_keep_entries: 5,
        snapshot_keep_bytes_max: 1 << 20,
        ..cfg()
    };
    let mut c = Cluster::new(3, by_count, 20);
    let l = c.elect();
    for _ in 0..20 {
        c.propose(l, &big);
    }
    take_snapshot(&mut c, l);
    assert_eq!(c.node(l).first_index(), 17, "entries 17..=21 kept");
}

/// A follower that lags beyond the compacted log receives InstallSnapshot
/// (the core hands the host `snapshot_to_install`), and after
/// on_snapshot_installed it catches up by normal replication.
#[test]
fn lagging_follower_gets_snapshot_then_catches_up() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 5,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 21);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.partition(&[l], &[f]);
    for i in 0..30 {
        c.propose(l, &format!("s{i}"));
    }
    let meta = take_snapshot(&mut c, l);
    assert!(c.node(l).first_index() > c.node(f).last_index() + 1);
    c.propose(l, "after-snapshot");
    c.heal();
    c.host_mut(f).hold_snapshots = true;
    for _ in 0..5 {
        c.tick();
        if c.host(f).to_install.is_some() {
            break;
        }
    }
    assert_eq!(c.host(f).to_install.as_ref(), Some(&meta));
    assert!(c.sent.iter().any(|m| m.from == l
        && m.to == f
        && m.body == MessageBody::InstallSnapshot { meta: meta.clone() }));
    assert_eq!(peer_state(&c, l, f), ProgressState::Snapshot);
    let to_install = c.host_mut(f).to_install.take().unwrap();
    c.install_snapshot(f, to_install);
    c.settle();
    c.ticks(2);
    assert_eq!(c.node(f).snapshot_meta(), &meta);
    assert_eq!(c.node(f).first_index(), meta.index + 1);
    assert_eq!(c.node(f).last_index(), c.node(l).last_index());
    assert_eq!(c.node(f).commit_index(), c.node(l).commit_index());
    assert_eq!(c.applied_index(f), c.node(l).last_index());
    assert_eq!(peer_state(&c, l, f), ProgressState::Replicate);
}

/// InstallSnapshot on a follower: its log suffix after last_included_index
/// survives when the entry at that index matches the snapshot's term;
/// otherwise the whole log is discarded.
#[test]
fn install_snapshot_keeps_matching_suffix_and_discards_otherwise() {
    for (snap_term, want_last) in [(1, 5), (2, 3)] {
        let restore = restore_log(1, 0, &[1, 1, 1, 1, 1], &[1, 2, 3]);
        let mut n = RaftNode::new(GROUP, 2, cfg(), Box::new(SplitMix64(1)), restore).unwrap();
        let meta = SnapshotMeta {
            index: 3,
            term: snap_term,
            conf: Configuration::new([1, 2, 3]),
        };
        n.step(msg(
            1,
            2,
            snap_term,
            MessageBody::InstallSnapshot { meta: meta.clone() },
        ));
        let mut rd = n.ready();
        if let Some(w) = rd.write.take() {
            // A newer term is stored first; the snapshot waits for it.
            assert!(rd.snapshot_to_install.is_none(), "term {snap_term}");
            n.on_write_durable(w.seq);
            rd = n.ready();
        }
        assert_eq!(rd.snapshot_to_install.as_ref(), Some(&meta));
        n.on_snapshot_installed(meta.clone());
        assert_eq!(n.first_index(), 4, "term {snap_term}");
        assert_eq!(n.last_index(), want_last, "term {snap_term}");
        assert_eq!(n.term_at(3), Some(snap_term));
        assert_eq!(n.commit_index(), 3);
        assert_eq!(n.snapshot_meta(), &meta);
        let rd = n.ready();
        let w = rd.write.expect("a write carries the compaction");
        assert_eq!(w.compact, Some((3, snap_term)));
        n.on_write_durable(w.seq);
        let out = drive(&mut n);
        assert!(out.iter().any(|m| m.to == 1
            && m.body
                == MessageBody::InstallSnapshotResponse {
                    index: 3,
                    success: true
                }));
    }
}

/// A snapshot that arrives with a newer term is handed to the host only after
/// the hard state carrying that term is durable: the install makes the
/// snapshot durable by itself, so installing first could leave a crash with a
/// snapshot from a term above the stored one. The same holds for any write
/// still on its way to the disk.
#[test]
fn snapshot_from_a_newer_term_waits_until_that_term_is_durable() {
    let restore = restore_log(1, 0, &[1, 1, 1], &[1, 2, 3]);
    let mut n = RaftNode::new(GROUP, 2, cfg(), Box::new(SplitMix64(1)), restore).unwrap();
    let meta = SnapshotMeta {
        index: 10,
        term: 3,
        conf: Configuration::new([1, 2, 3]),
    };
    n.step(msg(
        1,
        2,
        3,
        MessageBody::InstallSnapshot { meta: meta.clone() },
    ));
    let rd = n.ready();
    let w = rd.write.expect("the new term is written");
    assert_eq!(w.hard_state.map(|h| h.term), Some(3));
    assert!(
        rd.snapshot_to_install.is_none(),
        "installed before its term is durable"
    );
    // Nothing else to do until the disk answers; asking again hands out nothing.
    assert!(!n.has_ready());
    assert!(n.ready().snapshot_to_install.is_none());
    n.on_write_durable(w.seq);
    assert!(n.has_ready());
    let rd = n.ready();
    assert_eq!(rd.snapshot_to_install.as_ref(), Some(&meta));
    assert!(rd.write.is_none());
    n.on_snapshot_installed(meta.clone());
    assert_eq!(n.snapshot_meta(), &meta);
    assert_eq!(n.term(), 3);
}

/// A leader with node `f` lagging behind a snapshot: (cluster, leader, f).
fn lagging_behind_snapshot(cfg: RaftConfig, seed: u64) -> (Cluster, NodeId, NodeId) {
    let mut c = Cluster::new(3, cfg, seed);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.partition(&[l], &[f]);
    for i in 0..30 {
        c.propose(l, &format!("s{i}"));
    }
    take_snapshot(&mut c, l);
    assert!(c.node(l).first_index() > c.node(f).last_index() + 1);
    (c, l, f)
}

fn snapshot_sends(c: &Cluster, to: NodeId) -> usize {
    c.count_sent(|m| m.to == to && matches!(m.body, MessageBody::InstallSnapshot { .. }))
}

/// A snapshot send that gets no answer within snapshot_timeout_ticks puts
/// the follower back to probe from what it acknowledged (it is not known to
/// hold the snapshot), so the snapshot is offered again.
#[test]
fn snapshot_timeout_returns_progress_to_probe() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 5,
        snapshot_timeout_ticks: 20,
        ..cfg()
    };
    let (mut c, l, f) = lagging_behind_snapshot(cfg, 22);
    c.heal();
    c.host_mut(f).hold_snapshots = true; // the install never completes
    c.tick();
    assert_eq!(peer_state(&c, l, f), ProgressState::Snapshot);
    assert_eq!(snapshot_sends(&c, f), 1);
    let matched = peer_match(&c, l, f);
    c.partition(&[l], &[f]);
    c.ticks(19);
    assert_eq!(peer_state(&c, l, f), ProgressState::Snapshot);
    c.tick();
    assert_eq!(peer_state(&c, l, f), ProgressState::Probe);
    let p = c
        .node(l)
        .status()
        .peers
        .into_iter()
        .find(|p| p.id == f)
        .unwrap();
    assert_eq!(
        p.next_index,
        matched + 1,
        "probe from the acknowledged index"
    );
    c.heal();
    c.tick();
    assert_eq!(snapshot_sends(&c, f), 2, "offered again after the timeout");
}

/// Same when the host reports that it could not deliver the snapshot.
#[test]
fn snapshot_failure_report_returns_progress_to_probe() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 5,
        ..cfg()
    };
    let (mut c, l, f) = lagging_behind_snapshot(cfg, 23);
    c.heal();
    c.filter = Some(Box::new(|m: &Message| {
        matches!(m.body, MessageBody::InstallSnapshot { .. })
    }));
    c.tick();
    assert_eq!(peer_state(&c, l, f), ProgressState::Snapshot);
    let matched = peer_match(&c, l, f);
    c.node_mut(l).report_snapshot_failed(f);
    let p = c
        .node(l)
        .status()
        .peers
        .into_iter()
        .find(|p| p.id == f)
        .unwrap();
    assert_eq!((p.state, p.next_index), (ProgressState::Probe, matched + 1));
    c.filter = None;
    c.ticks(2);
    assert_eq!(snapshot_sends(&c, f), 2);
    assert_eq!(c.node(f).last_index(), c.node(l).last_index());
}

// ======================================================================
// Membership
// ======================================================================

/// Four nodes, voters {1, 2, 3}; node 4 starts empty, waiting to be added.
fn four_with_spare(cfg: RaftConfig, seed: u64) -> (Cluster, NodeId) {
    let mut c = Cluster::with_members(&[1, 2, 3, 4], &[1, 2, 3], cfg, seed);
    let l = c.elect();
    assert_ne!(l, 4);
    (c, l)
}

/// add_peer: the new peer first catches up as a non-voter; the config
/// entry is appended only once it is within catchup_margin of the leader.
#[test]
fn add_peer_appends_config_only_after_catchup() {
    let cfg = RaftConfig {
        catchup_margin: 5,
        append_entries_max: 4,
        ..cfg()
    };
    let (mut c, l) = four_with_spare(cfg, 30);
    for i in 0..20 {
        c.propose(l, &format!("a{i}"));
    }
    let last = c.node(l).last_index();
    c.partition(&[l], &[4]);
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    c.ticks(5);
    // Still catching up: no config entry, the configuration is unchanged.
    assert_eq!(c.node(l).last_index(), last);
    assert!(c.node(l).status().conf_change_in_progress);
    assert_eq!(
        &c.node(l).conf().without_disks(),
        &Configuration::new([1, 2, 3])
    );
    // The peer being brought in is one the leader talks to; no other outsider is.
    assert!(c.node(l).is_peer(4) && c.node(l).is_peer(2));
    assert!(!c.node(l).is_peer(5));
    c.heal();
    c.ticks(5);
    let confs = config_entries(&c, l);
    assert_eq!(confs.len(), 1);
    let (ci, conf) = confs[0].clone();
    assert_eq!(conf.without_disks(), Configuration::new([1, 2, 3, 4]));
    assert_eq!(ci, last + 1);
    // When the entry first went out, node 4 had acknowledged an index
    // within the margin, and not at its first acknowledgement.
    let first_out = c
        .sent
        .iter()
        .position(|m| {
            matches!(&m.body, MessageBody::AppendEntries { entries, .. }
                if entries.iter().any(|e| e.index == ci))
        })
        .expect("config entry replicated");
    let acks: Vec<Index> = c.sent[..first_out]
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendEntriesResponse {
                success: true,
                match_index,
                ..
            } if m.from == 4 => Some(match_index),
            _ => None,
        })
        .collect();
    assert!(acks.iter().max().unwrap() + 5 >= last, "{acks:?}");
    assert!(acks[0] + 5 < last, "waited beyond the first ack: {acks:?}");
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    assert_eq!(
        &c.node(4).conf().without_disks(),
        &Configuration::new([1, 2, 3, 4])
    );
}

/// A new peer built from a snapshot is not timed out while the snapshot is on its way (a
/// whole volume takes far longer than catchup_timeout_ticks); the change completes once it
/// is installed.
#[test]
fn a_new_peer_receiving_a_snapshot_is_not_timed_out() {
    let cfg = RaftConfig {
        catchup_timeout_ticks: 30,
        snapshot_keep_entries: 5,
        snapshot_timeout_ticks: 1000,
        ..cfg()
    };
    let (mut c, l) = four_with_spare(cfg, 32);
    for i in 0..30 {
        c.propose(l, &format!("s{i}"));
    }
    take_snapshot(&mut c, l);
    assert!(c.node(l).first_index() > 1, "node 4 needs the snapshot");
    c.host_mut(4).hold_snapshots = true;
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    // Node 4 holds the snapshot (a long transfer) for three catch-up timeouts.
    c.ticks(90);
    assert!(c.host(4).to_install.is_some());
    assert_eq!(peer_state(&c, l, 4), ProgressState::Snapshot);
    assert!(c.node(l).status().conf_change_in_progress, "timed out");
    assert!(!c
        .events(l)
        .iter()
        .any(|e| matches!(e, Event::ConfChangeDone { .. })));
    let meta = c.host_mut(4).to_install.take().unwrap();
    c.install_snapshot(4, meta);
    c.settle();
    c.ticks(5);
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    assert_eq!(
        &c.node(l).conf().without_disks(),
        &Configuration::new([1, 2, 3, 4])
    );
}

/// A new peer that cannot catch up within catchup_timeout_ticks aborts the
/// change with CatchupTimeout; the configuration stays and a new change
/// may start.
#[test]
fn add_peer_catchup_timeout_aborts() {
    let cfg = RaftConfig {
        catchup_timeout_ticks: 30,
        ..cfg()
    };
    let (mut c, l) = four_with_spare(cfg, 31);
    c.partition(&[l], &[4]);
    let last = c.node(l).last_index();
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    let done = |c: &Cluster| {
        c.events(l)
            .iter()
            .filter(|e| matches!(e, Event::ConfChangeDone { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    c.ticks(29);
    assert!(done(&c).is_empty());
    c.tick();
    assert_eq!(
        done(&c),
        vec![Event::ConfChangeDone {
            result: Err(ConfChangeError::CatchupTimeout)
        }]
    );
    assert_eq!(
        &c.node(l).conf().without_disks(),
        &Configuration::new([1, 2, 3])
    );
    assert!(
        !c.node(l).is_peer(4),
        "an aborted peer is an outsider again"
    );
    assert!(config_entries(&c, l).is_empty());
    assert_eq!(c.node(l).last_index(), last);
    assert!(!c.node(l).status().conf_change_in_progress);
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
}

/// change_peers with two or more voter changes goes through the joint
/// configuration C_old,new and leaves it automatically for C_new.
#[test]
fn change_peers_goes_through_joint_config() {
    let mut c = Cluster::with_members(&[1, 2, 3, 4, 5], &[1, 2, 3], cfg(), 32);
    let l = c.elect();
    let target = voters(&[l, 4, 5]);
    let r = c.node_mut(l).change_peers(target.clone(), BTreeSet::new());
    assert!(matches!(r, Ok(ConfChangeStart::Started)));
    c.settle();
    c.ticks(5);
    let confs: Vec<Configuration> = config_entries(&c, l)
        .into_iter()
        .map(|(_, c)| c.without_disks())
        .collect();
    assert_eq!(
        confs,
        vec![
            Configuration {
                voters: target.clone(),
                voters_outgoing: voters(&[1, 2, 3]),
                ..Default::default()
            },
            Configuration::new(target.clone()),
        ]
    );
    assert_eq!(
        &c.node(l).conf().without_disks(),
        &Configuration::new(target.clone())
    );
    let committed: Vec<&Configuration> = c
        .events(l)
        .iter()
        .filter_map(|e| match e {
            // Not the first leader's binding of the bootstrap voters.
            Event::ConfigurationCommitted { conf, .. } if conf.without_disks() != c.bootstrap => {
                Some(conf)
            }
            _ => None,
        })
        .collect();
    assert_eq!(committed.len(), 2);
    assert!(committed[0].is_joint() && !committed[1].is_joint());
    let dones = c
        .events(l)
        .iter()
        .filter(|e| **e == Event::ConfChangeDone { result: Ok(()) })
        .count();
    assert_eq!(dones, 1, "one change, one completion");
    // The new configuration works: a proposal commits on l, 4 and 5.
    let idx = c.propose(l, "after");
    c.tick();
    for id in [4, 5] {
        assert!(c.node(id).commit_index() >= idx, "node {id}");
    }
}

/// While joint, a decision needs a majority of both the old and the new
/// voters: the old set alone cannot commit C_old,new, and another change is
/// refused (Busy) until the change completes.
#[test]
fn joint_config_needs_both_majorities() {
    let mut c = Cluster::with_members(&[1, 2, 3, 4, 5], &[1, 2, 3], cfg(), 36);
    let l = c.elect();
    // 4 and 5 never receive the joint entry (everything else gets through).
    c.rewrite = Some(Box::new(|m: &mut Message| {
        if m.to == 4 || m.to == 5 {
            if let MessageBody::AppendEntries { entries, .. } = &mut m.body {
                let joint = entries.iter().position(|e| {
                    e.kind == EntryKind::Config
                        && Configuration::decode(&e.data).unwrap().is_joint()
                });
                if let Some(i) = joint {
                    entries.truncate(i);
                }
            }
        }
    }));
    let target = voters(&[l, 4, 5]);
    let r = c.node_mut(l).change_peers(target.clone(), BTreeSet::new());
    assert!(matches!(r, Ok(ConfChangeStart::Started)));
    c.settle();
    c.ticks(3);
    let (ji, joint) = config_entries(&c, l)[0].clone();
    assert!(joint.is_joint());
    for id in [1, 2, 3] {
        assert!(c.node(id).last_index() >= ji, "old voter {id} has it");
    }
    assert!(
        c.node(l).commit_index() < ji,
        "old majority alone must not commit"
    );
    assert!(matches!(
        c.node_mut(l).remove_peer(4),
        Err(Error::Busy { .. })
    ));
    c.rewrite = None;
    c.ticks(3);
    assert!(c.node(l).commit_index() > ji);
    assert_eq!(
        &c.node(l).conf().without_disks(),
        &Configuration::new(target)
    );
}

/// A leader that change_peers removes (with other changes: joint) keeps
/// leading through the joint phase and steps down once C_new commits.
#[test]
fn leader_removed_by_joint_change_steps_down_after_commit() {
    let mut c = Cluster::with_members(&[1, 2, 3, 4, 5], &[1, 2, 3], cfg(), 37);
    let l = c.elect();
    let x = followers(&c, l).into_iter().find(|id| *id <= 3).unwrap();
    let target = voters(&[x, 4, 5]);
    let r = c.node_mut(l).change_peers(target.clone(), BTreeSet::new());
    assert!(matches!(r, Ok(ConfChangeStart::Started)));
    c.settle();
    let confs = config_entries(&c, l);
    assert_eq!(confs.len(), 2);
    assert!(confs[0].1.is_joint() && !confs[1].1.is_joint());
    assert!(c.node(l).commit_index() >= confs[1].0);
    assert_ne!(c.node(l).role(), Role::Leader);
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    c.ticks(60);
    let l2 = c.leader().expect("a new leader");
    assert!(target.contains(&l2));
    let idx = c.propose(l2, "after");
    assert!(c.node(l2).commit_index() >= idx);
}

/// Changing a single voter skips the joint phase.
#[test]
fn single_peer_change_skips_joint() {
    let (mut c, l) = four_with_spare(cfg(), 33);
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    c.settle();
    c.ticks(3);
    let confs = config_entries(&c, l);
    assert_eq!(confs.len(), 1);
    assert!(!confs[0].1.is_joint());
    assert_eq!(confs[0].1.without_disks(), Configuration::new([1, 2, 3, 4]));
    let f = followers(&c, l).into_iter().find(|x| *x != 4).unwrap();
    assert!(matches!(
        c.node_mut(l).remove_peer(f),
        Ok(ConfChangeStart::Started)
    ));
    c.settle();
    c.ticks(3);
    let confs = config_entries(&c, l);
    assert_eq!(confs.len(), 2);
    assert!(!confs[1].1.is_joint());
}

/// Learners receive the log but neither vote nor count toward commit.
#[test]
fn learners_replicate_but_do_not_vote_or_count() {
    let (mut c, l) = four_with_spare(cfg(), 34);
    assert!(matches!(
        c.node_mut(l).add_learner(4),
        Ok(ConfChangeStart::Started)
    ));
    c.settle();
    c.tick();
    assert_eq!(c.node(l).conf().learners, voters(&[4]));
    let a = c.propose(l, "a");
    assert_eq!(c.node(4).last_index(), a);
    let peer4 = c
        .node(l)
        .status()
        .peers
        .into_iter()
        .find(|p| p.id == 4)
        .unwrap();
    assert!(!peer4.voter);
    // Only the leader and the learner hold the next entry: not committed.
    let fs: Vec<NodeId> = [1, 2, 3].into_iter().filter(|x| *x != l).collect();
    c.partition(&[l, 4], &fs);
    let b = c.propose(l, "b");
    assert_eq!(peer_match(&c, l, 4), b);
    assert!(
        c.node(l).commit_index() < b,
        "a learner's ack does not count"
    );
    // The voters elect a new leader without ever asking the learner.
    c.ticks(40);
    let l2 = c.leader().unwrap();
    assert!(fs.contains(&l2));
    assert_eq!(
        c.count_sent(
            |m| (m.to == 4 || m.from == 4) && matches!(m.body, MessageBody::RequestVote { .. })
        ),
        0
    );
    assert_eq!(c.node(4).role(), Role::Follower);
}

/// One change at a time (Busy), only on the leader (NotLeader), and a
/// request for the current configuration is a no-op.
#[test]
fn conf_change_busy_notleader_and_noop() {
    let (mut c, l) = four_with_spare(cfg(), 35);
    let f = followers(&c, l).into_iter().find(|x| *x != 4).unwrap();
    match c.node_mut(f).add_peer(4) {
        Err(Error::NotLeader { leader, .. }) => assert_eq!(leader, Some(l)),
        r => panic!("follower accepted a change: {r:?}"),
    }
    c.partition(&[l], &[4]); // keeps the change in its catch-up phase
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    assert!(matches!(
        c.node_mut(l).remove_peer(f),
        Err(Error::Busy { .. })
    ));
    assert!(matches!(
        c.node_mut(l)
            .change_peers(voters(&[1, 2, 3, 4]), BTreeSet::new()),
        Err(Error::Busy { .. })
    ));
    assert!(matches!(
        c.node_mut(l).transfer_leadership(Some(f)),
        Err(Error::Busy { .. })
    ));
    c.heal();
    c.ticks(5);
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    // No-op: the configuration asked for is the current one.
    let cur = c.node(l).conf().clone();
    assert!(matches!(
        c.node_mut(l)
            .change_peers(cur.voters.clone(), cur.learners.clone()),
        Ok(ConfChangeStart::NoOp)
    ));
    assert!(matches!(
        c.node_mut(l).add_peer(f),
        Ok(ConfChangeStart::NoOp)
    ));
    assert!(!c.node(l).status().conf_change_in_progress);
    // A transfer in progress also makes a change busy.
    c.isolate(f);
    c.node_mut(l).transfer_leadership(Some(f)).unwrap();
    assert!(matches!(
        c.node_mut(l).remove_peer(4),
        Err(Error::Busy { .. })
    ));
}

/// A change interrupted by the loss of leadership reports LeadershipLost.
#[test]
fn conf_change_interrupted_by_stepdown_reports_leadership_lost() {
    let (mut c, l) = four_with_spare(cfg(), 38);
    c.partition(&[l], &[4]);
    assert!(matches!(
        c.node_mut(l).add_peer(4),
        Ok(ConfChangeStart::Started)
    ));
    c.isolate(l); // check-quorum deposes it during the catch-up
    c.ticks(2 * cfg().election_timeout_ticks);
    assert_ne!(c.node(l).role(), Role::Leader);
    assert!(c.events(l).contains(&Event::ConfChangeDone {
        result: Err(ConfChangeError::LeadershipLost)
    }));
}

// ======================================================================
// Leader transfer
// ======================================================================

/// Transfer to a given peer: proposals are refused meanwhile, TimeoutNow
/// goes out only once the target has the leader's whole log, and the target
/// wins term + 1 although the other follower is sticky.
#[test]
fn transfer_leadership_to_specific_peer() {
    let mut c = Cluster::new(3, cfg(), 40);
    let l = c.elect();
    let fs = followers(&c, l);
    let (t, o) = (fs[0], fs[1]);
    let term = c.node(l).term();
    c.partition(&[l], &[t]);
    for i in 0..3 {
        c.propose(l, &format!("x{i}"));
    }
    let last = c.node(l).last_index();
    assert!(c.node(t).last_index() < last);
    assert_eq!(c.node_mut(l).transfer_leadership(Some(t)).unwrap(), t);
    assert!(matches!(
        c.node_mut(l).propose(data("refused"), None),
        Err(Error::TransferInProgress { .. })
    ));
    c.settle();
    let timeout_now = |c: &Cluster| {
        c.sent
            .iter()
            .position(|m| m.body == MessageBody::TimeoutNow)
    };
    assert_eq!(timeout_now(&c), None, "target not caught up yet");
    c.heal();
    for _ in 0..5 {
        c.tick();
        if c.node(t).role() == Role::Leader {
            break;
        }
    }
    assert_eq!(c.node(t).role(), Role::Leader);
    assert_eq!(c.node(t).term(), term + 1);
    assert_eq!(c.node(o).leader(), Some(t));
    let at = timeout_now(&c).unwrap();
    assert_eq!((c.sent[at].from, c.sent[at].to), (l, t));
    assert_eq!(c.count_sent(|m| m.body == MessageBody::TimeoutNow), 1);
    // It was sent after t acknowledged the leader's last entry.
    let caught_up = c.sent[..at].iter().any(|m| {
        m.from == t
            && matches!(m.body, MessageBody::AppendEntriesResponse { success: true, match_index, .. }
                if match_index == last)
    });
    assert!(caught_up);
    // The campaign skipped pre-vote and was marked as a transfer, which is
    // what lets the sticky follower o grant it.
    assert!(c.sent.iter().any(|m| m.from == t
        && m.to == o
        && matches!(
            m.body,
            MessageBody::RequestVote {
                pre_vote: false,
                leadership_transfer: true,
                ..
            }
        )));
    assert!(c.events(l).contains(&Event::TransferEnded {
        target: t,
        succeeded: true
    }));
}

/// Transfer to ANY_PEER picks the most up-to-date voter.
#[test]
fn transfer_leadership_to_any_peer_picks_most_up_to_date() {
    let mut c = Cluster::new(5, cfg(), 41);
    let l = c.elect();
    let fs = followers(&c, l);
    // fs[0] and fs[1] lag behind fs[2] and fs[3]; fs[3] lags fs[2] by one.
    c.partition(&[l], &[fs[0], fs[1]]);
    c.propose(l, "a");
    c.partition(&[l], &[fs[3]]);
    c.propose(l, "b");
    assert_eq!(c.node_mut(l).transfer_leadership(None).unwrap(), fs[2]);
    c.heal();
    c.ticks(5);
    assert_eq!(c.leader(), Some(fs[2]));
}

/// If the target never takes over, the leader resumes accepting proposals
/// after an election timeout and reports the transfer failed.
#[test]
fn transfer_to_unreachable_target_resumes_after_election_timeout() {
    let mut c = Cluster::new(3, cfg(), 42);
    let l = c.elect();
    let t = followers(&c, l)[0];
    let term = c.node(l).term();
    c.isolate(t);
    c.node_mut(l).transfer_leadership(Some(t)).unwrap();
    c.ticks(cfg().election_timeout_ticks - 1);
    assert!(matches!(
        c.node_mut(l).propose(data("x"), None),
        Err(Error::TransferInProgress { .. })
    ));
    c.tick();
    assert!(c.events(l).contains(&Event::TransferEnded {
        target: t,
        succeeded: false
    }));
    assert!(c.node_mut(l).propose(data("x"), None).is_ok());
    assert_eq!(c.node(l).role(), Role::Leader);
    assert_eq!(c.node(l).term(), term);
}

// ======================================================================
// reset_peers
// ======================================================================

/// After losing two of three nodes for good, reset_peers({survivor}) lets
/// the survivor elect itself and commit; the forced configuration is the
/// first entry of its new term.
#[test]
fn reset_peers_lets_survivor_lead_alone() {
    let mut c = Cluster::new(3, cfg(), 50);
    let l = c.elect();
    c.propose(l, "before");
    let s = followers(&c, l)[0];
    for id in c.ids() {
        if id != s {
            c.host_mut(id).down = true;
        }
    }
    c.ticks(50);
    assert_ne!(c.node(s).role(), Role::Leader, "no quorum without reset");
    let commit = c.node(s).commit_index();
    let last = c.node(s).last_index();
    c.node_mut(s).reset_peers(voters(&[s])).unwrap();
    c.ticks(2);
    assert_eq!(c.node(s).role(), Role::Leader);
    assert_eq!(&c.node(s).conf().without_disks(), &Configuration::new([s]));
    let e = c
        .node(s)
        .entry(last + 1)
        .expect("forced config entry")
        .clone();
    assert_eq!(e.kind, EntryKind::Config);
    assert_eq!(e.term, c.node(s).term());
    assert_eq!(
        Configuration::decode(&e.data).unwrap().without_disks(),
        Configuration::new([s])
    );
    let idx = c.propose(s, "after");
    assert!(c.node(s).commit_index() >= idx && idx > commit);
    assert_eq!(c.applied_index(s), idx);
}

// ======================================================================
// Readonly mode
// ======================================================================

/// A readonly leader refuses proposals but serves reads and configuration
/// changes.
#[test]
fn readonly_leader_refuses_writes_but_serves_reads_and_conf_changes() {
    let (mut c, l) = four_with_spare(cfg(), 60);
    c.node_mut(l).set_readonly(true);
    assert!(c.node(l).is_readonly());
    assert!(matches!(
        c.node_mut(l).propose(data("w"), None),
        Err(Error::ReadOnly { .. })
    ));
    let commit = c.node(l).commit_index();
    c.node_mut(l).read_index(7).unwrap();
    c.settle();
    assert_eq!(read_ready(&c, l, 7), Some(commit));
    assert!(matches!(
        c.node_mut(l).add_learner(4),
        Ok(ConfChangeStart::Started)
    ));
    c.settle();
    c.tick();
    assert!(c
        .events(l)
        .contains(&Event::ConfChangeDone { result: Ok(()) }));
    assert_eq!(c.node(l).conf().learners, voters(&[4]));
    c.node_mut(l).set_readonly(false);
    assert!(c.node_mut(l).propose(data("w"), None).is_ok());
}

/// A readonly follower stops receiving new entries (the others still
/// commit), and catches up once it leaves readonly mode.
#[test]
fn readonly_follower_gets_no_new_entries_until_it_leaves() {
    let mut c = Cluster::new(3, cfg(), 61);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.node_mut(f).set_readonly(true);
    c.tick(); // f tells the leader in its heartbeat response
    let p = c
        .node(l)
        .status()
        .peers
        .into_iter()
        .find(|p| p.id == f)
        .unwrap();
    assert!(p.readonly);
    assert!(!c.node(l).is_readonly(), "two writable voters of three");
    let f_last = c.node(f).last_index();
    let mut idx = 0;
    for i in 0..3 {
        idx = c.propose(l, &format!("r{i}"));
    }
    c.tick();
    assert_eq!(c.node(l).commit_index(), idx);
    assert_eq!(c.node(f).last_index(), f_last);
    c.node_mut(f).set_readonly(false);
    c.ticks(2);
    assert_eq!(c.node(f).last_index(), idx);
}

/// A leader is readonly when fewer than a majority of voters are writable.
#[test]
fn leader_readonly_when_writable_voters_below_majority() {
    let mut c = Cluster::new(3, cfg(), 62);
    let l = c.elect();
    let fs = followers(&c, l);
    for &f in &fs {
        c.node_mut(f).set_readonly(true);
    }
    c.tick();
    assert!(c.node(l).is_readonly());
    assert!(c.node(l).status().readonly);
    assert!(matches!(
        c.node_mut(l).propose(data("w"), None),
        Err(Error::ReadOnly { .. })
    ));
    c.node_mut(fs[0]).set_readonly(false);
    c.tick();
    assert!(!c.node(l).is_readonly());
    assert!(c.node_mut(l).propose(data("w"), None).is_ok());
}

// ======================================================================
// vote(election_timeout)
// ======================================================================

/// vote() makes the node campaign at its next tick; with logs equal (and
/// no live leader holding the others) it wins.
#[test]
fn vote_hint_campaigns_at_next_tick_and_wins() {
    let mut c = Cluster::new(3, cfg(), 70);
    let l = c.elect();
    let term = c.node(l).term();
    let fs = followers(&c, l);
    let h = fs[1];
    c.host_mut(l).down = true;
    // The followers outlive their stickiness but have not timed out yet.
    c.ticks(cfg().election_timeout_ticks);
    for &f in &fs {
        assert_eq!(
            c.node(f).role(),
            Role::Follower,
            "seed: node {f} timed out early"
        );
        assert_eq!(c.node(f).last_index(), c.node(l).last_index());
    }
    c.node_mut(h).vote(cfg().election_timeout_ticks).unwrap();
    c.tick();
    assert_eq!(c.node(h).role(), Role::Leader);
    assert_eq!(c.node(h).term(), term + 1);
    assert!(matches!(
        c.node_mut(fs[0]).vote(1),
        Err(Error::Invalid { .. })
    ));
}

// ======================================================================
// Reads
// ======================================================================

/// ReadIndex answers after a heartbeat round started after the read is
/// acknowledged by a quorum, with the commit index at the read's arrival.
#[test]
fn read_index_needs_quorum_heartbeat_and_uses_commit_at_arrival() {
    let mut c = Cluster::new(3, cfg(), 80);
    let l = c.elect();
    let commit = c.propose(l, "a");
    assert_eq!(c.node(l).commit_index(), commit);
    let fs = followers(&c, l);
    c.auto_deliver = false;
    c.node_mut(l).read_index(7).unwrap();
    c.node_mut(l).propose(data("b"), None).unwrap();
    let out = c.take_queued();
    let (hbs, appends): (Vec<Message>, Vec<Message>) = out
        .into_iter()
        .partition(|m| matches!(m.body, MessageBody::Heartbeat { .. }));
    assert_eq!(hbs.len(), 2);
    // Acks of the older round (the appends) commit "b" but do not confirm
    // the read.
    for m in appends {
        c.inject(m);
    }
    for m in c.take_queued() {
        c.inject(m);
    }
    c.process(l);
    assert_eq!(c.node(l).commit_index(), commit + 1);
    assert_eq!(read_ready(&c, l, 7), None);
    // One follower acking the new round makes a quorum with the leader.
    let hb = hbs.into_iter().find(|m| m.to == fs[0]).unwrap();
    c.inject(hb);
    let resp = c.take_queued();
    assert_eq!(resp.len(), 1);
    c.inject(resp.into_iter().next().unwrap());
    assert_eq!(read_ready(&c, l, 7), Some(commit), "commit at arrival");
}

/// A single-voter group answers ReadIndex on its own.
#[test]
fn read_index_on_single_voter_group() {
    let mut c = Cluster::new(1, cfg(), 85);
    let l = c.elect();
    let idx = c.propose(l, "a");
    c.node_mut(l).read_index(4).unwrap();
    c.settle();
    assert_eq!(read_ready(&c, l, 4), Some(idx));
}

/// A new leader serves no read until it has committed an entry of its own
/// term (its commit index may lag the previous leader's).
#[test]
fn read_index_waits_for_leader_to_commit_in_its_term() {
    let mut c = Cluster::new(3, cfg(), 81);
    let l1 = c.elect();
    c.propose(l1, "a");
    // The next leader's appends never arrive; heartbeats do.
    c.filter = Some(Box::new(|m: &Message| is_append(m)));
    c.isolate(l1);
    let mut l2 = None;
    for _ in 0..60 {
        c.tick();
        l2 = c.leaders().into_iter().find(|x| *x != l1);
        if l2.is_some() {
            break;
        }
    }
    let l2 = l2.expect("new leader");
    let noop = c.node(l2).last_index();
    assert_eq!(c.node(l2).term_at(noop), Some(c.node(l2).term()));
    c.node_mut(l2).read_index(9).unwrap();
    c.ticks(3);
    assert!(c.node(l2).commit_index() < noop);
    assert_eq!(
        read_ready(&c, l2, 9),
        None,
        "no entry of its term committed"
    );
    c.filter = None;
    c.ticks(3);
    assert_eq!(read_ready(&c, l2, 9), Some(noop));
}

/// A leader deposed without knowing it (partitioned, no check-quorum)
/// never answers ReadIndex; it fails the read once it learns the new term.
#[test]
fn deposed_leader_never_answers_read_index() {
    let cfg = RaftConfig {
        check_quorum: false,
        lease_read: false,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 82);
    let l = c.elect();
    c.isolate(l);
    let mut l2 = None;
    for _ in 0..60 {
        c.tick();
        l2 = c.leaders().into_iter().find(|x| *x != l);
        if l2.is_some() {
            break;
        }
    }
    let l2 = l2.expect("new leader");
    c.propose(l2, "newer");
    assert_eq!(c.node(l).role(), Role::Leader, "unaware");
    c.node_mut(l).read_index(5).unwrap();
    c.ticks(50);
    assert_eq!(read_ready(&c, l, 5), None);
    c.heal();
    c.ticks(2);
    assert_ne!(c.node(l).role(), Role::Leader);
    assert_eq!(read_ready(&c, l, 5), None);
    assert!(c.events(l).contains(&Event::ReadIndexFailed {
        ctx: 5,
        reason: raftlog::core::ReadFailure::NotLeader
    }));
}

/// Lease read: answered at once (no messages) while the lease holds; when
/// the lease expired, it falls back to ReadIndex.
#[test]
fn lease_read_within_lease_and_fallback_after_expiry() {
    let mut c = Cluster::new(3, cfg(), 83);
    let l = c.elect();
    c.ticks(2);
    let commit = c.node(l).commit_index();
    c.auto_deliver = false;
    assert!(c.node(l).lease_valid());
    c.node_mut(l).lease_read(1).unwrap();
    c.process(l);
    assert_eq!(read_ready(&c, l, 1), Some(commit));
    assert!(c.take_queued().is_empty(), "no heartbeat round needed");
    c.auto_deliver = true;
    // Cut off, the lease (election timeout - max drift = 8 ticks from the
    // start of the last acknowledged round) runs out.
    c.isolate(l);
    c.ticks(7);
    assert!(c.node(l).lease_valid());
    c.tick();
    assert!(!c.node(l).lease_valid());
    assert_eq!(c.node(l).role(), Role::Leader);
    c.node_mut(l).lease_read(2).unwrap();
    c.settle();
    assert_eq!(read_ready(&c, l, 2), None, "fell back to ReadIndex");
    c.heal();
    c.tick();
    assert_eq!(read_ready(&c, l, 2), Some(commit));
}

/// After a transfer's TimeoutNow the target may win without waiting for
/// the lease, so the lease is no longer trusted.
#[test]
fn lease_read_falls_back_after_timeout_now() {
    let mut c = Cluster::new(3, cfg(), 84);
    let l = c.elect();
    c.ticks(2);
    let t = followers(&c, l)[0];
    c.auto_deliver = false;
    assert!(c.node(l).lease_valid());
    c.node_mut(l).transfer_leadership(Some(t)).unwrap();
    c.process(l);
    assert!(c.queue.iter().any(|m| m.body == MessageBody::TimeoutNow));
    assert!(!c.node(l).lease_valid());
    c.node_mut(l).lease_read(3).unwrap();
    c.process(l);
    assert_eq!(read_ready(&c, l, 3), None);
}

// ======================================================================
// Hibernation: quiescent() and resume()
// ======================================================================

fn quiescent_all(c: &Cluster) -> Vec<Option<(Index, Term)>> {
    c.ids().iter().map(|id| c.node(*id).quiescent()).collect()
}

/// A leader is quiescent only once every follower matches its last entry
/// and acknowledged a heartbeat round started after the commit index moved
/// (so it learned that commit index); then leader and followers report the
/// same (index, term).
#[test]
fn quiescent_once_followers_acknowledged_the_settled_commit() {
    let mut c = Cluster::new(3, cfg(), 120);
    let l = c.elect();
    c.tick();
    let last = c.node(l).last_index();
    let term = c.node(l).term();
    assert_eq!(quiescent_all(&c), vec![Some((last, term)); 3]);
    // A proposal: not quiescent while it is in flight.
    c.auto_deliver = false;
    c.node_mut(l).propose(data("x"), None).unwrap();
    c.process(l);
    assert_eq!(c.node(l).quiescent(), None, "entry not replicated yet");
    // Delivered and committed on the leader; the followers learn the commit
    // index from the next heartbeat.
    c.auto_deliver = true;
    c.settle();
    assert_eq!(c.node(l).commit_index(), last + 1);
    for f in followers(&c, l) {
        assert_eq!(c.node(f).commit_index(), last);
        assert_eq!(c.node(f).quiescent(), None, "node {f} lacks the commit");
    }
    assert_eq!(
        c.node(l).quiescent(),
        None,
        "no round acked since the commit"
    );
    c.tick();
    assert_eq!(quiescent_all(&c), vec![Some((last + 1, term)); 3]);
}

/// A leader may leave out members the host knows are down
/// (`quiescent_without`): a follower cut off while an entry was proposed keeps
/// `quiescent()` from holding, but not `quiescent_without` that follower, as
/// long as the leader and the rest are a majority of the voters; the other
/// follower must still match, and the result is the point it matches at.
#[test]
fn quiescent_without_absent_members_needs_a_live_majority() {
    let mut c = Cluster::new(3, cfg(), 122);
    let l = c.elect();
    let fs = followers(&c, l);
    c.isolate(fs[0]);
    c.propose(l, "x");
    c.ticks(3);
    let last = c.node(l).last_index();
    let term = c.node(l).term();
    assert_eq!(c.node(l).commit_index(), last);
    assert_eq!(c.node(l).quiescent(), None, "node {} lags", fs[0]);
    let absent: BTreeSet<NodeId> = [fs[0]].into();
    assert_eq!(c.node(l).quiescent_without(&absent), Some((last, term)));
    assert_eq!(c.node(fs[1]).quiescent(), Some((last, term)));
    // Leaving out the follower that does match changes nothing; leaving out
    // both leaves the leader alone, not a majority.
    let other: BTreeSet<NodeId> = [fs[1]].into();
    assert_eq!(
        c.node(l).quiescent_without(&other),
        None,
        "node {} lags",
        fs[0]
    );
    let both: BTreeSet<NodeId> = fs.iter().copied().collect();
    assert_eq!(c.node(l).quiescent_without(&both), None, "no majority");
}

/// A follower that lags (cut off while an entry was proposed), a pending
/// read and a transfer each keep the leader from being quiescent.
#[test]
fn quiescent_needs_every_follower_caught_up_and_nothing_pending() {
    let mut c = Cluster::new(3, cfg(), 121);
    let l = c.elect();
    let fs = followers(&c, l);
    c.tick();
    assert!(c.node(l).quiescent().is_some());
    c.isolate(fs[0]);
    c.propose(l, "x");
    c.ticks(3);
    assert!(c.node(l).commit_index() == c.node(l).last_index());
    assert_eq!(c.node(l).quiescent(), None, "node {} lags", fs[0]);
    assert_eq!(
        c.node(fs[0]).quiescent(),
        Some((c.node(fs[0]).last_index(), 1))
    );
    c.heal();
    c.ticks(2);
    assert!(c.node(l).quiescent().is_some());
    // A read waiting for its heartbeat round.
    c.auto_deliver = false;
    c.node_mut(l).read_index(7).unwrap();
    c.process(l);
    assert_eq!(c.node(l).quiescent(), None, "read pending");
    c.auto_deliver = true;
    c.settle();
    assert!(read_ready(&c, l, 7).is_some());
    c.tick();
    assert!(c.node(l).quiescent().is_some());
    // A transfer in progress.
    c.cut.insert((l, fs[1]));
    c.node_mut(l).transfer_leadership(Some(fs[1])).unwrap();
    c.settle();
    assert_eq!(c.node(l).quiescent(), None, "transfer pending");
    // Candidates are never quiescent.
    c.heal();
    c.isolate(fs[0]);
    for _ in 0..2 * cfg().election_timeout_ticks {
        c.node_mut(fs[0]).tick();
        if c.node(fs[0]).role() != Role::Follower {
            break;
        }
    }
    assert_eq!(c.node(fs[0]).role(), Role::PreCandidate);
    assert_eq!(c.node(fs[0]).quiescent(), None);
}

/// A resumed leader serves no lease read from a round acknowledged before
/// the pause: it heartbeats at once and the lease holds again only once a
/// quorum acknowledged that new round.
#[test]
fn resumed_leader_does_not_trust_its_old_lease() {
    let mut c = Cluster::new(3, cfg(), 122);
    let l = c.elect();
    c.tick();
    assert!(c.node(l).quiescent().is_some());
    assert!(c.node(l).lease_valid());
    // (The host stops ticking; real time passes; the host resumes.)
    c.auto_deliver = false;
    c.node_mut(l).resume(false);
    assert!(!c.node(l).lease_valid(), "lease from before the pause");
    let out = c.take_queued();
    let hb: Vec<NodeId> = out
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .map(|m| m.to)
        .collect();
    assert_eq!(hb.len(), 2, "heartbeats to both followers at once: {out:?}");
    for m in out {
        c.queue.push_back(m);
    }
    c.node_mut(l).lease_read(1).unwrap();
    c.process(l);
    assert_eq!(read_ready(&c, l, 1), None, "waits for a new round");
    c.auto_deliver = true;
    c.settle();
    assert!(read_ready(&c, l, 1).is_some());
    assert!(c.node(l).lease_valid(), "lease from the new round");
}

/// A resumed leader that can no longer reach a quorum steps down within one
/// election timeout: acknowledgements from before the pause do not count for
/// check-quorum.
#[test]
fn resumed_isolated_leader_steps_down_within_one_election_timeout() {
    let mut c = Cluster::new(3, cfg(), 123);
    let l = c.elect();
    c.tick();
    // A tick and its heartbeat round: the followers are recently active.
    c.isolate(l);
    c.node_mut(l).resume(false);
    let et = cfg().election_timeout_ticks;
    let mut stepped = None;
    for t in 1..=et {
        c.node_mut(l).tick();
        c.settle();
        if c.node(l).role() != Role::Leader {
            stepped = Some(t);
            break;
        }
    }
    assert_eq!(stepped, Some(et), "steps down at the first check");
}

/// A follower resumed after its leader's node was silent for an election
/// timeout grants votes at once (no stickiness, no start-up withholding) and
/// campaigns within one more election timeout; resumed without that
/// knowledge it stays sticky to the leader it knows.
#[test]
fn follower_resumed_after_leader_silence_votes_and_campaigns() {
    let mut c = Cluster::new(3, cfg(), 124);
    let l = c.elect();
    c.tick();
    let fs = followers(&c, l);
    let (f, g) = (fs[0], fs[1]);
    let term = c.node(f).term();
    let (li, lt) = (
        c.node(g).last_index(),
        c.node(g).term_at(c.node(g).last_index()).unwrap(),
    );
    // The leader's node dies while the group hibernates: nobody ticks.
    c.hosts.get_mut(&l).unwrap().down = true;
    c.auto_deliver = false;
    c.node_mut(f).resume(false);
    c.inject(msg(g, f, term + 1, vote_req(true, li, lt)));
    assert_eq!(
        vote_resp(&c.take_queued(), g, true),
        Some((false, term)),
        "sticky"
    );
    c.node_mut(f).resume(true);
    c.inject(msg(g, f, term + 1, vote_req(true, li, lt)));
    assert_eq!(vote_resp(&c.take_queued(), g, true), Some((true, term + 1)));
    // Both survivors resumed that way elect a leader within one election
    // timeout of ticks.
    c.auto_deliver = true;
    c.node_mut(g).resume(true);
    let mut elected = None;
    for t in 1..=cfg().election_timeout_ticks {
        c.tick_only(&[f, g]);
        if let Some(n) = [f, g]
            .into_iter()
            .find(|n| c.node(*n).role() == Role::Leader)
        {
            elected = Some((n, t));
            break;
        }
    }
    let (n, _) = elected.expect("a survivor leads within one election timeout");
    assert_eq!(c.node(n).term(), term + 1);
}

/// Without `leader_silent` a restarted node keeps withholding its vote for
/// its first election timeout even when resumed; with it, the host's
/// measured silence (since its own start) lifts that.
#[test]
fn resume_with_leader_silent_ends_the_start_up_vote_withholding() {
    let mut c = Cluster::new(3, cfg(), 125);
    let l = c.elect();
    c.tick();
    let fs = followers(&c, l);
    let (f, g) = (fs[0], fs[1]);
    c.restart(f);
    c.tick();
    assert_eq!(c.node(f).leader(), Some(l));
    let term = c.node(f).term();
    let (li, lt) = (
        c.node(g).last_index(),
        c.node(g).term_at(c.node(g).last_index()).unwrap(),
    );
    c.auto_deliver = false;
    c.hosts.get_mut(&l).unwrap().down = true;
    // Even with an expired election timer the start-up window would hold.
    c.node_mut(f).resume(true);
    c.inject(msg(g, f, term + 1, vote_req(true, li, lt)));
    assert_eq!(vote_resp(&c.take_queued(), g, true), Some((true, term + 1)));
}

// ======================================================================
// Proposals
// ======================================================================

#[test]
fn propose_with_stale_expected_term_is_refused() {
    let mut c = Cluster::new(3, cfg(), 90);
    let l = c.elect();
    let term = c.node(l).term();
    let last = c.node(l).last_index();
    match c.node_mut(l).propose(data("x"), Some(term + 1)) {
        Err(Error::TermMismatch {
            expected, current, ..
        }) => assert_eq!((expected, current), (term + 1, term)),
        r => panic!("{r:?}"),
    }
    assert_eq!(c.node(l).last_index(), last, "nothing appended");
    assert_eq!(
        c.node_mut(l).propose(data("x"), Some(term)).unwrap(),
        (last + 1, term)
    );
}

#[test]
fn propose_on_follower_is_refused_with_leader_hint() {
    let mut c = Cluster::new(3, cfg(), 91);
    let l = c.elect();
    let f = followers(&c, l)[0];
    match c.node_mut(f).propose(data("x"), None) {
        Err(Error::NotLeader { leader, .. }) => assert_eq!(leader, Some(l)),
        r => panic!("{r:?}"),
    }
}

#[test]
fn proposals_beyond_uncommitted_max_are_refused() {
    let cfg = RaftConfig {
        uncommitted_entries_max: 3,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 92);
    let l = c.elect();
    for f in followers(&c, l) {
        c.cut.insert((l, f));
    }
    for _ in 0..3 {
        c.node_mut(l).propose(data("x"), None).unwrap();
    }
    match c.node_mut(l).propose(data("x"), None) {
        Err(Error::ProposalQueueFull { pending, max, .. }) => assert_eq!((pending, max), (3, 3)),
        r => panic!("{r:?}"),
    }
    c.heal();
    c.ticks(2);
    assert!(c.node_mut(l).propose(data("x"), None).is_ok());
}

// ======================================================================
// Status
// ======================================================================

/// The braft raft_stat fields are filled in.
#[test]
fn status_reports_raft_stat_fields() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 3,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 100);
    let l = c.elect();
    for i in 0..10 {
        c.propose(l, &format!("s{i}"));
    }
    take_snapshot(&mut c, l); // at 11
    c.host_mut(l).stalled = true;
    c.propose(l, "undurable");
    let st = c.node(l).status();
    assert_eq!(st.group, GROUP);
    assert_eq!(st.id, l);
    assert_eq!(st.state, Role::Leader);
    assert_eq!(st.term, 1);
    assert_eq!(st.leader, Some(l));
    assert_eq!(st.conf.without_disks(), Configuration::new([1, 2, 3]));
    assert_eq!(st.first_log_index, 9);
    assert_eq!(st.last_log_index, 12);
    assert_eq!(st.disk_index, 11);
    assert_eq!(st.known_applied_index, 11);
    assert_eq!(st.last_committed_index, 12);
    assert_eq!((st.last_snapshot_index, st.last_snapshot_term), (11, 1));
    assert!(!st.readonly);
    assert_eq!(st.transferring_to, None);
    assert!(!st.conf_change_in_progress);
    let ids: Vec<NodeId> = st.peers.iter().map(|p| p.id).collect();
    assert_eq!(ids, followers(&c, l));
    for p in &st.peers {
        assert_eq!((p.next_index, p.match_index), (13, 12), "peer {}", p.id);
        assert_eq!(p.state, ProgressState::Replicate);
        assert!(p.voter && !p.readonly);
    }
    let f = followers(&c, l)[0];
    let fs = c.node(f).status();
    assert_eq!((fs.state, fs.leader, fs.term), (Role::Follower, Some(l), 1));
    assert_eq!((fs.last_log_index, fs.disk_index), (12, 12));
    assert!(fs.peers.is_empty());
}

// ======================================================================
// Restart
// ======================================================================

/// A node restarted from its durable hard state and log comes back with
/// the same term, vote and log, and rejoins without disturbing the leader.
#[test]
fn restart_restores_term_vote_and_log() {
    let mut c = Cluster::new(3, cfg(), 110);
    let l = c.elect();
    for i in 0..5 {
        c.propose(l, &format!("r{i}"));
    }
    let term = c.node(l).term();
    let f = followers(&c, l)
        .into_iter()
        .find(|f| c.host(*f).disk.hard_state.vote == l)
        .expect("a follower voted for the leader");
    let log: Vec<Option<Term>> = (1..=c.node(f).last_index())
        .map(|i| c.node(f).term_at(i))
        .collect();
    c.restart(f);
    assert_eq!(c.node(f).term(), term);
    assert_eq!(c.node(f).role(), Role::Follower);
    let log2: Vec<Option<Term>> = (1..=c.node(f).last_index())
        .map(|i| c.node(f).term_at(i))
        .collect();
    assert_eq!(log2, log);
    assert_eq!(c.node(f).durable_index(), log.len() as Index);
    // The vote came back too: a same-term candidate is refused (a node
    // that had not voted in this term would grant).
    let o = followers(&c, l).into_iter().find(|x| *x != f).unwrap();
    c.auto_deliver = false;
    for _ in 0..cfg().election_timeout_ticks {
        c.node_mut(f).tick();
    }
    c.drop_queued();
    let (li, lt) = (
        c.node(o).last_index(),
        c.node(o).term_at(c.node(o).last_index()).unwrap(),
    );
    c.inject(msg(o, f, term, vote_req(false, li, lt)));
    let out = c.take_queued();
    assert_eq!(vote_resp(&out, o, false), Some((false, term)));
    c.auto_deliver = true;
    c.ticks(3);
    assert_eq!(c.leader(), Some(l));
    assert_eq!(c.node(l).term(), term);
    assert_eq!(c.node(f).commit_index(), c.node(l).commit_index());
}

/// A node restarted from a snapshot plus a log suffix starts at the
/// snapshot (applied = snapshot index) with the suffix intact.
#[test]
fn restart_from_snapshot_and_log_suffix() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 2,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg, 111);
    let l = c.elect();
    for i in 0..8 {
        c.propose(l, &format!("r{i}"));
    }
    c.tick();
    let f = followers(&c, l)[0];
    let meta = take_snapshot(&mut c, f);
    for i in 0..3 {
        c.propose(l, &format!("t{i}"));
    }
    let last = c.node(f).last_index();
    assert!(last > meta.index);
    let first = c.node(f).first_index();
    assert_eq!(
        first,
        meta.index - 2 + 1,
        "two entries kept below the snapshot"
    );
    let log: Vec<Entry> = (first..=last)
        .map(|i| c.node(f).entry(i).unwrap().clone())
        .collect();
    c.restart(f);
    let n = c.node(f);
    assert_eq!(n.snapshot_meta(), &meta);
    assert_eq!(n.applied_index(), meta.index);
    assert_eq!(n.commit_index(), meta.index);
    assert_eq!(n.term_at(meta.index), Some(meta.term));
    // The same log, including the entries kept below the snapshot for
    // followers that lag a little.
    assert_eq!(n.first_index(), first);
    assert_eq!(n.last_index(), last);
    for e in &log {
        assert_eq!(n.entry(e.index), Some(e));
    }
    assert_eq!(&n.conf().without_disks(), &Configuration::new([1, 2, 3]));
    c.ticks(3);
    assert_eq!(c.node(f).commit_index(), c.node(l).commit_index());
    assert_eq!(c.node(f).applied_index(), c.node(l).commit_index());
}

/// A node that crashed after its snapshot became durable but before the
/// log's compaction did restarts with a snapshot beyond a log that does not
/// reach it. The core starts after the snapshot and must tell the store to
/// discard the stale log, or the next append would not attach to it.
#[test]
fn restart_with_snapshot_beyond_a_stale_log_compacts_the_store() {
    let cfg = RaftConfig {
        snapshot_keep_entries: 2,
        ..cfg()
    };
    let mut c = Cluster::new(3, cfg.clone(), 112);
    let l = c.elect();
    let f = followers(&c, l)[0];
    c.partition(&[l], &[f]);
    for i in 0..10 {
        c.propose(l, &format!("r{i}"));
    }
    let meta = take_snapshot(&mut c, l);
    c.propose(l, "after");
    // f holds the snapshot durably, but its store still holds only the
    // old short log (the compaction write was lost in the crash).
    let stale = c.host(f).disk.clone();
    assert!(stale.last_index() < meta.index);
    let restore = Restore {
        hard_state: stale.hard_state,
        snapshot: Some(meta.clone()),
        compacted: stale.compacted,
        entries: stale.entries.clone(),
        bootstrap: c.bootstrap.clone(),
        new_disk: 0,
    };
    c.start_with(f, cfg, restore);
    // Keep the stale store as it was (start_with trims the harness disk).
    c.host_mut(f).disk = Disk {
        snapshot: Some(meta.clone()),
        ..stale
    };
    assert_eq!(c.node(f).first_index(), meta.index + 1);
    c.process(f);
    assert_eq!(c.host(f).disk.compacted, (meta.index, meta.term));
    assert!(c.host(f).disk.entries.is_empty(), "stale log discarded");
    c.heal();
    c.ticks(3);
    assert_eq!(c.node(f).last_index(), c.node(l).last_index());
    assert_eq!(c.host(f).disk.last_index(), c.node(l).last_index());
}
