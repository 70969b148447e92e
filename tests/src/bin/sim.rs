//! `sim`: runs the deterministic raft simulator over many seeds.
//!
//! Its last line is exactly `seeds=N violations=V`. A failing seed prints a
//! one-line command that replays it with a full trace.

use clap::Parser;
use raftlog::core::BrokenRule;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use tests::sim::{run_seed, SimOptions};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of bd's raft core under faults")]
struct Args {
    /// Number of seeds to run (starting at --seed).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed (alone: replay just this seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Cluster size (3..=7); drawn per seed when omitted.
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=7))]
    nodes: Option<u64>,
    /// Client operations per seed.
    #[arg(long, default_value_t = 100)]
    ops: usize,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print every event of each seed (use with --seed).
    #[arg(long)]
    verbose: bool,
    /// Test only: break a safety rule to prove the simulator catches it.
    #[arg(long, value_parser = ["none", "commit-previous-term", "vote-skips-log-check", "resume-keeps-lease", "amnesiac-votes", "conf-change-before-term-commit"], default_value = "none", hide = true)]
    broken_rule: String,
}

fn main() {
    let args = Args::parse();
    if !args.verbose {
        tests::sim::install_quiet_panic_hook();
    }
    let broken_rule = match args.broken_rule.as_str() {
        "commit-previous-term" => BrokenRule::CommitPreviousTermByCount,
        "vote-skips-log-check" => BrokenRule::VoteSkipsLogCheck,
        "resume-keeps-lease" => BrokenRule::ResumeKeepsLease,
        "amnesiac-votes" => BrokenRule::AmnesiacVotes,
        "conf-change-before-term-commit" => BrokenRule::ConfChangeBeforeTermCommit,
        _ => BrokenRule::None,
    };
    let (start, count) = match args.seed {
        Some(s) if args.seeds == 100 && !std::env::args().any(|a| a == "--seeds") => (s, 1),
        Some(s) => (s, args.seeds),
        None => (0, args.seeds),
    };
    let opts = SimOptions {
        nodes: args.nodes.map(|n| n as usize),
        ops: args.ops,
        broken_rule,
        verbose: args.verbose,
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let next = AtomicU64::new(start);
    let violations = AtomicUsize::new(0);
    let inconclusive = AtomicUsize::new(0);
    let combined = AtomicU64::new(0);
    let out = Mutex::new(());
    let began = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start + count {
                    break;
                }
                let r = run_seed(seed, &opts);
                combined.fetch_xor(r.trace_hash.rotate_left((seed % 64) as u32), Ordering::Relaxed);
                if r.lincheck_inconclusive {
                    inconclusive.fetch_add(1, Ordering::Relaxed);
                }
                if count == 1 {
                    let _g = out.lock().unwrap();
                    println!(
                        "seed={} nodes={} ops_completed={} ops_unknown={} elections={} crashes={} amnesias={} snapshots_installed={} conf_changes={} hibernations={} wakes={} sim_ticks={} trace_hash={:016x}",
                        r.seed, r.nodes, r.ops_completed, r.ops_unknown, r.elections, r.crashes, r.amnesias,
                        r.snapshots_installed, r.conf_changes, r.hibernations, r.wakes, r.sim_time / 100, r.trace_hash
                    );
                }
                if !r.violations.is_empty() {
                    violations.fetch_add(1, Ordering::Relaxed);
                    let _g = out.lock().unwrap();
                    for v in &r.violations {
                        println!("FAIL seed={seed}: {v}");
                    }
                    let nodes = opts.nodes.map(|n| format!(" --nodes {n}")).unwrap_or_default();
                    let broken = if args.broken_rule != "none" { format!(" --broken-rule {}", args.broken_rule) } else { String::new() };
                    println!(
                        "replay: cargo run --release -p tests --bin sim -- --seed {seed} --ops {}{nodes}{broken} --verbose",
                        opts.ops
                    );
                }
            });
        }
    });
    eprintln!(
        "ran {count} seeds in {:.1}s on {threads} threads; lincheck inconclusive: {}; combined trace hash {:016x}",
        began.elapsed().as_secs_f64(),
        inconclusive.load(Ordering::Relaxed),
        combined.load(Ordering::Relaxed)
    );
    println!(
        "seeds={count} violations={}",
        violations.load(Ordering::Relaxed)
    );
    if violations.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
}
