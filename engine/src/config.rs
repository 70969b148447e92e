//! Engine settings. Times the raft core counts in ticks are given here in milliseconds and
//! converted with `tick_ms`; every limit is named `*_max` with its unit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use raftlog::core::{GroupId, NodeId, RaftConfig};

use crate::dataio::DataIoBackend;
use crate::error::{Error, Result};

/// Whether data files are opened with O_DIRECT unless configured (picked by measurement,
/// docs/bench-nbd.md).
pub const DATA_DIRECT_IO_DEFAULT: bool = false;

/// One block group this node holds a replica of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgSpec {
    pub id: GroupId,
    /// Voters of the group when it is created (braft's initial_conf); ignored once the group
    /// has a log or a snapshot.
    pub members: Vec<NodeId>,
    pub size_bytes: u64,
    /// This node holds a replica that is not among `members` yet: it waits, without
    /// campaigning, until the leader adds it (`Engine::change_peers`, `bdctl add-peer`) and
    /// sends it the log or a snapshot. `members` are then the group's current voters.
    pub join: bool,
    /// Allocate the replica's data file in full when it is created (thick). Off (thin, the
    /// default): the file is sparse, space is allocated on first write and given back by TRIM
    /// and WRITE_ZEROES; a full disk then shows up at an apply (fatal for the node) rather than
    /// at creation.
    pub preallocate: bool,
}

impl BgSpec {
    /// The NBD export name of the group.
    pub fn name(&self) -> String {
        format!("bg{}", self.id)
    }
}

/// Settings of the whole engine (every core).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub node_id: NodeId,
    /// `core-N/` directories (WAL, data and meta files) live here.
    pub data_dir: PathBuf,
    /// Core threads. Block group `g` lives on core `g % cores`; every node of a cluster must use
    /// the same count, because core `i` only talks to core `i` of its peers.
    pub cores: usize,
    /// Pin core `i` to CPU `i % available` (best effort).
    pub pin_cores: bool,
    /// QUIC address of core 0; core `i` binds port + `i`.
    pub quic_listen: SocketAddr,
    /// Peers' core-0 QUIC addresses (core `i` dials port + `i`).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Mutual-TLS identity directory (node.pem, node.key, ca.pem); `None` = insecure loopback
    /// (dev cluster only; the transport refuses it on other addresses).
    pub tls_dir: Option<PathBuf>,
    pub bgs: Vec<BgSpec>,
    /// Period of the raft clock.
    pub tick_ms: u64,
    pub election_timeout_ms: u64,
    /// Heartbeat period = election timeout / this factor (braft's
    /// raft_election_heartbeat_factor).
    pub heartbeat_factor: u64,
    pub append_entries_max: usize,
    pub append_bytes_max: usize,
    /// Entries kept below a snapshot so lagging followers catch up by log.
    pub snapshot_keep_entries: u64,
    /// ... and no more than this many bytes of them, per group.
    pub snapshot_keep_bytes_max: usize,
    /// In-memory raft log bytes of all the groups of one core, at most (0 = no budget): the
    /// raft core holds every entry since its group's last snapshot, so without a budget a
    /// core with thousands of groups could hold `groups * snapshot_log_bytes_max`. Over it,
    /// the core snapshots its largest groups (see `core::Core::enforce_log_memory`).
    pub log_memory_bytes_max: usize,
    /// Log bytes since the last snapshot above which the core suggests a new one.
    pub snapshot_log_bytes_max: usize,
    /// Take a snapshot of every group this often (0 = only when suggested).
    pub snapshot_interval_s: u64,
    pub snapshot_chunk_bytes: usize,
    pub snapshot_bytes_per_sec_max: u64,
    pub wal_segment_bytes_max: u64,
    /// `false` skips fdatasync in the WAL: benchmarks only, never durable.
    pub raft_sync: bool,
    /// WAL batches as O_DIRECT + RWF_DSYNC writes (else buffered + fdatasync); see
    /// docs/wal.md. Filesystems that refuse O_DIRECT fall back with a log line.
    pub wal_direct_io: bool,
    /// Zero-fill the next WAL segment in the background (direct I/O only): first writes into
    /// preallocated, unwritten blocks cost an ext4 journal commit each.
    pub wal_segment_zero_fill: bool,
    /// WAL batches (each one durable write) on the disk at once, at most (the WAL's
    /// `batches_in_flight_max`, 1..=64).
    pub wal_batches_in_flight_max: usize,
    /// ... and at most this many while the batch to send is under 256 KiB (the WAL's
    /// `small_batches_in_flight_max`): a small batch may gain more from growing behind the
    /// ones on the disk than from overlapping them (docs/wal.md).
    pub wal_small_batches_in_flight_max: usize,
    /// Requests queued towards one core, at most (senders wait beyond it).
    pub request_queue_max: usize,
    /// A client request that found no leader (or whose leader did not answer) is retried for
    /// this long, then fails with EIO.
    pub request_timeout_ms: u64,
    /// A forwarded request with no answer for this long is retried (another leader may have
    /// been elected).
    pub forward_timeout_ms: u64,
    /// Largest raft entry payload; bigger writes are split into several entries.
    pub entry_data_bytes_max: usize,
    /// Open data files with O_DIRECT (see docs/bench-nbd.md for the measurement that picked
    /// the default); filesystems that refuse it fall back to buffered I/O with a log line.
    pub data_direct_io: bool,
    /// Data-file applies and reads on io_uring (`Auto`: unless the kernel refuses it).
    pub data_io_backend: DataIoBackend,
    /// Write buffered applies on the core thread instead of through the data ring while that is
    /// safe (see `core::inline`): ext4 makes io_uring hand every buffered write to a worker
    /// thread, which costs more than the write. No effect with `data_direct_io`.
    pub inline_applies: bool,
    /// An inline apply slower than this sends applies back to the ring for a few seconds.
    pub inline_apply_us_max: u64,
    /// Data-file requests (applies and reads) in flight per core, at most.
    pub data_ios_in_flight_max: usize,
    /// Bytes of committed writes waiting for a data-file slot per core, at most; beyond it the
    /// core waits for the disk before doing anything else.
    pub apply_queue_bytes_max: usize,
    /// A leader whose group has been idle and settled this long asks its followers to hibernate
    /// the group with it: no ticks and no heartbeats until activity (see `core::hibernate`).
    /// 0 = never (every group ticks and heartbeats all the time).
    pub hibernate_idle_ms: u64,
    /// UDP payload size the network between the nodes carries (e.g. 6550 on a network with
    /// jumbo frames; at most `transport::UDP_PAYLOAD_BYTES_LIMIT`): QUIC packets use it from the
    /// start. 0 = by address: the full limit on loopback, else QUIC's 1200 bytes with path MTU
    /// discovery up to Ethernet's 1452.
    pub quic_udp_payload_bytes: u16,
}

impl EngineConfig {
    pub fn new(node_id: NodeId, data_dir: PathBuf, quic_listen: SocketAddr) -> EngineConfig {
        // The WAL's own defaults, measured in docs/wal.md.
        let wal = raftlog::wal::WalConfig::new(".");
        EngineConfig {
            node_id,
            data_dir,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cores: true,
            quic_listen,
            peers: BTreeMap::new(),
            tls_dir: None,
            bgs: Vec::new(),
            tick_ms: 50,
            election_timeout_ms: 1000,
            heartbeat_factor: 10,
            append_entries_max: 256,
            append_bytes_max: 1 << 20,
            snapshot_keep_entries: 1024,
            snapshot_keep_bytes_max: 16 << 20,
            log_memory_bytes_max: 1 << 30,
            snapshot_log_bytes_max: 256 << 20,
            snapshot_interval_s: 3600,
            snapshot_chunk_bytes: 128 << 10,
            snapshot_bytes_per_sec_max: 200 << 20,
            wal_segment_bytes_max: 64 << 20,
            raft_sync: true,
            wal_direct_io: true,
            wal_segment_zero_fill: true,
            wal_batches_in_flight_max: wal.batches_in_flight_max,
            wal_small_batches_in_flight_max: wal.small_batches_in_flight_max,
            request_queue_max: 4096,
            request_timeout_ms: 10_000,
            forward_timeout_ms: 2_000,
            entry_data_bytes_max: 256 << 10,
            data_direct_io: DATA_DIRECT_IO_DEFAULT,
            data_io_backend: DataIoBackend::Auto,
            inline_applies: true,
            inline_apply_us_max: 2_000,
            data_ios_in_flight_max: 256,
            apply_queue_bytes_max: 64 << 20,
            hibernate_idle_ms: 2_000,
            quic_udp_payload_bytes: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config { what });
        if self.node_id == 0 {
            return bad("node_id 0 is reserved".into());
        }
        if self.cores == 0 || self.cores > 256 {
            return bad(format!("cores {} must be in 1..=256", self.cores));
        }
        if self.tick_ms == 0 {
            return bad("tick_ms must be positive".into());
        }
        if self.election_timeout_ms < 2 * self.tick_ms {
            return bad(format!(
                "election_timeout_ms {} must be at least two ticks of {} ms",
                self.election_timeout_ms, self.tick_ms
            ));
        }
        if self.hibernate_idle_ms != 0 && self.hibernate_idle_ms < self.tick_ms {
            return bad(format!(
                "hibernate_idle_ms {} must be 0 (off) or at least one tick of {} ms",
                self.hibernate_idle_ms, self.tick_ms
            ));
        }
        let udp = transport::UDP_PAYLOAD_BYTES_MIN..=transport::UDP_PAYLOAD_BYTES_LIMIT;
        if self.quic_udp_payload_bytes != 0 && !udp.contains(&self.quic_udp_payload_bytes) {
            return bad(format!(
                "quic_udp_payload_bytes {} must be 0 (by address) or in {}..={}: QUIC needs 1200 \
                 and quinn's GSO sends of 10 packets must fit one 64 KiB datagram",
                self.quic_udp_payload_bytes,
                udp.start(),
                udp.end()
            ));
        }
        if self.heartbeat_factor < 2 {
            return bad("heartbeat_factor must be at least 2".into());
        }
        if self.entry_data_bytes_max == 0 || self.entry_data_bytes_max > (512 << 10) {
            return bad(format!(
                "entry_data_bytes_max {} must be in 1..=512 KiB (one entry must fit in a WAL record)",
                self.entry_data_bytes_max
            ));
        }
        let window = 1..=raftlog::wal::format::WINDOW_MAX as usize;
        if !window.contains(&self.wal_batches_in_flight_max) {
            return bad(format!(
                "wal_batches_in_flight_max {} must be in {}..={}",
                self.wal_batches_in_flight_max,
                window.start(),
                window.end()
            ));
        }
        if self.wal_small_batches_in_flight_max == 0 {
            return bad(format!(
                "wal_small_batches_in_flight_max {} must be at least 1",
                self.wal_small_batches_in_flight_max
            ));
        }
        if self.data_ios_in_flight_max == 0 || self.data_ios_in_flight_max > 4096 {
            return bad(format!(
                "data_ios_in_flight_max {} must be in 1..=4096",
                self.data_ios_in_flight_max
            ));
        }
        if self.apply_queue_bytes_max < self.entry_data_bytes_max {
            return bad(format!(
                "apply_queue_bytes_max {} must hold one entry of entry_data_bytes_max {}",
                self.apply_queue_bytes_max, self.entry_data_bytes_max
            ));
        }
        if self.snapshot_log_bytes_max < self.entry_data_bytes_max {
            return bad(format!(
                "snapshot_log_bytes_max {} must hold one entry of entry_data_bytes_max {} \
                 (a smaller threshold would snapshot after every write)",
                self.snapshot_log_bytes_max, self.entry_data_bytes_max
            ));
        }
        if self.quic_listen.port() as usize + self.cores > 65536 {
            return bad(format!(
                "quic_listen port {} + {} cores exceeds 65535",
                self.quic_listen.port(),
                self.cores
            ));
        }
        if self.peers.contains_key(&self.node_id) {
            return bad(format!("node {} lists itself as a peer", self.node_id));
        }
        let mut seen = std::collections::BTreeSet::new();
        for bg in &self.bgs {
            if !seen.insert(bg.id) {
                return bad(format!("bg {} is declared twice", bg.id));
            }
            if bg.size_bytes == 0 || bg.size_bytes % 4096 != 0 {
                return bad(format!(
                    "bg {}: size_bytes {} must be a positive multiple of 4096",
                    bg.id, bg.size_bytes
                ));
            }
            if bg.members.is_empty() || bg.members.contains(&0) {
                return bad(format!(
                    "bg {}: members {:?} must be node ids above 0, at least one",
                    bg.id, bg.members
                ));
            }
            match (bg.join, bg.members.contains(&self.node_id)) {
                (false, false) => {
                    return bad(format!(
                        "bg {}: members {:?} do not include this node {} (a replica that waits \
                         to be added to the group is declared with join)",
                        bg.id, bg.members, self.node_id
                    ))
                }
                (true, true) => {
                    return bad(format!(
                        "bg {}: join is set but this node {} is already among members {:?}",
                        bg.id, self.node_id, bg.members
                    ))
                }
                _ => {}
            }
            for m in &bg.members {
                if *m != self.node_id && !self.peers.contains_key(m) {
                    return bad(format!("bg {}: member {m} has no peer address", bg.id));
                }
            }
        }
        self.raft_config()
            .validate()
            .map_err(|what| Error::Config { what })
    }

    pub fn election_timeout_ticks(&self) -> u32 {
        (self.election_timeout_ms / self.tick_ms).max(2) as u32
    }

    /// The raft core's settings derived from these.
    pub fn raft_config(&self) -> RaftConfig {
        let election = self.election_timeout_ticks();
        let heartbeat = (election as u64 / self.heartbeat_factor).max(1) as u32;
        RaftConfig {
            election_timeout_ticks: election,
            heartbeat_interval_ticks: heartbeat.min(election - 1),
            max_clock_drift_ticks: (election / 5).max(1).min(election - 1),
            append_entries_max: self.append_entries_max,
            append_bytes_max: self.append_bytes_max,
            snapshot_keep_entries: self.snapshot_keep_entries,
            snapshot_keep_bytes_max: self.snapshot_keep_bytes_max,
            snapshot_log_bytes_max: self.snapshot_log_bytes_max,
            // A snapshot of a whole volume takes a while to stream: give it a minute before a
            // retry, or a slow transfer is started over and over.
            snapshot_timeout_ticks: (60_000 / self.tick_ms).max(1) as u32,
            ..RaftConfig::default()
        }
    }

    /// Consecutive idle ticks after which a leader hibernates its group (0 = never).
    pub fn hibernate_idle_ticks(&self) -> u32 {
        self.hibernate_idle_ms
            .div_ceil(self.tick_ms)
            .min(u32::MAX as u64) as u32
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    pub fn core_of(&self, bg: GroupId) -> usize {
        (bg % self.cores as u64) as usize
    }

    pub fn core_dir(&self, core: usize) -> PathBuf {
        self.data_dir.join(format!("core-{core}"))
    }

    /// QUIC address of `core` given a core-0 address.
    pub fn core_addr(base: SocketAddr, core: usize) -> SocketAddr {
        SocketAddr::new(base.ip(), base.port() + core as u16)
    }
}
