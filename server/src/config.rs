//! bd-server's configuration: a TOML file (every key optional, defaults below) overridden by
//! command-line flags, turned into the engine's and the NBD server's settings.
//!
//! Sizes (the `*_bytes*` keys) are an integer number of bytes or a string with a binary unit:
//! `"4KiB"`, `"512M"`, `"1GiB"`, `"1T"` (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024;
//! `"1GB"` is refused as ambiguous), see [`crate::units`].
//!
//! ```toml
//! node_id = 1
//! data_dir = "bd-data/node1"
//! cores = 2                         # every node of a cluster must use the same count
//! nbd_listen = "127.0.0.1:10809"
//! quic_listen = "127.0.0.1:7100"    # core N binds port + N
//! http_listen = "127.0.0.1:8100"
//! tls_dir = "certs/node1"           # node.pem, node.key, ca.pem (bd-server issue-cert)
//! insecure_loopback = false         # no TLS: local dev cluster on loopback only
//! data_direct_io = false            # O_DIRECT data files (docs/bench-nbd.md)
//! inline_applies = true             # buffered applies on the core thread while safe
//! inline_apply_us_max = 2000        # a write that blocked longer sends applies to io_uring
//! pin_cores = true                  # core thread N runs on CPU N only
//! quic_udp_payload_bytes = 0        # 0 = by address (6550 on loopback, else 1200..1452)
//!
//! [[peers]]
//! id = 2
//! addr = "127.0.0.1:7200"           # the peer's quic_listen
//!
//! [[bgs]]
//! id = 0                            # NBD export "bg0"
//! members = [1, 2, 3]
//! size_bytes = "1GiB"                # or 1073741824; a multiple of 4096
//! # join = true                   # a replica that waits for `bdctl add-peer` (members: the
//!                                 # group's current voters, without this node)
//!
//! [raft]
//! tick_ms = 50
//! election_timeout_ms = 1000
//! heartbeat_factor = 10
//! max_entries_per_message = 256
//! max_bytes_per_message = 1048576
//! segment_size_bytes = "64MiB"
//! raft_sync = true
//! wal_direct_io = true              # O_DIRECT + RWF_DSYNC WAL writes (docs/wal.md)
//! wal_segment_zero_fill = true      # zero the next segment ahead (direct I/O only)
//! wal_batches_in_flight_max = 4     # WAL batches on the disk at once (1..=64)
//! wal_small_batches_in_flight_max = 2  # ... while the batch is under 256 KiB
//! snapshot_interval_s = 3600
//! snapshot_chunk_bytes = "128KiB"
//! snapshot_keep_entries = 1024
//! snapshot_keep_bytes_max = "16MiB"    # per group, on top of the entry count
//! log_memory_bytes_max = "1GiB"        # per core: in-memory raft logs of its groups; 0 = no budget
//! snapshot_log_bytes_max = "256MiB"    # per group: log since the last snapshot that triggers one
//! snapshot_bytes_per_sec_max = "200MiB"  # per core; 0 = no throttle
//! hibernate_idle_ms = 2000          # idle groups stop ticking and heartbeating; 0 = never
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use engine::{BgSpec, EngineConfig};
use serde::Deserialize;

use crate::error::Error;
use crate::units::{deserialize_size, SizeRule};

/// Default block group size: 1 GiB.
pub const BG_SIZE_BYTES_DEFAULT: u64 = 1 << 30;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BgConfig {
    pub id: u64,
    pub members: Vec<u64>,
    #[serde(default = "bg_size_default", deserialize_with = "size::size_bytes")]
    pub size_bytes: u64,
    /// A replica that waits to be added (`bdctl add-peer`): `members` are the group's current
    /// voters and do not include this node.
    #[serde(default)]
    pub join: bool,
    /// Allocate the replica's data file in full at creation (thick); default thin (sparse,
    /// allocated on first write, TRIM gives space back).
    #[serde(default)]
    pub preallocate: bool,
}

fn bg_size_default() -> u64 {
    BG_SIZE_BYTES_DEFAULT
}

/// `deserialize_with` functions of the size keys: each names its key in its errors.
mod size {
    use super::*;

    macro_rules! size_keys {
        ($($key:ident: $t:ty = $rule:ident),* $(,)?) => {$(
            pub fn $key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                deserialize_size(d, stringify!($key), SizeRule::$rule)
            }
        )*};
    }

    size_keys!(
        size_bytes: u64 = Blocks,
        max_bytes_per_message: usize = Positive,
        segment_size_bytes: u64 = Positive,
        snapshot_chunk_bytes: usize = Positive,
        snapshot_keep_bytes_max: usize = Positive,
        log_memory_bytes_max: usize = ZeroAllowed,
        snapshot_log_bytes_max: usize = Positive,
        snapshot_bytes_per_sec_max: u64 = ZeroAllowed,
    );
}

/// braft-like raft settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    pub tick_ms: u64,
    pub election_timeout_ms: u64,
    pub heartbeat_factor: u64,
    pub max_entries_per_message: usize,
    #[serde(deserialize_with = "size::max_bytes_per_message")]
    pub max_bytes_per_message: usize,
    #[serde(deserialize_with = "size::segment_size_bytes")]
    pub segment_size_bytes: u64,
    pub raft_sync: bool,
    /// WAL writes with O_DIRECT + RWF_DSYNC (else buffered + fdatasync).
    pub wal_direct_io: bool,
    /// Zero-fill the next WAL segment ahead (direct I/O only).
    pub wal_segment_zero_fill: bool,
    /// WAL batches on the disk at once, at most.
    pub wal_batches_in_flight_max: usize,
    /// ... and at most this many while the batch is under 256 KiB.
    pub wal_small_batches_in_flight_max: usize,
    pub snapshot_interval_s: u64,
    #[serde(deserialize_with = "size::snapshot_chunk_bytes")]
    pub snapshot_chunk_bytes: usize,
    pub snapshot_keep_entries: u64,
    #[serde(deserialize_with = "size::snapshot_keep_bytes_max")]
    pub snapshot_keep_bytes_max: usize,
    /// 0 = no budget.
    #[serde(deserialize_with = "size::log_memory_bytes_max")]
    pub log_memory_bytes_max: usize,
    /// A group snapshots itself once this much log accumulated since its last snapshot.
    #[serde(deserialize_with = "size::snapshot_log_bytes_max")]
    pub snapshot_log_bytes_max: usize,
    /// 0 = no throttle.
    #[serde(deserialize_with = "size::snapshot_bytes_per_sec_max")]
    pub snapshot_bytes_per_sec_max: u64,
    /// Idle groups stop ticking and heartbeating after this long (0 = never).
    pub hibernate_idle_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        let engine = EngineConfig::new(1, PathBuf::new(), SocketAddr::from(([127, 0, 0, 1], 0)));
        RaftSettings {
            tick_ms: 50,
            election_timeout_ms: 1000,
            heartbeat_factor: 10,
            max_entries_per_message: 256,
            max_bytes_per_message: 1 << 20,
            segment_size_bytes: 64 << 20,
            raft_sync: true,
            wal_direct_io: true,
            wal_segment_zero_fill: true,
            wal_batches_in_flight_max: engine.wal_batches_in_flight_max,
            wal_small_batches_in_flight_max: engine.wal_small_batches_in_flight_max,
            snapshot_interval_s: 3600,
            snapshot_chunk_bytes: 128 << 10,
            snapshot_keep_entries: 1024,
            snapshot_keep_bytes_max: 16 << 20,
            log_memory_bytes_max: 1 << 30,
            snapshot_log_bytes_max: 256 << 20,
            snapshot_bytes_per_sec_max: 200 << 20,
            hibernate_idle_ms: 2_000,
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// 0 = one per available CPU.
    pub cores: usize,
    pub nbd_listen: SocketAddr,
    pub quic_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub tls_dir: Option<PathBuf>,
    pub insecure_loopback: bool,
    /// Open the data files with O_DIRECT (the engine's `data_direct_io`).
    pub data_direct_io: bool,
    /// Buffered applies on the core thread while that is safe (the engine's `inline_applies`).
    pub inline_applies: bool,
    /// An inline apply that blocked this long sends applies back to io_uring for a while.
    pub inline_apply_us_max: u64,
    /// Pin core thread N to CPU N (the engine's `pin_cores`); off when several nodes share a
    /// machine, or they all crowd onto the first CPUs.
    pub pin_cores: bool,
    /// UDP payload the network carries (the engine's `quic_udp_payload_bytes`; 0 = by address).
    pub quic_udp_payload_bytes: u16,
    pub peers: Vec<PeerConfig>,
    pub bgs: Vec<BgConfig>,
    pub raft: RaftSettings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 0,
            data_dir: PathBuf::from("bd-data"),
            cores: 0,
            nbd_listen: SocketAddr::from(([127, 0, 0, 1], 10809)),
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8100)),
            tls_dir: None,
            insecure_loopback: false,
            data_direct_io: engine::config::DATA_DIRECT_IO_DEFAULT,
            inline_applies: true,
            inline_apply_us_max: 2_000,
            pin_cores: true,
            quic_udp_payload_bytes: 0,
            peers: Vec::new(),
            bgs: Vec::new(),
            raft: RaftSettings::default(),
        }
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: source.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The engine's settings; checks what only the server knows about.
    pub fn engine_config(&self) -> Result<EngineConfig, Error> {
        let bad = |what: String| Err(Error::Config { what });
        if self.node_id == 0 {
            return bad("node_id is required (and must not be 0)".into());
        }
        if self.tls_dir.is_none() && !self.insecure_loopback {
            return bad(
                "set tls_dir (see `bd-server issue-cert`) or, for a local dev cluster on loopback, \
                 insecure_loopback = true"
                    .into(),
            );
        }
        if self.tls_dir.is_some() && self.insecure_loopback {
            return bad("tls_dir and insecure_loopback exclude each other".into());
        }
        let mut c = EngineConfig::new(self.node_id, self.data_dir.clone(), self.quic_listen);
        if self.cores > 0 {
            c.cores = self.cores;
        }
        c.tls_dir = self.tls_dir.clone();
        c.data_direct_io = self.data_direct_io;
        c.inline_applies = self.inline_applies;
        c.inline_apply_us_max = self.inline_apply_us_max;
        c.pin_cores = self.pin_cores;
        c.quic_udp_payload_bytes = self.quic_udp_payload_bytes;
        for p in &self.peers {
            if c.peers.insert(p.id, p.addr).is_some() {
                return bad(format!("peer {} is listed twice", p.id));
            }
        }
        c.bgs = self
            .bgs
            .iter()
            .map(|b| BgSpec {
                id: b.id,
                members: b.members.clone(),
                size_bytes: b.size_bytes,
                join: b.join,
                preallocate: b.preallocate,
            })
            .collect();
        let r = &self.raft;
        c.tick_ms = r.tick_ms;
        c.election_timeout_ms = r.election_timeout_ms;
        c.heartbeat_factor = r.heartbeat_factor;
        c.append_entries_max = r.max_entries_per_message;
        c.append_bytes_max = r.max_bytes_per_message;
        c.wal_segment_bytes_max = r.segment_size_bytes;
        c.raft_sync = r.raft_sync;
        c.wal_direct_io = r.wal_direct_io;
        c.wal_segment_zero_fill = r.wal_segment_zero_fill;
        c.wal_batches_in_flight_max = r.wal_batches_in_flight_max;
        c.wal_small_batches_in_flight_max = r.wal_small_batches_in_flight_max;
        c.snapshot_interval_s = r.snapshot_interval_s;
        c.snapshot_chunk_bytes = r.snapshot_chunk_bytes;
        c.snapshot_keep_entries = r.snapshot_keep_entries;
        c.snapshot_keep_bytes_max = r.snapshot_keep_bytes_max;
        c.log_memory_bytes_max = r.log_memory_bytes_max;
        c.snapshot_log_bytes_max = r.snapshot_log_bytes_max;
        c.snapshot_bytes_per_sec_max = r.snapshot_bytes_per_sec_max;
        c.hibernate_idle_ms = r.hibernate_idle_ms;
        c.validate().map_err(|e| Error::Config {
            what: e.to_string(),
        })?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses_and_unknown_keys_are_refused() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let c: ServerConfig = toml::from_str(&example).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.bgs[0].members, vec![1, 2, 3]);
        assert_eq!(c.raft, RaftSettings::default());
        assert!(toml::from_str::<ServerConfig>("node_idd = 1").is_err());
        assert!(toml::from_str::<ServerConfig>("[raft]\nelection_timeout = 1").is_err());
    }

    #[test]
    fn a_config_file_takes_sizes_as_strings_with_units() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            r#"
node_id = 1
insecure_loopback = true

[[peers]]
id = 2
addr = "127.0.0.1:7200"

[[bgs]]
id = 0
members = [1, 2]
size_bytes = "64MiB"

[[bgs]]
id = 1
members = [1, 2]
size_bytes = 8388608

[[bgs]]
id = 2
members = [1, 2]
size_bytes = "2 G"

[raft]
max_bytes_per_message = "512K"
segment_size_bytes = "32MiB"
snapshot_chunk_bytes = "256KiB"
snapshot_keep_bytes_max = "8M"
log_memory_bytes_max = 0
snapshot_log_bytes_max = "1GiB"
snapshot_bytes_per_sec_max = "100MiB"
"#,
        )
        .unwrap();
        let c = ServerConfig::load(&path).unwrap();
        let sizes: Vec<u64> = c.bgs.iter().map(|b| b.size_bytes).collect();
        assert_eq!(sizes, [64 << 20, 8 << 20, 2 << 30]);
        let e = c.engine_config().unwrap();
        assert_eq!(e.bgs[0].size_bytes, 64 << 20);
        assert_eq!(e.append_bytes_max, 512 << 10);
        assert_eq!(e.wal_segment_bytes_max, 32 << 20);
        assert_eq!(e.snapshot_chunk_bytes, 256 << 10);
        assert_eq!(e.snapshot_keep_bytes_max, 8 << 20);
        assert_eq!(e.log_memory_bytes_max, 0, "0 = no budget is allowed");
        assert_eq!(e.snapshot_log_bytes_max, 1 << 30);
        assert_eq!(e.snapshot_bytes_per_sec_max, 100 << 20);

        // Bad sizes: the error names the file, the key and the value given.
        for (line, says) in [
            (
                "[[bgs]]\nid = 0\nmembers = [1]\nsize_bytes = \"1GB\"",
                "size_bytes = \"1GB\": unit `GB` is ambiguous",
            ),
            (
                "[[bgs]]\nid = 0\nmembers = [1]\nsize_bytes = 0",
                "size_bytes = 0: must be above 0",
            ),
            (
                "[[bgs]]\nid = 0\nmembers = [1]\nsize_bytes = \"1000000\"",
                "size_bytes = \"1000000\": 1000000 bytes is not a multiple of 4096",
            ),
            (
                "[raft]\nsegment_size_bytes = \"64Q\"",
                "segment_size_bytes = \"64Q\": unknown unit `Q`",
            ),
            (
                "[raft]\nsnapshot_chunk_bytes = \"big\"",
                "snapshot_chunk_bytes = \"big\": not a size",
            ),
            (
                "[raft]\nsnapshot_log_bytes_max = \"99999999T\"",
                "snapshot_log_bytes_max = \"99999999T\": too large",
            ),
            (
                "[raft]\nmax_bytes_per_message = 0",
                "max_bytes_per_message = 0: must be above 0",
            ),
        ] {
            std::fs::write(&path, format!("node_id = 1\n{line}\n")).unwrap();
            let e = ServerConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains(says), "{line:?}: {e}");
            assert!(e.contains("node.toml"), "{e}");
        }
    }

    #[test]
    fn engine_config_requires_security_choice_and_node_id() {
        let mut c = ServerConfig {
            node_id: 1,
            ..Default::default()
        };
        assert!(
            c.engine_config().is_err(),
            "neither tls_dir nor insecure_loopback"
        );
        c.insecure_loopback = true;
        c.bgs.push(BgConfig {
            id: 0,
            members: vec![1],
            size_bytes: 1 << 20,
            join: false,
            preallocate: false,
        });
        let e = c.engine_config().unwrap();
        assert_eq!(e.bgs[0].id, 0);
        assert!(e.pin_cores, "pinned unless asked otherwise");
        c.pin_cores = false;
        assert!(!c.engine_config().unwrap().pin_cores);
        let file: ServerConfig = toml::from_str("pin_cores = false").unwrap();
        assert!(!file.pin_cores);
        let e = c.engine_config().unwrap();
        assert!(
            e.wal_direct_io && e.wal_segment_zero_fill,
            "direct WAL by default"
        );
        c.raft.wal_direct_io = false;
        c.raft.wal_segment_zero_fill = false;
        let e = c.engine_config().unwrap();
        assert!(!e.wal_direct_io && !e.wal_segment_zero_fill);
        let file: ServerConfig =
            toml::from_str("[raft]\nwal_direct_io = false\nwal_segment_zero_fill = false").unwrap();
        assert!(!file.raft.wal_direct_io && !file.raft.wal_segment_zero_fill);
        c.node_id = 0;
        assert!(c.engine_config().is_err());
    }

    #[test]
    fn wal_in_flight_settings_reach_the_engine_and_bad_ones_name_the_key() {
        let base = "node_id = 1\ninsecure_loopback = true\n";
        let c: ServerConfig = toml::from_str(base).unwrap();
        let e = c.engine_config().unwrap();
        assert_eq!(
            (
                e.wal_batches_in_flight_max,
                e.wal_small_batches_in_flight_max
            ),
            (4, 2),
            "the WAL's measured defaults"
        );
        let c: ServerConfig = toml::from_str(&format!(
            "{base}[raft]\nwal_batches_in_flight_max = 8\nwal_small_batches_in_flight_max = 1"
        ))
        .unwrap();
        let e = c.engine_config().unwrap();
        assert_eq!(
            (
                e.wal_batches_in_flight_max,
                e.wal_small_batches_in_flight_max
            ),
            (8, 1)
        );
        for (key, v) in [
            ("wal_batches_in_flight_max", 0),
            ("wal_batches_in_flight_max", 65),
            ("wal_small_batches_in_flight_max", 0),
        ] {
            let c: ServerConfig = toml::from_str(&format!("{base}[raft]\n{key} = {v}")).unwrap();
            let err = c.engine_config().unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(&v.to_string()), "{err}");
        }
    }

    #[test]
    fn quic_udp_payload_bytes_reaches_the_engine_and_bad_sizes_name_the_key() {
        let mut c: ServerConfig =
            toml::from_str("node_id = 1\ninsecure_loopback = true\nquic_udp_payload_bytes = 6000")
                .unwrap();
        assert_eq!(c.engine_config().unwrap().quic_udp_payload_bytes, 6000);
        for bad in [1000, 9000] {
            c.quic_udp_payload_bytes = bad;
            let e = c.engine_config().unwrap_err().to_string();
            assert!(e.contains("quic_udp_payload_bytes"), "{e}");
        }
        c.quic_udp_payload_bytes = 0;
        assert_eq!(c.engine_config().unwrap().quic_udp_payload_bytes, 0);
    }

    #[test]
    fn snapshot_log_bytes_max_reaches_the_engine_and_tiny_values_name_the_key() {
        let mut c: ServerConfig = toml::from_str(
            "node_id = 1\ninsecure_loopback = true\n[raft]\nsnapshot_log_bytes_max = 536870912",
        )
        .unwrap();
        assert_eq!(c.engine_config().unwrap().snapshot_log_bytes_max, 512 << 20);
        assert_eq!(
            c.engine_config()
                .unwrap()
                .raft_config()
                .snapshot_log_bytes_max,
            512 << 20,
            "the raft core is the one that suggests snapshots"
        );
        c.raft.snapshot_log_bytes_max = 0;
        let e = c.engine_config().unwrap_err().to_string();
        assert!(e.contains("snapshot_log_bytes_max"), "{e}");
    }

    #[test]
    fn inline_applies_reach_the_engine_from_the_file_and_the_flags() {
        let c: ServerConfig = toml::from_str("node_id = 1\ninsecure_loopback = true").unwrap();
        let e = c.engine_config().unwrap();
        assert!(e.inline_applies, "on unless asked otherwise");
        assert_eq!(e.inline_apply_us_max, 2_000);
        let c: ServerConfig = toml::from_str(
            "node_id = 1\ninsecure_loopback = true\ninline_applies = false\ninline_apply_us_max = 500",
        )
        .unwrap();
        let e = c.engine_config().unwrap();
        assert!(!e.inline_applies);
        assert_eq!(e.inline_apply_us_max, 500);
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "bd-server",
            "run",
            "--node-id",
            "1",
            "--insecure-loopback",
            "--inline-applies",
            "false",
            "--inline-apply-us-max",
            "700",
        ])
        .unwrap();
        let crate::cli::Command::Run(run) = cli.command else {
            panic!("not run")
        };
        let e = run.resolve().unwrap().engine_config().unwrap();
        assert!(!e.inline_applies);
        assert_eq!(e.inline_apply_us_max, 700);
    }
}
