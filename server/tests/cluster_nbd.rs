//! Multi-process 3-node clusters on loopback: the `bd-server` binary started three times
//! (`run`, insecure loopback transport), driven by stock NBD clients (qemu-io, qemu-img, fio)
//! through every node — followers forward to the leader — and a failover with SIGKILL.
//!
//! A missing tool fails the test with the Debian package to install (.ci installs qemu-utils,
//! libnbd-bin and fio). Each test owns its ports and a temporary directory; every child is
//! killed when the test ends, passing or not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest any single tool run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a cluster has to elect a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const BG_BYTES: u64 = 64 << 20;
// Blocks of 64 KiB written by the failover test: 0..600 during the kill, 600..700 after.
const _: () = assert!(700 * 65536 <= BG_BYTES);
const MIB: u64 = 1 << 20;

fn tool(name: &str) -> PathBuf {
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
fn run(name: &str, args: &[&str]) -> Output {
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

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "`{name} {}` failed:\n{}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io exits 0 even when a command fails, so its output is checked too.
fn qemu_io(uri: &str, commands: &[String]) -> String {
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

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

struct Node {
    id: u64,
    nbd: SocketAddr,
    http: SocketAddr,
    quic: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn uri(&self) -> String {
        format!("nbd://{}/bg0", self.nbd)
    }

    /// bg0's status as this node reports it.
    fn status(&self) -> Option<serde_json::Value> {
        let body = http_get(self.http, "/status.json")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["bgs"].as_array()?.iter().find(|b| b["bg"] == 0).cloned()
    }

    fn data_file(&self) -> PathBuf {
        self.dir.join("core-0").join("bg-0.data")
    }
}

struct Cluster {
    nodes: Vec<Node>,
    extra: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let nodes = (1..=3)
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
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bd-server"));
        cmd.args(["run", "--insecure-loopback", "--cores", "1", "--bg", "0"])
            .args(["--node-id", &n.id.to_string()])
            .arg("--data-dir")
            .arg(&n.dir)
            .args(["--nbd-listen", &n.nbd.to_string()])
            .args(["--http-listen", &n.http.to_string()])
            .args(["--quic-listen", &n.quic.to_string()])
            .args(["--bg-size-bytes", &BG_BYTES.to_string()])
            .args(["--tick-ms", "20", "--election-timeout-ms", "600"])
            .args(&self.extra);
        for p in self.nodes.iter().filter(|p| p.id != n.id) {
            cmd.arg("--peer").arg(format!("{}={}", p.id, p.quic));
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.nodes[i].child = Some(cmd.spawn().expect("spawn bd-server"));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Index of the node that is leader of bg0 (as reported by a live node).
    fn leader(&self) -> usize {
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

    fn logs(&self) -> String {
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

#[test]
fn cluster_qemu_io_patterns_through_every_node() {
    let c = Cluster::start(&[]);
    c.leader();
    // Each node writes its own 4 MiB region with write, FUA write, zero and discard, then flush.
    for (i, n) in c.nodes.iter().enumerate() {
        let base = i as u64 * 4 * MIB;
        let p = 0x11 * (i as u64 + 1);
        qemu_io(
            &n.uri(),
            &[
                format!("write -P {p} {base} 1M"),
                format!("read -P {p} {base} 1M"),
                format!("write -f -P {} {} 1M", p + 1, base + MIB),
                format!("write -P 0xee {} 1M", base + 2 * MIB),
                format!("write -z {} 512k", base + 2 * MIB),
                format!("discard {} 256k", base + 2 * MIB + 512 * 1024),
                "flush".into(),
                format!("read -P 0 {} 768k", base + 2 * MIB),
                format!("read -P 0xee {} 256k", base + 2 * MIB + 768 * 1024),
            ],
        );
    }
    // Every node sees every node's writes (reads are served by the leader, linearizably).
    for n in &c.nodes {
        for i in 0..3u64 {
            let base = i * 4 * MIB;
            let p = 0x11 * (i + 1);
            qemu_io(
                &n.uri(),
                &[
                    format!("read -P {p} {base} 1M"),
                    format!("read -P {} {} 1M", p + 1, base + MIB),
                    format!("read -P 0 {} 768k", base + 2 * MIB),
                ],
            );
        }
    }
}

fn random_image(path: &Path, len: usize, seed: u64) {
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

#[test]
fn cluster_qemu_img_convert_then_compare_across_nodes() {
    let c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let other = (l + 2) % 3;
    let img = c._tmp.path().join("src.raw");
    random_image(&img, 8 << 20, 42);
    let img_s = img.to_str().unwrap();
    // Write through a follower, compare through the other follower and the leader.
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            img_s,
            &c.nodes[f].uri(),
        ],
    );
    for i in [other, l] {
        // The export is bigger than the image: compare only the image's length (-s: strict
        // about allocation is not what we test).
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                img_s,
                &c.nodes[i].uri(),
            ],
        );
        assert!(
            out.status.success(),
            "qemu-img compare through node {}:\n{}",
            i + 1,
            text(&out)
        );
    }
}

#[test]
fn cluster_fio_verify_through_a_follower() {
    let c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let uri = c.nodes[f].uri();
    let out = run_ok(
        "fio",
        &[
            "--name=bd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=4m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=terse",
        ],
    );
    assert!(!out.is_empty(), "fio printed nothing");
}

/// Writes 64 KiB block `i` with its own pattern through `uri`; returns the blocks acknowledged.
fn write_blocks(uri: &str, range: std::ops::Range<u64>) -> Vec<u64> {
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

fn pattern(block: u64) -> u64 {
    block % 200 + 1
}

#[test]
fn cluster_failover_sigkill_leader_then_catch_up_by_snapshot() {
    // Snapshots every second keeping few entries: the killed node falls behind the leader's log
    // and must be rebuilt by InstallSnapshot.
    let mut c = Cluster::start(&[
        "--snapshot-interval-s",
        "1",
        "--snapshot-keep-entries",
        "16",
    ]);
    let l = c.leader();
    let via = (l + 1) % 3;
    let uri = c.nodes[via].uri();
    // The writer runs batches of 10 blocks until told to stop; the leader is killed while it
    // runs, and it must keep going for at least 5 batches after the kill.
    let killed = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uri, killed, after_kill, stop) = (
            uri.clone(),
            killed.clone(),
            after_kill.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut next = 0u64;
            while !stop.load(Ordering::SeqCst) && next + 10 <= 600 {
                let was_killed = killed.load(Ordering::SeqCst);
                let t = Instant::now();
                acked.extend(write_blocks(&uri, next..next + 10));
                slowest = slowest.max(t.elapsed());
                next += 10;
                if was_killed {
                    after_kill.fetch_add(1, Ordering::SeqCst);
                }
            }
            (acked, next, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    c.kill(l);
    killed.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(40);
    while after_kill.load(Ordering::SeqCst) < 5 {
        assert!(
            Instant::now() < deadline,
            "the workload stalled after the kill\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let (acked, issued, slowest) = writer.join().unwrap();
    eprintln!(
        "{} of {issued} writes acknowledged; slowest batch of 10 took {slowest:?}",
        acked.len()
    );
    assert!(
        acked.len() as u64 + 10 >= issued,
        "at most one batch may see errors around the failover: {} of {issued}\n{}",
        acked.len(),
        c.logs()
    );
    let new_leader = c.leader();
    assert_ne!(new_leader, l);
    // Every acknowledged write reads back through the surviving node that did not take them.
    let check = (0..3).find(|i| *i != l && *i != via).unwrap();
    let reads: Vec<String> = acked
        .iter()
        .map(|b| format!("read -P {} {} 64k", pattern(*b), b * 65536))
        .collect();
    qemu_io(&c.nodes[check].uri(), &reads);
    // More writes while the old leader is down, so its log position is compacted away.
    let more = write_blocks(&uri, 600..700);
    assert_eq!(more.len(), 100, "writes with two nodes up");
    std::thread::sleep(Duration::from_millis(1500));
    let leader_status = c.nodes[c.leader()].status().unwrap();
    let commit = leader_status["last_committed_index"].as_u64().unwrap();
    // Restart the killed node: it catches up and its data file holds every acknowledged write.
    c.spawn(l);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(s) = c.nodes[l].status() {
            if s["known_applied_index"].as_u64().unwrap_or(0) >= commit {
                eprintln!("restarted node caught up: {s}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted node did not catch up to {commit}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let data = std::fs::File::open(c.nodes[l].data_file()).unwrap();
    let mut buf = vec![0u8; 65536];
    for b in acked.iter().chain(more.iter()) {
        data.read_exact_at(&mut buf, b * 65536).unwrap();
        assert!(
            buf.iter().all(|x| *x as u64 == pattern(*b)),
            "block {b} on the restarted node does not hold pattern {}",
            pattern(*b)
        );
    }
    let first = leader_status["first_log_index"].as_u64().unwrap();
    eprintln!("leader log starts at {first}; commit {commit}");
}
