//! The WAL's disk I/O: up to `slots` batches at once, each written and
//! (optionally) fdatasync'ed as its own chain, on io_uring (one write SQE
//! linked to one fdatasync SQE per batch) or on a pool of helper threads
//! doing pwritev+fdatasync.
//!
//! Chains are independent and may complete in any order: a batch's
//! fdatasync only covers its own write (and whatever else happened to be
//! written before it started). The writer therefore acknowledges batches
//! strictly in order (see `Wal::reap`), and recovery tolerates a hole among
//! the last `slots` batches of the last segment (see `recovery`).
//!
//! Both backends signal completions on an eventfd, so an async host can wait
//! for the disk and for new requests in one `select!`.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use io_uring::{opcode, squeue, types, IoUring};

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring when the kernel (and seccomp) allow it, else the fallback.
    Auto,
    /// io_uring or fail at open.
    Uring,
    /// pwritev + fdatasync on helper threads.
    Fallback,
}

/// One batch: `buf` goes to `file` at `offset`, then fdatasync if `sync`.
pub struct Job {
    /// The caller's token, handed back in [`Done`].
    pub id: u64,
    pub file: Arc<File>,
    pub path: PathBuf,
    pub offset: u64,
    pub buf: Vec<u8>,
    pub sync: bool,
}

/// A finished job; `buf` is handed back so its allocation can be reused.
pub struct Done {
    pub job: Job,
    /// On failure: which operation failed and the error.
    pub result: Result<(), (&'static str, io::Error)>,
}

pub enum Io {
    Uring(Box<UringIo>),
    Fallback(FallbackIo),
}

impl Io {
    /// A backend that keeps up to `slots` jobs in flight.
    pub fn open(want: IoBackend, slots: usize) -> io::Result<Io> {
        match want {
            IoBackend::Fallback => Ok(Io::Fallback(FallbackIo::new(slots)?)),
            IoBackend::Uring => Ok(Io::Uring(Box::new(UringIo::new(slots)?))),
            IoBackend::Auto => match UringIo::new(slots) {
                Ok(u) => Ok(Io::Uring(Box::new(u))),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "wal: io_uring is unavailable (kernel or seccomp refused it); \
                         using the pwritev+fdatasync fallback"
                    );
                    Ok(Io::Fallback(FallbackIo::new(slots)?))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Io::Uring(_) => "io_uring",
            Io::Fallback(_) => "pwritev+fdatasync",
        }
    }

    /// Jobs submitted and not yet handed back by `poll`.
    pub fn in_flight(&self) -> usize {
        match self {
            Io::Uring(u) => u.in_flight(),
            Io::Fallback(f) => f.in_flight,
        }
    }

    pub fn busy(&self) -> bool {
        self.in_flight() > 0
    }

    /// Starts `job`; the caller guarantees a free slot.
    pub fn submit(&mut self, job: Job) -> io::Result<()> {
        match self {
            Io::Uring(u) => u.submit(job),
            Io::Fallback(f) => f.submit(job),
        }
    }

    /// A finished job, if any (in completion order, not submission order);
    /// with `block`, waits for one if any is in flight.
    pub fn poll(&mut self, block: bool) -> io::Result<Option<Done>> {
        match self {
            Io::Uring(u) => u.poll(block),
            Io::Fallback(f) => Ok(f.poll(block)),
        }
    }

    /// Becomes readable after a completion (read it to reset).
    pub fn event_fd(&self) -> RawFd {
        match self {
            Io::Uring(u) => u.efd.as_raw_fd(),
            Io::Fallback(f) => f.efd.as_raw_fd(),
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd. A full counter
    // (EAGAIN) already means "readable", so the result does not matter.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Resets an eventfd after it became readable.
pub fn drain_event_fd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (not signalled) is fine.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// user_data = slot << 1 | (1 for the fdatasync, 0 for the write).
const UD_FSYNC_BIT: u64 = 1;

/// One chain in flight on the ring.
struct Slot {
    job: Job,
    /// Bytes of the job's buffer known written.
    written: usize,
    /// Completions still expected for the current chain.
    expect: usize,
    /// Whether the chain's write came back short (the linked fsync is then
    /// cancelled and the rest must be written again).
    short: bool,
    error: Option<(&'static str, io::Error)>,
}

pub struct UringIo {
    ring: IoUring,
    efd: OwnedFd,
    slots: Vec<Option<Slot>>,
    /// Finished chains not yet handed out by `poll`.
    done: VecDeque<Done>,
}

impl UringIo {
    fn new(slots: usize) -> io::Result<UringIo> {
        let entries = (2 * slots.max(1)).next_power_of_two().max(8) as u32;
        let ring = IoUring::new(entries)?;
        // Probe with a NOP: some sandboxes let io_uring_setup succeed but
        // refuse io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission_shared().push(&nop) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        // SAFETY: single-threaded use of the completion queue.
        for cqe in unsafe { ring.completion_shared() } {
            if cqe.result() < 0 {
                return Err(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
        let efd = eventfd()?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(UringIo {
            ring,
            efd,
            slots: (0..slots.max(1)).map(|_| None).collect(),
            done: VecDeque::new(),
        })
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count() + self.done.len()
    }

    fn submit(&mut self, job: Job) -> io::Result<()> {
        let i = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| io::Error::other("no free I/O slot"))?;
        self.slots[i] = Some(Slot {
            job,
            written: 0,
            expect: 0,
            short: false,
            error: None,
        });
        self.push_chain(i)
    }

    /// Queues write(rest of slot `i`'s buffer) linked to fdatasync.
    fn push_chain(&mut self, i: usize) -> io::Result<()> {
        let slot = self.slots[i].as_mut().expect("chain needs a job");
        let job = &slot.job;
        let fd = types::Fd(job.file.as_raw_fd());
        let rest = &job.buf[slot.written..];
        let ud = (i as u64) << 1;
        let mut write = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
            .offset(job.offset + slot.written as u64)
            .build()
            .user_data(ud);
        let mut sqes = Vec::with_capacity(2);
        if job.sync {
            write = write.flags(squeue::Flags::IO_LINK);
            sqes.push(write);
            sqes.push(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(ud | UD_FSYNC_BIT),
            );
        } else {
            sqes.push(write);
        }
        slot.expect = sqes.len();
        slot.short = false;
        // SAFETY: the buffer lives in `self.slots[i]` until both completions
        // have been reaped (`poll` only hands the job back after that, and
        // `Drop` of the WAL waits until nothing is in flight). The ring has
        // two SQEs per slot, so the queue cannot be full.
        unsafe {
            self.ring
                .submission()
                .push_multiple(&sqes)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.ring.submit()?;
        Ok(())
    }

    fn poll(&mut self, block: bool) -> io::Result<Option<Done>> {
        loop {
            if let Some(d) = self.done.pop_front() {
                return Ok(Some(d));
            }
            if self.slots.iter().all(Option::is_none) {
                return Ok(None);
            }
            if block && self.ring.completion().is_empty() {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            let mut seen = Vec::new();
            for cqe in self.ring.completion() {
                seen.push((cqe.user_data(), cqe.result()));
            }
            let mut finished = Vec::new();
            for (ud, res) in seen {
                let i = (ud >> 1) as usize;
                let Some(slot) = self.slots.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                slot.expect -= 1;
                let len = slot.job.buf.len();
                if ud & UD_FSYNC_BIT == 0 {
                    if res < 0 {
                        slot.error
                            .get_or_insert(("write", io::Error::from_raw_os_error(-res)));
                    } else {
                        slot.written += res as usize;
                        if slot.written < len {
                            if res == 0 {
                                slot.error.get_or_insert((
                                    "write",
                                    io::Error::from(io::ErrorKind::WriteZero),
                                ));
                            }
                            slot.short = true;
                        }
                    }
                } else if res == -libc::ECANCELED && (slot.short || slot.error.is_some()) {
                } else if res < 0 {
                    slot.error
                        .get_or_insert(("fdatasync", io::Error::from_raw_os_error(-res)));
                }
                if slot.expect == 0 {
                    finished.push(i);
                }
            }
            for i in finished {
                let slot = self.slots[i].as_ref().expect("finished slot");
                if slot.error.is_none() && slot.short {
                    // A short write is progress, not a failure: write the rest.
                    self.push_chain(i)?;
                } else {
                    let slot = self.slots[i].take().expect("finished slot");
                    let result = match slot.error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                    self.done.push_back(Done {
                        job: slot.job,
                        result,
                    });
                }
            }
            if self.done.is_empty() && !block {
                return Ok(None);
            }
        }
    }
}

pub struct FallbackIo {
    tx: Option<mpsc::Sender<Job>>,
    rx: mpsc::Receiver<Done>,
    efd: Arc<OwnedFd>,
    in_flight: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FallbackIo {
    /// `slots` threads, each doing one pwritev+fdatasync at a time: threads
    /// of their own so that the core's runtime keeps running (and filling
    /// the next batch) while fdatasync blocks.
    fn new(slots: usize) -> io::Result<FallbackIo> {
        let (tx, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let (done_tx, rx) = mpsc::channel::<Done>();
        let efd = Arc::new(eventfd()?);
        let mut threads = Vec::new();
        for n in 0..slots.max(1) {
            let (jobs, done_tx, efd2) = (jobs.clone(), done_tx.clone(), efd.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wal-fallback-io-{n}"))
                    .spawn(move || loop {
                        let job = {
                            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
                            match rx.recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            }
                        };
                        let result = write_and_sync(&job);
                        if done_tx.send(Done { job, result }).is_err() {
                            return;
                        }
                        signal(efd2.as_raw_fd());
                    })?,
            );
        }
        Ok(FallbackIo {
            tx: Some(tx),
            rx,
            efd,
            in_flight: 0,
            threads,
        })
    }

    fn submit(&mut self, job: Job) -> io::Result<()> {
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send(job)
            .map_err(|_| io::Error::other("wal fallback I/O threads exited"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn poll(&mut self, block: bool) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let r = if block {
            self.rx.recv().ok()
        } else {
            self.rx.try_recv().ok()
        };
        if r.is_some() {
            self.in_flight -= 1;
        }
        r
    }
}

impl Drop for FallbackIo {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn write_and_sync(job: &Job) -> Result<(), (&'static str, io::Error)> {
    let fd = job.file.as_raw_fd();
    let mut done = 0usize;
    while done < job.buf.len() {
        let iov = libc::iovec {
            iov_base: job.buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: job.buf.len() - done,
        };
        // SAFETY: the iovec points into `job.buf`, alive for the call.
        let n = unsafe { libc::pwritev(fd, &iov, 1, (job.offset + done as u64) as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(("pwritev", e));
        }
        if n == 0 {
            return Err(("pwritev", io::Error::from(io::ErrorKind::WriteZero)));
        }
        done += n as usize;
    }
    if job.sync {
        // SAFETY: plain syscall on a descriptor `job.file` keeps open.
        // Never retried on failure: after EIO the kernel may have dropped
        // the dirty pages, so a second fdatasync could "succeed" falsely.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(("fdatasync", io::Error::last_os_error()));
        }
    }
    Ok(())
}
