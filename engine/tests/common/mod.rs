//! Setup shared by the engine's integration tests: loopback addresses and the settings every
//! test engine starts from.
#![allow(dead_code)] // each test file uses its part

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use engine::{BgSpec, EngineConfig};

/// A loopback address with a UDP port that was free a moment ago.
pub fn loopback_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Loopback addresses of nodes 1..=n.
pub fn cluster_addrs(n: u64) -> BTreeMap<u64, SocketAddr> {
    (1..=n).map(|id| (id, loopback_addr())).collect()
}

/// Node `id` of the cluster `addrs` (every other node a peer), data in `dir/node<id>`, one
/// unpinned core (tests share the machine), groups `bgs` of `bg_bytes` with every node of
/// `addrs` as a member.
pub fn node_config(
    dir: &Path,
    id: u64,
    addrs: &BTreeMap<u64, SocketAddr>,
    bgs: impl IntoIterator<Item = u64>,
    bg_bytes: u64,
) -> EngineConfig {
    let mut c = EngineConfig::new(id, dir.join(format!("node{id}")), addrs[&id]);
    c.cores = 1;
    c.pin_cores = false;
    c.peers = addrs
        .iter()
        .filter(|(k, _)| **k != id)
        .map(|(k, v)| (*k, *v))
        .collect();
    c.bgs = bgs
        .into_iter()
        .map(|bg| BgSpec {
            id: bg,
            members: addrs.keys().copied().collect(),
            size_bytes: bg_bytes,
            join: false,
            preallocate: false,
        })
        .collect();
    c
}

/// A one-node cluster (node 1, each group's only member) with groups `bgs` of `bg_bytes`.
pub fn single_node_config(
    dir: &Path,
    bgs: impl IntoIterator<Item = u64>,
    bg_bytes: u64,
) -> EngineConfig {
    node_config(dir, 1, &cluster_addrs(1), bgs, bg_bytes)
}
