//! One client connection from accept to close: socket setup, handshake under a deadline, then
//! the transmission phase. Whatever goes wrong ends here with one log line; it never reaches
//! the listener or other connections.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::backend::{BlockBackend, ExportRegistry};
use super::server::{NbdConfig, ShutdownSignal};
use super::{handshake, transmission};
use crate::error::Error;

/// Socket read buffer: holds many small request headers, so pipelined requests cost one read.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Socket write buffer: batches reply headers; large read payloads bypass it.
const WRITE_BUFFER_BYTES: usize = 256 << 10;

pub(crate) async fn serve<R: ExportRegistry>(
    stream: TcpStream,
    peer: SocketAddr,
    registry: Arc<R>,
    config: Arc<NbdConfig>,
    shutdown: ShutdownSignal,
) {
    // Small replies must not wait for Nagle; the spec asks both sides to disable it.
    if let Err(e) = stream.set_nodelay(true) {
        debug!("cannot set TCP_NODELAY: {e}");
    }
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);

    let deadline = Duration::from_millis(config.handshake_timeout_ms);
    let negotiated = tokio::time::timeout(
        deadline,
        handshake::negotiate(&mut rd, &mut wr, &*registry, &config, peer, &shutdown),
    )
    .await;
    let session = match negotiated {
        Err(_) => {
            warn!(
                timeout_ms = config.handshake_timeout_ms,
                "NBD handshake timed out; closing"
            );
            return;
        }
        Ok(Err(e)) => {
            log_end(&e);
            return;
        }
        Ok(Ok(None)) => {
            debug!("client left during the handshake");
            return;
        }
        Ok(Ok(Some(session))) => session,
    };
    let export = session.export.clone();
    info!(
        export,
        size = session.size,
        flags = session.flags,
        "NBD client attached"
    );
    let Some(home) = session.backend.home() else {
        match transmission::run(&mut rd, wr, session, &config, shutdown, peer).await {
            Ok(()) => info!(export, "NBD client detached"),
            Err(e) => log_end(&e),
        }
        return;
    };
    // Move the connection to the backend's runtime. The read buffer may already hold requests
    // the client pipelined right after the handshake; they are carried over in front of the
    // socket. The handshake flushed every reply it wrote, so the write buffer is empty.
    debug_assert!(wr.buffer().is_empty(), "handshake left unflushed bytes");
    let leftover = rd.buffer().to_vec();
    let stream = match rd.into_inner().reunite(wr.into_inner()) {
        Ok(s) => s,
        Err(e) => {
            warn!(export, "cannot reunite the NBD socket halves: {e}");
            return;
        }
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(
                export,
                "cannot detach the NBD socket from the front runtime: {e}"
            );
            return;
        }
    };
    let name = export.clone();
    let moved = home.spawn(async move {
        let stream = match TcpStream::from_std(std_stream) {
            Ok(s) => s,
            Err(e) => {
                warn!(export, "cannot register the NBD socket with its core: {e}");
                return;
            }
        };
        let (rd, wr) = stream.into_split();
        let mut rd =
            BufReader::with_capacity(READ_BUFFER_BYTES, std::io::Cursor::new(leftover).chain(rd));
        let wr = BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);
        match transmission::run(&mut rd, wr, session, &config, shutdown, peer).await {
            Ok(()) => info!(export, "NBD client detached"),
            Err(e) => log_end(&e),
        }
    });
    // The connection lives until its task ends (the server's shutdown waits for this).
    if let Err(e) = moved.await {
        warn!(
            export = name,
            "NBD connection task on its core ended abnormally (the core stopped?): {e}"
        );
    }
}

/// A vanished peer is routine; a protocol violation is worth a warning.
fn log_end(e: &Error) {
    match e {
        Error::NbdIo { source, .. }
            if matches!(
                source.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) =>
        {
            debug!("NBD connection ended: {e}")
        }
        _ => warn!("NBD connection closed: {e}"),
    }
}
