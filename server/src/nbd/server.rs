//! The listener: accepts NBD connections up to `connections_max`, runs each on its own task,
//! and on shutdown stops accepting and waits (up to `shutdown_grace_ms`) for in-flight requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use super::backend::ExportRegistry;
use super::connection;
use super::proto::{BLOCK_SIZE_PREFERRED, STRING_BYTES_MAX};
use crate::error::Error;

/// Limits and timeouts of the NBD server. Every resource a client can make us hold is bounded
/// here; the worst-case request memory is `connections_max × inflight_bytes_max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdConfig {
    /// Concurrent client connections; further connections are accepted and closed at once.
    pub connections_max: usize,
    /// Requests one connection may have in flight (read, queued or being served); the
    /// connection stops reading the socket at this depth.
    pub inflight_requests_max: usize,
    /// Bytes of write payload plus read data one connection may have in flight.
    pub inflight_bytes_max: usize,
    /// Longest read or write (bytes); advertised as the maximum block size.
    pub request_bytes_max: u32,
    /// Longest option payload accepted during the handshake (bytes); longer closes the connection.
    pub option_bytes_max: u32,
    /// Options one connection may send before entering transmission.
    pub handshake_options_max: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout_ms: u64,
    /// After shutdown is triggered, time in-flight requests get before connections are dropped.
    pub shutdown_grace_ms: u64,
}

/// A write longer than this is a denial-of-service attempt per the protocol (2^25 bytes); shorter
/// writes above `request_bytes_max` are drained and refused so the connection survives.
pub const WRITE_DRAIN_BYTES_MAX: u32 = 1 << 25;

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            connections_max: 256,
            inflight_requests_max: 128,
            inflight_bytes_max: 64 << 20,
            request_bytes_max: 32 << 20,
            option_bytes_max: 16 << 10,
            handshake_options_max: 4096,
            handshake_timeout_ms: 10_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl NbdConfig {
    /// Checks that the limits are usable together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: String| Err(Error::NbdConfig { field, reason });
        if self.connections_max == 0 {
            return bad("connections_max", "must be at least 1".into());
        }
        if self.inflight_requests_max == 0 || self.inflight_requests_max > Semaphore::MAX_PERMITS {
            return bad(
                "inflight_requests_max",
                format!("must be in 1..={}", Semaphore::MAX_PERMITS),
            );
        }
        // The spec requires the maximum block size to be at least the preferred block size.
        if self.request_bytes_max < BLOCK_SIZE_PREFERRED || self.request_bytes_max > 1 << 30 {
            return bad(
                "request_bytes_max",
                format!("must be in {BLOCK_SIZE_PREFERRED}..=1 GiB"),
            );
        }
        if self.inflight_bytes_max < self.request_bytes_max as usize
            || self.inflight_bytes_max > Semaphore::MAX_PERMITS
        {
            return bad(
                "inflight_bytes_max",
                "must be at least request_bytes_max (one request must fit)".into(),
            );
        }
        // An OPT_GO naming the longest legal export name must fit.
        let go_bytes_min = 4 + STRING_BYTES_MAX as u32 + 2 + 2 * 16;
        if self.option_bytes_max < go_bytes_min {
            return bad(
                "option_bytes_max",
                format!("must be at least {go_bytes_min}"),
            );
        }
        if self.handshake_options_max == 0 {
            return bad("handshake_options_max", "must be at least 1".into());
        }
        if self.handshake_timeout_ms == 0 {
            return bad("handshake_timeout_ms", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Triggers a graceful shutdown of the servers and connections holding a matching
/// [`ShutdownSignal`]. Dropping the trigger also triggers shutdown, so a server never outlives
/// the owner that could have stopped it.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Observes a [`ShutdownTrigger`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownSignal(watch::Receiver<bool>);

/// Creates a connected trigger/signal pair.
pub fn shutdown_channel() -> (ShutdownTrigger, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), ShutdownSignal(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Resolves once shutdown is triggered (or the trigger is dropped).
    pub async fn triggered(&mut self) {
        // An error means the trigger was dropped, which counts as a trigger.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// An NBD server bound to a TCP address, serving the exports of a registry.
pub struct NbdServer<R: ExportRegistry> {
    listener: TcpListener,
    local_addr: SocketAddr,
    registry: Arc<R>,
    config: Arc<NbdConfig>,
}

impl<R: ExportRegistry> NbdServer<R> {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<R>,
        config: NbdConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::NbdBind { addr, source })?;
        Self::from_listener(listener, registry, config)
    }

    /// Serves on an already bound listener.
    pub fn from_listener(
        listener: TcpListener,
        registry: Arc<R>,
        config: NbdConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let local_addr = listener.local_addr().map_err(|source| Error::NbdBind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        Ok(Self {
            listener,
            local_addr,
            registry,
            config: Arc::new(config),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts and serves connections until `shutdown` triggers, then stops accepting, lets
    /// in-flight requests finish (bounded by `shutdown_grace_ms`) and returns.
    pub async fn run(self, mut shutdown: ShutdownSignal) {
        let NbdServer {
            listener,
            local_addr,
            registry,
            config,
        } = self;
        info!(%local_addr, "NBD server listening");
        let slots = Arc::new(Semaphore::new(config.connections_max));
        let next_id = AtomicU64::new(1);
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.triggered() => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            error!(%local_addr, "NBD connection task panicked: {e}");
                        }
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            warn!(%peer, limit = config.connections_max,
                                "NBD connections_max reached; closing new connection");
                            drop(stream);
                            continue;
                        };
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::info_span!("nbd", conn = id, %peer);
                        let fut = connection::serve(
                            stream, peer, registry.clone(), config.clone(), shutdown.clone());
                        conns.spawn(async move {
                            fut.await;
                            drop(slot);
                        }.instrument(span));
                    }
                    Err(e) => {
                        // Typically EMFILE/ENFILE: back off instead of spinning on the error.
                        warn!(%local_addr, "NBD accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        let open = conns.len();
        if open > 0 {
            info!(%local_addr, open, "NBD server shutting down; draining connections");
        }
        let grace = tokio::time::sleep(Duration::from_millis(config.shutdown_grace_ms));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = conns.join_next() => if done.is_none() { break },
                _ = &mut grace => {
                    warn!(%local_addr, remaining = conns.len(),
                        "NBD shutdown grace expired; dropping connections");
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    break;
                }
            }
        }
        debug!(%local_addr, "NBD server stopped");
    }
}

/// A running server on the current tokio runtime: its address and the means to stop it.
pub struct NbdServerHandle {
    local_addr: SocketAddr,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl NbdServerHandle {
    /// Binds `addr` and spawns the server on the current runtime.
    pub async fn start<R: ExportRegistry>(
        addr: SocketAddr,
        registry: Arc<R>,
        config: NbdConfig,
    ) -> Result<Self, Error> {
        let server = NbdServer::bind(addr, registry, config).await?;
        let local_addr = server.local_addr();
        let (trigger, signal) = shutdown_channel();
        let task = tokio::spawn(server.run(signal));
        Ok(Self {
            local_addr,
            trigger,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Triggers a graceful shutdown and waits until the server has stopped.
    pub async fn shutdown(self) {
        self.trigger.trigger();
        if let Err(e) = self.task.await {
            if e.is_panic() {
                error!(addr = %self.local_addr, "NBD server task panicked: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        NbdConfig::default().validate().unwrap();
    }

    #[test]
    fn config_rejects_a_request_larger_than_the_inflight_budget() {
        let config = NbdConfig {
            inflight_bytes_max: 1 << 20,
            request_bytes_max: 2 << 20,
            ..NbdConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("inflight_bytes_max"), "{err}");
    }

    #[test]
    fn dropped_trigger_counts_as_shutdown() {
        let (trigger, signal) = shutdown_channel();
        assert!(!signal.is_triggered());
        drop(trigger);
        assert!(signal.is_triggered());
    }
}
