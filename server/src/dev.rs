//! `bd-server dev`: a local 3-node cluster on loopback, as three child processes of this binary
//! (`bd-server run ...` with flags, no config files), each logging to `DATA_DIR/nodeN.log`.
//!
//! The transport runs without TLS (`--insecure-loopback`), which the transport allows on
//! loopback only and which is logged. Block group `bg0` is declared on all three with members
//! {1, 2, 3}; the data of node N lives in `DATA_DIR/nodeN`, so running `dev` again reuses it.
//! Ctrl-C (or SIGTERM) sends SIGTERM to the children and waits for them; if a child dies, the
//! others are stopped too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cli::DevArgs;
use crate::error::Error;

/// Time the cluster has to elect a leader for bg0 before `dev` gives up.
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// Time a child gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
const NODES: u64 = 3;
/// QUIC ports reserved per node (one per core).
const QUIC_PORTS_PER_NODE: u16 = 32;

/// Addresses of dev node `id` (1-based).
pub struct DevNode {
    pub id: u64,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub dir: PathBuf,
}

pub fn layout(args: &DevArgs) -> Result<Vec<DevNode>, Error> {
    let lo = |port: u32| -> Result<SocketAddr, Error> {
        let port = u16::try_from(port).map_err(|_| Error::Config {
            what: format!(
                "--base-port {} leaves no room for the dev ports",
                args.base_port
            ),
        })?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    if args.cores == 0 || args.cores > QUIC_PORTS_PER_NODE as usize {
        return Err(Error::Config {
            what: format!("dev: --cores must be in 1..={QUIC_PORTS_PER_NODE}"),
        });
    }
    let base = args.base_port as u32;
    (1..=NODES)
        .map(|id| {
            let i = (id - 1) as u32;
            Ok(DevNode {
                id,
                nbd: lo(base + i)?,
                http: lo(base + 100 + i)?,
                quic: lo(base + 200 + i * QUIC_PORTS_PER_NODE as u32)?,
                dir: args.data_dir.join(format!("node{id}")),
            })
        })
        .collect()
}

fn spawn(exe: &Path, args: &DevArgs, nodes: &[DevNode], n: &DevNode) -> Result<Child, Error> {
    let dev_err = |reason: String| Error::Dev { node: n.id, reason };
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| dev_err(format!("create {}: {e}", args.data_dir.display())))?;
    let log_path = args.data_dir.join(format!("node{}.log", n.id));
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
        .arg("--node-id")
        .arg(n.id.to_string())
        .arg("--data-dir")
        .arg(&n.dir)
        .arg("--cores")
        .arg(args.cores.to_string())
        .arg("--nbd-listen")
        .arg(n.nbd.to_string())
        .arg("--http-listen")
        .arg(n.http.to_string())
        .arg("--quic-listen")
        .arg(n.quic.to_string())
        .arg("--insecure-loopback")
        // Three nodes on one machine: pinned, every node's core 0 would share CPU 0.
        .arg("--pin-cores")
        .arg("false")
        .arg("--bg")
        .arg("0")
        .arg("--bg-size-bytes")
        .arg(args.bg_size_bytes.to_string());
    for p in nodes.iter().filter(|p| p.id != n.id) {
        cmd.arg("--peer").arg(format!("{}={}", p.id, p.quic));
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    cmd.spawn()
        .map_err(|e| dev_err(format!("spawn {}: {e}", exe.display())))
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn stop_all(children: &mut [(u64, Child)]) {
    for (_, c) in children.iter() {
        signal(c, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    for (id, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(status)) => {
                    info!(node = *id, %status, "node stopped");
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    warn!(node = *id, "node did not stop in time: killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}

/// The leader of bg0 as node `n` reports it, if any.
async fn leader_of(n: &DevNode) -> Option<u64> {
    let body = crate::http::get(n.http, "/status.json").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["bgs"].as_array()?.iter().find(|b| b["bg"] == 0)?["leader"].as_u64()
}

pub fn dev(args: &DevArgs) -> Result<(), Error> {
    let nodes = layout(args)?;
    let exe = std::env::current_exe().map_err(|e| Error::Dev {
        node: 0,
        reason: format!("cannot find this executable: {e}"),
    })?;
    warn!("dev cluster: INSECURE transport (no TLS) on loopback; for local use only");
    let mut children: Vec<(u64, Child)> = Vec::new();
    for n in &nodes {
        match spawn(&exe, args, &nodes, n) {
            Ok(c) => children.push((n.id, c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Dev {
            node: 0,
            reason: format!("runtime: {e}"),
        })?;
    let result = rt.block_on(supervise(&nodes, &mut children, args));
    stop_all(&mut children);
    result
}

fn exited(children: &mut [(u64, Child)]) -> Option<(u64, String)> {
    for (id, c) in children.iter_mut() {
        if let Ok(Some(status)) = c.try_wait() {
            return Some((*id, status.to_string()));
        }
    }
    None
}

async fn supervise(
    nodes: &[DevNode],
    children: &mut [(u64, Child)],
    args: &DevArgs,
) -> Result<(), Error> {
    let logs = args.data_dir.display();
    let deadline = Instant::now() + LEADER_WAIT;
    let leader = loop {
        if let Some((node, status)) = exited(children) {
            return Err(Error::Dev {
                node,
                reason: format!("exited ({status}) during startup; see {logs}/node{node}.log"),
            });
        }
        let mut found = None;
        for n in nodes {
            if let Some(l) = leader_of(n).await {
                found = Some(l);
                break;
            }
        }
        if let Some(l) = found {
            break l;
        }
        if Instant::now() > deadline {
            return Err(Error::Dev {
                node: 0,
                reason: format!("no leader for bg0 within {LEADER_WAIT:?}; see {logs}/node*.log"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for n in nodes {
        let role = if n.id == leader { " (leader)" } else { "" };
        println!(
            "node {}: nbd://{}/bg0  http://{}/raft_stat{role}",
            n.id, n.nbd, n.http
        );
    }
    println!("data and logs in {logs}/ ; Ctrl-C stops the cluster");
    println!("{}", control_hint(nodes));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Dev {
            node: 0,
            reason: format!("SIGTERM handler: {e}"),
        })?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = term.recv() => { println!("stopping the dev cluster"); return Ok(()); }
            _ = poll.tick() => {
                if let Some((node, status)) = exited(children) {
                    return Err(Error::Dev {
                        node,
                        reason: format!("exited unexpectedly ({status}); see {logs}/node{node}.log; stopping the others"),
                    });
                }
            }
        }
    }
}

/// The line telling how to look at and control the cluster: the first node's dashboard and the
/// `bdctl` command (with `--node` flags unless the nodes are at bdctl's default addresses).
fn control_hint(nodes: &[DevNode]) -> String {
    let http: Vec<String> = nodes.iter().map(|n| n.http.to_string()).collect();
    let flags = if http == crate::ctl::DEV_NODES {
        String::new()
    } else {
        http.iter().map(|a| format!(" --node {a}")).collect()
    };
    format!(
        "dashboard: http://{}/dashboard ; control: bdctl{flags} status (cargo run --release -p server --bin bdctl -- ...)",
        http.first().map_or("", |a| a.as_str())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn nodes(argv: &[&str]) -> Vec<DevNode> {
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Dev(args) = cli.command else {
            panic!("not dev")
        };
        layout(&args).unwrap()
    }

    #[test]
    fn the_control_hint_needs_node_flags_only_off_the_default_ports() {
        let hint = control_hint(&nodes(&["bd-server", "dev"]));
        assert_eq!(
            hint,
            "dashboard: http://127.0.0.1:10909/dashboard ; control: bdctl status \
             (cargo run --release -p server --bin bdctl -- ...)"
        );
        let hint = control_hint(&nodes(&["bd-server", "dev", "--base-port", "20000"]));
        assert!(
            hint.starts_with(
                "dashboard: http://127.0.0.1:20100/dashboard ; control: bdctl --node \
                 127.0.0.1:20100 --node 127.0.0.1:20101 --node 127.0.0.1:20102 status"
            ),
            "{hint}"
        );
    }
}
