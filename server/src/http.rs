//! A tiny HTTP/1.1 status server (GET only, one request per connection): `/raft_stat` (braft's
//! fields per block group, then one line of traffic counters per core, text) and `/status.json`. Hand-rolled because two read-only pages do
//! not justify an HTTP stack; every client input is bounded (request head size, time).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::error::Error;

/// Longest request head accepted (bytes).
const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
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
        info!(addr = %a, "HTTP status listening (/raft_stat, /status.json)");
    }
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT * 2, handle(sock, engine)).await {
                debug!(%peer, error = %e, "HTTP connection timed out");
            }
        });
    }
}

async fn handle(mut sock: TcpStream, engine: Arc<Engine>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            let _ = respond(&mut sock, 431, "text/plain", "request head too large\n").await;
            return;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        let _ = respond(&mut sock, 405, "text/plain", "only GET is supported\n").await;
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/raft_stat" => {
            let mut body = String::new();
            for s in engine.status().await {
                body.push_str(&s.raft_stat_text());
                body.push('\n');
            }
            for c in engine.core_stats() {
                body.push_str(&c.raft_stat_text());
            }
            for l in engine.links().await {
                body.push_str(&l.raft_stat_text());
            }
            let _ = respond(&mut sock, 200, "text/plain; charset=utf-8", &body).await;
        }
        "/status.json" => {
            let status = engine.status().await;
            let doc = serde_json::json!({
                "node": engine.config().node_id,
                "cores": engine.config().cores,
                "bgs": status,
                "core_stats": engine.core_stats(),
                "links": engine.links().await,
            });
            let _ = respond(&mut sock, 200, "application/json", &format!("{doc}\n")).await;
        }
        "/" => {
            let body = "bd-server status\n  /raft_stat    raft state of every block group (braft's fields)\n  /status.json  the same as JSON\n";
            let _ = respond(&mut sock, 200, "text/plain", body).await;
        }
        _ => {
            let _ = respond(
                &mut sock,
                404,
                "text/plain",
                "not found; try /raft_stat or /status.json\n",
            )
            .await;
        }
    }
}

async fn respond(sock: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// A minimal GET for the dev supervisor and tests: returns the body of a 200 response.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "HTTP {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}
