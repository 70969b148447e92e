//! `GET /metrics`: the node's status in the Prometheus text exposition format (version 0.0.4),
//! for scraping and dashboards.
//!
//! Every value comes from the same snapshots as `/status.json` (block groups, core counters,
//! peer links), rendered here at request time. A metrics library would have us mirror each of
//! those values into its registry on every change, on the core threads' hot path; the format
//! itself is a few lines of text, so it is written directly. Names follow Prometheus practice:
//! `bd_` prefix, base units (seconds, bytes), counters end in `_total`, and every sample carries
//! the `node` label so that series of several nodes can be told apart once aggregated.

use std::fmt::Write;

use engine::{BgStatus, CoreStat, LinkStat, PeerStat};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family: its samples as (labels, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(String, f64)>,
}

/// Collects families in a fixed order and renders them.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> &mut Family {
        debug_assert_eq!(
            kind == Kind::Counter,
            name.ends_with("_total"),
            "{name}: counters and only counters end in _total"
        );
        self.families.push(Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, v) in &f.samples {
                let _ = writeln!(out, "{}{{{labels}}} {v}", f.name);
            }
        }
        out
    }
}

/// A label value escaped as the format requires (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the node's metrics.
pub fn render(node: u64, bgs: &[BgStatus], cores: &[CoreStat], links: &[LinkStat]) -> String {
    let mut e = Exposition::default();
    let bg_labels = |b: &BgStatus| {
        format!(
            "node=\"{node}\",bg=\"{}\",export=\"{}\"",
            b.bg,
            escape(&b.name)
        )
    };
    type BgValue = fn(&BgStatus) -> f64;
    let bg_gauges: [(&'static str, &'static str, BgValue); 18] = [
        (
            "bd_bg_is_leader",
            "1 if this node leads the block group.",
            |b| (b.state == "LEADER") as u8 as f64,
        ),
        (
            "bd_bg_term",
            "Current raft term of the block group on this node.",
            |b| b.term as f64,
        ),
        (
            "bd_bg_leader_node",
            "Node id of the leader this node knows (0: none).",
            |b| b.leader.unwrap_or(0) as f64,
        ),
        (
            "bd_bg_voters",
            "Voters in the block group's configuration.",
            |b| b.voters.len() as f64,
        ),
        (
            "bd_bg_first_log_index",
            "First raft log index kept (entries below are in the snapshot).",
            |b| b.first_log_index as f64,
        ),
        ("bd_bg_last_log_index", "Last raft log index.", |b| {
            b.last_log_index as f64
        }),
        (
            "bd_bg_commit_index",
            "Raft commit index known to this node.",
            |b| b.last_committed_index as f64,
        ),
        (
            "bd_bg_applied_index",
            "Raft index applied to the data file on this node.",
            |b| b.known_applied_index as f64,
        ),
        (
            "bd_bg_snapshot_index",
            "Raft index of the last snapshot on this node.",
            |b| b.last_snapshot_index as f64,
        ),
        (
            "bd_bg_log_bytes",
            "Bytes of raft log held in memory since the last snapshot.",
            |b| b.log_bytes as f64,
        ),
        (
            "bd_bg_pending_requests",
            "Client requests executing on this node as leader.",
            |b| b.pending_requests as f64,
        ),
        (
            "bd_bg_hibernating",
            "1 while the block group hibernates (no ticks, no heartbeats).",
            |b| b.hibernating as u8 as f64,
        ),
        ("bd_bg_size_bytes", "Size of the block volume.", |b| {
            b.size_bytes as f64
        }),
        (
            "bd_bg_allocated_bytes",
            "Disk space this replica's data file occupies (below the size when thin).",
            |b| b.allocated_bytes as f64,
        ),
        (
            "bd_bg_under_replicated",
            "On the leader: 1 while some member is being rebuilt (a rebuilding learner, or a voter answering from other storage than it is bound to).",
            |b| b.under_replicated as u8 as f64,
        ),
        (
            "bd_bg_rebuilding",
            "1 while this replica is being rebuilt (its storage was replaced or lost entries): a learner until it holds the committed log.",
            |b| b.rebuilding as u8 as f64,
        ),
        (
            "bd_bg_rebuild_done_bytes",
            "Bytes of the snapshot this replica is downloading received so far (0 when none).",
            |b| b.rebuild_bytes_done as f64,
        ),
        (
            "bd_bg_rebuild_size_bytes",
            "Bytes of the snapshot this replica is downloading in all (0 when none).",
            |b| b.rebuild_bytes_total as f64,
        ),
    ];
    for (name, help, value) in bg_gauges {
        let f = e.family(name, Kind::Gauge, help);
        for b in bgs {
            f.samples.push((bg_labels(b), value(b)));
        }
    }
    let f = e.family(
        "bd_bg_snapshot_busy",
        Kind::Gauge,
        "1 while a snapshot is saved, loaded, downloaded or sent (snapshot_status not IDLE).",
    );
    for b in bgs {
        f.samples
            .push((bg_labels(b), (b.snapshot_status != "IDLE") as u8 as f64));
    }
    type PeerValue = fn(&PeerStat) -> f64;
    let peer_gauges: [(&'static str, &'static str, PeerValue); 4] = [
        (
            "bd_bg_peer_match_index",
            "On the leader: last log index known replicated on each other member.",
            |p| p.match_index as f64,
        ),
        (
            "bd_bg_peer_connected",
            "On the leader: 1 if the link to each other member is up.",
            |p| p.connected as u8 as f64,
        ),
        (
            "bd_bg_peer_counted",
            "On the leader: 1 if each other member counts toward quorums (a voter answering from the disk it is bound to).",
            |p| p.counted as u8 as f64,
        ),
        (
            "bd_bg_peer_rebuilding",
            "On the leader: 1 while each other member is being rebuilt (storage replaced or behind what it acknowledged).",
            |p| p.rebuilding as u8 as f64,
        ),
    ];
    for (name, help, value) in peer_gauges {
        let f = e.family(name, Kind::Gauge, help);
        for b in bgs {
            for p in &b.peers {
                f.samples
                    .push((format!("{},peer=\"{}\"", bg_labels(b), p.id), value(p)));
            }
        }
    }

    let core_labels = |c: &CoreStat| format!("node=\"{node}\",core=\"{}\"", c.core);
    type CoreValue = fn(&CoreStat) -> f64;
    let core_families: [(&'static str, Kind, &'static str, CoreValue); 20] = [
        (
            "bd_core_raft_messages_sent_total",
            Kind::Counter,
            "Raft messages sent to peers (many travel in one frame).",
            |c| c.raft_messages_sent as f64,
        ),
        (
            "bd_core_frames_sent_total",
            Kind::Counter,
            "Transport frames written to peers.",
            |c| c.frames_sent as f64,
        ),
        (
            "bd_core_sent_bytes_total",
            Kind::Counter,
            "Bytes written to peers.",
            |c| c.bytes_sent as f64,
        ),
        (
            "bd_core_pings_sent_total",
            Kind::Counter,
            "Liveness pings among the frames sent.",
            |c| c.pings_sent as f64,
        ),
        (
            "bd_core_groups",
            Kind::Gauge,
            "Block groups on the core.",
            |c| c.groups as f64,
        ),
        (
            "bd_core_groups_hibernating",
            Kind::Gauge,
            "Block groups of the core that hibernate.",
            |c| c.groups_hibernating as f64,
        ),
        (
            "bd_core_wakes_total",
            Kind::Counter,
            "Hibernating block groups woken.",
            |c| c.wakes as f64,
        ),
        (
            "bd_core_raft_messages_refused_total",
            Kind::Counter,
            "Raft messages and forwarded requests from nodes that are not members of the group, refused.",
            |c| c.raft_messages_refused as f64,
        ),
        (
            "bd_core_inline_applies_active",
            Kind::Gauge,
            "1 while buffered applies are written on the core thread.",
            |c| c.inline_applies_active as u8 as f64,
        ),
        (
            "bd_core_applies_inline_total",
            Kind::Counter,
            "Applies written on the core thread instead of the data ring.",
            |c| c.applies_inline as f64,
        ),
        (
            "bd_core_inline_slow_writes_total",
            Kind::Counter,
            "Inline applies slower than inline_apply_us_max.",
            |c| c.inline_slow_writes as f64,
        ),
        (
            "bd_core_inline_dirty_refusals_total",
            Kind::Counter,
            "Times inline applies stopped at the machine's dirty page threshold.",
            |c| c.inline_dirty_refusals as f64,
        ),
        (
            "bd_wal_batches_total",
            Kind::Counter,
            "Durable WAL writes (one flush each).",
            |c| c.wal_batches as f64,
        ),
        (
            "bd_wal_appended_entries_total",
            Kind::Counter,
            "Raft entries appended to the WAL.",
            |c| c.wal_appended_entries as f64,
        ),
        (
            "bd_wal_appended_bytes_total",
            Kind::Counter,
            "Entry bytes appended to the WAL.",
            |c| c.wal_appended_bytes as f64,
        ),
        (
            "bd_wal_batch_disk_seconds_total",
            Kind::Counter,
            "Time WAL batches spent on the disk, summed (divide by bd_wal_batches_total for the mean write latency).",
            |c| c.wal_batch_disk_us as f64 / 1e6,
        ),
        (
            "bd_wal_segments",
            Kind::Gauge,
            "WAL segment files in use.",
            |c| c.wal_segments as f64,
        ),
        (
            "bd_wal_free_segments",
            Kind::Gauge,
            "Purged WAL segment files waiting for reuse.",
            |c| c.wal_free_segments as f64,
        ),
        (
            "bd_wal_recycled_segments_total",
            Kind::Counter,
            "WAL segments started on a purged segment's file.",
            |c| c.wal_recycled_segments as f64,
        ),
        (
            "bd_wal_zero_filled_segments_total",
            Kind::Counter,
            "WAL segments started on a file zero-filled in the background.",
            |c| c.wal_zero_filled_segments as f64,
        ),
    ];
    for (name, kind, help, value) in core_families {
        let f = e.family(name, kind, help);
        for c in cores {
            f.samples.push((core_labels(c), value(c)));
        }
    }

    let link_labels =
        |l: &LinkStat| format!("node=\"{node}\",core=\"{}\",peer=\"{}\"", l.core, l.peer);
    type LinkValue = fn(&LinkStat) -> f64;
    let link_families: [(&'static str, Kind, &'static str, LinkValue); 10] = [
        (
            "bd_link_connected",
            Kind::Gauge,
            "1 while the core's QUIC connection to the peer node is up.",
            |l| l.connected as u8 as f64,
        ),
        (
            "bd_link_frames_sent_total",
            Kind::Counter,
            "Frames sent to the peer.",
            |l| l.frames_sent as f64,
        ),
        (
            "bd_link_frames_received_total",
            Kind::Counter,
            "Frames received from the peer.",
            |l| l.frames_received as f64,
        ),
        (
            "bd_link_frames_dropped_total",
            Kind::Counter,
            "Frames dropped (queue full or failed write; raft resends).",
            |l| l.frames_dropped as f64,
        ),
        (
            "bd_link_sent_bytes_total",
            Kind::Counter,
            "Bytes sent to the peer.",
            |l| l.bytes_sent as f64,
        ),
        (
            "bd_link_udp_datagrams_sent_total",
            Kind::Counter,
            "UDP datagrams sent on the current connection (restarts at a reconnect).",
            |l| l.udp_datagrams_sent as f64,
        ),
        (
            "bd_link_udp_datagrams_received_total",
            Kind::Counter,
            "UDP datagrams received on the current connection (restarts at a reconnect).",
            |l| l.udp_datagrams_received as f64,
        ),
        (
            "bd_link_lost_packets_total",
            Kind::Counter,
            "QUIC packets lost on the current connection (restarts at a reconnect).",
            |l| l.lost_packets as f64,
        ),
        (
            "bd_link_udp_payload_bytes",
            Kind::Gauge,
            "UDP payload size in use (0 while disconnected).",
            |l| l.udp_payload_bytes as f64,
        ),
        (
            "bd_link_rtt_seconds",
            Kind::Gauge,
            "QUIC's smoothed round-trip time to the peer.",
            |l| l.rtt_us as f64 / 1e6,
        ),
    ];
    for (name, kind, help, value) in link_families {
        let f = e.family(name, kind, help);
        for l in links {
            f.samples.push((link_labels(l), value(l)));
        }
    }
    e.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bg(bg: u64, state: &str) -> BgStatus {
        BgStatus {
            bg,
            name: format!("bg{bg}"),
            core: 0,
            node: 1,
            state: state.into(),
            term: 4,
            leader: Some(1),
            voters: vec![1, 2, 3],
            conf_index: 1,
            conf_changing: false,
            first_log_index: 10,
            last_log_index: 20,
            disk_index: 20,
            known_applied_index: 19,
            last_committed_index: 19,
            last_snapshot_index: 9,
            last_snapshot_term: 3,
            readonly: false,
            snapshot_status: "IDLE".into(),
            size_bytes: 1 << 30,
            pending_requests: 2,
            log_bytes: 4096,
            hibernating: false,
            member: true,
            allocated_bytes: 3 << 20,
            disk_id: 0xd15c,
            rebuilding: false,
            rebuild_bytes_done: 0,
            rebuild_bytes_total: 0,
            under_replicated: false,
            peers: vec![PeerStat {
                id: 2,
                next_index: 21,
                match_index: 20,
                state: "Replicate".into(),
                connected: true,
                voter: true,
                disk_id: 0xd15c,
                counted: true,
                rebuilding: false,
            }],
        }
    }

    /// Every family has one HELP and one TYPE line before its samples, names and labels use
    /// the allowed characters, and every sample value parses as a number.
    #[test]
    fn exposition_is_well_formed() {
        let links = [LinkStat {
            core: 0,
            peer: 2,
            connected: true,
            rtt_us: 250,
            ..LinkStat::default()
        }];
        let cores = [CoreStat {
            wal_batch_disk_us: 1_500_000,
            wal_batches: 3,
            ..CoreStat::default()
        }];
        // bg0 leads here with node 3 being rebuilt (a learner, not counted); bg7 is the replica
        // being rebuilt here, 1 MiB into a 4 MiB snapshot.
        let mut led = bg(0, "LEADER");
        led.under_replicated = true;
        led.peers.push(PeerStat {
            id: 3,
            next_index: 1,
            match_index: 0,
            state: "Snapshot".into(),
            connected: true,
            voter: false,
            disk_id: 0xbeef,
            counted: false,
            rebuilding: true,
        });
        let mut rebuilt = bg(7, "FOLLOWER");
        rebuilt.peers.clear();
        rebuilt.voters = vec![1, 2];
        rebuilt.rebuilding = true;
        rebuilt.snapshot_status = "DOWNLOADING 1048576/4194304".into();
        rebuilt.rebuild_bytes_done = 1 << 20;
        rebuilt.rebuild_bytes_total = 4 << 20;
        let text = render(1, &[led, rebuilt], &cores, &links);
        let mut seen = std::collections::BTreeSet::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} twice");
                current = Some((name, String::new()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let cur = current.as_mut().expect("TYPE after HELP");
                assert_eq!(name, cur.0);
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                cur.1 = kind.into();
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = series.split_once('{').unwrap();
                let cur = current.as_ref().expect("sample after its HELP");
                assert_eq!(name, cur.0, "{line}");
                assert!(!cur.1.is_empty(), "sample before TYPE: {line}");
                assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
                assert!(
                    labels.ends_with('}') && labels.starts_with("node=\"1\""),
                    "{line}"
                );
                value
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("{line}: {e}"));
            }
        }
        assert!(seen.len() >= 40, "{} families", seen.len());
        let sample = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {series}:\n{text}"))
        };
        assert_eq!(
            sample("bd_bg_is_leader{node=\"1\",bg=\"0\",export=\"bg0\"}"),
            "1"
        );
        assert_eq!(
            sample("bd_bg_is_leader{node=\"1\",bg=\"7\",export=\"bg7\"}"),
            "0"
        );
        assert_eq!(
            sample("bd_bg_commit_index{node=\"1\",bg=\"7\",export=\"bg7\"}"),
            "19"
        );
        assert_eq!(
            sample("bd_bg_peer_match_index{node=\"1\",bg=\"0\",export=\"bg0\",peer=\"2\"}"),
            "20"
        );
        let bg0 = "node=\"1\",bg=\"0\",export=\"bg0\"";
        let bg7 = "node=\"1\",bg=\"7\",export=\"bg7\"";
        for (series, value) in [
            (format!("bd_bg_under_replicated{{{bg0}}}"), "1"),
            (format!("bd_bg_allocated_bytes{{{bg0}}}"), "3145728"),
            (format!("bd_bg_under_replicated{{{bg7}}}"), "0"),
            (format!("bd_bg_rebuilding{{{bg0}}}"), "0"),
            (format!("bd_bg_rebuilding{{{bg7}}}"), "1"),
            (format!("bd_bg_rebuild_done_bytes{{{bg0}}}"), "0"),
            (format!("bd_bg_rebuild_done_bytes{{{bg7}}}"), "1048576"),
            (format!("bd_bg_rebuild_size_bytes{{{bg0}}}"), "0"),
            (format!("bd_bg_rebuild_size_bytes{{{bg7}}}"), "4194304"),
            (format!("bd_bg_voters{{{bg7}}}"), "2"),
            (format!("bd_bg_peer_counted{{{bg0},peer=\"2\"}}"), "1"),
            (format!("bd_bg_peer_counted{{{bg0},peer=\"3\"}}"), "0"),
            (format!("bd_bg_peer_rebuilding{{{bg0},peer=\"2\"}}"), "0"),
            (format!("bd_bg_peer_rebuilding{{{bg0},peer=\"3\"}}"), "1"),
            (format!("bd_bg_peer_match_index{{{bg0},peer=\"3\"}}"), "0"),
        ] {
            assert_eq!(sample(&series), value, "{series}");
        }
        // Per-peer series exist only on the leader's rows.
        assert!(!text.contains("bg=\"7\",export=\"bg7\",peer="), "{text}");
        for family in [
            "bd_bg_under_replicated",
            "bd_bg_rebuilding",
            "bd_bg_rebuild_done_bytes",
            "bd_bg_rebuild_size_bytes",
            "bd_bg_peer_counted",
            "bd_bg_peer_rebuilding",
        ] {
            assert!(seen.contains(family), "{family}");
            assert!(
                text.contains(&format!("# TYPE {family} gauge\n")),
                "{family}"
            );
        }
        assert_eq!(
            sample("bd_wal_batch_disk_seconds_total{node=\"1\",core=\"0\"}"),
            "1.5"
        );
        assert_eq!(
            sample("bd_link_rtt_seconds{node=\"1\",core=\"0\",peer=\"2\"}"),
            "0.00025"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut b = bg(0, "LEADER");
        b.name = "odd\"name".into();
        let text = render(2, &[b], &[], &[]);
        assert!(text.contains("export=\"odd\\\"name\""), "{text}");
    }
}
