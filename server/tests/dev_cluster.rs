//! `bd-server dev --nodes 4 --bgs 2` end to end: the built binary starts four nodes with one
//! config file each, every BG answers through qemu-io on each of its replicas, a node killed
//! with SIGKILL is reported and restarted while the others keep serving, `bdctl` finds the
//! nodes through the cluster file (`BD_CLUSTER`), and SIGTERM to `dev` stops every child
//! within the grace period. Loopback only; the ports are a free range below the ephemeral ones.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, qemu_io};

const NODES: u16 = 4;
/// Whole test budget for one wait (startup, a restart, the stop).
const WAIT: Duration = Duration::from_secs(40);
/// `dev`'s STOP_GRACE plus slack.
const STOP_WAIT: Duration = Duration::from_secs(20);

fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A base port whose dev ports (NBD, HTTP, QUIC of core 0, for 4 nodes) are all free now.
fn free_base(seed: u32) -> u16 {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // 20000..31000, as the other tests' picker (below the ephemeral range); 10 apart.
        let base = 20000 + (x % 1100) as u16 * 10;
        let free = (0..NODES).all(|i| {
            let tcp = |p: u16| TcpListener::bind(lo(p)).is_ok();
            let quic = base + 200 + i * 32;
            tcp(base + i) && tcp(base + 100 + i) && UdpSocket::bind(lo(quic)).is_ok() && tcp(quic)
        });
        if free {
            return base;
        }
    }
    panic!("no free port range for the dev cluster");
}

/// Pids of the processes whose command line contains `needle` (other than this one).
fn pids_with(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// The running `bd-server dev`, its stdout lines as they come; killed (with every node under
/// its data directory) when dropped.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    base: u16,
}

impl Dev {
    fn start(attempt: u32) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let base = free_base(std::process::id() ^ attempt.wrapping_mul(7919) ^ nanos());
        let stderr = std::fs::File::create(dir.path().join("dev.stderr")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bd-server"))
            .args(["dev", "--nodes", "4", "--bgs", "2", "--base-port"])
            .arg(base.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--bg-size-bytes", "16MiB"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start bd-server dev");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                seen2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Dev {
            child,
            dir,
            lines,
            seen,
            base,
        }
    }

    /// The next line for which `f` holds, within `WAIT` (None if `dev` exited first).
    fn wait_line(&self, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if f(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// Everything `dev` printed so far, its stderr and the nodes' logs, for failure messages.
    fn output(&self) -> String {
        let mut s = format!("--- dev stdout\n{}\n", self.seen.lock().unwrap().join("\n"));
        for f in [
            "dev.stderr",
            "node1.log",
            "node2.log",
            "node3.log",
            "node4.log",
        ] {
            let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s += &format!("--- {f} (last lines)\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    /// Pids of node `id`'s running `bd-server run --config .../nodeN.toml`.
    fn node_pids(&self, id: u16) -> Vec<i32> {
        pids_with(&format!(
            "--config {}",
            self.path(&format!("node{id}.toml"))
        ))
    }

    fn http(&self, id: u16) -> SocketAddr {
        lo(self.base + 100 + id - 1)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids_with(&self.dir.path().to_string_lossy()) {
            // SAFETY: kill(2) on a node this test started (its data dir is our tempdir).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// The NBD URI of `bg` on each node that lists it in the URI lines.
fn uris(lines: &[String], bg: u64) -> Vec<String> {
    let suffix = format!("/bg{bg}");
    lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("nbd://") && w.ends_with(&suffix))
        .map(str::to_string)
        .collect()
}

fn write_read(uri: &str, pattern: u8, offset: u64) {
    qemu_io(
        uri,
        &[
            format!("write -P {pattern} {offset} 64k"),
            format!("read -P {pattern} {offset} 64k"),
        ],
    );
}

fn read(uri: &str, pattern: u8, offset: u64) {
    qemu_io(uri, &[format!("read -P {pattern} {offset} 64k")]);
}

#[test]
fn dev_cluster_of_four_nodes_survives_and_restarts_a_dead_node() {
    let started = Instant::now();
    // Another test's picker may take one of our ports between the check and the bind: then a
    // node dies during startup and `dev` exits; try another range.
    let mut attempt = 0;
    let dev = loop {
        let dev = Dev::start(attempt);
        if dev.wait_line(|l| l.starts_with("dashboard:")).is_some() {
            break dev;
        }
        attempt += 1;
        assert!(attempt < 3, "dev did not start:\n{}", dev.output());
    };
    let out = dev.seen.lock().unwrap().clone();
    let all = dev.output();
    // A command line per node, then a URI line per node.
    for id in 1..=NODES {
        let cmd = format!("run --config {}", dev.path(&format!("node{id}.toml")));
        assert!(
            out.iter()
                .any(|l| l.starts_with(&format!("node {id} pid ")) && l.contains(&cmd)),
            "command line of node {id}:\n{all}"
        );
        assert!(
            out.iter().any(|l| l.starts_with(&format!("node {id}: "))
                && l.contains(&format!("http://{}/raft_stat", dev.http(id)))),
            "URI line of node {id}:\n{all}"
        );
    }
    // bg0 on nodes 1, 2, 3; bg1 on 1, 2, 4 (replica slots dealt round-robin).
    let (bg0, bg1) = (uris(&out, 0), uris(&out, 1));
    assert_eq!(bg0.len(), 3, "{all}");
    assert_eq!(bg1.len(), 3, "{all}");
    let node_of = |uri: &str| -> u16 {
        let port: u16 = uri
            .trim_start_matches("nbd://127.0.0.1:")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        port - dev.base + 1
    };
    assert_eq!(
        bg0.iter().map(|u| node_of(u)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        bg1.iter().map(|u| node_of(u)).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    // Every node's config file and the cluster file are in the data dir.
    let cluster = dev.path("cluster.toml");
    assert!(Path::new(&cluster).is_file(), "{all}");

    // Each BG takes a write through one replica and reads it back through every replica.
    for (pattern, uris) in [(0x11u8, &bg0), (0x22, &bg1)] {
        write_read(&uris[0], pattern, 0);
        for u in uris.iter() {
            read(u, pattern, 0);
        }
    }

    // Kill node 2 (it holds both BGs): the others keep serving both.
    let pids = dev.node_pids(2);
    assert_eq!(pids.len(), 1, "node 2's process: {pids:?}\n{all}");
    // SAFETY: kill(2) on node 2, a process this test's dev cluster started.
    unsafe {
        libc::kill(pids[0], libc::SIGKILL);
    }
    let died = dev
        .wait_line(|l| l.starts_with("node 2 died"))
        .unwrap_or_else(|| panic!("no died line:\n{}", dev.output()));
    assert!(
        died.contains("SIGKILL") && died.contains("node2.log") && died.contains("restarting"),
        "{died}"
    );
    write_read(&bg0[0], 0x33, 1 << 20);
    read(&bg0[2], 0x33, 1 << 20);
    write_read(&bg1[2], 0x44, 1 << 20);
    read(&bg1[0], 0x44, 1 << 20);
    for id in [1, 3, 4] {
        assert!(
            http_get(dev.http(id), "/status.json").is_some(),
            "node {id} serves"
        );
    }
    // The supervisor restarts it; its HTTP answers and it serves its replicas again.
    dev.wait_line(|l| l.starts_with("node 2 restarted"))
        .unwrap_or_else(|| panic!("no restarted line:\n{}", dev.output()));
    let deadline = Instant::now() + WAIT;
    while http_get(dev.http(2), "/status.json").is_none() {
        assert!(
            Instant::now() < deadline,
            "node 2 is not back:\n{}",
            dev.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dev.node_pids(2).len(), 1, "{}", dev.output());
    read(&bg0[1], 0x33, 1 << 20);
    read(&bg1[1], 0x44, 1 << 20);

    // bdctl finds all four nodes through the cluster file.
    let st = Command::new(env!("CARGO_BIN_EXE_bdctl"))
        .arg("status")
        .env("BD_CLUSTER", &cluster)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "bdctl status: {}\n{text}\n{}",
        st.status,
        String::from_utf8_lossy(&st.stderr)
    );
    for id in 1..=NODES {
        assert!(
            text.contains(&dev.http(id).to_string()),
            "bdctl status lists node {id}:\n{text}"
        );
    }

    // SIGTERM to dev stops every node within the grace period.
    let mut dev = dev;
    // SAFETY: kill(2) on the dev process this test started and has not reaped.
    unsafe {
        libc::kill(dev.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_WAIT;
    let status = loop {
        if let Some(s) = dev.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "dev did not stop:\n{}",
            dev.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "dev exit {status}:\n{}", dev.output());
    let left = pids_with(&dev.dir.path().to_string_lossy());
    assert!(left.is_empty(), "nodes left running: {left:?}");
    std::thread::sleep(Duration::from_millis(200));
    let printed = dev.seen.lock().unwrap().join("\n");
    assert!(
        printed.contains("stopping the dev cluster"),
        "{}",
        dev.output()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
