//! Operating a running cluster: `bdctl` (status, on-demand snapshots, leadership transfer)
//! against three `bd-server run` processes, and the HTTP admin routes it uses, bad requests
//! included.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn bdctl_takes_snapshots_and_moves_leadership() {
    let c = Cluster::start(&[]);
    let l = c.leader();
    let written = write_blocks(&c.nodes[l].uri(), 0..16);
    assert_eq!(written.len(), 16);
    let commit = c.commit_index();

    // status: one row per node for bg0, exactly one of them the leader.
    let out = bdctl_ok(&c, &["status"]);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert_eq!(
        rows.iter().filter(|r| r.contains(" LEADER ")).count(),
        1,
        "{out}"
    );
    let leader_row = rows.iter().find(|r| r.contains(" LEADER ")).unwrap();
    assert!(leader_row.contains(&c.nodes[l].http.to_string()), "{out}");

    // snapshot: every replica snapshots its own copy, at an index covering the writes.
    let out = bdctl_ok(&c, &["snapshot", "--bg", "0"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    for n in &c.nodes {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("node {} ", n.id)))
            .unwrap_or_else(|| panic!("no line for node {}: {out}", n.id));
        let idx: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        // The leader applied every write before answering it; followers may trail.
        assert!(idx > 0, "{line}");
        if n.id == c.nodes[l].id {
            assert!(idx >= commit, "{line}: leader's commit was {commit}");
        }
        assert_eq!(n.stat("last_snapshot_index"), Some(idx), "node {}", n.id);
    }

    // transfer-leader to a chosen follower: it leads, and writes keep working through the
    // old leader (now forwarding).
    let target = (l + 1) % 3;
    let to = c.nodes[target].id.to_string();
    let out = bdctl_ok(&c, &["transfer-leader", "--bg", "0", "--to", &to]);
    assert!(out.contains(&format!("node {to} is the leader")), "{out}");
    assert_eq!(c.leader(), target);
    assert_eq!(write_blocks(&c.nodes[l].uri(), 16..20).len(), 4);
    let read = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &c.nodes[target].uri(),
            "-c",
            &format!("read -P {} {} 64k", pattern(19), 19 * 65536),
        ],
    );
    assert!(read.contains("read 65536/65536"), "{read}");
    // Without --to, the most up-to-date other voter takes over.
    let out = bdctl_ok(&c, &["transfer-leader", "--bg", "0"]);
    assert!(out.contains("is the leader"), "{out}");
    assert_ne!(c.leader(), target);
    // Asking for the current leader changes nothing.
    let now = c.nodes[c.leader()].id.to_string();
    let out = bdctl_ok(&c, &["transfer-leader", "--bg", "0", "--to", &now]);
    assert!(out.contains("already the leader"), "{out}");

    // Errors name what is wrong and exit non-zero.
    let err = bdctl_fails(&c, &["snapshot", "--bg", "7"]);
    assert!(
        err.contains("bg 7: not hosted on this node (HTTP 404)"),
        "{err}"
    );
    let err = bdctl_fails(&c, &["transfer-leader", "--bg", "0", "--to", "9"]);
    assert!(err.contains("peer 9 is not a member (HTTP 400)"), "{err}");
    let err = bdctl_fails(&c, &["transfer-leader", "--bg", "5"]);
    assert!(err.contains("bg 5: no leader among"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_bdctl"))
        .args(["--node", "127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 127.0.0.1:1: GET /status.json"), "{err}");
}

#[test]
fn http_admin_routes_refuse_bad_requests() {
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let (leader, follower) = (c.nodes[l].http, c.nodes[f].http);
    let call = |addr, method, path: &str| {
        http_call(addr, method, path).unwrap_or_else(|| panic!("{method} {path}: no answer"))
    };
    let json = |body: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    };
    // Admin actions only with POST, pages only with GET.
    assert_eq!(call(leader, "GET", "/bgs/0/snapshot").0, 405);
    assert_eq!(call(leader, "POST", "/raft_stat").0, 405);
    assert_eq!(call(leader, "PUT", "/status.json").0, 405);
    let (code, body) = call(leader, "POST", "/bgs/x1/snapshot");
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("\"x1\""),
        "{body}"
    );
    assert_eq!(call(leader, "POST", "/bgs/0/compact").0, 404);
    assert_eq!(call(leader, "POST", "/bgs/0/snapshot?now=1").0, 400);
    assert_eq!(
        call(leader, "POST", "/bgs/0/transfer_leader?to=zero").0,
        400
    );
    let (code, body) = call(leader, "POST", "/bgs/3/snapshot");
    assert_eq!(code, 404, "{body}");
    assert_eq!(json(&body)["bg"], 3);
    // A follower refuses a transfer and names the leader.
    let (code, body) = call(follower, "POST", "/bgs/0/transfer_leader");
    assert_eq!(code, 409, "{body}");
    assert_eq!(json(&body)["leader"], c.nodes[l].id, "{body}");
    // A snapshot on demand answers with its index, in status right after.
    let (code, body) = call(follower, "POST", "/bgs/0/snapshot");
    assert_eq!(code, 200, "{body}");
    let idx = json(&body)["snapshot_index"].as_u64().unwrap();
    assert_eq!(c.nodes[f].stat("last_snapshot_index"), Some(idx));
    // A transfer answers with its target, which then leads.
    let target = c.nodes[(l + 2) % 3].id;
    let (code, body) = call(
        leader,
        "POST",
        &format!("/bgs/0/transfer_leader?to={target}"),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["target"], target);
    c.wait_until(
        "the transfer target leads bg0",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            c.nodes[(target - 1) as usize]
                .status()
                .is_some_and(|s| s["state"] == "LEADER")
        },
    );
    // At most HTTP_CONNECTIONS_MAX connections are served at once: with that many idle ones
    // open, the next request is refused with 503; once they are gone, requests are served.
    let idle: Vec<std::net::TcpStream> = (0..server::http::HTTP_CONNECTIONS_MAX)
        .map(|_| std::net::TcpStream::connect(leader).unwrap())
        .collect();
    c.wait_until(
        "a request beyond the connection limit is refused",
        Duration::from_secs(4),
        Duration::from_millis(20),
        || http_call(leader, "GET", "/status.json").is_some_and(|(code, _)| code == 503),
    );
    drop(idle);
    c.wait_until(
        "requests are served again once the idle connections closed",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || http_call(leader, "GET", "/status.json").is_some_and(|(code, _)| code == 200),
    );
    // /metrics: one leader over the three nodes, the commit index as /status.json says, and
    // the WAL's counters moving.
    let metric = |addr, series: &str| -> f64 {
        let (code, body) = call(addr, "GET", "/metrics");
        assert_eq!(code, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
            .parse()
            .unwrap()
    };
    let leaders: f64 = c
        .nodes
        .iter()
        .map(|n| {
            metric(
                n.http,
                &format!(
                    "bd_bg_is_leader{{node=\"{}\",bg=\"0\",export=\"bg0\"}}",
                    n.id
                ),
            )
        })
        .sum();
    assert_eq!(leaders, 1.0);
    let t = &c.nodes[(target - 1) as usize];
    // Commit indexes only grow: the metric, read after the status, is at least as far.
    let before = t.stat("last_committed_index").unwrap() as f64;
    let commit = metric(
        t.http,
        &format!("bd_bg_commit_index{{node=\"{target}\",bg=\"0\",export=\"bg0\"}}"),
    );
    assert!(commit >= before && commit > 0.0, "{commit} < {before}");
    let batches = metric(
        t.http,
        &format!("bd_wal_batches_total{{node=\"{target}\",core=\"0\"}}"),
    );
    assert!(batches > 0.0);
    // /dashboard: an HTML page per node; the new leader's says it leads bg0.
    let led: Vec<bool> = c
        .nodes
        .iter()
        .map(|n| {
            let (code, body) = call(n.http, "GET", "/dashboard");
            assert_eq!(code, 200);
            assert!(
                body.contains("<table id=\"bgs\">") && body.contains("<td class=\"l\">bg0</td>")
            );
            body.contains("1 block groups, 1 led here")
        })
        .collect();
    assert_eq!(led.iter().filter(|l| **l).count(), 1, "{led:?}");
    assert!(led[(target - 1) as usize]);
    c.assert_all_alive();
}

/// Leadership moves three times while fio writes with crc32c verification through a node:
/// writes caught by a transfer are retried by the engine, none fails, and every block reads
/// back as written.
#[test]
fn writes_survive_leadership_transfers_under_load() {
    let c = Cluster::start(&[]);
    c.leader();
    let uri = c.nodes[0].uri();
    let fio = std::thread::spawn(move || {
        fio_verify(
            &uri,
            &["--size=8m", "--iodepth=16", "--time_based", "--runtime=4"],
        )
    });
    let mut moves = 0;
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let out = bdctl_ok(&c, &["transfer-leader", "--bg", "0"]);
        assert!(out.contains("is the leader"), "{out}");
        moves += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    // fio_verify fails the test if fio reports an error or a verify mismatch.
    fio.join().expect("fio thread");
    assert_eq!(moves, 3);
}

/// Leaders of every group, by node id, from the nodes' status pages.
fn leader_counts(c: &Cluster, bgs: &[u64]) -> [usize; 3] {
    let mut n = [0; 3];
    for &bg in bgs {
        let mut best: Option<(u64, u64)> = None;
        for node in &c.nodes {
            let doc = node.status_doc().expect("status");
            for b in doc["bgs"].as_array().unwrap() {
                if b["bg"] == bg && b["state"] == "LEADER" {
                    let t = b["term"].as_u64().unwrap();
                    if best.is_none_or(|(bt, _)| t > bt) {
                        best = Some((t, node.id));
                    }
                }
            }
        }
        if let Some((_, id)) = best {
            n[(id - 1) as usize] += 1;
        }
    }
    n
}

#[test]
fn bdctl_balances_leaders_over_the_nodes() {
    let bgs: Vec<u64> = (0..6).collect();
    let mut c = Cluster::start_with_bgs(&bgs, 4 << 20, &[]);
    c.wait_until(
        "a leader for every group",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || leader_counts(&c, &bgs).iter().sum::<usize>() == bgs.len(),
    );
    // Every group led by node 1, as after the other two restarted.
    for bg in &bgs {
        let bg = bg.to_string();
        bdctl_ok(&c, &["transfer-leader", "--bg", &bg, "--to", "1"]);
    }
    assert_eq!(leader_counts(&c, &bgs), [6, 0, 0]);
    let out = bdctl_ok(&c, &["balance-leaders", "--dry-run"]);
    assert!(
        out.contains("leaders before: node 1: 6, node 2: 0, node 3: 0"),
        "{out}"
    );
    assert_eq!(out.matches("would move").count(), 4, "{out}");
    assert_eq!(
        leader_counts(&c, &bgs),
        [6, 0, 0],
        "a dry run moves nothing"
    );
    let out = bdctl_ok(&c, &["balance-leaders"]);
    assert!(
        out.contains("leaders after: node 1: 2, node 2: 2, node 3: 2"),
        "{out}"
    );
    assert_eq!(leader_counts(&c, &bgs), [2, 2, 2]);
    let out = bdctl_ok(&c, &["balance-leaders"]);
    assert!(out.contains("balanced: nothing to move"), "{out}");
    // Without every node's answer it refuses rather than count a silent node as idle.
    let dead = c.nodes[2].http.to_string();
    c.kill(2);
    let e = bdctl_fails(&c, &["--node", &dead, "balance-leaders"]);
    assert!(e.contains(&dead), "{e}");
}
