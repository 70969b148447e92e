//! Data-file I/O of one core: the writes, hole punches, zero ranges and reads of every block
//! group's data file, on the core's own io_uring (a second ring, next to the WAL's).
//!
//! # How data flows
//! The core builds an [`IoReq`] per apply or read (`block::DataFile` makes them, `block::Applier`
//! decides when an apply may start), [`DataIo::submit`]s it, and [`DataIo::kick`]s once per loop
//! iteration, so every op of an iteration enters the kernel in one `io_uring_enter`. The ring
//! signals an eventfd on every completion; the core's loop waits on it ([`DataWaiter`]) next to
//! its other inputs and [`DataIo::reap`]s finished requests, which hand their buffers back.
//! Short reads and writes are continued from where they stopped; a request is handed back only
//! when it is complete or failed.
//!
//! # Why a ring of its own
//! The WAL's ring carries linked write+fdatasync chains acknowledged strictly in order; data
//! ops are independent single SQEs of several kinds (write, read, fallocate) completing in any
//! order, and their ordering rules (per group, by byte range) live in `block::Applier`. Sharing
//! one ring would mix two completion protocols for no gain: each ring is one eventfd and one
//! `io_uring_enter` per iteration.
//!
//! # Fallback
//! Where io_uring is refused (old kernels, seccomp), [`DataIoBackend::Auto`] logs it once and
//! performs each request synchronously at `submit` (pwrite/pread/fallocate on the core thread,
//! as before io_uring applies); its completions are reaped the same way.
//!
//! # Limits
//! At most `slots` requests in flight (the ring's size): [`DataIo::has_room`] tells the core when
//! to stop submitting. A buffered write goes to the kernel in pieces of at most
//! [`BUFFERED_WRITE_SQE_BYTES_MAX`], one after the other (the short-write continuation).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};

/// Offset, length and memory alignment of every O_DIRECT request (covers every logical block
/// size up to 4 KiB, so no per-device query is needed).
pub const DIRECT_ALIGN: u64 = raftlog::wal::DIRECT_ALIGN as u64;

/// Bytes of one buffered (page-cache) write, at most. ext4 (large folios, Linux 6.16+) gives a
/// buffered write a page-cache folio as large as the write, up to 2 MiB, and every later 4 KiB
/// overwrite in that folio walks all its buffer heads: measured on this project's test VM
/// (kernel 6.18), a random 4 KiB `pwrite` cost 16-19 us of CPU in a file written with 1 MiB
/// writes, 6.4 us after 256 KiB writes (a full raft entry) and 3.3 us after 32 KiB ones. Block
/// devices see exactly that pattern (sequential fill, then random small overwrites), and a
/// replicated write pays it on every replica. A larger write is split into a chain of writes of
/// this size.
pub const BUFFERED_WRITE_SQE_BYTES_MAX: usize = 32 << 10;

/// Which backend performs data-file I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataIoBackend {
    /// io_uring when the kernel (and seccomp) allow it, else `Sync` with a log line.
    Auto,
    /// io_uring or fail at start.
    Uring,
    /// pwrite/pread/fallocate on the core thread at submission.
    Sync,
}

/// `fallocate(2)` on a file (the WAL's, shared with the NBD file backend).
pub use raftlog::wal::fallocate;
/// Zeroed, 4096-aligned heap memory for O_DIRECT requests: the WAL's batch buffer type.
pub use raftlog::wal::AlignedBuf;

/// The memory of a request. Its heap address is stable while the request is in flight (the
/// kernel reads or fills it then).
pub enum IoBuf {
    None,
    /// A write straight from the raft entry's payload (buffered I/O: no copy).
    Shared(Bytes),
    /// A buffered read's destination.
    Vec(Vec<u8>),
    /// O_DIRECT writes and reads.
    Aligned(AlignedBuf),
}

impl IoBuf {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::None => &[],
            IoBuf::Shared(b) => b,
            IoBuf::Vec(v) => v,
            IoBuf::Aligned(a) => a,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Vec(v) => v,
            IoBuf::Aligned(a) => a,
            IoBuf::None | IoBuf::Shared(_) => panic!("read into a read-only buffer"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// `buf` to `offset`.
    Write,
    /// `buf.len()` bytes from `offset` into `buf`.
    Read,
    /// `fallocate(mode, offset, len)`.
    Fallocate { mode: i32, len: u64 },
}

/// One request on a data file.
pub struct IoReq {
    /// The caller's token, handed back in [`IoDone`].
    pub token: u64,
    /// Kept open until the request completes, whatever happens to the group's data file
    /// meanwhile (an installed snapshot replaces it).
    pub file: Arc<File>,
    pub kind: IoKind,
    pub offset: u64,
    pub buf: IoBuf,
}

impl IoReq {
    /// Bytes the next SQE (or syscall) of this request covers, `done` bytes being transferred.
    fn next_len(&self, done: usize) -> usize {
        let rest = self.buf.as_slice().len() - done;
        match (&self.kind, &self.buf) {
            // O_DIRECT writes (`Aligned`) have no page-cache folios to keep small.
            (IoKind::Write, IoBuf::Shared(_)) => rest.min(BUFFERED_WRITE_SQE_BYTES_MAX),
            _ => rest,
        }
    }

    pub fn op_name(&self) -> &'static str {
        match self.kind {
            IoKind::Write => "pwrite",
            IoKind::Read => "pread",
            IoKind::Fallocate { .. } => "fallocate",
        }
    }
}

pub struct IoDone {
    pub req: IoReq,
    pub result: io::Result<()>,
}

struct Slot {
    req: IoReq,
    /// Bytes already transferred (a short read or write continues from here).
    done: usize,
}

struct Ring {
    ring: IoUring,
    efd: OwnedFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
}

enum Backend {
    Uring(Box<Ring>),
    Sync,
}

pub struct DataIo {
    backend: Backend,
    slots_max: usize,
    in_flight: usize,
    /// Finished requests not yet reaped (the synchronous backend finishes them at submit).
    done: VecDeque<IoDone>,
}

impl Ring {
    fn new(slots: usize) -> io::Result<Ring> {
        let (ring, efd) = raftlog::wal::probed_ring(slots.next_power_of_two() as u32)?;
        Ok(Ring {
            ring,
            efd,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// Queues the SQE for the rest of slot `i`'s request.
    fn push(&mut self, i: usize) -> io::Result<()> {
        let slot = self.slots[i].as_mut().expect("pushed slot holds a request");
        let req = &mut slot.req;
        let fd = types::Fd(req.file.as_raw_fd());
        let offset = req.offset + slot.done as u64;
        let n = req.next_len(slot.done);
        let sqe = match req.kind {
            IoKind::Write => {
                let rest = &req.buf.as_slice()[slot.done..slot.done + n];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoKind::Read => {
                let rest = &mut req.buf.as_mut_slice()[slot.done..slot.done + n];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(req.offset)
                .mode(mode)
                .build(),
        }
        .user_data(i as u64);
        // SAFETY: the buffer (and the descriptor, through `req.file`) live in `self.slots[i]`
        // until the completion is reaped; `DataIo`'s drop waits for every request in flight.
        // The ring has one SQE per slot, so the queue cannot be full.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.unsubmitted += 1;
        Ok(())
    }

    fn kick(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EBUSY/EAGAIN: completions must be reaped first; the next kick retries.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves finished requests to `out`; returns how many left the ring.
    fn reap(&mut self, out: &mut VecDeque<IoDone>) -> io::Result<usize> {
        let mut seen = Vec::new();
        for cqe in self.ring.completion() {
            seen.push((cqe.user_data(), cqe.result()));
        }
        let mut finished = 0;
        for (ud, res) in seen {
            let i = ud as usize;
            let Some(slot) = self.slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let total = slot.req.buf.as_slice().len();
            let result = if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if let IoKind::Fallocate { .. } = slot.req.kind {
                Some(Ok(()))
            } else if res == 0 && total > 0 {
                let kind = match slot.req.kind {
                    IoKind::Read => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::WriteZero,
                };
                Some(Err(io::Error::from(kind)))
            } else {
                slot.done += res as usize;
                (slot.done >= total).then_some(Ok(()))
            };
            match result {
                // A short transfer is progress: continue with the rest.
                None => self.push(i)?,
                Some(result) => {
                    let slot = self.slots[i].take().expect("finished slot");
                    self.free.push(i);
                    out.push_back(IoDone {
                        req: slot.req,
                        result,
                    });
                    finished += 1;
                }
            }
        }
        self.kick()?;
        Ok(finished)
    }
}

/// The synchronous backend: the whole request now (also the core's inline applies).
pub(crate) fn perform(req: &mut IoReq) -> io::Result<()> {
    match req.kind {
        IoKind::Write => {
            let mut done = 0;
            while done < req.buf.as_slice().len() {
                let n = req.next_len(done);
                let piece = &req.buf.as_slice()[done..done + n];
                req.file.write_all_at(piece, req.offset + done as u64)?;
                done += n;
            }
            Ok(())
        }
        IoKind::Read => req.file.read_exact_at(req.buf.as_mut_slice(), req.offset),
        IoKind::Fallocate { mode, len } => fallocate(&req.file, mode, req.offset, len),
    }
}

impl DataIo {
    /// A backend keeping up to `slots` requests in flight.
    pub fn open(want: DataIoBackend, slots: usize, core: usize) -> io::Result<DataIo> {
        let slots = slots.max(1);
        let backend = match want {
            DataIoBackend::Sync => Backend::Sync,
            DataIoBackend::Uring => Backend::Uring(Box::new(Ring::new(slots)?)),
            DataIoBackend::Auto => match Ring::new(slots) {
                Ok(r) => Backend::Uring(Box::new(r)),
                Err(e) => {
                    tracing::warn!(
                        core,
                        error = %e,
                        "data files: io_uring is unavailable (kernel or seccomp refused it); \
                         applying and reading with pwrite/pread on the core thread"
                    );
                    Backend::Sync
                }
            },
        };
        Ok(DataIo {
            backend,
            slots_max: slots,
            in_flight: 0,
            done: VecDeque::new(),
        })
    }

    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Uring(_) => "io_uring",
            Backend::Sync => "pwrite/pread on the core thread",
        }
    }

    /// Whether another request may be submitted.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.slots_max
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `req` (the caller checked [`has_room`](Self::has_room)); on io_uring it enters
    /// the kernel at the next [`kick`](Self::kick).
    pub fn submit(&mut self, mut req: IoReq) -> io::Result<()> {
        assert!(self.has_room(), "data I/O submitted beyond its slots");
        self.in_flight += 1;
        match &mut self.backend {
            Backend::Uring(r) => {
                let i = r.free.pop().expect("a free slot below slots_max");
                r.slots[i] = Some(Slot { req, done: 0 });
                r.push(i)
            }
            Backend::Sync => {
                let result = perform(&mut req);
                self.done.push_back(IoDone { req, result });
                Ok(())
            }
        }
    }

    /// Hands every queued request to the kernel.
    pub fn kick(&mut self) -> io::Result<()> {
        match &mut self.backend {
            Backend::Uring(r) => r.kick(),
            Backend::Sync => Ok(()),
        }
    }

    /// Finished requests, in completion order (not submission order); never waits.
    pub fn reap(&mut self) -> io::Result<Vec<IoDone>> {
        if let Backend::Uring(r) = &mut self.backend {
            r.reap(&mut self.done)?;
        }
        self.in_flight -= self.done.len();
        Ok(self.done.drain(..).collect())
    }

    /// Waits (blocking the thread) until at least one request finished, then reaps. For tests
    /// and the final drain; the core's loop waits on [`DataWaiter`] instead.
    pub fn wait_and_reap(&mut self) -> io::Result<Vec<IoDone>> {
        loop {
            let done = self.reap()?;
            if !done.is_empty() || self.in_flight == 0 {
                return Ok(done);
            }
            if let Backend::Uring(r) = &mut self.backend {
                match r.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Something for an async loop to wait on (`None` for the synchronous backend, whose
    /// requests are finished when `submit` returns).
    pub fn waiter(&self) -> io::Result<Option<DataWaiter>> {
        let Backend::Uring(r) = &self.backend else {
            return Ok(None);
        };
        // SAFETY: dup of a descriptor we own; the result is owned by the waiter.
        let fd = unsafe { libc::dup(r.efd.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor from dup.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `owned` is a valid descriptor owned by the AsyncFd for its whole lifetime,
        // and `as_raw_fd` of an OwnedFd never changes.
        let efd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Some(DataWaiter { efd }))
    }
}

impl Drop for DataIo {
    fn drop(&mut self) {
        // The kernel may still be using the buffers of requests in flight.
        while self.in_flight > 0 {
            if self.kick().is_err() || self.wait_and_reap().is_err() {
                // Leak what is left rather than free memory the kernel may still write.
                if let Backend::Uring(r) = &mut self.backend {
                    for s in r.slots.iter_mut() {
                        std::mem::forget(s.take());
                    }
                }
                return;
            }
        }
    }
}

/// Becomes ready after a data-file completion (see the module docs).
pub struct DataWaiter {
    efd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl DataWaiter {
    pub async fn wait(&self) {
        if let Ok(mut guard) = self.efd.readable().await {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64; EAGAIN (not signalled) is fine.
            unsafe {
                libc::read(
                    self.efd.get_ref().as_raw_fd(),
                    &mut v as *mut u64 as *mut libc::c_void,
                    8,
                )
            };
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_all(io: &mut DataIo, reqs: Vec<IoReq>) -> Vec<IoDone> {
        let mut out = Vec::new();
        for r in reqs {
            io.submit(r).unwrap();
        }
        io.kick().unwrap();
        while io.in_flight() > 0 {
            out.extend(io.wait_and_reap().unwrap());
        }
        out.sort_by_key(|d| d.req.token);
        out
    }

    #[test]
    fn both_backends_write_punch_and_read() {
        for backend in [DataIoBackend::Auto, DataIoBackend::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let f = Arc::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(dir.path().join("f"))
                    .unwrap(),
            );
            f.set_len(1 << 20).unwrap();
            let mut io = DataIo::open(backend, 4, 0).unwrap();
            let w = |token, offset, byte| IoReq {
                token,
                file: f.clone(),
                kind: IoKind::Write,
                offset,
                buf: IoBuf::Shared(Bytes::from(vec![byte; 8192])),
            };
            let done = run_all(&mut io, vec![w(1, 0, 0xaa), w(2, 65536, 0xbb)]);
            assert!(done.iter().all(|d| d.result.is_ok()));
            let punch = IoReq {
                token: 3,
                file: f.clone(),
                kind: IoKind::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    len: 4096,
                },
                offset: 4096,
                buf: IoBuf::None,
            };
            assert!(run_all(&mut io, vec![punch])[0].result.is_ok());
            let r = |token, offset, len| IoReq {
                token,
                file: f.clone(),
                kind: IoKind::Read,
                offset,
                buf: IoBuf::Vec(vec![1; len]),
            };
            let done = run_all(&mut io, vec![r(4, 0, 8192), r(5, 65536, 8192)]);
            let a = done[0].req.buf.as_slice();
            assert!(a[..4096].iter().all(|b| *b == 0xaa));
            assert!(a[4096..].iter().all(|b| *b == 0));
            assert!(done[1].req.buf.as_slice().iter().all(|b| *b == 0xbb));
            // Past the end of the file: an error, not a hang or a short success.
            let done = run_all(&mut io, vec![r(6, (1 << 20) - 100, 200)]);
            assert!(done[0].result.is_err());
            assert_eq!(io.in_flight(), 0);
        }
    }

    #[test]
    fn buffered_writes_go_in_bounded_pieces() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let req = |kind, buf| IoReq {
            token: 1,
            file: f.clone(),
            kind,
            offset: 0,
            buf,
        };
        let max = BUFFERED_WRITE_SQE_BYTES_MAX;
        let len = 3 * max + 4096;
        let w = req(IoKind::Write, IoBuf::Shared(Bytes::from(vec![0; len])));
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < len {
            pieces.push(w.next_len(done));
            done += pieces.last().unwrap();
        }
        assert_eq!(pieces, [max, max, max, 4096]);
        // O_DIRECT writes and reads go whole.
        let d = req(IoKind::Write, IoBuf::Aligned(AlignedBuf::zeroed(len)));
        assert_eq!(d.next_len(0), len);
        let r = req(IoKind::Read, IoBuf::Vec(vec![0; len]));
        assert_eq!(r.next_len(4096), len - 4096);

        // The pieces land where they belong, on both backends.
        for backend in [DataIoBackend::Auto, DataIoBackend::Sync] {
            let f = Arc::new(tempfile::tempfile().unwrap());
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut io = DataIo::open(backend, 4, 0).unwrap();
            let write = IoReq {
                token: 1,
                file: f.clone(),
                kind: IoKind::Write,
                offset: 8192,
                buf: IoBuf::Shared(Bytes::from(data.clone())),
            };
            assert!(run_all(&mut io, vec![write])[0].result.is_ok());
            let mut back = vec![0; len];
            f.read_exact_at(&mut back, 8192).unwrap();
            assert!(back == data, "{backend:?}: written bytes differ");
        }
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        let mut b = AlignedBuf::zeroed(8192);
        assert_eq!(b.as_ptr() as u64 % DIRECT_ALIGN, 0);
        assert!(b.iter().all(|x| *x == 0));
        b[5] = 7;
        assert_eq!(b[5], 7);
    }
}
