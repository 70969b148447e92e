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
//! entries, fsync on. The last line of output is always
//! `ratio_vs_naive_at_64=X ratio_vs_raw_seq_64k=Y`.

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
use raftlog::wal::{self, IoBackend, Wal, WalConfig};
use serde::Serialize;

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
    /// WAL writes: O_DIRECT + RWF_DSYNC (`true`) or buffered + fdatasync.
    #[arg(long, default_value_t = WalConfig::new(".").direct_io, action = clap::ArgAction::Set)]
    direct_io: bool,
    /// WAL: zero-fill the next segment in the background
    /// (`segment_zero_fill`).
    #[arg(long, default_value_t = WalConfig::new(".").segment_zero_fill, action = clap::ArgAction::Set)]
    zero_fill: bool,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
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
        direct_io: a.direct_io,
        zero_fill: a.zero_fill,
    };
    let mut rows = Vec::new();
    let mut cell = 0;
    for &size in &a.sizes {
        for &n in &a.appenders {
            cell += 1;
            let dir = root.join(format!("wal-{cell}"));
            let r = wal_cell(&dir, size, n, &setup)?;
            let _ = std::fs::remove_dir_all(&dir);
            progress(&r, a.json);
            rows.push(r);
        }
    }
    for n in [1usize, 64] {
        let r = naive_cell(&root.join("naive"), 4096, n, dur)?;
        progress(&r, a.json);
        rows.push(r);
    }
    let total = rows
        .iter()
        .find(|r| r.mode == "wal" && r.entry_bytes == 65536 && r.appenders == 64)
        .map_or(256 << 20, |r| {
            ((r.mb_per_s * 1e6 * a.seconds) as u64).max(64 << 20)
        });
    for direct in [false, true] {
        match raw_seq_cell(&root.join("raw"), total, direct) {
            Ok(r) => {
                progress(&r, a.json);
                rows.push(r);
            }
            Err(e) if direct => eprintln!("raw O_DIRECT skipped: {e}"),
            Err(e) => return Err(e),
        }
    }
    let find = |mode: &str, size: usize, n: usize| {
        rows.iter()
            .find(|r| r.mode == mode && r.entry_bytes == size && r.appenders == n)
            .cloned()
    };
    let x = match (find("wal", 4096, 64), find("naive", 4096, 64)) {
        (Some(w), Some(nv)) => w.appends_per_s / nv.appends_per_s,
        _ => f64::NAN,
    };
    let raw = rows
        .iter()
        .filter(|r| r.mode.starts_with("raw"))
        .map(|r| r.mb_per_s)
        .fold(0.0, f64::max);
    let y = find("wal", 65536, 64).map_or(f64::NAN, |w| w.mb_per_s / raw);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&rows);
    }
    println!("ratio_vs_naive_at_64={x:.2} ratio_vs_raw_seq_64k={y:.2}");
    Ok(())
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
    println!(
        "| mode | entry | appenders | appends/s | MB/s | fsyncs/s | mean batch | max in flight | disk us/batch | cpu us/append | p50 us | p99 us | p99.9 us |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let wal = r.mode.starts_with("wal");
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} |",
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
            if wal {
                format!("{:.1}", r.cpu_us_per_append)
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
    }
}

/// WAL settings of every cell.
struct WalSetup {
    groups: u64,
    dur: Duration,
    backend: IoBackend,
    in_flight: usize,
    direct_io: bool,
    zero_fill: bool,
}

/// N appender tasks and the WAL writer on one current_thread runtime.
fn wal_cell(dir: &Path, size: usize, n: usize, s: &WalSetup) -> Res<Row> {
    let (groups, dur) = (s.groups, s.dur);
    let mut cfg = WalConfig::new(dir);
    cfg.direct_io = s.direct_io;
    cfg.segment_zero_fill = s.zero_fill;
    cfg.io_backend = s.backend;
    cfg.batches_in_flight_max = s.in_flight;
    cfg.log_segment_bytes_max = 256 << 20;
    cfg.batch_bytes_max = 8 << 20;
    cfg.segments_soft_max = 8;
    cfg.entry_cache_bytes_max = 64 << 20;
    // Large enough that no appender ever waits for buffer space: each
    // group's indexes are handed out in submission order, which waiting
    // could reorder.
    cfg.append_buffer_bytes_max = (n * (size + 256) * 2).max(64 << 20);
    let w = Wal::open(cfg).map_err(|e| e.to_string())?;
    let backend = w.status().backend;
    let w = Rc::new(RefCell::new(w));
    let h = w.borrow().handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let next: Rc<RefCell<Vec<u64>>> = Rc::new(RefCell::new(vec![1; groups as usize]));
    let payload = Bytes::from(vec![0xa5u8; size]);
    let hist_all = Rc::new(RefCell::new(hist()));
    let count = Rc::new(RefCell::new(0u64));
    let stop = Rc::new(std::cell::Cell::new(false));
    let cpu = RefCell::new(Duration::ZERO);
    let (secs, fsyncs, (max_in_flight, disk_us)) = local.block_on(&rt, async {
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
                    h.append(g, vec![e]).await.expect("append");
                    let _ = local_hist.record(t.elapsed().as_micros().max(1) as u64);
                    done += 1;
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
        h.shutdown();
        writer.await.expect("writer").expect("wal writer");
        (secs, fsyncs, (st.batches_in_flight_seen_max, disk_us))
    });
    let c = *count.borrow();
    let mut r = row("wal", size, n, c, fsyncs, secs, &hist_all.borrow());
    r.max_in_flight = max_in_flight;
    r.disk_us_per_batch = disk_us;
    r.cpu_us_per_append = cpu.borrow().as_secs_f64() * 1e6 / c.max(1) as f64;
    if backend != "io_uring" {
        r.mode = format!("wal ({backend})");
    }
    Ok(r)
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

/// `total` bytes of 64 KiB sequential writes, then one fdatasync.
fn raw_seq_cell(path: &Path, total: u64, direct: bool) -> Res<Row> {
    const CHUNK: usize = 64 << 10;
    let total = total.div_ceil(CHUNK as u64) * CHUNK as u64;
    let f = prealloc(path, total, direct)?;
    // O_DIRECT needs an aligned buffer; 4 KiB alignment suits every disk.
    let layout = std::alloc::Layout::from_size_align(CHUNK, 4096).expect("valid layout");
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null(), "allocation failed");
    // SAFETY: `ptr` points to CHUNK writable bytes we own.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, CHUNK) };
    buf.fill(0x3c);
    let mut h = hist();
    let t0 = Instant::now();
    let mut res = Ok(());
    let mut o = 0u64;
    while o < total {
        let t = Instant::now();
        if let Err(e) = f.write_all_at(buf, o) {
            res = Err(format!("raw write: {e}"));
            break;
        }
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        o += CHUNK as u64;
    }
    if res.is_ok() {
        res = f.sync_data().map_err(|e| format!("raw fdatasync: {e}"));
    }
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    let _ = std::fs::remove_file(path);
    res?;
    let mode = if direct {
        "raw seq O_DIRECT"
    } else {
        "raw seq buffered+fdatasync"
    };
    Ok(row(mode, CHUNK, 1, total / CHUNK as u64, 1, secs, &h))
}
