//! The producer side of the WAL: a lock-free request queue bounded in bytes,
//! and completions that resolve when an operation is durable.
//!
//! Producers (any thread, async or blocking) reserve bytes on an atomic
//! counter, push onto a `SegQueue` and wake the writer; they never take a
//! lock on the fast path. The bytes are released when the batch holding the
//! operation has been written and synced, so the counter bounds everything
//! between a producer and the disk: queue, batch being filled, batches in
//! flight. When it is full, producers wait (async: `Notify`; blocking: a
//! condvar taken only on this slow path); the writer's release of a batch's
//! bytes touches either only while some producer waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_queue::SegQueue;
use tokio::sync::{oneshot, Notify};

use crate::core::types::{Entry, GroupId, HardState, Index, Term};
use crate::error::Error;

/// An operation submitted through a [`WalHandle`]; same meaning as the
/// `LogStore` method of the same name.
#[derive(Clone, Debug)]
pub enum WalOp {
    Append {
        group: GroupId,
        entries: Vec<Entry>,
    },
    SetHardState {
        group: GroupId,
        hs: HardState,
    },
    Compact {
        group: GroupId,
        index: Index,
        term: Term,
    },
    RemoveGroup {
        group: GroupId,
    },
}

impl WalOp {
    pub fn group(&self) -> GroupId {
        match self {
            WalOp::Append { group, .. }
            | WalOp::SetHardState { group, .. }
            | WalOp::Compact { group, .. }
            | WalOp::RemoveGroup { group } => *group,
        }
    }

    /// Bytes the op counts for against `append_buffer_bytes_max`.
    pub fn size_bytes(&self) -> usize {
        64 + match self {
            WalOp::Append { entries, .. } => entries.iter().map(Entry::size_bytes).sum(),
            _ => 0,
        }
    }
}

pub(crate) type Reply = oneshot::Sender<Result<(), Error>>;

pub(crate) struct Request {
    pub op: WalOp,
    pub reply: Reply,
    pub bytes: usize,
}

pub(crate) struct Shared {
    pub queue: SegQueue<Request>,
    queued_bytes: AtomicUsize,
    bytes_max: usize,
    /// Wakes the writer: a request was queued or shutdown was asked.
    pub wake_writer: Notify,
    space: Notify,
    space_lock: Mutex<()>,
    space_cv: Condvar,
    /// Producers between announcing that they may wait for space and giving up waiting:
    /// `release` touches `space` and `space_cv` (each behind a lock) only when this is not 0,
    /// so the writer takes no lock per batch while nobody waits.
    space_waiters: AtomicUsize,
    pub failed: OnceLock<String>,
    /// The `Wal` was dropped: nobody will drain the queue any more.
    pub closed: AtomicBool,
    pub shutdown: AtomicBool,
}

impl Shared {
    pub fn new(bytes_max: usize) -> Shared {
        Shared {
            queue: SegQueue::new(),
            queued_bytes: AtomicUsize::new(0),
            bytes_max,
            wake_writer: Notify::new(),
            space: Notify::new(),
            space_lock: Mutex::new(()),
            space_cv: Condvar::new(),
            space_waiters: AtomicUsize::new(0),
            failed: OnceLock::new(),
            closed: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Reserves `n` bytes; an op larger than the whole budget is admitted
    /// alone, when nothing else is buffered, so it cannot wait forever.
    fn try_reserve(&self, n: usize) -> bool {
        let mut cur = self.queued_bytes.load(Ordering::SeqCst);
        loop {
            if cur != 0 && cur + n > self.bytes_max {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        // SeqCst with the waiters' increment-then-recheck: either this load sees a waiter, or
        // that waiter's re-check (after its increment) sees the bytes given back here.
        let prev = self.queued_bytes.fetch_sub(n, Ordering::SeqCst);
        assert!(prev >= n, "append buffer accounting underflow");
        if self.space_waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.space.notify_waiters();
        let _g = self.space_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.space_cv.notify_all();
    }

    /// Counts a producer as waiting for space until the guard drops.
    fn waiting(&self) -> WaiterGuard<'_> {
        self.space_waiters.fetch_add(1, Ordering::SeqCst);
        WaiterGuard(&self.space_waiters)
    }

    fn refuse(&self) -> Option<Error> {
        if let Some(reason) = self.failed.get() {
            return Some(Error::LogFailed {
                reason: reason.clone(),
            });
        }
        None
    }

    /// Fails every queued request (after a fatal error or once closed).
    pub fn fail_queued(&self, mk: impl Fn(GroupId) -> Error) {
        while let Some(r) = self.queue.pop() {
            let _ = r.reply.send(Err(mk(r.op.group())));
            self.release(r.bytes);
        }
    }

    fn push(self: &Arc<Self>, op: WalOp, bytes: usize) -> Durable {
        let group = op.group();
        let (reply, rx) = oneshot::channel();
        self.queue.push(Request { op, reply, bytes });
        if self.closed.load(Ordering::Acquire) {
            // The writer is gone and will never drain this: fail it here.
            self.fail_queued(|group| Error::WalClosed { group });
        }
        self.wake_writer.notify_one();
        Durable { rx, group }
    }
}

/// Decrements the waiter count when a producer stops waiting (space found, or an error).
struct WaiterGuard<'a>(&'a AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A cloneable, `Send + Sync` handle producers use to submit operations.
#[derive(Clone)]
pub struct WalHandle {
    pub(crate) shared: Arc<Shared>,
}

impl WalHandle {
    /// Queues `op`, waiting (asynchronously) while the append buffer is
    /// full. The returned [`Durable`] resolves when `op` is durable.
    pub async fn submit(&self, op: WalOp) -> Result<Durable, Error> {
        let n = op.size_bytes();
        if self.shared.refuse().is_none() && self.shared.try_reserve(n) {
            return Ok(self.shared.push(op, n));
        }
        let _waiting = self.shared.waiting();
        loop {
            if let Some(e) = self.shared.refuse() {
                return Err(e);
            }
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            // Registered before the re-check so a release in between wakes us.
            notified.as_mut().enable();
            if self.shared.try_reserve(n) {
                break;
            }
            notified.await;
        }
        Ok(self.shared.push(op, n))
    }

    /// Like [`WalHandle::submit`] for threads without a runtime: blocks while
    /// the buffer is full. Never call it on the writer's own thread.
    pub fn submit_blocking(&self, op: WalOp) -> Result<Durable, Error> {
        let n = op.size_bytes();
        if self.shared.refuse().is_none() && self.shared.try_reserve(n) {
            return Ok(self.shared.push(op, n));
        }
        let _waiting = self.shared.waiting();
        loop {
            if let Some(e) = self.shared.refuse() {
                return Err(e);
            }
            if self.shared.try_reserve(n) {
                break;
            }
            let g = self
                .shared
                .space_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if self.shared.try_reserve(n) {
                break;
            }
            // The timeout only guards against a writer that died without
            // releasing; normal wake-ups come from `release`.
            let _ = self
                .shared
                .space_cv
                .wait_timeout(g, Duration::from_millis(50));
        }
        Ok(self.shared.push(op, n))
    }

    /// Appends and waits until the entries are durable.
    pub async fn append(&self, group: GroupId, entries: Vec<Entry>) -> Result<(), Error> {
        self.submit(WalOp::Append { group, entries }).await?.await
    }

    pub async fn set_hard_state(&self, group: GroupId, hs: HardState) -> Result<(), Error> {
        self.submit(WalOp::SetHardState { group, hs }).await?.await
    }

    pub async fn compact(&self, group: GroupId, index: Index, term: Term) -> Result<(), Error> {
        self.submit(WalOp::Compact { group, index, term })
            .await?
            .await
    }

    pub async fn remove_group(&self, group: GroupId) -> Result<(), Error> {
        self.submit(WalOp::RemoveGroup { group }).await?.await
    }

    /// Asks [`super::run`] to return once everything queued is durable.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake_writer.notify_one();
    }

    /// Bytes currently reserved by queued or not yet durable operations.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.queued_bytes()
    }
}

/// Resolves to `Ok(())` once the operation is durable (written and
/// fdatasync'ed; only written when `raft_sync` is off), or to its error.
pub struct Durable {
    rx: oneshot::Receiver<Result<(), Error>>,
    group: GroupId,
}

impl Durable {
    /// Blocks until durable; for threads without a runtime.
    pub fn wait(self) -> Result<(), Error> {
        let group = self.group;
        self.rx
            .blocking_recv()
            .unwrap_or(Err(Error::WalClosed { group }))
    }
}

impl Future for Durable {
    type Output = Result<(), Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let group = self.group;
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::WalClosed { group })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Producers on a runtime and on plain threads against a buffer that holds one op at a
    /// time, drained by a writer thread that releases each op's bytes: every producer gets
    /// through (a lost wake-up would leave an async producer waiting forever, caught by the
    /// timeout), the waiter count goes back to 0 and the bytes to nothing.
    #[test]
    fn waiting_producers_are_always_woken() {
        const OPS: u64 = 2000;
        let shared = Arc::new(Shared::new(100));
        let h = WalHandle {
            shared: shared.clone(),
        };
        let op = |group| WalOp::RemoveGroup { group };
        assert_eq!(op(0).size_bytes(), 64, "one op fills the buffer");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while n < 4 * OPS {
                    match shared.queue.pop() {
                        Some(r) => {
                            let _ = r.reply.send(Ok(()));
                            shared.release(r.bytes);
                            n += 1;
                        }
                        None => std::thread::yield_now(),
                    }
                }
            })
        };
        let mut threads = Vec::new();
        for t in 0..2u64 {
            let h = h.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..OPS {
                    h.submit_blocking(op(t * OPS + i)).unwrap().wait().unwrap();
                }
            }));
        }
        let asyncs = {
            let h = h.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..2u64)
                        .map(|t| {
                            let h = h.clone();
                            tokio::spawn(async move {
                                for i in 0..OPS {
                                    h.submit(op(10 * OPS + t * OPS + i))
                                        .await
                                        .unwrap()
                                        .await
                                        .unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
            })
        };
        std::thread::spawn(move || {
            for t in threads {
                t.join().unwrap();
            }
            asyncs.join().unwrap();
            writer.join().unwrap();
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a producer waiting for space was never woken");
        assert_eq!(shared.space_waiters.load(Ordering::SeqCst), 0);
        assert_eq!(shared.queued_bytes(), 0);
    }
}
