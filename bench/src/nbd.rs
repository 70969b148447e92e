//! `bd-bench nbd`: fio's nbd engine against bd-server and qemu-nbd, in one run.
//!
//! Three targets, each started from scratch in its own sub-directory of `--dir`:
//! - `1rep`: one `bd-server run` process holding a BG whose only member is itself;
//! - `3rep`: three `bd-server run` processes on loopback (the flags `bd-server dev` uses:
//!   insecure transport, `--bg 0` with every peer as member); fio talks to the leader;
//! - `qemu-nbd`: `qemu-nbd -f raw -x disk -t --cache=none --aio=native` on a raw file (falling
//!   back to `--aio=threads`, then to the default cache, if the filesystem refuses O_DIRECT).
//!
//! For each target the region (`--size-mib`) is first written sequentially with 1 MiB writes
//! (not timed), so that reads hit written data; then a 4 KiB randwrite cell and a 4 KiB randread
//! cell run for `--seconds` each (iodepth 32, direct, one job). Latencies are fio's completion
//! latency percentiles. raft_sync stays on (the bd-server default; `--raft-sync false` is for
//! diagnosis only) and core threads are not pinned (`--pin-cores`: three nodes share this
//! machine). Every process started is
//! stopped with SIGTERM, then SIGKILL after a grace period, also on error (a guard's `Drop`).
//!
//! With `--rounds N` all targets run N times, every other round in reverse order; each round's
//! ratios are against that round's qemu-nbd, and the ratio line gives their medians (this
//! machine's IOPS, qemu-nbd's included, swing by tens of percent between minutes).
//!
//! The last line of output is always
//! `ratio_1rep_write=X ratio_3rep_write=Y ratio_read=Z` (write IOPS of 1rep and 3rep over
//! qemu-nbd's; read: 3rep read IOPS over qemu-nbd's).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

/// Time a server gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Time a bd-server cluster has to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// Extra time over `--seconds` a timed fio run may take before it is killed.
const FIO_SLACK: Duration = Duration::from_secs(60);
/// Time the untimed sequential prefill may take before it is killed.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(600);
const EXPORT_BD: &str = "bg0";
const EXPORT_QEMU: &str = "disk";

#[derive(Args, Debug)]
pub struct NbdArgs {
    /// Directory for the data (default: a temporary directory under the current directory,
    /// removed afterwards). Each target runs in its own subdirectory (`qemu-nbd`, `1rep`,
    /// `3rep`), emptied first so every run starts from fresh stores; once the target is done
    /// only its logs are kept there (see `--keep-data`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// With `--dir`: keep each target's data files (WAL, data, raw image; several GB) instead
    /// of only its logs.
    #[arg(long)]
    keep_data: bool,
    /// Seconds per timed cell (randwrite and randread, for each target).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Print the results as JSON (the ratio line still comes last).
    #[arg(long)]
    json: bool,
    /// The bd-server binary (default: `bd-server` next to this executable).
    #[arg(long)]
    bd_server: Option<PathBuf>,
    /// Size of the region fio works on, MiB (also the size of the BG and the raw file).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// fio iodepth of the timed cells.
    #[arg(long, default_value_t = 32)]
    iodepth: u32,
    /// Core threads per bd-server process.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Targets to run (the ratio line needs all three).
    #[arg(long, value_delimiter = ',', default_value = "qemu-nbd,1rep,3rep")]
    targets: Vec<String>,
    /// bd-server's `data_direct_io` (O_DIRECT data files); default: the server's default.
    #[arg(long)]
    data_direct_io: Option<bool>,
    /// DIAGNOSIS ONLY: bd-server's `raft_sync`. `false` skips the WAL fdatasyncs, so
    /// acknowledged writes are NOT durable and the figures are not comparable with qemu-nbd's;
    /// it tells how much of a latency is the disk's.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    raft_sync: bool,
    /// bd-server's `pin_cores`. Off by default: every process pins its core N to CPU N, so the
    /// three nodes of `3rep` would all run their core thread on CPU 0 of this one machine.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pin_cores: bool,
    /// Runs of all the targets, alternating their order (round 2 runs them in reverse, so a
    /// target is not always first or last). Each round's ratios are against that round's
    /// qemu-nbd; the ratio line gives their median. This machine's IOPS swing by tens of
    /// percent from minute to minute, qemu-nbd's as much as ours: one round is one sample.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// One more flag for every `bd-server run` this starts (repeatable; write it with `=` so
    /// it is not taken for a flag of this command), e.g.
    /// `--server-arg=--wal-small-batches-in-flight-max=4`: compares a setting without a
    /// rebuild. bd-server refuses a flag it does not know or one this command already passes
    /// (`--cores`, `--raft-sync`, `--pin-cores`, `--data-direct-io` have options here), and
    /// the run fails at the start with bd-server's error.
    #[arg(long = "server-arg", value_name = "FLAG", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

type Res<T> = Result<T, String>;

/// What one fio run reported for the direction it exercised.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// fio's own CPU use (usr + sys), percent of one core.
    pub fio_cpu_pct: f64,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    /// 1-based round (`--rounds`).
    round: usize,
    target: String,
    rw: String,
    #[serde(flatten)]
    fio: FioResult,
    /// CPU use of the server processes during the cell, percent of one core (summed over them).
    server_cpu_pct: f64,
    /// IOPS over qemu-nbd's for the same rw (NaN without a qemu-nbd cell).
    ratio_vs_qemu: f64,
    /// The leader's WAL during the cell (bd-server targets whose status could be read).
    leader_wal: Option<WalCell>,
}

/// What the leader's WALs (all its cores) did during a cell, from `/status.json` before and
/// after it: how the writes were grouped into durable writes, and how long each took.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct WalCell {
    pub batches_per_s: f64,
    pub entries_per_batch: f64,
    /// Submission to completion as the core thread saw it, mean per batch.
    pub disk_us_per_batch: f64,
}

/// The WAL counters of every core of one node, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WalCounters {
    entries: u64,
    batches: u64,
    disk_us: u64,
}

impl WalCounters {
    /// From a node's `/status.json`; `None` if it has no `core_stats` with the WAL counters.
    fn from_status(v: &serde_json::Value) -> Option<WalCounters> {
        let mut c = WalCounters::default();
        for core in v["core_stats"].as_array()? {
            c.entries += core["wal_appended_entries"].as_u64()?;
            c.batches += core["wal_batches"].as_u64()?;
            c.disk_us += core["wal_batch_disk_us"].as_u64()?;
        }
        Some(c)
    }

    /// The cell between `self` (before) and `after`, `secs` long; `None` without batches.
    fn cell(self, after: WalCounters, secs: f64) -> Option<WalCell> {
        let batches = after.batches.checked_sub(self.batches)?;
        if batches == 0 || secs <= 0.0 {
            return None;
        }
        let entries = after.entries.checked_sub(self.entries)?;
        let disk_us = after.disk_us.checked_sub(self.disk_us)?;
        Some(WalCell {
            batches_per_s: batches as f64 / secs,
            entries_per_batch: entries as f64 / batches as f64,
            disk_us_per_batch: disk_us as f64 / batches as f64,
        })
    }
}

#[derive(Serialize)]
struct Report<'a> {
    seconds: u64,
    size_mib: u64,
    iodepth: u32,
    cores: usize,
    raft_sync: bool,
    pin_cores: bool,
    qemu_nbd_options: &'a str,
    server_args: &'a [String],
    loadavg_before: &'a str,
    loadavg_after: &'a str,
    rounds: usize,
    rows: &'a [Row],
    /// Per round: 1rep write, 3rep write and read ratios.
    round_ratios: &'a [[f64; 3]],
    /// Medians over the rounds.
    ratio_1rep_write: f64,
    ratio_3rep_write: f64,
    ratio_read: f64,
}

pub fn run(a: NbdArgs) -> Res<()> {
    for t in &a.targets {
        if !["qemu-nbd", "1rep", "3rep"].contains(&t.as_str()) {
            return Err(format!("unknown target {t:?} (qemu-nbd, 1rep, 3rep)"));
        }
    }
    if a.seconds == 0 || a.size_mib == 0 || a.iodepth == 0 || a.cores == 0 || a.rounds == 0 {
        return Err("--seconds, --size-mib, --iodepth, --cores and --rounds must be > 0".into());
    }
    check_tool("fio", &["--version"], "fio")?;
    let want = |t: &str| a.targets.iter().any(|x| x == t);
    if want("qemu-nbd") {
        check_tool("qemu-nbd", &["--version"], "qemu-utils")?;
    }
    let bd_server = if want("1rep") || want("3rep") {
        Some(find_bd_server(a.bd_server.as_deref())?)
    } else {
        None
    };
    let tmp;
    let root = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.canonicalize()
                .map_err(|e| format!("{}: {e}", d.display()))?
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("bd-bench-nbd-")
                .tempdir_in(".")
                .map_err(|e| format!("temp dir: {e}"))?;
            tmp.path()
                .canonicalize()
                .map_err(|e| format!("temp dir: {e}"))?
        }
    };
    let load_before = loadavg();
    if !a.json {
        eprintln!(
            "bd-bench nbd: {} s per cell, {} MiB region, iodepth {}, raft_sync {}{}, pin_cores {}; load {load_before}",
            a.seconds,
            a.size_mib,
            a.iodepth,
            if a.raft_sync { "on" } else { "OFF" },
            if a.raft_sync { "" } else { " (DIAGNOSIS ONLY: writes not durable)" },
            a.pin_cores
        );
    }
    let size = a.size_mib << 20;
    let mut rows = Vec::new();
    let mut qemu_opts = String::new();
    let plan = round_plan(&a.targets, a.rounds);
    for (round, t) in &plan {
        let (round, t) = (*round, t);
        let dir = if a.rounds == 1 {
            root.join(t)
        } else {
            root.join(format!("{t}-round{round}"))
        };
        fresh_dir(&dir)?;
        let mut servers = Servers::default();
        let (uri, leader_http) = match t.as_str() {
            "qemu-nbd" => {
                let (uri, opts) = start_qemu_nbd(&dir, size, &mut servers)?;
                qemu_opts = opts;
                (uri, None)
            }
            n => {
                let n = if n == "1rep" { 1 } else { 3 };
                let (uri, http) =
                    start_bd(bd_server.as_deref().unwrap(), &dir, n, &a, &mut servers)?;
                (uri, Some(http))
            }
        };
        let wal_now = || {
            leader_http
                .and_then(status_json)
                .and_then(|v| WalCounters::from_status(&v))
        };
        if !a.json {
            eprintln!(
                "  {t}{}: {uri}; prefilling {} MiB",
                round_label(round, a.rounds),
                a.size_mib
            );
        }
        let t0 = Instant::now();
        fio(&dir, &uri, "prefill", "write", "1M", 4, size, None)
            .map_err(|e| servers.with_logs(format!("{t} prefill: {e}")))?;
        if !a.json {
            eprintln!("  {t}: prefill took {:.1} s", t0.elapsed().as_secs_f64());
        }
        // Untimed: write back every dirty page of the filesystem (this target's prefill and
        // whatever an earlier target left behind), so no cell pays for another's writeback.
        let took = settle(&dir).map_err(|e| servers.with_logs(format!("{t}: {e}")))?;
        if !a.json {
            eprintln!(
                "  {t}: syncfs before the cells took {:.1} s",
                took.as_secs_f64()
            );
        }
        for rw in ["randwrite", "randread"] {
            let wal0 = wal_now();
            let cpu0 = servers.cpu_seconds();
            let t0 = Instant::now();
            let r = fio(&dir, &uri, rw, rw, "4k", a.iodepth, size, Some(a.seconds))
                .map_err(|e| servers.with_logs(format!("{t} {rw}: {e}")))?;
            let cpu = servers.cpu_seconds() - cpu0;
            let secs = t0.elapsed().as_secs_f64();
            let leader_wal = wal0
                .zip(wal_now())
                .and_then(|(before, after)| before.cell(after, secs));
            let row = Row {
                round,
                target: t.clone(),
                rw: rw.into(),
                fio: r,
                server_cpu_pct: 100.0 * cpu / secs,
                ratio_vs_qemu: f64::NAN,
                leader_wal,
            };
            if !a.json {
                eprintln!(
                    "  {t} {rw}: {:.0} IOPS, p99 {:.0} us",
                    row.fio.iops, row.fio.p99_us
                );
            }
            rows.push(row);
        }
        servers.stop();
        if !a.keep_data {
            drop_data(&dir)?;
        }
    }
    let load_after = loadavg();
    let (round_ratios, [w1, w3, rd]) = ratios(&mut rows, a.rounds);
    if a.json {
        let rep = Report {
            seconds: a.seconds,
            size_mib: a.size_mib,
            iodepth: a.iodepth,
            cores: a.cores,
            raft_sync: a.raft_sync,
            pin_cores: a.pin_cores,
            qemu_nbd_options: &qemu_opts,
            server_args: &a.server_args,
            loadavg_before: &load_before,
            loadavg_after: &load_after,
            rounds: a.rounds,
            rows: &rows,
            round_ratios: &round_ratios,
            ratio_1rep_write: w1,
            ratio_3rep_write: w3,
            ratio_read: rd,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", table(&rows, a.rounds > 1));
        if a.rounds > 1 {
            for (i, [w1, w3, rd]) in round_ratios.iter().enumerate() {
                println!("round {}: {}", i + 1, ratio_line(*w1, *w3, *rd));
            }
            println!("ratio line: medians over {} rounds", a.rounds);
        }
        println!("load average before: {load_before}; after: {load_after}");
        if !qemu_opts.is_empty() {
            println!("qemu-nbd options: {qemu_opts}");
        }
        if !a.server_args.is_empty() {
            println!("bd-server extra flags: {}", a.server_args.join(" "));
        }
    }
    println!("{}", ratio_line(w1, w3, rd));
    Ok(())
}

/// Marks a directory this benchmark made for one target, so a later run may empty it.
const TARGET_MARK: &str = ".bd-bench-nbd-target";

/// An empty directory for one target: made with a mark, or emptied if a previous run made it.
/// A non-empty directory without the mark is someone else's and is refused.
fn fresh_dir(dir: &Path) -> Res<()> {
    let non_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        if !dir.join(TARGET_MARK).exists() {
            return Err(format!(
                "{} is not empty and was not made by bd-bench nbd; refusing to delete it \
                 (choose another --dir)",
                dir.display()
            ));
        }
        std::fs::remove_dir_all(dir).map_err(|e| format!("emptying {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join(TARGET_MARK), b"")
        .map_err(|e| format!("{}: {e}", dir.join(TARGET_MARK).display()))
}

/// Removes everything in a finished target's directory but its logs (and the mark).
fn drop_data(dir: &Path) -> Res<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let p = e.path();
        let keep = p.extension().is_some_and(|x| x == "log") || e.file_name() == TARGET_MARK;
        if keep {
            continue;
        }
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| format!("removing {}: {e}", p.display()))?;
    }
    Ok(())
}

/// `syncfs` of the filesystem holding `dir`: the kernel writes dirty pages back ~30 s after they
/// were dirtied, so without it qemu-nbd's unsynced writes of one cell land on the disk during the
/// next target's cells (measured: 1rep randwrite 44k IOPS after qemu-nbd, 58k alone).
fn settle(dir: &Path) -> Res<Duration> {
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    let f = File::open(dir).map_err(|e| format!("syncfs: cannot open {}: {e}", dir.display()))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(format!(
            "syncfs of {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(t0.elapsed())
}

/// Every (round, target) in run order: odd rounds in the given order, even rounds reversed.
fn round_plan(targets: &[String], rounds: usize) -> Vec<(usize, String)> {
    (1..=rounds)
        .flat_map(|r| {
            let mut ts = targets.to_vec();
            if r % 2 == 0 {
                ts.reverse();
            }
            ts.into_iter().map(move |t| (r, t))
        })
        .collect()
}

fn round_label(round: usize, rounds: usize) -> String {
    if rounds > 1 {
        format!(" (round {round})")
    } else {
        String::new()
    }
}

/// Sets every row's ratio to its round's qemu-nbd cell of the same rw, and returns each round's
/// (1rep write, 3rep write, read) ratios and their medians (NaN where a target is missing).
fn ratios(rows: &mut [Row], rounds: usize) -> (Vec<[f64; 3]>, [f64; 3]) {
    let iops = |rows: &[Row], round: usize, t: &str, rw: &str| {
        rows.iter()
            .find(|r| r.round == round && r.target == t && r.rw == rw)
            .map_or(f64::NAN, |r| r.fio.iops)
    };
    let base: Vec<f64> = rows
        .iter()
        .map(|r| iops(rows, r.round, "qemu-nbd", &r.rw))
        .collect();
    for (r, b) in rows.iter_mut().zip(base) {
        r.ratio_vs_qemu = r.fio.iops / b;
    }
    let per: Vec<[f64; 3]> = (1..=rounds)
        .map(|k| {
            let q = |rw| iops(rows, k, "qemu-nbd", rw);
            [
                iops(rows, k, "1rep", "randwrite") / q("randwrite"),
                iops(rows, k, "3rep", "randwrite") / q("randwrite"),
                iops(rows, k, "3rep", "randread") / q("randread"),
            ]
        })
        .collect();
    let med = |i: usize| median(per.iter().map(|r| r[i]).collect());
    let medians = [med(0), med(1), med(2)];
    (per, medians)
}

/// Median (mean of the middle two for an even count); NaN if any value is NaN.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The machine-readable last line.
pub fn ratio_line(w1: f64, w3: f64, read: f64) -> String {
    format!("ratio_1rep_write={w1:.2} ratio_3rep_write={w3:.2} ratio_read={read:.2}")
}

fn table(rows: &[Row], with_round: bool) -> String {
    let mut s = String::from(if with_round {
        "| round | target | rw | IOPS | MB/s | p50 us | p99 us | p99.9 us | server CPU % | fio CPU % | x qemu-nbd | leader WAL batches/s x entries, disk us |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    } else {
        "| target | rw | IOPS | MB/s | p50 us | p99 us | p99.9 us | server CPU % | fio CPU % | x qemu-nbd | leader WAL batches/s x entries, disk us |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    });
    for r in rows {
        if with_round {
            s.push_str(&format!("| {} ", r.round));
        }
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} |\n",
            r.target,
            r.rw,
            r.fio.iops,
            r.fio.mb_per_s,
            r.fio.p50_us,
            r.fio.p99_us,
            r.fio.p999_us,
            r.server_cpu_pct,
            r.fio.fio_cpu_pct,
            r.ratio_vs_qemu,
            r.leader_wal.map_or("-".into(), |w| format!(
                "{:.0} x {:.1}, {:.0}",
                w.batches_per_s, w.entries_per_batch, w.disk_us_per_batch
            ))
        ));
    }
    s
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn check_tool(exe: &str, args: &[&str], package: &str) -> Res<()> {
    match Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "`{exe}` not found in PATH: install the Debian package `{package}` (apt-get install -y {package})"
        )),
        Err(e) => Err(format!("cannot run `{exe}`: {e}")),
    }
}

fn find_bd_server(flag: Option<&Path>) -> Res<PathBuf> {
    let p = match flag {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable: {e}"))?
            .with_file_name("bd-server"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "bd-server not found at {}: build it in the same target dir (cargo build --release -p server) or pass --bd-server PATH",
            p.display()
        ))
    }
}

/// One started server process.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Reaped already (its pid may be reused: never signal it again).
    reaped: bool,
}

/// Server processes of one target; stopped (SIGTERM, then SIGKILL after a grace period) by
/// [`Servers::stop`] or on drop.
#[derive(Default)]
struct Servers {
    procs: Vec<Proc>,
}

impl Servers {
    fn spawn(&mut self, name: &str, mut cmd: Command, log: PathBuf) -> Res<()> {
        let f = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| format!("dup log: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        self.procs.push(Proc {
            name: name.into(),
            child,
            log,
            reaped: false,
        });
        Ok(())
    }

    /// Summed user + system CPU seconds of the live processes.
    fn cpu_seconds(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.procs
            .iter()
            .filter(|p| !p.reaped)
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/stat", p.child.id())).ok())
            .filter_map(|s| {
                // After "pid (comm) ": state is field 3 of stat(5), utime 14, stime 15.
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
            })
            .sum()
    }

    /// A process that has exited, with its status.
    fn exited(&mut self) -> Option<String> {
        for p in self.procs.iter_mut().filter(|p| !p.reaped) {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.reaped = true;
                return Some(format!("{} exited ({st}); log {}", p.name, p.log.display()));
            }
        }
        None
    }

    /// `e` followed by the last lines of every log.
    fn with_logs(&self, e: String) -> String {
        let mut s = e;
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(10)..].join("\n    ");
            s.push_str(&format!("\n  last lines of {}'s log:\n    {tail}", p.name));
        }
        s
    }

    fn stop(&mut self) {
        for p in self.procs.iter().filter(|p| !p.reaped) {
            // SAFETY: kill(2) on a child we spawned and have not reaped (so its pid is ours).
            unsafe {
                libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for p in self.procs.iter_mut().filter(|p| !p.reaped) {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!(
                            "bd-bench: {} did not stop within {STOP_GRACE:?}: killing it",
                            p.name
                        );
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
            p.reaped = true;
        }
        self.procs.clear();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_tcp_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// A base UDP port with `n` consecutive free ports (QUIC: core N uses base + N).
fn free_udp_range(n: u16) -> Res<u16> {
    for _ in 0..100 {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let base = s.local_addr().map_err(|e| e.to_string())?.port();
        if base.checked_add(n).is_none() {
            continue;
        }
        let rest: Vec<_> = (1..n)
            .map(|i| UdpSocket::bind(("127.0.0.1", base + i)))
            .collect();
        if rest.iter().all(|r| r.is_ok()) {
            return Ok(base);
        }
    }
    Err(format!("no {n} consecutive free UDP ports"))
}

fn wait_tcp(addr: SocketAddr, servers: &mut Servers, what: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = servers.exited() {
            return Err(servers.with_logs(format!("{what}: {e}")));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(servers.with_logs(format!("{what}: {addr} not listening after 30 s")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts qemu-nbd on a raw file in `dir`; returns the URI and the options that worked.
fn start_qemu_nbd(dir: &Path, size: u64, servers: &mut Servers) -> Res<(String, String)> {
    let file = dir.join("disk.raw");
    let f = File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    // Preallocate like bd-server preallocates its data files.
    // SAFETY: fallocate on an fd we own.
    let _ = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, size as i64) };
    drop(f);
    let variants: [&[&str]; 3] = [
        &["--cache=none", "--aio=native"],
        &["--cache=none", "--aio=threads"],
        &[],
    ];
    let mut last = String::new();
    for v in variants {
        let port = free_tcp_port()?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", EXPORT_QEMU, "-p"])
            .arg(port.to_string())
            .args(["-b", "127.0.0.1", "-t"])
            .args(v)
            .arg(&file);
        servers.spawn("qemu-nbd", cmd, dir.join("qemu-nbd.log"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match wait_tcp(addr, servers, "qemu-nbd") {
            Ok(()) => {
                let opts = format!("-f raw -x {EXPORT_QEMU} -t {}", v.join(" "));
                return Ok((format!("nbd://{addr}/{EXPORT_QEMU}"), opts.trim().into()));
            }
            Err(e) => {
                eprintln!(
                    "bd-bench: qemu-nbd {} failed, trying the next options",
                    v.join(" ")
                );
                last = e;
                servers.stop();
            }
        }
    }
    Err(last)
}

/// One node of a bd-server target.
struct Node {
    id: u64,
    nbd: SocketAddr,
    http: SocketAddr,
    quic: SocketAddr,
}

/// The `bd-server run` command of `node` in a cluster of `nodes`, `--server-arg` flags last.
fn node_command(exe: &Path, dir: &Path, node: &Node, nodes: &[Node], a: &NbdArgs) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--node-id")
        .arg(node.id.to_string())
        .arg("--data-dir")
        .arg(dir.join(format!("node{}", node.id)))
        .arg("--cores")
        .arg(a.cores.to_string())
        .arg("--nbd-listen")
        .arg(node.nbd.to_string())
        .arg("--http-listen")
        .arg(node.http.to_string())
        .arg("--quic-listen")
        .arg(node.quic.to_string())
        .arg("--insecure-loopback")
        .arg("--raft-sync")
        .arg(a.raft_sync.to_string())
        .arg("--pin-cores")
        .arg(a.pin_cores.to_string())
        .arg("--bg")
        .arg("0")
        .arg("--bg-size-bytes")
        .arg((a.size_mib << 20).to_string());
    if let Some(d) = a.data_direct_io {
        cmd.arg("--data-direct-io").arg(d.to_string());
    }
    for p in nodes.iter().filter(|p| p.id != node.id) {
        cmd.arg("--peer").arg(format!("{}={}", p.id, p.quic));
    }
    cmd.args(&a.server_args);
    cmd
}

/// Starts an `n`-replica bd-server group in `dir`; returns the leader's NBD URI and HTTP
/// address.
fn start_bd(
    exe: &Path,
    dir: &Path,
    n: u64,
    a: &NbdArgs,
    servers: &mut Servers,
) -> Res<(String, SocketAddr)> {
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let cores = u16::try_from(a.cores).map_err(|_| "--cores too large".to_string())?;
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes.push(Node {
            id,
            nbd: lo(free_tcp_port()?),
            http: lo(free_tcp_port()?),
            quic: lo(free_udp_range(cores)?),
        });
    }
    for node in &nodes {
        let cmd = node_command(exe, dir, node, &nodes, a);
        servers.spawn(
            &format!("bd-server node {}", node.id),
            cmd,
            dir.join(format!("node{}.log", node.id)),
        )?;
    }
    let deadline = Instant::now() + LEADER_WAIT;
    let leader = loop {
        if let Some(e) = servers.exited() {
            return Err(servers.with_logs(format!("{n}-replica group: {e}")));
        }
        let found = nodes
            .iter()
            .find_map(|node| leader_of(node.http).filter(|l| *l == node.id));
        if let Some(l) = found {
            break l;
        }
        if Instant::now() > deadline {
            return Err(servers.with_logs(format!(
                "{n}-replica group: no leader for bg0 within {LEADER_WAIT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let node = &nodes[(leader - 1) as usize];
    wait_tcp(node.nbd, servers, "bd-server")?;
    Ok((format!("nbd://{}/{EXPORT_BD}", node.nbd), node.http))
}

/// The leader of bg0 as the node at `http` reports it.
fn leader_of(http: SocketAddr) -> Option<u64> {
    let v = status_json(http)?;
    v["bgs"].as_array()?.iter().find(|b| b["bg"] == 0)?["leader"].as_u64()
}

/// The node's `/status.json` at `http`, or `None` if it cannot be read.
fn status_json(http: SocketAddr) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /status.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let body = &buf[buf.find("\r\n\r\n")? + 4..];
    serde_json::from_str(body).ok()
}

/// Runs one fio job and parses its JSON. `seconds: None` = a full pass over `size`, untimed.
#[allow(clippy::too_many_arguments)]
fn fio(
    dir: &Path,
    uri: &str,
    name: &str,
    rw: &str,
    bs: &str,
    iodepth: u32,
    size: u64,
    seconds: Option<u64>,
) -> Res<FioResult> {
    let out = dir.join(format!("fio-{name}.json"));
    let err = dir.join(format!("fio-{name}.err"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={iodepth}"))
        .arg("--direct=1")
        .arg(format!("--size={size}"))
        .arg("--numjobs=1")
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()));
    if let Some(s) = seconds {
        cmd.arg("--time_based").arg(format!("--runtime={s}"));
    }
    let errf = File::create(&err).map_err(|e| format!("{}: {e}", err.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(errf);
    let mut child = cmd.spawn().map_err(|e| format!("spawn fio: {e}"))?;
    let limit = seconds.map_or(PREFILL_TIMEOUT, |s| Duration::from_secs(s) + FIO_SLACK);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("fio did not finish within {limit:?}: killed"));
            }
            Err(e) => return Err(format!("wait fio: {e}")),
        }
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    if !status.success() {
        return Err(format!("fio failed ({status}): {}", stderr.trim()));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dir_key = if rw.contains("read") { "read" } else { "write" };
    parse_fio_json(&text, dir_key)
}

/// Parses fio's `--output-format=json` for one job; `dir` is "read" or "write". Text before
/// the JSON object (the nbd engine prints `fio: connected to NBD server`) is skipped.
pub fn parse_fio_json(text: &str, dir: &str) -> Res<FioResult> {
    let start = text
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| text.starts_with('{').then_some(0))
        .ok_or("no JSON object in fio output")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = v["jobs"]
        .as_array()
        .and_then(|j| j.first())
        .ok_or("fio JSON: no jobs")?;
    if let Some(e) = job["error"].as_i64().filter(|e| *e != 0) {
        return Err(format!("fio job error {e}"));
    }
    let d = &job[dir];
    let num = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .ok_or_else(|| format!("fio JSON: {dir}.{what} missing"))
    };
    let pct = |p: &str| {
        num(
            &d["clat_ns"]["percentile"][p],
            &format!("clat_ns.percentile.{p}"),
        )
    };
    Ok(FioResult {
        iops: num(&d["iops"], "iops")?,
        mb_per_s: num(&d["bw_bytes"], "bw_bytes")? / 1e6,
        p50_us: pct("50.000000")? / 1e3,
        p99_us: pct("99.000000")? / 1e3,
        p999_us: pct("99.900000")? / 1e3,
        fio_cpu_pct: num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_args_reach_every_node_after_the_benchmarks_own_flags() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: NbdArgs,
        }
        let a = <Cli as clap::Parser>::try_parse_from([
            "nbd",
            "--server-arg=--wal-small-batches-in-flight-max=4",
            "--server-arg",
            "--wal-batches-in-flight-max=8",
        ])
        .unwrap()
        .a;
        assert_eq!(
            a.server_args,
            [
                "--wal-small-batches-in-flight-max=4",
                "--wal-batches-in-flight-max=8"
            ]
        );
        let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let nodes: Vec<Node> = (1..=3)
            .map(|id| Node {
                id,
                nbd: lo(1000 + id as u16),
                http: lo(2000 + id as u16),
                quic: lo(3000 + id as u16),
            })
            .collect();
        for node in &nodes {
            let cmd = node_command(Path::new("bd-server"), Path::new("/d"), node, &nodes, &a);
            let args: Vec<String> = cmd
                .get_args()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            assert_eq!(args[0], "run");
            assert_eq!(args[args.len() - 2..], a.server_args[..], "{args:?}");
            let peers: Vec<&String> = args
                .windows(2)
                .filter(|w| w[0] == "--peer")
                .map(|w| &w[1])
                .collect();
            assert_eq!(peers.len(), 2, "{args:?}");
            assert!(!peers.contains(&&format!("{}={}", node.id, node.quic)));
        }
    }

    #[test]
    fn target_dirs_start_empty_and_keep_only_logs() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("3rep");
        fresh_dir(&t).unwrap();
        std::fs::create_dir_all(t.join("node1/core-0")).unwrap();
        std::fs::write(t.join("node1/core-0/bg-0.data"), b"data").unwrap();
        std::fs::write(t.join("node1.log"), b"log").unwrap();
        drop_data(&t).unwrap();
        assert!(t.join("node1.log").exists() && !t.join("node1").exists());
        // A second run empties it, logs too.
        fresh_dir(&t).unwrap();
        assert!(!t.join("node1.log").exists() && t.join(TARGET_MARK).exists());
        // Someone else's directory is never emptied.
        let other = d.path().join("mine");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        let e = fresh_dir(&other).unwrap_err();
        assert!(e.contains("refusing") && e.contains("mine"), "{e}");
        assert!(other.join("precious").exists());
    }

    #[test]
    fn settle_syncs_a_directory_and_names_a_missing_one() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), vec![7u8; 1 << 20]).unwrap();
        settle(d.path()).unwrap();
        let gone = d.path().join("no-such-dir");
        let e = settle(&gone).unwrap_err();
        assert!(e.contains("no-such-dir"), "{e}");
    }

    /// Captured from `fio --ioengine=nbd ... --rw=randwrite --output-format=json` against
    /// qemu-nbd (fio 3.33), trimmed to the fields fio always emits around the ones we read.
    const SAMPLE: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "timestamp" : 1795310053,
  "jobs" : [
    {
      "jobname" : "c",
      "groupid" : 0,
      "error" : 0,
      "read" : {
        "io_bytes" : 0,
        "bw_bytes" : 0,
        "iops" : 0.000000,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 }
      },
      "write" : {
        "io_bytes" : 24719360,
        "bw_bytes" : 24694665,
        "iops" : 6028.971029,
        "runtime" : 1001,
        "clat_ns" : {
          "min" : 50176,
          "max" : 51642368,
          "mean" : 650000.5,
          "stddev" : 3000000.1,
          "N" : 6035,
          "percentile" : {
            "1.000000" : 84480,
            "50.000000" : 185344,
            "90.000000" : 350208,
            "99.000000" : 10944512,
            "99.500000" : 22413312,
            "99.900000" : 45875200,
            "99.950000" : 51642368,
            "99.990000" : 51642368
          }
        }
      },
      "usr_cpu" : 10.5,
      "sys_cpu" : 20.25,
      "ctx" : 12345
    }
  ]
}
"#;

    #[test]
    fn parses_write_cell_after_banner() {
        let r = parse_fio_json(SAMPLE, "write").unwrap();
        assert_eq!(
            r,
            FioResult {
                iops: 6028.971029,
                mb_per_s: 24.694665,
                p50_us: 185.344,
                p99_us: 10944.512,
                p999_us: 45875.2,
                fio_cpu_pct: 30.75,
            }
        );
    }

    #[test]
    fn read_side_without_percentiles_is_an_error() {
        let e = parse_fio_json(SAMPLE, "read").unwrap_err();
        assert!(e.contains("percentile"), "{e}");
    }

    #[test]
    fn parses_without_banner_and_rejects_garbage() {
        let bare = &SAMPLE[SAMPLE.find('{').unwrap()..];
        assert_eq!(parse_fio_json(bare, "write").unwrap().iops, 6028.971029);
        assert!(parse_fio_json("fio: connection refused\n", "write").is_err());
        let failed = SAMPLE.replace("\"error\" : 0", "\"error\" : 5");
        assert!(parse_fio_json(&failed, "write")
            .unwrap_err()
            .contains("error 5"));
    }

    #[test]
    fn rounds_alternate_the_target_order() {
        let ts: Vec<String> = ["qemu-nbd", "1rep", "3rep"].map(String::from).to_vec();
        let plan = round_plan(&ts, 3);
        let plan: Vec<(usize, &str)> = plan.iter().map(|(r, t)| (*r, t.as_str())).collect();
        assert_eq!(
            plan,
            [
                (1, "qemu-nbd"),
                (1, "1rep"),
                (1, "3rep"),
                (2, "3rep"),
                (2, "1rep"),
                (2, "qemu-nbd"),
                (3, "qemu-nbd"),
                (3, "1rep"),
                (3, "3rep"),
            ]
        );
    }

    fn cell(round: usize, target: &str, rw: &str, iops: f64) -> Row {
        Row {
            round,
            target: target.into(),
            rw: rw.into(),
            fio: FioResult {
                iops,
                mb_per_s: 0.0,
                p50_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                fio_cpu_pct: 0.0,
            },
            server_cpu_pct: 0.0,
            ratio_vs_qemu: f64::NAN,
            leader_wal: None,
        }
    }

    #[test]
    fn wal_counters_sum_a_nodes_cores_and_a_cell_is_their_difference() {
        let status = |k: u64| {
            serde_json::json!({
                "core_stats": [
                    {"core": 0, "wal_appended_entries": 100 * k, "wal_batches": 10 * k,
                     "wal_batch_disk_us": 5000 * k},
                    {"core": 1, "wal_appended_entries": 20 * k, "wal_batches": 2 * k,
                     "wal_batch_disk_us": 1000 * k},
                ]
            })
        };
        let before = WalCounters::from_status(&status(1)).unwrap();
        assert_eq!(
            before,
            WalCounters {
                entries: 120,
                batches: 12,
                disk_us: 6000
            }
        );
        let after = WalCounters::from_status(&status(3)).unwrap();
        let c = before.cell(after, 2.0).unwrap();
        assert_eq!(c.batches_per_s, 12.0);
        assert_eq!(c.entries_per_batch, 10.0);
        assert_eq!(c.disk_us_per_batch, 500.0);
        assert_eq!(before.cell(before, 2.0), None, "no batches, no cell");
        assert_eq!(
            after.cell(before, 2.0),
            None,
            "a restarted node's counters went back"
        );
        let no_wal = serde_json::json!({"core_stats": [{"core": 0}]});
        assert_eq!(WalCounters::from_status(&no_wal), None);
        assert_eq!(WalCounters::from_status(&serde_json::json!({})), None);
        let mut rows = vec![cell(1, "1rep", "randwrite", 100.0)];
        rows[0].leader_wal = Some(c);
        rows.push(cell(1, "qemu-nbd", "randwrite", 50.0));
        let t = table(&rows, false);
        assert!(t.contains("| 12 x 10.0, 500 |"), "{t}");
        assert!(t.lines().last().unwrap().ends_with("| - |"), "{t}");
    }

    #[test]
    fn each_round_is_against_its_own_baseline_and_the_line_is_the_median() {
        let mut rows = Vec::new();
        for (round, q, w3) in [
            (1, 20000.0, 16000.0),
            (2, 30000.0, 15000.0),
            (3, 25000.0, 15000.0),
        ] {
            rows.push(cell(round, "qemu-nbd", "randwrite", q));
            rows.push(cell(round, "qemu-nbd", "randread", 40000.0));
            rows.push(cell(round, "1rep", "randwrite", q));
            rows.push(cell(round, "3rep", "randwrite", w3));
            rows.push(cell(round, "3rep", "randread", 80000.0));
        }
        let (per, med) = ratios(&mut rows, 3);
        assert_eq!(per[0][1], 0.8);
        assert_eq!(per[1][1], 0.5);
        assert_eq!(per[2][1], 0.6);
        // Median of 0.8, 0.5, 0.6 (the pooled ratio 46k/75k = 0.61 would differ).
        assert_eq!(med, [1.0, 0.6, 2.0]);
        let r = rows
            .iter()
            .find(|r| r.round == 2 && r.target == "3rep" && r.rw == "randwrite")
            .unwrap();
        assert_eq!(r.ratio_vs_qemu, 0.5);
        // A missing target gives NaN, not a ratio against another round.
        let mut partial = vec![cell(1, "3rep", "randwrite", 1.0)];
        let (_, med) = ratios(&mut partial, 1);
        assert!(med.iter().all(|m| m.is_nan()));
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }

    #[test]
    fn ratio_line_format() {
        assert_eq!(
            ratio_line(1.0, 0.6049, 1.5),
            "ratio_1rep_write=1.00 ratio_3rep_write=0.60 ratio_read=1.50"
        );
        assert_eq!(
            ratio_line(19800.0 / 19800.0, 5000.0 / 19800.0, 30000.0 / 26300.0),
            "ratio_1rep_write=1.00 ratio_3rep_write=0.25 ratio_read=1.14"
        );
        assert_eq!(
            ratio_line(f64::NAN, 0.0, 2.0),
            "ratio_1rep_write=NaN ratio_3rep_write=0.00 ratio_read=2.00"
        );
    }
}
