//! The WAL's disk I/O: one batch at a time, written and (optionally)
//! fdatasync'ed, on io_uring or on a helper thread doing pwritev+fdatasync.
//!
//! Only one batch is ever in flight: two independent write→fsync chains
//! could complete out of order (the second fsync does not wait for the first
//! chain's write), and a batch may only count as durable when every earlier
//! one is. Group commit comes from the writer filling the next batch while
//! this one is on the disk.
//!
//! Both backends signal completions on an eventfd, so an async host can wait
//! for the disk and for new requests in one `select!`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use io_uring::{opcode, squeue, types, IoUring};

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring when the kernel (and seccomp) allow it, else the fallback.
    Auto,
    /// io_uring or fail at open.
    Uring,
    /// pwritev + fdatasync on a helper thread.
    Fallback,
}

/// One batch: `buf` goes to `file` at `offset`, then fdatasync if `sync`.
pub struct Job {
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
    pub fn open(want: IoBackend) -> io::Result<Io> {
        match want {
            IoBackend::Fallback => Ok(Io::Fallback(FallbackIo::new()?)),
            IoBackend::Uring => Ok(Io::Uring(Box::new(UringIo::new()?))),
            IoBackend::Auto => match UringIo::new() {
                Ok(u) => Ok(Io::Uring(Box::new(u))),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "wal: io_uring is unavailable (kernel or seccomp refused it); \
                         using the pwritev+fdatasync fallback"
                    );
                    Ok(Io::Fallback(FallbackIo::new()?))
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

    pub fn busy(&self) -> bool {
        match self {
            Io::Uring(u) => u.job.is_some(),
            Io::Fallback(f) => f.busy,
        }
    }

    /// Starts `job`; the caller guarantees nothing is in flight.
    pub fn submit(&mut self, job: Job) -> io::Result<()> {
        assert!(!self.busy(), "one batch in flight at a time");
        match self {
            Io::Uring(u) => u.submit(job),
            Io::Fallback(f) => f.submit(job),
        }
    }

    /// The finished job, if any; with `block`, waits for the in-flight one.
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

const UD_WRITE: u64 = 1;
const UD_FSYNC: u64 = 2;

pub struct UringIo {
    ring: IoUring,
    efd: OwnedFd,
    job: Option<Job>,
    /// Bytes of the job's buffer known written.
    written: usize,
    /// Completions still expected for the current chain.
    expect: usize,
    /// Whether the chain's write came back short (the linked fsync is then
    /// cancelled and the rest must be written again).
    short: bool,
    error: Option<(&'static str, io::Error)>,
}

impl UringIo {
    fn new() -> io::Result<UringIo> {
        let ring = IoUring::new(8)?;
        // Probe with a NOP: some sandboxes let io_uring_setup succeed but
        // refuse io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(0);
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
            job: None,
            written: 0,
            expect: 0,
            short: false,
            error: None,
        })
    }

    fn submit(&mut self, job: Job) -> io::Result<()> {
        self.job = Some(job);
        self.written = 0;
        self.error = None;
        self.push_chain()
    }

    /// Queues write(rest of buffer) linked to fdatasync.
    fn push_chain(&mut self) -> io::Result<()> {
        let job = self.job.as_ref().expect("chain needs a job");
        let fd = types::Fd(job.file.as_raw_fd());
        let rest = &job.buf[self.written..];
        let mut write = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
            .offset(job.offset + self.written as u64)
            .build()
            .user_data(UD_WRITE);
        let mut sqes = vec![];
        if job.sync {
            write = write.flags(squeue::Flags::IO_LINK);
            sqes.push(write);
            sqes.push(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(UD_FSYNC),
            );
        } else {
            sqes.push(write);
        }
        self.expect = sqes.len();
        self.short = false;
        // SAFETY: the buffer lives in `self.job` until both completions have
        // been reaped (`poll` only hands the job back after that, and `Drop`
        // of the WAL waits for the in-flight job).
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
        if self.job.is_none() {
            return Ok(None);
        }
        loop {
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
            for (ud, res) in seen {
                self.expect -= 1;
                let len = self.job.as_ref().map_or(0, |j| j.buf.len());
                match ud {
                    UD_WRITE if res < 0 => {
                        self.error
                            .get_or_insert(("write", io::Error::from_raw_os_error(-res)));
                    }
                    UD_WRITE => {
                        self.written += res as usize;
                        if self.written < len {
                            if res == 0 {
                                self.error.get_or_insert((
                                    "write",
                                    io::Error::from(io::ErrorKind::WriteZero),
                                ));
                            }
                            self.short = true;
                        }
                    }
                    UD_FSYNC if res == -libc::ECANCELED && (self.short || self.error.is_some()) => {
                    }
                    UD_FSYNC if res < 0 => {
                        self.error
                            .get_or_insert(("fdatasync", io::Error::from_raw_os_error(-res)));
                    }
                    _ => {}
                }
            }
            if self.expect == 0 {
                if self.error.is_none() && self.short {
                    // A short write is progress, not a failure: write the rest.
                    self.push_chain()?;
                } else {
                    let job = self.job.take().expect("job in flight");
                    let result = match self.error.take() {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                    return Ok(Some(Done { job, result }));
                }
            }
            if !block {
                return Ok(None);
            }
        }
    }
}

pub struct FallbackIo {
    tx: Option<mpsc::Sender<Job>>,
    rx: mpsc::Receiver<Done>,
    efd: Arc<OwnedFd>,
    busy: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FallbackIo {
    fn new() -> io::Result<FallbackIo> {
        let (tx, jobs) = mpsc::channel::<Job>();
        let (done_tx, rx) = mpsc::channel::<Done>();
        let efd = Arc::new(eventfd()?);
        let efd2 = efd.clone();
        // A thread of its own so that the core's runtime keeps running (and
        // filling the next batch) while fdatasync blocks.
        let thread = std::thread::Builder::new()
            .name("wal-fallback-io".into())
            .spawn(move || {
                for job in jobs {
                    let result = write_and_sync(&job);
                    if done_tx.send(Done { job, result }).is_err() {
                        return;
                    }
                    signal(efd2.as_raw_fd());
                }
            })?;
        Ok(FallbackIo {
            tx: Some(tx),
            rx,
            efd,
            busy: false,
            thread: Some(thread),
        })
    }

    fn submit(&mut self, job: Job) -> io::Result<()> {
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send(job)
            .map_err(|_| io::Error::other("wal fallback I/O thread exited"))?;
        self.busy = true;
        Ok(())
    }

    fn poll(&mut self, block: bool) -> Option<Done> {
        if !self.busy {
            return None;
        }
        let r = if block {
            self.rx.recv().ok()
        } else {
            self.rx.try_recv().ok()
        };
        if r.is_some() {
            self.busy = false;
        }
        r
    }
}

impl Drop for FallbackIo {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
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
