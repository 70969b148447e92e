//! `bd-bench wal`: measures the per-core WAL's group commit against the two
//! baselines that matter, on the same filesystem in the same run:
//! - naive: every append does its own write + fdatasync (what a log without
//!   group commit costs), from N threads at once;
//! - raw sequential: 64 KiB writes of the same total bytes, buffered with
//!   one fdatasync at the end, and O_DIRECT (the disk's streaming
//!   bandwidth; the better of the two is the baseline).
//!
//! WAL cells: 1/16/64/256 concurrent appenders (tokio tasks on one
//! current_thread runtime, as on a core) over 64 groups, 4 KiB and 64 KiB
//! entries, fsync on. The cells measure the WAL in service, not a fresh
//! directory: each group compacts its log as it goes (as raft does after
//! snapshots; `--compact-mib` of live log in all), so purged segment files
//! are reused, and all cells share one directory whose pool of free
//! segment files two untimed warm-up cells filled first (`--fresh` gives every
//! cell a new directory instead: every segment is then zero-filled in the
//! background while the cell runs).
//!
//! Ceiling rows then write the same disk with O_DIRECT + O_DSYNC (each write
//! durable on its own, as a WAL batch is) in the shapes the ratios are about:
//! 64 × 4 KiB per flush as 1, 2 or 4 writes at a time, and 4 MiB as four
//! 1 MiB writes. They bound what a log that makes each batch durable with a
//! write + flush of its own can reach with the same appenders on this disk.
//! Two more bound the other design, flushes shared by every batch written
//! before them: 64 appenders with no CPU, whose waiting entries one or two
//! threads write as one O_DIRECT write without a flush, while one thread
//! runs fdatasync back to back and acknowledges what was written before
//! each began. The line before the last gives the best of them as bounds on
//! X and Y. The last line of output is always
//! `ratio_vs_naive_at_64=X ratio_vs_raw_seq_64k=Y`.
//!
//! Each round ends with a restart row: `Wal::open` timed on a closed log of
//! `--recovery-mib` of 4 KiB entries (docs/wal.md, "Restart").
//!
//! `--rounds N` measures all of it N times, every other round with the
//! baselines first, and prints each round's ratios; the ceilings and the last
//! line are then medians over the rounds. The disk's speed drifts by tens of
//! percent within minutes, so one run's ratio compares cells that saw
//! different disks.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use raftlog::core::types::{Entry, EntryKind};
use raftlog::wal::{self, AlignedBuf, IoBackend, Wal, WalConfig, WalOp};
use serde::Serialize;

use crate::nbd::median;

#[derive(Args, Debug)]
pub struct WalArgs {
    /// Directory for the files (default: a temporary directory under the
    /// current directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per cell.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Print the results as JSON (the ratio line still comes last).
    #[arg(long)]
    json: bool,
    /// Concurrent appenders per WAL cell.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    appenders: Vec<usize>,
    /// Entry sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "4096,65536")]
    sizes: Vec<usize>,
    /// Raft groups the appenders are spread over.
    #[arg(long, default_value_t = 64)]
    groups: u64,
    /// WAL I/O backend: auto (io_uring if available), uring or fallback.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// WAL batches (write + fdatasync) on the disk at once
    /// (`batches_in_flight_max`).
    #[arg(long, default_value_t = WalConfig::new(".").batches_in_flight_max)]
    in_flight: usize,
    /// Batches under `--small-batch-kib` on the disk at once
    /// (`small_batches_in_flight_max`, capped by `--in-flight`).
    #[arg(long, default_value_t = WalConfig::new(".").small_batches_in_flight_max)]
    small_in_flight: usize,
    /// KiB below which a batch is small (`small_batch_bytes_max`).
    #[arg(long, default_value_t = WalConfig::new(".").small_batch_bytes_max as u64 >> 10)]
    small_batch_kib: u64,
    /// WAL writes: O_DIRECT + RWF_DSYNC (`true`) or buffered + fdatasync.
    #[arg(long, default_value_t = WalConfig::new(".").direct_io, action = clap::ArgAction::Set)]
    direct_io: bool,
    /// WAL: zero-fill the next segment in the background
    /// (`segment_zero_fill`).
    #[arg(long, default_value_t = WalConfig::new(".").segment_zero_fill, action = clap::ArgAction::Set)]
    zero_fill: bool,
    /// WAL segment size in MiB (`log_segment_bytes_max`).
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
    /// Live log kept by compaction, MiB over all groups: each appender
    /// compacts its group up to its own durable entry after every
    /// `compact_mib / appenders` of its appends (queued ahead of its next
    /// append, not waited for on its own, as the engine does). 0 = never
    /// compact.
    #[arg(long, default_value_t = 64)]
    compact_mib: u64,
    /// Measure everything this many times, every other round with the
    /// baselines first; the last lines give each round's ratios and their
    /// medians (the disk's speed drifts by tens of percent within minutes).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Every cell in a new, empty WAL directory, without the warm-up (the
    /// WAL's first minutes: no free segment files yet).
    #[arg(long)]
    fresh: bool,
    /// Restart cell: MiB of 4 KiB entries (over `--groups`, never
    /// compacted) written and closed, then `Wal::open` timed three times on
    /// it (recovery reads every segment, directly where the filesystem
    /// allows, so each open reads the disk). 0 = skip.
    #[arg(long, default_value_t = 256)]
    recovery_mib: u64,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    /// 1-based round with `--rounds` above 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    round: Option<usize>,
    mode: String,
    entry_bytes: usize,
    appenders: usize,
    appends_per_s: f64,
    mb_per_s: f64,
    fsyncs_per_s: f64,
    mean_batch: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// WAL cells: the most batches seen on the disk at once.
    max_in_flight: usize,
    /// WAL cells: CPU time (user + system) of the runtime thread — writer
    /// and appenders — per append, in microseconds.
    cpu_us_per_append: f64,
    /// WAL cells: mean time of a batch on the disk, from handing its write
    /// to io_uring to reaping the completion, in microseconds.
    disk_us_per_batch: f64,
    /// WAL cells: segments started on a purged file / on a zero-filled one.
    segments_reused: u64,
    segments_zero_filled: u64,
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

type Res<T> = Result<T, String>;

pub fn run(a: WalArgs) -> Res<()> {
    let (rows, per_round) = measure(&a)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&rows);
    }
    for line in ratio_lines(&per_round) {
        println!("{line}");
    }
    Ok(())
}

/// Every round's rows (in the order measured) and ratios.
fn measure(a: &WalArgs) -> Res<(Vec<Row>, Vec<Ratios>)> {
    let tmp;
    let root = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("bd-bench-wal-")
                .tempdir_in(".")
                .map_err(|e| format!("temp dir: {e}"))?;
            tmp.path().to_path_buf()
        }
    };
    let dur = Duration::from_secs_f64(a.seconds);
    let backend = match a.backend.as_str() {
        "auto" => IoBackend::Auto,
        "uring" => IoBackend::Uring,
        "fallback" => IoBackend::Fallback,
        b => return Err(format!("unknown backend {b:?} (auto, uring, fallback)")),
    };
    let setup = WalSetup {
        groups: a.groups,
        dur,
        backend,
        in_flight: a.in_flight,
        small_in_flight: a.small_in_flight,
        small_batch_bytes: (a.small_batch_kib << 10) as usize,
        direct_io: a.direct_io,
        zero_fill: a.zero_fill,
        segment_bytes: a.segment_mib << 20,
        compact_bytes: a.compact_mib << 20,
    };
    if setup.segment_bytes == 0 {
        return Err("--segment-mib must be > 0".into());
    }
    if a.rounds == 0 {
        return Err("--rounds must be > 0".into());
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut per_round: Vec<Ratios> = Vec::new();
    for round in 1..=a.rounds {
        if a.rounds > 1 {
            eprintln!("round {round} of {}", a.rounds);
        }
        // Every other round measures the baselines first, so that a disk
        // that drifts during a round favours neither side.
        let baselines_first = round % 2 == 0;
        // The raw cells write as many bytes as the 64 KiB x 64 WAL cell;
        // when they run first, the previous round's cell says how many.
        let mut got = Vec::new();
        if baselines_first {
            got.extend(baseline_cells(&root, a, wal_64k_mb_per_s(&rows))?);
            got.extend(wal_cells(&root, a, &setup)?);
        } else {
            got.extend(wal_cells(&root, a, &setup)?);
            got.extend(baseline_cells(&root, a, wal_64k_mb_per_s(&got))?);
        }
        if a.recovery_mib > 0 {
            let r = recovery_cell(&root.join("wal-recovery"), a.recovery_mib << 20, &setup)?;
            progress(&r, a.json);
            got.push(r);
        }
        let r = Ratios::of(&got);
        for row in &mut got {
            row.round = (a.rounds > 1).then_some(round);
        }
        per_round.push(r);
        rows.extend(got);
    }
    Ok((rows, per_round))
}

/// MB/s of the last 64 KiB x 64 WAL cell in `rows`.
fn wal_64k_mb_per_s(rows: &[Row]) -> Option<f64> {
    rows.iter()
        .rev()
        .find(|r| r.mode == "wal" && r.entry_bytes == 65536 && r.appenders == 64)
        .map(|r| r.mb_per_s)
}

/// The lines after the table: each round's ratios (with several rounds),
/// the ceilings, and last the ratio line (medians over the rounds).
fn ratio_lines(per_round: &[Ratios]) -> Vec<String> {
    let mut out = Vec::new();
    let med = |f: fn(&Ratios) -> f64| median(per_round.iter().map(f).collect());
    if per_round.len() > 1 {
        for (i, r) in per_round.iter().enumerate() {
            out.push(format!(
                "round {}: ceilings ratio_vs_naive_at_64<={:.2} ratio_vs_raw_seq_64k<={:.2}; \
                 ratio_vs_naive_at_64={:.2} ratio_vs_raw_seq_64k={:.2}",
                i + 1,
                r.x_max,
                r.y_max,
                r.x,
                r.y
            ));
        }
    }
    let what = if per_round.len() > 1 {
        format!("medians over {} rounds", per_round.len())
    } else {
        "this run".to_string()
    };
    out.push(format!(
        "ceilings on this disk (same appenders with no CPU; {what}): \
         ratio_vs_naive_at_64<={:.2} ratio_vs_raw_seq_64k<={:.2}",
        med(|r| r.x_max),
        med(|r| r.y_max)
    ));
    out.push(format!(
        "ratio_vs_naive_at_64={:.2} ratio_vs_raw_seq_64k={:.2}",
        med(|r| r.x),
        med(|r| r.y)
    ));
    out
}

/// The ratios of one round's rows, and the bounds its ceiling rows set.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ratios {
    x: f64,
    y: f64,
    x_max: f64,
    y_max: f64,
}

impl Ratios {
    /// NaN where a cell the ratio needs is missing.
    fn of(rows: &[Row]) -> Ratios {
        let find = |mode: &str, size: usize, n: usize| {
            rows.iter()
                .find(|r| r.mode == mode && r.entry_bytes == size && r.appenders == n)
        };
        let naive = find("naive", 4096, 64).map_or(f64::NAN, |r| r.appends_per_s);
        let raw = rows
            .iter()
            .filter(|r| r.mode.starts_with("raw"))
            .map(|r| r.mb_per_s)
            .fold(f64::NAN, f64::max);
        let best = |entry: usize| {
            rows.iter()
                .filter(|r| r.mode.starts_with("ceiling") && r.entry_bytes == entry)
                .map(|r| r.appends_per_s)
                .fold(f64::NAN, f64::max)
        };
        Ratios {
            x: find("wal", 4096, 64).map_or(f64::NAN, |w| w.appends_per_s / naive),
            y: find("wal", 65536, 64).map_or(f64::NAN, |w| w.mb_per_s / raw),
            x_max: best(4096) / naive,
            y_max: best(65536) * 65536.0 / 1e6 / raw,
        }
    }
}

/// The WAL cells of one round: every size x appender count, in one shared
/// directory brought to its steady state first (or each in a fresh one).
fn wal_cells(root: &Path, a: &WalArgs, setup: &WalSetup) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let mut cell = 0;
    let shared_dir = root.join("wal");
    if !a.fresh {
        let _ = std::fs::remove_dir_all(&shared_dir);
        warm_up(&shared_dir, setup)?;
    }
    for &size in &a.sizes {
        for &n in &a.appenders {
            cell += 1;
            let r = if a.fresh {
                let dir = root.join(format!("wal-{cell}"));
                let r = wal_cell(&dir, size, n, cell, setup)?;
                let _ = std::fs::remove_dir_all(&dir);
                r
            } else {
                wal_cell(&shared_dir, size, n, cell, setup)?
            };
            progress(&r, a.json);
            rows.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&shared_dir);
    Ok(rows)
}

/// The baselines and ceilings of one round. `wal_64k_mb_per_s`: the 64 KiB
/// x 64 WAL cell's rate, which sets how many bytes the raw cells write.
fn baseline_cells(root: &Path, a: &WalArgs, wal_64k_mb_per_s: Option<f64>) -> Res<Vec<Row>> {
    let dur = Duration::from_secs_f64(a.seconds);
    let mut rows = Vec::new();
    for n in [1usize, 64] {
        let r = naive_cell(&root.join("naive"), 4096, n, dur)?;
        progress(&r, a.json);
        rows.push(r);
    }
    // Same bytes as the 64 KiB x 64 WAL cell, within 64 MiB..2 GiB.
    let total = wal_64k_mb_per_s.map_or(256 << 20, |mb| {
        ((mb * 1e6 * a.seconds) as u64).clamp(64 << 20, 2 << 30)
    });
    let raw_path = root.join("raw");
    // The buffered pass writes the file; the direct passes then overwrite
    // written blocks, as the WAL does in reused segment files.
    for (direct, chunk, depth) in [
        (false, 64 << 10, 1),
        (true, 64 << 10, 1),
        (true, 1 << 20, 4),
    ] {
        match raw_seq_cell(&raw_path, total, direct, chunk, depth) {
            Ok(r) => {
                progress(&r, a.json);
                rows.push(r);
            }
            Err(e) if direct => eprintln!("raw O_DIRECT skipped: {e}"),
            Err(e) => return Err(e),
        }
    }
    // Ceilings: the same disk writes with a flush each (O_DSYNC), in the two
    // shapes the ratios are about (module docs).
    for (chunk, depth, entry) in [
        // Every flush carrying all 64 appenders' 4 KiB entries, split over
        // `depth` batches on the disk at once: the X ceiling.
        (64 * 4096, 1, 4096),
        (32 * 4096, 2, 4096),
        (16 * 4096, 4, 4096),
        // The 64 KiB x 64 cell's 4 MiB in flight as four 1 MiB durable
        // writes: the Y ceiling.
        (1 << 20, 4, 65536),
    ] {
        match ceiling_cell(&raw_path, total, chunk, depth, entry) {
            Ok(r) => {
                progress(&r, a.json);
                rows.push(r);
            }
            Err(e) => eprintln!("ceiling ({chunk} B x{depth}) skipped: {e}"),
        }
    }
    // The other design: flushes shared by every batch written before them.
    for writers in [1, 2] {
        match shared_flush_cell(&raw_path, total, dur, 64, 4096, writers) {
            Ok(r) => {
                progress(&r, a.json);
                rows.push(r);
            }
            Err(e) => eprintln!("shared-flush ceiling (writes x{writers}) skipped: {e}"),
        }
    }
    let _ = std::fs::remove_file(&raw_path);
    Ok(rows)
}

fn progress(r: &Row, json: bool) {
    if !json {
        eprintln!(
            "  done: {} {} B x{}: {:.0} appends/s",
            r.mode, r.entry_bytes, r.appenders, r.appends_per_s
        );
    }
}

fn print_table(rows: &[Row]) {
    let rounds = rows.iter().any(|r| r.round.is_some());
    let (head, sep) = if rounds {
        ("| round ", "|---")
    } else {
        ("", "")
    };
    println!(
        "{head}| mode | entry | appenders | appends/s | MB/s | fsyncs/s | mean batch | max in flight | disk us/batch | cpu us/append | segments reused/zero-filled | p50 us | p99 us | p99.9 us |"
    );
    println!("{sep}|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let wal = r.mode.starts_with("wal");
        let recovery = r.mode.starts_with("recovery");
        if let Some(round) = r.round {
            print!("| {round} ");
        }
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            if r.entry_bytes >= 1024 {
                format!("{} KiB", r.entry_bytes / 1024)
            } else {
                format!("{} B", r.entry_bytes)
            },
            r.appenders,
            r.appends_per_s,
            r.mb_per_s,
            r.fsyncs_per_s,
            r.mean_batch,
            if wal {
                r.max_in_flight.to_string()
            } else {
                "-".into()
            },
            if wal {
                format!("{:.0}", r.disk_us_per_batch)
            } else {
                "-".into()
            },
            if wal || recovery {
                format!("{:.1}", r.cpu_us_per_append)
            } else {
                "-".into()
            },
            if wal {
                format!("{}/{}", r.segments_reused, r.segments_zero_filled)
            } else {
                "-".into()
            },
            r.p50_us,
            r.p99_us,
            r.p999_us
        );
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn row(
    mode: &str,
    size: usize,
    n: usize,
    count: u64,
    fsyncs: u64,
    secs: f64,
    h: &Histogram<u64>,
) -> Row {
    Row {
        round: None,
        mode: mode.into(),
        entry_bytes: size,
        appenders: n,
        appends_per_s: count as f64 / secs,
        mb_per_s: count as f64 * size as f64 / secs / 1e6,
        fsyncs_per_s: fsyncs as f64 / secs,
        mean_batch: if fsyncs == 0 {
            0.0
        } else {
            count as f64 / fsyncs as f64
        },
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_in_flight: 0,
        cpu_us_per_append: 0.0,
        disk_us_per_batch: 0.0,
        segments_reused: 0,
        segments_zero_filled: 0,
    }
}

/// WAL settings of every cell.
struct WalSetup {
    groups: u64,
    dur: Duration,
    backend: IoBackend,
    in_flight: usize,
    small_in_flight: usize,
    small_batch_bytes: usize,
    direct_io: bool,
    zero_fill: bool,
    segment_bytes: u64,
    compact_bytes: u64,
}

/// Brings the WAL in `dir` to its steady state before the timed cells: two
/// untimed cells of 64 appenders of 64 KiB entries, with compaction, after
/// which segments that compaction frees wait in the free-file pool (the
/// cells' `segments reused/zero-filled` column shows whether it lasted).
fn warm_up(dir: &Path, s: &WalSetup) -> Res<()> {
    for cell in 0..2 {
        wal_cell(dir, 64 << 10, 64, 1000 + cell, s)?;
    }
    Ok(())
}

fn wal_config(dir: &Path, size: usize, n: usize, s: &WalSetup) -> WalConfig {
    let mut cfg = WalConfig::new(dir);
    cfg.direct_io = s.direct_io;
    cfg.segment_zero_fill = s.zero_fill;
    cfg.io_backend = s.backend;
    cfg.batches_in_flight_max = s.in_flight;
    cfg.small_batches_in_flight_max = s.small_in_flight;
    cfg.small_batch_bytes_max = s.small_batch_bytes;
    cfg.log_segment_bytes_max = s.segment_bytes;
    cfg.batch_bytes_max = (8 << 20).min(s.segment_bytes as usize / 4);
    cfg.segments_soft_max = 8;
    cfg.entry_cache_bytes_max = 64 << 20;
    // Large enough that no appender ever waits for buffer space: each
    // group's indexes are handed out in submission order, which waiting
    // could reorder.
    cfg.append_buffer_bytes_max = (n * (size + 256) * 2).max(64 << 20);
    cfg
}

/// A WAL opened with `cfg`, a producer handle, and the current_thread
/// runtime and local set its writer and appenders run on (as on a core).
fn on_a_core(
    cfg: WalConfig,
) -> Res<(
    Rc<RefCell<Wal>>,
    wal::WalHandle,
    tokio::runtime::Runtime,
    tokio::task::LocalSet,
)> {
    let w = Rc::new(RefCell::new(Wal::open(cfg).map_err(|e| e.to_string())?));
    let h = w.borrow().handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok((w, h, rt, tokio::task::LocalSet::new()))
}

/// N appender tasks and the WAL writer on one current_thread runtime. The
/// cell's groups are numbered from `cell * 1_000_000` and removed at the
/// end, so cells sharing a directory do not see each other's.
fn wal_cell(dir: &Path, size: usize, n: usize, cell: u64, s: &WalSetup) -> Res<Row> {
    let (groups, dur) = (s.groups, s.dur);
    let base = cell * 1_000_000;
    let (w, h, rt, local) = on_a_core(wal_config(dir, size, n, s))?;
    let backend = w.borrow().status().backend;
    let next: Rc<RefCell<Vec<u64>>> = Rc::new(RefCell::new(vec![1; groups as usize]));
    let payload = Bytes::from(vec![0xa5u8; size]);
    let hist_all = Rc::new(RefCell::new(hist()));
    let count = Rc::new(RefCell::new(0u64));
    let stop = Rc::new(std::cell::Cell::new(false));
    let cpu = RefCell::new(Duration::ZERO);
    // Appends of one appender between its compactions.
    let compact_every = (s.compact_bytes > 0).then(|| (s.compact_bytes / (n * size) as u64).max(1));
    let (secs, fsyncs, (max_in_flight, disk_us), segs) = local.block_on(&rt, async {
        let writer = tokio::task::spawn_local(wal::run(w.clone()));
        let st0 = w.borrow().status();
        let fs0 = st0.fsyncs;
        let t0 = Instant::now();
        let cpu0 = thread_cpu();
        let mut tasks = Vec::new();
        for i in 0..n {
            let (h, next, payload, hist_all, count, stop) = (
                h.clone(),
                next.clone(),
                payload.clone(),
                hist_all.clone(),
                count.clone(),
                stop.clone(),
            );
            let g = i as u64 % groups;
            tasks.push(tokio::task::spawn_local(async move {
                let mut local_hist = hist();
                let mut done = 0u64;
                while !stop.get() {
                    let index = {
                        let mut nx = next.borrow_mut();
                        let v = nx[g as usize];
                        nx[g as usize] += 1;
                        v
                    };
                    let e = Entry {
                        index,
                        term: 1,
                        kind: EntryKind::Normal,
                        data: payload.clone(),
                    };
                    let t = Instant::now();
                    h.append(base + g, vec![e]).await.expect("append");
                    let _ = local_hist.record(t.elapsed().as_micros().max(1) as u64);
                    done += 1;
                    // Every entry of the group up to `index` is durable now
                    // (a group's batches are acknowledged in order).
                    if compact_every.is_some_and(|k| done.is_multiple_of(k)) {
                        // As the engine does (`persist`): the compaction is
                        // queued ahead of the group's next append and only
                        // that append is waited for, not a durable round
                        // trip of its own.
                        let op = WalOp::Compact {
                            group: base + g,
                            index,
                            term: 1,
                        };
                        drop(h.submit(op).await.expect("compact"));
                    }
                }
                hist_all.borrow_mut().add(&local_hist).expect("same bounds");
                *count.borrow_mut() += done;
            }));
        }
        tokio::time::sleep(dur).await;
        stop.set(true);
        for t in tasks {
            t.await.expect("appender");
        }
        let secs = t0.elapsed().as_secs_f64();
        *cpu.borrow_mut() = thread_cpu() - cpu0;
        let st = w.borrow().status();
        let fsyncs = st.fsyncs - fs0;
        let disk_us = (st.batch_disk_us - st0.batch_disk_us) as f64
            / (st.batches - st0.batches).max(1) as f64;
        let segs = (
            st.recycled_segments - st0.recycled_segments,
            st.zero_filled_segments - st0.zero_filled_segments,
        );
        // Leave nothing pinned for the next cell sharing the directory.
        for g in 0..groups {
            h.remove_group(base + g).await.expect("remove group");
        }
        h.shutdown();
        writer.await.expect("writer").expect("wal writer");
        (secs, fsyncs, (st.batches_in_flight_seen_max, disk_us), segs)
    });
    drop(h);
    if let Ok(w) = Rc::try_unwrap(w) {
        w.into_inner().close().map_err(|e| e.to_string())?;
    }
    let c = *count.borrow();
    let mut r = row("wal", size, n, c, fsyncs, secs, &hist_all.borrow());
    r.max_in_flight = max_in_flight;
    r.disk_us_per_batch = disk_us;
    (r.segments_reused, r.segments_zero_filled) = segs;
    r.cpu_us_per_append = cpu.borrow().as_secs_f64() * 1e6 / c.max(1) as f64;
    if backend != "io_uring" {
        r.mode = format!("wal ({backend})");
    }
    Ok(r)
}

/// Opens of the restart cell; the row gives their median.
const RECOVERY_OPENS: usize = 3;

/// The restart cell: `bytes` of 4 KiB entries, one per record, appended by
/// 64 tasks over the setup's groups and never compacted, the WAL closed;
/// then `Wal::open` on it [`RECOVERY_OPENS`] times. Zero-fill is off here
/// so the row measures reading the log, not preparing the next segment.
/// appends/s and MB/s are entries and entry bytes recovered per second of
/// the median open; p50/p99/p99.9 are the median and slowest open in
/// microseconds; cpu us/append is that open's thread CPU per entry.
fn recovery_cell(dir: &Path, bytes: u64, s: &WalSetup) -> Res<Row> {
    const SIZE: usize = 4096;
    const TASKS: u64 = 64;
    let _ = std::fs::remove_dir_all(dir);
    let mut cfg = wal_config(dir, SIZE, TASKS as usize, s);
    cfg.segment_zero_fill = false;
    let entries = (bytes / SIZE as u64).max(TASKS);
    let groups = s.groups.min(entries);
    let (w, h, rt, local) = on_a_core(cfg.clone())?;
    let payload = Bytes::from(vec![0x3cu8; SIZE]);
    local.block_on(&rt, async {
        let writer = tokio::task::spawn_local(wal::run(w.clone()));
        let next = Rc::new(RefCell::new(vec![1u64; groups as usize]));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (h, next, payload) = (h.clone(), next.clone(), payload.clone());
                tokio::task::spawn_local(async move {
                    // Task t appends entries t, t + TASKS, ... of the total.
                    for i in (t..entries).step_by(TASKS as usize) {
                        let g = i % groups;
                        let index = {
                            let mut nx = next.borrow_mut();
                            nx[g as usize] += 1;
                            nx[g as usize] - 1
                        };
                        let e = Entry {
                            index,
                            term: 1,
                            kind: EntryKind::Normal,
                            data: payload.clone(),
                        };
                        h.append(g, vec![e]).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        h.shutdown();
        writer
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    })?;
    drop(h);
    match Rc::try_unwrap(w) {
        Ok(w) => w.into_inner().close().map_err(|e| e.to_string())?,
        Err(_) => {
            return Err("recovery cell: the WAL is still shared after its writer ended".into())
        }
    }
    let mut opens = Vec::new();
    for _ in 0..RECOVERY_OPENS {
        let cpu0 = thread_cpu();
        let t = Instant::now();
        let w = Wal::open(cfg.clone()).map_err(|e| format!("reopen {}: {e}", dir.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let cpu = (thread_cpu() - cpu0).as_secs_f64();
        let st = w.status();
        w.close().map_err(|e| e.to_string())?;
        if st.groups as u64 != groups {
            return Err(format!(
                "recovery cell: {} groups after reopening {}, expected {groups}",
                st.groups,
                dir.display()
            ));
        }
        opens.push((secs, cpu));
    }
    let _ = std::fs::remove_dir_all(dir);
    opens.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (secs, cpu) = opens[opens.len() / 2];
    let slowest = opens[opens.len() - 1].0;
    let mut r = row("recovery: Wal::open", SIZE, 0, entries, 0, secs, &hist());
    r.p50_us = (secs * 1e6) as u64;
    r.p99_us = (slowest * 1e6) as u64;
    r.p999_us = r.p99_us;
    r.cpu_us_per_append = cpu * 1e6 / entries as f64;
    Ok(r)
}

/// `path` opened for writing (`O_DIRECT`, `O_DSYNC` as asked), preallocated
/// to `total` bytes first unless it already holds that many.
fn sized_file(path: &Path, total: u64, direct: bool, dsync: bool) -> Res<File> {
    let exists = std::fs::metadata(path).is_ok_and(|m| m.len() >= total);
    if !exists && !dsync {
        return prealloc(path, total, direct);
    }
    if !exists {
        // Preallocated first, then opened again with O_DSYNC.
        drop(prealloc(path, total, direct)?);
    }
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    o.custom_flags(if direct { libc::O_DIRECT } else { 0 } | if dsync { libc::O_DSYNC } else { 0 });
    o.open(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn prealloc(path: &Path, bytes: u64, direct: bool) -> Res<File> {
    let _ = std::fs::remove_file(path);
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) } != 0 {
        return Err(format!(
            "fallocate {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(f)
}

/// One write + fdatasync per append, from `n` threads at once.
fn naive_cell(path: &Path, size: usize, n: usize, dur: Duration) -> Res<Row> {
    let cap: u64 = 1 << 30;
    let f = Arc::new(prealloc(path, cap, false)?);
    let off = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let all = Arc::new(Mutex::new((hist(), 0u64)));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (f, off, stop, all) = (f.clone(), off.clone(), stop.clone(), all.clone());
            std::thread::spawn(move || {
                let buf = vec![0x5au8; size];
                let mut h = hist();
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let o = off.fetch_add(size as u64, Ordering::Relaxed) % (cap - size as u64);
                    let t = Instant::now();
                    f.write_all_at(&buf, o).expect("naive write");
                    f.sync_data().expect("naive fdatasync");
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    done += 1;
                }
                let mut a = all.lock().unwrap();
                a.0.add(&h).expect("same bounds");
                a.1 += done;
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| "naive thread panicked".to_string())?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    let a = all.lock().unwrap();
    Ok(row("naive", size, n, a.1, a.1, secs, &a.0))
}

/// `total` bytes of `chunk`-sized sequential writes, `depth` of them at once
/// (threads taking the next offset in turn), then one fdatasync. The file
/// is created (preallocated) unless it exists with at least `total` bytes.
fn raw_seq_cell(path: &Path, total: u64, direct: bool, chunk: usize, depth: usize) -> Res<Row> {
    seq_cell(path, total, direct, false, chunk, depth)
}

/// A ceiling row: `chunk`-sized O_DIRECT + O_DSYNC writes (each one durable
/// on its own, like a WAL batch), `depth` at once, for about as many bytes
/// as the raw cells (at least 64 MiB, at most 1 GiB). Counted in entries of
/// `entry` bytes: one write stands for `chunk / entry` appends.
fn ceiling_cell(path: &Path, total: u64, chunk: usize, depth: usize, entry: usize) -> Res<Row> {
    let r = seq_cell(
        path,
        total.clamp(64 << 20, 1 << 30),
        true,
        true,
        chunk,
        depth,
    )?;
    let per = (chunk / entry) as f64;
    let mut c = r.clone();
    c.mode = format!("ceiling: {} KiB durable writes x{depth}", chunk >> 10);
    c.entry_bytes = entry;
    c.appenders = (chunk / entry) * depth;
    c.appends_per_s = r.appends_per_s * per;
    c.fsyncs_per_s = r.appends_per_s;
    c.mean_batch = per;
    Ok(c)
}

/// Where the shared-flush ceiling's appenders are: waiting to be written,
/// written and waiting for a flush that starts after their write ended.
struct SharedFlush {
    /// Since when each waiting appender has waited (its append began).
    pending: Vec<Instant>,
    written: Vec<Instant>,
    next_offset: u64,
    acked: u64,
    flushes: u64,
    stop: bool,
    error: Option<String>,
    h: Histogram<u64>,
}

/// A ceiling row for the other way a log can make appends durable: not a
/// flush per batch (the O_DSYNC rows) but flushes shared by every batch
/// written before them. A closed loop of `n` appenders that cost no CPU:
/// `writers` threads each take every waiting entry (the pending batch) and
/// write it as one O_DIRECT write without a flush; one thread runs
/// fdatasync back to back, and each one acknowledges every entry whose
/// write had completed before it began; those appenders append again at
/// once. Runs for `dur` over `total` bytes of `path` (the written raw file,
/// overwritten from the start again when it is full).
fn shared_flush_cell(
    path: &Path,
    total: u64,
    dur: Duration,
    n: usize,
    entry: usize,
    writers: usize,
) -> Res<Row> {
    let batch_max = n * entry;
    let total = total.max(batch_max as u64) / 4096 * 4096;
    let f = Arc::new(sized_file(path, total, true, false)?);
    let t0 = Instant::now();
    let state = Arc::new((
        Mutex::new(SharedFlush {
            pending: vec![t0; n],
            written: Vec::new(),
            next_offset: 0,
            acked: 0,
            flushes: 0,
            stop: false,
            error: None,
            h: hist(),
        }),
        std::sync::Condvar::new(),
    ));
    let fail = |st: &mut SharedFlush, e: String| {
        st.error.get_or_insert(e);
        st.stop = true;
    };
    let mut threads = Vec::new();
    for _ in 0..writers {
        let (f, state) = (f.clone(), state.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = AlignedBuf::default();
            buf.resize(batch_max, 0x3c);
            let (lock, cv) = &*state;
            let mut st = lock.lock().unwrap();
            loop {
                while st.pending.is_empty() && !st.stop {
                    st = cv.wait(st).unwrap();
                }
                if st.stop {
                    break;
                }
                let batch = std::mem::take(&mut st.pending);
                let len = (batch.len() * entry) as u64;
                if st.next_offset + len > total {
                    st.next_offset = 0;
                }
                let off = st.next_offset;
                st.next_offset += len;
                drop(st);
                let res = f.write_all_at(&buf[..len as usize], off);
                st = lock.lock().unwrap();
                match res {
                    Ok(()) => st.written.extend(batch),
                    Err(e) => fail(&mut st, format!("shared-flush write at {off}: {e}")),
                }
                cv.notify_all();
            }
        }));
    }
    {
        let (f, state) = (f.clone(), state.clone());
        threads.push(std::thread::spawn(move || {
            let (lock, cv) = &*state;
            let mut st = lock.lock().unwrap();
            loop {
                while st.written.is_empty() && !st.stop {
                    st = cv.wait(st).unwrap();
                }
                if st.stop {
                    break;
                }
                // Only what was written before the flush begins is durable after it.
                let covered = std::mem::take(&mut st.written);
                drop(st);
                let res = f.sync_data();
                let now = Instant::now();
                st = lock.lock().unwrap();
                if let Err(e) = res {
                    fail(&mut st, format!("shared-flush fdatasync: {e}"));
                    break;
                }
                st.flushes += 1;
                st.acked += covered.len() as u64;
                for since in &covered {
                    let _ = st.h.record((now - *since).as_micros().max(1) as u64);
                }
                st.pending.extend(std::iter::repeat_n(now, covered.len()));
                cv.notify_all();
            }
        }));
    }
    std::thread::sleep(dur);
    let (acked, flushes, secs) = {
        let mut st = state.0.lock().unwrap();
        st.stop = true;
        state.1.notify_all();
        (st.acked, st.flushes, t0.elapsed().as_secs_f64())
    };
    for t in threads {
        t.join()
            .map_err(|_| "shared-flush thread panicked".to_string())?;
    }
    let st = state.0.lock().unwrap();
    if let Some(e) = &st.error {
        return Err(e.clone());
    }
    let mode = format!("ceiling: shared flushes, writes x{writers}");
    Ok(row(&mode, entry, n, acked, flushes, secs, &st.h))
}

fn seq_cell(
    path: &Path,
    total: u64,
    direct: bool,
    dsync: bool,
    chunk: usize,
    depth: usize,
) -> Res<Row> {
    let total = total.div_ceil(chunk as u64) * chunk as u64;
    let f = Arc::new(sized_file(path, total, direct, dsync)?);
    let next = Arc::new(AtomicU64::new(0));
    let all = Arc::new(Mutex::new(hist()));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..depth)
        .map(|_| {
            let (f, next, all) = (f.clone(), next.clone(), all.clone());
            std::thread::spawn(move || -> Res<()> {
                // O_DIRECT needs an aligned buffer; 4 KiB alignment suits every disk.
                let mut buf = AlignedBuf::default();
                buf.resize(chunk, 0x3c);
                let mut h = hist();
                let mut res = Ok(());
                loop {
                    let o = next.fetch_add(chunk as u64, Ordering::Relaxed);
                    if o >= total {
                        break;
                    }
                    let t = Instant::now();
                    if let Err(e) = f.write_all_at(&buf, o) {
                        res = Err(format!("raw write at {o}: {e}"));
                        break;
                    }
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
                all.lock().unwrap().add(&h).expect("same bounds");
                res
            })
        })
        .collect();
    let mut res = Ok(());
    for t in threads {
        let r = t.join().map_err(|_| "raw writer panicked".to_string())?;
        res = res.and(r);
    }
    res?;
    f.sync_data().map_err(|e| format!("raw fdatasync: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let mode = match (direct, depth) {
        (false, _) => "raw seq buffered+fdatasync".to_string(),
        (true, 1) => "raw seq O_DIRECT".to_string(),
        (true, d) => format!("raw seq O_DIRECT x{d}"),
    };
    let h = all.lock().unwrap();
    let mut r = row(&mode, chunk, depth, total / chunk as u64, 1, secs, &h);
    r.mean_batch = 0.0;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        wal: WalArgs,
    }

    fn args(a: &[&str]) -> WalArgs {
        Cli::try_parse_from(std::iter::once("wal").chain(a.iter().copied()))
            .unwrap()
            .wal
    }
    use raftlog::storage::LogStore;

    #[test]
    fn the_restart_cell_reopens_every_group_and_counts_every_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let r = recovery_cell(&dir, 6 << 20, &setup()).unwrap();
        assert_eq!(r.mode, "recovery: Wal::open");
        assert_eq!((r.entry_bytes, r.appenders), (4096, 0));
        let secs = r.p50_us as f64 / 1e6;
        let entries = r.appends_per_s * secs;
        assert!(
            (entries - 1536.0).abs() < 2.0,
            "{entries} entries recovered"
        );
        assert!(r.p50_us > 0 && r.p50_us <= r.p99_us, "{r:?}");
        assert!(r.cpu_us_per_append > 0.0);
        assert!(!dir.exists(), "the cell removes its directory");
    }

    fn setup() -> WalSetup {
        WalSetup {
            groups: 8,
            dur: Duration::from_millis(300),
            backend: IoBackend::Auto,
            in_flight: 4,
            small_in_flight: 2,
            small_batch_bytes: 256 << 10,
            direct_io: true,
            zero_fill: true,
            segment_bytes: 4 << 20,
            compact_bytes: 1 << 20,
        }
    }

    #[test]
    fn cells_in_a_warmed_directory_reuse_segment_files_and_leave_no_groups() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let s = setup();
        warm_up(&dir, &s).unwrap();
        let r = wal_cell(&dir, 64 << 10, 8, 1, &s).unwrap();
        assert!(r.appends_per_s > 0.0 && r.fsyncs_per_s > 0.0, "{r:?}");
        assert!(r.segments_reused > 0, "{r:?}");
        let w = Wal::open(wal_config(&dir, 4096, 8, &s)).unwrap();
        for g in 0..s.groups {
            assert!(
                w.group_state(1_000_000 + g).is_none(),
                "group {g} left behind"
            );
        }
        w.close().unwrap();
    }

    #[test]
    fn raw_cells_write_every_byte_at_every_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("raw");
        let total = 8u64 << 20;
        let r = raw_seq_cell(&p, total, false, 64 << 10, 1).unwrap();
        assert_eq!(
            (r.mode.as_str(), r.appenders),
            ("raw seq buffered+fdatasync", 1)
        );
        // Overwrites the file just written, 4 writers at once.
        let r = raw_seq_cell(&p, total, true, 1 << 20, 4).unwrap();
        assert_eq!((r.mode.as_str(), r.appenders), ("raw seq O_DIRECT x4", 4));
        assert!(r.mb_per_s > 0.0, "{r:?}");
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len() as u64, total);
        assert!(data.iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn a_ceiling_counts_every_durable_write_as_its_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("raw");
        let r = ceiling_cell(&p, 1 << 20, 256 << 10, 2, 4096).unwrap();
        assert_eq!(r.mode, "ceiling: 256 KiB durable writes x2");
        assert_eq!(
            (r.entry_bytes, r.appenders, r.mean_batch),
            (4096, 128, 64.0)
        );
        assert!(r.fsyncs_per_s > 0.0, "{r:?}");
        assert!((r.appends_per_s - 64.0 * r.fsyncs_per_s).abs() < 1e-6 * r.appends_per_s);
        // Written through: at least 64 MiB, every byte.
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len() as u64, 64 << 20);
        assert!(data.iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn the_shared_flush_ceiling_acknowledges_every_appender_after_a_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("raw");
        let r = shared_flush_cell(&p, 1 << 20, Duration::from_millis(300), 8, 4096, 2).unwrap();
        assert_eq!(r.mode, "ceiling: shared flushes, writes x2");
        assert_eq!((r.entry_bytes, r.appenders), (4096, 8));
        assert!(r.fsyncs_per_s > 0.0, "{r:?}");
        // A flush acknowledges between one entry and every appender.
        assert!((1.0..=8.0).contains(&r.mean_batch), "{r:?}");
        assert!(r.p50_us > 0 && r.p50_us <= r.p99_us, "{r:?}");
        // The writes wrapped within the file, which stays its size.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    fn at(mode: &str, entry: usize, n: usize, appends_per_s: f64, mb_per_s: f64) -> Row {
        let mut r = row(mode, entry, n, 1, 1, 1.0, &hist());
        (r.appends_per_s, r.mb_per_s) = (appends_per_s, mb_per_s);
        r
    }

    #[test]
    fn ratios_use_the_best_raw_row_and_the_best_ceiling() {
        let rows = vec![
            at("wal", 4096, 64, 200_000.0, 0.0),
            at("wal", 4096, 16, 90_000.0, 0.0),
            at("wal", 65536, 64, 0.0, 2_000.0),
            at("naive", 4096, 64, 25_000.0, 0.0),
            at("naive", 4096, 1, 5_000.0, 0.0),
            at("raw seq O_DIRECT", 65536, 1, 0.0, 1_000.0),
            at("raw seq O_DIRECT x4", 1 << 20, 4, 0.0, 4_000.0),
            at(
                "ceiling: 256 KiB durable writes x1",
                4096,
                64,
                300_000.0,
                0.0,
            ),
            at(
                "ceiling: 128 KiB durable writes x2",
                4096,
                64,
                350_000.0,
                0.0,
            ),
            at(
                "ceiling: 1024 KiB durable writes x4",
                65536,
                64,
                50_000.0,
                0.0,
            ),
        ];
        let r = Ratios::of(&rows);
        assert_eq!((r.x, r.y), (8.0, 0.5));
        assert_eq!(r.x_max, 14.0);
        assert!((r.y_max - 50_000.0 * 65536.0 / 1e6 / 4_000.0).abs() < 1e-9);
        // A missing cell gives NaN, never a ratio against something else.
        let r = Ratios::of(&rows[..3]);
        assert!(r.x.is_nan() && r.y.is_nan() && r.x_max.is_nan() && r.y_max.is_nan());
    }

    #[test]
    fn rounds_alternate_the_order_and_tag_their_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let a = args(&[
            "--dir",
            tmp.path().to_str().unwrap(),
            "--seconds",
            "0.2",
            "--appenders",
            "4",
            "--sizes",
            "4096",
            "--rounds",
            "2",
            "--compact-mib",
            "1",
            "--segment-mib",
            "8",
        ]);
        let (rows, per_round) = measure(&a).unwrap();
        assert_eq!(per_round.len(), 2);
        let modes = |round: usize| -> Vec<&str> {
            rows.iter()
                .filter(|r| r.round == Some(round))
                .map(|r| r.mode.as_str())
                .collect()
        };
        // Round 1 measures the WAL first, round 2 the baselines first.
        assert_eq!(modes(1)[0], "wal");
        assert_eq!(modes(2)[0], "naive");
        assert_eq!(modes(1).len(), modes(2).len());
        assert!(rows.iter().all(|r| r.round.is_some()));
        assert_eq!(
            run(args(&["--rounds", "0"])).unwrap_err(),
            "--rounds must be > 0"
        );
    }

    #[test]
    fn the_last_line_is_the_median_of_the_rounds() {
        let r = |x: f64, y: f64| Ratios {
            x,
            y,
            x_max: 2.0 * x,
            y_max: 1.0,
        };
        let lines = ratio_lines(&[r(8.0, 0.5), r(12.0, 0.9), r(9.0, 0.7)]);
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("round 1: "), "{lines:?}");
        assert!(
            lines[3].contains("ratio_vs_naive_at_64<=18.00"),
            "{lines:?}"
        );
        assert_eq!(
            lines[4],
            "ratio_vs_naive_at_64=9.00 ratio_vs_raw_seq_64k=0.70"
        );
        let one = ratio_lines(&[r(8.0, 0.5)]);
        assert_eq!(one.len(), 2);
        assert_eq!(
            one[1],
            "ratio_vs_naive_at_64=8.00 ratio_vs_raw_seq_64k=0.50"
        );
    }
}
