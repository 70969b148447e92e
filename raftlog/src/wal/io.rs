//! The WAL's disk I/O: up to `slots` batches at once, each written and
//! made durable as its own chain, on io_uring or on a pool of helper
//! threads. Durability is either an `RWF_DSYNC` flag on an `O_DIRECT` write
//! (one SQE / one `pwritev2`: on a block already written before, the
//! filesystem only has to flush the disk cache or send the write with FUA,
//! no journal commit) or, for buffered writes, one write SQE linked
//! (`IOSQE_IO_LINK`) to one fdatasync SQE (`pwritev` + `fdatasync`).
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

use crate::core::{RandomSource, SplitMix64};
use crate::wal::buf::AlignedBuf;

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring when the kernel (and seccomp) allow it, else the fallback.
    Auto,
    /// io_uring or fail at open.
    Uring,
    /// pwritev2 (+ fdatasync for buffered writes) on helper threads.
    Fallback,
}

/// How a job's write is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Not at all (`raft_sync = false`, benchmarks only).
    None,
    /// fdatasync after the write.
    Fdatasync,
    /// `RWF_DSYNC` on the write itself (used with `O_DIRECT` files).
    Dsync,
}

impl SyncMode {
    /// The `RWF_*` flags of the write itself.
    fn rw_flags(self) -> libc::c_int {
        match self {
            SyncMode::Dsync => libc::RWF_DSYNC,
            SyncMode::None | SyncMode::Fdatasync => 0,
        }
    }
}

/// One batch: `buf` goes to `file` at `offset`, durably as `sync` says.
pub struct Job {
    /// The caller's token, handed back in [`Done`].
    pub id: u64,
    pub file: Arc<File>,
    pub path: PathBuf,
    pub offset: u64,
    pub buf: AlignedBuf,
    pub sync: SyncMode,
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
    Sim(SimIo),
}

impl Io {
    /// A backend that keeps up to `slots` jobs in flight (the simulated
    /// disk of `sim` instead, in tests).
    pub fn open(want: IoBackend, slots: usize, sim: Option<PowerLossSim>) -> io::Result<Io> {
        if let Some(sim) = sim {
            return Ok(Io::Sim(SimIo::new(sim)?));
        }
        match want {
            IoBackend::Fallback => Ok(Io::Fallback(FallbackIo::new(slots)?)),
            IoBackend::Uring => Ok(Io::Uring(Box::new(UringIo::new(slots)?))),
            IoBackend::Auto => match UringIo::new(slots) {
                Ok(u) => Ok(Io::Uring(Box::new(u))),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "wal: io_uring is unavailable (kernel or seccomp refused it); \
                         using the fallback I/O threads"
                    );
                    Ok(Io::Fallback(FallbackIo::new(slots)?))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Io::Uring(_) => "io_uring",
            Io::Fallback(_) => "fallback threads",
            Io::Sim(_) => "power-loss simulation",
        }
    }

    /// Jobs submitted and not yet handed back by `poll`.
    pub fn in_flight(&self) -> usize {
        match self {
            Io::Uring(u) => u.in_flight(),
            Io::Fallback(f) => f.in_flight,
            Io::Sim(s) => s.pending.len() + s.done.len(),
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
            Io::Sim(s) => {
                s.pending.push(job);
                signal(s.efd.as_raw_fd());
                Ok(())
            }
        }
    }

    /// A finished job, if any (in completion order, not submission order);
    /// with `block`, waits for one if any is in flight.
    pub fn poll(&mut self, block: bool) -> io::Result<Option<Done>> {
        match self {
            Io::Uring(u) => u.poll(block),
            Io::Fallback(f) => Ok(f.poll(block)),
            Io::Sim(s) => s.poll(block),
        }
    }

    /// Becomes readable after a completion (read it to reset).
    pub fn event_fd(&self) -> RawFd {
        match self {
            Io::Uring(u) => u.efd.as_raw_fd(),
            Io::Fallback(f) => f.efd.as_raw_fd(),
            Io::Sim(s) => s.efd.as_raw_fd(),
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

/// A ring of `entries` slots that has been seen to work, and an eventfd registered with it (the
/// kernel signals it on every completion, so an async runtime can wait for completions without a
/// thread). Some sandboxes let io_uring_setup succeed but refuse io_uring_enter, so the ring is
/// probed with a NOP first; any error means "use a fallback". Shared with the engine's data-file
/// ring.
pub fn probed_ring(entries: u32) -> io::Result<(IoUring, OwnedFd)> {
    let ring = IoUring::new(entries)?;
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
    Ok((ring, efd))
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
        let (ring, efd) = probed_ring(entries)?;
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
            .rw_flags(job.sync.rw_flags())
            .build()
            .user_data(ud);
        let mut sqes = Vec::with_capacity(2);
        if job.sync == SyncMode::Fdatasync {
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
    /// `slots` threads, each doing one write (+ fdatasync) at a time: threads
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
    let flags = job.sync.rw_flags();
    let mut done = 0usize;
    while done < job.buf.len() {
        let iov = libc::iovec {
            iov_base: job.buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: job.buf.len() - done,
        };
        let at = (job.offset + done as u64) as libc::off_t;
        // SAFETY: the iovec points into `job.buf`, alive for the call.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, at, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(("pwritev2", e));
        }
        if n == 0 {
            return Err(("pwritev2", io::Error::from(io::ErrorKind::WriteZero)));
        }
        done += n as usize;
    }
    if job.sync == SyncMode::Fdatasync {
        // SAFETY: plain syscall on a descriptor `job.file` keeps open.
        // Never retried on failure: after EIO the kernel may have dropped
        // the dirty pages, so a second fdatasync could "succeed" falsely.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(("fdatasync", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Test-only: a simulated disk that loses power. Jobs complete (their bytes
/// reach the file and they are reported durable) in random order, a random
/// subset per poll. After `cut_after_jobs` completions the power goes: every
/// job still in flight is, independently and in random order, dropped,
/// written whole, torn (a random subset of its 512-byte sectors written)
/// or zeroed; from then on every job fails with EIO, so the WAL fails and
/// acknowledges nothing more. Recovery must then find every acknowledged
/// operation and must not refuse the torn tail.
#[derive(Clone, Debug)]
pub struct PowerLossSim {
    pub seed: u64,
    pub cut_after_jobs: u64,
    /// What the cut did, for the test to check it exercised something.
    pub report: Arc<Mutex<PowerLossReport>>,
}

/// Fates of the jobs in flight at the cut(s) of a [`PowerLossSim`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLossReport {
    pub cuts: u64,
    pub dropped: u64,
    pub whole: u64,
    pub torn: u64,
    pub zeroed: u64,
}

pub struct SimIo {
    efd: OwnedFd,
    sim: PowerLossSim,
    rng: SplitMix64,
    pending: Vec<Job>,
    done: VecDeque<Done>,
    completed: u64,
    cut: bool,
}

impl SimIo {
    fn new(sim: PowerLossSim) -> io::Result<SimIo> {
        Ok(SimIo {
            efd: eventfd()?,
            rng: SplitMix64(sim.seed ^ 0x9E37_79B9_7F4A_7C15),
            sim,
            pending: Vec::new(),
            done: VecDeque::new(),
            completed: 0,
            cut: false,
        })
    }

    /// Seeded, good enough to pick fates.
    fn next(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn shuffle_pending(&mut self) {
        for i in (1..self.pending.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            self.pending.swap(i, j);
        }
    }

    /// Writes `bytes` at `off` of the job's file through a buffered
    /// descriptor of the same inode (any length and alignment).
    fn put(job: &Job, off: usize, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", job.file.as_raw_fd()))?;
        f.write_all_at(bytes, job.offset + off as u64)
    }

    fn power_cut(&mut self) -> io::Result<()> {
        self.shuffle_pending();
        let mut r = PowerLossReport {
            cuts: 1,
            ..PowerLossReport::default()
        };
        for job in std::mem::take(&mut self.pending) {
            match self.next() % 4 {
                0 => r.dropped += 1,
                1 => {
                    Self::put(&job, 0, &job.buf)?;
                    r.whole += 1;
                }
                2 => {
                    for (i, sector) in job.buf.chunks(512).enumerate() {
                        if self.next().is_multiple_of(2) {
                            Self::put(&job, i * 512, sector)?;
                        }
                    }
                    r.torn += 1;
                }
                _ => {
                    Self::put(&job, 0, &vec![0; job.buf.len()])?;
                    r.zeroed += 1;
                }
            }
            self.done.push_back(Done {
                job,
                result: Err(("write", io::Error::from_raw_os_error(libc::EIO))),
            });
        }
        self.cut = true;
        let mut rep = self.sim.report.lock().unwrap_or_else(|e| e.into_inner());
        rep.cuts += r.cuts;
        rep.dropped += r.dropped;
        rep.whole += r.whole;
        rep.torn += r.torn;
        rep.zeroed += r.zeroed;
        Ok(())
    }

    fn poll(&mut self, block: bool) -> io::Result<Option<Done>> {
        loop {
            if let Some(d) = self.done.pop_front() {
                if !self.pending.is_empty() {
                    // Keep an async writer polling until everything is done.
                    signal(self.efd.as_raw_fd());
                }
                return Ok(Some(d));
            }
            if self.pending.is_empty() {
                return Ok(None);
            }
            if self.cut {
                for job in std::mem::take(&mut self.pending) {
                    self.done.push_back(Done {
                        job,
                        result: Err(("write", io::Error::from_raw_os_error(libc::EIO))),
                    });
                }
                continue;
            }
            let room = self.sim.cut_after_jobs.saturating_sub(self.completed);
            if room == 0 {
                self.power_cut()?;
                continue;
            }
            self.shuffle_pending();
            let mut keep = Vec::new();
            let mut n = 0;
            for job in std::mem::take(&mut self.pending) {
                let go = n < room && ((block && n == 0) || self.next().is_multiple_of(2));
                if !go {
                    keep.push(job);
                    continue;
                }
                Self::put(&job, 0, &job.buf)?;
                self.completed += 1;
                n += 1;
                self.done.push_back(Done {
                    job,
                    result: Ok(()),
                });
            }
            self.pending = keep;
            if self.done.is_empty() && !block {
                if !self.pending.is_empty() {
                    signal(self.efd.as_raw_fd());
                }
                return Ok(None);
            }
        }
    }
}
