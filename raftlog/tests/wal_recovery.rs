//! WAL rules on disk: torn and zeroed tails are cut with a warning,
//! corruption in the middle is refused naming file and offset, failures are
//! fatal, ENOSPC corrupts nothing, disk usage stays bounded, and the async
//! producer API batches many appends into few fsyncs.

#[path = "support/logs.rs"]
mod logs;

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use logs::with_logs;
use raftlog::core::types::{Entry, EntryKind, HardState};
use raftlog::storage::LogStore;
use raftlog::wal::format::{self, Decoded, RecordKind, SegFormat};
use raftlog::wal::{self, IoBackend, Wal, WalConfig, WalOp};
use raftlog::Error;

fn ents(lo: u64, hi: u64, term: u64, size: usize) -> Vec<Entry> {
    (lo..=hi)
        .map(|index| Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![(index % 251) as u8; size]),
        })
        .collect()
}

fn cfg(dir: &Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    c.log_segment_bytes_max = 256 << 10;
    c.record_bytes_max = 32 << 10;
    c
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// The valid records at the start of a segment file: (offset, length,
/// kind), up to the first zero or bad one.
fn records(path: &Path) -> Vec<(usize, usize, RecordKind)> {
    let d = std::fs::read(path).unwrap();
    let seq = seq_of(path);
    let fmt = SegFormat::detect(&d, seq).unwrap_or(SegFormat::current(seq));
    let mut out = Vec::new();
    let mut off = 0;
    while let Decoded::Record { header, len, .. } = format::decode_at(&d, off, fmt) {
        out.push((off, len, header.kind()));
        off += len;
    }
    out
}

/// The sequence number in a segment file's name.
fn seq_of(path: &Path) -> u64 {
    let name = path.file_name().unwrap().to_str().unwrap();
    name.strip_suffix(".wal").unwrap().parse().unwrap()
}

/// End of the last valid record of a segment (direct-I/O padding included).
fn data_end(path: &Path) -> usize {
    records(path).last().map_or(0, |(off, len, _)| off + len)
}

/// (offset, length) of the last record of `kind`.
fn last_of(path: &Path, kind: RecordKind) -> (usize, usize) {
    let r = records(path);
    let (off, len, _) = r
        .iter()
        .rev()
        .find(|r| r.2 == kind)
        .expect("record of that kind");
    (*off, *len)
}

/// Writes 3 synced appends to group 1 and leaves the active segment
/// unsealed, as a crash would. Returns the active segment's path.
fn crashed_store(dir: &Path) -> PathBuf {
    let mut w = Wal::open(cfg(dir)).unwrap();
    w.append(1, &ents(1, 10, 1, 100)).unwrap();
    w.sync().unwrap();
    w.append(1, &ents(11, 20, 1, 100)).unwrap();
    w.sync().unwrap();
    w.set_hard_state(
        1,
        HardState {
            term: 1,
            vote: 2,
            disk: 900 + 1,
        },
    )
    .unwrap();
    w.append(1, &ents(21, 30, 1, 100)).unwrap();
    w.sync().unwrap();
    w.close_unsealed();
    segments(dir).pop().unwrap()
}

#[test]
fn torn_tail_is_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = crashed_store(tmp.path());
    // Half a record's worth of non-zero garbage after the last record: a
    // write the crash interrupted.
    let end = data_end(&seg);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0x5a; 40], end as u64).unwrap();
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(
        logs.contains("WARN") && logs.contains("torn"),
        "no warning: {logs}"
    );
    assert!(
        logs.contains(&seg.display().to_string()),
        "warning must name the file: {logs}"
    );
    assert_eq!(
        w.status().truncated_at_open,
        vec![(seg.clone(), end as u64)]
    );
    assert_eq!(w.entries(1, 1, 31).unwrap(), ents(1, 30, 1, 100));
    assert_eq!(
        w.group_state(1).unwrap().hard_state,
        HardState {
            term: 1,
            vote: 2,
            disk: 900 + 1
        }
    );
    // The cut tail is sealed: the next restart sees a clean log.
    w.append(1, &ents(31, 31, 2, 10)).unwrap();
    w.sync().unwrap();
    drop(w);
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(!logs.contains("WARN"), "clean restart warned: {logs}");
    assert_eq!(w.group_state(1).unwrap().last_index, 31);
    assert_eq!(w.entries(1, 30, 32).unwrap().len(), 2);
}

#[test]
fn zeroed_last_record_is_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = crashed_store(tmp.path());
    // Zero the last 64 bytes of the last entries record (21..=30): it fails
    // its crc and nothing valid but its batch's padding follows.
    let (off, len) = last_of(&seg, RecordKind::Entries);
    let end = off + len;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0; 64], (end - 64) as u64).unwrap();
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(logs.contains("WARN"), "no warning: {logs}");
    assert_eq!(w.status().truncated_at_open.len(), 1);
    let st = w.group_state(1).unwrap();
    assert_eq!(st.last_index, 20);
    assert_eq!(
        st.hard_state,
        HardState {
            term: 1,
            vote: 2,
            disk: 900 + 1
        }
    );
    assert_eq!(w.entries(1, 1, 21).unwrap(), ents(1, 20, 1, 100));
}

#[test]
fn corruption_in_the_middle_is_refused_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = crashed_store(tmp.path());
    let data = std::fs::read(&seg).unwrap();
    // Flip a payload byte of the first entries record (entry data of index
    // 1 are bytes of value 1; the start record comes before).
    let off = data
        .windows(100)
        .position(|w| w.iter().all(|b| *b == 1))
        .unwrap()
        + 50;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xee], off as u64).unwrap();
    let err = Wal::open(cfg(tmp.path())).err().expect("must refuse");
    let msg = err.to_string();
    match &err {
        Error::WalCorrupt { path, offset, .. } => {
            assert_eq!(path, &seg);
            assert!(
                *offset < off as u64 && *offset > 0,
                "offset {offset} is the record start"
            );
            assert!(
                msg.contains(&seg.display().to_string())
                    && msg.contains(&format!("offset {offset}"))
            );
            assert!(msg.contains("valid record follows"), "{msg}");
        }
        e => panic!("wrong error: {e}"),
    }
    // Refusing must not have modified anything.
    assert_eq!(std::fs::read(&seg).unwrap()[..off], data[..off]);
}

#[test]
fn corrupt_seal_of_an_older_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    w.append(1, &ents(1, 5, 1, 10)).unwrap();
    w.sync().unwrap();
    drop(w); // sealed cleanly
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    w.append(1, &ents(6, 9, 1, 10)).unwrap();
    w.sync().unwrap();
    drop(w);
    let first = segments(tmp.path()).remove(0);
    let (off, len) = last_of(&first, RecordKind::Seal);
    let end = off + len;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap();
    f.write_all_at(&[0xff; 8], (end - 8) as u64).unwrap();
    let err = Wal::open(cfg(tmp.path())).err().expect("must refuse");
    let msg = err.to_string();
    assert!(matches!(err, Error::WalCorrupt { .. }), "{msg}");
    assert!(msg.contains(&first.display().to_string()), "{msg}");
}

#[test]
fn missing_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let mut w = Wal::open(cfg(tmp.path())).unwrap();
        w.set_hard_state(
            1,
            HardState {
                term: 1,
                vote: 1,
                disk: 900 + 1,
            },
        )
        .unwrap();
        w.sync().unwrap();
    }
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3);
    std::fs::remove_file(&segs[1]).unwrap();
    let err = Wal::open(cfg(tmp.path())).err().expect("must refuse");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn failed_write_is_fatal_and_never_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.inject_eio_after_batches = Some(2);
    let mut w = Wal::open(c).unwrap();
    w.append(1, &ents(1, 3, 1, 10)).unwrap();
    w.sync().unwrap();
    w.append(1, &ents(4, 6, 1, 10)).unwrap();
    let e = w.sync().unwrap_err();
    assert!(e.to_string().contains("Input/output error"), "{e}");
    // Every later call is refused.
    assert!(matches!(w.sync(), Err(Error::LogFailed { .. })));
    assert!(matches!(
        w.append(1, &ents(7, 7, 1, 1)),
        Err(Error::LogFailed { .. })
    ));
    assert!(matches!(w.entries(1, 1, 2), Err(Error::LogFailed { .. })));
    let h = w.handle();
    assert!(h.submit_blocking(WalOp::RemoveGroup { group: 1 }).is_err());
    assert!(w.status().failed.is_some());
    drop(w);
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    assert_eq!(w.group_state(1).unwrap().last_index, 3);
    assert_eq!(w.entries(1, 1, 4).unwrap(), ents(1, 3, 1, 10));
}

/// A temporary directory on a tmpfs, if there is one: tmpfs refuses a
/// fallocate larger than the filesystem at once, while ext4 and xfs
/// allocate until the disk is really full before failing — on a shared
/// machine that makes every other process (parallel tests, builds) fail
/// with ENOSPC for a moment.
fn tmpfs_tempdir() -> Option<tempfile::TempDir> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let shm = Path::new("/dev/shm");
    let c = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != TMPFS_MAGIC {
        return None;
    }
    tempfile::tempdir_in(shm).ok()
}

#[test]
fn enospc_is_a_clear_error_and_corrupts_nothing() {
    let Some(tmp) = tmpfs_tempdir() else {
        eprintln!("SKIPPED: no tmpfs at /dev/shm (a huge fallocate would fill the real disk)");
        return;
    };
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    w.append(7, &ents(1, 20, 1, 1000)).unwrap();
    w.sync().unwrap();
    drop(w);
    let before: Vec<_> = segments(tmp.path());
    // A segment far larger than the free space: preallocation fails.
    let mut huge = cfg(tmp.path());
    // 1 TiB: beyond the tmpfs's size, refused before anything is allocated.
    huge.log_segment_bytes_max = 1 << 40;
    let err = Wal::open(huge).err().expect("must fail");
    assert!(matches!(err, Error::WalNoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(
        segments(tmp.path()),
        before,
        "the failed segment must be removed"
    );
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    assert_eq!(w.entries(7, 1, 21).unwrap(), ents(1, 20, 1, 1000));
}

#[test]
fn steady_workload_with_compaction_keeps_segments_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = WalConfig::new(tmp.path());
    c.log_segment_bytes_max = 64 << 10;
    c.record_bytes_max = 16 << 10;
    c.segments_soft_max = 6;
    c.entry_cache_bytes_max = 32 << 10;
    let mut w = Wal::open(c.clone()).unwrap();
    // One idle group written once: without rewrite it would pin segment 1.
    w.set_hard_state(
        999,
        HardState {
            term: 3,
            vote: 1,
            disk: 900 + 3,
        },
    )
    .unwrap();
    w.append(999, &ents(1, 4, 3, 500)).unwrap();
    w.sync().unwrap();
    let mut last = [0u64; 16];
    let mut max_segments = 0;
    for round in 0..400u64 {
        for (g, last) in last.iter_mut().enumerate() {
            let lo = *last + 1;
            w.append(g as u64, &ents(lo, lo + 1, 1, 300)).unwrap();
            *last = lo + 1;
            if *last > 20 {
                // Keep about 20 entries per group, as raft would after snapshots.
                let at = *last - 20;
                w.compact(g as u64, at, 1).unwrap();
            }
        }
        w.sync().unwrap();
        max_segments = max_segments.max(w.status().segments);
        assert!(
            w.status().segments <= c.segments_soft_max + 3,
            "round {round}: {:?}",
            w.status()
        );
    }
    let st = w.status();
    assert!(st.purged_segments > 20, "{st:?}");
    assert!(st.rewritten_bytes > 0, "{st:?}");
    // About 400 rounds * 16 groups * 2 entries * ~330 B = 4 MB went through.
    assert!(st.appended_bytes > 3_000_000, "{st:?}");
    drop(w);
    let mut w = Wal::open(c).unwrap();
    assert_eq!(w.entries(999, 1, 5).unwrap(), ents(1, 4, 3, 500));
    assert_eq!(
        w.group_state(999).unwrap().hard_state,
        HardState {
            term: 3,
            vote: 1,
            disk: 900 + 3
        }
    );
    for (g, l) in last.iter().enumerate() {
        let st = w.group_state(g as u64).unwrap();
        assert_eq!((st.compacted_index, st.last_index), (l - 20, *l));
        assert_eq!(w.entries(g as u64, l - 19, l + 1).unwrap(), {
            // Entries were appended in pairs of the same shape.
            let mut v = Vec::new();
            for i in l - 19..=*l {
                v.extend(ents(i, i, 1, 300));
            }
            v
        });
    }
    eprintln!("max segments seen: {max_segments}");
}

/// Small segments and no cold-group rewrite: only compaction frees segments.
fn compacting_cfg(dir: &Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    c.log_segment_bytes_max = 64 << 10;
    c.record_bytes_max = 16 << 10;
    c.segments_soft_max = 1 << 20;
    c.entry_cache_bytes_max = 32 << 10;
    c
}

/// One group with its hard state written once, then `rounds` of 4 entries
/// of 700 B, synced, with a snapshot-like compaction every 40 entries that
/// keeps the last 10. `each` sees the store after every round. Returns the
/// last index.
fn compacting_workload(w: &mut Wal, rounds: u64, mut each: impl FnMut(u64, &Wal)) -> u64 {
    w.set_hard_state(
        1,
        HardState {
            term: 2,
            vote: 3,
            disk: 900 + 2,
        },
    )
    .unwrap();
    let mut last = 0u64;
    for round in 0..rounds {
        w.append(1, &ents(last + 1, last + 4, 2, 700)).unwrap();
        last += 4;
        if last.is_multiple_of(40) {
            w.compact(1, last - 10, 2).unwrap();
        }
        w.sync().unwrap();
        each(round, w);
    }
    last
}

/// The state `compacting_workload` leaves, read back after a restart.
fn assert_compacted_state(w: &mut Wal, last: u64) {
    let g = w.group_state(1).unwrap();
    assert_eq!(
        g.hard_state,
        HardState {
            term: 2,
            vote: 3,
            disk: 900 + 2
        }
    );
    assert_eq!((g.compacted_index, g.compacted_term), (last - 10, 2));
    assert_eq!(g.last_index, last);
    assert_eq!(
        w.entries(1, last - 9, last + 1).unwrap(),
        ents(last - 9, last, 2, 700)
    );
}

/// A group that compacts as raft does after snapshots frees its old segments
/// by itself: no cold-group rewrite, disk use bounded by its live log, and
/// its hard state (written once, at the start) survives the purge of the
/// segment that held it.
#[test]
fn a_compacting_group_frees_its_segments_without_rewrite() {
    let tmp = tempfile::tempdir().unwrap();
    let c = compacting_cfg(tmp.path());
    let mut w = Wal::open(c.clone()).unwrap();
    let mut max_segments = 0;
    let last = compacting_workload(&mut w, 300, |round, w| {
        max_segments = max_segments.max(w.status().segments);
        assert!(w.status().segments <= 4, "round {round}: {:?}", w.status());
    });
    let st = w.status();
    assert_eq!(st.rewritten_bytes, 0, "{st:?}");
    // 300 rounds * 4 entries * ~730 B = 876 KB through 64 KiB segments.
    assert!(st.purged_segments >= 10, "{st:?}");
    drop(w);
    let mut w = Wal::open(c).unwrap();
    assert_compacted_state(&mut w, last);
    eprintln!("max segments seen: {max_segments}");
}

/// Purging does not fsync the directory, so a crash can undo its last
/// renames: the purged segments come back under their own names, holding
/// only records nothing needs. Recovery must rebuild the same state.
#[test]
fn purged_segments_that_come_back_after_a_crash_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = compacting_cfg(tmp.path());
    let mut w = Wal::open(c.clone()).unwrap();
    let mut last = compacting_workload(&mut w, 200, |_, _| {});
    // A burst over several segments, then one compaction: several segments
    // are purged at once, so free files wait beside the one taken ahead
    // for the next segment.
    let lo = last + 1;
    last += 400;
    w.append(1, &ents(lo, last, 2, 700)).unwrap();
    w.compact(1, last - 10, 2).unwrap();
    w.sync().unwrap();
    let st = w.status();
    assert!(st.free_segments >= 2 && st.next_segment_ahead, "{st:?}");
    w.close().unwrap();
    // The free files still named after the segments they were, in a run
    // just below the oldest segment: as if their renames never landed. Not
    // the file taken ahead (given its free name back at the close, the
    // oldest of them): the directory sync that made it the next segment
    // made its purge rename durable too.
    let oldest = seq_of(&segments(tmp.path())[0]);
    let taken_ahead = (1..oldest)
        .find(|seq| tmp.path().join(format!("free-{seq:020}.walfree")).exists())
        .expect("a free file");
    let mut back = 0;
    for seq in (taken_ahead + 1..oldest).rev() {
        let free = tmp.path().join(format!("free-{seq:020}.walfree"));
        if !free.exists() {
            break;
        }
        std::fs::rename(&free, tmp.path().join(format!("{seq:020}.wal"))).unwrap();
        back += 1;
    }
    assert!(back >= 1, "no purged file to bring back");
    let mut w = Wal::open(c).unwrap();
    assert_compacted_state(&mut w, last);
    // The old segments go again with the next compaction.
    let before = w.status().segments;
    w.append(1, &ents(last + 1, last + 4, 2, 700)).unwrap();
    w.compact(1, last, 2).unwrap();
    w.sync().unwrap();
    assert!(w.status().segments < before, "{:?}", w.status());
}

#[test]
fn entry_larger_than_a_record_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    let e = w.append(1, &ents(1, 1, 1, 40 << 10)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LogEntryTooLarge {
                group: 1,
                index: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(w.group_state(1), None);
    // Many small entries larger than a record in total are split.
    w.append(1, &ents(1, 100, 1, 1000)).unwrap();
    w.sync().unwrap();
    w.close_unsealed();
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    assert_eq!(w.entries(1, 1, 101).unwrap(), ents(1, 100, 1, 1000));
}

#[test]
fn raft_sync_off_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.raft_sync = false;
    let (w, logs) = with_logs(|| Wal::open(c));
    let mut w = w.unwrap();
    assert!(
        logs.contains("WARN") && logs.contains("raft_sync = false"),
        "{logs}"
    );
    w.append(1, &ents(1, 2, 1, 10)).unwrap();
    w.sync().unwrap();
    let st = w.status();
    assert!(!st.sync);
    assert_eq!(st.fsyncs, 0);
    assert!(st.batches > 0);
}

fn async_producers(backend: IoBackend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.io_backend = backend;
    c.append_buffer_bytes_max = 64 << 10;
    let w = Rc::new(RefCell::new(Wal::open(c.clone()).unwrap()));
    let h = w.borrow().handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A producer on another thread, with the blocking API.
    let h2 = h.clone();
    let t = std::thread::spawn(move || {
        for i in 1..=200u64 {
            h2.submit_blocking(WalOp::Append {
                group: 1000,
                entries: ents(i, i, 1, 512),
            })
            .unwrap()
            .wait()
            .unwrap();
        }
    });
    let local = tokio::task::LocalSet::new();
    let max_buffered = Rc::new(RefCell::new(0usize));
    local.block_on(&rt, async {
        let writer = tokio::task::spawn_local(wal::run(w.clone()));
        let mut tasks = Vec::new();
        for g in 0..32u64 {
            let h = h.clone();
            let mb = max_buffered.clone();
            tasks.push(tokio::task::spawn_local(async move {
                for i in 1..=50u64 {
                    h.append(g, ents(i, i, 1, 2048)).await.unwrap();
                    let b = h.buffered_bytes();
                    let mut m = mb.borrow_mut();
                    *m = (*m).max(b);
                }
                h.set_hard_state(
                    g,
                    HardState {
                        term: 1,
                        vote: g + 1,
                        disk: g + 5,
                    },
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Entries are readable through the owner while the writer runs.
        let e = w.borrow_mut().entries(5, 1, 51).unwrap();
        assert_eq!(e, ents(1, 50, 1, 2048));
        while !t.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        h.shutdown();
        writer.await.unwrap().unwrap();
    });
    t.join().unwrap();
    assert!(*max_buffered.borrow() <= c.append_buffer_bytes_max);
    let st = w.borrow().status();
    let appends = 32 * 51 + 200;
    assert!(st.fsyncs < appends, "no group commit: {st:?}");
    eprintln!("{backend:?}: {appends} ops in {} fsyncs", st.fsyncs);
    drop(local);
    drop(rt);
    let w = Rc::try_unwrap(w).ok().unwrap().into_inner();
    drop(w);
    let mut w = Wal::open(c).unwrap();
    assert_eq!(w.entries(1000, 1, 201).unwrap(), ents(1, 200, 1, 512));
    for g in 0..32u64 {
        assert_eq!(w.group_state(g).unwrap().last_index, 50);
        assert_eq!(w.group_state(g).unwrap().hard_state.vote, g + 1);
    }
}

#[test]
fn async_producers_group_commit_uring() {
    async_producers(IoBackend::Auto);
}

#[test]
fn async_producers_group_commit_fallback() {
    async_producers(IoBackend::Fallback);
}

#[test]
fn invalid_queued_op_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    let h = w.handle();
    let bad = h
        .submit_blocking(WalOp::Append {
            group: 1,
            entries: ents(5, 5, 1, 1),
        })
        .unwrap();
    let good = h
        .submit_blocking(WalOp::Append {
            group: 1,
            entries: ents(1, 1, 1, 1),
        })
        .unwrap();
    w.sync().unwrap();
    assert!(matches!(
        bad.wait(),
        Err(Error::LogAppendOutOfRange {
            group: 1,
            first: 5,
            ..
        })
    ));
    good.wait().unwrap();
    assert_eq!(h.buffered_bytes(), 0);
}

// ---- holes left by batches completing out of order ----

/// One record of a hand-built segment: an `Entries` record for group 1
/// holding entry `index` (term 1), in `batch`, stamped `acked`. A `hole`
/// leaves its bytes zero, as a batch still in flight at a crash would.
struct Rec {
    index: u64,
    batch: u64,
    acked: u64,
    hole: bool,
}

fn rec(index: u64, batch: u64, acked: u64) -> Rec {
    Rec {
        index,
        batch,
        acked,
        hole: false,
    }
}

fn hole(index: u64, batch: u64, acked: u64) -> Rec {
    Rec {
        hole: true,
        ..rec(index, batch, acked)
    }
}

const WINDOW: u16 = 4;

/// Writes segment `seq` (start record in batch 0 unless `start_hole`, then
/// `recs`, then a seal if `sealed`) preallocated to the test segment size.
/// Returns its path and each record's offset.
fn synth_segment(
    dir: &Path,
    seq: u64,
    start_hole: bool,
    recs: &[Rec],
    sealed: bool,
) -> (PathBuf, Vec<u64>) {
    synth_segment_as(dir, SegFormat::current(seq), start_hole, recs, sealed)
}

/// [`synth_segment`] in format `fmt` (version 3 or 4).
fn synth_segment_as(
    dir: &Path,
    fmt: SegFormat,
    start_hole: bool,
    recs: &[Rec],
    sealed: bool,
) -> (PathBuf, Vec<u64>) {
    use raftlog::wal::format::RecordHeader;
    let seq = fmt.seq;
    let mut buf = Vec::new();
    format::encode_as(
        &mut buf,
        &RecordHeader::segment_start(seq).in_batch(0, 0, WINDOW),
        fmt,
        |_| {},
    );
    if start_hole {
        buf.iter_mut().for_each(|b| *b = 0);
    }
    let mut offs = Vec::new();
    let mut last_batch = 0;
    for r in recs {
        let start = buf.len();
        offs.push(start as u64);
        let e = &ents(r.index, r.index, 1, 100)[0];
        let h =
            RecordHeader::entries(1, (r.index, 1), (r.index, 1)).in_batch(r.batch, r.acked, WINDOW);
        format::encode_as(&mut buf, &h, fmt, |b| {
            format::encode_entry(b, 1, e.kind, &e.data, crc32fast::hash(&e.data))
        });
        if r.hole {
            buf[start..].iter_mut().for_each(|b| *b = 0);
        }
        last_batch = r.batch;
    }
    if sealed {
        format::encode_as(
            &mut buf,
            &RecordHeader::seal(seq).in_batch(last_batch, 0, WINDOW),
            fmt,
            |_| {},
        );
    }
    buf.resize(cfg(dir).log_segment_bytes_max as usize, 0);
    let path = dir.join(format!("{seq:020}.wal"));
    std::fs::write(&path, &buf).unwrap();
    (path, offs)
}

#[test]
fn hole_inside_the_in_flight_window_at_the_tail_is_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    // Batches 1, 2 durable; 3 (the hole), 4, 5 were in flight together: 4
    // and 5 landed, 3 did not. Nothing after the hole was acknowledged.
    let (seg, offs) = synth_segment(
        tmp.path(),
        1,
        false,
        &[
            rec(1, 1, 1),
            rec(2, 2, 2),
            hole(3, 3, 2),
            rec(4, 4, 2),
            rec(5, 5, 3),
        ],
        false,
    );
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(
        logs.contains("WARN") && logs.contains("valid_records_after_hole=2"),
        "{logs}"
    );
    assert_eq!(w.status().truncated_at_open, vec![(seg.clone(), offs[2])]);
    assert_eq!(w.group_state(1).unwrap().last_index, 2);
    assert_eq!(w.entries(1, 1, 3).unwrap(), ents(1, 2, 1, 100));
    // The log continues cleanly from the cut.
    w.append(1, &ents(3, 3, 1, 100)).unwrap();
    w.sync().unwrap();
    drop(w);
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(!logs.contains("WARN"), "clean restart warned: {logs}");
    assert_eq!(w.entries(1, 1, 4).unwrap(), ents(1, 3, 1, 100));
}

fn assert_refused_at(dir: &Path, seg: &Path, offset: u64, what: &str) {
    let err = Wal::open(cfg(dir)).err().expect("must refuse");
    let msg = err.to_string();
    match &err {
        Error::WalCorrupt {
            path, offset: o, ..
        } => {
            assert_eq!(path, seg, "{msg}");
            assert_eq!(*o, offset, "{msg}");
        }
        e => panic!("wrong error: {e}"),
    }
    assert!(msg.contains(what), "{msg}");
}

#[test]
fn hole_followed_by_a_record_beyond_the_window_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Batch 7 cannot have been in flight with batch 3 (window 4 after the
    // last good batch 2 allows up to batch 6).
    let (seg, offs) = synth_segment(
        tmp.path(),
        1,
        false,
        &[rec(1, 1, 1), rec(2, 2, 2), hole(3, 3, 2), rec(4, 7, 2)],
        false,
    );
    let before = std::fs::read(&seg).unwrap();
    assert_refused_at(tmp.path(), &seg, offs[2], "outside the in-flight window");
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        before,
        "refusing modified the file"
    );
}

#[test]
fn hole_in_a_batch_a_later_record_saw_durable_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Within the window, but the record of batch 4 was written after
    // batches 0..4 were durable: the hole (batch 3) had been acknowledged.
    let (seg, offs) = synth_segment(
        tmp.path(),
        1,
        false,
        &[rec(1, 1, 1), rec(2, 2, 2), hole(3, 3, 2), rec(4, 4, 4)],
        false,
    );
    assert_refused_at(tmp.path(), &seg, offs[2], "were durable");
}

#[test]
fn hole_in_an_older_segment_is_refused_even_inside_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, offs) = synth_segment(
        tmp.path(),
        1,
        false,
        &[rec(1, 1, 1), hole(2, 2, 1), rec(3, 3, 1)],
        true,
    );
    synth_segment(tmp.path(), 2, false, &[rec(4, 1, 1)], false);
    assert_refused_at(tmp.path(), &seg, offs[1], "later segments exist");
}

#[test]
fn lost_start_batch_of_the_last_segment_removes_it_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    synth_segment(tmp.path(), 1, false, &[rec(1, 1, 1)], true);
    // Batch 0 (the start record) of segment 2 never landed; batch 1, in
    // flight with it, did.
    let (seg2, _) = synth_segment(tmp.path(), 2, true, &[rec(2, 1, 0)], false);
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert_eq!(w.status().truncated_at_open, vec![(seg2.clone(), 0)]);
    assert_eq!(w.entries(1, 1, 2).unwrap(), ents(1, 1, 1, 100));
    assert_eq!(w.group_state(1).unwrap().last_index, 1);
    drop(w);
    // The same, but the later record saw batch 0 durable: corruption.
    let tmp = tempfile::tempdir().unwrap();
    synth_segment(tmp.path(), 1, false, &[rec(1, 1, 1)], true);
    let (seg2, _) = synth_segment(tmp.path(), 2, true, &[rec(2, 1, 1)], false);
    assert_refused_at(tmp.path(), &seg2, 0, "were durable");
}

fn batches_in_flight(backend: IoBackend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.io_backend = backend;
    c.batches_in_flight_max = 4;
    let (st, w) = concurrent_appends(c.clone(), 64, 20, 1000);
    eprintln!("{backend:?}: {st:?}");
    assert!(st.batches_in_flight_seen_max > 1, "{st:?}");
    // Batches of 1000-byte entries are all under small_batch_bytes_max: they
    // overlap only up to small_batches_in_flight_max.
    assert!(
        st.batches_in_flight_seen_max <= c.small_batches_in_flight_max,
        "{st:?}"
    );
    assert_eq!(st.batches_in_flight, 0);
    assert!(st.fsyncs < 64 * 20, "no group commit: {st:?}");
    // Every batch spent some time on the disk, and not more than the whole run.
    assert!(st.batches > 0 && st.batch_disk_us > 0, "{st:?}");
    assert!(st.batch_disk_us / st.batches < 10_000_000, "{st:?}");
    w.close_unsealed();
    let mut w = Wal::open(c).unwrap();
    for g in 0..64u64 {
        assert_eq!(w.entries(g, 1, 21).unwrap(), ents(1, 20, 1, 1000));
    }
}

/// `appenders` tasks append `appends` entries of `size` bytes each to their
/// own group; returns the status once all are durable, and the store.
fn concurrent_appends(
    c: WalConfig,
    appenders: u64,
    appends: u64,
    size: usize,
) -> (wal::WalStatus, Wal) {
    let w = Rc::new(RefCell::new(Wal::open(c).unwrap()));
    let h = w.borrow().handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let writer = tokio::task::spawn_local(wal::run(w.clone()));
        let mut tasks = Vec::new();
        for g in 0..appenders {
            let h = h.clone();
            tasks.push(tokio::task::spawn_local(async move {
                for i in 1..=appends {
                    h.append(g, ents(i, i, 1, size)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        h.shutdown();
        writer.await.unwrap().unwrap();
    });
    let st = w.borrow().status();
    drop(local);
    drop(rt);
    (st, Rc::try_unwrap(w).ok().unwrap().into_inner())
}

/// Small batches overlap on the disk only up to small_batches_in_flight_max;
/// batches of small_batch_bytes_max or more up to batches_in_flight_max.
#[test]
fn only_big_batches_overlap_beyond_the_small_batch_limit() {
    for (size, big) in [(1000, false), (64 << 10, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = WalConfig::new(tmp.path());
        c.log_segment_bytes_max = 64 << 20;
        c.batches_in_flight_max = 4;
        c.small_batches_in_flight_max = 1;
        c.small_batch_bytes_max = 32 << 10;
        let (st, _) = concurrent_appends(c, 16, 8, size);
        eprintln!("{size} B entries: {st:?}");
        if big {
            assert!(st.batches_in_flight_seen_max > 1, "{st:?}");
            assert!(st.batches_in_flight_seen_max <= 4, "{st:?}");
        } else {
            assert_eq!(st.batches_in_flight_seen_max, 1, "{st:?}");
        }
        assert!(st.fsyncs < 16 * 8, "no group commit: {st:?}");
    }
}

#[test]
fn several_batches_are_in_flight_under_concurrent_appenders_uring() {
    batches_in_flight(IoBackend::Auto);
}

#[test]
fn several_batches_are_in_flight_under_concurrent_appenders_fallback() {
    batches_in_flight(IoBackend::Fallback);
}

#[test]
fn groups_that_never_compact_do_not_start_a_rewrite_storm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = WalConfig::new(tmp.path());
    c.log_segment_bytes_max = 64 << 10;
    c.record_bytes_max = 16 << 10;
    c.segments_soft_max = 4;
    let mut w = Wal::open(c.clone()).unwrap();
    // ~500 KB of live entries in 64 groups (each small enough to rewrite),
    // never compacted: far more than the soft limit's half (2 segments).
    // Rewriting cannot bring the count down; it used to rewrite every group
    // again on every pass.
    for round in 0..20u64 {
        for g in 0..64u64 {
            w.append(g, &ents(round + 1, round + 1, 1, 400)).unwrap();
        }
        w.sync().unwrap();
    }
    let st = w.status();
    assert_eq!(st.rewritten_bytes, 0, "{st:?}");
    assert!(st.segments > c.segments_soft_max, "{st:?}");
    drop(w);
    let mut w = Wal::open(c).unwrap();
    for g in 0..64u64 {
        assert_eq!(w.entries(g, 1, 21).unwrap(), ents(1, 20, 1, 400));
    }
}

#[test]
fn direct_io_batches_are_4096_aligned_and_padded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.direct_io = true;
    let mut w = Wal::open(c.clone()).unwrap();
    assert!(
        w.status().direct_io,
        "the test directory's filesystem refused O_DIRECT"
    );
    for i in 1..=20u64 {
        // Sizes that end batches at every kind of offset, one sync each.
        w.append(1, &ents(i, i, 1, (i as usize * 613) % 5000))
            .unwrap();
        w.sync().unwrap();
    }
    w.close_unsealed();
    let seg = segments(tmp.path()).pop().unwrap();
    let recs = records(&seg);
    // Every batch (21 of them: start + 20 appends) ends on a 4096 boundary
    // with a pad record right before it, unless it ended there by itself.
    let ends: Vec<usize> = recs.iter().map(|(o, l, _)| o + l).collect();
    assert_eq!(data_end(&seg) % 4096, 0);
    let pads = recs.iter().filter(|r| r.2 == RecordKind::Pad).count();
    assert!(pads >= 15, "{pads} pads in {recs:?}");
    for (i, r) in recs.iter().enumerate() {
        if r.2 == RecordKind::Pad {
            assert_eq!(ends[i] % 4096, 0, "pad not ending a block: {recs:?}");
        }
    }
    let (w, logs) = with_logs(|| Wal::open(c));
    let mut w = w.unwrap();
    assert!(!logs.contains("corrupt"), "{logs}");
    for i in 1..=20u64 {
        assert_eq!(
            w.entries(1, i, i + 1).unwrap(),
            ents(i, i, 1, (i as usize * 613) % 5000)
        );
    }
}

#[test]
fn segments_zero_filled_in_the_background_are_used_and_leftovers_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.direct_io = true;
    c.segment_zero_fill = true;
    // A leftover of a killed session's zero-fill: ignored by recovery and
    // never used as a segment.
    let leftover = tmp.path().join("next-segment.zeroing");
    std::fs::write(&leftover, b"half-zeroed garbage").unwrap();
    let ((st, idx), logs) = with_logs(|| {
        let mut w = Wal::open(c.clone()).unwrap();
        let mut idx = 0;
        for _ in 0..10 {
            // About half a segment per round, then time for the zero-fill
            // thread to finish the next file before the writer rotates.
            w.append(1, &ents(idx + 1, idx + 40, 1, 3000)).unwrap();
            idx += 40;
            w.sync().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (w.status(), idx)
    });
    assert!(st.segments >= 4, "{st:?}");
    assert!(st.zero_filled_segments >= 1, "{st:?}");
    // Was: replacing a taken preparer deleted its successor's file.
    assert!(!logs.contains("WARN"), "{logs}");
    assert!(!leftover.exists(), "the zero-fill file is removed on close");
    // A zero-filled segment is full size with zeros after its records.
    let seg = segments(tmp.path()).pop().unwrap();
    let d = std::fs::read(&seg).unwrap();
    assert_eq!(d.len() as u64, c.log_segment_bytes_max);
    assert!(d[data_end(&seg)..].iter().all(|b| *b == 0));
    let (w, logs) = with_logs(|| Wal::open(c));
    let mut w = w.unwrap();
    assert!(!logs.contains("WARN"), "{logs}");
    assert_eq!(w.entries(1, 1, idx + 1).unwrap().len() as u64, idx);
    assert_eq!(w.entries(1, 1, idx + 1).unwrap(), ents(1, idx, 1, 3000));
}

/// A purged segment file reused as segment 3 whose start record was never
/// written (a crash right after the rename): it still holds segment 1's
/// records, which do not verify as segment 3's, so recovery removes it as an
/// empty trailing segment instead of reading old entries back.
#[test]
fn recycled_file_without_its_new_start_record_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg1, _) = synth_segment(tmp.path(), 1, false, &[rec(1, 1, 1), rec(2, 2, 2)], true);
    synth_segment(tmp.path(), 2, false, &[rec(3, 1, 1)], true);
    let seg3 = tmp.path().join(format!("{:020}.wal", 3));
    std::fs::copy(&seg1, &seg3).unwrap();
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(logs.contains("without a valid start record"), "{logs}");
    assert_eq!(w.status().truncated_at_open, vec![(seg3, 0)]);
    assert_eq!(w.group_state(1).unwrap().last_index, 3);
    assert_eq!(w.entries(1, 1, 4).unwrap().len(), 3);
}

/// The last segment, reused from a purged file: after this life's records it
/// still holds the earlier life's (valid under their own sequence number).
/// They are a torn tail here, cut with a warning, never corruption and never
/// entries.
#[test]
fn records_of_a_recycled_files_earlier_life_end_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    synth_segment(tmp.path(), 1, false, &[rec(1, 1, 1)], true);
    // Segment 2's earlier life as segment 7: more, later-batch records.
    let old = tempfile::tempdir().unwrap();
    let (old7, _) = synth_segment(
        old.path(),
        7,
        false,
        &[rec(90, 1, 1), rec(91, 2, 2), rec(92, 3, 3), rec(93, 4, 4)],
        true,
    );
    let (seg2, offs) = synth_segment(tmp.path(), 2, false, &[rec(2, 1, 1)], false);
    let mut bytes = std::fs::read(&old7).unwrap();
    let new = std::fs::read(&seg2).unwrap();
    let end = data_end(&seg2);
    bytes[..end].copy_from_slice(&new[..end]);
    std::fs::write(&seg2, &bytes).unwrap();
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(
        logs.contains("truncating the torn or zero-filled tail"),
        "{logs}"
    );
    assert!(logs.contains("valid_records_after_hole=0"), "{logs}");
    assert_eq!(
        w.status().truncated_at_open,
        vec![(seg2, offs[0] + (end as u64 - offs[0]))]
    );
    assert_eq!(w.group_state(1).unwrap().last_index, 2);
    assert_eq!(w.entries(1, 1, 3).unwrap(), ents(1, 2, 1, 100));
}

/// Segments written by format version 3 (no sequence number in the crc) are
/// still read, a torn tail of one included, and new segments are version 4.
#[test]
fn version_3_segments_are_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let v3 = |seq| SegFormat { seq, v4: false };
    synth_segment_as(
        tmp.path(),
        v3(1),
        false,
        &[rec(1, 1, 1), rec(2, 2, 2)],
        true,
    );
    let (seg2, offs) = synth_segment_as(
        tmp.path(),
        v3(2),
        false,
        &[rec(3, 1, 1), hole(4, 2, 1)],
        false,
    );
    let (w, logs) = with_logs(|| Wal::open(cfg(tmp.path())));
    let mut w = w.unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert_eq!(w.status().truncated_at_open, vec![(seg2.clone(), offs[1])]);
    assert_eq!(w.entries(1, 1, 4).unwrap(), ents(1, 3, 1, 100));
    w.append(1, &ents(4, 4, 1, 100)).unwrap();
    w.sync().unwrap();
    drop(w);
    let segs = segments(tmp.path());
    let newest = segs.last().unwrap();
    let d = std::fs::read(newest).unwrap();
    assert_eq!(
        SegFormat::detect(&d, seq_of(newest)),
        Some(SegFormat::current(seq_of(newest)))
    );
    let mut w = Wal::open(cfg(tmp.path())).unwrap();
    assert_eq!(w.entries(1, 1, 5).unwrap(), ents(1, 4, 1, 100));
}

/// A last segment whose first block is the `Reserved` mark of a file taken
/// ahead goes back to the free files on the mark alone; with the mark torn
/// (its pad intact) it is an ordinary trailing segment without a start
/// record, removed after the full check. Either way the log before it is
/// intact.
#[test]
fn a_trailing_reserved_segment_is_removed_intact_or_torn() {
    for torn in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        let mut w = Wal::open(c.clone()).unwrap();
        w.append(1, &ents(1, 5, 1, 100)).unwrap();
        w.sync().unwrap();
        let next = w.status().active_segment + 1;
        w.close_unsealed();
        let mut block = format::reserved_block(next, 4096);
        if torn {
            block[40] ^= 1;
        }
        let path = tmp.path().join(format!("{next:020}.wal"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(c.log_segment_bytes_max).unwrap();
        f.write_all_at(&block, 0).unwrap();
        drop(f);
        let (w, logs) = with_logs(|| Wal::open(c.clone()));
        let mut w = w.unwrap();
        let quick = logs
            .lines()
            .any(|l| l.contains("renamed ahead of a rotation") && l.contains("INFO"));
        let slow = logs
            .lines()
            .any(|l| l.contains("without a valid start record") && l.contains("WARN"));
        assert_eq!((quick, slow), (!torn, torn), "torn {torn}: {logs}");
        assert_eq!(w.entries(1, 1, 6).unwrap(), ents(1, 5, 1, 100));
        // Intact, the file went back to the free files, and the new segment
        // (the same number) was started on it.
        let st = w.status();
        assert_eq!(st.recycled_segments, !torn as u64, "torn {torn}: {st:?}");
    }
}

/// The reuse tests' store: small segments, a rewrite past four of them, at
/// most three files kept for reuse.
fn reuse_cfg(dir: &Path) -> WalConfig {
    let mut c = cfg(dir);
    c.segments_soft_max = 4;
    c.segments_recycle_max = 3;
    c
}

/// One round of the reuse tests: ten 4000-byte entries for group 1, synced,
/// and the group compacted up to two entries behind its end.
fn reuse_round(w: &mut Wal, last: &mut u64) {
    let lo = *last + 1;
    *last += 10;
    w.append(1, &ents(lo, *last, 1, 4000)).unwrap();
    w.compact(1, *last - 2, 1).unwrap();
    w.sync().unwrap();
}

/// Purged segments become free files that later segments reuse (no new file
/// to preallocate or zero-fill); at open, free files of another size and
/// those over `segments_recycle_max` are deleted. Every entry written
/// through reused files reads back after a crash (no seal) and a reopen.
#[test]
fn purged_segments_are_reused_and_read_back_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let c = reuse_cfg(tmp.path());
    let mut w = Wal::open(c.clone()).unwrap();
    let mut last = 0;
    // One group that compacts behind itself: the cold-group rewrite moves
    // it forward and old segments are purged, again and again.
    for round in 0..60u64 {
        reuse_round(&mut w, &mut last);
        assert!(w.status().free_segments <= 3, "round {round}");
    }
    let st = w.status();
    assert!(st.purged_segments > 0 && st.recycled_segments > 0, "{st:?}");
    // The next segment's file is renamed ahead, off the writer's thread:
    // a segment file past the active one, not in the free pool.
    assert!(st.next_segment_ahead, "{st:?}");
    let ahead = tmp
        .path()
        .join(format!("{:020}.wal", st.active_segment + 1));
    assert!(ahead.exists(), "{st:?}");
    let free_files = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .ends_with(".walfree")
            })
            .count()
    };
    assert_eq!(free_files(), st.free_segments);
    w.close_unsealed();
    // Next to the pool: a free file of another size, one named after a
    // segment still to come, and two more of the right size (together more
    // than the limit).
    let short = tmp.path().join(format!("free-{:020}.walfree", 2));
    std::fs::write(&short, b"short").unwrap();
    let future = tmp.path().join(format!("free-{:020}.walfree", 9999));
    std::fs::File::create(&future)
        .unwrap()
        .set_len(c.log_segment_bytes_max)
        .unwrap();
    for seq in [0u64, 1] {
        let f = std::fs::File::create(tmp.path().join(format!("free-{seq:020}.walfree"))).unwrap();
        f.set_len(c.log_segment_bytes_max).unwrap();
    }
    // The crash left the file renamed ahead as a trailing segment whose
    // first block is its `Reserved` mark. Past that block, a valid record of
    // the segment, as a later batch in flight with its lost first one would
    // leave: the mark alone proves nothing of the file was acknowledged.
    let next = st.active_segment + 1;
    let mut rec = Vec::new();
    format::encode(
        &mut rec,
        &format::RecordHeader::hard_state(
            1,
            HardState {
                term: 9,
                vote: 9,
                disk: 900 + 9,
            },
        )
        .in_batch(1, 0, 4),
        next,
        |_| {},
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ahead)
        .unwrap()
        .write_all_at(&rec, 4096)
        .unwrap();
    let (w, logs) = with_logs(|| Wal::open(c.clone()));
    let mut w = w.unwrap();
    assert!(!logs.contains("ERROR"), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("renamed ahead of a rotation")
                && l.contains(&*ahead.to_string_lossy())),
        "{logs}"
    );
    // Back to the free files as never started, not cut as a torn tail (the
    // active segment's tail is, as after every crash).
    let cut = w.status().truncated_at_open;
    assert!(cut.iter().all(|(p, _)| p != &ahead), "{cut:?}");
    // Under a free number no later purge can give another file: below the
    // oldest segment.
    let oldest = seq_of(&segments(tmp.path())[0]);
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(n) = name
            .strip_prefix("free-")
            .and_then(|n| n.strip_suffix(".walfree"))
        {
            assert!(n.parse::<u64>().unwrap() < oldest, "{name} {oldest}");
        }
    }
    assert_ne!(w.group_state(1).unwrap().hard_state.term, 9, "{logs}");
    assert!(!short.exists(), "a free file of another size is deleted");
    assert!(
        !future.exists(),
        "a free file named after a future segment is deleted"
    );
    // The pool: the free files, the one renamed ahead and the two of the
    // right size added, capped by the limit; the new first segment took one,
    // the one after it another (renamed ahead).
    let kept = (st.free_segments + 3).min(3) - 1;
    let now = w.status();
    assert_eq!(
        now.free_segments + now.next_segment_ahead as usize,
        kept,
        "{now:?}"
    );
    assert_eq!(free_files(), now.free_segments);
    let gs = w.group_state(1).unwrap();
    assert_eq!(gs.last_index, last);
    assert_eq!(
        w.entries(1, last - 1, last + 1).unwrap(),
        ents(last - 1, last, 1, 4000)
    );
    // And on through more reuse, then a clean close and open.
    for _ in 0..20u64 {
        reuse_round(&mut w, &mut last);
    }
    let st = w.status();
    assert!(st.recycled_segments > 0 && st.next_segment_ahead, "{st:?}");
    w.close().unwrap();
    // A clean close gives the file renamed ahead its free name back: no
    // segment past the sealed one, nothing for recovery to remove.
    assert_eq!(free_files(), st.free_segments + 1);
    assert_eq!(
        seq_of(segments(tmp.path()).last().unwrap()),
        st.active_segment
    );
    let (w, logs) = with_logs(|| Wal::open(c));
    let mut w = w.unwrap();
    assert!(!logs.contains("WARN"), "{logs}");
    assert_eq!(w.status().truncated_at_open, vec![]);
    assert_eq!(
        w.entries(1, last - 1, last + 1).unwrap(),
        ents(last - 1, last, 1, 4000)
    );
}

/// A rotation onto a reused file takes one a background thread already
/// renamed to the segment's name and made durable (`segments_taken_ahead`),
/// so the writer's thread does not sync the directory; every entry written
/// through such segments reads back after a reopen.
#[test]
fn the_next_segment_file_is_renamed_ahead_of_the_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let c = reuse_cfg(tmp.path());
    let mut w = Wal::open(c.clone()).unwrap();
    let mut last = 0;
    // Until segments are purged into the free pool.
    while w.status().recycled_segments == 0 {
        reuse_round(&mut w, &mut last);
        assert!(last < 2000, "no segment reused: {:?}", w.status());
    }
    // The thread renames and syncs in well under the pause given it here;
    // a few rotations allow for a loaded machine.
    let mut taken = 0;
    for _ in 0..200 {
        let st = w.status();
        if st.next_segment_ahead {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let before = st.active_segment;
        while w.status().active_segment == before {
            reuse_round(&mut w, &mut last);
        }
        taken = w.status().segments_taken_ahead;
        if taken >= 3 {
            break;
        }
    }
    assert!(taken >= 3, "{:?}", w.status());
    reuse_round(&mut w, &mut last);
    w.close().unwrap();
    let mut w = Wal::open(c).unwrap();
    assert_eq!(w.status().truncated_at_open, vec![]);
    assert_eq!(
        w.entries(1, last - 1, last + 1).unwrap(),
        ents(last - 1, last, 1, 4000)
    );
}

/// Recovery reads a segment in chunks of a few MiB, only as far as its
/// records go: records that straddle chunk boundaries, and one larger than
/// a chunk, must come back intact, and a torn tail or a flipped byte past
/// the first chunks must be handled exactly as in a small segment.
fn big_records_store(dir: &Path) -> (WalConfig, Vec<Entry>) {
    let mut c = WalConfig::new(dir);
    c.log_segment_bytes_max = 64 << 20;
    c.record_bytes_max = 8 << 20;
    c.batch_bytes_max = 8 << 20;
    let mut w = Wal::open(c.clone()).unwrap();
    // 300 KiB + 1 entries (unaligned to the chunks), then one of 6 MiB,
    // then more small ones: about 13 MiB of records in all.
    let mut all = ents(1, 20, 1, (300 << 10) + 1);
    all.extend(ents(21, 21, 1, 6 << 20));
    all.extend(ents(22, 40, 1, (100 << 10) + 7));
    for chunk in all.chunks(3) {
        w.append(7, chunk).unwrap();
        w.sync().unwrap();
    }
    w.close_unsealed();
    (c, all)
}

#[test]
fn records_across_read_chunks_recover_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, all) = big_records_store(tmp.path());
    let seg = segments(tmp.path()).pop().unwrap();
    assert!(
        data_end(&seg) > 12 << 20,
        "records span several read chunks"
    );
    // Unsealed (a crash) with a zero tail: every entry comes back.
    let mut w = Wal::open(c.clone()).unwrap();
    assert_eq!(w.entries(7, 1, 41).unwrap(), all);
    w.close().unwrap();
    // Sealed: the same again.
    let mut w = Wal::open(c).unwrap();
    assert_eq!(w.entries(7, 1, 41).unwrap(), all);
}

#[test]
fn a_torn_tail_past_the_first_read_chunks_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, all) = big_records_store(tmp.path());
    let seg = segments(tmp.path()).pop().unwrap();
    let end = data_end(&seg);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0x5a; 40], end as u64).unwrap();
    let (w, logs) = with_logs(|| Wal::open(c.clone()));
    let mut w = w.unwrap();
    assert!(logs.contains("torn"), "no warning: {logs}");
    assert_eq!(w.status().truncated_at_open, vec![(seg, end as u64)]);
    assert_eq!(w.entries(7, 1, 41).unwrap(), all);
}

#[test]
fn corruption_past_the_first_read_chunks_is_refused_at_its_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, _) = big_records_store(tmp.path());
    let seg = segments(tmp.path()).pop().unwrap();
    // A byte inside the 6 MiB entry (data of index 21: bytes of value 21),
    // whose record starts past the first 4 MiB chunk; valid records follow.
    let (start, len, kind) = records(&seg)
        .into_iter()
        .find(|(_, len, _)| *len > 6 << 20)
        .expect("the 6 MiB entry's record");
    assert_eq!(kind, RecordKind::Entries);
    assert!(start > 4 << 20, "record starts at {start}");
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xee], (start + len / 2) as u64).unwrap();
    match Wal::open(c).err().expect("must refuse") {
        Error::WalCorrupt { path, offset, .. } => {
            assert_eq!(path, seg);
            assert_eq!(offset, start as u64);
        }
        e => panic!("wrong error: {e}"),
    }
}

/// With direct-I/O batches, long spans of entries not in the cache are
/// read back with direct reads of the blocks around them (a group's whole
/// log after a restart), short ones buffered; with buffered batches all
/// reads are buffered. A flipped data byte is caught by the entry's crc on
/// either path.
fn read_back(direct_io: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = WalConfig::new(tmp.path());
    c.log_segment_bytes_max = 4 << 20;
    c.entry_cache_bytes_max = 0;
    c.direct_io = direct_io;
    let sizes = [1usize, 100, 4095, 4096, 4097, 70_000, 3];
    let mut want: Vec<Vec<Entry>> = vec![Vec::new(), Vec::new()];
    let mut w = Wal::open(c.clone()).unwrap();
    for round in 0..40u64 {
        for g in 0..2u64 {
            let index = round + 1;
            let size = sizes[(round + g) as usize % sizes.len()];
            let e = Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: Bytes::from(vec![(index * 7 + g) as u8; size]),
            };
            w.append(g, std::slice::from_ref(&e)).unwrap();
            want[g as usize].push(e);
        }
        w.sync().unwrap();
        // Read back while later batches keep coming.
        assert_eq!(w.entries(0, 1, round + 2).unwrap(), want[0]);
    }
    let st = w.status();
    assert!(st.read_bytes > 0);
    // Early reads are short spans (buffered), later ones long.
    if direct_io {
        assert!(st.read_bytes_direct > 0 && st.read_bytes_direct < st.read_bytes);
    } else {
        assert_eq!(st.read_bytes_direct, 0);
    }
    w.close().unwrap();
    let mut w = Wal::open(c.clone()).unwrap();
    for g in 0..2u64 {
        assert_eq!(w.entries(g, 1, 41).unwrap(), want[g as usize]);
    }
    // Each group's 40 entries span about 1 MiB of the segment: one read.
    let st = w.status();
    assert!(st.read_bytes > 256 << 10, "{}", st.read_bytes);
    assert_eq!(
        st.read_bytes_direct,
        if direct_io { st.read_bytes } else { 0 }
    );
    // Flip one data byte of group 1's 70,000-byte entry (bytes of value
    // index * 7 + 1) under the open store: reading it must fail on its crc.
    let index = want[1]
        .iter()
        .find(|e| e.data.len() == 70_000)
        .unwrap()
        .index;
    let value = (index * 7 + 1) as u8;
    let (seg, at) = segments(tmp.path())
        .into_iter()
        .find_map(|p| {
            let d = std::fs::read(&p).unwrap();
            let at = d
                .windows(70_000)
                .position(|w| w.iter().all(|b| *b == value))?;
            Some((p, at + 33_333))
        })
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xee], at as u64).unwrap();
    f.sync_all().unwrap();
    // The entry alone (a short span, buffered) and the group's whole log
    // (a long one, direct under direct I/O).
    for (lo, hi) in [(index, index + 1), (1, 41)] {
        match w.entries(1, lo, hi) {
            Err(Error::WalCorrupt { path, reason, .. }) => {
                assert_eq!(path, seg);
                assert!(reason.contains("entry data crc mismatch"), "{reason}");
            }
            other => panic!("flipped byte not caught reading {lo}..{hi}: {other:?}"),
        }
    }
}

#[test]
fn entries_are_read_back_with_direct_reads_under_direct_io() {
    read_back(true);
}

#[test]
fn entries_are_read_back_buffered_under_buffered_io() {
    read_back(false);
}
