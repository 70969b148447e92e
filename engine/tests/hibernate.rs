//! Hibernation of idle block groups, with three engines in one process on loopback: idle
//! groups hibernate and the raft traffic stops (compared with the same cluster with hibernation
//! off); writes and reads wake a hibernated group and succeed; when the node leading hibernated
//! groups stops, the survivors notice its silence and elect new leaders for all of them; a node
//! restarted while its groups hibernate rejoins, and everything hibernates again.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use engine::{BgStatus, CoreStat, Engine, EngineConfig};

const BG_BYTES: u64 = 1 << 20;
const BGS: u64 = 30;
const TIMEOUT: Duration = Duration::from_secs(30);

fn config(
    dir: &Path,
    id: u64,
    addrs: &BTreeMap<u64, SocketAddr>,
    hibernate_idle_ms: u64,
) -> EngineConfig {
    let mut c = node_config(dir, id, addrs, 0..BGS, BG_BYTES);
    c.tick_ms = 20;
    c.election_timeout_ms = 300;
    c.wal_segment_bytes_max = 8 << 20;
    c.hibernate_idle_ms = hibernate_idle_ms;
    c
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn statuses(engines: &[Option<Engine>]) -> Vec<Vec<BgStatus>> {
    let mut out = Vec::new();
    for e in engines.iter().flatten() {
        out.push(e.status().await);
    }
    out
}

/// Waits until `pred` holds for the statuses of the running engines.
async fn wait_for(
    engines: &[Option<Engine>],
    what: &str,
    pred: impl Fn(&[Vec<BgStatus>]) -> bool,
) -> Vec<Vec<BgStatus>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = statuses(engines).await;
        if pred(&s) {
            return s;
        }
        if Instant::now() > deadline {
            let summary: Vec<String> = s
                .iter()
                .flatten()
                .map(|b| {
                    format!(
                        "n{} bg{} {} leader={:?} hib={} commit={} applied={}",
                        b.node,
                        b.bg,
                        b.state,
                        b.leader,
                        b.hibernating,
                        b.last_committed_index,
                        b.known_applied_index
                    )
                })
                .collect();
            panic!("timed out waiting for {what}:\n{}", summary.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every group has exactly one leader among the running engines, and every running replica
/// follows it.
fn all_led(s: &[Vec<BgStatus>]) -> bool {
    (0..BGS).all(|bg| {
        let reps: Vec<&BgStatus> = s.iter().flatten().filter(|b| b.bg == bg).collect();
        let leaders: Vec<&&BgStatus> = reps.iter().filter(|b| b.state == "LEADER").collect();
        leaders.len() == 1 && reps.iter().all(|b| b.leader == Some(leaders[0].node))
    })
}

fn all_hibernating(s: &[Vec<BgStatus>]) -> bool {
    all_led(s) && s.iter().flatten().all(|b| b.hibernating)
}

fn leader_of(s: &[Vec<BgStatus>], bg: u64) -> u64 {
    s.iter()
        .flatten()
        .find(|b| b.bg == bg && b.state == "LEADER")
        .expect("a leader")
        .node
}

fn totals(engines: &[Option<Engine>]) -> CoreStat {
    let mut t = CoreStat::default();
    for e in engines.iter().flatten() {
        for c in e.core_stats() {
            t.raft_messages_sent += c.raft_messages_sent;
            t.frames_sent += c.frames_sent;
            t.bytes_sent += c.bytes_sent;
            t.pings_sent += c.pings_sent;
            t.groups += c.groups;
            t.groups_hibernating += c.groups_hibernating;
            t.wakes += c.wakes;
        }
    }
    t
}

/// Raft messages, frames and pings sent by the whole cluster over one second.
async fn traffic_over_a_second(engines: &[Option<Engine>]) -> (u64, u64, u64) {
    let a = totals(engines);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = totals(engines);
    (
        b.raft_messages_sent - a.raft_messages_sent,
        b.frames_sent - a.frames_sent,
        b.pings_sent - a.pings_sent,
    )
}

fn start(dir: &Path, addrs: &BTreeMap<u64, SocketAddr>, hib_ms: u64) -> Vec<Option<Engine>> {
    (1..=3)
        .map(|id| Some(Engine::start(config(dir, id, addrs, hib_ms)).unwrap()))
        .collect()
}

fn stop(engines: Vec<Option<Engine>>) {
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

/// `node` applied every group's log up to that group's leader's commit.
fn assert_caught_up(s: &[Vec<BgStatus>], node: u64) {
    for b in s.iter().flatten().filter(|b| b.node == node) {
        let leader = s
            .iter()
            .flatten()
            .find(|x| x.bg == b.bg && x.state == "LEADER")
            .unwrap();
        assert_eq!(
            b.known_applied_index, leader.last_committed_index,
            "bg {}",
            b.bg
        );
    }
}

fn engine(engines: &[Option<Engine>], node: u64) -> &Engine {
    engines[(node - 1) as usize].as_ref().expect("running")
}

/// (a) and (b): idle groups hibernate everywhere and the cluster's raft traffic stops (only
/// liveness pings remain), against the same cluster with hibernation off; a write through a
/// follower and a read through the leader of a hibernated group succeed and wake it, and it
/// hibernates again afterwards.
#[test]
fn idle_groups_hibernate_traffic_stops_and_requests_wake_them() {
    let rt = rt();
    // Baseline: hibernation off.
    let dir = tempfile::tempdir().unwrap();
    let engines = start(dir.path(), &cluster_addrs(3), 0);
    let (awake_msgs, awake_frames, awake_pings) = rt.block_on(async {
        wait_for(&engines, "leaders (hibernation off)", all_led).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = statuses(&engines).await;
        assert!(s.iter().flatten().all(|b| !b.hibernating));
        traffic_over_a_second(&engines).await
    });
    stop(engines);
    eprintln!("hibernation off: {awake_msgs} raft messages, {awake_frames} frames, {awake_pings} pings in 1 s");
    assert_eq!(awake_pings, 0, "no pings with hibernation off");
    assert!(
        awake_msgs >= BGS * 2,
        "every group heartbeats: {awake_msgs}"
    );

    let dir = tempfile::tempdir().unwrap();
    let engines = start(dir.path(), &cluster_addrs(3), 200);
    rt.block_on(async {
        wait_for(&engines, "every group hibernating", all_hibernating).await;
        // The per-core count is refreshed at each tick.
        let deadline = Instant::now() + TIMEOUT;
        while totals(&engines).groups_hibernating != 3 * BGS {
            assert!(Instant::now() < deadline, "{:?}", totals(&engines));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (msgs, frames, pings) = traffic_over_a_second(&engines).await;
        eprintln!("hibernation on: {msgs} raft messages, {frames} frames, {pings} pings in 1 s");
        assert!(
            msgs * 20 <= awake_msgs,
            "raft traffic of hibernated groups: {msgs} messages vs {awake_msgs} awake"
        );
        assert!(pings > 0, "liveness pings flow between idle nodes");
        assert!(
            frames < awake_frames,
            "frames: {frames} hibernating vs {awake_frames} awake"
        );

        // A write through a follower (forwarded) wakes the group on every replica.
        let s = statuses(&engines).await;
        let bg = 7;
        let leader = leader_of(&s, bg);
        let follower = if leader == 1 { 2 } else { 1 };
        let wakes = totals(&engines).wakes;
        let data = pattern(7, 64 << 10);
        engine(&engines, follower)
            .bg(bg)
            .unwrap()
            .write(4096, data.clone())
            .await
            .unwrap();
        assert!(totals(&engines).wakes > wakes, "the write woke the group");
        // Every replica reads it back (linearizable reads; the followers forward).
        for node in 1..=3 {
            let r = engine(&engines, node)
                .bg(bg)
                .unwrap()
                .read(4096, 64 << 10)
                .await
                .unwrap();
            assert!(r == data, "node {node} reads the write");
        }
        let s = wait_for(
            &engines,
            "hibernating again after the write",
            all_hibernating,
        )
        .await;
        // A read through the leader of a hibernated group wakes it and sees the write.
        let leader = leader_of(&s, bg);
        let wakes = totals(&engines).wakes;
        let r = engine(&engines, leader)
            .bg(bg)
            .unwrap()
            .read(4096, 64 << 10)
            .await
            .unwrap();
        assert!(r == data, "the leader reads the write after waking");
        assert!(totals(&engines).wakes > wakes, "the read woke the group");
        wait_for(
            &engines,
            "hibernating again after the read",
            all_hibernating,
        )
        .await;
    });
    stop(engines);
}

/// (c): the node leading hibernated groups stops; its peers hear nothing from it for an
/// election timeout, wake the groups it led with their election timers expired, and elect new
/// leaders for all of them; writes to every group then succeed.
#[test]
fn leader_node_stopped_while_its_groups_hibernate_survivors_take_over() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let mut engines = start(dir.path(), &cluster_addrs(3), 200);
    let s = rt.block_on(wait_for(
        &engines,
        "every group hibernating",
        all_hibernating,
    ));
    // The node leading the most groups stops.
    let mut led = BTreeMap::<u64, u64>::new();
    for bg in 0..BGS {
        *led.entry(leader_of(&s, bg)).or_default() += 1;
    }
    let (&victim, &count) = led.iter().max_by_key(|(_, n)| **n).unwrap();
    eprintln!("stopping node {victim}, leader of {count} hibernating groups");
    engines[(victim - 1) as usize].take().unwrap().shutdown();
    rt.block_on(async {
        let s = wait_for(&engines, "new leaders for every group", all_led).await;
        for bg in 0..BGS {
            assert_ne!(leader_of(&s, bg), victim);
        }
        for bg in 0..BGS {
            let node = if victim == 1 { 2 } else { 1 };
            engine(&engines, node)
                .bg(bg)
                .unwrap()
                .write(0, pattern(bg as u8, 4096))
                .await
                .unwrap_or_else(|e| panic!("write to bg {bg}: {e}"));
        }
        let wakes = totals(&engines).wakes;
        assert!(wakes >= count, "the survivors woke the groups: {wakes}");
    });
    stop(engines);
}

/// (d): a node restarted while every group hibernates rejoins: it learns every group's leader
/// and catches up, then every group hibernates again on all three nodes, and a write through the
/// restarted node succeeds.
#[test]
fn node_restarted_while_groups_hibernate_rejoins() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let addrs = cluster_addrs(3);
    let mut engines = start(dir.path(), &addrs, 200);
    let bg = 3;
    rt.block_on(async {
        wait_for(&engines, "every group hibernating", all_led).await;
        engine(&engines, 1)
            .bg(bg)
            .unwrap()
            .write(0, pattern(1, 8192))
            .await
            .unwrap();
        wait_for(&engines, "every group hibernating", all_hibernating).await;
    });
    let node = 2;
    engines[(node - 1) as usize].take().unwrap().shutdown();
    engines[(node - 1) as usize] =
        Some(Engine::start(config(dir.path(), node, &addrs, 200)).unwrap());
    rt.block_on(async {
        let s = wait_for(
            &engines,
            "every group led and hibernating after the restart",
            all_hibernating,
        )
        .await;
        // The restarted node holds every group's log up to its leader's commit.
        assert_caught_up(&s, node);
        let e = engine(&engines, node).bg(bg).unwrap();
        assert!(e.read(0, 8192).await.unwrap() == pattern(1, 8192));
        e.write(8192, pattern(2, 4096)).await.unwrap();
        assert!(e.read(8192, 4096).await.unwrap() == pattern(2, 4096));
    });
    stop(engines);
}

/// A node that is down does not keep its groups awake: once the survivors have led every group
/// for a while, all groups hibernate on the two of them (a majority), a write still works and
/// the group sleeps again; when the node returns it is woken into, catches up, and everything
/// hibernates on all three.
#[test]
fn groups_hibernate_with_a_node_down_and_wake_for_its_return() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let addrs = cluster_addrs(3);
    let mut engines = start(dir.path(), &addrs, 200);
    rt.block_on(async {
        wait_for(&engines, "every group hibernating", all_hibernating).await;
    });
    let down = 3;
    engines[(down - 1) as usize].take().unwrap().shutdown();
    let bg = 5;
    rt.block_on(async {
        wait_for(
            &engines,
            "every group hibernating on the two running nodes",
            all_hibernating,
        )
        .await;
        let e = engine(&engines, 1).bg(bg).unwrap();
        e.write(0, pattern(7, 8192)).await.unwrap();
        let s = wait_for(
            &engines,
            "every group hibernating again after the write",
            all_hibernating,
        )
        .await;
        assert!(s.iter().flatten().any(|b| b.bg == bg && b.hibernating));
        let (msgs, _, _) = traffic_over_a_second(&engines).await;
        assert_eq!(msgs, 0, "raft messages while every group sleeps");
    });
    engines[(down - 1) as usize] =
        Some(Engine::start(config(dir.path(), down, &addrs, 200)).unwrap());
    rt.block_on(async {
        let s = wait_for(
            &engines,
            "every group led and hibernating on all three nodes",
            |s| {
                all_hibernating(s)
                    && s.iter().flatten().filter(|b| b.node == down).count() == BGS as usize
            },
        )
        .await;
        // The returned node applied every group's log up to its leader's commit, the write
        // made while it was down included.
        assert_caught_up(&s, down);
        let e = engine(&engines, down).bg(bg).unwrap();
        assert!(e.read(0, 8192).await.unwrap() == pattern(7, 8192));
    });
    stop(engines);
}
