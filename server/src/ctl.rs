//! `bdctl`: braft_cli-style control of a running cluster through the nodes' HTTP endpoints
//! (see [`crate::http`]): `status`, `snapshot`, `transfer-leader`, and membership changes:
//! `add-peer`, `remove-peer` and `move-replica` (add the new replica, then remove the old one:
//! the group keeps three voters throughout, and a majority of the old ones and of the new ones
//! agree on every step).
//!
//! Nodes do not know each other's HTTP addresses, so `bdctl` takes them all (`--node`,
//! repeatable; by default the three nodes of `bd-server dev`) and finds a block group's leader
//! itself from their `/status.json`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::error::Error;
use crate::http;

/// HTTP addresses of the nodes `bd-server dev` starts with its default `--base-port`.
pub const DEV_NODES: [&str; 3] = ["127.0.0.1:10909", "127.0.0.1:10910", "127.0.0.1:10911"];

#[derive(Parser, Debug)]
#[command(
    name = "bdctl",
    version,
    about = "Control a bd cluster: block group status, snapshots, leadership transfer, membership changes",
    long_about = "Control a bd cluster through the nodes' HTTP endpoints (`http_listen`).\n\n\
        Without --node, talks to the three nodes of `bd-server dev` \
        (127.0.0.1:10909, :10910, :10911). Exit status 1 if anything failed; every error names \
        the node it is about."
)]
pub struct CtlArgs {
    /// HTTP address (HOST:PORT) of a node; repeat for every node of the cluster.
    #[arg(long = "node", value_name = "HOST:PORT", global = true)]
    pub nodes: Vec<SocketAddr>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// One line per block group and node: role, term, leader, voters, log, commit, applied,
    /// snapshot.
    Status {
        /// Only this block group.
        #[arg(long)]
        bg: Option<u64>,
    },
    /// Take a snapshot of a block group now, on every given node (each replica snapshots its
    /// own copy; braft_cli snapshot).
    Snapshot {
        /// Block group id.
        #[arg(long)]
        bg: u64,
    },
    /// Hand a block group's leadership to another voter and wait until it leads
    /// (braft_cli transfer_leader).
    TransferLeader {
        /// Block group id.
        #[arg(long)]
        bg: u64,
        /// Node id of the new leader (default: the most up-to-date other voter).
        #[arg(long)]
        to: Option<u64>,
        /// How long to wait for the new leader before failing.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        wait_ms: u64,
    },
    /// Make a node a voter of a block group and wait until that configuration commits
    /// (braft_cli add_peer). The node must hold the group (declared with `--join-bg` or
    /// `join = true`) and be a peer of every node; it catches up on the log or a snapshot
    /// first.
    AddPeer {
        /// Block group id.
        #[arg(long)]
        bg: u64,
        /// Node id to add.
        #[arg(long)]
        peer: u64,
        /// How long to wait for the configuration to commit before failing.
        #[arg(long, default_value_t = 60_000, value_name = "MS")]
        wait_ms: u64,
    },
    /// Remove a node from a block group and wait until that configuration commits (braft_cli
    /// remove_peer). A leader that removes itself steps down once the change commits. The
    /// removed replica's files stay on its node.
    RemovePeer {
        /// Block group id.
        #[arg(long)]
        bg: u64,
        /// Node id to remove.
        #[arg(long)]
        peer: u64,
        /// How long to wait for the configuration to commit before failing.
        #[arg(long, default_value_t = 60_000, value_name = "MS")]
        wait_ms: u64,
    },
    /// Move a block group's replica from one node to another: add-peer `--to`, then
    /// remove-peer `--from`.
    MoveReplica {
        /// Block group id.
        #[arg(long)]
        bg: u64,
        /// Node id that gives up its replica.
        #[arg(long)]
        from: u64,
        /// Node id that takes it (holding the group with `--join-bg`).
        #[arg(long)]
        to: u64,
        /// How long to wait for each of the two changes.
        #[arg(long, default_value_t = 60_000, value_name = "MS")]
        wait_ms: u64,
    },
}

impl CtlArgs {
    /// The nodes to talk to: `--node`s, else the dev cluster's.
    pub fn nodes(&self) -> Vec<SocketAddr> {
        if self.nodes.is_empty() {
            DEV_NODES
                .iter()
                .map(|a| a.parse().expect("valid address"))
                .collect()
        } else {
            self.nodes.clone()
        }
    }
}

/// Runs `args`, printing results on stdout; an error on one node does not stop the others,
/// the first one is returned at the end.
pub fn run(args: &CtlArgs) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::AdminOutcome(format!("cannot start a runtime: {e}")))?;
    let nodes = args.nodes();
    rt.block_on(async {
        match &args.command {
            CtlCommand::Status { bg } => status(&nodes, *bg).await,
            CtlCommand::Snapshot { bg } => snapshot(&nodes, *bg).await,
            CtlCommand::TransferLeader { bg, to, wait_ms } => {
                transfer_leader(&nodes, *bg, *to, Duration::from_millis(*wait_ms)).await
            }
            CtlCommand::AddPeer { bg, peer, wait_ms } => {
                change_peer(&nodes, *bg, Change::Add(*peer), ms(*wait_ms)).await
            }
            CtlCommand::RemovePeer { bg, peer, wait_ms } => {
                change_peer(&nodes, *bg, Change::Remove(*peer), ms(*wait_ms)).await
            }
            CtlCommand::MoveReplica {
                bg,
                from,
                to,
                wait_ms,
            } => {
                if from == to {
                    return Err(Error::AdminOutcome(format!(
                        "bg {bg}: --from and --to are the same node {from}"
                    )));
                }
                change_peer(&nodes, *bg, Change::Add(*to), ms(*wait_ms)).await?;
                change_peer(&nodes, *bg, Change::Remove(*from), ms(*wait_ms)).await
            }
        }
    })
}

/// Sends one request; a non-2xx answer becomes an error with the server's message.
async fn call(addr: SocketAddr, method: &str, path: &str) -> Result<Value, Error> {
    let admin = |reason: String| Error::Admin { addr, reason };
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(30), http::request(addr, method, path))
            .await
            .map_err(|_| admin(format!("{method} {path}: no answer within 30 s")))?
            .map_err(|e| admin(format!("{method} {path}: {e}")))?;
    let doc: Option<Value> = serde_json::from_str(&body).ok();
    if !(200..300).contains(&code) {
        let msg = doc
            .as_ref()
            .and_then(|d| d["error"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| body.trim().to_string());
        return Err(admin(format!("{msg} (HTTP {code})")));
    }
    doc.ok_or_else(|| admin(format!("{method} {path}: answer is not JSON: {body:?}")))
}

/// Every node's `bgs` entries, with the errors of the nodes that did not answer.
async fn statuses(nodes: &[SocketAddr]) -> (Vec<(SocketAddr, Value)>, Vec<Error>) {
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    for &addr in nodes {
        match call(addr, "GET", "/status.json").await {
            Ok(doc) => {
                for bg in doc["bgs"].as_array().cloned().unwrap_or_default() {
                    rows.push((addr, bg));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (rows, errors)
}

/// The command's error: the one that happened, or (printing each, as each names its node)
/// how many of the requests failed.
fn report(errors: Vec<Error>, asked: usize) -> Result<(), Error> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.into_iter().next().expect("one")),
        n => {
            for e in &errors {
                eprintln!("bdctl: {e}");
            }
            Err(Error::AdminOutcome(format!(
                "{n} of {asked} requests failed"
            )))
        }
    }
}

/// The `status` table, one row per (node, block group).
pub fn status_table(rows: &[(SocketAddr, Value)]) -> String {
    let mut out = format!(
        "{:<22} {:>4} {:>6} {:<10} {:>6} {:>6} {:<10} {:>10} {:>10} {:>10} {:>10}  {}\n",
        "node",
        "id",
        "bg",
        "state",
        "term",
        "leader",
        "voters",
        "last_log",
        "commit",
        "applied",
        "snapshot",
        "snapshot_status"
    );
    for (addr, b) in rows {
        let n = |k: &str| b[k].as_u64().map_or("-".to_string(), |v| v.to_string());
        out.push_str(&format!(
            "{:<22} {:>4} {:>6} {:<10} {:>6} {:>6} {:<10} {:>10} {:>10} {:>10} {:>10}  {}{}\n",
            addr.to_string(),
            n("node"),
            n("bg"),
            b["state"].as_str().unwrap_or("?"),
            n("term"),
            n("leader"),
            b["voters"].as_array().map_or("-".to_string(), |v| {
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            n("last_log_index"),
            n("last_committed_index"),
            n("known_applied_index"),
            n("last_snapshot_index"),
            b["snapshot_status"].as_str().unwrap_or("?"),
            if b["hibernating"].as_bool() == Some(true) {
                "  (hibernating)"
            } else {
                ""
            }
        ));
    }
    out
}

async fn status(nodes: &[SocketAddr], only: Option<u64>) -> Result<(), Error> {
    let (mut rows, mut errors) = statuses(nodes).await;
    if let Some(bg) = only {
        rows.retain(|(_, b)| b["bg"].as_u64() == Some(bg));
        if rows.is_empty() && errors.is_empty() {
            errors.push(Error::AdminOutcome(format!(
                "bg {bg}: hosted by none of {}",
                list(nodes)
            )));
        }
    }
    rows.sort_by_key(|(addr, b)| (b["bg"].as_u64(), b["node"].as_u64(), *addr));
    print!("{}", status_table(&rows));
    report(errors, nodes.len())
}

async fn snapshot(nodes: &[SocketAddr], bg: u64) -> Result<(), Error> {
    let mut errors = Vec::new();
    for &addr in nodes {
        match call(addr, "POST", &format!("/bgs/{bg}/snapshot")).await {
            Ok(doc) => println!(
                "node {} ({addr}): bg {bg} snapshot at index {}",
                doc["node"], doc["snapshot_index"]
            ),
            Err(e) => errors.push(e),
        }
    }
    report(errors, nodes.len())
}

/// The node that leads `bg` in the highest term among `rows`: (address, node id, term).
pub fn find_leader(rows: &[(SocketAddr, Value)], bg: u64) -> Option<(SocketAddr, u64, u64)> {
    rows.iter()
        .filter(|(_, b)| b["bg"].as_u64() == Some(bg) && b["state"].as_str() == Some("LEADER"))
        .filter_map(|(addr, b)| Some((*addr, b["node"].as_u64()?, b["term"].as_u64()?)))
        .max_by_key(|&(_, _, term)| term)
}

async fn transfer_leader(
    nodes: &[SocketAddr],
    bg: u64,
    to: Option<u64>,
    wait: Duration,
) -> Result<(), Error> {
    let (rows, errors) = statuses(nodes).await;
    for e in &errors {
        eprintln!("bdctl: {e}");
    }
    let Some((addr, from, term)) = find_leader(&rows, bg) else {
        return Err(Error::AdminOutcome(format!(
            "bg {bg}: no leader among {} (an election may be running, or the leader is on a \
             node not given with --node)",
            list(nodes)
        )));
    };
    if to == Some(from) {
        println!("bg {bg}: node {from} is already the leader (term {term})");
        return Ok(());
    }
    let query = to.map_or(String::new(), |t| format!("?to={t}"));
    let doc = call(addr, "POST", &format!("/bgs/{bg}/transfer_leader{query}")).await?;
    let target = doc["target"].as_u64().unwrap_or(0);
    println!("bg {bg}: transferring leadership from node {from} (term {term}) to node {target}");
    let deadline = Instant::now() + wait;
    loop {
        let (rows, _) = statuses(nodes).await;
        if let Some((_, leader, t)) = find_leader(&rows, bg) {
            if leader == target && t > term {
                println!("bg {bg}: node {target} is the leader (term {t})");
                return Ok(());
            }
            if leader != from && leader != target {
                return Err(Error::AdminOutcome(format!(
                    "bg {bg}: node {leader} became the leader (term {t}), not node {target}"
                )));
            }
        }
        if Instant::now() >= deadline {
            let now = find_leader(&rows, bg).map_or("no leader".to_string(), |(_, l, t)| {
                format!("leader: node {l}, term {t}")
            });
            return Err(Error::AdminOutcome(format!(
                "bg {bg}: node {target} did not become the leader within {} ms ({now}); the \
                 leader resumes after an election timeout without an election",
                wait.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Add(u64),
    Remove(u64),
}

/// Whether the configuration `change` asks for is in force on the leader among `rows`: its
/// voters include (exclude) the peer, and the entry that made them so has committed.
pub fn peer_change_committed(rows: &[(SocketAddr, Value)], bg: u64, add: bool, peer: u64) -> bool {
    let Some((addr, _, term)) = find_leader(rows, bg) else {
        return false;
    };
    rows.iter()
        .find(|(a, b)| {
            *a == addr && b["bg"].as_u64() == Some(bg) && b["term"].as_u64() == Some(term)
        })
        .is_some_and(|(_, b)| {
            let voters: Vec<u64> = b["voters"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            let committed = b["last_committed_index"].as_u64() >= b["conf_index"].as_u64();
            voters.contains(&peer) == add && committed
        })
}

/// Asks the leader of `bg` for `change` and waits until the new configuration commits.
async fn change_peer(
    nodes: &[SocketAddr],
    bg: u64,
    change: Change,
    wait: Duration,
) -> Result<(), Error> {
    let (add, peer, route, verb) = match change {
        Change::Add(p) => (true, p, "add_peer", "adding"),
        Change::Remove(p) => (false, p, "remove_peer", "removing"),
    };
    let (rows, errors) = statuses(nodes).await;
    for e in &errors {
        eprintln!("bdctl: {e}");
    }
    let Some((addr, leader, term)) = find_leader(&rows, bg) else {
        return Err(Error::AdminOutcome(format!(
            "bg {bg}: no leader among {} (an election may be running, or the leader is on a \
             node not given with --node)",
            list(nodes)
        )));
    };
    let doc = call(addr, "POST", &format!("/bgs/{bg}/{route}?peer={peer}")).await?;
    if doc["started"].as_bool() == Some(false) {
        println!("bg {bg}: nothing to do, the configuration already is the one asked for");
        return Ok(());
    }
    println!("bg {bg}: {verb} node {peer} (leader: node {leader}, term {term})");
    let deadline = Instant::now() + wait;
    loop {
        let (rows, _) = statuses(nodes).await;
        if peer_change_committed(&rows, bg, add, peer) {
            let voters = find_leader(&rows, bg)
                .and_then(|(a, _, _)| {
                    rows.iter()
                        .find(|(r, b)| *r == a && b["bg"].as_u64() == Some(bg))
                        .map(|(_, b)| b["voters"].to_string())
                })
                .unwrap_or_default();
            println!("bg {bg}: configuration committed, voters {voters}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::AdminOutcome(format!(
                "bg {bg}: the change {verb} node {peer} did not commit within {} ms (a new \
                 peer that cannot catch up aborts it after the catch-up timeout; see the \
                 leader's log)",
                wait.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn list(nodes: &[SocketAddr]) -> String {
    nodes
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(addr: &str, node: u64, bg: u64, state: &str, term: u64) -> (SocketAddr, Value) {
        (
            addr.parse().unwrap(),
            serde_json::json!({"node": node, "bg": bg, "state": state, "term": term,
                "leader": 1, "voters": [1, 2, 3], "conf_index": 1,
                "last_log_index": 10, "last_committed_index": 9,
                "known_applied_index": 9, "last_snapshot_index": 4,
                "snapshot_status": "IDLE", "hibernating": node == 3}),
        )
    }

    #[test]
    fn the_leader_of_the_highest_term_is_found_per_bg() {
        let rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "LEADER", 5),
            row("127.0.0.1:3", 3, 0, "FOLLOWER", 5),
            row("127.0.0.1:1", 1, 1, "FOLLOWER", 2),
        ];
        let addr: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(find_leader(&rows, 0), Some((addr, 2, 5)));
        assert_eq!(find_leader(&rows, 1), None);
        assert_eq!(find_leader(&rows, 9), None);
    }

    #[test]
    fn status_table_has_a_row_per_node_and_bg() {
        let rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:3", 3, 0, "FOLLOWER", 3),
        ];
        let t = status_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("node") && lines[0].ends_with("snapshot_status"));
        let f: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            f,
            [
                "127.0.0.1:1",
                "1",
                "0",
                "LEADER",
                "3",
                "1",
                "1,2,3",
                "10",
                "9",
                "9",
                "4",
                "IDLE"
            ]
        );
        assert!(lines[2].ends_with("IDLE  (hibernating)"), "{t}");
    }

    #[test]
    fn a_peer_change_is_done_when_the_leaders_configuration_has_committed() {
        let mut rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "FOLLOWER", 3),
        ];
        assert!(peer_change_committed(&rows, 0, true, 2));
        assert!(!peer_change_committed(&rows, 0, true, 4));
        assert!(peer_change_committed(&rows, 0, false, 4));
        assert!(
            !peer_change_committed(&rows, 1, false, 4),
            "no leader of bg 1"
        );
        // Appended, not committed yet.
        rows[0].1["voters"] = serde_json::json!([1, 2, 3, 4]);
        rows[0].1["conf_index"] = serde_json::json!(10);
        assert!(!peer_change_committed(&rows, 0, true, 4));
        rows[0].1["last_committed_index"] = serde_json::json!(10);
        assert!(peer_change_committed(&rows, 0, true, 4));
        // A follower's view does not count.
        rows[1].1["voters"] = serde_json::json!([1, 2]);
        assert!(!peer_change_committed(&rows, 0, false, 3));
    }

    #[test]
    fn without_node_flags_the_dev_cluster_is_used() {
        let a = CtlArgs::try_parse_from(["bdctl", "status"]).unwrap();
        assert_eq!(a.nodes().len(), 3);
        let dev0: SocketAddr = "127.0.0.1:10909".parse().unwrap();
        assert_eq!(a.nodes()[0], dev0);
        let a =
            CtlArgs::try_parse_from(["bdctl", "snapshot", "--bg", "4", "--node", "10.0.0.1:8100"])
                .unwrap();
        let given: SocketAddr = "10.0.0.1:8100".parse().unwrap();
        assert_eq!(a.nodes(), vec![given]);
        assert!(
            CtlArgs::try_parse_from(["bdctl", "snapshot"]).is_err(),
            "--bg required"
        );
        assert!(
            CtlArgs::try_parse_from(["bdctl", "--node", "nohost", "status"]).is_err(),
            "HOST:PORT"
        );
    }
}
