//! bd-bench: benchmark runner. Each mode is a subcommand in its own module;
//! add a variant to [`Mode`] and a module to extend it.

use clap::{Parser, Subcommand};

mod idle;
mod nbd;
mod raft;
mod wal;

#[derive(Parser)]
#[command(name = "bd-bench", about = "bd benchmarks")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The per-core WAL: group commit vs one fsync per append vs raw
    /// sequential writes, on the same filesystem.
    Wal(wal::WalArgs),
    /// The raft core alone: a 3-node in-memory group, no I/O; commits/s and
    /// CPU time per committed entry.
    Raft(raft::RaftArgs),
    /// fio's nbd engine (4k randwrite/randread, iodepth 32) against a 1-replica and a
    /// 3-replica bd-server BG and qemu-nbd on a raw file; ratios to qemu-nbd.
    Nbd(nbd::NbdArgs),
    /// An idle 3-node cluster with many BGs: raft messages, frames, bytes and CPU per second,
    /// hibernation off vs on.
    Idle(idle::IdleArgs),
}

/// CPU time (user + system) this process used so far, in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.mode {
        Mode::Wal(a) => wal::run(a),
        Mode::Raft(a) => raft::run(a),
        Mode::Nbd(a) => nbd::run(a),
        Mode::Idle(a) => idle::run(a),
    };
    if let Err(e) = r {
        eprintln!("bd-bench: {e}");
        std::process::exit(1);
    }
}
