//! The transmission phase of one connection: read requests, serve them concurrently, write
//! simple replies in completion order.
//!
//! One reader loop (this task) parses requests and spawns a task per request; a single writer
//! task owns the socket's write half and writes replies as they complete, so replies never
//! interleave and one slow request does not hold back the others. Backpressure: a request holds
//! a slot of `inflight_requests_max` and its payload bytes of `inflight_bytes_max` from before
//! its payload is read until its reply is written, so a client that pipelines faster than we
//! serve (or stops reading replies) stalls only itself.
//!
//! Requests are validated before reaching the backend, with the errors the spec recommends:
//! unknown command or flag, read or trim past the end, oversized read → `EINVAL`; write or
//! write-zeroes past the end → `ENOSPC`; any write on a read-only export → `EPERM`; fast zero a
//! backend cannot do fast → `ENOTSUP`. The connection keeps working after all of these. Only a
//! request that leaves the stream unusable closes it: a bad magic, or a write payload over 32 MiB
//! we refuse to drain.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::backend::{BlockBackend, Errno};
use super::handshake::Session;
use super::proto::*;
use super::server::{NbdConfig, ShutdownSignal, WRITE_DRAIN_BYTES_MAX};
use crate::error::Error;

/// A validated request, ready for the backend.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    /// A zero-length read/write/trim/zero: valid, nothing to do.
    Nothing,
}

/// What validation needs to know about the export.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub fast_zero_trim: bool,
    pub fast_zero_no_hole: bool,
    pub request_bytes_max: u32,
}

/// Checks a request against the spec and the export; `payload` is the write data, if any.
pub(crate) fn validate(
    req: &RequestHeader,
    payload: Option<Bytes>,
    lim: &ExportLimits,
) -> Result<Op, Errno> {
    let allowed = match req.kind {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        // CACHE, BLOCK_STATUS and anything newer were not negotiated.
        _ => return Err(Errno::Inval),
    };
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    // FUA is valid on every command; it only means something on the writing ones.
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let end = req.offset.checked_add(u64::from(req.len));
    let within = end.is_some_and(|end| end <= lim.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return Err(Errno::Perm);
    }
    match req.kind {
        CMD_READ => {
            if req.len > lim.request_bytes_max || !within {
                return Err(Errno::Inval);
            }
            Ok(Op::Read {
                offset: req.offset,
                len: req.len,
            })
        }
        CMD_WRITE => {
            if req.len > lim.request_bytes_max || end.is_none() {
                return Err(Errno::Inval);
            }
            if !within {
                return Err(Errno::NoSpc);
            }
            if req.len == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Write {
                offset: req.offset,
                data: payload.unwrap_or_default(),
                fua,
            })
        }
        CMD_FLUSH => {
            if req.offset != 0 || req.len != 0 {
                return Err(Errno::Inval);
            }
            Ok(Op::Flush)
        }
        CMD_TRIM => {
            if !within {
                return Err(Errno::Inval);
            }
            if req.len == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Trim {
                offset: req.offset,
                len: req.len,
                fua,
            })
        }
        CMD_WRITE_ZEROES => {
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            // No maximum block size here, unlike the spec's SHOULD for non-fast zeroes: the
            // Linux client sets max_write_zeroes_sectors to UINT_MAX and ignores the advertised
            // maximum, and a request without payload costs us nothing to accept.
            if end.is_none() {
                return Err(Errno::Inval);
            }
            if !within {
                return Err(Errno::NoSpc);
            }
            let can_fast = if may_trim {
                lim.fast_zero_trim
            } else {
                lim.fast_zero_no_hole
            };
            if fast && !can_fast {
                return Err(Errno::NotSup);
            }
            if req.len == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::WriteZeroes {
                offset: req.offset,
                len: req.len,
                fua,
                may_trim,
            })
        }
        _ => Err(Errno::Inval),
    }
}

/// One reply for the writer task. The permits are released once the reply is written.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Runs the transmission phase until the client disconnects, breaks the protocol, or shutdown
/// triggers; in-flight requests are always finished and answered before returning.
pub(crate) async fn run<B, Rd, Wr>(
    rd: &mut Rd,
    wr: BufWriter<Wr>,
    session: Session<B>,
    config: &NbdConfig,
    mut shutdown: ShutdownSignal,
    peer: SocketAddr,
) -> Result<(), Error>
where
    B: BlockBackend,
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin + Send + 'static,
{
    let export = session.export.clone();
    let lim = ExportLimits {
        size: session.size,
        read_only: session.flags & TFLAG_READ_ONLY != 0,
        fast_zero_trim: session.backend.can_fast_zero(true),
        fast_zero_no_hole: session.backend.can_fast_zero(false),
        request_bytes_max: config.request_bytes_max,
    };
    let protocol = |reason: String| Error::NbdProtocol {
        peer,
        export: Some(export.clone()),
        reason,
    };
    let io = |op: &'static str| {
        let export = export.clone();
        move |source| Error::NbdIo {
            peer,
            export: Some(export),
            op,
            source,
        }
    };

    // Capacity covers every possible in-flight reply, so a finishing request never waits here.
    let (tx, rx) = mpsc::channel::<Reply>(config.inflight_requests_max);
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(config.inflight_requests_max));
    let budget = Arc::new(Semaphore::new(config.inflight_bytes_max));
    let mut tasks = JoinSet::new();

    let ended: Result<(), Error> = loop {
        while let Some(done) = tasks.try_join_next() {
            report_panic(done, &export);
        }
        let mut head = [0u8; REQUEST_HEADER_BYTES];
        let read = tokio::select! {
            biased;
            _ = shutdown.triggered() => {
                debug!(export, "server shutdown: no more requests read");
                break Ok(());
            }
            // The writer is gone (socket write failed): nothing we serve can be answered.
            _ = tx.closed() => break Ok(()),
            read = rd.read_exact(&mut head) => read,
        };
        match read {
            Ok(_) => {}
            // Clients often close without NBD_CMD_DISC; that is not worth more than a debug line.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(export, "client closed the connection");
                break Ok(());
            }
            Err(e) => break Err(io("reading request")(e)),
        }
        let Some(req) = RequestHeader::parse(&head) else {
            break Err(protocol(format!(
                "bad request magic {:#010x}",
                u32::from_be_bytes([head[0], head[1], head[2], head[3]])
            )));
        };
        if req.kind == CMD_DISC {
            debug!(export, "client sent NBD_CMD_DISC");
            break Ok(());
        }
        if req.kind == CMD_WRITE && req.len > config.request_bytes_max {
            if req.len > WRITE_DRAIN_BYTES_MAX {
                break Err(protocol(format!(
                    "write at offset {} announces {} bytes, over the 32 MiB we must accept",
                    req.offset, req.len
                )));
            }
            // Within what the spec says clients may send: drain it and answer EINVAL.
            let mut sink = tokio::io::sink();
            let drained = tokio::io::copy(&mut (&mut *rd).take(u64::from(req.len)), &mut sink)
                .await
                .map_err(io("draining oversized write"));
            match drained {
                Ok(n) if n == u64::from(req.len) => {}
                Ok(_) => break Err(protocol("connection closed inside a write payload".into())),
                Err(e) => break Err(e),
            }
        }

        let cost = match req.kind {
            CMD_WRITE | CMD_READ if req.len <= config.request_bytes_max => req.len,
            _ => 0,
        };
        let (Ok(slot), Ok(bytes)) = (
            slots.clone().acquire_owned().await,
            budget.clone().acquire_many_owned(cost).await,
        ) else {
            break Ok(()); // Semaphores are never closed; unreachable in practice.
        };

        let payload = if req.kind == CMD_WRITE && req.len <= config.request_bytes_max {
            match read_payload(rd, req.len).await {
                Ok(p) => Some(p),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break Err(protocol(format!(
                        "connection closed inside the payload of a {}-byte write",
                        req.len
                    )))
                }
                Err(e) => break Err(io("reading write payload")(e)),
            }
        } else {
            None
        };

        match validate(&req, payload, &lim) {
            Err(errno) => {
                debug!(export, ?req, ?errno, "request refused");
                let reply = Reply {
                    cookie: req.cookie,
                    error: errno.nbd_code(),
                    data: None,
                    _slot: slot,
                    _bytes: bytes,
                };
                if tx.send(reply).await.is_err() {
                    break Ok(());
                }
            }
            Ok(op) => {
                let backend = session.backend.clone();
                let tx = tx.clone();
                let export = export.clone();
                tasks.spawn(async move {
                    let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                    let (error, data) = match execute(&*backend, op, &export).await {
                        Ok(data) => (0, data),
                        Err(e) => {
                            let errno = wire_errno(e.errno(), fast);
                            warn!(
                                export,
                                cookie = req.cookie,
                                kind = req.kind,
                                offset = req.offset,
                                len = req.len,
                                ?errno,
                                "request failed: {e}"
                            );
                            (errno.nbd_code(), None)
                        }
                    };
                    let reply = Reply {
                        cookie: req.cookie,
                        error,
                        data,
                        _slot: slot,
                        _bytes: bytes,
                    };
                    // A send error means the writer already failed and the connection is ending.
                    let _ = tx.send(reply).await;
                });
            }
        }
    };

    // Every request read gets served and answered (the spec asks this for DISC and shutdown).
    while let Some(done) = tasks.join_next().await {
        report_panic(done, &export);
    }
    drop(tx);
    let written = match writer.await {
        Ok(r) => r.map_err(io("writing replies")),
        Err(e) => Err(protocol(format!("reply writer task failed: {e}"))),
    };
    ended.and(written)
}

/// Reads exactly `len` payload bytes without zero-filling the buffer first.
async fn read_payload<Rd: AsyncRead + Unpin>(rd: &mut Rd, len: u32) -> std::io::Result<Bytes> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = rd.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

async fn execute<B: BlockBackend>(
    backend: &B,
    op: Op,
    export: &str,
) -> Result<Option<Bytes>, Error> {
    match op {
        Op::Read { offset, len } => {
            if len == 0 {
                return Ok(Some(Bytes::new()));
            }
            let data = backend.read(offset, len).await?;
            if data.len() != len as usize {
                // A short buffer would desynchronise the client's stream; never send it.
                return Err(Error::Backend {
                    export: export.to_owned(),
                    op: "read",
                    offset,
                    errno: Errno::Io,
                    detail: format!(
                        "backend returned {} bytes for a {len}-byte read",
                        data.len()
                    ),
                });
            }
            Ok(Some(data))
        }
        Op::Write { offset, data, fua } => backend.write(offset, data, fua).await.map(|_| None),
        Op::Flush => backend.flush().await.map(|_| None),
        Op::Trim { offset, len, fua } => backend.trim(offset, len, fua).await.map(|_| None),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => backend
            .write_zeroes(offset, len, fua, may_trim)
            .await
            .map(|_| None),
        Op::Nothing => Ok(None),
    }
}

/// The spec reserves `ENOTSUP` for fast-zero refusals and `EOVERFLOW` for structured reads;
/// anywhere else clients would misread them, so they become `EINVAL`.
fn wire_errno(errno: Errno, fast_zero_request: bool) -> Errno {
    match errno {
        Errno::NotSup if fast_zero_request => Errno::NotSup,
        Errno::NotSup | Errno::Overflow => Errno::Inval,
        other => other,
    }
}

fn report_panic(done: Result<(), tokio::task::JoinError>, export: &str) {
    if let Err(e) = done {
        if e.is_panic() {
            error!(export, "NBD request task panicked: {e}");
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    while let Some(reply) = rx.recv().await {
        write_reply(&mut wr, reply).await?;
        // Batch whatever else is ready into the same flush: one syscall for many small replies.
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut wr, reply).await?;
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    reply: Reply,
) -> std::io::Result<()> {
    wr.write_all(&simple_reply_header(reply.error, reply.cookie))
        .await?;
    if reply.error == 0 {
        if let Some(data) = &reply.data {
            wr.write_all(data).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
        fast_zero_trim: true,
        fast_zero_no_hole: false,
        request_bytes_max: 64 << 10,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    fn check(r: RequestHeader) -> Result<Op, Errno> {
        validate(&r, None, &LIM)
    }

    #[test]
    fn bounds_follow_the_spec() {
        let size = LIM.size;
        assert_eq!(
            check(req(CMD_READ, 0, size - 4096, 4096)),
            Ok(Op::Read {
                offset: size - 4096,
                len: 4096
            })
        );
        assert_eq!(
            check(req(CMD_READ, 0, size - 4095, 4096)),
            Err(Errno::Inval)
        );
        assert_eq!(check(req(CMD_READ, 0, u64::MAX, 1)), Err(Errno::Inval));
        assert_eq!(check(req(CMD_WRITE, 0, size, 1)), Err(Errno::NoSpc));
        assert_eq!(check(req(CMD_WRITE, 0, u64::MAX, 1)), Err(Errno::Inval));
        assert_eq!(check(req(CMD_TRIM, 0, size, 1)), Err(Errno::Inval));
        assert_eq!(check(req(CMD_WRITE_ZEROES, 0, size, 1)), Err(Errno::NoSpc));
        // A zero-length request at the very end is valid and does nothing.
        assert_eq!(check(req(CMD_TRIM, 0, size, 0)), Ok(Op::Nothing));
        assert_eq!(
            check(req(CMD_READ, 0, size, 0)),
            Ok(Op::Read {
                offset: size,
                len: 0
            })
        );
    }

    #[test]
    fn sizes_follow_the_block_size_limits() {
        let max = LIM.request_bytes_max;
        assert_eq!(check(req(CMD_READ, 0, 0, max + 1)), Err(Errno::Inval));
        // Trim and write-zeroes carry no payload and are not limited by the maximum block size.
        assert!(matches!(
            check(req(CMD_TRIM, 0, 0, max + 1)),
            Ok(Op::Trim { .. })
        ));
        assert!(matches!(
            check(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, max + 1)),
            Ok(Op::WriteZeroes { may_trim: true, .. })
        ));
        assert!(matches!(
            check(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, max + 1)),
            Ok(Op::WriteZeroes {
                may_trim: false,
                ..
            })
        ));
    }

    #[test]
    fn flags_are_checked_per_command() {
        assert_eq!(
            check(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(check(req(CMD_WRITE, 1 << 15, 0, 1)), Err(Errno::Inval));
        assert_eq!(check(req(CMD_FLUSH, 0, 0, 1)), Err(Errno::Inval));
        assert_eq!(check(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)), Ok(Op::Flush));
        assert_eq!(check(req(5, 0, 0, 1)), Err(Errno::Inval));
        assert_eq!(check(req(99, 0, 0, 1)), Err(Errno::Inval));
        assert_eq!(
            check(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 8)),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 8,
                fua: true,
                may_trim: false
            })
        );
        // This backend zeroes fast only by punching holes.
        assert_eq!(
            check(req(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                8
            )),
            Err(Errno::NotSup)
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let lim = ExportLimits {
            read_only: true,
            ..LIM
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate(&req(kind, 0, 0, 1), None, &lim), Err(Errno::Perm));
        }
        assert!(validate(&req(CMD_READ, 0, 0, 1), None, &lim).is_ok());
        assert!(validate(&req(CMD_FLUSH, 0, 0, 0), None, &lim).is_ok());
    }

    #[test]
    fn reserved_errnos_are_not_leaked() {
        assert_eq!(wire_errno(Errno::NotSup, false), Errno::Inval);
        assert_eq!(wire_errno(Errno::NotSup, true), Errno::NotSup);
        assert_eq!(wire_errno(Errno::Overflow, false), Errno::Inval);
        assert_eq!(wire_errno(Errno::NoSpc, false), Errno::NoSpc);
    }
}
