//! The QUIC endpoint: peers, connections, the send queues and the receive and snapshot paths.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::error::{Error, PeerName, Result};
use crate::snapshot::{Run, SnapshotOffer, SnapshotReceiver, SnapshotSent, SnapshotSource};
use crate::throttle::TokenBucket;
use crate::tls::{self, Security};
use crate::wire::{self, code, Frame};
use crate::{GroupId, NodeId};

/// Tunables. Limits are named `*_max` with their unit; defaults suit a LAN with ~1 ms RTT at 10 Gbit/s.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id; must match the certificate in mutual-TLS mode.
    pub node: NodeId,
    pub bind: SocketAddr,
    /// Largest frame accepted or sent (length prefix value: 9 header bytes + payload). Bounds the memory a
    /// peer can make us buffer for one frame.
    pub frame_bytes_max: usize,
    /// Bytes of queued data-lane frames per peer before `send` drops (raft retransmits what is lost).
    pub peer_queue_bytes_max: usize,
    /// Same for the control lane (heartbeats, votes), kept separate so bulk appends cannot starve it.
    pub control_queue_bytes_max: usize,
    /// Most bytes coalesced into one stream write.
    pub flush_bytes_max: usize,
    /// Capacity of the receive channel in frames; when full, readers stop reading and QUIC flow control
    /// pushes back on the senders.
    pub recv_queue_frames_max: usize,
    /// Per-stream receive window: at least bandwidth × RTT so one stream can fill the pipe.
    pub stream_window_bytes: u64,
    /// Per-connection receive and send window (all streams together).
    pub connection_window_bytes: u64,
    /// SO_RCVBUF / SO_SNDBUF requested for the UDP socket (the kernel caps it at net.core.*mem_max).
    pub socket_buffer_bytes: usize,
    pub keep_alive: Duration,
    /// A connection silent for this long is dead; the dialer then reconnects.
    pub idle_timeout: Duration,
    /// Time for the TLS handshake plus the hello exchange.
    pub handshake_timeout: Duration,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// The higher node id waits this long before dialing, so that usually only the lower id dials and no
    /// duplicate connection has to be torn down.
    pub dial_defer: Duration,
    /// Bytes per snapshot chunk (braft's raft_max_byte_count_per_rpc, 128 KiB).
    pub snapshot_chunk_bytes: usize,
    /// Largest chunk a receiver accepts.
    pub snapshot_chunk_bytes_max: usize,
    /// Snapshot bytes per second over all transfers of this endpoint; 0 = unlimited.
    pub snapshot_bytes_per_sec_max: u64,
    /// Streams (attempts) per `send_snapshot` before it gives up.
    pub snapshot_attempts_max: u32,
    /// Concurrent incoming snapshot streams per connection.
    pub snapshot_streams_max: u32,
    /// How long [`Transport::shutdown`] waits for peers to acknowledge the close. Live peers answer
    /// within a round trip; a dead peer never does, and QUIC would wait out its draining period
    /// (3 PTOs, tens of seconds after the backoff of an unanswered path), so the wait is bounded.
    pub close_wait_max: Duration,
    /// UDP payload size the network path is known to carry: QUIC packets start at this size and
    /// never fall back below it when packets are lost (quinn's `initial_mtu` and `min_mtu`).
    /// Every QUIC packet costs the same bookkeeping, encryption call and acknowledgement work
    /// whatever its size, so a 4 KiB block write costs four packets at the internet-safe 1200
    /// bytes and one at 6550: on loopback that was most of a replicated write's CPU
    /// (docs/bench-nbd.md).
    pub udp_payload_bytes: u16,
    /// Largest UDP payload this endpoint accepts and that path MTU discovery probes for. At most
    /// [`UDP_PAYLOAD_BYTES_LIMIT`].
    pub udp_payload_bytes_max: u16,
}

/// The largest usable UDP payload: quinn hands the kernel up to 10 packets per GSO send, and the
/// kernel refuses a GSO send over 64 KiB (EMSGSIZE), which quinn-udp drops without a word. So
/// 10 packets must fit in one 65,507-byte UDP datagram.
pub const UDP_PAYLOAD_BYTES_LIMIT: u16 = 6_550;

/// QUIC's minimum, which every path must carry (RFC 9000 §14).
pub const UDP_PAYLOAD_BYTES_MIN: u16 = 1_200;

/// Default `udp_payload_bytes_max` off loopback: the largest payload of a 1500-byte Ethernet MTU
/// over IPv6 (quinn's default discovery bound).
pub const UDP_PAYLOAD_BYTES_ETHERNET: u16 = 1_452;

impl Config {
    pub fn new(node: NodeId, bind: SocketAddr) -> Config {
        Config {
            node,
            bind,
            frame_bytes_max: 16 << 20,
            peer_queue_bytes_max: 64 << 20,
            control_queue_bytes_max: 4 << 20,
            flush_bytes_max: 1 << 20,
            recv_queue_frames_max: 8192,
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 16 << 20,
            socket_buffer_bytes: 8 << 20,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            dial_defer: Duration::from_millis(200),
            snapshot_chunk_bytes: 128 << 10,
            snapshot_chunk_bytes_max: 4 << 20,
            snapshot_bytes_per_sec_max: 200 << 20,
            snapshot_attempts_max: 10,
            snapshot_streams_max: 8,
            close_wait_max: Duration::from_millis(300),
            // Loopback carries 64 KiB datagrams, so there is nothing to discover.
            udp_payload_bytes: if bind.ip().is_loopback() {
                UDP_PAYLOAD_BYTES_LIMIT
            } else {
                UDP_PAYLOAD_BYTES_MIN
            },
            udp_payload_bytes_max: if bind.ip().is_loopback() {
                UDP_PAYLOAD_BYTES_LIMIT
            } else {
                UDP_PAYLOAD_BYTES_ETHERNET
            },
        }
    }

    /// Declares that the network carries UDP payloads of `bytes` (e.g. jumbo frames): packets
    /// use that size from the start, without discovery. Checked by [`Transport::bind`].
    pub fn with_udp_payload_bytes(mut self, bytes: u16) -> Config {
        self.udp_payload_bytes = bytes;
        self.udp_payload_bytes_max = bytes;
        self
    }

    /// Sizes the flow-control windows for a path of `bytes_per_sec` and round-trip time `rtt`: one stream
    /// gets the bandwidth-delay product (at least 1 MiB) so a single transfer can fill the path, and the
    /// connection four times that so frames, snapshots and retransmissions share it without stalling.
    pub fn with_windows_for(mut self, bytes_per_sec: u64, rtt: Duration) -> Config {
        let bdp = (bytes_per_sec as u128 * rtt.as_micros() / 1_000_000) as u64;
        self.stream_window_bytes = bdp.max(1 << 20);
        self.connection_window_bytes = self.stream_window_bytes * 4;
        self.socket_buffer_bytes = (self.connection_window_bytes as usize).min(64 << 20);
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if !(UDP_PAYLOAD_BYTES_MIN..=self.udp_payload_bytes_max).contains(&self.udp_payload_bytes)
            || self.udp_payload_bytes_max > UDP_PAYLOAD_BYTES_LIMIT
        {
            return Err(Error::Config(format!(
                "udp_payload_bytes {} and udp_payload_bytes_max {} must satisfy \
                 {UDP_PAYLOAD_BYTES_MIN} <= udp_payload_bytes <= udp_payload_bytes_max <= \
                 {UDP_PAYLOAD_BYTES_LIMIT}",
                self.udp_payload_bytes, self.udp_payload_bytes_max
            )));
        }
        if self.frame_bytes_max < wire::FRAME_HEADER_BYTES
            || self.frame_bytes_max > u32::MAX as usize
        {
            return bad("frame_bytes_max must be between 9 and 2^32-1");
        }
        if self.snapshot_chunk_bytes == 0
            || self.snapshot_chunk_bytes > self.snapshot_chunk_bytes_max
        {
            return bad("snapshot_chunk_bytes must be in 1..=snapshot_chunk_bytes_max");
        }
        if self.snapshot_chunk_bytes_max > u32::MAX as usize {
            return bad("snapshot_chunk_bytes_max must fit in u32");
        }
        if self.flush_bytes_max == 0
            || self.recv_queue_frames_max == 0
            || self.snapshot_attempts_max == 0
        {
            return bad(
                "flush_bytes_max, recv_queue_frames_max and snapshot_attempts_max must be positive",
            );
        }
        if self.keep_alive >= self.idle_timeout {
            return bad("keep_alive must be shorter than idle_timeout");
        }
        Ok(())
    }
}

/// A frame delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: NodeId,
    pub frame: Frame,
}

/// Which send queue a frame joins. Each flush drains the control lane first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Small, latency-critical messages: heartbeats, votes, their responses.
    Control,
    /// Everything else (appends with entries).
    Data,
}

/// Counters of one peer, for status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    /// Frames dropped because a queue was full or a write failed.
    pub frames_dropped: u64,
    pub flushes: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub connected: bool,
    /// Of the live connection (zero without one): QUIC's own view of the path.
    pub udp_datagrams_sent: u64,
    pub udp_datagrams_received: u64,
    pub lost_packets: u64,
    /// Current UDP payload size of the packets sent (the path MTU as QUIC uses it).
    pub udp_payload_bytes: u16,
    pub rtt_us: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
    flushes: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

#[derive(Clone)]
struct Link {
    conn: Connection,
    dialed_by: NodeId,
    /// The peer's incarnation, from its hello (or hello answer).
    incarnation: u64,
}

#[derive(Default)]
struct Queue {
    control: VecDeque<Frame>,
    control_bytes: usize,
    data: VecDeque<Frame>,
    data_bytes: usize,
}

struct Peer {
    id: NodeId,
    addr: Mutex<Option<SocketAddr>>,
    link: watch::Sender<Option<Link>>,
    queue: Mutex<Queue>,
    wake: Notify,
    stop: watch::Sender<bool>,
    dialer_started: AtomicBool,
    counters: Counters,
}

impl Peer {
    fn name(&self) -> PeerName {
        let addr = *self.addr.lock().expect("addr lock");
        let addr = addr.or_else(|| self.link.borrow().as_ref().map(|l| l.conn.remote_address()));
        PeerName {
            node: self.id,
            addr,
        }
    }

    async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn live_link(&self) -> Option<Link> {
        self.link
            .borrow()
            .as_ref()
            .filter(|l| l.conn.close_reason().is_none())
            .cloned()
    }
}

struct Inner {
    cfg: Config,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    received: mpsc::Sender<Received>,
    snapshots: Option<Arc<dyn SnapshotReceiver>>,
    throttle: Mutex<TokenBucket>,
    shutdown: watch::Sender<bool>,
    insecure: bool,
    /// This endpoint's random non-zero id, sent in every hello: it tells peers that a connection comes
    /// from a new process, so they drop the old process's connections at once.
    incarnation: u64,
}

/// One QUIC endpoint of this node (create one per core). Dropping it shuts it down.
pub struct Transport {
    inner: Arc<Inner>,
}

fn transport_config(cfg: &Config) -> Result<quinn::TransportConfig> {
    let varint = |v: u64, what: &str| {
        VarInt::from_u64(v).map_err(|_| Error::Config(format!("{what} too large")))
    };
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(varint(cfg.stream_window_bytes, "stream_window_bytes")?);
    t.receive_window(varint(
        cfg.connection_window_bytes,
        "connection_window_bytes",
    )?);
    t.send_window(cfg.connection_window_bytes);
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(cfg.idle_timeout)
            .map_err(|_| Error::Config("idle_timeout too large".into()))?,
    ));
    // One bidirectional stream for the hello, the rest for snapshots; one unidirectional frame stream per
    // direction (a few spare so a replaced stream need not wait for credit).
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.snapshot_streams_max + 1));
    t.max_concurrent_uni_streams(VarInt::from_u32(4));
    t.datagram_receive_buffer_size(None);
    t.initial_mtu(cfg.udp_payload_bytes);
    t.min_mtu(cfg.udp_payload_bytes);
    if cfg.udp_payload_bytes < cfg.udp_payload_bytes_max {
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(cfg.udp_payload_bytes_max);
        t.mtu_discovery_config(Some(mtu));
    } else {
        t.mtu_discovery_config(None);
    }
    Ok(t)
}

fn udp_socket(cfg: &Config) -> Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind(cfg.bind).map_err(|source| Error::Socket {
        addr: cfg.bind,
        source,
    })?;
    sock.set_nonblocking(true).map_err(|source| Error::Socket {
        addr: cfg.bind,
        source,
    })?;
    set_socket_buffers(&sock, cfg.socket_buffer_bytes);
    Ok(sock)
}

/// Best effort: the default ~200 KiB UDP buffers drop bursts at high bandwidth × RTT.
fn set_socket_buffers(sock: &std::net::UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let val: libc::c_int = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: valid fd owned by `sock`, option value is a c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &val as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            debug!(opt, bytes, error = %std::io::Error::last_os_error(), "could not set UDP socket buffer");
        }
    }
}

impl Transport {
    /// Binds an endpoint and starts accepting. Must be called within a tokio runtime; the endpoint's tasks
    /// run on it. Frames from peers arrive on the returned channel. Incoming snapshots go to `snapshots`
    /// (offers are rejected when `None`).
    pub fn bind(
        cfg: Config,
        security: Security,
        snapshots: Option<Arc<dyn SnapshotReceiver>>,
    ) -> Result<(Transport, mpsc::Receiver<Received>)> {
        cfg.validate()?;
        match &security {
            Security::InsecureLoopback => {
                if !cfg.bind.ip().is_loopback() {
                    return Err(Error::InsecureNotLoopback { addr: cfg.bind });
                }
                warn!(
                    node = cfg.node,
                    addr = %cfg.bind,
                    "INSECURE TRANSPORT: no certificate verification, peers are trusted by the node id they claim; \
                     allowed only on loopback for a local dev cluster"
                );
            }
            Security::MutualTls(id) => {
                if id.node != cfg.node {
                    return Err(Error::Config(format!(
                        "certificate is for node {} but this transport is node {}",
                        id.node, cfg.node
                    )));
                }
            }
        }
        let tcfg = Arc::new(transport_config(&cfg)?);
        let server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_crypto(&security)?)
                .map_err(|e| Error::Tls(e.to_string()))?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_cfg.transport_config(tcfg.clone());
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_crypto(&security)?)
                .map_err(|e| Error::Tls(e.to_string()))?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_cfg.transport_config(tcfg);

        let socket = udp_socket(&cfg)?;
        let mut endpoint_cfg = quinn::EndpointConfig::default();
        endpoint_cfg
            .max_udp_payload_size(cfg.udp_payload_bytes_max)
            .map_err(|e| Error::Config(format!("udp_payload_bytes_max: {e}")))?;
        let endpoint = quinn::Endpoint::new(
            endpoint_cfg,
            Some(server_cfg),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| Error::Socket {
            addr: cfg.bind,
            source,
        })?;
        let (tx, rx) = mpsc::channel(cfg.recv_queue_frames_max);
        let burst = cfg.snapshot_chunk_bytes as u64;
        let inner = Arc::new(Inner {
            throttle: Mutex::new(TokenBucket::new(
                cfg.snapshot_bytes_per_sec_max,
                burst,
                Instant::now(),
            )),
            cfg,
            endpoint,
            client_cfg,
            peers: Mutex::new(HashMap::new()),
            received: tx,
            snapshots,
            shutdown: watch::channel(false).0,
            insecure: matches!(security, Security::InsecureLoopback),
            incarnation: wire::fresh_incarnation(),
        });
        info!(node = inner.cfg.node, addr = %inner.local_addr(), incarnation = %format_args!("{:016x}", inner.incarnation), "transport listening");
        tokio::spawn(inner.clone().accept_loop());
        Ok((Transport { inner }, rx))
    }

    pub fn node(&self) -> NodeId {
        self.inner.cfg.node
    }

    /// This endpoint's incarnation: random, non-zero, new at every bind.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    /// Adds a peer or updates its address, and keeps a connection to it (reconnecting with backoff).
    pub fn add_peer(&self, node: NodeId, addr: SocketAddr) -> Result<()> {
        if node == self.inner.cfg.node {
            return Err(Error::Config(format!("node {node} cannot be its own peer")));
        }
        let peer = self.inner.peer_entry(node);
        *peer.addr.lock().expect("addr lock") = Some(addr);
        if !peer.dialer_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.inner.clone().dial_loop(peer.clone()));
        }
        Ok(())
    }

    /// Forgets a peer: closes its connection and drops its queued frames. If the peer still knows this node,
    /// it may dial again; an authenticated connection is then accepted and the peer re-created without an
    /// address (the engine ignores traffic from non-members).
    pub fn remove_peer(&self, node: NodeId) {
        let peer = self.inner.peers.lock().expect("peers lock").remove(&node);
        if let Some(peer) = peer {
            peer.stop.send_replace(true);
            if let Some(link) = peer.link.send_replace(None) {
                link.conn
                    .close(VarInt::from_u32(code::BY_REQUEST), b"peer removed");
            }
        }
    }

    /// Queues a frame for `node` without waiting. A full lane drops the frame and counts it (raft recovers
    /// lost messages by retransmission; blocking here would stall every group on this core behind one slow
    /// peer). Frames of one lane arrive in the order they were queued.
    pub fn send(&self, node: NodeId, frame: Frame, lane: Lane) -> Result<()> {
        let peer = self.inner.peer(node)?;
        if frame.body_len() > self.inner.cfg.frame_bytes_max {
            return Err(Error::FrameTooLarge {
                peer: peer.name(),
                len: frame.body_len(),
                max: self.inner.cfg.frame_bytes_max,
            });
        }
        let len = frame.wire_len();
        {
            let mut q = peer.queue.lock().expect("queue lock");
            let (queued, limit) = match lane {
                Lane::Control => (q.control_bytes, self.inner.cfg.control_queue_bytes_max),
                Lane::Data => (q.data_bytes, self.inner.cfg.peer_queue_bytes_max),
            };
            if queued + len > limit {
                drop(q);
                peer.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                return Err(Error::QueueFull {
                    peer: peer.name(),
                    queued_bytes: queued,
                    limit_bytes: limit,
                });
            }
            match lane {
                Lane::Control => {
                    q.control_bytes += len;
                    q.control.push_back(frame);
                }
                Lane::Data => {
                    q.data_bytes += len;
                    q.data.push_back(frame);
                }
            }
        }
        peer.wake.notify_one();
        Ok(())
    }

    /// Closes the current connection to `node` (if any); the dialer reconnects after its backoff.
    pub fn disconnect(&self, node: NodeId) {
        if let Ok(peer) = self.inner.peer(node) {
            if let Some(link) = peer.live_link() {
                link.conn
                    .close(VarInt::from_u32(code::BY_REQUEST), b"disconnect requested");
            }
        }
    }

    pub fn is_connected(&self, node: NodeId) -> bool {
        self.inner
            .peer(node)
            .map(|p| p.live_link().is_some())
            .unwrap_or(false)
    }

    /// Waits until a connection to `node` is up, or `timeout` passes. Returns whether it is up.
    pub async fn wait_connected(&self, node: NodeId, timeout: Duration) -> bool {
        let Ok(peer) = self.inner.peer(node) else {
            return false;
        };
        let mut rx = peer.link.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if peer.live_link().is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    pub fn peer_stats(&self, node: NodeId) -> Option<PeerStats> {
        let peer = self.inner.peer(node).ok()?;
        let c = &peer.counters;
        let path = peer.live_link().map(|l| l.conn.stats());
        Some(PeerStats {
            udp_datagrams_sent: path.as_ref().map_or(0, |s| s.udp_tx.datagrams),
            udp_datagrams_received: path.as_ref().map_or(0, |s| s.udp_rx.datagrams),
            lost_packets: path.as_ref().map_or(0, |s| s.path.lost_packets),
            udp_payload_bytes: path.as_ref().map_or(0, |s| s.path.current_mtu),
            rtt_us: path
                .as_ref()
                .map_or(0, |s| s.path.rtt.as_micros().min(u64::MAX as u128) as u64),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
            connected: peer.live_link().is_some(),
        })
    }

    /// Streams a snapshot to `node` in crc-checked chunks on its own stream, throttled by
    /// `snapshot_bytes_per_sec_max`. If the stream or connection breaks, it waits for the connection to come
    /// back and resumes from the offset the receiver reports as durable, up to `snapshot_attempts_max`
    /// streams. Returns once the receiver's sink has finished.
    pub async fn send_snapshot<S: SnapshotSource + ?Sized>(
        &self,
        node: NodeId,
        group: GroupId,
        snapshot_id: u64,
        total_len: u64,
        source: &mut S,
    ) -> Result<SnapshotSent> {
        let inner = &self.inner;
        let peer = inner.peer(node)?;
        let snap_err = |reason: String| Error::Snapshot {
            peer: peer.name(),
            group,
            snapshot_id,
            reason,
        };
        let mut sent = SnapshotSent {
            attempts: 0,
            start_offsets: Vec::new(),
            bytes_sent: 0,
            zero_bytes: 0,
        };
        let mut buf = vec![0u8; inner.cfg.snapshot_chunk_bytes];
        let mut backoff = inner.cfg.reconnect_backoff_min;
        let mut last_err = String::new();
        while sent.attempts < inner.cfg.snapshot_attempts_max {
            if sent.attempts > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.cfg.reconnect_backoff_max);
            }
            sent.attempts += 1;
            let link = match inner.wait_link(&peer, inner.cfg.idle_timeout).await {
                Some(link) => link,
                None => {
                    last_err = "no connection".into();
                    continue;
                }
            };
            let offer = wire::SnapshotOfferWire {
                group,
                snapshot_id,
                total_len,
            };
            match inner
                .snapshot_attempt(&link, offer, source, &mut buf, &mut sent)
                .await
            {
                Ok(()) => {
                    debug!(peer = %peer.name(), group, snapshot_id, attempts = sent.attempts, "snapshot sent");
                    return Ok(sent);
                }
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Rejected(reason)) => return Err(snap_err(reason)),
                Err(AttemptError::Retry(reason)) => {
                    info!(peer = %peer.name(), group, snapshot_id, attempt = sent.attempts, %reason,
                        "snapshot stream interrupted; will resume");
                    last_err = reason;
                }
            }
        }
        Err(snap_err(format!(
            "gave up after {} attempts; last error: {last_err}",
            sent.attempts
        )))
    }

    /// Closes the endpoint and stops all tasks. Connections are closed with code SHUTDOWN; the wait
    /// for peers to acknowledge is bounded by `close_wait_max` (a peer that is gone never does).
    pub async fn shutdown(&self) {
        self.inner.shutdown_now();
        let wait = self.inner.cfg.close_wait_max;
        if tokio::time::timeout(wait, self.inner.endpoint.wait_idle())
            .await
            .is_err()
        {
            info!(
                node = self.inner.cfg.node,
                connections = self.inner.endpoint.open_connections(),
                "closed without every peer acknowledging within {wait:?} (gone peers never do)"
            );
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.inner.shutdown_now();
    }
}

enum AttemptError {
    /// Stream or connection trouble: resume on a new stream.
    Retry(String),
    /// The receiver declined the offer.
    Rejected(String),
    /// The local source failed: retrying would fail the same way.
    Fatal(Error),
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
async fn read_full(recv: &mut RecvStream, buf: &mut [u8]) -> std::result::Result<bool, String> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await {
            Ok(Some(n)) => filled += n,
            Ok(None) if filled == 0 => return Ok(false),
            Ok(None) => {
                return Err(format!(
                    "stream ended after {filled} of {} bytes",
                    buf.len()
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(true)
}

async fn read_exact_msg(recv: &mut RecvStream, buf: &mut [u8]) -> std::result::Result<(), String> {
    match read_full(recv, buf).await? {
        true => Ok(()),
        false => Err("stream ended early".into()),
    }
}

/// Reads a hello (or hello answer, as `what` says): magic and version first, so a peer speaking another
/// protocol version is told so rather than cut off mid-read; then the rest, decoded strictly.
async fn read_hello(recv: &mut RecvStream, what: &str) -> std::result::Result<wire::Hello, String> {
    let mut raw = [0u8; wire::HELLO_BYTES];
    let (head, rest) = raw.split_at_mut(wire::HELLO_HEAD_BYTES);
    read_exact_msg(recv, head)
        .await
        .map_err(|e| format!("waiting for {what}: {e}"))?;
    wire::check_hello_head(head).map_err(|e| format!("malformed {what}: {e}"))?;
    read_exact_msg(recv, rest)
        .await
        .map_err(|e| format!("waiting for {what}: {e}"))?;
    wire::Hello::decode(&raw).map_err(|e| format!("malformed {what}: {e}"))
}

impl Inner {
    fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.cfg.bind)
    }

    fn peer(&self, node: NodeId) -> Result<Arc<Peer>> {
        self.peers
            .lock()
            .expect("peers lock")
            .get(&node)
            .cloned()
            .ok_or(Error::UnknownPeer { node })
    }

    /// Returns the peer, creating it (and its writer task) on first sight.
    fn peer_entry(self: &Arc<Self>, node: NodeId) -> Arc<Peer> {
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some(p) = peers.get(&node) {
            return p.clone();
        }
        let peer = Arc::new(Peer {
            id: node,
            addr: Mutex::new(None),
            link: watch::channel(None).0,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            stop: watch::channel(*self.shutdown.borrow()).0,
            dialer_started: AtomicBool::new(false),
            counters: Counters::default(),
        });
        peers.insert(node, peer.clone());
        tokio::spawn(self.clone().write_loop(peer.clone()));
        peer
    }

    fn shutdown_now(&self) {
        if self.shutdown.send_replace(true) {
            return;
        }
        for peer in self.peers.lock().expect("peers lock").values() {
            peer.stop.send_replace(true);
        }
        self.endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutting down");
    }

    async fn wait_link(&self, peer: &Peer, timeout: Duration) -> Option<Link> {
        let mut rx = peer.link.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(l) = peer.live_link() {
                    return Some(l);
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return None },
                    _ = peer.stopped() => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Makes `new` the peer's connection unless a live one should win.
    ///
    /// - The peer's incarnation changed: it restarted, and the old connection (to the dead process) only
    ///   looks alive until the idle timeout. The new one wins and the old one is closed (`PEER_RESTARTED`).
    ///   Without this, a restarted node with the higher id would lose the tie-break below to the dead
    ///   connection, and this side, seeing a live link, would not redial until the idle timeout.
    /// - Same incarnation, same dialer: the new one replaces the old one (the dialer saw the old one die).
    /// - Same incarnation, both dialed at once: both ends keep the connection dialed by the lower node id.
    fn install(self: &Arc<Self>, peer: &Arc<Peer>, new: Link) -> bool {
        if *peer.stop.borrow() {
            new.conn
                .close(VarInt::from_u32(code::BY_REQUEST), b"peer removed");
            return false;
        }
        let preferred_dialer = self.cfg.node.min(peer.id);
        let mut installed = false;
        let mut loser = None;
        let mut restarted_from = None;
        peer.link.send_modify(|cur| match cur {
            Some(old) if old.conn.close_reason().is_none() => {
                if old.incarnation != new.incarnation {
                    restarted_from = Some(old.incarnation);
                    loser = Some(old.conn.clone());
                    *cur = Some(new.clone());
                    installed = true;
                } else if old.dialed_by == new.dialed_by || new.dialed_by == preferred_dialer {
                    loser = Some(old.conn.clone());
                    *cur = Some(new.clone());
                    installed = true;
                } else {
                    loser = Some(new.conn.clone());
                }
            }
            _ => {
                *cur = Some(new.clone());
                installed = true;
            }
        });
        match (loser, restarted_from) {
            (Some(c), Some(old)) => {
                info!(peer = %peer.name(),
                    old_incarnation = %format_args!("{old:016x}"),
                    new_incarnation = %format_args!("{:016x}", new.incarnation),
                    "peer restarted; closing the connection to its previous process");
                c.close(VarInt::from_u32(code::PEER_RESTARTED), b"peer restarted");
            }
            (Some(c), None) => {
                debug!(peer = %peer.name(), "closing duplicate connection");
                c.close(VarInt::from_u32(code::DUPLICATE), b"duplicate connection");
            }
            (None, _) => {}
        }
        if installed {
            peer.counters.connects.fetch_add(1, Ordering::Relaxed);
            info!(peer = %peer.name(), dialed_by = new.dialed_by,
                incarnation = %format_args!("{:016x}", new.incarnation), "connected");
            peer.wake.notify_one();
            tokio::spawn(self.clone().serve_connection(peer.clone(), new));
        }
        installed
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let inner = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match tokio::time::timeout(inner.cfg.handshake_timeout, inner.accept_one(incoming))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(remote = %remote, "rejected incoming connection: {e}"),
                    Err(_) => {
                        warn!(remote = %remote, "rejected incoming connection: handshake timed out")
                    }
                }
            });
        }
        debug!(node = self.cfg.node, "accept loop ended");
    }

    async fn accept_one(self: &Arc<Self>, incoming: quinn::Incoming) -> Result<()> {
        let remote = incoming.remote_address();
        // A TLS failure here (no certificate, or one not signed by the cluster CA) is the rejection of a node
        // without a valid certificate; the caller logs it with the remote address.
        let conn = incoming.await.map_err(|e| Error::Rejected {
            addr: remote,
            reason: format!("TLS handshake failed: {e}"),
        })?;
        let reject = |reason: String| {
            conn.close(VarInt::from_u32(code::HELLO_REJECTED), reason.as_bytes());
            Error::Rejected {
                addr: remote,
                reason,
            }
        };
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return Err(reject(format!("no hello stream: {e}"))),
        };
        let hello = match read_hello(&mut recv, "hello").await {
            Ok(h) => h,
            Err(e) => return Err(reject(e)),
        };
        let claimed = hello.node;
        if claimed == self.cfg.node {
            return Err(reject(format!("hello claims this node's own id {claimed}")));
        }
        // TLS 1.3 lets the client consider itself connected before we checked its certificate; the hello is
        // where the cert (already chain-verified by WebPkiClientVerifier) is bound to a node id.
        if let Some(certs) = tls::peer_certs(&conn) {
            if certs.is_empty() || !tls::cert_names_node(&certs[0], claimed) {
                return Err(reject(format!(
                    "hello claims node {claimed} but the certificate is not for {}",
                    tls::node_dns_name(claimed)
                )));
            }
        } else if !self.insecure() {
            return Err(reject("no client certificate".into()));
        }
        if send.write_all(&self.hello().encode()).await.is_err() || send.finish().is_err() {
            return Err(Error::Connect {
                peer: PeerName {
                    node: claimed,
                    addr: Some(remote),
                },
                reason: "connection lost while answering hello".into(),
            });
        }
        let peer = self.peer_entry(claimed);
        self.install(
            &peer,
            Link {
                conn,
                dialed_by: claimed,
                incarnation: hello.incarnation,
            },
        );
        Ok(())
    }

    fn insecure(&self) -> bool {
        self.insecure
    }

    fn hello(&self) -> wire::Hello {
        wire::Hello {
            node: self.cfg.node,
            incarnation: self.incarnation,
        }
    }

    /// Keeps a connection to a peer with a known address: dials when there is none, with exponential
    /// backoff between failures, and waits while one (in either direction) is up.
    async fn dial_loop(self: Arc<Self>, peer: Arc<Peer>) {
        let mut backoff = self.cfg.reconnect_backoff_min;
        let mut rx = peer.link.subscribe();
        loop {
            if *peer.stop.borrow() {
                return;
            }
            if let Some(link) = peer.live_link() {
                tokio::select! {
                    _ = link.conn.closed() => {}
                    _ = peer.stopped() => return,
                    _ = rx.changed() => {}
                }
                continue;
            }
            if self.cfg.node > peer.id {
                // Give the lower id the first chance to dial, so only one connection is usually made.
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.dial_defer) => {}
                    _ = peer.stopped() => return,
                }
                if peer.live_link().is_some() {
                    continue;
                }
            }
            let Some(addr) = *peer.addr.lock().expect("addr lock") else {
                return;
            };
            match tokio::time::timeout(self.cfg.handshake_timeout, self.dial(&peer, addr)).await {
                Ok(Ok(link)) => {
                    backoff = self.cfg.reconnect_backoff_min;
                    self.install(&peer, link);
                    continue;
                }
                Ok(Err(e)) if peer.live_link().is_some() => {
                    // Lost the tie-break to the peer's own dial: expected, not a failure.
                    debug!(peer = %peer.name(), "dial superseded by the peer's connection: {e}");
                    continue;
                }
                Ok(Err(e)) => {
                    peer.counters
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %peer.name(), retry_in = ?backoff, "dial failed: {e}");
                }
                Err(_) => {
                    peer.counters
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %peer.name(), retry_in = ?backoff, "dial timed out");
                }
            }
            // Jitter keeps two restarting nodes from dialing each other in lockstep.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = peer.stopped() => return,
                _ = rx.changed() => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_backoff_max);
        }
    }

    async fn dial(&self, peer: &Peer, addr: SocketAddr) -> Result<Link> {
        let name = PeerName {
            node: peer.id,
            addr: Some(addr),
        };
        let connect_err = |reason: String| Error::Connect { peer: name, reason };
        // The server name is what the client verifier checks the peer's certificate against: dialing node N
        // only succeeds if the other side holds N's certificate.
        let connecting = self
            .endpoint
            .connect_with(self.client_cfg.clone(), addr, &tls::node_dns_name(peer.id))
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = connecting.await.map_err(|e| connect_err(e.to_string()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        send.write_all(&self.hello().encode())
            .await
            .map_err(|e| connect_err(format!("sending hello: {e}")))?;
        let _ = send.finish();
        // The acceptor answers only after it verified our certificate and hello, so no frame is sent on a
        // connection the peer is about to reject.
        let answer = read_hello(&mut recv, "hello answer")
            .await
            .map_err(connect_err)?;
        let answered = answer.node;
        if answered != peer.id {
            conn.close(VarInt::from_u32(code::HELLO_REJECTED), b"wrong node");
            return Err(connect_err(format!("answered as node {answered}")));
        }
        Ok(Link {
            conn,
            dialed_by: self.cfg.node,
            incarnation: answer.incarnation,
        })
    }

    /// Receive side of one connection: the peer's frame stream(s) and snapshot streams.
    async fn serve_connection(self: Arc<Self>, peer: Arc<Peer>, link: Link) {
        let conn = link.conn.clone();
        loop {
            tokio::select! {
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => { tokio::spawn(self.clone().read_frames(peer.clone(), conn.clone(), recv)); }
                    Err(_) => break,
                },
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => { tokio::spawn(self.clone().receive_snapshot(peer.clone(), conn.clone(), send, recv)); }
                    Err(_) => break,
                },
                _ = peer.stopped() => {
                    // The peer was removed (or we shut down) possibly while this connection was being
                    // installed: close it here so it cannot linger on keep-alives.
                    conn.close(VarInt::from_u32(code::BY_REQUEST), b"peer removed");
                    break;
                }
            }
        }
        let reason = conn.closed().await;
        // Forget the connection unless a newer one already replaced it.
        let mut cleared = false;
        peer.link.send_if_modified(|cur| {
            if cur
                .as_ref()
                .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
            {
                *cur = None;
                cleared = true;
            }
            cleared
        });
        if cleared {
            info!(peer = %peer.name(), %reason, "connection closed");
        }
    }

    fn protocol_violation(&self, peer: &Peer, conn: &Connection, reason: &str) {
        warn!(peer = %peer.name(), "closing connection: {reason}");
        conn.close(VarInt::from_u32(code::PROTOCOL), reason.as_bytes());
    }

    async fn read_frames(self: Arc<Self>, peer: Arc<Peer>, conn: Connection, mut recv: RecvStream) {
        let mut kind = [0u8; 1];
        match read_full(&mut recv, &mut kind).await {
            Ok(true) if kind[0] == wire::STREAM_FRAMES => {}
            Ok(true) => {
                return self.protocol_violation(
                    &peer,
                    &conn,
                    &format!("unknown unidirectional stream kind {}", kind[0]),
                )
            }
            _ => return,
        }
        let max = self.cfg.frame_bytes_max;
        let mut buf = BytesMut::new();
        loop {
            loop {
                match wire::decode_frame(&mut buf, max) {
                    Ok(Some(frame)) => {
                        peer.counters
                            .frames_received
                            .fetch_add(1, Ordering::Relaxed);
                        let msg = Received {
                            from: peer.id,
                            frame,
                        };
                        if self.received.send(msg).await.is_err() {
                            return; // The application dropped its receiver: shutting down.
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return self.protocol_violation(
                            &peer,
                            &conn,
                            &format!("malformed frame: {e}"),
                        )
                    }
                }
            }
            match recv.read_chunk(max.min(1 << 20), true).await {
                Ok(Some(chunk)) => {
                    // One allocation per frame: reserve the rest of the frame whose length
                    // prefix has arrived (bounded by `frame_bytes_max`, checked by the decoder
                    // above), instead of growing the buffer chunk by chunk.
                    if buf.len() >= wire::FRAME_LEN_BYTES {
                        let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
                        let want = wire::FRAME_LEN_BYTES + (len as usize).min(max);
                        buf.reserve(want.saturating_sub(buf.len()).max(chunk.bytes.len()));
                    }
                    buf.extend_from_slice(&chunk.bytes)
                }
                Ok(None) => {
                    if !buf.is_empty() {
                        self.protocol_violation(&peer, &conn, "frame stream ended inside a frame");
                    }
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Send side for one peer: waits for queued frames and a connection, then writes everything queued
    /// (control lane first, up to `flush_bytes_max`) in one write on the connection's frame stream.
    async fn write_loop(self: Arc<Self>, peer: Arc<Peer>) {
        let mut link_rx = peer.link.subscribe();
        let mut stream: Option<(usize, SendStream)> = None;
        // Headers and payloads of the frames to write, as chunks quinn takes over without a copy
        // (a raft frame's payload is written once, by its encoder).
        let mut batch: Vec<Bytes> = Vec::new();
        loop {
            let link = match peer.live_link() {
                Some(l) => l,
                None => {
                    stream = None;
                    tokio::select! {
                        r = link_rx.changed() => if r.is_err() { return },
                        _ = peer.stopped() => return,
                    }
                    continue;
                }
            };
            let (frames, bytes) = take_batch(&peer, self.cfg.flush_bytes_max, &mut batch);
            if frames == 0 {
                tokio::select! {
                    _ = peer.wake.notified() => {}
                    _ = link_rx.changed() => {}
                    _ = peer.stopped() => return,
                }
                continue;
            }
            if stream
                .as_ref()
                .is_none_or(|(id, _)| *id != link.conn.stable_id())
            {
                stream = match open_frame_stream(&link.conn).await {
                    Ok(s) => Some((link.conn.stable_id(), s)),
                    Err(e) => {
                        peer.counters
                            .frames_dropped
                            .fetch_add(frames, Ordering::Relaxed);
                        debug!(peer = %peer.name(), "opening frame stream failed: {e}");
                        batch.clear();
                        continue;
                    }
                };
            }
            let (_, send) = stream.as_mut().expect("stream just ensured");
            match send.write_all_chunks(&mut batch).await {
                Ok(()) => {
                    peer.counters
                        .frames_sent
                        .fetch_add(frames, Ordering::Relaxed);
                    peer.counters
                        .bytes_sent
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    peer.counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // The connection is going away; raft retransmits, so the batch is dropped, not requeued.
                    peer.counters
                        .frames_dropped
                        .fetch_add(frames, Ordering::Relaxed);
                    debug!(peer = %peer.name(), "frame write failed: {e}");
                    stream = None;
                }
            }
            batch.clear();
        }
    }

    async fn receive_snapshot(
        self: Arc<Self>,
        peer: Arc<Peer>,
        conn: Connection,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        match self
            .receive_snapshot_inner(&peer, &mut send, &mut recv)
            .await
        {
            Ok(()) => {}
            Err(SnapshotRecvError::Interrupted(reason)) => {
                debug!(peer = %peer.name(), %reason, "snapshot stream interrupted");
            }
            Err(SnapshotRecvError::Violation(reason)) => {
                warn!(peer = %peer.name(), "aborting snapshot stream: {reason}");
                let _ = send.reset(VarInt::from_u32(code::SNAPSHOT_ABORTED));
                let _ = recv.stop(VarInt::from_u32(code::SNAPSHOT_ABORTED));
            }
            Err(SnapshotRecvError::NotSnapshot(kind)) => {
                self.protocol_violation(
                    &peer,
                    &conn,
                    &format!("unknown bidirectional stream kind {kind}"),
                );
            }
        }
    }

    async fn receive_snapshot_inner(
        &self,
        peer: &Peer,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> std::result::Result<(), SnapshotRecvError> {
        use SnapshotRecvError::*;
        let mut kind = [0u8; 1];
        read_exact_msg(recv, &mut kind).await.map_err(Interrupted)?;
        if kind[0] != wire::STREAM_SNAPSHOT {
            return Err(NotSnapshot(kind[0]));
        }
        let mut raw = [0u8; wire::SNAPSHOT_OFFER_BYTES];
        read_exact_msg(recv, &mut raw).await.map_err(Interrupted)?;
        let o = wire::SnapshotOfferWire::decode(&raw);
        let offer = SnapshotOffer {
            from: peer.id,
            group: o.group,
            snapshot_id: o.snapshot_id,
            total_len: o.total_len,
        };
        let opened = match &self.snapshots {
            Some(r) => r.open(&offer),
            None => Err(std::io::Error::other("this node accepts no snapshots")),
        };
        let mut sink = match opened {
            Ok(s) => s,
            Err(e) => {
                warn!(peer = %peer.name(), group = offer.group, snapshot_id = offer.snapshot_id, "snapshot offer rejected: {e}");
                let _ = send
                    .write_all(&wire::encode_snapshot_reply(wire::SNAPSHOT_REJECTED, 0))
                    .await;
                let _ = send.finish();
                return Ok(());
            }
        };
        let mut offset = sink.durable_offset();
        if offset > offer.total_len {
            return Err(Violation(format!(
                "sink's durable offset {offset} exceeds the snapshot length {}",
                offer.total_len
            )));
        }
        send.write_all(&wire::encode_snapshot_reply(
            wire::SNAPSHOT_RESUME_AT,
            offset,
        ))
        .await
        .map_err(|e| Interrupted(e.to_string()))?;
        debug!(peer = %peer.name(), group = offer.group, snapshot_id = offer.snapshot_id, offset, "receiving snapshot");
        let mut data = Vec::new();
        loop {
            let mut raw = [0u8; wire::CHUNK_HEADER_BYTES];
            if !read_full(recv, &mut raw).await.map_err(Interrupted)? {
                break;
            }
            let h = wire::ChunkHeader::decode(&raw);
            let len = h.len as usize;
            if h.offset != offset {
                return Err(Violation(format!(
                    "chunk at offset {} but expected {offset}",
                    h.offset
                )));
            }
            if h.zeros {
                if len == 0 || h.crc != 0 || offset + h.len as u64 > offer.total_len {
                    return Err(Violation(format!(
                        "bad zero run of {len} bytes at {offset} (crc field {:#010x}, snapshot length {})",
                        h.crc, offer.total_len
                    )));
                }
                sink.write_zeros(offset, h.len as u64)
                    .map_err(|e| Violation(format!("sink zero write at {offset}: {e}")))?;
                offset += h.len as u64;
                continue;
            }
            if len == 0 || len > self.cfg.snapshot_chunk_bytes_max {
                return Err(Violation(format!(
                    "chunk of {len} bytes (snapshot_chunk_bytes_max {})",
                    self.cfg.snapshot_chunk_bytes_max
                )));
            }
            if offset + h.len as u64 > offer.total_len {
                return Err(Violation(format!(
                    "chunk {}..{} runs past the snapshot length {}",
                    offset,
                    offset + h.len as u64,
                    offer.total_len
                )));
            }
            data.resize(len, 0);
            read_exact_msg(recv, &mut data).await.map_err(Interrupted)?;
            let crc = crc32fast::hash(&data);
            if crc != h.crc {
                return Err(Violation(format!(
                    "crc mismatch in chunk at offset {offset}: got {crc:#010x}, header says {:#010x}",
                    h.crc
                )));
            }
            sink.write_at(offset, &data)
                .map_err(|e| Violation(format!("sink write at {offset}: {e}")))?;
            offset += h.len as u64;
        }
        if offset != offer.total_len {
            return Err(Violation(format!(
                "stream ended at offset {offset} of {}",
                offer.total_len
            )));
        }
        sink.finish()
            .map_err(|e| Violation(format!("sink finish: {e}")))?;
        send.write_all(&wire::encode_snapshot_reply(wire::SNAPSHOT_DONE, offset))
            .await
            .map_err(|e| Interrupted(e.to_string()))?;
        let _ = send.finish();
        info!(peer = %peer.name(), group = offer.group, snapshot_id = offer.snapshot_id, bytes = offset, "snapshot received");
        Ok(())
    }

    async fn snapshot_attempt<S: SnapshotSource + ?Sized>(
        &self,
        link: &Link,
        offer: wire::SnapshotOfferWire,
        source: &mut S,
        buf: &mut [u8],
        sent: &mut SnapshotSent,
    ) -> std::result::Result<(), AttemptError> {
        use AttemptError::*;
        let retry = |e: &dyn std::fmt::Display| Retry(e.to_string());
        let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| retry(&e))?;
        // Below the frame stream's priority: heartbeats and appends go first when both are ready.
        let _ = send.set_priority(-1);
        let mut head = [0u8; 1 + wire::SNAPSHOT_OFFER_BYTES];
        head[0] = wire::STREAM_SNAPSHOT;
        head[1..].copy_from_slice(&offer.encode());
        send.write_all(&head).await.map_err(|e| retry(&e))?;
        let mut reply = [0u8; wire::SNAPSHOT_REPLY_BYTES];
        read_exact_msg(&mut recv, &mut reply)
            .await
            .map_err(|e| retry(&e))?;
        let (status, mut offset) = wire::decode_snapshot_reply(&reply).map_err(|e| retry(&e))?;
        match status {
            wire::SNAPSHOT_REJECTED => return Err(Rejected("receiver rejected the offer".into())),
            wire::SNAPSHOT_RESUME_AT if offset <= offer.total_len => {}
            _ => {
                return Err(Rejected(format!(
                    "unexpected reply status {status} offset {offset} to an offer of {} bytes",
                    offer.total_len
                )))
            }
        }
        sent.start_offsets.push(offset);
        let source_err = |offset, source| {
            Fatal(Error::SnapshotSource {
                group: offer.group,
                offset,
                source,
            })
        };
        while offset < offer.total_len {
            let left = offer.total_len - offset;
            let data = match source.run_at(offset).map_err(|e| source_err(offset, e))? {
                Run::Zeros(n) if n > 0 => {
                    let n = n.min(left).min(wire::ZERO_RUN_BYTES_MAX as u64) as u32;
                    let header = wire::ChunkHeader::zero_run(offset, n);
                    send.write_all(&header.encode())
                        .await
                        .map_err(|e| retry(&e))?;
                    sent.zero_bytes += n as u64;
                    offset += n as u64;
                    continue;
                }
                Run::Zeros(_) => left,
                Run::Data(n) => n.max(1),
            };
            let len = left.min(data).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..len];
            source
                .read_at(offset, chunk)
                .map_err(|e| source_err(offset, e))?;
            let wait = self
                .throttle
                .lock()
                .expect("throttle lock")
                .reserve(Instant::now(), len as u64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let header = wire::ChunkHeader::for_bytes(offset, chunk);
            let mut parts = [
                Bytes::copy_from_slice(&header.encode()),
                Bytes::copy_from_slice(chunk),
            ];
            send.write_all_chunks(&mut parts)
                .await
                .map_err(|e| retry(&e))?;
            sent.bytes_sent += len as u64;
            offset += len as u64;
        }
        send.finish().map_err(|e| retry(&e))?;
        read_exact_msg(&mut recv, &mut reply)
            .await
            .map_err(|e| retry(&e))?;
        match wire::decode_snapshot_reply(&reply).map_err(|e| retry(&e))? {
            (wire::SNAPSHOT_DONE, _) => Ok(()),
            (status, off) => Err(Retry(format!("unexpected final status {status} at {off}"))),
        }
    }
}

enum SnapshotRecvError {
    /// The stream or connection went away; the sender will resume.
    Interrupted(String),
    /// The sender broke the protocol (or the sink failed): the stream is reset.
    Violation(String),
    NotSnapshot(u8),
}

async fn open_frame_stream(conn: &Connection) -> std::result::Result<SendStream, String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    let _ = s.set_priority(1);
    s.write_all(&[wire::STREAM_FRAMES])
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Moves queued frames into `batch` (a header chunk and a payload chunk each), control lane first,
/// until `flush_bytes_max` (at least one frame); returns the frames and their wire bytes.
fn take_batch(peer: &Peer, flush_bytes_max: usize, batch: &mut Vec<Bytes>) -> (u64, usize) {
    let mut q = peer.queue.lock().expect("queue lock");
    let mut frames = 0u64;
    let mut bytes = 0usize;
    let q = &mut *q;
    for (lane, lane_bytes) in [
        (&mut q.control, &mut q.control_bytes),
        (&mut q.data, &mut q.data_bytes),
    ] {
        while let Some(f) = lane.front() {
            if frames > 0 && bytes + f.wire_len() > flush_bytes_max {
                return (frames, bytes);
            }
            let f = lane.pop_front().expect("front exists");
            *lane_bytes -= f.wire_len();
            bytes += f.wire_len();
            batch.push(Bytes::copy_from_slice(&f.header()));
            if !f.payload.is_empty() {
                batch.push(f.payload);
            }
            frames += 1;
        }
    }
    (frames, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_bandwidth_delay_product() {
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // 10 Gbit/s × 2 ms = 2.5 MB.
        let c = Config::new(1, bind).with_windows_for(1_250_000_000, Duration::from_millis(2));
        assert_eq!(c.stream_window_bytes, 2_500_000);
        assert_eq!(c.connection_window_bytes, 10_000_000);
        // Tiny paths still get a usable window.
        let c = Config::new(1, bind).with_windows_for(1_000_000, Duration::from_micros(50));
        assert_eq!(c.stream_window_bytes, 1 << 20);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn batches_lead_with_control_and_respect_the_flush_limit() {
        let peer = Peer {
            id: 2,
            addr: Mutex::new(None),
            link: watch::channel(None).0,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            stop: watch::channel(false).0,
            dialer_started: AtomicBool::new(false),
            counters: Counters::default(),
        };
        {
            let mut q = peer.queue.lock().unwrap();
            for i in 0..10u8 {
                let f = Frame::new(i, 0, vec![0u8; 91]); // 104 bytes on the wire
                q.data_bytes += f.wire_len();
                q.data.push_back(f);
            }
            let hb = Frame::new(100, 0, vec![0u8; 91]);
            q.control_bytes += hb.wire_len();
            q.control.push_back(hb);
        }
        let mut chunks = Vec::new();
        let (frames, bytes) = take_batch(&peer, 350, &mut chunks);
        assert_eq!((frames, bytes), (3, 312));
        let mut batch = BytesMut::new();
        chunks.iter().for_each(|c| batch.extend_from_slice(c));
        assert_eq!(batch.len(), bytes);
        let first = wire::decode_frame(&mut batch, 1 << 20).unwrap().unwrap();
        assert_eq!(first.kind, 100, "control lane first");
        assert_eq!(
            wire::decode_frame(&mut batch, 1 << 20)
                .unwrap()
                .unwrap()
                .kind,
            0
        );
        let q = peer.queue.lock().unwrap();
        assert_eq!((q.control_bytes, q.data_bytes), (0, 8 * 104));
        drop(q);
        // A frame larger than the flush limit still goes out alone rather than getting stuck.
        assert_eq!(take_batch(&peer, 10, &mut Vec::new()).0, 1);
    }
}
