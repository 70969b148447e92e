//! `bdctl`: braft_cli-style control of a running cluster through the nodes' HTTP endpoints
//! (see [`crate::http`]): `status`, `state` (braft_cli's per-replica raft node state),
//! `snapshot`, `transfer-leader`, `balance-leaders` (spread the
//! block groups' leaders evenly over the nodes by leadership transfers), and membership changes:
//! `add-peer`, `remove-peer` and `move-replica` (add the new replica, then remove the old one:
//! the group keeps three voters throughout, and a majority of the old ones and of the new ones
//! agree on every step).
//!
//! Nodes do not know each other's HTTP addresses, so `bdctl` takes them all (`--node`,
//! repeatable; else a cluster file: `--cluster FILE`, `$BD_CLUSTER` or `./bd-data/cluster.toml`
//! as `bd-server dev` writes it; else the three nodes of a default `bd-server dev`) and finds a
//! block group's leader itself from their `/status.json`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use engine::PeerChange;
use serde::Deserialize;
use serde_json::Value;

use crate::dashboard::{human_bytes, rebuilding_text};
use crate::error::Error;
use crate::http;

/// HTTP addresses of the nodes `bd-server dev` starts with its default `--base-port`.
pub const DEV_NODES: [&str; 3] = ["127.0.0.1:10909", "127.0.0.1:10910", "127.0.0.1:10911"];

mod state;
pub use state::{fsm_state, raft_stat_blocks, state_rows, state_table, StateRow};

#[derive(Parser, Debug)]
#[command(
    name = "bdctl",
    version,
    about = "Control a bd cluster: block group status, snapshots, leadership transfer, membership changes",
    long_about = "Control a bd cluster through the nodes' HTTP endpoints (`http_listen`).\n\n\
        Which nodes: the --node flags if any; else the nodes listed in the cluster file given \
        with --cluster FILE, else in the file named by the environment variable BD_CLUSTER, \
        else in ./bd-data/cluster.toml (written by `bd-server dev` with its default \
        --data-dir; `bd-server dev --data-dir DIR` writes DIR/cluster.toml); without any of \
        these, the three nodes of a default `bd-server dev` (127.0.0.1:10909, :10910, :10911). \
        A cluster file is TOML with one [[nodes]] table per node: id = 1, http = \"HOST:PORT\". \
        Exit status 1 if anything failed; every error names the node it is about."
)]
pub struct CtlArgs {
    /// HTTP address (HOST:PORT) of a node; repeat for every node of the cluster.
    #[arg(long = "node", value_name = "HOST:PORT", global = true)]
    pub nodes: Vec<SocketAddr>,
    /// Cluster file listing the nodes' HTTP addresses (as `bd-server dev` writes to
    /// DATA_DIR/cluster.toml); default: $BD_CLUSTER, else ./bd-data/cluster.toml if it exists.
    #[arg(long, value_name = "FILE", global = true)]
    pub cluster: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// One line per block group and node: role, term, leader, voters, log, commit, applied,
    /// snapshot; a leader's row ends in UNDER-REPLICATED (naming the members not counted) while
    /// the group has fewer copies than members, a replica's in REBUILDING (with the snapshot
    /// bytes received and in all) while it is rebuilt.
    Status {
        /// Only this block group.
        #[arg(long)]
        bg: Option<u64>,
    },
    /// The raft node state of every replica (braft_cli's get_raft_node_state): one row per
    /// block group and node with group_id, peer_id, raft_conf (voters), state, term, leader,
    /// fsm_state (applied, applying, saving_snapshot, loading_snapshot, downloading_snapshot),
    /// disk_id, known_applied_id, last_committed_id, last_snapshot_id, last_snapshot_term and
    /// snapshot_status.
    State {
        /// Only this block group.
        #[arg(long)]
        bg: Option<u64>,
        /// A JSON array instead of the table, each row with the node's HTTP address (`addr`)
        /// and its /raft_stat block for the group (`raw_raft_stat`).
        #[arg(long)]
        json: bool,
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
    /// Spread the leaders of all block groups evenly over the given nodes: transfer leadership
    /// from nodes that lead more than their share to voters that lead fewer, one group at a
    /// time, until the counts differ by at most one where the groups' voters allow it (after a
    /// node restarts, the others keep the leaderships it lost).
    BalanceLeaders {
        /// Print the planned transfers without making them.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for each new leader.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        wait_ms: u64,
    },
    /// Make a node a voter of a block group and wait until that configuration commits
    /// (braft_cli add_peer). The node must hold the group (declared with `--join-bg` or
    /// `join = true`) and be a peer of every node; it catches up on the log or a snapshot
    /// first.
    AddPeer(PeerArgs),
    /// Remove a node from a block group and wait until that configuration commits (braft_cli
    /// remove_peer). A leader that removes itself steps down once the change commits. The
    /// removed replica's files stay on its node.
    RemovePeer(PeerArgs),
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

/// The arguments of `add-peer` and `remove-peer`.
#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    /// Block group id.
    #[arg(long)]
    pub bg: u64,
    /// Node id to add or remove.
    #[arg(long)]
    pub peer: u64,
    /// How long to wait for the configuration to commit before failing.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub wait_ms: u64,
}

impl CtlArgs {
    /// The nodes to talk to: `--node`s, else those of the cluster file (`--cluster`,
    /// `$BD_CLUSTER`, `./bd-data/cluster.toml`), else the default dev cluster's.
    pub fn nodes(&self) -> Result<Vec<SocketAddr>, Error> {
        self.nodes_from(
            std::env::var_os(CLUSTER_ENV).map(PathBuf::from),
            Path::new(DEV_CLUSTER_FILE),
        )
    }

    /// [`CtlArgs::nodes`] with the environment's cluster file and the default one given.
    pub fn nodes_from(
        &self,
        env: Option<PathBuf>,
        default_file: &Path,
    ) -> Result<Vec<SocketAddr>, Error> {
        if !self.nodes.is_empty() {
            return Ok(self.nodes.clone());
        }
        let env = env.filter(|p| !p.as_os_str().is_empty());
        if let Some(file) = self.cluster.clone().or(env) {
            return read_cluster_file(&file);
        }
        if default_file.is_file() {
            return read_cluster_file(default_file);
        }
        Ok(DEV_NODES
            .iter()
            .map(|a| a.parse().expect("valid address"))
            .collect())
    }
}

/// The environment variable naming a cluster file.
pub const CLUSTER_ENV: &str = "BD_CLUSTER";
/// The cluster file `bd-server dev` writes with its default data directory.
pub const DEV_CLUSTER_FILE: &str = "bd-data/cluster.toml";

/// A cluster file: the nodes and their HTTP addresses (other keys, such as `nbd`, are ignored).
#[derive(Debug, Deserialize)]
struct ClusterFile {
    #[serde(default)]
    nodes: Vec<ClusterNode>,
}

#[derive(Debug, Deserialize)]
struct ClusterNode {
    id: u64,
    http: SocketAddr,
}

/// The HTTP addresses listed in a cluster file's `[[nodes]]`, in the order of their ids.
pub fn parse_cluster_file(text: &str) -> Result<Vec<(u64, SocketAddr)>, String> {
    let f: ClusterFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if f.nodes.is_empty() {
        return Err("no [[nodes]] (each with id and http = \"HOST:PORT\")".into());
    }
    let mut nodes: Vec<(u64, SocketAddr)> = f.nodes.iter().map(|n| (n.id, n.http)).collect();
    nodes.sort_unstable_by_key(|&(id, _)| id);
    if let Some(w) = nodes.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("node {} is listed twice", w[0].0));
    }
    Ok(nodes)
}

fn read_cluster_file(path: &Path) -> Result<Vec<SocketAddr>, Error> {
    let bad =
        |reason: String| Error::AdminOutcome(format!("cluster file {}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let nodes = parse_cluster_file(&text).map_err(bad)?;
    Ok(nodes.into_iter().map(|(_, a)| a).collect())
}

/// Runs `args`, printing results on stdout; an error on one node does not stop the others,
/// the first one is returned at the end.
pub fn run(args: &CtlArgs) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::AdminOutcome(format!("cannot start a runtime: {e}")))?;
    let nodes = args.nodes()?;
    rt.block_on(async {
        match &args.command {
            CtlCommand::Status { bg } => status(&nodes, *bg).await,
            CtlCommand::State { bg, json } => state::state(&nodes, *bg, *json).await,
            CtlCommand::Snapshot { bg } => snapshot(&nodes, *bg).await,
            CtlCommand::TransferLeader { bg, to, wait_ms } => {
                transfer_leader(&nodes, *bg, *to, ms(*wait_ms)).await
            }
            CtlCommand::AddPeer(a) => {
                change_peer(&nodes, a.bg, PeerChange::Add(a.peer), ms(a.wait_ms)).await
            }
            CtlCommand::RemovePeer(a) => {
                change_peer(&nodes, a.bg, PeerChange::Remove(a.peer), ms(a.wait_ms)).await
            }
            CtlCommand::BalanceLeaders { dry_run, wait_ms } => {
                balance_leaders(&nodes, *dry_run, ms(*wait_ms)).await
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
                change_peer(&nodes, *bg, PeerChange::Add(*to), ms(*wait_ms)).await?;
                change_peer(&nodes, *bg, PeerChange::Remove(*from), ms(*wait_ms)).await
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
    doc.ok_or_else(|| {
        admin(format!(
            "{method} {path}: answer is not JSON (it starts with \"{}\")",
            body.chars().take(80).collect::<String>().escape_debug()
        ))
    })
}

/// GETs a text page (`/raft_stat`); a non-200 answer or none is an error naming the node.
async fn call_text(addr: SocketAddr, path: &str) -> Result<String, Error> {
    let admin = |reason: String| Error::Admin { addr, reason };
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(30), http::request(addr, "GET", path))
            .await
            .map_err(|_| admin(format!("GET {path}: no answer within 30 s")))?
            .map_err(|e| admin(format!("GET {path}: {e}")))?;
    if code != 200 {
        return Err(admin(format!("GET {path}: {} (HTTP {code})", body.trim())));
    }
    Ok(body)
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
            "{:<22} {:>4} {:>6} {:<10} {:>6} {:>6} {:<10} {:>10} {:>10} {:>10} {:>10}  {}{}{}\n",
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
            replication_marks(rows, b),
            if b["hibernating"].as_bool() == Some(true) {
                "  (hibernating)"
            } else {
                ""
            }
        ));
    }
    out
}

/// The end of a `status` row about lost copies: on a leader whose group is under-replicated,
/// `  UNDER-REPLICATED (...)` naming each member not counted toward quorums (`node 3
/// rebuilding 1.5 MiB/4.0 GiB` with the progress that replica's own row in `rows` reports,
/// `node 2 not counted` for a voter not answering from its bound disk, or not yet in this
/// term); on a replica being rebuilt, `  REBUILDING` (with `done/total` bytes while it downloads
/// a snapshot).
fn replication_marks(rows: &[(SocketAddr, Value)], b: &Value) -> String {
    let mut out = String::new();
    let flag = |k: &str| b[k].as_bool() == Some(true);
    if flag("under_replicated") {
        let missing: Vec<String> = b["peers"]
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter_map(|p| {
                        let id = p["id"].as_u64()?;
                        let voter = p["voter"].as_bool() == Some(true);
                        if p["rebuilding"].as_bool() == Some(true) {
                            // The bytes are known on the replica itself, if it answered.
                            let own = rows.iter().find(|(_, r)| {
                                r["bg"] == b["bg"]
                                    && r["node"].as_u64() == Some(id)
                                    && r["rebuilding"].as_bool() == Some(true)
                            });
                            let (done, total) = own.map_or((0, 0), |(_, r)| {
                                (
                                    r["rebuild_bytes_done"].as_u64().unwrap_or(0),
                                    r["rebuild_bytes_total"].as_u64().unwrap_or(0),
                                )
                            });
                            Some(format!("node {id} {}", rebuilding_text(done, total)))
                        } else if voter && p["counted"].as_bool() == Some(false) {
                            Some(format!("node {id} not counted"))
                        } else {
                            None
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str("  UNDER-REPLICATED");
        if !missing.is_empty() {
            out.push_str(&format!(" ({})", missing.join(", ")));
        }
    }
    if flag("rebuilding") {
        out.push_str("  REBUILDING");
        let total = b["rebuild_bytes_total"].as_u64().unwrap_or(0);
        if total > 0 {
            let done = b["rebuild_bytes_done"].as_u64().unwrap_or(0);
            out.push_str(&format!(" {}/{}", human_bytes(done), human_bytes(total)));
        }
    }
    out
}

/// Every node's status rows (of bg `only`, if given), ordered by BG, node and address, and the
/// errors of the nodes that did not answer (or that no node hosts `only`).
async fn bg_rows(
    nodes: &[SocketAddr],
    only: Option<u64>,
) -> (Vec<(SocketAddr, Value)>, Vec<Error>) {
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
    (rows, errors)
}

async fn status(nodes: &[SocketAddr], only: Option<u64>) -> Result<(), Error> {
    let (rows, errors) = bg_rows(nodes, only).await;
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

/// The leader of `bg` among `nodes` (address, node id, term), printing the errors of nodes
/// that did not answer; an error if none leads.
async fn current_leader(nodes: &[SocketAddr], bg: u64) -> Result<(SocketAddr, u64, u64), Error> {
    let (rows, errors) = statuses(nodes).await;
    for e in &errors {
        eprintln!("bdctl: {e}");
    }
    find_leader(&rows, bg).ok_or_else(|| {
        Error::AdminOutcome(format!(
            "bg {bg}: no leader among {} (an election may be running, or the leader is on a \
             node not given with --node)",
            list(nodes)
        ))
    })
}

async fn transfer_leader(
    nodes: &[SocketAddr],
    bg: u64,
    to: Option<u64>,
    wait: Duration,
) -> Result<(), Error> {
    let (addr, from, term) = current_leader(nodes, bg).await?;
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

/// One block group as `balance-leaders` sees it: its leader (if any) and its voters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Led {
    pub bg: u64,
    pub leader: Option<u64>,
    pub voters: Vec<u64>,
}

/// The voters a status row reports.
fn voters_of(b: &Value) -> Vec<u64> {
    b["voters"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The status row of `bg` on its leader among `rows` (see [`find_leader`]).
fn leader_row(rows: &[(SocketAddr, Value)], bg: u64) -> Option<&Value> {
    let (addr, _, _) = find_leader(rows, bg)?;
    rows.iter()
        .find(|(a, b)| *a == addr && b["bg"].as_u64() == Some(bg))
        .map(|(_, b)| b)
}

/// Every block group among `rows`, with the leader of its highest term and that leader's
/// voters (a group without a leader lists the voters some node reports).
pub fn groups_led(rows: &[(SocketAddr, Value)]) -> Vec<Led> {
    let mut bgs: Vec<u64> = rows.iter().filter_map(|(_, b)| b["bg"].as_u64()).collect();
    bgs.sort_unstable();
    bgs.dedup();
    bgs.into_iter()
        .map(|bg| {
            let row = leader_row(rows, bg).or_else(|| {
                rows.iter()
                    .find(|(_, b)| b["bg"].as_u64() == Some(bg))
                    .map(|(_, b)| b)
            });
            Led {
                bg,
                leader: find_leader(rows, bg).map(|(_, id, _)| id),
                voters: row.map(voters_of).unwrap_or_default(),
            }
        })
        .collect()
}

/// Leadership transfers `(bg, from, to)` that even out how many groups each of `nodes` leads:
/// repeatedly, a group of the node that leads the most moves to the voter of that group (among
/// `nodes`) that leads the fewest, while that narrows the gap by two or more. Deterministic:
/// ties go to the lower node id and group id.
pub fn plan_leader_moves(groups: &[Led], nodes: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut count: std::collections::BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    let mut leader: Vec<Option<u64>> = groups.iter().map(|g| g.leader).collect();
    for l in leader.iter().flatten() {
        if let Some(c) = count.get_mut(l) {
            *c += 1;
        }
    }
    let mut moves = Vec::new();
    // Each move lowers the sum of squared counts, so this ends; the bound is a guard.
    for _ in 0..groups.len() * nodes.len().max(1) {
        let mut best: Option<(usize, u64, u64)> = None; // (gain, group index, to)
        for (i, g) in groups.iter().enumerate() {
            let Some(from) = leader[i] else { continue };
            let Some(&cf) = count.get(&from) else {
                continue;
            };
            for &to in &g.voters {
                let Some(&ct) = count.get(&to) else { continue };
                if to == from || cf < ct + 2 {
                    continue;
                }
                let gain = cf - ct;
                if best.is_none_or(|(bg_gain, _, _)| gain > bg_gain) {
                    best = Some((gain, i as u64, to));
                }
            }
        }
        let Some((_, i, to)) = best else { break };
        let i = i as usize;
        let from = leader[i].expect("led");
        *count.get_mut(&from).expect("counted") -= 1;
        *count.get_mut(&to).expect("counted") += 1;
        leader[i] = Some(to);
        moves.push((groups[i].bg, from, to));
    }
    moves
}

async fn balance_leaders(nodes: &[SocketAddr], dry_run: bool, wait: Duration) -> Result<(), Error> {
    let (rows, errors) = statuses(nodes).await;
    if !errors.is_empty() {
        // Counting leaders without every node would move leaderships onto nodes that look idle
        // only because they did not answer.
        return report(errors, nodes.len());
    }
    let mut ids: Vec<u64> = rows
        .iter()
        .filter_map(|(_, b)| b["node"].as_u64())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let groups = groups_led(&rows);
    let leaderless: Vec<u64> = groups
        .iter()
        .filter(|g| g.leader.is_none())
        .map(|g| g.bg)
        .collect();
    if !leaderless.is_empty() {
        let bgs: Vec<String> = leaderless.iter().map(u64::to_string).collect();
        eprintln!("bdctl: no leader now for bg {}; left out", bgs.join(", "));
    }
    let counts = |groups: &[Led]| -> String {
        ids.iter()
            .map(|n| {
                let c = groups.iter().filter(|g| g.leader == Some(*n)).count();
                format!("node {n}: {c}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("leaders before: {}", counts(&groups));
    let moves = plan_leader_moves(&groups, &ids);
    if moves.is_empty() {
        println!("balanced: nothing to move");
        return Ok(());
    }
    let mut errors = Vec::new();
    for &(bg, from, to) in &moves {
        if dry_run {
            println!("would move bg {bg}: node {from} -> node {to}");
            continue;
        }
        if let Err(e) = transfer_leader(nodes, bg, Some(to), wait).await {
            errors.push(e);
        }
    }
    if !dry_run {
        let (rows, _) = statuses(nodes).await;
        println!("leaders after: {}", counts(&groups_led(&rows)));
    }
    report(errors, moves.len())
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Whether the configuration `change` asks for is in force on the leader among `rows`: its
/// voters include (exclude) the peer, and the entry that made them so has committed.
pub fn peer_change_committed(rows: &[(SocketAddr, Value)], bg: u64, add: bool, peer: u64) -> bool {
    leader_row(rows, bg).is_some_and(|b| {
        let committed = b["last_committed_index"].as_u64() >= b["conf_index"].as_u64();
        voters_of(b).contains(&peer) == add && committed
    })
}

/// Whether the change `leader` started in `term` ended without the configuration it asked
/// for: that leader, still leading in that term, has no change running any more (it aborted:
/// a new peer that does not catch up within the catch-up timeout). Under a new leader the
/// change may still commit, so that is not counted as ended.
pub fn peer_change_abandoned(
    rows: &[(SocketAddr, Value)],
    bg: u64,
    leader: u64,
    term: u64,
) -> bool {
    rows.iter().any(|(_, b)| {
        b["bg"].as_u64() == Some(bg)
            && b["node"].as_u64() == Some(leader)
            && b["state"].as_str() == Some("LEADER")
            && b["term"].as_u64() == Some(term)
            && b["conf_changing"].as_bool() == Some(false)
    })
}

/// Asks the leader of `bg` for `change` and waits until the new configuration commits.
async fn change_peer(
    nodes: &[SocketAddr],
    bg: u64,
    change: PeerChange,
    wait: Duration,
) -> Result<(), Error> {
    let (add, peer, route, verb) = match change {
        PeerChange::Add(p) => (true, p, "add_peer", "adding"),
        PeerChange::Remove(p) => (false, p, "remove_peer", "removing"),
    };
    let (addr, leader, term) = current_leader(nodes, bg).await?;
    let doc = call(addr, "POST", &format!("/bgs/{bg}/{route}?peer={peer}")).await?;
    if doc["started"].as_bool() == Some(false) {
        println!("bg {bg}: nothing to do, the configuration already is the one asked for");
        return Ok(());
    }
    println!("bg {bg}: {verb} node {peer} (leader: node {leader}, term {term})");
    let deadline = Instant::now() + wait;
    loop {
        let (rows, _) = statuses(nodes).await;
        let done = peer_change_committed(&rows, bg, add, peer);
        if !done && peer_change_abandoned(&rows, bg, leader, term) {
            return Err(Error::AdminOutcome(format!(
                "bg {bg}: node {leader} gave up {verb} node {peer} (a new peer that does not \
                 catch up within the catch-up timeout aborts the change; see that node's log \
                 for `membership change done`)"
            )));
        }
        if done {
            let voters = leader_row(&rows, bg)
                .map(|b| b["voters"].to_string())
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

    pub(super) fn row(
        addr: &str,
        node: u64,
        bg: u64,
        state: &str,
        term: u64,
    ) -> (SocketAddr, Value) {
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
        assert!(
            !t.contains("UNDER-REPLICATED") && !t.contains("REBUILDING"),
            "{t}"
        );
    }

    #[test]
    fn status_table_marks_under_replicated_groups_and_rebuilding_replicas() {
        let mut rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "FOLLOWER", 3),
            row("127.0.0.1:3", 3, 0, "FOLLOWER", 3),
            row("127.0.0.1:1", 1, 1, "LEADER", 3),
        ];
        let peer = |id: u64, voter: bool, counted: bool, rebuilding: bool| {
            serde_json::json!({"id": id, "voter": voter, "counted": counted,
                "rebuilding": rebuilding})
        };
        rows[0].1["under_replicated"] = true.into();
        rows[0].1["voters"] = serde_json::json!([1, 2]);
        rows[0].1["peers"] =
            serde_json::json!([peer(2, true, true, false), peer(3, false, false, true)]);
        rows[2].1["rebuilding"] = true.into();
        rows[2].1["hibernating"] = false.into();
        rows[2].1["snapshot_status"] = "DOWNLOADING 1572864/4294967296".into();
        rows[2].1["rebuild_bytes_done"] = (3u64 << 19).into();
        rows[2].1["rebuild_bytes_total"] = (4u64 << 30).into();
        // bg 1: node 2 answers from other storage (a voter about to be demoted), node 3 has not
        // answered this leader yet.
        rows[3].1["under_replicated"] = true.into();
        rows[3].1["peers"] =
            serde_json::json!([peer(2, true, false, true), peer(3, true, false, false)]);
        let t = status_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[1].contains(" 1,2 "), "{t}");
        assert!(
            lines[1].ends_with("IDLE  UNDER-REPLICATED (node 3 rebuilding 1.5 MiB/4.0 GiB)"),
            "{t}"
        );
        assert!(lines[2].ends_with("IDLE"), "{t}");
        assert!(
            lines[3].ends_with("DOWNLOADING 1572864/4294967296  REBUILDING 1.5 MiB/4.0 GiB"),
            "{t}"
        );
        assert!(
            lines[4].ends_with("IDLE  UNDER-REPLICATED (node 2 rebuilding, node 3 not counted)"),
            "{t}"
        );
        // The rebuilding replica's own row not at hand (its node not asked): no bytes.
        rows.remove(2);
        let t = status_table(&rows);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .ends_with("IDLE  UNDER-REPLICATED (node 3 rebuilding)"),
            "{t}"
        );
        // Without any peer detail the flag still shows.
        rows[0].1["peers"] = serde_json::json!([]);
        let t = status_table(&rows);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .ends_with("IDLE  UNDER-REPLICATED"),
            "{t}"
        );
    }

    fn led(bg: u64, leader: u64, voters: &[u64]) -> Led {
        Led {
            bg,
            leader: Some(leader),
            voters: voters.to_vec(),
        }
    }

    #[test]
    fn leader_moves_even_out_the_counts_within_each_groups_voters() {
        let all = [1, 2, 3];
        // Six groups all led by node 1: two move to each of the others.
        let groups: Vec<Led> = (0..6).map(|bg| led(bg, 1, &all)).collect();
        let moves = plan_leader_moves(&groups, &all);
        assert_eq!(moves.len(), 4, "{moves:?}");
        let to = |n: u64| moves.iter().filter(|m| m.2 == n).count();
        assert_eq!((to(2), to(3)), (2, 2), "{moves:?}");
        assert!(moves.iter().all(|m| m.1 == 1));
        // Balanced already, or off by one: nothing.
        let groups = vec![
            led(0, 1, &all),
            led(1, 2, &all),
            led(2, 3, &all),
            led(3, 1, &all),
        ];
        assert!(plan_leader_moves(&groups, &all).is_empty());
        // A move only goes to a voter of the group: node 3 holds neither group here.
        let groups = vec![led(0, 1, &[1, 2]), led(1, 1, &[1, 2]), led(2, 1, &[1, 2])];
        assert_eq!(plan_leader_moves(&groups, &all), vec![(0, 1, 2)]);
        // Nodes not asked about are neither counted nor targets; leaderless groups stay.
        let mut groups: Vec<Led> = (0..4).map(|bg| led(bg, 1, &[1, 2, 4])).collect();
        groups.push(Led {
            bg: 9,
            leader: None,
            voters: all.to_vec(),
        });
        let moves = plan_leader_moves(&groups, &[1, 2]);
        assert_eq!(moves, vec![(0, 1, 2), (1, 1, 2)]);
    }

    #[test]
    fn groups_led_take_the_leader_of_the_highest_term_and_its_voters() {
        let mut rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "LEADER", 4),
            row("127.0.0.1:3", 3, 1, "FOLLOWER", 2),
        ];
        rows[1].1["voters"] = serde_json::json!([2, 3, 4]);
        let g = groups_led(&rows);
        assert_eq!(
            g,
            vec![
                Led {
                    bg: 0,
                    leader: Some(2),
                    voters: vec![2, 3, 4]
                },
                Led {
                    bg: 1,
                    leader: None,
                    voters: vec![1, 2, 3]
                }
            ]
        );
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
    fn a_peer_change_is_abandoned_only_by_its_leader_in_its_term() {
        let mut rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "FOLLOWER", 3),
        ];
        rows[0].1["conf_changing"] = serde_json::json!(true);
        assert!(!peer_change_abandoned(&rows, 0, 1, 3), "still running");
        rows[0].1["conf_changing"] = serde_json::json!(false);
        assert!(peer_change_abandoned(&rows, 0, 1, 3));
        assert!(!peer_change_abandoned(&rows, 0, 1, 2), "another term");
        assert!(
            !peer_change_abandoned(&rows, 0, 2, 3),
            "not the leader asked"
        );
        assert!(!peer_change_abandoned(&rows, 1, 1, 3), "another group");
        rows[0].1["state"] = serde_json::json!("FOLLOWER");
        assert!(
            !peer_change_abandoned(&rows, 0, 1, 3),
            "deposed: it may still commit"
        );
    }

    #[test]
    fn without_node_flags_the_dev_cluster_is_used() {
        let none = Path::new("/nonexistent/bd-data/cluster.toml");
        let a = CtlArgs::try_parse_from(["bdctl", "status"]).unwrap();
        let nodes = a.nodes_from(None, none).unwrap();
        assert_eq!(nodes.len(), 3);
        let dev0: SocketAddr = "127.0.0.1:10909".parse().unwrap();
        assert_eq!(nodes[0], dev0);
        let a =
            CtlArgs::try_parse_from(["bdctl", "snapshot", "--bg", "4", "--node", "10.0.0.1:8100"])
                .unwrap();
        let given: SocketAddr = "10.0.0.1:8100".parse().unwrap();
        assert_eq!(a.nodes_from(None, none).unwrap(), vec![given]);
        assert!(
            CtlArgs::try_parse_from(["bdctl", "snapshot"]).is_err(),
            "--bg required"
        );
        assert!(
            CtlArgs::try_parse_from(["bdctl", "--node", "nohost", "status"]).is_err(),
            "HOST:PORT"
        );
    }

    #[test]
    fn a_cluster_file_replaces_the_dev_nodes_unless_nodes_are_given() {
        let text = "# bd-server dev\n\
            [[nodes]]\nid = 2\nhttp = \"127.0.0.1:20101\"\nnbd = \"127.0.0.1:20001\"\n\
            [[nodes]]\nid = 1\nhttp = \"127.0.0.1:20100\"\n";
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert_eq!(
            parse_cluster_file(text).unwrap(),
            vec![(1, a("127.0.0.1:20100")), (2, a("127.0.0.1:20101"))]
        );
        for (bad, says) in [
            ("", "no [[nodes]]"),
            ("[[nodes]]\nid = 1\n", "missing field `http`"),
            ("[[nodes]]\nid = 1\nhttp = \"nohost\"\n", "invalid socket address"),
            (
                "[[nodes]]\nid = 1\nhttp = \"127.0.0.1:1\"\n[[nodes]]\nid = 1\nhttp = \"127.0.0.1:2\"\n",
                "node 1 is listed twice",
            ),
        ] {
            let e = parse_cluster_file(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "[[nodes]]\nid = 7\nhttp = \"127.0.0.1:7\"\n").unwrap();
        let status = CtlArgs::try_parse_from(["bdctl", "status"]).unwrap();
        let both = vec![a("127.0.0.1:20100"), a("127.0.0.1:20101")];
        // The default file, when it exists.
        assert_eq!(status.nodes_from(None, &file).unwrap(), both);
        // $BD_CLUSTER before the default file; --cluster before both; --node before all.
        assert_eq!(
            status.nodes_from(Some(other.clone()), &file).unwrap(),
            vec![a("127.0.0.1:7")]
        );
        let flag = file.to_str().unwrap();
        let with_flag = CtlArgs::try_parse_from(["bdctl", "status", "--cluster", flag]).unwrap();
        assert_eq!(
            with_flag.nodes_from(Some(other.clone()), &other).unwrap(),
            both
        );
        let with_node =
            CtlArgs::try_parse_from(["bdctl", "--cluster", flag, "--node", "10.0.0.1:1", "status"])
                .unwrap();
        assert_eq!(
            with_node.nodes_from(None, &file).unwrap(),
            vec![a("10.0.0.1:1")]
        );
        // A cluster file asked for but missing is an error naming it.
        let missing = dir.path().join("missing.toml");
        let e = status
            .nodes_from(Some(missing.clone()), &file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
