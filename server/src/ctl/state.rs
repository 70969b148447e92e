//! `bdctl state`: one row per replica of each block group with the fields of the seed's
//! GetRaftNodeState (braft_cli's `raft_stat` per peer), from every node's `/status.json` and, for
//! `--json`, its `/raft_stat` block.

use super::*;

/// `/raft_stat`'s block of each block group, by group id: from its `[name] (bg N, core C)`
/// line to the blank line that ends it (the per-core and per-link lines after the blocks are
/// left out).
pub fn raft_stat_blocks(text: &str) -> std::collections::BTreeMap<u64, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<(u64, String)> = None;
    for line in text.lines() {
        if let Some((_, block)) = current.as_mut() {
            if line.trim().is_empty() {
                let (bg, block) = current.take().expect("in a block");
                out.insert(bg, block);
            } else {
                block.push_str(line);
                block.push('\n');
            }
            continue;
        }
        let bg = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] (bg "))
            .and_then(|(_, rest)| rest.split([',', ')']).next())
            .and_then(|id| id.trim().parse::<u64>().ok());
        if let Some(bg) = bg {
            current = Some((bg, format!("{line}\n")));
        }
    }
    if let Some((bg, block)) = current {
        out.insert(bg, block);
    }
    out
}

/// What a replica's state machine is doing, from its status row: `loading_snapshot` (installing
/// one; it applies nothing meanwhile), `downloading_snapshot` (receiving one), `saving_snapshot`,
/// `applying` (committed entries not applied yet) or `applied` (caught up with its commit index).
pub fn fsm_state(b: &Value) -> &'static str {
    let snap = b["snapshot_status"].as_str().unwrap_or("");
    if snap.starts_with("LOADING") {
        "loading_snapshot"
    } else if snap.starts_with("DOWNLOADING") {
        "downloading_snapshot"
    } else if snap.starts_with("SAVING") {
        "saving_snapshot"
    } else if b["known_applied_index"].as_u64() < b["last_committed_index"].as_u64() {
        "applying"
    } else {
        "applied"
    }
}

/// One replica's row of `bdctl state` (braft_cli's raft node state); `--json` prints these
/// fields in this order. A field the node's status did not give is `None` (`null`, `-`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StateRow {
    pub group_id: Option<u64>,
    /// The node id.
    pub peer_id: Option<u64>,
    /// The node's HTTP address the row came from.
    pub addr: String,
    /// The voters.
    pub raft_conf: Vec<u64>,
    pub state: Option<String>,
    pub term: Option<u64>,
    pub leader: Option<u64>,
    /// See [`fsm_state`].
    pub fsm_state: &'static str,
    /// 16 hex digits, as in `/raft_stat`.
    pub disk_id: Option<String>,
    pub known_applied_id: Option<u64>,
    pub last_committed_id: Option<u64>,
    pub last_snapshot_id: Option<u64>,
    pub last_snapshot_term: Option<u64>,
    pub snapshot_status: Option<String>,
    /// Disk space the replica's data file occupies (below the volume's size when thin).
    pub allocated_bytes: Option<u64>,
    /// The node's `/raft_stat` block of the group (`--json` only).
    pub raw_raft_stat: Option<String>,
}

/// The `state` rows, one per (node, block group) status row, in the order of `rows`;
/// `raft_stat` holds each node's `/raft_stat` text (for `raw_raft_stat`, `None` when the node's
/// page is not at hand or lacks the group).
pub fn state_rows(
    rows: &[(SocketAddr, Value)],
    raft_stat: &[(SocketAddr, String)],
) -> Vec<StateRow> {
    let blocks: Vec<(SocketAddr, std::collections::BTreeMap<u64, String>)> = raft_stat
        .iter()
        .map(|(addr, text)| (*addr, raft_stat_blocks(text)))
        .collect();
    rows.iter()
        .map(|(addr, b)| {
            let n = |k: &str| b[k].as_u64();
            let s = |k: &str| b[k].as_str().map(str::to_string);
            let raw = blocks
                .iter()
                .find(|(a, _)| a == addr)
                .and_then(|(_, m)| m.get(&n("bg")?).cloned());
            StateRow {
                group_id: n("bg"),
                peer_id: n("node"),
                addr: addr.to_string(),
                raft_conf: voters_of(b),
                state: s("state"),
                term: n("term"),
                leader: n("leader"),
                fsm_state: fsm_state(b),
                disk_id: n("disk_id").map(|d| format!("{d:016x}")),
                known_applied_id: n("known_applied_index"),
                last_committed_id: n("last_committed_index"),
                last_snapshot_id: n("last_snapshot_index"),
                last_snapshot_term: n("last_snapshot_term"),
                snapshot_status: s("snapshot_status"),
                allocated_bytes: n("allocated_bytes"),
                raw_raft_stat: raw,
            }
        })
        .collect()
}

/// The `state` table of [`state_rows`] (without `addr` and `raw_raft_stat`; `--json` has
/// them). A missing field or an unknown leader shows as `-`.
pub fn state_table(rows: &[StateRow]) -> String {
    let line = |f: [&str; 14]| {
        format!(
            "{:>8} {:>7} {:<10} {:<10} {:>6} {:>6} {:<20} {:<16} {:>16} {:>17} {:>16} {:>18} {:>15}  {}\n",
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13]
        )
    };
    let mut out = line([
        "group_id",
        "peer_id",
        "raft_conf",
        "state",
        "term",
        "leader",
        "fsm_state",
        "disk_id",
        "known_applied_id",
        "last_committed_id",
        "last_snapshot_id",
        "last_snapshot_term",
        "allocated_bytes",
        "snapshot_status",
    ]);
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
    for r in rows {
        let conf = if r.raft_conf.is_empty() {
            "-".to_string()
        } else {
            let ids: Vec<String> = r.raft_conf.iter().map(u64::to_string).collect();
            ids.join(",")
        };
        out.push_str(&line([
            &n(r.group_id),
            &n(r.peer_id),
            &conf,
            &s(&r.state),
            &n(r.term),
            &n(r.leader),
            r.fsm_state,
            &s(&r.disk_id),
            &n(r.known_applied_id),
            &n(r.last_committed_id),
            &n(r.last_snapshot_id),
            &n(r.last_snapshot_term),
            &n(r.allocated_bytes),
            &s(&r.snapshot_status),
        ]));
    }
    out
}

pub(super) async fn state(
    nodes: &[SocketAddr],
    only: Option<u64>,
    json: bool,
) -> Result<(), Error> {
    let (rows, mut errors) = bg_rows(nodes, only).await;
    let mut raft_stat = Vec::new();
    let mut asked = nodes.len();
    if json {
        let mut answered: Vec<SocketAddr> = rows.iter().map(|(a, _)| *a).collect();
        answered.sort_unstable();
        answered.dedup();
        asked += answered.len();
        for addr in answered {
            match call_text(addr, "/raft_stat").await {
                Ok(text) => raft_stat.push((addr, text)),
                Err(e) => errors.push(e),
            }
        }
    }
    let out = state_rows(&rows, &raft_stat);
    if json {
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::AdminOutcome(format!("cannot render JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", state_table(&out));
    }
    report(errors, asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The status rows `bdctl status` is tested with.
    use crate::ctl::tests::row;

    /// `/raft_stat` of a node holding bg 0 and bg 1, as `BgStatus::raft_stat_text` and the
    /// per-core and per-link lines write it.
    const RAFT_STAT_NODE1: &str = "[bg0] (bg 0, core 0)\npeer_id: 1\nstate: LEADER\nterm: 3\n\
        leader: 1\npeers: 1 2 3\nsnapshot_status: IDLE\ndisk_id: 00000000000000ab\n\
        replicator_2: next_index=11 match_index=10 state=Replicate connected=true voter=true \
        disk_id=00000000000000cd counted=true\n\n\
        [bg1] (bg 1, core 1)\npeer_id: 1\nstate: FOLLOWER\nterm: 2\nleader: none\n\n\
        [core 0] raft_messages_sent: 5 frames_sent: 3\n[core 1] raft_messages_sent: 0\n\
        [core 0 -> node 2] connected: true frames_sent: 3\n";

    #[test]
    fn raft_stat_splits_into_one_block_per_group() {
        let b = raft_stat_blocks(RAFT_STAT_NODE1);
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert!(
            b[&0].starts_with("[bg0] (bg 0, core 0)\npeer_id: 1\n"),
            "{}",
            b[&0]
        );
        assert!(b[&0].ends_with("counted=true\n"), "{}", b[&0]);
        assert_eq!(
            b[&1],
            "[bg1] (bg 1, core 1)\npeer_id: 1\nstate: FOLLOWER\nterm: 2\nleader: none\n"
        );
        assert!(!b.values().any(|t| t.contains("[core")), "{b:?}");
        assert!(raft_stat_blocks("").is_empty());
    }

    type Rows = Vec<(SocketAddr, Value)>;

    /// Status rows of bg 0 on nodes 1-3 (node 3 installing a snapshot, node 2 behind its
    /// commit index) and bg 1 on node 1 without a leader.
    fn state_fixture() -> (Rows, Vec<(SocketAddr, String)>) {
        let mut rows = vec![
            row("127.0.0.1:1", 1, 0, "LEADER", 3),
            row("127.0.0.1:2", 2, 0, "FOLLOWER", 3),
            row("127.0.0.1:3", 3, 0, "FOLLOWER", 3),
            row("127.0.0.1:1", 1, 1, "FOLLOWER", 2),
        ];
        for (i, (_, b)) in rows.iter_mut().enumerate() {
            b["disk_id"] = serde_json::json!(0xab + i as u64);
            b["last_snapshot_term"] = serde_json::json!(2);
            b["allocated_bytes"] = serde_json::json!(4096 * (i as u64 + 1));
        }
        rows[1].1["known_applied_index"] = serde_json::json!(7);
        rows[2].1["snapshot_status"] = serde_json::json!("LOADING");
        rows[3].1["leader"] = Value::Null;
        let raft_stat = vec![("127.0.0.1:1".parse().unwrap(), RAFT_STAT_NODE1.to_string())];
        (rows, raft_stat)
    }

    #[test]
    fn state_json_has_one_object_per_replica_with_braft_cli_fields() {
        let (rows, raft_stat) = state_fixture();
        let out = state_rows(&rows, &raft_stat);
        assert_eq!(out.len(), 4);
        // What `--json` prints.
        let text = serde_json::to_string_pretty(&out).unwrap();
        let back: Vec<Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back[0],
            serde_json::json!({
                "group_id": 0, "peer_id": 1, "addr": "127.0.0.1:1", "raft_conf": [1, 2, 3],
                "state": "LEADER", "term": 3, "leader": 1, "fsm_state": "applied",
                "disk_id": "00000000000000ab", "known_applied_id": 9, "last_committed_id": 9,
                "last_snapshot_id": 4, "last_snapshot_term": 2, "snapshot_status": "IDLE",
                "allocated_bytes": 4096,
                "raw_raft_stat": raft_stat_blocks(RAFT_STAT_NODE1)[&0],
            })
        );
        assert_eq!(back[1]["fsm_state"], "applying");
        assert_eq!(back[2]["fsm_state"], "loading_snapshot");
        assert!(
            back[1]["raw_raft_stat"].is_null(),
            "node 2's page not at hand"
        );
        assert_eq!(back[3]["group_id"], 1);
        assert!(back[3]["leader"].is_null());
        assert!(back[3]["raw_raft_stat"]
            .as_str()
            .unwrap()
            .starts_with("[bg1] (bg 1, core 1)"));
        // The keys come in braft_cli's order, not sorted.
        let first = text.split("\n  },").next().unwrap();
        let keys: Vec<&str> = first
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "group_id",
                "peer_id",
                "addr",
                "raft_conf",
                "state",
                "term",
                "leader",
                "fsm_state",
                "disk_id",
                "known_applied_id",
                "last_committed_id",
                "last_snapshot_id",
                "last_snapshot_term",
                "snapshot_status",
                "allocated_bytes",
                "raw_raft_stat"
            ],
            "{text}"
        );
    }

    #[test]
    fn state_table_has_a_header_and_a_row_per_replica() {
        let (rows, _) = state_fixture();
        let t = state_table(&state_rows(&rows, &[]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        let head: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            head,
            [
                "group_id",
                "peer_id",
                "raft_conf",
                "state",
                "term",
                "leader",
                "fsm_state",
                "disk_id",
                "known_applied_id",
                "last_committed_id",
                "last_snapshot_id",
                "last_snapshot_term",
                "allocated_bytes",
                "snapshot_status"
            ]
        );
        let f: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            f,
            [
                "0",
                "1",
                "1,2,3",
                "LEADER",
                "3",
                "1",
                "applied",
                "00000000000000ab",
                "9",
                "9",
                "4",
                "2",
                "4096",
                "IDLE"
            ]
        );
        assert!(
            lines[3].contains(" loading_snapshot ") && lines[3].ends_with("LOADING"),
            "{t}"
        );
        let f: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!((f[0], f[3], f[5]), ("1", "FOLLOWER", "-"), "{t}");
        // A row with missing fields shows dashes, not `null` or a Rust Option.
        let t = state_table(&state_rows(
            &[("127.0.0.1:9".parse().unwrap(), serde_json::json!({}))],
            &[],
        ));
        let last = t.lines().nth(1).unwrap();
        assert!(!last.contains("null") && !last.contains("None"), "{t}");
        assert_eq!(
            last.split_whitespace().filter(|f| *f == "-").count(),
            13,
            "{t}"
        );
        assert!(
            CtlArgs::try_parse_from(["bdctl", "state", "--bg", "0", "--json"]).is_ok(),
            "state takes --bg and --json"
        );
    }
}
