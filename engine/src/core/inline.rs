//! Buffered applies written on the core thread ("inline") instead of through the data ring.
//!
//! # Why
//! ext4 has no non-blocking buffered writes (`pwritev2(RWF_NOWAIT)` on a buffered file answers
//! EOPNOTSUPP; checked on kernel 6.18), so io_uring hands every buffered apply to an io-wq worker
//! thread: a queue hand-off and a wake-up there, a completion and usually a wake-up back. A
//! 4 KiB page-cache write itself is a few microseconds. On the 3-replica benchmark, where the
//! three servers and the client share two CPUs, writing buffered applies inline took 14-19%
//! less server CPU per replicated write (docs/bench-nbd.md).
//!
//! # The risk, and the rules
//! A buffered write can sleep. The kernel throttles writers (`balance_dirty_pages`, pauses of
//! up to 200 ms) once the machine's dirty and writeback pages pass the midpoint between the
//! background and the foreground writeback thresholds, and a write can wait for the ext4
//! journal to update the file's mtime. A core thread that sleeps sends no heartbeats and serves
//! no other group meanwhile. So applies run inline only
//! - while dirty + writeback pages stay below the *background* threshold (re-read from
//!   `/proc/vmstat`, `/proc/meminfo` and `/proc/sys/vm` every tick; below it the kernel never
//!   throttles), and
//! - while no inline write slept for longer than `inline_apply_us_max`: one that did (a memory
//!   cgroup limit, a journal wait, anything the first rule cannot see) sends applies back to the
//!   ring for [`INLINE_BACKOFF`]. "Slept" means the write took that long *and* the thread gave up
//!   the CPU voluntarily meanwhile (`getrusage` voluntary context switches): on a busy machine a
//!   write is often just preempted, which says nothing about the disk and would happen on any
//!   thread.
//!
//! Anything else (TRIM, WRITE_ZEROES, O_DIRECT data files, reads) always goes through the ring.

use std::time::{Duration, Instant};

use crate::status::CoreCounters;

/// How long applies stay on the ring after an inline write was slow.
pub(crate) const INLINE_BACKOFF: Duration = Duration::from_secs(5);

/// Whether applies may run inline now, and what happened when they did.
pub(crate) struct InlineApplies {
    /// `inline_applies` in the configuration.
    enabled: bool,
    /// An inline write slower than this turns inline applies off for [`INLINE_BACKOFF`].
    slow: Duration,
    /// Inline applies are off until then (after a slow write).
    off_until: Option<Instant>,
    /// The last dirty-page check found the machine below its background threshold.
    dirty_ok: bool,
    /// Writes applied inline, slow ones seen, and checks that found too many dirty pages.
    applied: u64,
    slow_writes: u64,
    dirty_refusals: u64,
}

impl InlineApplies {
    pub(crate) fn new(enabled: bool, slow_us: u64) -> InlineApplies {
        let mut s = InlineApplies {
            enabled,
            slow: Duration::from_micros(slow_us),
            off_until: None,
            dirty_ok: false,
            applied: 0,
            slow_writes: 0,
            dirty_refusals: 0,
        };
        if enabled {
            let state = read_dirty_state();
            if state.is_none() {
                // Without the kernel's dirty-page figures the first rule can never pass.
                tracing::warn!(
                    "inline applies stay off: cannot read /proc/vmstat, /proc/meminfo or \
                     /proc/sys/vm/dirty_background_*; every apply goes through io_uring"
                );
            }
            s.set_dirty(state);
        }
        s
    }

    /// Re-reads the machine's dirty-page state (once per tick: a few KiB of /proc text).
    pub(crate) fn check_dirty(&mut self) {
        if self.enabled {
            self.set_dirty(read_dirty_state());
        }
    }

    fn set_dirty(&mut self, state: Option<DirtyState>) {
        let ok = state.is_some_and(|d| d.below_background());
        if self.dirty_ok && !ok {
            self.dirty_refusals += 1;
        }
        self.dirty_ok = ok;
    }

    /// Copies the state and counters to the status page's (on the core thread, every tick).
    pub(crate) fn publish(&self, c: &CoreCounters, now: Instant) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        c.inline_applies_active.store(self.allowed(now), relaxed);
        c.applies_inline.store(self.applied, relaxed);
        c.inline_slow_writes.store(self.slow_writes, relaxed);
        c.inline_dirty_refusals.store(self.dirty_refusals, relaxed);
    }

    /// Whether the next buffered apply may be written on this thread (also what the status page
    /// shows).
    pub(crate) fn allowed(&self, now: Instant) -> bool {
        self.enabled && self.dirty_ok && !self.backing_off(now)
    }

    /// Accounts one inline write that took `took` of wall time; `slept` tells, when asked,
    /// whether the thread blocked (a voluntary context switch) since before the write.
    pub(crate) fn record(&mut self, took: Duration, now: Instant, slept: impl FnOnce() -> bool) {
        self.applied += 1;
        if took > self.slow && slept() {
            self.slow_writes += 1;
            self.off_until = Some(now + INLINE_BACKOFF);
        }
    }

    /// Whether a slow write switched inline applies off right now.
    pub(crate) fn backing_off(&self, now: Instant) -> bool {
        self.off_until.is_some_and(|t| now < t)
    }
}

/// The machine's page-cache writeback state, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirtyState {
    /// Dirty plus under-writeback file pages (what `balance_dirty_pages` compares).
    pub dirty: u64,
    /// The background writeback threshold the kernel derives from the same state.
    pub background: u64,
}

impl DirtyState {
    pub(crate) fn below_background(&self) -> bool {
        self.dirty < self.background
    }
}

/// Voluntary context switches of the calling thread so far (it blocked that many times).
pub(crate) fn voluntary_switches() -> u64 {
    // SAFETY: getrusage only fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        // Cannot tell: count it as a block, so a slow write still turns inline applies off.
        return u64::MAX;
    }
    ru.ru_nvcsw as u64
}

fn read_dirty_state() -> Option<DirtyState> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let num = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let bg_bytes = num("/proc/sys/vm/dirty_background_bytes")?;
    let bg_ratio = num("/proc/sys/vm/dirty_background_ratio")?;
    dirty_state(&vmstat, &meminfo, bg_bytes, bg_ratio)
}

/// The kernel's view, from the text of `/proc/vmstat` and `/proc/meminfo` and the two
/// `dirty_background_*` settings: the threshold is `dirty_background_bytes` when set, else
/// `dirty_background_ratio` percent of the dirtyable memory (free pages plus file pages, as
/// `global_dirtyable_memory` counts it, less its reserves: a slight overestimate, which the
/// distance between this threshold and the throttling one absorbs).
pub(crate) fn dirty_state(
    vmstat: &str,
    meminfo: &str,
    bg_bytes: u64,
    bg_ratio: u64,
) -> Option<DirtyState> {
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            let key = it.next()?;
            (key.trim_end_matches(':') == name).then(|| it.next()?.parse().ok())?
        })
    };
    const PAGE: u64 = 4096;
    let dirty = (field(vmstat, "nr_dirty")? + field(vmstat, "nr_writeback")?) * PAGE;
    let background = if bg_bytes > 0 {
        bg_bytes
    } else {
        let kib = field(meminfo, "MemFree")?
            + field(meminfo, "Active(file)")?
            + field(meminfo, "Inactive(file)")?;
        kib * 1024 / 100 * bg_ratio
    };
    Some(DirtyState { dirty, background })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMSTAT: &str = "nr_free_pages 100\nnr_dirty 25600\nnr_writeback 2560\nnr_dirtied 9\n";
    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\n\
                           Active(file):     500000 kB\nInactive(file):   500000 kB\n";

    #[test]
    fn dirty_state_follows_the_kernel_settings() {
        // 28160 pages = 110 MiB dirty; 10% of 2,000,000 KiB = 200,000 KiB background.
        let d = dirty_state(VMSTAT, MEMINFO, 0, 10).unwrap();
        assert_eq!(d.dirty, 28160 * 4096);
        assert_eq!(d.background, 2_000_000 * 1024 / 100 * 10);
        assert!(d.below_background());
        // dirty_background_bytes wins over the ratio when set.
        let d = dirty_state(VMSTAT, MEMINFO, 64 << 20, 10).unwrap();
        assert_eq!(d.background, 64 << 20);
        assert!(!d.below_background());
        // A missing field: no verdict (the caller keeps applies on the ring).
        assert_eq!(dirty_state("nr_dirty 1\n", MEMINFO, 0, 10), None);
        assert_eq!(dirty_state(VMSTAT, "MemFree: 1 kB\n", 0, 10), None);
    }

    #[test]
    fn a_sleep_counts_as_a_voluntary_switch() {
        let before = voluntary_switches();
        std::thread::sleep(Duration::from_millis(2));
        assert!(voluntary_switches() > before);
    }

    #[test]
    fn this_machine_reports_a_state() {
        let d = read_dirty_state().expect("/proc is readable");
        assert!(d.background > 0, "{d:?}");
    }

    #[test]
    fn a_slow_write_sends_applies_to_the_ring_for_the_backoff() {
        let mut s = InlineApplies::new(true, 1000);
        s.dirty_ok = true;
        let t0 = Instant::now();
        assert!(s.allowed(t0));
        s.record(Duration::from_micros(999), t0, || true);
        assert!(s.allowed(t0));
        // Slow but never blocked (preempted): nothing changes.
        s.record(Duration::from_micros(50_000), t0, || false);
        assert!(s.allowed(t0));
        s.record(Duration::from_micros(1001), t0, || true);
        assert_eq!((s.applied, s.slow_writes), (3, 1));
        assert!(!s.allowed(t0 + INLINE_BACKOFF - Duration::from_millis(1)));
        assert!(s.backing_off(t0));
        assert!(!s.allowed(t0));
        assert!(s.allowed(t0 + INLINE_BACKOFF));
        assert!(!s.backing_off(t0 + INLINE_BACKOFF));
        assert!(s.allowed(t0 + INLINE_BACKOFF));
        // Too many dirty pages, or switched off: never inline.
        s.dirty_ok = false;
        assert!(!s.allowed(t0 + INLINE_BACKOFF));
        let mut off = InlineApplies::new(false, 1000);
        off.dirty_ok = true;
        assert!(!off.allowed(t0));
    }
}
