//! A tiny HTTP/1.1 server (one request per connection) for status and administration:
//! `GET /raft_stat` (braft's fields per block group, then one line of traffic counters per
//! core, text), `GET /status.json`, `GET /metrics` (Prometheus text format), `GET /dashboard`
//! (an HTML page of the same), and admin actions on a block group, answered in JSON:
//! `POST /bgs/<id>/snapshot` (take a snapshot now),
//! `POST /bgs/<id>/transfer_leader[?to=<node>]` (braft's transfer_leader), and
//! `POST /bgs/<id>/add_peer?peer=<node>` / `POST /bgs/<id>/remove_peer?peer=<node>` (braft's
//! add_peer / remove_peer: a single-peer membership change, started here). `bdctl` is their
//! command-line client. There is no authentication: whoever reaches `http_listen` may run the
//! admin actions, so it belongs on loopback (the default) or a management network. Hand-rolled
//! because a few routes without request bodies do not justify an HTTP stack; every client input
//! is bounded (request head size, time).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use engine::Engine;
use raftlog::core::{GroupId, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::error::Error;

/// Longest request head accepted (bytes).
const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Largest response [`request`] reads (the status of thousands of block groups is a few MB).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Connections served at once; more are answered 503 and closed, so a flood of idle or slow
/// clients costs bounded tasks and descriptors (each one's head must arrive within
/// `REQUEST_TIMEOUT`).
pub const HTTP_CONNECTIONS_MAX: usize = 64;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr`; serve with [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::HttpBind { addr, source })
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "HTTP listening (GET /raft_stat, /status.json, /metrics, /dashboard; POST /bgs/<id>/snapshot, /bgs/<id>/transfer_leader, /bgs/<id>/add_peer, /bgs/<id>/remove_peer)");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let Ok((mut sock, peer)) = listener.accept().await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, limit = HTTP_CONNECTIONS_MAX, "HTTP connections at their limit; refusing");
            tokio::spawn(async move {
                let busy = Reply::text(503, "too many HTTP connections; try again\n");
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), send(&mut sock, Some(busy))).await;
            });
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // The client gets REQUEST_TIMEOUT for its request head and again for reading the
            // answer; the action in between (a snapshot syncs a whole data file) is not cut.
            let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await {
                Ok(Ok(head)) => head,
                Ok(Err(reply)) => {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, send(&mut sock, reply)).await;
                    return;
                }
                Err(_) => {
                    debug!(%peer, "HTTP request head not received in time");
                    return;
                }
            };
            let reply = handle(&head, &engine).await;
            if tokio::time::timeout(REQUEST_TIMEOUT, send(&mut sock, Some(reply)))
                .await
                .is_err()
            {
                debug!(%peer, "HTTP client did not take its answer in time");
            }
        });
    }
}

/// The request head (up to the blank line), or the reply that refuses it.
async fn read_head(sock: &mut TcpStream) -> Result<String, Option<Reply>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(String::from_utf8_lossy(&buf[..p]).into_owned());
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return Err(Some(Reply::text(431, "request head too large\n")));
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn send(sock: &mut TcpStream, reply: Option<Reply>) {
    if let Some(r) = reply {
        let _ = respond(sock, r.code, r.ctype, &r.body).await;
    }
}

async fn handle(head: &str, engine: &Engine) -> Reply {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match Route::parse(path) {
        Route::Index if method == "GET" => Reply::text(200, INDEX),
        Route::Page(page) if method == "GET" => page_reply(page, engine).await,
        Route::Index | Route::Page(_) => Reply::text(405, "only GET is supported here\n"),
        Route::Admin { bg, action } if method == "POST" => admin(engine, bg, action, query).await,
        Route::Admin { .. } => Reply::json(405, error_doc("use POST for admin actions")),
        Route::BadBg(raw) => Reply::json(
            400,
            error_doc(&format!("bad block group id \"{raw}\" (a decimal number)")),
        ),
        Route::NotFound => Reply::text(404, NOT_FOUND),
    }
}

const NOT_FOUND: &str =
    "not found; try GET /raft_stat, GET /status.json, GET /metrics, GET /dashboard, \
POST /bgs/<id>/snapshot, POST /bgs/<id>/transfer_leader?to=<node>, \
POST /bgs/<id>/add_peer?peer=<node> or POST /bgs/<id>/remove_peer?peer=<node>\n";

/// `GET /`: what the server answers.
const INDEX: &str = "bd-server status and admin\n  \
GET  /raft_stat                         raft state of every block group (braft's fields)\n  \
GET  /status.json                       the same as JSON\n  \
GET  /metrics                           the same for Prometheus\n  \
GET  /dashboard                         the same as an HTML page (reloads every 2 s)\n  \
POST /bgs/<id>/snapshot                 take a snapshot of a block group now\n  \
POST /bgs/<id>/transfer_leader?to=<n>   hand its leadership to node n (no `to`: the most up-to-date voter)\n  \
POST /bgs/<id>/add_peer?peer=<n>        make node n a voter (it catches up first; on the leader)\n  \
POST /bgs/<id>/remove_peer?peer=<n>     remove node n from the group (on the leader)\n";

/// A status page: the node's state in one format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    RaftStat,
    StatusJson,
    Metrics,
    Dashboard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Snapshot,
    TransferLeader,
    AddPeer,
    RemovePeer,
}

#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Index,
    Page(Page),
    Admin {
        bg: GroupId,
        action: Action,
    },
    /// `/bgs/<raw>/<known action>` with an id that is not a number.
    BadBg(&'a str),
    NotFound,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Route<'a> {
        match path {
            "/" => return Route::Index,
            "/raft_stat" => return Route::Page(Page::RaftStat),
            "/status.json" => return Route::Page(Page::StatusJson),
            "/metrics" => return Route::Page(Page::Metrics),
            "/dashboard" => return Route::Page(Page::Dashboard),
            _ => {}
        }
        let mut seg = path.strip_prefix("/bgs/").unwrap_or("").split('/');
        let (Some(raw), Some(action), None) = (seg.next(), seg.next(), seg.next()) else {
            return Route::NotFound;
        };
        let action = match action {
            "snapshot" => Action::Snapshot,
            "transfer_leader" => Action::TransferLeader,
            "add_peer" => Action::AddPeer,
            "remove_peer" => Action::RemovePeer,
            _ => return Route::NotFound,
        };
        match raw.parse::<GroupId>() {
            Ok(bg) if raw.bytes().all(|b| b.is_ascii_digit()) => Route::Admin { bg, action },
            _ => Route::BadBg(raw),
        }
    }
}

struct Reply {
    code: u16,
    ctype: &'static str,
    body: String,
}

impl Reply {
    fn text(code: u16, body: &str) -> Reply {
        Reply {
            code,
            ctype: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }

    fn json(code: u16, doc: serde_json::Value) -> Reply {
        Reply {
            code,
            ctype: "application/json",
            body: format!("{doc}\n"),
        }
    }
}

fn error_doc(msg: &str) -> serde_json::Value {
    serde_json::json!({ "error": msg })
}

async fn page_reply(page: Page, engine: &Engine) -> Reply {
    // Every status page shows the same three snapshots, each in its own format.
    let node = engine.config().node_id;
    let bgs = engine.status().await;
    let cores = engine.core_stats();
    let links = engine.links().await;
    match page {
        Page::RaftStat => {
            let mut body = String::new();
            for s in &bgs {
                body.push_str(&s.raft_stat_text());
                body.push('\n');
            }
            for c in &cores {
                body.push_str(&c.raft_stat_text());
            }
            for l in &links {
                body.push_str(&l.raft_stat_text());
            }
            Reply::text(200, &body)
        }
        Page::StatusJson => Reply::json(
            200,
            serde_json::json!({
                "node": node,
                "cores": engine.config().cores,
                "bgs": bgs,
                "core_stats": cores,
                "links": links,
            }),
        ),
        Page::Metrics => Reply {
            code: 200,
            ctype: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::render(node, &bgs, &cores, &links),
        },
        Page::Dashboard => Reply {
            code: 200,
            ctype: "text/html; charset=utf-8",
            body: crate::dashboard::render(node, &bgs, &cores, &links),
        },
    }
}

/// Runs an admin action; the JSON always names the node and the block group.
async fn admin(engine: &Engine, bg: GroupId, action: Action, query: &str) -> Reply {
    let node = engine.config().node_id;
    match action {
        Action::Snapshot => {
            if !query.is_empty() {
                return Reply::json(400, error_doc("snapshot takes no parameters"));
            }
            match engine.snapshot(bg).await {
                Ok(index) => {
                    info!(bg, index, "snapshot taken on demand (HTTP)");
                    Reply::json(
                        200,
                        serde_json::json!({ "node": node, "bg": bg, "snapshot_index": index }),
                    )
                }
                Err(e) => admin_error(node, bg, &e),
            }
        }
        Action::TransferLeader => {
            let to = match node_param(query, "to") {
                Ok(to) => to,
                Err(msg) => return Reply::json(400, error_doc(&msg)),
            };
            match engine.transfer_leader(bg, to).await {
                Ok(target) => Reply::json(
                    200,
                    serde_json::json!({ "node": node, "bg": bg, "target": target }),
                ),
                Err(e) => admin_error(node, bg, &e),
            }
        }
        Action::AddPeer | Action::RemovePeer => {
            let peer = match node_param(query, "peer") {
                Ok(Some(p)) => p,
                Ok(None) => return Reply::json(400, error_doc("missing `peer=<node id>`")),
                Err(msg) => return Reply::json(400, error_doc(&msg)),
            };
            let change = if action == Action::AddPeer {
                engine::PeerChange::Add(peer)
            } else {
                engine::PeerChange::Remove(peer)
            };
            match engine.change_peers(bg, change).await {
                Ok(started) => {
                    info!(bg, ?change, started, "membership change asked for (HTTP)");
                    Reply::json(
                        200,
                        serde_json::json!({ "node": node, "bg": bg, "peer": peer, "started": started }),
                    )
                }
                Err(e) => admin_error(node, bg, &e),
            }
        }
    }
}

/// The query's only parameter, `name=<node id>`, if given (`to` of transfer_leader, `peer` of
/// add_peer / remove_peer).
fn node_param(query: &str, name: &str) -> Result<Option<NodeId>, String> {
    let mut found = None;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some((k, v)) if k == name => match v.parse::<NodeId>() {
                Ok(id) if id > 0 && found.is_none() => found = Some(id),
                Ok(_) if found.is_some() => return Err(format!("`{name}` given twice")),
                _ => return Err(format!("bad node id \"{v}\" in `{name}` (a number > 0)")),
            },
            _ => {
                return Err(format!(
                    "unknown parameter \"{kv}\" (only `{name}=<node id>`)"
                ))
            }
        }
    }
    Ok(found)
}

/// An engine error as an HTTP status and a JSON body with the message (and, when this node
/// is not the leader, the leader it knows, so a client can go there).
fn admin_error(node: NodeId, bg: GroupId, e: &engine::Error) -> Reply {
    use raftlog::Error as R;
    let code = match e {
        engine::Error::UnknownBg { .. } => 404,
        engine::Error::NotAPeer { .. } => 400,
        engine::Error::Raft { source, .. } => match source {
            R::NotLeader { .. } | R::Busy { .. } | R::TransferInProgress { .. } => 409,
            R::UnknownPeer { .. } | R::Invalid { .. } => 400,
            _ => 500,
        },
        engine::Error::ShuttingDown { .. } => 503,
        _ => 500,
    };
    let mut doc = serde_json::json!({ "node": node, "bg": bg, "error": error_text(e) });
    if let engine::Error::Raft {
        source: R::NotLeader { leader, .. },
        ..
    } = e
    {
        doc["leader"] = serde_json::json!(leader);
    }
    Reply::json(code, doc)
}

/// An engine error as an operator reads it: its own text, except that a refusal because this
/// node is not the leader names the leader as `leader: node 2` or `leader: unknown` (the raft
/// core's own message shows the hint as a Rust `Option`).
pub fn error_text(e: &engine::Error) -> String {
    match e {
        engine::Error::Raft {
            bg,
            source: raftlog::Error::NotLeader { leader, .. },
        } => format!("bg {bg}: not the leader ({})", leader_text(*leader)),
        _ => e.to_string(),
    }
}

/// `leader: node 2`, or `leader: unknown` when no leader is known.
pub fn leader_text(leader: Option<NodeId>) -> String {
    match leader {
        Some(l) => format!("leader: node {l}"),
        None => "leader: unknown".to_string(),
    }
}

async fn respond(sock: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// A minimal HTTP/1.1 client for `bdctl`, the dev supervisor and tests: sends `method path`
/// without a body and returns the status code and the body.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    (&mut s)
        .take(RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut out)
        .await?;
    if out.len() > RESPONSE_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "HTTP response from {addr}{path} over {RESPONSE_BYTES_MAX} bytes"
        )));
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("malformed HTTP response from {addr}")))?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "malformed HTTP status line from {addr}: \"{}\"",
                head.lines().next().unwrap_or("").escape_debug()
            ))
        })?;
    Ok((code, body.to_string()))
}

/// GET `path`: the body of a 200 response, else an error naming the status.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let (code, body) = request(addr, "GET", path).await?;
    if code != 200 {
        return Err(std::io::Error::other(format!(
            "HTTP {code} from {addr}{path}"
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_pages_admin_actions_and_bad_ids() {
        assert_eq!(Route::parse("/"), Route::Index);
        assert_eq!(Route::parse("/raft_stat"), Route::Page(Page::RaftStat));
        assert_eq!(Route::parse("/status.json"), Route::Page(Page::StatusJson));
        assert_eq!(Route::parse("/metrics"), Route::Page(Page::Metrics));
        assert_eq!(Route::parse("/dashboard"), Route::Page(Page::Dashboard));
        assert_eq!(
            Route::parse("/bgs/12/snapshot"),
            Route::Admin {
                bg: 12,
                action: Action::Snapshot
            }
        );
        assert_eq!(
            Route::parse("/bgs/0/transfer_leader"),
            Route::Admin {
                bg: 0,
                action: Action::TransferLeader
            }
        );
        assert_eq!(
            Route::parse("/bgs/3/add_peer"),
            Route::Admin {
                bg: 3,
                action: Action::AddPeer
            }
        );
        assert_eq!(
            Route::parse("/bgs/3/remove_peer"),
            Route::Admin {
                bg: 3,
                action: Action::RemovePeer
            }
        );
        for bad in ["x", "-1", "+3", "", "99999999999999999999999"] {
            assert_eq!(
                Route::parse(&format!("/bgs/{bad}/snapshot")),
                Route::BadBg(bad),
                "{bad:?}"
            );
        }
        for unknown in [
            "/bgs",
            "/bgs/",
            "/bgs/1",
            "/bgs/1/",
            "/bgs/1/compact",
            "/bgs/1/snapshot/now",
            "/raft_stat/",
            "//raft_stat",
            "/bg/1/snapshot",
        ] {
            assert_eq!(Route::parse(unknown), Route::NotFound, "{unknown:?}");
        }
    }

    #[test]
    fn transfer_target_takes_one_node_id_or_none() {
        assert_eq!(node_param("", "to"), Ok(None));
        assert_eq!(node_param("to=3", "to"), Ok(Some(3)));
        assert_eq!(node_param("&to=3&", "to"), Ok(Some(3)));
        for (q, says) in [
            ("to=0", "bad node id"),
            ("to=x", "bad node id"),
            ("to=", "bad node id"),
            ("to=-2", "bad node id"),
            ("to=2&to=3", "twice"),
            ("peer=2", "unknown parameter"),
            ("to", "unknown parameter"),
        ] {
            let e = node_param(q, "to").unwrap_err();
            assert!(e.contains(says), "{q:?}: {e}");
        }
    }

    #[test]
    fn peer_changes_take_exactly_one_peer() {
        assert_eq!(node_param("peer=4", "peer"), Ok(Some(4)));
        assert_eq!(node_param("", "peer"), Ok(None));
        for (q, says) in [
            ("peer=0", "bad node id"),
            ("peer=four", "bad node id"),
            ("peer=4&peer=5", "twice"),
            ("to=4", "unknown parameter"),
        ] {
            let e = node_param(q, "peer").unwrap_err();
            assert!(e.contains(says), "{q:?}: {e}");
        }
    }

    #[test]
    fn a_not_leader_error_names_the_leader_without_debug_formatting() {
        let not_leader = |leader| engine::Error::Raft {
            bg: 3,
            source: raftlog::Error::NotLeader { group: 3, leader },
        };
        let known = not_leader(Some(2));
        assert_eq!(error_text(&known), "bg 3: not the leader (leader: node 2)");
        let unknown = not_leader(None);
        assert_eq!(
            error_text(&unknown),
            "bg 3: not the leader (leader: unknown)"
        );
        for e in [&known, &unknown] {
            let text = error_text(e);
            assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
        }
        // The JSON answer: 409, the text above, and the leader as a number (null if unknown).
        let reply = admin_error(1, 3, &known);
        assert_eq!(reply.code, 409);
        let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(doc["error"], "bg 3: not the leader (leader: node 2)");
        assert_eq!(
            (doc["node"].as_u64(), doc["bg"].as_u64()),
            (Some(1), Some(3))
        );
        assert_eq!(doc["leader"], 2);
        let doc: serde_json::Value =
            serde_json::from_str(&admin_error(1, 3, &unknown).body).unwrap();
        assert_eq!(doc["error"], "bg 3: not the leader (leader: unknown)");
        assert!(doc["leader"].is_null());
        // Other errors keep their own text.
        let e = engine::Error::UnknownBg { bg: 7 };
        assert_eq!(error_text(&e), "bg 7: not hosted on this node");
        assert_eq!(admin_error(1, 7, &e).code, 404);
    }

    #[test]
    fn bad_inputs_are_quoted_as_given() {
        assert_eq!(
            node_param("to=x", "to").unwrap_err(),
            "bad node id \"x\" in `to` (a number > 0)"
        );
        assert_eq!(
            node_param("now=1", "to").unwrap_err(),
            "unknown parameter \"now=1\" (only `to=<node id>`)"
        );
    }
}
