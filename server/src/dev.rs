//! `bd-server dev`: a local cluster of `--nodes` N (default 3) processes on loopback, as child
//! processes of this binary (`bd-server run --config DATA_DIR/nodeN.toml`), each logging to
//! `DATA_DIR/nodeN.log`, with `--bgs` M block groups (default 1: `bg0`).
//!
//! Layout: BG k is replicated on min(3, N) nodes: every node when N <= 3, else the nodes
//! (3k mod N)+1, ((3k+1) mod N)+1 and ((3k+2) mod N)+1: the replicas are dealt round-robin,
//! so each node holds as many as any other, give or take one. Every node
//! lists every other node as a peer. The config files are rewritten on each start (the data of
//! node N lives in `DATA_DIR/nodeN`, so running `dev` again reuses it), and `DATA_DIR/cluster.toml`
//! lists each node's id and HTTP address for `bdctl` (`--cluster`, `$BD_CLUSTER`, or
//! `./bd-data/cluster.toml` by default).
//!
//! The transport runs without TLS (`insecure_loopback`), which the transport allows on loopback
//! only and which is logged. `dev` waits until every BG has a leader, then supervises: a node
//! that dies is reported (exit status, log path) and restarted after [`RESTART_DELAY`] unless
//! `--no-restart`; the others keep running. Ctrl-C (or SIGTERM) sends SIGTERM to every child at
//! once and waits for them ([`STOP_GRACE`], then they are killed). A child also gets SIGTERM
//! if `dev` itself dies (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cli::DevArgs;
use crate::error::Error;

/// Time the cluster has to elect a leader for every BG before `dev` gives up.
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// Time a child gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Time between a node's death and its restart.
pub const RESTART_DELAY: Duration = Duration::from_secs(2);
/// Most nodes `dev` starts (the port layout leaves room for more; the 1-digit ids keep it tidy).
pub const NODES_MAX: u64 = 9;
/// Replicas per BG, at most.
const REPLICAS: u64 = 3;
/// QUIC ports reserved per node (one per core).
const QUIC_PORTS_PER_NODE: u16 = 32;

/// Addresses of dev node `id` (1-based) and the BGs it holds.
pub struct DevNode {
    pub id: u64,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub dir: PathBuf,
    /// The BGs with a replica on this node, ascending.
    pub bgs: Vec<u64>,
}

/// The dev cluster: its nodes and the members of each BG (index = BG id).
pub struct DevLayout {
    pub nodes: Vec<DevNode>,
    pub members: Vec<Vec<u64>>,
}

/// The members of BG 0..bgs on `nodes` nodes: min(3, nodes) distinct node ids each, ascending.
pub fn placement(nodes: u64, bgs: u64) -> Vec<Vec<u64>> {
    (0..bgs)
        .map(|k| {
            if nodes <= REPLICAS {
                (1..=nodes).collect()
            } else {
                // Replica slots dealt round-robin: BG k takes slots 3k, 3k+1, 3k+2.
                let mut m: Vec<u64> = (0..REPLICAS)
                    .map(|i| (REPLICAS * k + i) % nodes + 1)
                    .collect();
                m.sort_unstable();
                m
            }
        })
        .collect()
}

pub fn layout(args: &DevArgs) -> Result<DevLayout, Error> {
    let bad = |what: String| Err(Error::Config { what });
    if !(1..=NODES_MAX).contains(&args.nodes) {
        return bad(format!(
            "dev: --nodes must be 1..={NODES_MAX}, got {}",
            args.nodes
        ));
    }
    if args.bgs == 0 {
        return bad("dev: --bgs must be at least 1, got 0".into());
    }
    if args.cores == 0 || args.cores > QUIC_PORTS_PER_NODE as usize {
        return bad(format!(
            "dev: --cores must be 1..={QUIC_PORTS_PER_NODE}, got {}",
            args.cores
        ));
    }
    let lo = |port: u32| -> Result<SocketAddr, Error> {
        let port = u16::try_from(port).map_err(|_| Error::Config {
            what: format!(
                "dev: --base-port {} leaves no room for the ports of {} nodes (up to BASE+{})",
                args.base_port,
                args.nodes,
                200 + u32::from(QUIC_PORTS_PER_NODE) * args.nodes as u32 - 1
            ),
        })?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let members = placement(args.nodes, args.bgs);
    let base = args.base_port as u32;
    let nodes = (1..=args.nodes)
        .map(|id| {
            let i = (id - 1) as u32;
            // The last QUIC port of the node must fit too (core c binds quic + c).
            lo(base + 200 + (i + 1) * QUIC_PORTS_PER_NODE as u32 - 1)?;
            Ok(DevNode {
                id,
                nbd: lo(base + i)?,
                http: lo(base + 100 + i)?,
                quic: lo(base + 200 + i * QUIC_PORTS_PER_NODE as u32)?,
                dir: args.data_dir.join(format!("node{id}")),
                bgs: (0..args.bgs)
                    .filter(|&k| members[k as usize].contains(&id))
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(DevLayout { nodes, members })
}

/// A TOML string (quoted and escaped).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The config file of node `n`: everything `bd-server run` needs, parsed by
/// [`crate::config::ServerConfig::load`].
pub fn node_config(args: &DevArgs, l: &DevLayout, n: &DevNode) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `bd-server dev` on each start (edits are lost).\n\
         # Run this node by hand: bd-server run --config <this file>\n\
         node_id = {}\n\
         data_dir = {}\n\
         cores = {}\n\
         nbd_listen = \"{}\"\n\
         quic_listen = \"{}\"\n\
         http_listen = \"{}\"\n\
         insecure_loopback = true\n\
         # Several nodes on one machine: pinned, every node's core 0 would share CPU 0.\n\
         pin_cores = false",
        n.id,
        toml_str(&n.dir.to_string_lossy()),
        args.cores,
        n.nbd,
        n.quic,
        n.http
    );
    for p in l.nodes.iter().filter(|p| p.id != n.id) {
        let _ = write!(s, "\n[[peers]]\nid = {}\naddr = \"{}\"\n", p.id, p.quic);
    }
    for &k in &n.bgs {
        let members: Vec<String> = l.members[k as usize]
            .iter()
            .map(|m| m.to_string())
            .collect();
        let _ = write!(
            s,
            "\n[[bgs]]\nid = {k}\nmembers = [{}]\nsize_bytes = {}\n",
            members.join(", "),
            args.bg_size_bytes
        );
    }
    s
}

/// The cluster file for `bdctl` (see [`crate::ctl::parse_cluster_file`]).
pub fn cluster_file(l: &DevLayout) -> String {
    let mut s = String::from(
        "# Written by `bd-server dev` on each start: its nodes, for bdctl (--cluster FILE or\n\
         # BD_CLUSTER=FILE; ./bd-data/cluster.toml is read by default).\n",
    );
    for n in &l.nodes {
        let _ = write!(
            s,
            "\n[[nodes]]\nid = {}\nhttp = \"{}\"\nnbd = \"{}\"\n",
            n.id, n.http, n.nbd
        );
    }
    s
}

fn config_path(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join(format!("node{id}.toml"))
}

fn log_path(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join(format!("node{id}.log"))
}

/// Starts node `id` with its config file, its output appended to its log.
fn spawn(exe: &Path, data_dir: &Path, id: u64) -> Result<Child, Error> {
    let dev_err = |reason: String| Error::Dev { node: id, reason };
    let log_path = log_path(data_dir, id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| dev_err(format!("open {}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| dev_err(format!("dup log: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(config_path(data_dir, id));
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The node stops (gracefully) if `dev` dies without stopping it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| dev_err(format!("spawn {}: {e}", exe.display())))
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A node's process: running, or waiting to be restarted.
struct Slot {
    id: u64,
    child: Option<Child>,
    restart_at: Option<Instant>,
}

/// SIGTERM to every running child at once, then wait for all of them until [`STOP_GRACE`],
/// then kill the rest.
fn stop_all(slots: &mut [Slot]) {
    for c in slots.iter().filter_map(|s| s.child.as_ref()) {
        signal(c, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    for s in slots.iter_mut() {
        let Some(c) = s.child.as_mut() else { continue };
        loop {
            match c.try_wait() {
                Ok(Some(status)) => {
                    info!(node = s.id, %status, "node stopped");
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    warn!(node = s.id, "node did not stop in time: killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
        s.child = None;
    }
}

/// The leader of each BG as the nodes report it (BG id -> node id).
async fn leaders(nodes: &[DevNode]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for n in nodes.iter().filter(|n| !n.bgs.is_empty()) {
        let Ok(body) = crate::http::get(n.http, "/status.json").await else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        for b in v["bgs"].as_array().into_iter().flatten() {
            if let (Some(bg), Some(l)) = (b["bg"].as_u64(), b["leader"].as_u64()) {
                // A node's own claim wins over a follower's possibly stale view.
                if b["state"].as_str() == Some("LEADER") || !out.contains_key(&bg) {
                    out.insert(bg, l);
                }
            }
        }
    }
    out
}

pub fn dev(args: &DevArgs) -> Result<(), Error> {
    let shown = args.data_dir.clone();
    let setup = |reason: String| Error::Dev { node: 0, reason };
    // Check the arguments before anything is created.
    layout(args)?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| setup(format!("create {}: {e}", args.data_dir.display())))?;
    // Absolute paths in the config files and command lines: they work from any directory.
    let data_dir = std::path::absolute(&args.data_dir)
        .map_err(|e| setup(format!("{}: {e}", args.data_dir.display())))?;
    let abs_args = DevArgs {
        data_dir: data_dir.clone(),
        ..args.clone()
    };
    let l = layout(&abs_args)?;
    let exe =
        std::env::current_exe().map_err(|e| setup(format!("cannot find this executable: {e}")))?;
    for n in &l.nodes {
        let p = config_path(&data_dir, n.id);
        std::fs::write(&p, node_config(&abs_args, &l, n))
            .map_err(|e| setup(format!("write {}: {e}", p.display())))?;
    }
    let cluster = data_dir.join("cluster.toml");
    std::fs::write(&cluster, cluster_file(&l))
        .map_err(|e| setup(format!("write {}: {e}", cluster.display())))?;
    warn!("dev cluster: INSECURE transport (no TLS) on loopback; for local use only");
    let mut slots: Vec<Slot> = Vec::new();
    for n in &l.nodes {
        match spawn(&exe, &data_dir, n.id) {
            Ok(c) => {
                println!(
                    "node {} pid {}: {} run --config {}  (log {})",
                    n.id,
                    c.id(),
                    exe.display(),
                    config_path(&data_dir, n.id).display(),
                    log_path(&shown, n.id).display()
                );
                slots.push(Slot {
                    id: n.id,
                    child: Some(c),
                    restart_at: None,
                });
            }
            Err(e) => {
                stop_all(&mut slots);
                return Err(e);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| setup(format!("runtime: {e}")));
    let result = match rt {
        Ok(rt) => rt.block_on(supervise(&exe, args, &data_dir, &l, &mut slots)),
        Err(e) => Err(e),
    };
    stop_all(&mut slots);
    result
}

/// The first running child that exited: (node id, status).
fn exited(slots: &mut [Slot]) -> Option<(u64, ExitStatus)> {
    for s in slots.iter_mut() {
        if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
            s.child = None;
            return Some((s.id, status));
        }
    }
    None
}

/// One line per node: the NBD URIs of its BGs, its HTTP address and the BGs it leads.
pub fn uri_line(n: &DevNode, bgs: u64, leaders: &BTreeMap<u64, u64>) -> String {
    let uris = if n.bgs.is_empty() {
        "no BGs".to_string()
    } else {
        let u: Vec<String> = n
            .bgs
            .iter()
            .map(|k| format!("nbd://{}/bg{k}", n.nbd))
            .collect();
        u.join(" ")
    };
    let led: Vec<String> = n
        .bgs
        .iter()
        .filter(|k| leaders.get(k) == Some(&n.id))
        .map(|k| format!("bg{k}"))
        .collect();
    let role = match (bgs, led.is_empty()) {
        (_, true) => String::new(),
        (1, false) => " (leader)".to_string(),
        (_, false) => format!(" (leader of {})", led.join(", ")),
    };
    format!("node {}: {uris}  http://{}/raft_stat{role}", n.id, n.http)
}

async fn supervise(
    exe: &Path,
    args: &DevArgs,
    data_dir: &Path,
    l: &DevLayout,
    slots: &mut [Slot],
) -> Result<(), Error> {
    let logs = args.data_dir.display();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Dev {
            node: 0,
            reason: format!("SIGTERM handler: {e}"),
        })?;
    let bgs = args.bgs;
    let deadline = Instant::now() + LEADER_WAIT;
    let leaders = loop {
        if let Some((node, status)) = exited(slots) {
            return Err(Error::Dev {
                node,
                reason: format!("exited ({status}) during startup; see {logs}/node{node}.log"),
            });
        }
        let found = leaders(&l.nodes).await;
        if (0..bgs).all(|k| found.contains_key(&k)) {
            break found;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = (0..bgs)
                .filter(|k| !found.contains_key(k))
                .map(|k| format!("bg{k}"))
                .collect();
            return Err(Error::Dev {
                node: 0,
                reason: format!(
                    "no leader for {} within {LEADER_WAIT:?}; see {logs}/node*.log",
                    missing.join(", ")
                ),
            });
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = term.recv() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    for n in &l.nodes {
        println!("{}", uri_line(n, bgs, &leaders));
    }
    println!("data and logs in {logs}/ ; Ctrl-C stops the cluster");
    println!("{}", control_hint(args, &l.nodes));
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = term.recv() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = poll.tick() => {}
        }
        while let Some((node, status)) = exited(slots) {
            let then = if args.no_restart {
                "not restarting it (--no-restart)".to_string()
            } else {
                format!("restarting it in {}s", RESTART_DELAY.as_secs())
            };
            println!("node {node} died ({status}); log {logs}/node{node}.log; {then}");
            if !args.no_restart {
                let s = slots.iter_mut().find(|s| s.id == node).expect("slot");
                s.restart_at = Some(Instant::now() + RESTART_DELAY);
            }
        }
        let now = Instant::now();
        for s in slots.iter_mut() {
            if s.restart_at.is_some_and(|t| t <= now) {
                match spawn(exe, data_dir, s.id) {
                    Ok(c) => {
                        println!("node {} restarted (pid {})", s.id, c.id());
                        s.child = Some(c);
                        s.restart_at = None;
                    }
                    Err(e) => {
                        println!(
                            "node {} could not be restarted ({e}); trying again in {}s",
                            s.id,
                            RESTART_DELAY.as_secs()
                        );
                        s.restart_at = Some(now + RESTART_DELAY);
                    }
                }
            }
        }
    }
}

/// The line telling how to look at and control the cluster: the first node's dashboard and the
/// `bdctl` command (`--cluster` unless the cluster file is where bdctl looks by default).
fn control_hint(args: &DevArgs, nodes: &[DevNode]) -> String {
    let flags = if args.data_dir == Path::new("bd-data") {
        String::new()
    } else {
        format!(
            " --cluster {}",
            args.data_dir.join("cluster.toml").display()
        )
    };
    format!(
        "dashboard: http://{}/dashboard ; control: bdctl{flags} status (cargo run --release -p server --bin bdctl -- ...)",
        nodes.first().map_or(String::new(), |n| n.http.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::config::ServerConfig;
    use clap::Parser;

    fn dev_args(argv: &[&str]) -> DevArgs {
        let mut a = vec!["bd-server", "dev"];
        a.extend_from_slice(argv);
        let cli = Cli::try_parse_from(a).unwrap();
        let Command::Dev(args) = cli.command else {
            panic!("not dev")
        };
        args
    }

    #[test]
    fn the_control_hint_needs_a_cluster_flag_only_off_the_default_data_dir() {
        let args = dev_args(&[]);
        let hint = control_hint(&args, &layout(&args).unwrap().nodes);
        assert_eq!(
            hint,
            "dashboard: http://127.0.0.1:10909/dashboard ; control: bdctl status \
             (cargo run --release -p server --bin bdctl -- ...)"
        );
        let args = dev_args(&["--base-port", "20000"]);
        let hint = control_hint(&args, &layout(&args).unwrap().nodes);
        assert!(
            hint.starts_with("dashboard: http://127.0.0.1:20100/dashboard ; control: bdctl status"),
            "{hint}"
        );
        let args = dev_args(&["--data-dir", "/tmp/x"]);
        let hint = control_hint(&args, &layout(&args).unwrap().nodes);
        assert!(
            hint.contains("control: bdctl --cluster /tmp/x/cluster.toml status"),
            "{hint}"
        );
    }

    #[test]
    fn each_bg_is_on_min_3_distinct_nodes_spread_evenly() {
        for n in [1, 2, 3, 4, 5, 9] {
            for m in [1, 2, 5, 7, 100] {
                let p = placement(n, m);
                assert_eq!(p.len(), m as usize);
                let mut per_node = vec![0usize; n as usize];
                for members in &p {
                    assert_eq!(members.len() as u64, n.min(3), "n={n} m={m}: {members:?}");
                    let mut d = members.clone();
                    d.dedup();
                    assert_eq!(&d, members, "distinct and ascending");
                    assert!(members.iter().all(|&id| (1..=n).contains(&id)));
                    for &id in members {
                        per_node[id as usize - 1] += 1;
                    }
                }
                if n > 3 {
                    let (lo, hi) = (per_node.iter().min(), per_node.iter().max());
                    assert!(hi.unwrap() - lo.unwrap() <= 1, "n={n} m={m}: {per_node:?}");
                } else {
                    assert!(per_node.iter().all(|&c| c == m as usize));
                }
            }
        }
        assert_eq!(placement(3, 1), vec![vec![1, 2, 3]]);
        assert_eq!(placement(1, 2), vec![vec![1], vec![1]]);
        assert_eq!(
            placement(4, 5),
            vec![
                vec![1, 2, 3],
                vec![1, 2, 4],
                vec![1, 3, 4],
                vec![2, 3, 4],
                vec![1, 2, 3]
            ]
        );
        assert_eq!(placement(9, 1), vec![vec![1, 2, 3]]);
        let l = layout(&dev_args(&["--nodes", "9", "--bgs", "5"])).unwrap();
        assert_eq!(l.nodes.len(), 9);
        assert_eq!(l.nodes[0].bgs, vec![0, 3]);
        assert_eq!(l.nodes[5].bgs, vec![1, 4]);
        assert_eq!(l.nodes[8].bgs, vec![2]);
        assert_eq!(l.members[4], vec![4, 5, 6]);
        assert_eq!(l.nodes[8].http.port(), 10909 + 8);
        assert_eq!(l.nodes[8].quic.port(), 10809 + 200 + 8 * 32);
    }

    #[test]
    fn node_configs_parse_back_with_every_other_node_as_peer() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data \"dir\"");
        let d = data.to_str().unwrap();
        for (n, m) in [(1u64, 1u64), (3, 1), (4, 5), (9, 5)] {
            let args = dev_args(&[
                "--nodes",
                &n.to_string(),
                "--bgs",
                &m.to_string(),
                "--data-dir",
                d,
                "--base-port",
                "20000",
                "--bg-size-bytes",
                "16MiB",
                "--cores",
                "2",
            ]);
            let l = layout(&args).unwrap();
            std::fs::create_dir_all(&data).unwrap();
            for node in &l.nodes {
                let path = data.join(format!("node{}.toml", node.id));
                std::fs::write(&path, node_config(&args, &l, node)).unwrap();
                let c = ServerConfig::load(&path).unwrap();
                assert_eq!(c.node_id, node.id);
                assert_eq!(c.data_dir, data.join(format!("node{}", node.id)));
                assert_eq!(c.cores, 2);
                assert_eq!(c.nbd_listen, node.nbd);
                assert_eq!(c.http_listen, node.http);
                assert_eq!(c.quic_listen, node.quic);
                assert!(c.insecure_loopback && !c.pin_cores);
                let peers: Vec<(u64, SocketAddr)> =
                    c.peers.iter().map(|p| (p.id, p.addr)).collect();
                let others: Vec<(u64, SocketAddr)> = l
                    .nodes
                    .iter()
                    .filter(|o| o.id != node.id)
                    .map(|o| (o.id, o.quic))
                    .collect();
                assert_eq!(peers, others, "every other node is a peer");
                let bgs: Vec<u64> = c.bgs.iter().map(|b| b.id).collect();
                assert_eq!(bgs, node.bgs);
                for b in &c.bgs {
                    assert_eq!(b.members, l.members[b.id as usize]);
                    assert!(b.members.contains(&node.id));
                    assert_eq!(b.size_bytes, 16 << 20);
                    assert!(!b.join);
                }
                // The engine accepts it (members have peer addresses, and so on).
                let e = c.engine_config().unwrap();
                assert_eq!(e.bgs.len(), node.bgs.len());
            }
            let cluster = crate::ctl::parse_cluster_file(&cluster_file(&l)).unwrap();
            let want: Vec<(u64, SocketAddr)> = l.nodes.iter().map(|n| (n.id, n.http)).collect();
            assert_eq!(cluster, want);
        }
    }

    #[test]
    fn bad_node_and_bg_counts_are_refused_clearly() {
        let err = |argv: &[&str]| match layout(&dev_args(argv)) {
            Ok(_) => panic!("{argv:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err(&["--nodes", "12"]).contains("--nodes must be 1..=9, got 12"));
        assert!(err(&["--nodes", "0"]).contains("--nodes must be 1..=9, got 0"));
        assert!(err(&["--bgs", "0"]).contains("--bgs must be at least 1, got 0"));
        assert!(err(&["--cores", "0"]).contains("--cores must be 1..=32, got 0"));
        let e = err(&["--nodes", "9", "--base-port", "65200"]);
        assert!(e.contains("--base-port 65200 leaves no room"), "{e}");
        assert!(layout(&dev_args(&["--nodes", "9", "--base-port", "65000"])).is_ok());
        assert!(Cli::try_parse_from(["bd-server", "dev", "--nodes", "x"]).is_err());
        let a = dev_args(&[]);
        assert_eq!((a.nodes, a.bgs, a.no_restart), (3, 1, false));
        assert!(dev_args(&["--no-restart"]).no_restart);
    }

    #[test]
    fn uri_lines_name_the_bgs_and_the_leaderships() {
        let l = layout(&dev_args(&[])).unwrap();
        let leaders = BTreeMap::from([(0, 3)]);
        assert_eq!(
            uri_line(&l.nodes[0], 1, &leaders),
            "node 1: nbd://127.0.0.1:10809/bg0  http://127.0.0.1:10909/raft_stat"
        );
        assert_eq!(
            uri_line(&l.nodes[2], 1, &leaders),
            "node 3: nbd://127.0.0.1:10811/bg0  http://127.0.0.1:10911/raft_stat (leader)"
        );
        let l = layout(&dev_args(&["--nodes", "9", "--bgs", "4"])).unwrap();
        let leaders = BTreeMap::from([(0, 1), (1, 4), (2, 7), (3, 1)]);
        assert_eq!(
            uri_line(&l.nodes[0], 4, &leaders),
            "node 1: nbd://127.0.0.1:10809/bg0 nbd://127.0.0.1:10809/bg3  \
             http://127.0.0.1:10909/raft_stat (leader of bg0, bg3)"
        );
        let l = layout(&dev_args(&["--nodes", "9", "--bgs", "2"])).unwrap();
        assert_eq!(
            uri_line(&l.nodes[8], 2, &leaders),
            "node 9: no BGs  http://127.0.0.1:10917/raft_stat"
        );
    }
}
