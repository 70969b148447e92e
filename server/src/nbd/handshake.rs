//! Fixed newstyle negotiation: greeting, client flags, then options until the client picks an
//! export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Supported: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`. Everything else (structured replies,
//! STARTTLS, metadata contexts, extended headers, unknown options) gets `NBD_REP_ERR_UNSUP`,
//! which every client must accept. Errors that leave the byte stream unusable (bad magic, an
//! option longer than `option_bytes_max`, unknown client flags) end this connection only.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::backend::{BlockBackend, ExportRegistry};
use super::proto::*;
use super::server::{NbdConfig, ShutdownSignal};
use crate::error::Error;

/// What the client chose: the export and what it was told about it.
pub(crate) struct Session<B> {
    pub export: String,
    pub backend: Arc<B>,
    /// Size sent to the client; requests are bounds-checked against it.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Transmission flags for a backend: everything we implement, minus write features on a
/// read-only export, plus multi-conn only when the backend's flush is global.
pub(crate) fn transmission_flags<B: BlockBackend>(backend: &B) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
    if backend.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        // FAST_ZERO is advertised even for backends that cannot zero fast: the spec allows
        // answering such requests with a quick ENOTSUP, which is exactly the information the
        // client wants.
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if backend.flush_covers_all_connections() {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    flags
}

struct Negotiator<'a, R, Rd, Wr> {
    rd: &'a mut Rd,
    wr: &'a mut Wr,
    registry: &'a R,
    config: &'a NbdConfig,
    peer: SocketAddr,
    shutdown: &'a ShutdownSignal,
    out: Vec<u8>,
}

/// Runs the handshake. `Ok(None)` means the client left politely (`NBD_OPT_ABORT`, or closed
/// the socket between options).
pub(crate) async fn negotiate<R, Rd, Wr>(
    rd: &mut Rd,
    wr: &mut Wr,
    registry: &R,
    config: &NbdConfig,
    peer: SocketAddr,
    shutdown: &ShutdownSignal,
) -> Result<Option<Session<R::Backend>>, Error>
where
    R: ExportRegistry,
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    let mut n = Negotiator {
        rd,
        wr,
        registry,
        config,
        peer,
        shutdown,
        out: Vec::with_capacity(256),
    };
    n.run().await
}

enum Next<B> {
    Continue,
    Abort,
    Go(Session<B>),
}

impl<R, Rd, Wr> Negotiator<'_, R, Rd, Wr>
where
    R: ExportRegistry,
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    fn protocol(&self, reason: String) -> Error {
        Error::NbdProtocol {
            peer: self.peer,
            export: None,
            reason,
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        let peer = self.peer;
        move |source| Error::NbdIo {
            peer,
            export: None,
            op,
            source,
        }
    }

    async fn run(&mut self) -> Result<Option<Session<R::Backend>>, Error> {
        self.out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        self.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.out
            .extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send().await?;

        let client_flags = self
            .rd
            .read_u32()
            .await
            .map_err(self.io("reading client flags"))?;
        if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
            // The spec requires dropping the connection on flags we did not offer.
            return Err(self.protocol(format!("unknown client flags {client_flags:#x}")));
        }
        // Clients without FIXED_NEWSTYLE only ever send EXPORT_NAME, which we handle the same way.
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

        let mut stop = self.shutdown.clone();
        for _ in 0..self.config.handshake_options_max {
            let mut head = [0u8; 16];
            let read = tokio::select! {
                read = self.rd.read_exact(&mut head) => read,
                // A client idle between options would otherwise hold up shutdown until its
                // handshake deadline.
                _ = stop.triggered() => {
                    debug!(peer = %self.peer, "server shutdown during the handshake");
                    return Ok(None);
                }
            };
            match read {
                Ok(_) => {}
                // Closing between options is how some clients (and port probes) leave.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(self.io("reading option header")(e)),
            }
            let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
            if magic != IHAVEOPT {
                return Err(self.protocol(format!("bad option magic {magic:#018x}")));
            }
            if len > self.config.option_bytes_max {
                // Skipping it would mean reading up to 4 GiB for nothing: a hard disconnect is
                // what the spec allows against such denial of service.
                return Err(self.protocol(format!(
                    "option {option} carries {len} bytes, more than option_bytes_max {}",
                    self.config.option_bytes_max
                )));
            }
            let mut data = vec![0u8; len as usize];
            self.rd
                .read_exact(&mut data)
                .await
                .map_err(self.io("reading option data"))?;

            match self.option(option, &data, no_zeroes).await? {
                Next::Continue => self.send().await?,
                Next::Abort => {
                    // The client may already have closed; its ACK is a courtesy.
                    let _ = self.send().await;
                    return Ok(None);
                }
                Next::Go(session) => {
                    self.send().await?;
                    return Ok(Some(session));
                }
            }
        }
        Err(self.protocol(format!(
            "more than handshake_options_max {} options",
            self.config.handshake_options_max
        )))
    }

    async fn send(&mut self) -> Result<(), Error> {
        let out = std::mem::take(&mut self.out);
        self.wr
            .write_all(&out)
            .await
            .map_err(self.io("writing handshake"))?;
        self.wr
            .flush()
            .await
            .map_err(self.io("writing handshake"))?;
        self.out = out;
        self.out.clear();
        Ok(())
    }

    fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        option_reply(&mut self.out, option, reply_type, payload);
    }

    fn error_reply(&mut self, option: u32, reply_type: u32, message: &str) {
        debug!(peer = %self.peer, option, reply_type, "option refused: {message}");
        option_reply(&mut self.out, option, reply_type, message.as_bytes());
    }

    async fn option(
        &mut self,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<Next<R::Backend>, Error> {
        if option == OPT_ABORT {
            self.reply(option, REP_ACK, &[]);
            return Ok(Next::Abort);
        }
        if self.shutdown.is_triggered() {
            if option == OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error: closing is the only refusal.
                return Err(self.protocol("EXPORT_NAME during server shutdown".into()));
            }
            self.error_reply(option, REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(Next::Continue);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, no_zeroes),
            OPT_LIST => {
                if !data.is_empty() {
                    self.error_reply(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(Next::Continue);
                }
                for name in self.registry.names() {
                    let mut payload = Vec::with_capacity(4 + name.len());
                    payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    payload.extend_from_slice(name.as_bytes());
                    self.reply(option, REP_SERVER, &payload);
                }
                self.reply(option, REP_ACK, &[]);
                Ok(Next::Continue)
            }
            OPT_INFO | OPT_GO => Ok(self.info_or_go(option, data)),
            OPT_STRUCTURED_REPLY => {
                self.error_reply(
                    option,
                    REP_ERR_UNSUP,
                    "structured replies are not supported",
                );
                Ok(Next::Continue)
            }
            OPT_STARTTLS => {
                self.error_reply(option, REP_ERR_UNSUP, "TLS is not supported");
                Ok(Next::Continue)
            }
            _ => {
                self.error_reply(option, REP_ERR_UNSUP, "option not supported");
                Ok(Next::Continue)
            }
        }
    }

    fn export_name(&mut self, data: &[u8], no_zeroes: bool) -> Result<Next<R::Backend>, Error> {
        let name = std::str::from_utf8(data)
            .map_err(|_| self.protocol("EXPORT_NAME is not UTF-8".into()))?;
        let Some(backend) = self.registry.lookup(name) else {
            // No error reply exists for EXPORT_NAME; the spec says to terminate the session.
            return Err(self.protocol(format!("EXPORT_NAME for unknown export {name:?}")));
        };
        let session = self.session(name, backend);
        self.out.extend_from_slice(&session.size.to_be_bytes());
        self.out.extend_from_slice(&session.flags.to_be_bytes());
        if !no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Next::Go(session))
    }

    fn session(&self, name: &str, backend: Arc<R::Backend>) -> Session<R::Backend> {
        Session {
            export: name.to_owned(),
            size: backend.size(),
            flags: transmission_flags(&*backend),
            backend,
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Next<R::Backend> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.error_reply(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO payload");
            return Next::Continue;
        };
        if name.len() > STRING_BYTES_MAX {
            self.error_reply(
                option,
                REP_ERR_TOO_BIG,
                "export name longer than 4096 bytes",
            );
            return Next::Continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            self.error_reply(option, REP_ERR_INVALID, "export name is not UTF-8");
            return Next::Continue;
        };
        let Some(backend) = self.registry.lookup(name) else {
            let message = format!("unknown export {name:?}");
            self.error_reply(option, REP_ERR_UNKNOWN, &message);
            return Next::Continue;
        };
        let session = self.session(name, backend);

        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&session.size.to_be_bytes());
        info.extend_from_slice(&session.flags.to_be_bytes());
        self.reply(option, REP_INFO, &info);

        let mut sent_block_size = false;
        let mut sent_name = false;
        for request in requests {
            match request {
                INFO_BLOCK_SIZE if !sent_block_size => {
                    sent_block_size = true;
                    info.clear();
                    info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    info.extend_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
                    info.extend_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
                    info.extend_from_slice(&self.config.request_bytes_max.to_be_bytes());
                    self.reply(option, REP_INFO, &info);
                }
                INFO_NAME if !sent_name => {
                    sent_name = true;
                    info.clear();
                    info.extend_from_slice(&INFO_NAME.to_be_bytes());
                    info.extend_from_slice(session.export.as_bytes());
                    self.reply(option, REP_INFO, &info);
                }
                // Unknown or repeated requests are ignored, as the spec requires.
                _ => {}
            }
        }
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            Next::Go(session)
        } else {
            Next::Continue
        }
    }
}

/// Splits an `NBD_OPT_INFO`/`NBD_OPT_GO` payload into the export name and the information
/// requests; `None` if the lengths are inconsistent.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], impl Iterator<Item = u16> + '_)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let list = data.get(name_end + 2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_info_requests() {
        let data = go_payload(b"bg0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let (name, reqs) = parse_info_request(&data).unwrap();
        assert_eq!(name, b"bg0");
        assert_eq!(reqs.collect::<Vec<_>>(), vec![INFO_BLOCK_SIZE, INFO_NAME]);
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let mut data = go_payload(b"bg0", &[INFO_BLOCK_SIZE]);
        data.push(0);
        assert!(parse_info_request(&data).is_none());
        let data = go_payload(b"bg0", &[INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&data[..data.len() - 1]).is_none());
        // Name length pointing past the end, including a length that would overflow.
        let mut data = go_payload(b"bg0", &[]);
        data[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&data).is_none());
        assert!(parse_info_request(&[0, 0]).is_none());
    }
}
