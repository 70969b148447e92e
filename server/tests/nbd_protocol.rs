//! bd's NBD server at the byte level, with a minimal client written here: option errors, the
//! errno of every kind of bad request, pipelining and concurrency, limits, shutdown, and seeded
//! garbage and truncated input. What real clients do is covered by `nbd_clients.rs`; this file
//! covers what they never send.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mangled;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use server::nbd::proto::*;
use server::nbd::{BackendResult, BlockBackend, Exports, MemBackend, NbdConfig, NbdServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
/// How long a test waits for something the server should do promptly.
const PROMPT: Duration = Duration::from_secs(5);

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Panics raised in the server's code (the NBD module), whichever thread ran it.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "error".into()),
            )
            .with_test_writer()
            .try_init();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_server = info
                .location()
                .is_some_and(|l| l.file().contains("src/nbd/"));
            if in_server {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

/// A backend that delays operations at chosen offsets, to make concurrency observable.
struct Slow {
    inner: MemBackend,
    /// Operations at offsets below this take `delay`.
    slow_below: u64,
    delay: Duration,
    running: AtomicU64,
    running_max: AtomicU64,
}

impl Slow {
    fn new(size: u64, slow_below: u64, delay: Duration) -> Self {
        Self {
            inner: MemBackend::new(size),
            slow_below,
            delay,
            running: AtomicU64::new(0),
            running_max: AtomicU64::new(0),
        }
    }

    async fn pause(&self, offset: u64) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.running_max.fetch_max(now, Ordering::SeqCst);
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockBackend for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    /// Pretends its flush covers only its own connection, to check CAN_MULTI_CONN is withheld.
    fn flush_covers_all_connections(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.pause(offset).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.pause(offset).await;
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> BackendResult<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }
}

async fn start<B: BlockBackend>(
    exports: Vec<(&str, B)>,
    config: NbdConfig,
) -> (NbdServerHandle, Arc<Exports<B>>) {
    init();
    let registry = Arc::new(Exports::new());
    for (name, backend) in exports {
        registry.insert(name, Arc::new(backend));
    }
    let handle = NbdServerHandle::start("127.0.0.1:0".parse().unwrap(), registry.clone(), config)
        .await
        .unwrap();
    (handle, registry)
}

fn backend<B: BlockBackend>(reg: &Exports<B>, name: &str) -> Arc<B> {
    use server::nbd::ExportRegistry;
    reg.lookup(name).unwrap()
}

/// A deliberately small NBD client.
struct Client {
    s: TcpStream,
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Self { s }
    }

    /// Reads the greeting and sends client flags.
    async fn hello(addr: SocketAddr, client_flags: u32) -> Self {
        let mut c = Self::connect(addr).await;
        assert_eq!(c.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(c.s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            c.s.read_u16().await.unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.s.write_u32(client_flags).await.unwrap();
        c
    }

    /// Completes a handshake with `NBD_OPT_GO`; returns the client, size and flags.
    async fn go(addr: SocketAddr, export: &str) -> (Self, u64, u16) {
        let mut c = Self::hello(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.option(OPT_GO, &go_data(export, &[])).await;
        let info = c.opt_reply().await;
        assert_eq!((info.option, info.kind), (OPT_GO, REP_INFO), "GO {export}");
        let (size, flags) = parse_info_export(&info.data);
        let ack = c.opt_reply().await;
        assert_eq!(ack.kind, REP_ACK);
        (c, size, flags)
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut buf = Vec::new();
        buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.s.write_all(&buf).await.unwrap();
    }

    async fn opt_reply(&mut self) -> OptReply {
        let r = async {
            assert_eq!(self.s.read_u64().await?, OPT_REPLY_MAGIC);
            let option = self.s.read_u32().await?;
            let kind = self.s.read_u32().await?;
            let len = self.s.read_u32().await?;
            let mut data = vec![0; len as usize];
            self.s.read_exact(&mut data).await?;
            std::io::Result::Ok(OptReply { option, kind, data })
        };
        tokio::time::timeout(PROMPT, r)
            .await
            .expect("option reply in time")
            .expect("option reply")
    }

    async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        tokio::time::timeout(PROMPT, self.s.read_exact(&mut h))
            .await
            .expect("reply in time")
            .expect("reply");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Sends a request and returns the reply's error (and data for a successful read).
    async fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        let cookie = 0xc0c0 + u64::from(kind);
        self.send(kind, flags, cookie, offset, len, data).await;
        let (error, got) = self.reply().await;
        assert_eq!(got, cookie);
        let mut payload = Vec::new();
        if error == 0 && kind == CMD_READ {
            payload.resize(len as usize, 0);
            self.s.read_exact(&mut payload).await.unwrap();
        }
        (error, payload)
    }

    /// Writes a pattern and reads it back: proves the connection still works.
    async fn round_trip(&mut self, offset: u64, byte: u8) {
        let data = vec![byte; 4096];
        assert_eq!(self.call(CMD_WRITE, 0, offset, 4096, &data).await.0, 0);
        let (err, back) = self.call(CMD_READ, 0, offset, 4096, &[]).await;
        assert_eq!((err, back), (0, data));
    }

    /// True if the server closes the connection (EOF or reset) within `PROMPT`, discarding
    /// whatever it sends first.
    async fn closed_by_server(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        let deadline = Instant::now() + PROMPT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.s.read(&mut sink)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn parse_info_export(data: &[u8]) -> (u64, u16) {
    assert_eq!(data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
    assert_eq!(u16::from_be_bytes([data[0], data[1]]), INFO_EXPORT);
    (
        u64::from_be_bytes(data[2..10].try_into().unwrap()),
        u16::from_be_bytes([data[10], data[11]]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_keep_the_handshake_going() {
    let (srv, _) = start(
        vec![
            ("bg0", MemBackend::new(MIB)),
            ("bg1", MemBackend::new(2 * MIB)),
        ],
        NbdConfig::default(),
    )
    .await;
    let addr = srv.local_addr();
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

    let cases: [(u32, Vec<u8>, u32); 7] = [
        (OPT_STRUCTURED_REPLY, vec![], REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (0x1234, vec![1, 2, 3], REP_ERR_UNSUP),
        (OPT_LIST, vec![0], REP_ERR_INVALID),
        (OPT_INFO, vec![0, 0, 0, 9, b'x'], REP_ERR_INVALID),
        (
            OPT_GO,
            go_data("bg0", &[INFO_BLOCK_SIZE])[..9].to_vec(),
            REP_ERR_INVALID,
        ),
        (OPT_GO, go_data("nope", &[]), REP_ERR_UNKNOWN),
    ];
    for (option, data, want) in cases {
        c.option(option, &data).await;
        let r = c.opt_reply().await;
        assert_eq!((r.option, r.kind), (option, want), "option {option}");
    }

    c.option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply().await;
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["bg0", "bg1"]);

    // INFO answers the requested items (and ignores unknown ones); the connection stays in
    // negotiation.
    c.option(
        OPT_INFO,
        &go_data("bg1", &[INFO_BLOCK_SIZE, 0x7777, INFO_NAME]),
    )
    .await;
    let export = c.opt_reply().await;
    assert_eq!(export.kind, REP_INFO);
    let (size, flags) = parse_info_export(&export.data);
    assert_eq!(size, 2 * MIB);
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let mut block_size = None;
    let mut name = None;
    loop {
        let r = c.opt_reply().await;
        match r.kind {
            REP_ACK => break,
            REP_INFO if r.data[0..2] == INFO_BLOCK_SIZE.to_be_bytes() => {
                let v: Vec<u32> = r.data[2..]
                    .chunks(4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
                    .collect();
                block_size = Some(v);
            }
            REP_INFO if r.data[0..2] == INFO_NAME.to_be_bytes() => {
                name = Some(String::from_utf8(r.data[2..].to_vec()).unwrap());
            }
            other => panic!("unexpected reply type {other:#x}"),
        }
    }
    assert_eq!(block_size, Some(vec![1, 4096, 32 << 20]));
    assert_eq!(name.as_deref(), Some("bg1"));

    // GO without information requests: INFO_EXPORT then ACK, nothing unrequested.
    c.option(OPT_GO, &go_data("bg0", &[])).await;
    let r = c.opt_reply().await;
    assert_eq!(parse_info_export(&r.data).0, MIB);
    assert_eq!(c.opt_reply().await.kind, REP_ACK);
    c.round_trip(0, 0x5a).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_and_handshake_refusals() {
    let (srv, _) = start(vec![("bg0", MemBackend::new(MIB))], NbdConfig::default()).await;
    let addr = srv.local_addr();

    for no_zeroes in [false, true] {
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        let mut c = Client::hello(addr, flags).await;
        c.option(OPT_EXPORT_NAME, b"bg0").await;
        assert_eq!(c.s.read_u64().await.unwrap(), MIB);
        let tflags = c.s.read_u16().await.unwrap();
        assert_ne!(tflags & TFLAG_HAS_FLAGS, 0);
        if !no_zeroes {
            let mut pad = [1u8; 124];
            c.s.read_exact(&mut pad).await.unwrap();
            assert_eq!(pad, [0u8; 124]);
        }
        // The next bytes must be a reply to this request, not leftover padding.
        c.round_trip(4096, 0x11).await;
    }

    // A client without FIXED_NEWSTYLE may still use EXPORT_NAME.
    let mut c = Client::hello(addr, 0).await;
    c.option(OPT_EXPORT_NAME, b"bg0").await;
    let mut head = [0u8; 10 + 124];
    c.s.read_exact(&mut head).await.unwrap();
    c.round_trip(0, 0x12).await;

    // EXPORT_NAME cannot report errors: an unknown name closes the connection.
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed_by_server().await);

    // Client flags we did not offer close the connection, as the spec requires.
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE | 1 << 7).await;
    assert!(c.closed_by_server().await);

    // ABORT is acknowledged, then the server closes.
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE).await;
    c.option(OPT_ABORT, &[]).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK));
    assert!(c.closed_by_server().await);

    // Options longer than option_bytes_max are not read: the connection is closed.
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut head = Vec::new();
    head.extend_from_slice(&IHAVEOPT.to_be_bytes());
    head.extend_from_slice(&OPT_LIST.to_be_bytes());
    head.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&head).await.unwrap();
    assert!(c.closed_by_server().await);
    srv.shutdown().await;
}

/// (what, command, flags, offset, length, payload, expected error)
type BadRequest = (&'static str, u16, u16, u64, u32, Vec<u8>, u32);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errnos_and_the_connection_survives() {
    const SIZE: u64 = 4 * MIB;
    let config = NbdConfig {
        request_bytes_max: MIB as u32,
        inflight_bytes_max: 2 * MIB as usize,
        ..NbdConfig::default()
    };
    let (srv, reg) = start(
        vec![
            ("bg0", MemBackend::new(SIZE)),
            ("ro", MemBackend::read_only_from(&[3u8; 8192])),
        ],
        config,
    )
    .await;
    let addr = srv.local_addr();
    let (mut c, size, _) = Client::go(addr, "bg0").await;
    assert_eq!(size, SIZE);
    let page = vec![0x77u8; 4096];

    let cases: Vec<BadRequest> = vec![
        (
            "read past the end",
            CMD_READ,
            0,
            SIZE - 100,
            4096,
            vec![],
            EINVAL,
        ),
        (
            "read offset overflow",
            CMD_READ,
            0,
            u64::MAX - 10,
            4096,
            vec![],
            EINVAL,
        ),
        (
            "read over request_bytes_max",
            CMD_READ,
            0,
            0,
            MIB as u32 + 1,
            vec![],
            EINVAL,
        ),
        (
            "write past the end",
            CMD_WRITE,
            0,
            SIZE - 100,
            4096,
            page.clone(),
            ENOSPC,
        ),
        (
            "write with unknown flag",
            CMD_WRITE,
            1 << 9,
            0,
            4096,
            page.clone(),
            EINVAL,
        ),
        (
            "read with NO_HOLE",
            CMD_READ,
            CMD_FLAG_NO_HOLE,
            0,
            512,
            vec![],
            EINVAL,
        ),
        (
            "unknown command",
            CMD_WRITE_ZEROES + 36,
            0,
            0,
            512,
            vec![],
            EINVAL,
        ),
        ("cache (not negotiated)", 5, 0, 0, 512, vec![], EINVAL),
        (
            "block status (not negotiated)",
            7,
            0,
            0,
            512,
            vec![],
            EINVAL,
        ),
        ("flush with a length", CMD_FLUSH, 0, 0, 512, vec![], EINVAL),
        ("trim past the end", CMD_TRIM, 0, SIZE, 1, vec![], EINVAL),
        (
            "zeroes past the end",
            CMD_WRITE_ZEROES,
            0,
            SIZE - 1,
            2,
            vec![],
            ENOSPC,
        ),
        (
            // The Linux client ignores the maximum block size for write-zeroes; we accept it.
            "zeroes over request_bytes_max",
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE,
            0,
            3 * MIB as u32,
            vec![],
            0,
        ),
        ("zero-length read", CMD_READ, 0, SIZE, 0, vec![], 0),
        ("zero-length write", CMD_WRITE, 0, SIZE, 0, vec![], 0),
        (
            "fast zero",
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO,
            0,
            8192,
            vec![],
            0,
        ),
        ("FUA flush", CMD_FLUSH, CMD_FLAG_FUA, 0, 0, vec![], 0),
    ];
    for (what, kind, flags, offset, len, data, want) in cases {
        let (err, _) = c.call(kind, flags, offset, len, &data).await;
        assert_eq!(err, want, "{what}");
        c.round_trip(8192, 0x42).await;
    }

    // A write over request_bytes_max but within the protocol's 32 MiB is drained and refused.
    let big = vec![0xeeu8; 2 * MIB as usize];
    let (err, _) = c.call(CMD_WRITE, 0, 0, big.len() as u32, &big).await;
    assert_eq!(err, EINVAL);
    c.round_trip(0, 0x43).await;
    assert!(backend(&reg, "bg0")
        .read(4096, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // Read-only export: writes of every kind are EPERM, reads work.
    let (mut ro, _, flags) = Client::go(addr, "ro").await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        let data = if kind == CMD_WRITE {
            page.clone()
        } else {
            vec![]
        };
        let (err, _) = ro.call(kind, 0, 0, 4096, &data).await;
        assert_eq!(err, EPERM, "command {kind} on a read-only export");
    }
    let (err, data) = ro.call(CMD_READ, 0, 0, 8192, &[]).await;
    assert_eq!((err, data), (0, vec![3u8; 8192]));

    // A write announcing more than 32 MiB is a hard disconnect, for that connection only.
    c.send(CMD_WRITE, 0, 1, 0, 64 << 20, &[]).await;
    assert!(c.closed_by_server().await);
    ro.call(CMD_FLUSH, 0, 0, 0, &[]).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_capabilities_shape_flags_and_fast_zero() {
    // The slow backend keeps the trait default (no fast zeroing) and has a per-connection flush.
    let (srv, _) = start(
        vec![("bg0", Slow::new(MIB, 0, Duration::ZERO))],
        NbdConfig::default(),
    )
    .await;
    let (mut c, _, flags) = Client::go(srv.local_addr(), "bg0").await;
    assert_ne!(flags & TFLAG_SEND_FAST_ZERO, 0);
    assert_eq!(
        flags & TFLAG_CAN_MULTI_CONN,
        0,
        "multi-conn advertised without a global flush"
    );
    let (err, _) = c
        .call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096, &[])
        .await;
    assert_eq!(err, ENOTSUP);
    let (err, _) = c
        .call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096, &[])
        .await;
    assert_eq!(err, 0, "without FAST_ZERO the same request must succeed");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_and_reply_out_of_order() {
    let delay = Duration::from_millis(300);
    let (srv, reg) = start(
        vec![("bg0", Slow::new(MIB, 4096, delay))],
        NbdConfig::default(),
    )
    .await;
    let (mut c, _, _) = Client::go(srv.local_addr(), "bg0").await;

    // A slow read then a fast one: the fast one is answered first.
    c.send(CMD_READ, 0, 1, 0, 512, &[]).await;
    c.send(CMD_READ, 0, 2, 8192, 512, &[]).await;
    let mut order = Vec::new();
    for _ in 0..2 {
        let (err, cookie) = c.reply().await;
        assert_eq!(err, 0);
        let mut data = [0u8; 512];
        c.s.read_exact(&mut data).await.unwrap();
        order.push(cookie);
    }
    assert_eq!(
        order,
        [2, 1],
        "replies must not wait for slower earlier requests"
    );

    // Eight slow writes pipelined on one connection overlap in the backend.
    let started = Instant::now();
    for i in 0..8u64 {
        c.send(CMD_WRITE, 0, 100 + i, i * 512, 512, &[i as u8; 512])
            .await;
    }
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..8 {
        let (err, cookie) = c.reply().await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (100..108).collect::<Vec<_>>());
    let running_max = backend(&reg, "bg0").running_max.load(Ordering::SeqCst);
    assert!(running_max >= 4, "only {running_max} requests ran at once");
    assert!(
        started.elapsed() < delay * 4,
        "took {:?}",
        started.elapsed()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipelines_respect_a_small_inflight_limit() {
    let config = NbdConfig {
        inflight_requests_max: 3,
        inflight_bytes_max: 64 << 10,
        request_bytes_max: 64 << 10,
        ..NbdConfig::default()
    };
    let (srv, reg) = start(
        vec![("bg0", Slow::new(8 * MIB, 8 * MIB, Duration::from_millis(1)))],
        config,
    )
    .await;
    let (c, _, _) = Client::go(srv.local_addr(), "bg0").await;
    let (mut rd, mut wr) = c.s.into_split();
    const N: u64 = 300;
    // Writes of 16 KiB, then reads of the same blocks, all sent without waiting: the sender
    // and the receiver must run at once, as in any real client.
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let h = RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie: i,
                offset: i * 16384,
                len: 16384,
            };
            wr.write_all(&h.encode()).await.unwrap();
            wr.write_all(&[(i % 251) as u8; 16384]).await.unwrap();
        }
        wr.flush().await.unwrap();
        wr
    });
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let mut h = [0u8; 16];
        tokio::time::timeout(PROMPT, rd.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        assert!(
            !std::mem::replace(&mut seen[cookie], true),
            "cookie {cookie} answered twice"
        );
    }
    let mut wr = sender.await.unwrap();
    let running_max = backend(&reg, "bg0").running_max.load(Ordering::SeqCst);
    assert!(
        running_max <= 3,
        "{running_max} requests in flight, limit is 3"
    );

    for i in 0..N {
        let h = RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 1000 + i,
            offset: i * 16384,
            len: 16384,
        };
        wr.write_all(&h.encode()).await.unwrap();
    }
    for _ in 0..N {
        let mut h = [0u8; 16];
        tokio::time::timeout(PROMPT, rd.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        let i = u64::from_be_bytes(h[8..16].try_into().unwrap()) - 1000;
        let mut data = vec![0u8; 16384];
        rd.read_exact(&mut data).await.unwrap();
        assert!(data.iter().all(|&b| b == (i % 251) as u8), "block {i}");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_answers_outstanding_requests_first() {
    let (srv, reg) = start(
        vec![("bg0", Slow::new(MIB, MIB, Duration::from_millis(200)))],
        NbdConfig::default(),
    )
    .await;
    let (mut c, _, _) = Client::go(srv.local_addr(), "bg0").await;
    c.send(CMD_WRITE, CMD_FLAG_FUA, 7, 0, 4096, &[9u8; 4096])
        .await;
    c.send(CMD_DISC, 0, 8, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (0, 7));
    assert!(c.closed_by_server().await);
    assert!(backend(&reg, "bg0")
        .inner
        .read(0, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 9));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_inflight_requests() {
    let (srv, reg) = start(
        vec![("bg0", Slow::new(MIB, MIB, Duration::from_millis(300)))],
        NbdConfig::default(),
    )
    .await;
    let addr = srv.local_addr();
    let (mut c, _, _) = Client::go(addr, "bg0").await;
    // Another client idles in the handshake; it must not hold shutdown up.
    let mut idle = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE).await;

    c.send(CMD_WRITE, 0, 42, 4096, 4096, &[5u8; 4096]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(srv.shutdown());
    assert_eq!(
        c.reply().await,
        (0, 42),
        "in-flight write answered during shutdown"
    );
    assert!(c.closed_by_server().await);
    assert!(idle.closed_by_server().await);
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(backend(&reg, "bg0")
        .inner
        .read(4096, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 5));
    // Nothing listens any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_handshake_limits() {
    let config = NbdConfig {
        connections_max: 2,
        handshake_timeout_ms: 300,
        ..NbdConfig::default()
    };
    let (srv, _) = start(vec![("bg0", MemBackend::new(MIB))], config).await;
    let addr = srv.local_addr();
    let (mut a, _, _) = Client::go(addr, "bg0").await;
    let (b, _, _) = Client::go(addr, "bg0").await;
    let mut third = Client::connect(addr).await;
    assert!(
        third.closed_by_server().await,
        "a third connection must be refused"
    );
    a.round_trip(0, 1).await;

    // Closing one frees its slot.
    drop(b);
    let deadline = Instant::now() + PROMPT;
    loop {
        let mut c = Client::connect(addr).await;
        let mut greeting = [0u8; 18];
        let got =
            tokio::time::timeout(Duration::from_millis(500), c.s.read_exact(&mut greeting)).await;
        if matches!(got, Ok(Ok(_))) {
            // A client that never answers the greeting is dropped after handshake_timeout_ms.
            let started = Instant::now();
            assert!(c.closed_by_server().await);
            assert!(started.elapsed() < Duration::from_secs(2));
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_come_and_go_at_runtime() {
    let (srv, reg) = start(vec![("bg0", MemBackend::new(MIB))], NbdConfig::default()).await;
    let addr = srv.local_addr();
    let mut c = Client::hello(addr, FLAG_C_FIXED_NEWSTYLE).await;
    c.option(OPT_GO, &go_data("bg1", &[])).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_UNKNOWN);

    reg.insert("bg1", Arc::new(MemBackend::new(2 * MIB)));
    let (mut c1, size, _) = Client::go(addr, "bg1").await;
    assert_eq!(size, 2 * MIB);

    // Removing an export refuses new clients; the attached one keeps its backend.
    reg.remove("bg1");
    c.option(OPT_GO, &go_data("bg1", &[])).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_UNKNOWN);
    c1.round_trip(MIB, 0x66).await;
    srv.shutdown().await;
}

/// One hostile connection: garbage or a truncated/mutated conversation, then EOF.
async fn hostile(addr: SocketAddr, rng: &mut ChaCha8Rng) {
    let mut valid: Vec<u8> = Vec::new();
    valid.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = |option: u32, data: &[u8]| {
        valid.extend_from_slice(&IHAVEOPT.to_be_bytes());
        valid.extend_from_slice(&option.to_be_bytes());
        valid.extend_from_slice(&(data.len() as u32).to_be_bytes());
        valid.extend_from_slice(data);
    };
    opt(OPT_LIST, &[]);
    opt(OPT_GO, &go_data("bg0", &[INFO_BLOCK_SIZE]));
    for i in 0..4u64 {
        let kind = [CMD_WRITE, CMD_READ, CMD_TRIM, CMD_FLUSH][i as usize];
        let len = if kind == CMD_FLUSH { 0 } else { 1024 };
        let h = RequestHeader {
            flags: 0,
            kind,
            cookie: i,
            offset: i * 4096,
            len,
        };
        valid.extend_from_slice(&h.encode());
        if kind == CMD_WRITE {
            valid.extend_from_slice(&[0xaa; 1024]);
        }
    }

    let bytes = mangled(&valid, rng);
    let mut c = Client::connect(addr).await;
    // The server may close first (that is the point); write errors are expected then.
    let _ = c.s.write_all(&bytes).await;
    let _ = c.s.shutdown().await;
    assert!(
        c.closed_by_server().await,
        "server kept a hostile connection open after EOF ({} bytes sent)",
        bytes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_input_close_only_their_connection() {
    let seed: u64 = std::env::var("NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6264_6e62);
    println!("NBD_FUZZ_SEED={seed}");
    let (srv, _) = start(vec![("bg0", MemBackend::new(MIB))], NbdConfig::default()).await;
    let addr = srv.local_addr();

    // A well-behaved client keeps working throughout.
    let (mut good, _, _) = Client::go(addr, "bg0").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let good_task = tokio::spawn(async move {
        let mut rounds = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            good.round_trip(512 * 1024 + (rounds % 64) * 4096, rounds as u8)
                .await;
            rounds += 1;
        }
        rounds
    });

    const CONNECTIONS: u64 = 400;
    const PARALLEL: u64 = 16;
    let mut workers = Vec::new();
    for w in 0..PARALLEL {
        workers.push(tokio::spawn(async move {
            for i in (w..CONNECTIONS).step_by(PARALLEL as usize) {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                hostile(addr, &mut rng).await;
            }
        }));
    }
    for w in workers {
        w.await.expect("hostile connection check failed");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = good_task.await.expect("the good client failed");
    assert!(rounds > 0);

    // The server still accepts and serves new clients, and nothing panicked in it.
    let (mut fresh, _, _) = Client::go(addr, "bg0").await;
    fresh.round_trip(0, 0x99).await;
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "a server task panicked"
    );
    tokio::time::timeout(PROMPT, srv.shutdown())
        .await
        .expect("prompt shutdown");
}

/// A backend that lives on a runtime of its own (as an engine core does) and records the thread
/// that serves each request.
struct Homed {
    inner: MemBackend,
    home: tokio::runtime::Handle,
    threads: std::sync::Mutex<Vec<String>>,
}

impl Homed {
    fn note(&self) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.threads.lock().unwrap().push(name);
    }
}

impl BlockBackend for Homed {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flush_covers_all_connections(&self) -> bool {
        true
    }
    fn home(&self) -> Option<tokio::runtime::Handle> {
        Some(self.home.clone())
    }
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.note();
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.note();
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> BackendResult<()> {
        self.note();
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.note();
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> BackendResult<()> {
        self.note();
        self.inner.write_zeroes(offset, len, fua, may_trim).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homed_backend_serves_its_connections_on_its_own_runtime() {
    // The backend's runtime: one thread, like an engine core.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let home_thread = std::thread::Builder::new()
        .name("nbd-home".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        })
        .unwrap();
    let home = handle_rx.recv().unwrap();
    let (srv, reg) = start(
        vec![(
            "bg0",
            Homed {
                inner: MemBackend::new(MIB),
                home,
                threads: Default::default(),
            },
        )],
        NbdConfig::default(),
    )
    .await;

    // OPT_GO and the first requests leave in one write: the server has them in its read
    // buffer when the connection moves, and must carry them over.
    let mut c = Client::hello(srv.local_addr(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let mut burst = Vec::new();
    burst.extend_from_slice(&IHAVEOPT.to_be_bytes());
    burst.extend_from_slice(&OPT_GO.to_be_bytes());
    let go = go_data("bg0", &[]);
    burst.extend_from_slice(&(go.len() as u32).to_be_bytes());
    burst.extend_from_slice(&go);
    for i in 0..4u64 {
        let h = RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 10 + i,
            offset: i * 4096,
            len: 4096,
        };
        burst.extend_from_slice(&h.encode());
        burst.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    c.s.write_all(&burst).await.unwrap();
    assert_eq!(c.opt_reply().await.kind, REP_INFO);
    assert_eq!(c.opt_reply().await.kind, REP_ACK);
    let mut cookies = Vec::new();
    for _ in 0..4 {
        let (err, cookie) = c.reply().await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [10, 11, 12, 13]);
    for i in 0..4u64 {
        let (err, back) = c.call(CMD_READ, 0, i * 4096, 4096, &[]).await;
        assert_eq!((err, back), (0, vec![i as u8 + 1; 4096]));
    }
    c.round_trip(65536, 0x5a).await;
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);

    let threads = backend(&reg, "bg0").threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 4 + 4 + 2 + 1);
    assert!(
        threads.iter().all(|t| t == "nbd-home"),
        "requests served on {threads:?}"
    );
    drop(c);
    srv.shutdown().await;
    stop_tx.send(()).unwrap();
    home_thread.join().unwrap();
}
