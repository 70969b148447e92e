//! `bd-bench idle`: what an idle cluster costs, with and without hibernation.
//!
//! Three engines in this process (one core each, insecure loopback transport, the default
//! 50 ms tick and 1 s election timeout) hold `--bgs` block groups with members {1, 2, 3}. Once
//! every group has a leader (and, with hibernation, once every group hibernates on every node),
//! the cluster's per-core counters are sampled over `--seconds` of idleness: raft messages,
//! frames and bytes sent per second, liveness pings, and the process's CPU time per second. The
//! same run first measures the baseline with hibernation off (`hibernate_idle_ms = 0`).
//!
//! The last line is `ratio_frames=X ratio_messages=Y ratio_cpu=Z` (hibernation on over off).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Args;
use engine::{BgSpec, CoreStat, Engine, EngineConfig};

/// Time the cluster has to elect every leader (and hibernate every group).
const SETTLE_MAX: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Block groups (each replicated on the three nodes).
    #[arg(long, default_value_t = 200)]
    bgs: u64,
    /// Seconds of idleness measured per configuration.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// hibernate_idle_ms of the hibernating configuration.
    #[arg(long, default_value_t = 2000)]
    hibernate_idle_ms: u64,
}

struct Sample {
    msgs: f64,
    frames: f64,
    bytes: f64,
    pings: f64,
    cpu_ms: f64,
}

fn free_udp() -> Result<SocketAddr, String> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free UDP port: {e}"))
}

fn totals(engines: &[Engine]) -> CoreStat {
    let mut t = CoreStat::default();
    for c in engines.iter().flat_map(|e| e.core_stats()) {
        t.raft_messages_sent += c.raft_messages_sent;
        t.frames_sent += c.frames_sent;
        t.bytes_sent += c.bytes_sent;
        t.pings_sent += c.pings_sent;
        t.groups += c.groups;
        t.groups_hibernating += c.groups_hibernating;
    }
    t
}

fn measure(a: &IdleArgs, hibernate_idle_ms: u64) -> Result<Sample, String> {
    let dir = tempfile::tempdir_in(".").map_err(|e| format!("temporary directory: {e}"))?;
    let mut addrs = BTreeMap::new();
    for id in 1..=3u64 {
        addrs.insert(id, free_udp()?);
    }
    let mut engines = Vec::new();
    for id in 1..=3u64 {
        let mut c = EngineConfig::new(id, dir.path().join(format!("node{id}")), addrs[&id]);
        c.cores = 1;
        c.pin_cores = false;
        c.peers = addrs
            .iter()
            .filter(|(k, _)| **k != id)
            .map(|(k, v)| (*k, *v))
            .collect();
        c.bgs = (0..a.bgs)
            .map(|bg| BgSpec {
                id: bg,
                members: vec![1, 2, 3],
                size_bytes: 256 << 10,
                join: false,
                preallocate: false,
            })
            .collect();
        c.wal_segment_bytes_max = 8 << 20;
        c.hibernate_idle_ms = hibernate_idle_ms;
        engines.push(Engine::start(c).map_err(|e| e.to_string())?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(async {
        let deadline = Instant::now() + SETTLE_MAX;
        loop {
            let mut leaders = 0;
            let mut hibernating = 0;
            for e in &engines {
                for s in e.status().await {
                    leaders += u64::from(s.state == "LEADER");
                    hibernating += u64::from(s.hibernating);
                }
            }
            if leaders == a.bgs && (hibernate_idle_ms == 0 || hibernating == 3 * a.bgs) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not settled within {SETTLE_MAX:?}: {leaders} leaders, {hibernating} hibernating"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Past the elections and the first catch-up round (the followers' first appends).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (t0, c0, s0) = (Instant::now(), crate::cpu_seconds(), totals(&engines));
        tokio::time::sleep(Duration::from_secs(a.seconds)).await;
        let (secs, c1, s1) = (t0.elapsed().as_secs_f64(), crate::cpu_seconds(), totals(&engines));
        let rate = |x: u64, y: u64| (y - x) as f64 / secs;
        Ok(Sample {
            msgs: rate(s0.raft_messages_sent, s1.raft_messages_sent),
            frames: rate(s0.frames_sent, s1.frames_sent),
            bytes: rate(s0.bytes_sent, s1.bytes_sent),
            pings: rate(s0.pings_sent, s1.pings_sent),
            cpu_ms: (c1 - c0) * 1000.0 / secs,
        })
    });
    for e in engines {
        e.shutdown();
    }
    result
}

pub fn run(a: IdleArgs) -> Result<(), String> {
    println!(
        "idle 3-node cluster, {} BGs, 1 core per node, 50 ms ticks, 1 s election timeout, {} s measured",
        a.bgs, a.seconds
    );
    let off = measure(&a, 0)?;
    let on = measure(&a, a.hibernate_idle_ms)?;
    for (name, s) in [("hibernation off", &off), ("hibernation on", &on)] {
        println!(
            "{name:16} {:9.1} raft msgs/s {:8.1} frames/s {:10.0} bytes/s {:6.1} pings/s {:7.1} ms CPU/s",
            s.msgs, s.frames, s.bytes, s.pings, s.cpu_ms
        );
    }
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    println!(
        "ratio_frames={:.4} ratio_messages={:.4} ratio_cpu={:.4}",
        ratio(on.frames, off.frames),
        ratio(on.msgs, off.msgs),
        ratio(on.cpu_ms, off.cpu_ms)
    );
    Ok(())
}
