//! Helpers shared by the multi-process cluster tests: three `bd-server run` processes on
//! loopback (insecure transport, random free ports, a temporary directory), stock NBD tools to
//! drive them, and the HTTP status of each node. Every child is killed when its [`Cluster`] is
//! dropped, so a failing test leaves no process behind.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest any single tool run may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a cluster has to elect a leader.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const BG_BYTES: u64 = 64 << 20;
// Blocks of 64 KiB written by the failover test: 0..600 during the kill, 600..700 after.
const _: () = assert!(700 * 65536 <= BG_BYTES);
pub const MIB: u64 = 1 << 20;

pub fn tool(name: &str) -> PathBuf {
    let package = match name {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "fio" => "fio",
        other => other,
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: install the Debian package `{package}` (.ci/apt-packages)")
        })
}

/// Runs a tool to completion, killing it after `TOOL_TIMEOUT`.
pub fn run(name: &str, args: &[&str]) -> Output {
    let mut child = Command::new(tool(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let started = Instant::now();
    // Drain the pipes on threads so a chatty tool cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            panic!(
                "`{name} {}` did not finish in {TOOL_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "`{name} {}` failed:\n{}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// fio's nbd engine writing 4 KiB blocks at random through `uri` with crc32c verification
/// (`extra`: size, depth, time limits); fails the test on any error or mismatch.
pub fn fio_verify(uri: &str, extra: &[&str]) -> String {
    let uri = format!("--uri={uri}");
    let mut args = vec![
        "--name=bd",
        "--ioengine=nbd",
        uri.as_str(),
        "--rw=randwrite",
        "--bs=4k",
        "--verify=crc32c",
        "--verify_fatal=1",
        // No verify state file in the working directory.
        "--verify_state_save=0",
        "--do_verify=1",
        "--output-format=terse",
    ];
    args.extend_from_slice(extra);
    let out = run_ok("fio", &args);
    assert!(!out.is_empty(), "fio printed nothing");
    out
}

/// qemu-io exits 0 even when a command fails, so its output is checked too.
pub fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    let all = text(&out);
    assert!(out.status.success(), "qemu-io failed:\n{all}");
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        assert!(
            !all.contains(bad),
            "qemu-io on {uri} reported `{bad}`:\n{all}"
        );
    }
    all
}

/// Runs `bdctl` with `--node` for every running node of `c`, then `args`.
pub fn bdctl(c: &Cluster, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bdctl"));
    for n in c.nodes.iter().filter(|n| n.child.is_some()) {
        cmd.arg("--node").arg(n.http.to_string());
    }
    cmd.args(args).output().expect("run bdctl")
}

/// `bdctl args`, which must succeed; its stdout.
pub fn bdctl_ok(c: &Cluster, args: &[&str]) -> String {
    let out = bdctl(c, args);
    assert!(
        out.status.success(),
        "bdctl {args:?} failed:\n{}\n{}",
        text(&out),
        c.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bdctl args`, which must fail; its stderr.
pub fn bdctl_fails(c: &Cluster, args: &[&str]) -> String {
    let out = bdctl(c, args);
    assert!(
        !out.status.success(),
        "bdctl {args:?} succeeded:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Attempts at starting a cluster whose ports were taken by someone else.
const START_ATTEMPTS_MAX: usize = 5;

/// Ports handed to test servers come from below the kernel's ephemeral range (32768–60999 by
/// default): a port found by binding port 0 is an ephemeral one, and between releasing it and
/// the server binding it, any outgoing connection on the machine (a client of a parallel test)
/// may take it as its local port. Below the range only another picker like this one can, and
/// each picks a different spot (pid and a counter).
const TEST_PORTS: std::ops::Range<u16> = 20000..32000;

fn pick_port(free: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(37);
        let port = TEST_PORTS.start + ((start + n) % span) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if free(addr) {
            return addr;
        }
    }
    panic!("no free port in {TEST_PORTS:?}");
}

/// A port free for TCP (and UDP, so one pick serves either).
pub fn free_tcp() -> SocketAddr {
    pick_port(|a| TcpListener::bind(a).is_ok() && UdpSocket::bind(a).is_ok())
}

pub fn free_udp() -> SocketAddr {
    free_tcp()
}

/// `method path` without a body: the status code and the body (None if the node does not
/// answer within `read_timeout`).
fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    read_timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// An admin call (a snapshot may take a while): status code and body.
pub fn http_call(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    http_exchange(addr, method, path, Duration::from_secs(30))
}

/// The body of a 200 answer to `GET path` (polled: a node that hangs counts as not answering).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match http_exchange(addr, "GET", path, Duration::from_secs(5))? {
        (200, body) => Some(body),
        _ => None,
    }
}

pub struct Node {
    pub id: u64,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    pub fn uri(&self) -> String {
        format!("nbd://{}/bg0", self.nbd)
    }

    /// This node's whole `/status.json`.
    pub fn status_doc(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&http_get(self.http, "/status.json")?).ok()
    }

    /// bg0's status as this node reports it.
    pub fn status(&self) -> Option<serde_json::Value> {
        let body = http_get(self.http, "/status.json")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["bgs"].as_array()?.iter().find(|b| b["bg"] == 0).cloned()
    }

    pub fn data_file(&self) -> PathBuf {
        self.dir.join("core-0").join("bg-0.data")
    }

    /// This node's log (stdout and stderr of every life of the process).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Whether the process was started and has not exited (a crash is reported with its status).
    pub fn running(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            None => Err(format!("node {} is not running", self.id)),
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(format!("node {} exited: {status}", self.id)),
            Some(Err(e)) => Err(format!("node {}: wait: {e}", self.id)),
        }
    }

    /// A `u64` field of bg0's status, if the node answers.
    pub fn stat(&self, field: &str) -> Option<u64> {
        self.status()?[field].as_u64()
    }

    /// Waits until this node has applied `index`; returns its status then.
    pub fn wait_applied(&self, index: u64, timeout: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                if s["known_applied_index"].as_u64().unwrap_or(0) >= index {
                    return Some(s);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Nodes 1..=members are the groups' initial members; the others hold them with
    /// `--join-bg` (replicas waiting to be added).
    pub members: usize,
    pub extra: Vec<String>,
    /// Block groups every node holds (members {1, 2, 3}), and their size.
    pub bgs: Vec<u64>,
    pub bg_bytes: u64,
    pub tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts three nodes and waits until each answers on HTTP. Free ports
    /// are found by binding port 0 and letting go, so a test running in
    /// parallel can take one before our node binds it: a node that exits
    /// at start-up makes the whole cluster start again on fresh ports.
    pub fn start(extra: &[&str]) -> Cluster {
        Cluster::start_with_bgs(&[0], BG_BYTES, extra)
    }

    /// Like [`Cluster::start`] with the block groups `bgs` of `bg_bytes` each.
    pub fn start_with_bgs(bgs: &[u64], bg_bytes: u64, extra: &[&str]) -> Cluster {
        Cluster::start_joining(3, 3, bgs, bg_bytes, extra)
    }

    /// `nodes` nodes, every one a peer of every other; bg `bgs` with nodes 1..=`members` as
    /// members, held by the others as replicas that wait to be added.
    pub fn start_joining(
        nodes: usize,
        members: usize,
        bgs: &[u64],
        bg_bytes: u64,
        extra: &[&str],
    ) -> Cluster {
        for _ in 0..START_ATTEMPTS_MAX {
            let mut c = Cluster::start_once(nodes, members, bgs, bg_bytes, extra);
            if c.wait_all_up(Duration::from_secs(20)) {
                return c;
            }
            for i in 0..c.nodes.len() {
                c.kill(i);
            }
        }
        panic!("the cluster did not start in {START_ATTEMPTS_MAX} attempts");
    }

    /// True once every node answers /status.json; false as soon as one exits.
    fn wait_all_up(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.nodes.iter_mut().any(|n| n.running().is_err()) {
                return false;
            }
            if self.nodes.iter().all(|n| n.status().is_some()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_once(
        count: usize,
        members: usize,
        bgs: &[u64],
        bg_bytes: u64,
        extra: &[&str],
    ) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let nodes = (1..=count as u64)
            .map(|id| Node {
                id,
                nbd: free_tcp(),
                http: free_tcp(),
                quic: free_udp(),
                dir: tmp.path().join(format!("node{id}")),
                child: None,
            })
            .collect();
        let mut c = Cluster {
            nodes,
            members,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bgs: bgs.to_vec(),
            bg_bytes,
            tmp,
        };
        for i in 0..count {
            c.spawn(i);
        }
        c
    }

    pub fn spawn(&mut self, i: usize) {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bd-server"));
        cmd.args([
            "run",
            "--insecure-loopback",
            "--cores",
            "1",
            "--pin-cores",
            "false",
        ])
        .args(["--node-id", &n.id.to_string()])
        .arg("--data-dir")
        .arg(&n.dir)
        .args(["--nbd-listen", &n.nbd.to_string()])
        .args(["--http-listen", &n.http.to_string()])
        .args(["--quic-listen", &n.quic.to_string()])
        .args(["--bg-size-bytes", &self.bg_bytes.to_string()])
        .args(["--tick-ms", "20", "--election-timeout-ms", "600"])
        .args(&self.extra);
        let joining = n.id as usize > self.members;
        for bg in &self.bgs {
            cmd.arg(if joining { "--join-bg" } else { "--bg" })
                .arg(bg.to_string());
        }
        if self.members < self.nodes.len() {
            let ids: Vec<String> = (1..=self.members).map(|i| i.to_string()).collect();
            cmd.arg("--bg-members").arg(ids.join(","));
        }
        for p in self.nodes.iter().filter(|p| p.id != n.id) {
            cmd.arg("--peer").arg(format!("{}={}", p.id, p.quic));
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.nodes[i].child = Some(cmd.spawn().expect("spawn bd-server"));
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Polls `done` every `poll` until it holds; past `timeout`, fails the test with `what`
    /// and every node's log.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        poll: Duration,
        mut done: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(Instant::now() < deadline, "{what}\n{}", self.logs());
            std::thread::sleep(poll);
        }
    }

    /// Index of the node that is leader of bg0 (as reported by a live node).
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                if let Some(s) = n.status() {
                    if s["state"] == "LEADER" {
                        return (n.id - 1) as usize;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no leader within {LEADER_TIMEOUT:?}; logs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s.push_str(&format!("--- node {} (last lines)\n", n.id));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Cluster {
    /// Asserts that every node's process is still running and that no node logged a panic.
    pub fn assert_all_alive(&mut self) {
        let mut bad = Vec::new();
        for n in self.nodes.iter_mut() {
            if let Err(e) = n.running() {
                bad.push(e);
            }
            if n.log().contains("panicked") {
                bad.push(format!("node {} logged a panic", n.id));
            }
        }
        assert!(bad.is_empty(), "{}\n{}", bad.join("; "), self.logs());
    }

    /// The leader's commit index (waits for a leader).
    pub fn commit_index(&self) -> u64 {
        let l = self.leader();
        self.nodes[l]
            .stat("last_committed_index")
            .expect("leader status")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

pub fn random_image(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    // Half the 64 KiB blocks random, half left zero (so zero detection is exercised too).
    for (i, chunk) in v.chunks_mut(64 << 10).enumerate() {
        if i % 2 == 0 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    std::fs::write(path, v).unwrap();
}

/// Writes 64 KiB block `i` with its own pattern through `uri`; returns the blocks acknowledged.
pub fn write_blocks(uri: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    let cmds: Vec<String> = range
        .clone()
        .map(|i| format!("write -P {} {} 64k", pattern(i), i * 65536))
        .collect();
    let mut args = vec!["-f", "raw", uri];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // qemu-io prints one "wrote 65536/65536 bytes at offset X" per acknowledged write.
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 65536/65536 bytes at offset "))
        .map(|o| o.trim().parse::<u64>().unwrap() / 65536)
        .collect()
}

/// qemu-io commands reading back 64 KiB blocks written by [`write_blocks`], each checked
/// against its own pattern.
pub fn block_reads(blocks: impl IntoIterator<Item = u64>) -> Vec<String> {
    blocks
        .into_iter()
        .map(|b| format!("read -P {} {} 64k", pattern(b), b * 65536))
        .collect()
}

pub fn pattern(block: u64) -> u64 {
    block % 200 + 1
}

/// Hostile input made from a valid conversation `valid`, one of: pure noise, `valid` cut short
/// anywhere, `valid` with a few bits flipped, or a valid prefix followed by noise.
pub fn mangled(valid: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    use rand::{Rng, RngCore};
    match rng.random_range(0..4) {
        0 => {
            let mut v = vec![0u8; rng.random_range(1..3000)];
            rng.fill_bytes(&mut v);
            v
        }
        1 => valid[..rng.random_range(0..valid.len())].to_vec(),
        2 => {
            let mut v = valid.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..v.len());
                v[at] ^= 1 << rng.random_range(0..8);
            }
            v
        }
        _ => {
            let mut v = valid[..rng.random_range(0..valid.len())].to_vec();
            let mut noise = vec![0u8; rng.random_range(1..500)];
            rng.fill_bytes(&mut noise);
            v.extend_from_slice(&noise);
            v
        }
    }
}
