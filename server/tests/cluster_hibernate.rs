//! Hibernation with three `bd-server` processes and 12 block groups: once idle, every group
//! hibernates on every node and the raft traffic stops (the per-core counters of
//! `/status.json`); the node leading hibernated groups is SIGKILLed, the survivors notice its
//! silence (no frame, not even a liveness ping, for an election timeout), elect new leaders for
//! all of them, and writes and reads through NBD succeed; the killed node restarts, rejoins, and
//! everything hibernates again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BGS: u64 = 12;
const WAIT: Duration = Duration::from_secs(40);

fn uri(n: &Node, bg: u64) -> String {
    format!("nbd://{}/bg{bg}", n.nbd)
}

/// Every running node's `/status.json` (None if one does not answer).
fn docs(c: &Cluster) -> Option<Vec<Value>> {
    c.nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(|n| n.status_doc())
        .collect()
}

fn bgs(doc: &Value) -> Vec<Value> {
    doc["bgs"].as_array().cloned().unwrap_or_default()
}

/// The leader of `bg` if every running replica agrees on it.
fn agreed_leader(docs: &[Value], bg: u64) -> Option<u64> {
    let reps: Vec<Value> = docs
        .iter()
        .flat_map(bgs)
        .filter(|b| b["bg"] == bg)
        .collect();
    let leaders: Vec<u64> = reps
        .iter()
        .filter(|b| b["state"] == "LEADER")
        .filter_map(|b| b["node"].as_u64())
        .collect();
    (leaders.len() == 1
        && reps
            .iter()
            .all(|b| b["leader"].as_u64() == Some(leaders[0])))
    .then(|| leaders[0])
}

fn wait_docs(c: &Cluster, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(d) = docs(c) {
            if pred(&d) {
                return d;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {:?}\n{}",
            docs(c),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn all_led(d: &[Value]) -> bool {
    (0..BGS).all(|bg| agreed_leader(d, bg).is_some())
}

fn all_hibernating(d: &[Value]) -> bool {
    all_led(d) && d.iter().flat_map(bgs).all(|b| b["hibernating"] == true)
}

fn raft_messages_sent(d: &[Value]) -> u64 {
    d.iter()
        .flat_map(|doc| doc["core_stats"].as_array().cloned().unwrap_or_default())
        .map(|c| c["raft_messages_sent"].as_u64().unwrap())
        .sum()
}

#[test]
fn leader_sigkilled_while_hibernating_survivors_elect_and_serve() {
    let ids: Vec<u64> = (0..BGS).collect();
    let mut c = Cluster::start_with_bgs(
        &ids,
        MIB,
        &["--hibernate-idle-ms", "200", "--snapshot-interval-s", "0"],
    );
    let d = wait_docs(&c, "every group hibernating", all_hibernating);
    // Idle and hibernated: no raft message at all between two looks (only liveness pings).
    let before = raft_messages_sent(&d);
    std::thread::sleep(Duration::from_millis(500));
    let d = docs(&c).expect("status");
    assert!(all_hibernating(&d), "still hibernating: {d:?}");
    assert_eq!(
        raft_messages_sent(&d),
        before,
        "raft messages while hibernating"
    );

    // SIGKILL the node leading the most hibernated groups.
    let mut led = [0u64; 4];
    for bg in 0..BGS {
        led[agreed_leader(&d, bg).unwrap() as usize] += 1;
    }
    let victim = (1..=3).max_by_key(|n| led[*n]).unwrap();
    eprintln!(
        "SIGKILL node {victim}, leader of {} hibernating groups",
        led[victim]
    );
    c.kill(victim - 1);
    let d = wait_docs(&c, "new leaders for every group", all_led);
    for bg in 0..BGS {
        assert_ne!(agreed_leader(&d, bg), Some(victim as u64), "bg {bg}");
    }
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim - 1).collect();
    for i in &survivors {
        assert!(
            c.nodes[*i]
                .log()
                .contains("nothing heard from peer for an election timeout"),
            "node {} woke the groups through the silence of node {victim}",
            i + 1
        );
    }
    // Every group takes a write through one survivor and reads it back through the other.
    for bg in 0..BGS {
        let p = 0x10 + bg;
        qemu_io(
            &uri(&c.nodes[survivors[0]], bg),
            &[format!("write -P {p} 0 64k")],
        );
        qemu_io(
            &uri(&c.nodes[survivors[1]], bg),
            &[format!("read -P {p} 0 64k")],
        );
    }
    // The killed node restarts and rejoins; then every group hibernates again on all three.
    c.spawn(victim - 1);
    wait_docs(
        &c,
        "every group hibernating after the restart",
        all_hibernating,
    );
    for bg in 0..BGS {
        qemu_io(
            &uri(&c.nodes[victim - 1], bg),
            &[format!("read -P {} 0 64k", 0x10 + bg)],
        );
    }
    c.assert_all_alive();
}
