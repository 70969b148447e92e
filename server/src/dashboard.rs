//! `GET /dashboard`: one HTML page with the node's block groups, cores (WAL included) and peer
//! links, rendered on the server from the same snapshots as `/status.json` and reloaded by the
//! browser every 2 seconds. No script, no external assets: it works from any browser that can
//! reach `http_listen`, and what it shows is tested like any other output.

use std::fmt::Write;

use engine::{BgStatus, CoreStat, LinkStat};

/// HTML-escapes text placed in an element or an attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// `bytes` in binary units for people: `512 B`, `1.5 KiB`, `4.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How a replica being rebuilt is shown: `rebuilding`, with the snapshot's bytes received and
/// in all while it downloads one.
pub fn rebuilding_text(done: u64, total: u64) -> String {
    if total == 0 {
        "rebuilding".to_string()
    } else {
        format!("rebuilding {}/{}", human_bytes(done), human_bytes(total))
    }
}

/// The page.
pub fn render(node: u64, bgs: &[BgStatus], cores: &[CoreStat], links: &[LinkStat]) -> String {
    let mut h = String::new();
    let leading = bgs.iter().filter(|b| b.state == "LEADER").count();
    let mut alerts = String::new();
    let under = bgs.iter().filter(|b| b.under_replicated).count();
    if under > 0 {
        let _ = write!(
            alerts,
            ", <span class=\"bad\">{under} under-replicated</span>"
        );
    }
    let rebuilding = bgs.iter().filter(|b| b.rebuilding).count();
    if rebuilding > 0 {
        let _ = write!(
            alerts,
            ", <span class=\"bad\">{rebuilding} being rebuilt here</span>"
        );
    }
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>bd node {node}</title><style>\
         body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:2px 8px;text-align:right}}th{{background:#eee}}\
         td.l{{text-align:left}}.LEADER{{color:#070;font-weight:bold}}.CANDIDATE{{color:#a60}}\
         .bad{{color:#b00;font-weight:bold}}</style></head><body>\n\
         <h1>bd node {node}</h1>\n<p>{} block groups, {leading} led here{alerts}; \
         <a href=\"/raft_stat\">raft_stat</a> · <a href=\"/status.json\">status.json</a> · \
         <a href=\"/metrics\">metrics</a></p>\n",
        bgs.len()
    );

    h.push_str(
        "<h2>Block groups</h2>\n<table id=\"bgs\"><tr><th>bg</th><th>export</th><th>core</th>\
         <th>state</th><th>term</th><th>leader</th><th>voters</th><th>log</th><th>commit</th>\
         <th>applied</th><th>snapshot</th><th>snapshot status</th><th>log MiB</th>\
         <th>pending</th><th>replication</th><th>followers (match, lag)</th></tr>\n",
    );
    for b in bgs {
        let voters: Vec<String> = b.voters.iter().map(|v| v.to_string()).collect();
        let followers: Vec<String> = b
            .peers
            .iter()
            .map(|p| {
                let lag = b.last_log_index.saturating_sub(p.match_index);
                let mut marks = String::new();
                if !p.connected {
                    marks.push_str(" <span class=\"bad\">down</span>");
                }
                if p.rebuilding {
                    marks.push_str(" <span class=\"bad\">rebuilding</span>");
                } else if p.voter && !p.counted {
                    marks.push_str(" <span class=\"bad\">not counted</span>");
                }
                if !p.voter {
                    marks.push_str(" learner");
                }
                format!("{}: {} ({lag}){marks}", p.id, p.match_index)
            })
            .collect();
        let mut replication = Vec::new();
        if b.under_replicated {
            replication.push("<span class=\"bad\">under-replicated</span>".to_string());
        }
        if b.rebuilding {
            replication.push(format!(
                "<span class=\"bad\">{}</span>",
                rebuilding_text(b.rebuild_bytes_done, b.rebuild_bytes_total)
            ));
        }
        let state = if b.hibernating {
            format!("{} (hibernating)", esc(&b.state))
        } else {
            esc(&b.state)
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l {}\">{state}</td>\
             <td>{}</td><td>{}</td><td class=\"l\">{}</td><td>{}..{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td>\
             <td class=\"l\">{}</td></tr>",
            b.bg,
            esc(&b.name),
            b.core,
            esc(&b.state),
            b.term,
            b.leader.map_or("-".to_string(), |l| l.to_string()),
            voters.join(", "),
            b.first_log_index,
            b.last_log_index,
            b.last_committed_index,
            b.known_applied_index,
            b.last_snapshot_index,
            esc(&b.snapshot_status),
            mib(b.log_bytes as u64),
            b.pending_requests,
            replication.join("; "),
            followers.join("; "),
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h2>Cores</h2>\n<table id=\"cores\"><tr><th>core</th><th>groups</th>\
         <th>hibernating</th><th>WAL batches</th><th>WAL entries</th><th>WAL MiB</th>\
         <th>WAL µs/batch</th><th>WAL segments</th><th>raft msgs sent</th><th>frames sent</th>\
         <th>MiB sent</th></tr>\n",
    );
    for c in cores {
        let per_batch = c.wal_batch_disk_us.checked_div(c.wal_batches).unwrap_or(0);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.core,
            c.groups,
            c.groups_hibernating,
            c.wal_batches,
            c.wal_appended_entries,
            mib(c.wal_appended_bytes),
            per_batch,
            c.wal_segments,
            c.raft_messages_sent,
            c.frames_sent,
            mib(c.bytes_sent),
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h2>Links to peer nodes</h2>\n<table id=\"links\"><tr><th>core</th><th>peer</th>\
         <th>connected</th><th>rtt µs</th><th>lost packets</th><th>UDP payload</th>\
         <th>frames sent</th><th>frames received</th><th>frames dropped</th></tr>\n",
    );
    for l in links {
        let connected = if l.connected {
            "yes".to_string()
        } else {
            "<span class=\"bad\">no</span>".to_string()
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{connected}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            l.core,
            l.peer,
            l.rtt_us,
            l.lost_packets,
            l.udp_payload_bytes,
            l.frames_sent,
            l.frames_received,
            l.frames_dropped,
        );
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::PeerStat;

    fn bg(id: u64, state: &str, name: &str) -> BgStatus {
        BgStatus {
            bg: id,
            name: name.into(),
            core: 1,
            node: 2,
            state: state.into(),
            term: 7,
            leader: Some(2),
            voters: vec![1, 2, 3],
            conf_index: 1,
            conf_changing: false,
            first_log_index: 5,
            last_log_index: 40,
            disk_index: 40,
            known_applied_index: 39,
            last_committed_index: 39,
            last_snapshot_index: 4,
            last_snapshot_term: 6,
            readonly: false,
            snapshot_status: "IDLE".into(),
            size_bytes: 1 << 30,
            pending_requests: 3,
            log_bytes: 3 << 20,
            hibernating: false,
            member: true,
            allocated_bytes: 3 << 20,
            disk_id: 0xd15c,
            rebuilding: false,
            rebuild_bytes_done: 0,
            rebuild_bytes_total: 0,
            under_replicated: false,
            peers: vec![
                PeerStat {
                    id: 1,
                    next_index: 41,
                    match_index: 40,
                    state: "Replicate".into(),
                    connected: true,
                    voter: true,
                    disk_id: 0xd15c,
                    counted: true,
                    rebuilding: false,
                },
                PeerStat {
                    id: 3,
                    next_index: 31,
                    match_index: 30,
                    state: "Probe".into(),
                    connected: false,
                    voter: true,
                    disk_id: 0xd15c,
                    counted: false,
                    rebuilding: false,
                },
            ],
        }
    }

    /// The rows of table `id`, each a list of cell texts (tags stripped).
    fn rows(html: &str, id: &str) -> Vec<Vec<String>> {
        let start = html.find(&format!("<table id=\"{id}\">")).expect("table");
        let end = start + html[start..].find("</table>").unwrap();
        html[start..end]
            .split("<tr>")
            .skip(2)
            .map(|row| {
                row.split("<td")
                    .skip(1)
                    .map(|cell| {
                        let text = &cell[cell.find('>').unwrap() + 1..cell.find("</td>").unwrap()];
                        let mut out = String::new();
                        let mut in_tag = false;
                        for ch in text.chars() {
                            match ch {
                                '<' => in_tag = true,
                                '>' => in_tag = false,
                                c if !in_tag => out.push(c),
                                _ => {}
                            }
                        }
                        out
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn one_row_per_group_core_and_link_with_their_figures() {
        let mut quiet = bg(9, "FOLLOWER", "bg9");
        quiet.hibernating = true;
        quiet.peers.clear();
        let cores = [CoreStat {
            core: 1,
            groups: 2,
            wal_batches: 4,
            wal_batch_disk_us: 1000,
            wal_appended_bytes: 2 << 20,
            ..CoreStat::default()
        }];
        let links = [LinkStat {
            core: 1,
            peer: 3,
            connected: false,
            rtt_us: 180,
            ..LinkStat::default()
        }];
        let html = render(2, &[bg(0, "LEADER", "bg0"), quiet], &cores, &links);
        assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(html.contains("2 block groups, 1 led here"));
        let b = rows(&html, "bgs");
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0][0..7], ["0", "bg0", "1", "LEADER", "7", "2", "1, 2, 3"]);
        assert_eq!(b[0][7..13], ["5..40", "39", "39", "4", "IDLE", "3.0"]);
        assert_eq!(b[0][14], "");
        assert_eq!(b[0][15], "1: 40 (0); 3: 30 (10) down not counted");
        assert_eq!(b[1][3], "FOLLOWER (hibernating)");
        assert_eq!(b[1][14..16], ["", ""]);
        let c = rows(&html, "cores");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0][0..7], ["1", "2", "0", "4", "0", "2.0", "250"]);
        let l = rows(&html, "links");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0][0..4], ["1", "3", "no", "180"]);
    }

    /// A leader with a member being rebuilt says the group is under-replicated and marks that
    /// peer; the replica being rebuilt says so on its own row, with the snapshot's progress.
    #[test]
    fn under_replicated_groups_and_rebuilding_replicas_are_shown() {
        let mut led = bg(0, "LEADER", "bg0");
        led.under_replicated = true;
        led.voters = vec![1, 2];
        led.peers[1] = PeerStat {
            id: 3,
            next_index: 1,
            match_index: 0,
            state: "Snapshot".into(),
            connected: true,
            voter: false,
            disk_id: 0xbeef,
            counted: false,
            rebuilding: true,
        };
        let mut rebuilt = bg(4, "FOLLOWER", "bg4");
        rebuilt.peers.clear();
        rebuilt.rebuilding = true;
        rebuilt.snapshot_status = "DOWNLOADING 1572864/4294967296".into();
        rebuilt.rebuild_bytes_done = 3 << 19;
        rebuilt.rebuild_bytes_total = 4 << 30;
        let mut catching_up = bg(5, "FOLLOWER", "bg5");
        catching_up.peers.clear();
        catching_up.rebuilding = true;
        let html = render(2, &[led, rebuilt, catching_up], &[], &[]);
        assert!(
            html.contains("3 block groups, 1 led here, ")
                && html.contains(">1 under-replicated</span>")
                && html.contains(">2 being rebuilt here</span>"),
            "{html}"
        );
        let b = rows(&html, "bgs");
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b[0][14], "under-replicated");
        assert_eq!(b[0][15], "1: 40 (0); 3: 0 (40) rebuilding learner");
        assert!(html.contains("<span class=\"bad\">under-replicated</span>"));
        assert_eq!(b[1][14], "rebuilding 1.5 MiB/4.0 GiB");
        assert_eq!(b[2][14], "rebuilding");
        // A healthy page has no such marks.
        let html = render(2, &[bg(0, "LEADER", "bg0")], &[], &[]);
        assert!(html.contains("1 block groups, 1 led here; "), "{html}");
        assert!(!html.contains("under-replicated") && !html.contains("rebuilding"));
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(rebuilding_text(0, 0), "rebuilding");
        assert_eq!(rebuilding_text(0, 1 << 20), "rebuilding 0 B/1.0 MiB");
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let html = render(1, &[bg(0, "LEADER", "<script>x</script>")], &[], &[]);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
    }
}
