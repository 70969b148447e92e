//! Shared helpers: a cluster CA in a temp dir, node identities, transports bound on 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{ConnectionError, VarInt};
use tokio::sync::mpsc;
use transport::tls::{client_crypto, node_dns_name};
use transport::wire;
use transport::{
    Config, NodeId, NodeIdentity, Received, Security, SnapshotOffer, SnapshotReceiver,
    SnapshotSink, Transport,
};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        transport::init_ca(&dir.path().join("ca")).unwrap();
        Pki { dir }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn identity(&self, node: NodeId) -> NodeIdentity {
        let out = self.dir.path().join(format!("node{node}"));
        if !out.join("node.pem").exists() {
            transport::issue_cert(&self.ca_dir(), node, &out).unwrap();
        }
        NodeIdentity::load(&out, node).unwrap()
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn fast_config(node: NodeId) -> Config {
    let mut cfg = Config::new(node, loopback());
    cfg.reconnect_backoff_min = Duration::from_millis(20);
    cfg.reconnect_backoff_max = Duration::from_millis(200);
    cfg.dial_defer = Duration::from_millis(50);
    cfg.handshake_timeout = Duration::from_secs(3);
    cfg
}

pub struct Node {
    pub t: Transport,
    pub rx: mpsc::Receiver<Received>,
    pub snaps: Arc<MemSnapshots>,
}

pub fn start(cfg: Config, security: Security) -> Node {
    let snaps = Arc::new(MemSnapshots::default());
    let (t, rx) = Transport::bind(
        cfg,
        security,
        Some(snaps.clone() as Arc<dyn SnapshotReceiver>),
    )
    .unwrap();
    Node { t, rx, snaps }
}

/// Starts mutual-TLS nodes with the given ids, all peered with each other.
pub fn mesh(pki: &Pki, ids: &[NodeId]) -> Vec<Node> {
    let nodes: Vec<Node> = ids
        .iter()
        .map(|&id| start(fast_config(id), Security::MutualTls(pki.identity(id))))
        .collect();
    for a in &nodes {
        for b in &nodes {
            if a.t.node() != b.t.node() {
                a.t.add_peer(b.t.node(), b.t.local_addr()).unwrap();
            }
        }
    }
    nodes
}

pub async fn recv(node: &mut Node) -> Received {
    tokio::time::timeout(WAIT, node.rx.recv())
        .await
        .expect("timed out waiting for a frame")
        .expect("channel closed")
}

/// Asserts that nothing arrives for `quiet`.
pub async fn assert_silent(node: &mut Node, quiet: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(quiet, node.rx.recv()).await {
        panic!("unexpected frame from node {}: {:?}", m.from, m.frame);
    }
}

/// (from, group, snapshot_id)
pub type SnapshotKey = (NodeId, u64, u64);

/// In-memory snapshot store that keeps partial transfers, so a re-offer resumes.
#[derive(Default)]
pub struct MemSnapshots {
    pub parts: Mutex<HashMap<SnapshotKey, Arc<Mutex<Partial>>>>,
}

#[derive(Default, Debug)]
pub struct Partial {
    pub data: Vec<u8>,
    pub finished: bool,
    /// Offset reported at each open.
    pub opens: Vec<u64>,
}

impl MemSnapshots {
    pub fn get(&self, from: NodeId, group: u64, id: u64) -> Option<Arc<Mutex<Partial>>> {
        self.parts.lock().unwrap().get(&(from, group, id)).cloned()
    }
}

impl SnapshotReceiver for MemSnapshots {
    fn open(&self, offer: &SnapshotOffer) -> std::io::Result<Box<dyn SnapshotSink>> {
        let part = self
            .parts
            .lock()
            .unwrap()
            .entry((offer.from, offer.group, offer.snapshot_id))
            .or_default()
            .clone();
        let durable = part.lock().unwrap().data.len() as u64;
        part.lock().unwrap().opens.push(durable);
        Ok(Box::new(MemSink { part, durable }))
    }
}

struct MemSink {
    part: Arc<Mutex<Partial>>,
    durable: u64,
}

impl SnapshotSink for MemSink {
    fn durable_offset(&self) -> u64 {
        self.durable
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut p = self.part.lock().unwrap();
        let off = offset as usize;
        if p.data.len() < off {
            return Err(std::io::Error::other("gap in snapshot data"));
        }
        p.data.truncate(off);
        p.data.extend_from_slice(data);
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.part.lock().unwrap().finished = true;
        Ok(())
    }
}

/// Captures the log output of the current thread (tests run on a current_thread runtime, so every task of
/// the test logs on its thread). One global subscriber routes each line to the capturing thread's buffer:
/// per-thread scoped subscribers would race on tracing's global per-callsite interest cache.
#[derive(Clone, Default)]
pub struct LogCapture(pub Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<LogCapture>> = const { std::cell::RefCell::new(None) };
}

pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

#[derive(Clone, Copy)]
struct RouteToThread;

impl Write for RouteToThread {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(cap) = c.borrow().as_ref() {
                cap.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn install(&self) -> CaptureGuard {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            let sub = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(|| RouteToThread)
                .finish();
            tracing::subscriber::set_global_default(sub).unwrap();
        });
        CAPTURE.with(|c| *c.borrow_mut() = Some(self.clone()));
        CaptureGuard
    }
}

/// A bare quinn client presenting `id`'s certificate, for speaking (or breaking) the protocol by hand.
pub async fn raw_connect(
    id: NodeIdentity,
    server: SocketAddr,
    server_node: NodeId,
) -> Result<quinn::Connection, ConnectionError> {
    let crypto = client_crypto(&Security::MutualTls(id)).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let ep = quinn::Endpoint::client(loopback()).unwrap();
    ep.connect_with(cfg, server, &node_dns_name(server_node))
        .unwrap()
        .await
}

/// Sends a hello claiming `claim`; returns the node id the server answers with.
pub async fn hello(conn: &quinn::Connection, claim: NodeId) -> Result<NodeId, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&wire::encode_hello(claim))
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let mut ack = [0u8; wire::HELLO_BYTES];
    recv.read_exact(&mut ack).await.map_err(|e| e.to_string())?;
    wire::decode_hello(&ack).map_err(|e| e.to_string())
}

pub async fn closed_with(conn: &quinn::Connection, expected: u32) {
    let reason = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("server did not close");
    match reason {
        ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, VarInt::from_u32(expected), "{c:?}")
        }
        other => panic!("expected application close {expected}, got {other}"),
    }
}
