//! bd's NBD server against stock clients nobody on the team wrote: libnbd's `nbdinfo` and
//! `nbdcopy`, qemu's `qemu-io` and `qemu-img`, and fio's nbd engine.
//!
//! Every test starts its own server on 127.0.0.1:0 inside the test process and checks the data
//! twice: through the client (pattern verification, `qemu-img compare`, fio verify) and directly
//! in the backend, so a client bug cannot hide a server bug. A missing tool fails the test with
//! the Debian package to install (CI installs them from `.ci/apt-packages`).

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use server::nbd::{
    BackendResult, BlockBackend, Exports, FileBackend, MemBackend, NbdConfig, NbdServerHandle,
};

/// Longest any single tool run may take before the test fails.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Path of `name` in PATH, or a test failure naming the package that provides it.
fn tool(name: &str) -> PathBuf {
    let package = match name {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "fio" => "fio",
        other => other,
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests need real NBD clients. \
                 Install the Debian package `{package}` (all of them: .ci/apt-packages)"
            )
        })
}

/// Runs a tool to completion (killing it after `TOOL_TIMEOUT`).
async fn run(name: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(tool(name));
    cmd.args(args).kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`{name} {}` did not finish in {TOOL_TIMEOUT:?}",
                args.join(" ")
            )
        })
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    tracing::debug!(tool = name, elapsed = ?started.elapsed(), "tool finished");
    out
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool that must succeed; returns its stdout.
async fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args).await;
    assert!(
        out.status.success(),
        "`{name} {}` failed:\n{}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands against an export and fails on any error or pattern mismatch (qemu-io
/// exits 0 even when a command fails, so its output is checked too).
async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args).await;
    let all = text(&out);
    assert!(out.status.success(), "qemu-io failed:\n{all}");
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        assert!(!all.contains(bad), "qemu-io reported `{bad}`:\n{all}");
    }
    all
}

/// Counts what reached the backend, so a test can check that a client really sent the command
/// it was asked to (qemu may emulate or skip some).
#[derive(Default, Debug)]
struct Counts {
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes_may_trim: AtomicU64,
    zeroes_no_hole: AtomicU64,
}

struct Counting<B> {
    inner: B,
    counts: Counts,
}

impl<B> Counting<B> {
    fn new(inner: B) -> Self {
        Self {
            inner,
            counts: Counts::default(),
        }
    }

    fn get(&self, f: impl Fn(&Counts) -> &AtomicU64) -> u64 {
        f(&self.counts).load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl<B: BlockBackend> BlockBackend for Counting<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn flush_covers_all_connections(&self) -> bool {
        self.inner.flush_covers_all_connections()
    }
    fn can_fast_zero(&self, may_trim: bool) -> bool {
        self.inner.can_fast_zero(may_trim)
    }
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        bump(&self.counts.writes);
        if fua {
            bump(&self.counts.fua_writes);
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> BackendResult<()> {
        bump(&self.counts.flushes);
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        bump(&self.counts.trims);
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        bump(if may_trim {
            &self.counts.zeroes_may_trim
        } else {
            &self.counts.zeroes_no_hole
        });
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }
}

struct Server<B: BlockBackend> {
    handle: NbdServerHandle,
    exports: Arc<Exports<B>>,
}

impl<B: BlockBackend> Server<B> {
    async fn start(exports: Vec<(&str, B)>) -> Self {
        init_tracing();
        let registry = Arc::new(Exports::new());
        for (name, backend) in exports {
            registry.insert(name, Arc::new(backend));
        }
        let handle = NbdServerHandle::start(
            "127.0.0.1:0".parse().unwrap(),
            registry.clone(),
            NbdConfig::default(),
        )
        .await
        .expect("start NBD server");
        Self {
            handle,
            exports: registry,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.handle.local_addr())
    }

    fn backend(&self, export: &str) -> Arc<B> {
        use server::nbd::ExportRegistry;
        self.exports.lookup(export).expect("export exists")
    }

    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.handle.shutdown())
            .await
            .expect("server shut down within 10 s");
    }
}

async fn read_backend<B: BlockBackend>(b: &B, offset: u64, len: u64) -> Bytes {
    b.read(offset, len as u32).await.expect("backend read")
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The value of `key: value` in nbdinfo's text output for one export.
fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(": "))
        .next()
        .unwrap_or_else(|| panic!("nbdinfo output has no `{key}`:\n{info}"))
        .split(' ')
        .next()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_reports_size_and_flags() {
    let srv = Server::start(vec![
        ("bg0", MemBackend::new(16 * MIB)),
        ("ro", MemBackend::read_only_from(&[1u8; 4096])),
    ])
    .await;
    let addr = srv.handle.local_addr();

    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{addr}")]).await;
    assert!(
        list.contains("export=\"bg0\"") && list.contains("export=\"ro\""),
        "{list}"
    );

    let rw = run_ok("nbdinfo", &[&srv.uri("bg0")]).await;
    let expect = [
        ("export-size", "16777216"),
        ("is_read_only", "false"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        ("can_fast_zero", "true"),
        ("can_multi_conn", "true"),
        ("can_df", "false"),
        ("block_size_minimum", "1"),
        ("block_size_preferred", "4096"),
        ("block_size_maximum", "33554432"),
    ];
    for (key, value) in expect {
        assert_eq!(field(&rw, key), value, "{key} in:\n{rw}");
    }

    let ro = run_ok("nbdinfo", &[&srv.uri("ro")]).await;
    for (key, value) in [
        ("export-size", "4096"),
        ("is_read_only", "true"),
        ("can_fua", "false"),
        ("can_trim", "false"),
        ("can_zero", "false"),
    ] {
        assert_eq!(field(&ro, key), value, "{key} in:\n{ro}");
    }

    // An unknown export gets NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT.
    let out = run("nbdinfo", &[&srv.uri("nope")]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("No such file or directory"),
        "{}",
        text(&out)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_fua_zero_discard_flush() {
    let srv = Server::start(vec![("bg0", Counting::new(MemBackend::new(8 * MIB)))]).await;
    let uri = srv.uri("bg0");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0xcd 1M 64k", // FUA
            "read -P 0xcd 1M 64k",
            "write -P 0x5a 2M 1M",
            "write -z 2M 512k", // WRITE_ZEROES
            "read -P 0 2M 512k",
            "read -P 0x5a 2560k 512k",
            "write -z -u 3M 256k", // WRITE_ZEROES that may punch holes
            "read -P 0 3M 256k",
            "discard 4M 1M", // TRIM
            "flush",
            // Unaligned offsets and lengths, straddling the 64 KiB chunks of the memory backend.
            "write -P 0x11 12345 67890",
            "read -P 0x11 12345 67890",
            "read -P 0xab 0 12345",
            "read -P 0xab 80235 968341",
            "write -P 0x22 8388607 1", // the very last byte
            "read -P 0x22 8388607 1",
            "aio_write -P 0x33 5M 64k",
            "aio_write -P 0x44 6M 64k",
            "aio_flush",
            "read -P 0x33 5M 64k",
            "read -P 0x44 6M 64k",
        ],
    )
    .await;

    // The same bytes, read from the backend rather than through qemu.
    let b = srv.backend("bg0");
    let head = read_backend(&*b, 0, 80235).await;
    assert!(head[..12345].iter().all(|&x| x == 0xab));
    assert!(head[12345..].iter().all(|&x| x == 0x11));
    assert!(read_backend(&*b, MIB, 64 << 10)
        .await
        .iter()
        .all(|&x| x == 0xcd));
    assert!(read_backend(&*b, 2 * MIB, 512 << 10)
        .await
        .iter()
        .all(|&x| x == 0));
    assert!(read_backend(&*b, 2 * MIB + (512 << 10), 512 << 10)
        .await
        .iter()
        .all(|&x| x == 0x5a));
    assert_eq!(&read_backend(&*b, 8 * MIB - 1, 1).await[..], &[0x22]);
    // qemu really sent each kind of command (it could have emulated zeroes with writes).
    assert!(b.get(|c| &c.fua_writes) >= 1, "{:?}", b.counts);
    assert!(b.get(|c| &c.flushes) >= 2, "{:?}", b.counts);
    assert!(b.get(|c| &c.trims) >= 1, "{:?}", b.counts);
    assert!(b.get(|c| &c.zeroes_no_hole) >= 1, "{:?}", b.counts);
    assert!(b.get(|c| &c.zeroes_may_trim) >= 1, "{:?}", b.counts);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_honours_read_only_exports() {
    let srv = Server::start(vec![("ro", MemBackend::read_only_from(&[7u8; 65536]))]).await;
    // qemu honours NBD_FLAG_READ_ONLY: a read-write open is refused, a read-only one works.
    let out = run("qemu-io", &["-f", "raw", &srv.uri("ro"), "-c", "read 0 4k"]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", &srv.uri("ro"), "-c", "read -P 7 0 64k"],
    )
    .await;
    assert!(
        out.status.success() && !text(&out).contains("failed"),
        "{}",
        text(&out)
    );

    srv.stop().await;
}

/// An 8 MiB image of random data with zero runs, so that qemu-img sends both writes and
/// write-zeroes (or trims).
fn sparse_random_image(seed: u64, len: usize) -> Vec<u8> {
    let mut img = random_bytes(seed, len);
    for (i, chunk) in img.chunks_mut(256 << 10).enumerate() {
        if i % 3 == 1 {
            chunk.fill(0);
        }
    }
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_then_compare() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("random.img");
    let img = sparse_random_image(1, 8 * MIB as usize);
    std::fs::write(&src, &img).unwrap();
    // Pre-fill the export with garbage so that skipped zero regions would show up.
    let backend = Counting::new(MemBackend::new(8 * MIB));
    backend
        .write(0, Bytes::from(vec![0xee; 8 * MIB as usize]), false)
        .await
        .unwrap();
    let srv = Server::start(vec![("bg0", backend)]).await;
    let uri = srv.uri("bg0");
    let src = src.to_str().unwrap();

    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .await;
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let back = read_backend(&*srv.backend("bg0"), 0, 8 * MIB).await;
    assert!(
        back[..] == img[..],
        "backend content differs from the source image"
    );
    // Zero runs travelled as WRITE_ZEROES, not as written zero bytes, and the copy was flushed.
    let b = srv.backend("bg0");
    assert!(
        b.get(|c| &c.zeroes_may_trim) + b.get(|c| &c.zeroes_no_hole) >= 1,
        "{:?}",
        b.counts
    );
    assert!(b.get(|c| &c.flushes) >= 1, "{:?}", b.counts);

    // compare must also be able to fail: change one byte behind qemu's back.
    srv.backend("bg0")
        .write(5 * MIB + 3, Bytes::from_static(&[0x42]), false)
        .await
        .unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_over_multiple_connections() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.img");
    let dst = dir.path().join("out.img");
    let img = sparse_random_image(2, 8 * MIB as usize);
    std::fs::write(&src, &img).unwrap();
    let srv = Server::start(vec![("bg0", MemBackend::new(8 * MIB))]).await;
    let uri = srv.uri("bg0");

    // We advertise CAN_MULTI_CONN, so nbdcopy spreads the copy over 4 connections.
    run_ok(
        "nbdcopy",
        &["--connections=4", "--flush", src.to_str().unwrap(), &uri],
    )
    .await;
    run_ok("nbdcopy", &["--connections=4", &uri, dst.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&dst).unwrap() == img,
        "nbdcopy round trip changed the data"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify() {
    let srv = Server::start(vec![("bg0", MemBackend::new(16 * MIB))]).await;
    let uri = format!("--uri={}", srv.uri("bg0"));
    let out = run_ok(
        "fio",
        &[
            "--name=randwrite",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=4",
        ],
    )
    .await;
    assert!(out.contains("err= 0") && !out.contains("bad"), "{out}");

    // Mixed sizes and a second pass reading what the first one wrote.
    run_ok(
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bsrange=512-128k",
            "--iodepth=16",
            "--size=4M",
            "--offset=8M",
            "--io_size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_persists_fua_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let backend = FileBackend::create(&path, 4 * MIB).unwrap();
    let srv = Server::start(vec![("disk", backend)]).await;
    qemu_io(
        &srv.uri("disk"),
        &[
            "write -P 0x61 0 1M",
            "write -f -P 0x62 1M 1M",
            "write -z 1536k 4k",
            "discard 2M 1M",
            "write -P 0x63 3M 4097",
            "flush",
            "read -P 0x61 0 1M",
            "read -P 0 1536k 4k",
            "read -P 0x63 3M 4097",
        ],
    )
    .await;
    srv.stop().await;
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, 4 * MIB);
    assert!(on_disk[..MIB as usize].iter().all(|&x| x == 0x61));
    assert!(on_disk[MIB as usize..1536 << 10].iter().all(|&x| x == 0x62));
    assert!(on_disk[1536 << 10..(1536 << 10) + 4096]
        .iter()
        .all(|&x| x == 0));
    assert!(on_disk[3 * MIB as usize..3 * MIB as usize + 4097]
        .iter()
        .all(|&x| x == 0x63));
}
