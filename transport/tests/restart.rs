//! A node killed without closing its connections (SIGKILL) and restarted on the same address must be
//! talking to its peers again quickly, not after the survivors' QUIC idle timeout.
//!
//! Each node runs on its own tokio runtime. Killing a node drops its runtime first — every task, the
//! endpoint driver included, is gone without sending a CONNECTION_CLOSE — and only then the `Transport`
//! (whose graceful close then has no task left to send anything), which frees the UDP port for the
//! restarted node. The survivors' idle timeout is 30 s, so only the incarnation check can make the
//! reconnect fast.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::runtime::Runtime;
use transport::{Config, Frame, Lane, NodeId, Security, SnapshotReceiver, Transport};

const IDLE: Duration = Duration::from_secs(30);
/// Well under `IDLE`: before the fix, a restarted higher id waited for the survivor's idle timeout.
const RECONNECT_BOUND: Duration = Duration::from_secs(5);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// One node and the runtime its tasks run on.
struct Proc {
    rt: Runtime,
    node: Node,
}

fn config(id: NodeId, bind: SocketAddr) -> Config {
    let mut cfg = fast_config(id);
    cfg.bind = bind;
    cfg.idle_timeout = IDLE;
    cfg
}

fn launch(pki: &Pki, id: NodeId, bind: SocketAddr, peers: &[(NodeId, SocketAddr)]) -> Proc {
    let rt = runtime();
    let node = {
        let _ctx = rt.enter();
        let snaps = Arc::new(MemSnapshots::default());
        // The killed process's port is free once its runtime and transport are dropped; allow a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        let (t, rx) = loop {
            match Transport::bind(
                config(id, bind),
                Security::MutualTls(pki.identity(id)),
                Some(snaps.clone() as Arc<dyn SnapshotReceiver>),
            ) {
                Ok(bound) => break bound,
                Err(e) if Instant::now() > deadline => panic!("node {id} cannot bind {bind}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Node { t, rx, snaps }
    };
    let p = Proc { rt, node };
    add_peers(&p, peers);
    p
}

fn add_peers(p: &Proc, peers: &[(NodeId, SocketAddr)]) {
    let _ctx = p.rt.enter();
    for &(id, addr) in peers {
        p.node.t.add_peer(id, addr).unwrap();
    }
}

/// SIGKILL: no task of the node runs again and nothing is sent to its peers.
fn kill(p: Proc) {
    let Proc { rt, node } = p;
    drop(rt);
    drop(node);
}

/// Sends `tag` frames from `a` to `b` until one arrives; returns how long that took.
fn until_frame_flows(a: &Proc, b: &mut Proc, tag: &str) -> Duration {
    let start = Instant::now();
    let to = b.node.t.node();
    let from = a.node.t.node();
    let rx = &mut b.node.rx;
    b.rt.block_on(async {
        loop {
            a.node
                .t
                .send(to, Frame::new(9, 1, tag.to_string()), Lane::Control)
                .unwrap();
            match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
                Ok(Some(m)) if m.from == from && m.frame.payload == tag.as_bytes() => {
                    return start.elapsed()
                }
                Ok(Some(_)) => {} // earlier frames (other tags or peers)
                Ok(None) => panic!("receive channel closed"),
                Err(_) => assert!(
                    start.elapsed() < IDLE,
                    "no frame {from}->{to} ({tag}) within the idle timeout"
                ),
            }
        }
    })
}

/// Starts `ids` fully meshed, checks traffic, kills `victim` and restarts it on the same address, then
/// checks that frames flow between it and every survivor, both ways, within `RECONNECT_BOUND`.
fn restart_case(ids: &[NodeId], victim: NodeId) {
    let pki = Pki::new();
    // Reserve addresses: bind port 0 once, remember it, let the transport bind it.
    let addrs: Vec<(NodeId, SocketAddr)> = ids
        .iter()
        .map(|&id| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            (id, s.local_addr().unwrap())
        })
        .collect();
    let peers_of = |id: NodeId| -> Vec<(NodeId, SocketAddr)> {
        addrs.iter().copied().filter(|&(p, _)| p != id).collect()
    };
    let addr_of = |id: NodeId| addrs.iter().find(|&&(p, _)| p == id).unwrap().1;
    // Every connection before the kill is dialed by the lower id (the case the old tie-break got wrong
    // for a restarted higher id): the lower ids learn the addresses first, the higher ids once connected.
    let mut procs: Vec<Proc> = ids
        .iter()
        .map(|&id| launch(&pki, id, addr_of(id), &[]))
        .collect();
    for p in &procs {
        let id = p.node.t.node();
        let higher: Vec<_> = peers_of(id).into_iter().filter(|&(q, _)| q > id).collect();
        add_peers(p, &higher);
    }
    for p in &procs {
        let id = p.node.t.node();
        for (q, _) in peers_of(id).into_iter().filter(|&(q, _)| q > id) {
            assert!(p.rt.block_on(p.node.t.wait_connected(q, WAIT)));
        }
    }
    for p in &procs {
        let id = p.node.t.node();
        let lower: Vec<_> = peers_of(id).into_iter().filter(|&(q, _)| q < id).collect();
        add_peers(p, &lower);
    }
    let idx = |id: NodeId| ids.iter().position(|&i| i == id).unwrap();
    let v = idx(victim);
    for &s in ids.iter().filter(|&&s| s != victim) {
        let s = idx(s);
        let (a, b) = two(&mut procs, s, v);
        until_frame_flows(a, b, "before");
        until_frame_flows(b, a, "before");
    }
    let old_incarnation = procs[v].node.t.incarnation();

    kill(procs.remove(v));
    let restarted_at = Instant::now();
    procs.insert(v, launch(&pki, victim, addr_of(victim), &peers_of(victim)));
    assert_ne!(procs[v].node.t.incarnation(), old_incarnation);

    for &s in ids.iter().filter(|&&s| s != victim) {
        let sid = s;
        let s = idx(s);
        let (a, b) = two(&mut procs, s, v);
        let to_victim = until_frame_flows(a, b, "after");
        let from_victim = until_frame_flows(b, a, "after");
        let since_restart = restarted_at.elapsed();
        eprintln!(
            "survivor {sid} <-> restarted {victim}: frames flow {:?} after the restart \
             (survivor->restarted {to_victim:?}, then restarted->survivor {from_victim:?})",
            since_restart
        );
        assert!(
            since_restart < RECONNECT_BOUND,
            "survivor {sid} and restarted node {victim} took {since_restart:?} to exchange frames"
        );
        assert!(procs[s].node.t.is_connected(victim));
    }
    // Not a graceful shutdown: wait_idle would wait out connections to already-gone peers.
    for p in procs {
        kill(p);
    }
}

/// Mutable access to two distinct procs.
fn two(procs: &mut [Proc], a: usize, b: usize) -> (&mut Proc, &mut Proc) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = procs.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = procs.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

#[test]
fn restarted_higher_id_reconnects_before_the_idle_timeout() {
    // The survivor (1) dialed the old connection, so the old tie-break kept it over the new one.
    restart_case(&[1, 2], 2);
}

#[test]
fn restarted_lower_id_reconnects_before_the_idle_timeout() {
    restart_case(&[1, 2], 1);
}

#[test]
fn restarted_middle_node_reconnects_to_lower_and_higher_survivors() {
    restart_case(&[1, 2, 3], 2);
}

/// A graceful shutdown while a peer is gone (killed without closing) must not wait out QUIC's
/// draining period for the dead connection: `close_wait_max` bounds it.
#[test]
fn shutdown_with_a_killed_peer_returns_within_close_wait_max() {
    let pki = Pki::new();
    let addrs: Vec<(NodeId, SocketAddr)> = [1, 2]
        .iter()
        .map(|&id| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            (id, s.local_addr().unwrap())
        })
        .collect();
    let survivor = launch(&pki, 1, addrs[0].1, &[addrs[1]]);
    let mut victim = launch(&pki, 2, addrs[1].1, &[addrs[0]]);
    until_frame_flows(&survivor, &mut victim, "before");
    kill(victim);
    // Unanswered traffic to the dead peer backs QUIC's probe timeout off, which lengthens the
    // draining period an unbounded shutdown would wait out (3 s right after the kill, more later).
    survivor.rt.block_on(async {
        for _ in 0..10 {
            let _ = survivor.node.t.send(
                2,
                Frame::new(9, 1, "to the dead".to_string()),
                Lane::Control,
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let close_wait_max = fast_config(1).close_wait_max;
    let started = Instant::now();
    survivor.rt.block_on(survivor.node.t.shutdown());
    let took = started.elapsed();
    eprintln!("shutdown with a killed peer took {took:?} (close_wait_max {close_wait_max:?})");
    // Without the bound this is QUIC's draining period for an unanswered close: many seconds.
    assert!(
        took < close_wait_max + Duration::from_millis(1500),
        "shutdown took {took:?} with close_wait_max {close_wait_max:?}"
    );
}
