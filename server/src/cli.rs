//! `bd-server`'s command line: `run`, `dev`, `init-ca`, `issue-cert`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::{error, info, warn};

use crate::backend::BgBackend;
use crate::config::{BgConfig, PeerConfig, ServerConfig, BG_SIZE_BYTES_DEFAULT};
use crate::error::Error;
use crate::nbd::{Exports, NbdConfig, NbdServerHandle};
use crate::units::{parse_block_size, size_parser, SizeRule};

/// Largest NBD read or write (advertised maximum block size). Bounded well below the transport's
/// frame limit because a follower forwards the whole request to the leader in one frame.
pub const NBD_REQUEST_BYTES_MAX: u32 = 4 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "bd-server",
    version,
    about = "bd: a Raft-replicated block device served over NBD",
    long_about = "bd: a Raft-replicated block device served over NBD.\n\n\
        Quick start: `bd-server dev` starts a local 3-node cluster and prints the NBD URI of each node \
        (nbd://127.0.0.1:10809/bg0 ...). Try: qemu-io -f raw nbd://127.0.0.1:10809/bg0 -c 'write -P 0xab 0 1M'.\n\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change the level."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one node (settings from --config and/or flags; flags win).
    Run(Box<RunArgs>),
    /// Start a local cluster on loopback (3 processes by default, `--nodes` up to 9; insecure
    /// transport) with block group bg0 (`--bgs` for more, each on three nodes), print each
    /// node's command line and NBD URIs, restart a node that dies. Ctrl-C stops it.
    Dev(DevArgs),
    /// Create a cluster CA (ca.pem, ca.key) in DIR. Keep ca.key off the nodes.
    InitCa {
        /// Directory for ca.pem and ca.key (created; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (node.pem, node.key, ca.pem) signed by the CA in --ca-dir.
    IssueCert {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// Directory for the node's files; pass it as `tls_dir` / --tls-dir to `run`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// TOML config file (keys: see docs/server.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (> 0, unique in the cluster; required here or in the file).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Directory for the WAL, data and meta files of this node.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Core threads (0 = one per CPU). Every node of a cluster must use the same count.
    #[arg(long)]
    pub cores: Option<usize>,
    /// NBD listen address.
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// QUIC listen address of core 0 (core N uses port + N).
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    /// HTTP status listen address.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// A peer as ID=QUIC_ADDR (repeat for each peer).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<PeerConfig>,
    /// A block group this node holds, with this node and every --peer as members, or those of
    /// --bg-members (repeat).
    #[arg(long = "bg")]
    pub bgs: Vec<u64>,
    /// A block group this node holds a replica of that is not a member yet: it waits until the
    /// leader adds it (`bdctl add-peer`). Its members are --bg-members, else every --peer
    /// (repeat).
    #[arg(long = "join-bg", value_name = "BG")]
    pub join_bgs: Vec<u64>,
    /// Initial members of the groups of --bg and --join-bg, as node ids (e.g. 1,2,3); default:
    /// this node (for --bg) and every --peer.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub bg_members: Vec<u64>,
    /// Size of the groups given with --bg and --join-bg: bytes or a binary unit (64MiB, 1G,
    /// 1TiB), a multiple of 4096 (default 1GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    pub bg_size_bytes: Option<u64>,
    /// Allocate the data files of the groups given with --bg and --join-bg in full when they
    /// are created (thick). Default: thin (sparse; space is taken on first write and given back
    /// by TRIM), so a full disk shows up at a write rather than at creation.
    #[arg(long)]
    pub bg_preallocate: bool,
    /// Directory with node.pem, node.key and ca.pem (from `issue-cert`).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// No TLS (self-signed, nothing verified): only for a local cluster on loopback.
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Raft tick period (default 50).
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Election timeout; each node waits a random 1-2x of it (default 1000).
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// Heartbeat period = election timeout / this factor (default 10).
    #[arg(long)]
    pub heartbeat_factor: Option<u64>,
    /// Log entries in one AppendEntries, at most (default 256).
    #[arg(long)]
    pub max_entries_per_message: Option<usize>,
    /// Entry bytes in one AppendEntries, at most (default 1MiB; sizes take K/M/G/T or
    /// KiB/MiB/GiB/TiB, powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<usize>(SizeRule::Positive))]
    pub max_bytes_per_message: Option<usize>,
    /// WAL segment file size (default 64MiB).
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<u64>(SizeRule::Positive))]
    pub segment_size_bytes: Option<u64>,
    /// fdatasync the WAL (false = benchmarks only, acknowledged writes are NOT durable).
    #[arg(long)]
    pub raft_sync: Option<bool>,
    /// WAL writes with O_DIRECT + RWF_DSYNC (false: buffered + fdatasync).
    #[arg(long)]
    pub wal_direct_io: Option<bool>,
    /// Zero-fill the next WAL segment in the background (direct I/O only).
    #[arg(long)]
    pub wal_segment_zero_fill: Option<bool>,
    /// WAL batches (one durable write each) on the disk at once, 1..=64 (default 4).
    #[arg(long)]
    pub wal_batches_in_flight_max: Option<usize>,
    /// ... and at most this many while the batch is under 256 KiB (default 2).
    #[arg(long)]
    pub wal_small_batches_in_flight_max: Option<usize>,
    /// Every group snapshots itself this often (default 3600; also on --snapshot-log-bytes-max).
    #[arg(long)]
    pub snapshot_interval_s: Option<u64>,
    /// Bytes of one InstallSnapshot chunk, each with its own crc (default 128KiB).
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<usize>(SizeRule::Positive))]
    pub snapshot_chunk_bytes: Option<usize>,
    /// Log entries kept below a snapshot for followers that lag a little.
    #[arg(long)]
    pub snapshot_keep_entries: Option<u64>,
    /// ... and at most this many bytes of them (per group; default 16MiB).
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<usize>(SizeRule::Positive))]
    pub snapshot_keep_bytes_max: Option<usize>,
    /// In-memory raft log bytes per core, at most (default 1GiB; 0 = no budget); over it the
    /// core snapshots its largest groups.
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<usize>(SizeRule::ZeroAllowed))]
    pub log_memory_bytes_max: Option<usize>,
    /// A group snapshots itself once its log since the last snapshot is this large (default
    /// 256MiB; see docs/server.md for the trade-off).
    #[arg(long, value_name = "SIZE", value_parser = size_parser::<usize>(SizeRule::Positive))]
    pub snapshot_log_bytes_max: Option<usize>,
    /// Open the data files with O_DIRECT (see docs/server.md).
    #[arg(long)]
    pub data_direct_io: Option<bool>,
    /// Write buffered applies on the core thread while the machine's dirty pages are below the
    /// background writeback threshold (default true; false = always through io_uring).
    #[arg(long)]
    pub inline_applies: Option<bool>,
    /// An inline apply that blocked longer than this sends applies to io_uring for 5 s
    /// (default 2000).
    #[arg(long)]
    pub inline_apply_us_max: Option<u64>,
    /// Idle groups stop ticking and heartbeating after this long (0 = never).
    #[arg(long)]
    pub hibernate_idle_ms: Option<u64>,
    /// Pin core thread N to CPU N (turn off when several nodes share a machine).
    #[arg(long)]
    pub pin_cores: Option<bool>,
    /// UDP payload size the network between nodes carries, e.g. 6550 with jumbo frames (at most
    /// 6550; 0 = by address: 6550 on loopback, else 1200 with MTU discovery up to 1452).
    #[arg(long)]
    pub quic_udp_payload_bytes: Option<u16>,
}

fn parse_peer(s: &str) -> Result<PeerConfig, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected ID=ADDR, e.g. 2=127.0.0.1:7200"))?;
    Ok(PeerConfig {
        id: id.parse().map_err(|e| format!("peer id `{id}`: {e}"))?,
        addr: addr
            .parse()
            .map_err(|e| format!("peer address `{addr}`: {e}"))?,
    })
}

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Where the nodes keep their data (node1/, node2/, ...), their logs (nodeN.log), their
    /// config files (nodeN.toml, rewritten on each start) and cluster.toml (for bdctl).
    #[arg(long, default_value = "bd-data")]
    pub data_dir: PathBuf,
    /// Number of nodes, 1..=9.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Number of block groups (exports bg0, bg1, ...), at least 1; each is replicated on
    /// min(3, --nodes) nodes, spread round-robin over the nodes.
    #[arg(long, default_value_t = 1)]
    pub bgs: u64,
    /// NBD port of node N is BASE+N-1; HTTP BASE+100+N-1; QUIC BASE+200+32*(N-1) (32 per node).
    #[arg(long, default_value_t = 10809)]
    pub base_port: u16,
    /// Core threads per node.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Size of each block group when it is first created: bytes or a binary unit (64MiB, 1G,
    /// 1TiB), a multiple of 4096.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_block_size)]
    pub bg_size_bytes: u64,
    /// Do not restart a node that dies (by default it is restarted after 2 s).
    #[arg(long)]
    pub no_restart: bool,
}

impl RunArgs {
    /// The file (if any) with the flags applied on top.
    pub fn resolve(&self) -> Result<ServerConfig, Error> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::load(p)?,
            None => ServerConfig::default(),
        };
        macro_rules! set {
            ($($field:ident => $($target:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$field.clone() { c.$($target).+ = v; })*
            };
        }
        set!(node_id => node_id, data_dir => data_dir, cores => cores, nbd_listen => nbd_listen,
            quic_listen => quic_listen, http_listen => http_listen,
            tick_ms => raft.tick_ms, election_timeout_ms => raft.election_timeout_ms,
            heartbeat_factor => raft.heartbeat_factor,
            max_entries_per_message => raft.max_entries_per_message,
            max_bytes_per_message => raft.max_bytes_per_message,
            segment_size_bytes => raft.segment_size_bytes, raft_sync => raft.raft_sync,
            wal_direct_io => raft.wal_direct_io,
            wal_segment_zero_fill => raft.wal_segment_zero_fill,
            wal_batches_in_flight_max => raft.wal_batches_in_flight_max,
            wal_small_batches_in_flight_max => raft.wal_small_batches_in_flight_max,
            snapshot_interval_s => raft.snapshot_interval_s,
            snapshot_chunk_bytes => raft.snapshot_chunk_bytes,
            snapshot_keep_entries => raft.snapshot_keep_entries,
            snapshot_keep_bytes_max => raft.snapshot_keep_bytes_max,
            log_memory_bytes_max => raft.log_memory_bytes_max,
            snapshot_log_bytes_max => raft.snapshot_log_bytes_max,
            data_direct_io => data_direct_io, pin_cores => pin_cores,
            inline_applies => inline_applies, inline_apply_us_max => inline_apply_us_max,
            quic_udp_payload_bytes => quic_udp_payload_bytes,
            hibernate_idle_ms => raft.hibernate_idle_ms);
        if let Some(d) = &self.tls_dir {
            c.tls_dir = Some(d.clone());
        }
        if self.insecure_loopback {
            c.insecure_loopback = true;
        }
        for p in &self.peers {
            c.peers.retain(|x| x.id != p.id);
            c.peers.push(p.clone());
        }
        if let Some(id) = self.bgs.iter().find(|id| self.join_bgs.contains(id)) {
            return Err(Error::Config {
                what: format!(
                    "bg {id} is given with both --bg (a member) and --join-bg (waiting to be \
                     added)"
                ),
            });
        }
        let joins = self.join_bgs.iter().map(|id| (id, true));
        for (id, join) in self.bgs.iter().map(|id| (id, false)).chain(joins) {
            let mut members: Vec<u64> = if self.bg_members.is_empty() {
                let mut m: Vec<u64> = c.peers.iter().map(|p| p.id).collect();
                if !join {
                    m.push(c.node_id);
                }
                m
            } else {
                self.bg_members.clone()
            };
            members.sort_unstable();
            members.dedup();
            c.bgs.retain(|b| b.id != *id);
            c.bgs.push(BgConfig {
                id: *id,
                members,
                size_bytes: self.bg_size_bytes.unwrap_or(BG_SIZE_BYTES_DEFAULT),
                join,
                preallocate: self.bg_preallocate,
            });
        }
        Ok(c)
    }
}

/// Runs one node until SIGINT/SIGTERM (graceful) or a fatal engine error.
pub fn run(args: &RunArgs) -> Result<(), Error> {
    let cfg = args.resolve()?;
    let ecfg = cfg.engine_config()?;
    if cfg.insecure_loopback {
        warn!(
            "INSECURE: transport without TLS (insecure_loopback); use only for a local dev cluster"
        );
    }
    let bgs = ecfg.bgs.clone();
    // Started before the async runtime: it blocks until every core has recovered.
    let engine = Arc::new(engine::Engine::start(ecfg)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bd-front")
        .enable_all()
        .build()
        .map_err(|e| Error::Config {
            what: format!("cannot start the front-end runtime: {e}"),
        })?;
    let result = rt.block_on(async {
        let exports = Arc::new(Exports::new());
        for b in &bgs {
            let h = engine.bg(b.id).expect("configured group has a handle");
            exports.insert(b.name(), Arc::new(BgBackend::new(b.name(), h)));
        }
        let nbd_cfg = NbdConfig {
            request_bytes_max: NBD_REQUEST_BYTES_MAX,
            ..NbdConfig::default()
        };
        let nbd = NbdServerHandle::start(cfg.nbd_listen, exports, nbd_cfg).await?;
        let http = crate::http::bind(cfg.http_listen).await?;
        let http_addr = http.local_addr().map_err(|source| Error::HttpBind {
            addr: cfg.http_listen,
            source,
        })?;
        let http_task = tokio::spawn(crate::http::serve(http, engine.clone()));
        let names: Vec<String> = bgs.iter().map(|b| b.name()).collect();
        info!(node = cfg.node_id, nbd = %nbd.local_addr(), http = %http_addr, exports = ?names, "bd-server ready");
        let mut failed = engine.failed();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::Config {
                what: format!("cannot install the SIGTERM handler: {e}"),
            })?;
        let outcome = tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); Ok(()) }
            _ = term.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
            _ = failed.changed() => {
                let why = failed.borrow().clone().unwrap_or_default();
                error!(reason = %why, "engine failed: shutting down");
                Err(Error::Config { what: format!("engine failed: {why}") })
            }
        };
        // Stop taking requests, let the ones in flight finish, then stop the cores.
        nbd.shutdown().await;
        http_task.abort();
        let e = engine.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || e.shutdown()),
        )
        .await;
        outcome
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    info!("bd-server stopped");
    result
}

pub fn init_ca(dir: &std::path::Path) -> Result<(), Error> {
    let p = transport::init_ca(dir)?;
    println!(
        "CA written to {} (and ca.key next to it; keep ca.key off the nodes)",
        p.display()
    );
    Ok(())
}

pub fn issue_cert(ca_dir: &std::path::Path, node: u64, out: &std::path::Path) -> Result<(), Error> {
    transport::issue_cert(ca_dir, node, out)?;
    println!(
        "certificate for node {node} written to {} (node.pem, node.key, ca.pem); run with --tls-dir {}",
        out.display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_in_flight_flags_override_the_config() {
        let cli = Cli::try_parse_from([
            "bd-server",
            "run",
            "--node-id",
            "1",
            "--insecure-loopback",
            "--wal-batches-in-flight-max",
            "6",
            "--wal-small-batches-in-flight-max=3",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        let e = args.resolve().unwrap().engine_config().unwrap();
        assert_eq!(
            (
                e.wal_batches_in_flight_max,
                e.wal_small_batches_in_flight_max
            ),
            (6, 3)
        );
        let e = Cli::try_parse_from(["bd-server", "run", "--wal-batches-in-flight-max", "x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--wal-batches-in-flight-max"), "{e}");
    }

    #[test]
    fn size_flags_take_units_and_bad_sizes_name_the_flag_and_value() {
        let run = |extra: &[&str]| {
            let mut a = vec!["bd-server", "run", "--node-id", "1", "--insecure-loopback"];
            a.extend_from_slice(extra);
            Cli::try_parse_from(a).map(|cli| match cli.command {
                Command::Run(args) => *args,
                _ => panic!("not run"),
            })
        };
        let args = run(&[
            "--bg",
            "0",
            "--bg-size-bytes",
            "64MiB",
            "--segment-size-bytes=32M",
            "--max-bytes-per-message",
            "512k",
            "--snapshot-chunk-bytes",
            "256KiB",
            "--snapshot-keep-bytes-max",
            "8388608",
            "--log-memory-bytes-max",
            "0",
            "--snapshot-log-bytes-max",
            "1G",
        ])
        .unwrap();
        let e = args.resolve().unwrap().engine_config().unwrap();
        assert_eq!(e.bgs[0].size_bytes, 64 << 20);
        assert_eq!(e.wal_segment_bytes_max, 32 << 20);
        assert_eq!(e.append_bytes_max, 512 << 10);
        assert_eq!(e.snapshot_chunk_bytes, 256 << 10);
        assert_eq!(e.snapshot_keep_bytes_max, 8 << 20);
        assert_eq!(e.log_memory_bytes_max, 0);
        assert_eq!(e.snapshot_log_bytes_max, 1 << 30);
        for (flag, value, says) in [
            ("--bg-size-bytes", "1GB", "ambiguous"),
            ("--bg-size-bytes", "0", "above 0"),
            ("--bg-size-bytes", "1000000", "not a multiple of 4096"),
            ("--bg-size-bytes", "1.5G", "whole numbers"),
            ("--segment-size-bytes", "64Q", "unknown unit `Q`"),
            ("--segment-size-bytes", "99999999999T", "too large"),
            ("--snapshot-chunk-bytes", "x", "not a size"),
            ("--snapshot-log-bytes-max", "0", "above 0"),
        ] {
            let e = run(&[flag, value]).unwrap_err().to_string();
            assert!(
                e.contains(flag) && e.contains(&format!("'{value}'")) && e.contains(says),
                "{flag} {value}: {e}"
            );
        }
        let Command::Dev(dev) = Cli::try_parse_from(["bd-server", "dev"]).unwrap().command else {
            panic!("not dev");
        };
        assert_eq!(dev.bg_size_bytes, BG_SIZE_BYTES_DEFAULT);
        let Command::Dev(dev) = Cli::try_parse_from(["bd-server", "dev", "--bg-size-bytes", "4k"])
            .unwrap()
            .command
        else {
            panic!("not dev");
        };
        assert_eq!(dev.bg_size_bytes, 4096);
    }

    #[test]
    fn join_bg_declares_a_replica_outside_the_members() {
        let parse = |extra: &[&str]| {
            let mut a = vec![
                "bd-server",
                "run",
                "--node-id",
                "4",
                "--insecure-loopback",
                "--peer",
                "1=127.0.0.1:7001",
                "--peer",
                "2=127.0.0.1:7002",
                "--peer",
                "3=127.0.0.1:7003",
            ];
            a.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(a).unwrap().command else {
                panic!("not run");
            };
            args.resolve().unwrap().engine_config()
        };
        let e = parse(&["--join-bg", "0"]).unwrap();
        assert_eq!(e.bgs[0].members, vec![1, 2, 3]);
        assert!(e.bgs[0].join);
        let e = parse(&["--bg", "1", "--bg-members", "4,3,2"]).unwrap();
        assert_eq!(e.bgs[0].members, vec![2, 3, 4]);
        assert!(!e.bgs[0].join);
        // A member list without this node needs join, and join needs this node outside it.
        let err = parse(&["--bg", "1", "--bg-members", "1,2,3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not include this node 4"), "{err}");
        let err = parse(&["--join-bg", "1", "--bg-members", "2,3,4"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("already among members"), "{err}");
        let Command::Run(both) = Cli::try_parse_from([
            "bd-server",
            "run",
            "--node-id",
            "4",
            "--bg",
            "3",
            "--join-bg",
            "3",
        ])
        .unwrap()
        .command
        else {
            panic!("not run");
        };
        let err = both.resolve().unwrap_err().to_string();
        assert!(err.contains("bg 3 is given with both --bg"), "{err}");
        let err = parse(&["--join-bg", "1", "--bg-members", "1,2,5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("member 5 has no peer address"), "{err}");
    }
}
