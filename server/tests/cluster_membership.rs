//! Membership changes at runtime (`bdctl add-peer`, `remove-peer`, `move-replica`) against
//! four `bd-server run` processes: bg0 starts with nodes 1-3 as members, and node 4 holds it
//! as a replica waiting to be added (`--join-bg`).

mod common;

use std::time::Duration;

use common::*;

fn voters(n: &Node) -> Vec<u64> {
    n.status().expect("status")["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn a_replica_moves_to_a_new_node_which_then_counts_in_every_quorum() {
    // A short log behind snapshots, so the new replica is built by InstallSnapshot, and a
    // snapshot stream slow enough (over 32 MiB of data at 8 MB/s, ~4 s; holes travel as zero
    // runs) to outlast the catch-up timeout (100 ticks of 20 ms): the change must wait for the
    // transfer, not abort.
    let conf = tempfile::tempdir().unwrap();
    let toml = conf.path().join("slow-snapshots.toml");
    std::fs::write(&toml, "[raft]\nsnapshot_bytes_per_sec_max = 8000000\n").unwrap();
    let toml = toml.to_str().unwrap();
    let mut c = Cluster::start_joining(
        4,
        3,
        &[0],
        BG_BYTES,
        &["--snapshot-keep-entries", "2", "--config", toml],
    );
    let l = c.leader();
    assert!(l < 3, "the joining node cannot lead");
    assert_eq!(write_blocks(&c.nodes[l].uri(), 0..24).len(), 24);
    let bulk: Vec<String> = (0..8)
        .map(|i| format!("write -P 9 {} 4M", (24 << 20) + (i << 22)))
        .collect();
    qemu_io(&c.nodes[l].uri(), &bulk);
    bdctl_ok(&c, &["snapshot", "--bg", "0"]);
    let joiner = &c.nodes[3];
    let s = joiner.status().expect("node 4 answers");
    assert_eq!(s["state"], "FOLLOWER", "{s}");
    assert_eq!(s["known_applied_index"], 0, "{s}");
    assert_eq!(voters(joiner), vec![1, 2, 3]);

    // Refusals, each naming what is wrong.
    let e = bdctl_fails(&c, &["add-peer", "--bg", "0", "--peer", "9"]);
    assert!(
        e.contains("node 9 is not a peer") && e.contains("HTTP 400"),
        "{e}"
    );
    let e = bdctl_fails(&c, &["remove-peer", "--bg", "0", "--peer", "4"]);
    assert!(
        e.contains("peer 4 is not a member") && e.contains("HTTP 400"),
        "{e}"
    );
    let e = bdctl_fails(
        &c,
        &["move-replica", "--bg", "0", "--from", "2", "--to", "2"],
    );
    assert!(e.contains("the same node 2"), "{e}");
    let follower = c.nodes.iter().find(|n| n.id != c.nodes[l].id).unwrap();
    let (code, body) = http_call(follower.http, "POST", "/bgs/0/add_peer?peer=4").unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains(&format!("\"leader\":{}", c.nodes[l].id)),
        "{body}"
    );
    let (code, body) = http_call(c.nodes[l].http, "POST", "/bgs/0/add_peer").unwrap();
    assert_eq!(
        (code, body.contains("missing `peer")),
        (400, true),
        "{body}"
    );
    let (code, _) = http_call(c.nodes[l].http, "GET", "/bgs/0/remove_peer?peer=1").unwrap();
    assert_eq!(code, 405);
    assert_eq!(voters(&c.nodes[l]), vec![1, 2, 3], "nothing changed");
    // A new peer that is down never catches up: the leader aborts after the catch-up timeout
    // and bdctl says so then, instead of waiting out --wait-ms.
    c.kill(3);
    let e = bdctl_fails(
        &c,
        &["add-peer", "--bg", "0", "--peer", "4", "--wait-ms", "60000"],
    );
    assert!(e.contains("gave up adding node 4"), "{e}");
    assert_eq!(
        voters(&c.nodes[l]),
        vec![1, 2, 3],
        "aborted, nothing changed"
    );
    c.spawn(3);
    c.wait_until(
        "node 4 back",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || c.nodes[3].status().is_some(),
    );

    // Move the leader's own replica to node 4: add it, then remove the old leader, which
    // steps down once its removal commits.
    let from = c.nodes[l].id;
    let out = bdctl_ok(
        &c,
        &[
            "move-replica",
            "--bg",
            "0",
            "--from",
            &from.to_string(),
            "--to",
            "4",
        ],
    );
    assert!(out.contains("voters [1,2,3,4]"), "{out}");
    let expect: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&n| n != from).collect();
    assert!(
        out.contains(&format!(
            "voters [{}]",
            expect
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
        "{out}"
    );
    assert!(
        c.nodes[3].log().contains("InstallSnapshot") || c.nodes[3].log().contains("snapshot"),
        "node 4 was built from a snapshot:\n{}",
        c.nodes[3].log()
    );
    // Removing it again is refused by name; adding a voter again changes nothing.
    let e = bdctl_fails(
        &c,
        &["remove-peer", "--bg", "0", "--peer", &from.to_string()],
    );
    assert!(e.contains(&format!("peer {from} is not a member")), "{e}");
    let out = bdctl_ok(&c, &["add-peer", "--bg", "0", "--peer", "4"]);
    assert!(out.contains("nothing to do"), "{out}");

    // The old leader is out. Stop it and one more of the original members: the group has
    // two of its three voters left, node 4 among them, so every write now needs node 4.
    c.kill(l);
    let other = (0..3).find(|&i| i != l).unwrap();
    c.kill(other);
    let last = (0..3).find(|&i| i != l && i != other).unwrap();
    let uri = c.nodes[3].uri();
    assert_eq!(write_blocks(&uri, 24..40).len(), 16, "{}", c.logs());
    qemu_io(&uri, &block_reads(0..40));
    qemu_io(&c.nodes[last].uri(), &block_reads(0..40));
    let s = c.nodes[3].status().unwrap();
    assert_eq!(voters(&c.nodes[3]), expect, "{s}");
    // Node 4 restarts with its config unchanged (`--join-bg`, members 1-3): its membership
    // comes back from its log, so the two of them elect a leader again and take writes.
    c.kill(3);
    c.spawn(3);
    assert_eq!(
        write_blocks(&c.nodes[last].uri(), 40..44).len(),
        4,
        "{}",
        c.logs()
    );
    qemu_io(&c.nodes[3].uri(), &block_reads(0..44));
    assert_eq!(voters(&c.nodes[3]), expect);
    for n in [&c.nodes[3], &c.nodes[last]] {
        assert!(!n.log().contains("panicked"), "node {}:\n{}", n.id, n.log());
    }
}

#[test]
fn a_removed_member_can_be_added_back() {
    let c = Cluster::start(&[]);
    let l = c.leader();
    assert_eq!(write_blocks(&c.nodes[l].uri(), 0..8).len(), 8);
    let gone = c.nodes[(l + 1) % 3].id;
    let out = bdctl_ok(
        &c,
        &["remove-peer", "--bg", "0", "--peer", &gone.to_string()],
    );
    assert!(out.contains("configuration committed"), "{out}");
    let l = c.leader();
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != gone).collect();
    assert_eq!(voters(&c.nodes[l]), rest);
    // Writes go on with two voters. The removed replica no longer serves the export: the
    // leader refuses what it forwards, and the client gets an error, not a hang.
    assert_eq!(write_blocks(&c.nodes[l].uri(), 8..16).len(), 8);
    let removed = &c.nodes[(gone - 1) as usize];
    let out = run(
        "qemu-io",
        &["-f", "raw", &removed.uri(), "-c", "write -P 7 0 4k"],
    );
    let all = text(&out);
    assert!(all.contains("write failed"), "{all}");
    assert!(
        c.nodes[l]
            .log()
            .contains("forwarded request from a node that is not a member refused"),
        "{}",
        c.logs()
    );
    // Counted in the leader's core stats and in /metrics.
    let refused: u64 = c.nodes[l].status_doc().expect("leader answers")["core_stats"]
        .as_array()
        .expect("core_stats")
        .iter()
        .map(|s| s["raft_messages_refused"].as_u64().expect("counter"))
        .sum();
    assert!(refused >= 1, "{}", c.logs());
    let metrics = http_get(c.nodes[l].http, "/metrics").expect("leader answers");
    assert!(
        metrics
            .lines()
            .any(|m| m.starts_with("bd_core_raft_messages_refused_total{") && !m.ends_with(" 0")),
        "{metrics}"
    );
    let out = bdctl_ok(&c, &["add-peer", "--bg", "0", "--peer", &gone.to_string()]);
    assert!(out.contains("voters [1,2,3]"), "{out}");
    let commit = c.commit_index();
    let back = &c.nodes[(gone - 1) as usize];
    assert!(
        back.wait_applied(commit, Duration::from_secs(20)).is_some(),
        "node {gone} did not catch up to {commit}\n{}",
        c.logs()
    );
    qemu_io(&back.uri(), &block_reads(0..16));
    let out = bdctl_ok(&c, &["status", "--bg", "0"]);
    assert_eq!(
        out.lines()
            .skip(1)
            .filter(|r| r.contains(" 1,2,3 "))
            .count(),
        3,
        "{out}"
    );
}
