//! `bd-bench raft`: throughput of the raft core alone.
//!
//! A 3-node group of real `RaftNode`s in one thread, with an instant network
//! and an instant disk (every write is durable as soon as it is handed out),
//! so the figure is the core's own cost: proposals committed (and applied on
//! the leader) per second and CPU time per committed entry. Entries are
//! 4 KiB by default. As a same-run baseline it measures copying each payload
//! once per replica (what any replication must at least do), and reports the
//! core's cost as a ratio to it.

use bytes::Bytes;
use clap::Args;
use raftlog::core::{Configuration, Message, RaftConfig, RaftNode, Restore, Role, SplitMix64};
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct RaftArgs {
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 4096)]
    entry_bytes: usize,
    /// Entries to commit in the measured run.
    #[arg(long, default_value_t = 300_000)]
    entries: u64,
    /// Proposals handed to the leader per loop iteration (client batching).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Cluster {
    nodes: Vec<RaftNode>,
    net: VecDeque<Message>,
    applied: u64,
}

impl Cluster {
    fn new() -> Cluster {
        let cfg = RaftConfig {
            uncommitted_entries_max: 1 << 20,
            append_entries_max: 1024,
            append_bytes_max: 4 << 20,
            inflight_messages_max: 256,
            inflight_bytes_max: 64 << 20,
            snapshot_log_bytes_max: usize::MAX,
            ..RaftConfig::default()
        };
        let nodes = (1..=3u64)
            .map(|id| {
                let restore = Restore {
                    bootstrap: Configuration::new(1..=3),
                    ..Default::default()
                };
                RaftNode::new(1, id, cfg.clone(), Box::new(SplitMix64(id)), restore).expect("node")
            })
            .collect();
        Cluster {
            nodes,
            net: VecDeque::new(),
            applied: 0,
        }
    }

    /// Runs every node's outputs and delivers messages until quiet.
    fn settle(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..self.nodes.len() {
                while self.nodes[i].has_ready() {
                    progress = true;
                    let rd = self.nodes[i].ready();
                    if let Some(w) = rd.write {
                        self.nodes[i].on_write_durable(w.seq);
                    }
                    self.net.extend(rd.messages);
                    if self.nodes[i].role() == Role::Leader {
                        self.applied += rd
                            .committed_entries
                            .iter()
                            .filter(|e| !e.data.is_empty())
                            .count() as u64;
                    }
                }
            }
            while let Some(m) = self.net.pop_front() {
                progress = true;
                let to = m.to as usize - 1;
                self.nodes[to].step(m);
            }
            if !progress {
                return;
            }
        }
    }

    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.role() == Role::Leader)
    }
}

pub fn run(a: RaftArgs) -> Result<(), String> {
    if a.entry_bytes == 0 || a.entries == 0 || a.batch == 0 {
        return Err("--entry-bytes, --entries and --batch must be positive".into());
    }
    let payload = Bytes::from(vec![0xa5u8; a.entry_bytes]);
    let mut c = Cluster::new();
    for _ in 0..1000 {
        for n in c.nodes.iter_mut() {
            n.tick();
        }
        c.settle();
        if c.leader().is_some() {
            break;
        }
    }
    let l = c.leader().ok_or("no leader elected")?;
    let (w0, c0) = (Instant::now(), crate::cpu_seconds());
    let mut proposed = 0u64;
    c.applied = 0;
    while c.applied < a.entries {
        let n = (a.entries - proposed).min(a.batch as u64);
        for _ in 0..n {
            c.nodes[l]
                .propose(payload.clone(), None)
                .map_err(|e| e.to_string())?;
        }
        proposed += n;
        c.settle();
        if c.leader() != Some(l) {
            return Err("leadership changed during the run".into());
        }
    }
    let (wall, cpu) = (w0.elapsed().as_secs_f64(), crate::cpu_seconds() - c0);
    // Baseline: copy each payload once per replica.
    let (b0, bc0) = (Instant::now(), crate::cpu_seconds());
    let mut sink = vec![0u8; a.entry_bytes];
    let mut check = 0u64;
    for _ in 0..a.entries {
        for _ in 0..3 {
            sink.copy_from_slice(std::hint::black_box(&payload));
            check = check.wrapping_add(sink[a.entry_bytes / 2] as u64);
        }
    }
    std::hint::black_box(check);
    let (_bwall, bcpu) = (b0.elapsed().as_secs_f64(), crate::cpu_seconds() - bc0);
    let per_sec = a.entries as f64 / wall;
    let cpu_us = cpu / a.entries as f64 * 1e6;
    let base_us = bcpu / a.entries as f64 * 1e6;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "entry_bytes": a.entry_bytes, "entries": a.entries, "batch": a.batch,
                "commits_per_sec": per_sec, "cpu_us_per_entry": cpu_us,
                "copy_baseline_cpu_us_per_entry": base_us,
                "mb_per_sec": per_sec * a.entry_bytes as f64 / 1e6,
            })
        );
    } else {
        println!(
            "raft core, 3 nodes in one thread, no I/O, {} B entries, batch {}",
            a.entry_bytes, a.batch
        );
        println!("committed entries:      {}", a.entries);
        println!("commits/s:              {per_sec:.0}");
        println!(
            "payload MB/s:           {:.1}",
            per_sec * a.entry_bytes as f64 / 1e6
        );
        println!("CPU us per entry:       {cpu_us:.3} (all 3 replicas)");
        println!("baseline copy us/entry: {base_us:.3} (3 payload copies)");
    }
    println!(
        "commits_per_sec={per_sec:.0} cpu_us_per_entry={cpu_us:.3} ratio_cpu_vs_copy={:.1}",
        cpu_us / base_us.max(1e-9)
    );
    Ok(())
}
