//! Storage identity: a replica that comes back on other storage (wiped, replaced) or with an
//! older copy of its own (restored from a backup) is not the member that voted and acknowledged.
//! The leader probes it from scratch, counts it toward no quorum, demotes it to a rebuilding
//! learner and makes it a voter again once it holds the committed log; a wiped voter refuses
//! votes from candidates that know it by its old disk id.

mod common;

use common::*;
use raftlog::core::{BrokenRule, Configuration, EntryKind, MessageBody, NodeId, RaftConfig, Role};

fn cfg() -> RaftConfig {
    RaftConfig::default()
}

fn peer(c: &Cluster, leader: NodeId, id: NodeId) -> raftlog::core::PeerStatus {
    c.node(leader)
        .status()
        .peers
        .into_iter()
        .find(|p| p.id == id)
        .expect("leader tracks the peer")
}

/// Ticks until `done` holds (at most `max` ticks).
fn tick_until(c: &mut Cluster, max: u32, done: impl Fn(&Cluster) -> bool) -> bool {
    for _ in 0..max {
        if done(c) {
            return true;
        }
        c.tick();
    }
    done(c)
}

/// The raft_rules case: a follower that lost its log and comes back with a new storage id is
/// probed from scratch and not counted toward commit; once rebuilt it is a voter again, bound
/// to its new disk.
#[test]
fn wiped_follower_is_probed_from_scratch_and_not_counted() {
    let mut c = Cluster::new(3, cfg(), 7);
    let l = c.elect();
    for i in 0..20 {
        c.propose(l, &format!("w{i}"));
    }
    let (f, o) = {
        let fs: Vec<NodeId> = c.ids().into_iter().filter(|x| *x != l).collect();
        (fs[0], fs[1])
    };
    let last = c.node(l).last_index();
    assert_eq!(
        peer(&c, l, f).match_index,
        last,
        "f caught up before the wipe"
    );
    let old_disk = c.node(f).disk();
    assert_eq!(c.node(l).conf().disk(f), old_disk, "f is bound to its disk");

    c.wipe(f);
    let new_disk = c.node(f).disk();
    assert_ne!(new_disk, old_disk);
    // The other follower is cut off: only the leader and the wiped node can answer.
    c.isolate(o);
    let before = c.sent.len();
    c.tick();
    c.settle();
    let p = peer(&c, l, f);
    assert_eq!(p.disk, new_disk, "the leader heard the new disk id");
    assert!(!p.counted, "a replaced voter does not count");
    assert!(p.rebuilding);
    // Its progress started over: the leader probed back to the start of the log and sent it
    // every entry again (a stale match index would have probed at `last` forever).
    let resent_from_start = c.sent[before..].iter().any(|m| {
        m.from == l
            && m.to == f
            && matches!(&m.body, MessageBody::AppendEntries { prev_log_index: 0, entries, .. } if !entries.is_empty())
    });
    assert!(resent_from_start, "the wiped node was probed from scratch");
    let idx = {
        let (idx, _) = c
            .node_mut(l)
            .propose(data("while-wiped"), None)
            .expect("accepted");
        idx
    };
    for _ in 0..30 {
        c.tick();
    }
    assert!(
        c.node(l).commit_index() < idx,
        "leader plus the wiped node are not a quorum of {{l, o, f}}"
    );
    // (Check-quorum sees the leader alone among counted voters and it steps down.)
    // With the healthy follower back, a leader commits past that index and f is rebuilt.
    c.heal();
    let l = c.run_until_leader(300);
    assert!(tick_until(&mut c, 300, |c| c.node(l).commit_index() >= idx));
    let rebuilt = tick_until(&mut c, 500, |c| {
        let conf = c.node(l).conf();
        conf.is_voter(f)
            && conf.disk(f) == new_disk
            && c.node(l).commit_index() >= c.node(l).status().conf_index
    });
    assert!(
        rebuilt,
        "f is a voter again, bound to its new disk: leader {l} conf {:?} at {} commit {} peers {:?}",
        c.node(l).conf(),
        c.node(l).status().conf_index,
        c.node(l).commit_index(),
        c.node(l).status().peers
    );
    // Its log holds every committed entry, the one written while it was wiped included.
    assert!(tick_until(&mut c, 100, |c| c.applied_index(f) >= idx));
    let p = peer(&c, l, f);
    assert!(p.counted && !p.rebuilding);
    assert!(!c.node(f).status().rebuilding);
    // The membership went through a rebuilding learner.
    let went_through_learner = (c.node(l).first_index()..=c.node(l).last_index())
        .filter_map(|i| c.node(l).entry(i))
        .filter(|e| e.kind == EntryKind::Config)
        .map(|e| Configuration::decode(&e.data).unwrap())
        .any(|conf| {
            conf.learners.contains(&f) && conf.rebuilding.contains(&f) && conf.disk(f) == new_disk
        });
    assert!(
        went_through_learner,
        "f was demoted to a rebuilding learner first"
    );
}

/// While it is rebuilt, a wiped voter does not vote for a candidate that knows it by its old disk
/// id: the old leader gone, the healthy follower cannot win with the wiped node's vote (it might
/// lack entries the wiped node had acknowledged). With that rule broken it does.
#[test]
fn wiped_voter_refuses_the_vote_that_would_elect_a_stale_candidate() {
    fn run(broken: bool) -> bool {
        let cfg = RaftConfig {
            broken_rule: if broken {
                BrokenRule::AmnesiacVotes
            } else {
                BrokenRule::None
            },
            ..cfg()
        };
        let mut c = Cluster::new(3, cfg, 11);
        let l = c.elect();
        let fs: Vec<NodeId> = c.ids().into_iter().filter(|x| *x != l).collect();
        let (f, o) = (fs[0], fs[1]);
        // o misses the last writes, which commit on l and f.
        c.isolate(o);
        for i in 0..5 {
            c.propose(l, &format!("only-on-l-and-f-{i}"));
        }
        let committed = c.node(l).commit_index();
        assert!(c.node(o).last_index() < committed);
        // f loses its disk, l goes away for good; o comes back.
        c.wipe(f);
        c.host_mut(l).down = true;
        c.heal();
        let elected = tick_until(&mut c, 400, |c| c.leaders().into_iter().any(|x| x != l));
        if elected {
            let x = c.leaders().into_iter().find(|x| *x != l).unwrap();
            assert!(
                c.node(x).last_index() < committed,
                "only a stale candidate could win"
            );
        }
        elected
    }
    assert!(
        !run(false),
        "the wiped node's vote elected a candidate lacking committed entries"
    );
    assert!(run(true), "with the rule broken the stale candidate wins");
}

/// A node restored from an older copy of its storage (same disk id, a shorter log than it
/// acknowledged) is found out by the leader at its next heartbeat round, not counted, and
/// rebuilt like a wiped one.
#[test]
fn follower_restored_from_an_old_copy_is_rebuilt() {
    let mut c = Cluster::new(3, cfg(), 5);
    let l = c.elect();
    let fs: Vec<NodeId> = c.ids().into_iter().filter(|x| *x != l).collect();
    let (f, o) = (fs[0], fs[1]);
    c.propose(l, "before-backup");
    let backup = c.host(f).disk.clone();
    for i in 0..10 {
        c.propose(l, &format!("after-backup-{i}"));
    }
    let last = c.node(l).last_index();
    assert_eq!(peer(&c, l, f).match_index, last);
    let disk = c.node(f).disk();
    // f comes back from the backup: same disk id, older log.
    c.host_mut(f).disk = backup;
    c.restart(f);
    assert_eq!(c.node(f).disk(), disk);
    assert!(c.node(f).last_index() < last);
    c.isolate(o);
    let found = tick_until(&mut c, 30, |c| {
        let p = peer(c, l, f);
        !p.counted && p.rebuilding
    });
    assert!(found, "the leader noticed f lacks entries it acknowledged");
    let idx = c.node_mut(l).propose(data("x"), None).expect("accepted").0;
    for _ in 0..30 {
        c.tick();
    }
    assert!(c.node(l).commit_index() < idx, "f's answers do not count");
    c.heal();
    let rebuilt = tick_until(&mut c, 500, |c| {
        let conf = c.node(l).conf();
        conf.is_voter(f)
            && !conf.rebuilding.contains(&f)
            && c.node(l).commit_index() >= c.node(l).status().conf_index
    });
    assert!(rebuilt, "f is a voter again");
    assert!(tick_until(&mut c, 100, |c| c.applied_index(f) >= idx));
}

/// A new group's voters are unbound: its first election takes every voter (a voter that lost its
/// storage cannot be told from a new one yet), and the winner's first entry binds each voter to
/// the disk it voted with. After that a majority elects.
#[test]
fn new_group_elects_only_unanimously_then_by_majority() {
    let mut c = Cluster::new(3, cfg(), 3);
    c.isolate(1);
    for _ in 0..200 {
        c.tick();
        assert!(
            c.leaders().is_empty(),
            "no leader without every initial voter"
        );
    }
    c.heal();
    let l = c.elect();
    for id in c.ids() {
        let conf = c.node(id).conf();
        for v in [1, 2, 3] {
            assert_eq!(conf.disk(v), c.node(v).disk(), "node {id} binds {v}");
        }
    }
    c.isolate(l);
    let again = tick_until(&mut c, 300, |c| {
        c.leaders()
            .into_iter()
            .any(|x| x != l && c.node(x).role() == Role::Leader)
    });
    assert!(again, "two bound voters of three elect a leader");
}
