//! Recovery: read every segment in order, verify every record's crc, replay
//! the records into the index, and decide what a bad record means.
//!
//! - Segments must be numbered without gaps (purge deletes oldest first and
//!   syncs the directory); a gap means a lost file.
//! - Every segment but the last must end with its seal record: the writer
//!   syncs a segment's seal before it writes anything to the next one.
//! - In the last segment, a bad or zero record (a hole) is the torn tail of
//!   a crash when every valid record after it (scanning on at every 8-byte
//!   boundary) can belong to a batch that was in flight, unacknowledged,
//!   together with the hole's batch. The writer keeps up to `window`
//!   batches on the disk, completing in any order, so later batches may
//!   have landed while the hole's did not. The hole lies in batch `lo` or
//!   `lo + 1`, `lo` being the batch of the last valid record before it (in
//!   batch 0 if there is none); a record after it is unacknowledged tail
//!   only if
//!   - its batch is in `lo..=lo + window` (`..window` without `lo`): the
//!     window of batches that could be in flight with the hole's, and
//!   - its `acked` stamp is at most `lo + 1` (`0` without `lo`): when it was
//!     written, the hole's batch was not yet known durable.
//!
//!   Then everything from the hole on is unacknowledged: it is cut off with
//!   a `warn!` and the segment sealed, so it can never later look like
//!   corruption in the middle of the log.
//! - Anything else — a bad record followed by a valid one that does not
//!   pass both checks, or a hole in any segment but the last — is
//!   corruption: recovery refuses with an error naming the file and offset.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::core::types::{GroupId, HardState};
use crate::error::Error;
use crate::wal::format::{self, Decoded, RecordHeader, RecordKind, SegFormat, ALIGN, PREFIX_LEN};
use crate::wal::index::{group_at, EntryLoc, GroupIndex};
use crate::wal::segment::{self, io_err};

pub struct Segment {
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Descriptor batches are written through: `file`, or an `O_DIRECT`
    /// one for segments this session writes with direct I/O.
    pub wfile: Arc<File>,
    /// Bytes the file occupies (preallocated length for the active one).
    pub len: u64,
    /// Written with format version 4 (sequence number in every crc), so the
    /// file may be recycled once purged: records of its old life cannot
    /// verify in a new one.
    pub v4: bool,
}

pub struct Recovered {
    pub groups: BTreeMap<GroupId, GroupIndex>,
    pub segments: BTreeMap<u64, Segment>,
    /// Sequence number for the next segment.
    pub next_seq: u64,
    /// Torn tails that were cut (file, offset), for tests and status.
    pub truncated: Vec<(PathBuf, u64)>,
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::WalCorrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

pub fn recover(dir_path: &Path, dir: &File) -> Result<Recovered, Error> {
    let mut seqs = Vec::new();
    let rd = std::fs::read_dir(dir_path).map_err(|e| io_err("list directory", dir_path, 0, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| io_err("list directory", dir_path, 0, e))?;
        if let Some(seq) = ent.file_name().to_str().and_then(segment::parse_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    for w in seqs.windows(2) {
        if w[1] != w[0] + 1 {
            return Err(corrupt(
                &dir_path.join(segment::file_name(w[0] + 1)),
                0,
                format!(
                    "segment file missing: sequence jumps from {} to {}",
                    w[0], w[1]
                ),
            ));
        }
    }
    // Segments are created (preallocated, zero) when the writer rotates,
    // possibly several batches before their first record is written; a
    // crash can leave any number of such empty files at the end. Nothing
    // was ever acknowledged from them.
    let mut truncated = Vec::new();
    while let Some(&seq) = seqs.last() {
        let path = dir_path.join(segment::file_name(seq));
        let data = std::fs::read(&path).map_err(|e| io_err("read segment", &path, 0, e))?;
        // No valid start record, and nothing after it (in either format)
        // that could not have been in flight with the start record's batch:
        // nothing of this file was ever acknowledged. A recycled file whose
        // start record was not written yet looks like this too: its old
        // records carry another sequence number and do not verify.
        let empty = SegFormat::detect(&data, seq).is_none()
            && [true, false]
                .into_iter()
                .all(|v4| check_tail_hole(&data, 0, None, SegFormat { seq, v4 }).is_ok());
        if !empty {
            break;
        }
        tracing::warn!(
            path = %path.display(),
            torn = data.iter().any(|b| *b != 0),
            "wal: removing a trailing segment without a valid start record (created or half-written just before a crash; nothing in it was acknowledged)"
        );
        std::fs::remove_file(&path).map_err(|e| io_err("remove empty segment", &path, 0, e))?;
        segment::sync_dir(dir, dir_path)?;
        truncated.push((path, 0));
        seqs.pop();
    }
    let mut out = Recovered {
        groups: BTreeMap::new(),
        segments: BTreeMap::new(),
        next_seq: seqs.last().map_or(1, |s| s + 1),
        truncated,
    };
    // Pass 1: where each group's history restarts (its latest compact or
    // image record says), so pass 2 can skip its older records that
    // survived in segments kept for other groups (the purge rule in
    // `index`). Errors are left to pass 2, which meets them first.
    let mut restarts = BTreeMap::new();
    for &seq in &seqs {
        let path = dir_path.join(segment::file_name(seq));
        let data = std::fs::read(&path).map_err(|e| io_err("read segment", &path, 0, e))?;
        let fmt = SegFormat::detect(&data, seq).unwrap_or(SegFormat::current(seq));
        let mut r = Replay::Restarts(&mut restarts);
        if replay_segment(&path, fmt, &data, &mut r).is_err() {
            break;
        }
    }
    for (i, &seq) in seqs.iter().enumerate() {
        let is_last = i + 1 == seqs.len();
        let path = dir_path.join(segment::file_name(seq));
        let data = std::fs::read(&path).map_err(|e| io_err("read segment", &path, 0, e))?;
        let fmt = SegFormat::detect(&data, seq).unwrap_or(SegFormat::current(seq));
        let mut r = Replay::Apply {
            groups: &mut out.groups,
            restarts: &restarts,
        };
        let (end, sealed, bad, last) = replay_segment(&path, fmt, &data, &mut r)?;
        if !sealed {
            let (off, reason) = bad.expect("an unsealed segment stops at a bad or zero record");
            if !is_last {
                return Err(corrupt(
                    &path,
                    off as u64,
                    format!("{reason}; the segment has no seal record but later segments exist"),
                ));
            }
            let after = match check_tail_hole(&data, off, last, fmt) {
                Ok(n) => n,
                Err(why) => {
                    return Err(corrupt(&path, off as u64, format!("{reason}; {why}")));
                }
            };
            let nonzero = data[off..].iter().any(|b| *b != 0);
            tracing::warn!(
                path = %path.display(),
                offset = off,
                bytes = data.len() - off,
                torn = nonzero,
                valid_records_after_hole = after,
                reason = %reason,
                "wal: truncating the torn or zero-filled tail of the last segment (unacknowledged writes of a crash)"
            );
            out.truncated.push((path.clone(), off as u64));
            assert!(
                end > 0,
                "segments without a valid start record were removed above"
            );
            seal_at(&path, fmt, end as u64)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open segment", &path, 0, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err("stat segment", &path, 0, e))?
            .len();
        let file = Arc::new(file);
        out.segments.insert(
            seq,
            Segment {
                path,
                wfile: file.clone(),
                file,
                len,
                v4: fmt.v4,
            },
        );
    }
    for (g, gi) in out.groups.iter_mut() {
        if gi.prefix_unknown {
            return Err(corrupt(
                dir_path,
                0,
                format!(
                    "group {g}: its log restarts at index {} but no compact record gives the term before it (records of the group are missing)",
                    gi.compacted_index + 1
                ),
            ));
        }
        if let Some(&at) = restarts.get(g) {
            gi.replay_from = at;
        }
    }
    Ok(out)
}

/// What replaying a segment does with each record.
enum Replay<'a> {
    /// Pass 1: note each group's latest restart point.
    Restarts(&'a mut BTreeMap<GroupId, (u64, u64)>),
    /// Pass 2: apply the records to the index, skipping a group's records
    /// before its restart point.
    Apply {
        groups: &'a mut BTreeMap<GroupId, GroupIndex>,
        restarts: &'a BTreeMap<GroupId, (u64, u64)>,
    },
}

impl Replay<'_> {
    /// One valid record of segment `seq` at `off..end`, payload at
    /// `payload_at`.
    fn record(
        &mut self,
        seq: u64,
        (off, end): (u64, u64),
        payload_at: u64,
        h: &RecordHeader,
        payload: &[u8],
    ) -> Result<(), String> {
        match self {
            Replay::Restarts(restarts) => {
                match h.kind() {
                    RecordKind::Compact => {
                        if let Some(at) = format::parse_restart(payload)? {
                            restarts.insert(h.group, at.unwrap_or((seq, off)));
                        }
                    }
                    RecordKind::GroupImage => {
                        restarts.insert(h.group, (seq, off));
                    }
                    RecordKind::RemoveGroup => {
                        restarts.remove(&h.group);
                    }
                    _ => {}
                }
                Ok(())
            }
            Replay::Apply { groups, restarts } => {
                let skippable = matches!(
                    h.kind(),
                    RecordKind::Entries | RecordKind::Compact | RecordKind::GroupImage
                );
                let before = |&(s, o): &(u64, u64)| seq < s || (seq == s && end <= o);
                if skippable && restarts.get(&h.group).is_some_and(before) {
                    return Ok(());
                }
                apply(seq, payload_at, h, payload, groups)
            }
        }
    }
}

/// (end of the valid records, sealed?, the bad or zero record (offset,
/// reason) that stopped an unsealed segment, (batch, window) of the last
/// valid record).
type SegmentEnd = (usize, bool, Option<(usize, String)>, Option<(u64, u16)>);

/// Replays one segment.
fn replay_segment(
    path: &Path,
    fmt: SegFormat,
    data: &[u8],
    replay: &mut Replay,
) -> Result<SegmentEnd, Error> {
    let seq = fmt.seq;
    let mut off = 0usize;
    let mut last = None;
    loop {
        match format::decode_at(data, off, fmt) {
            Decoded::Record {
                header,
                payload_off,
                payload,
                len,
            } => {
                let kind = header.kind();
                if last.is_some_and(|(b, _)| header.batch < b) {
                    return Err(corrupt(
                        path,
                        off as u64,
                        format!(
                            "batch number {} goes back (previous record: batch {})",
                            header.batch,
                            last.unwrap_or_default().0
                        ),
                    ));
                }
                last = Some((header.batch, header.window));
                if off == 0 && (kind != RecordKind::SegmentStart || header.aux != seq) {
                    return Err(corrupt(
                        path,
                        0,
                        format!(
                            "segment does not begin with its start record (kind {kind:?}, seq {})",
                            header.aux
                        ),
                    ));
                }
                if off != 0 && kind == RecordKind::SegmentStart {
                    return Err(corrupt(path, off as u64, "second segment start record"));
                }
                if kind == RecordKind::Seal {
                    if header.aux != seq {
                        return Err(corrupt(
                            path,
                            off as u64,
                            format!("seal record names segment {}", header.aux),
                        ));
                    }
                    return Ok((off + len, true, None, last));
                }
                if kind == RecordKind::SegmentStart || kind == RecordKind::Pad {
                    off += len;
                    continue;
                }
                let span = (off as u64, (off + len) as u64);
                let payload_at = (off + payload_off) as u64;
                replay
                    .record(seq, span, payload_at, &header, payload)
                    .map_err(|reason| {
                        corrupt(
                            path,
                            off as u64,
                            format!("group {}: {reason}", header.group),
                        )
                    })?;
                off += len;
            }
            Decoded::Zero => {
                return Ok((
                    off,
                    false,
                    Some((off, "zero-filled or unwritten space".into())),
                    last,
                ))
            }
            Decoded::Bad(reason) => return Ok((off, false, Some((off, reason)), last)),
        }
    }
}

/// Applies one valid record to the index; `payload_at` is the payload's
/// file offset.
fn apply(
    seq: u64,
    payload_at: u64,
    h: &RecordHeader,
    payload: &[u8],
    groups: &mut BTreeMap<GroupId, GroupIndex>,
) -> Result<(), String> {
    let locs = |rows: &[format::EntryRow]| -> Vec<EntryLoc> {
        rows.iter()
            .map(|r| EntryLoc {
                term: r.term,
                kind: r.kind,
                seg: seq,
                offset: payload_at + r.data_off as u64,
                len: r.len,
                crc: r.crc,
                cached: None,
            })
            .collect()
    };
    match h.kind() {
        RecordKind::Entries => {
            let rows = format::parse_entries(h, payload)?;
            group_at(groups, h.group, (seq, payload_at)).append(h.first_index, locs(&rows));
        }
        RecordKind::GroupImage => {
            let rows = format::parse_entries(h, payload)?;
            let hs = HardState {
                term: h.last_term,
                vote: h.aux,
            };
            let mut g = GroupIndex::image((seq, payload_at), hs, (h.first_index, h.first_term));
            g.entries.extend(locs(&rows));
            groups.insert(h.group, g);
        }
        RecordKind::HardState => {
            let hs = HardState {
                term: h.first_term,
                vote: h.aux,
            };
            group_at(groups, h.group, (seq, payload_at)).set_hard_state(hs, seq);
        }
        RecordKind::Compact => {
            format::parse_restart(payload)?;
            group_at(groups, h.group, (seq, payload_at)).compact(h.first_index, h.first_term);
        }
        RecordKind::RemoveGroup => {
            groups.remove(&h.group);
        }
        RecordKind::SegmentStart | RecordKind::Seal | RecordKind::Pad => {
            unreachable!("handled by the caller")
        }
    }
    Ok(())
}

/// Whether the hole at `off` of the last segment can be the tail of a crash:
/// every valid record after it may have been in flight, unacknowledged,
/// together with the hole's batch (see the module docs). `before` is the
/// (batch, window) of the last valid record before the hole, if any.
/// Returns how many valid records follow, or why one of them proves
/// corruption.
fn check_tail_hole(
    data: &[u8],
    off: usize,
    before: Option<(u64, u16)>,
    fmt: SegFormat,
) -> Result<usize, String> {
    let mut n = 0;
    let mut at = off;
    while let Some(next) = find_valid_after(data, at, fmt) {
        let Decoded::Record { header: h, len, .. } = format::decode_at(data, next, fmt) else {
            unreachable!("find_valid_after returns valid records")
        };
        let (lo, max_batch, max_acked) = match before {
            Some((lo, window)) => (lo, lo + window as u64, lo + 1),
            None => (0, h.window as u64 - 1, 0),
        };
        if h.batch < lo || h.batch > max_batch {
            return Err(format!(
                "a valid record follows at offset {next} in batch {}, outside the in-flight window {lo}..={max_batch} of the hole",
                h.batch
            ));
        }
        if h.acked > max_acked {
            return Err(format!(
                "a valid record follows at offset {next}, written when batches 0..{} were durable (the hole's batch among them)",
                h.acked
            ));
        }
        n += 1;
        at = next + len - ALIGN;
    }
    Ok(n)
}

/// Offset of the first valid record (of format `fmt`) after `off`, if any.
pub fn find_valid_after(data: &[u8], off: usize, fmt: SegFormat) -> Option<usize> {
    let magic = fmt.magic().to_le_bytes();
    let mut o = (off / ALIGN + 1) * ALIGN;
    while o + PREFIX_LEN <= data.len() {
        if data[o..o + 4] == magic {
            if let Decoded::Record { .. } = format::decode_at(data, o, fmt) {
                return Some(o);
            }
        }
        o += ALIGN;
    }
    None
}

/// Cuts the file at `end` and writes a seal record there (in the segment's
/// own format), durably.
fn seal_at(path: &Path, fmt: SegFormat, end: u64) -> Result<(), Error> {
    let seq = fmt.seq;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err("open segment", path, 0, e))?;
    file.set_len(end)
        .map_err(|e| io_err("truncate torn tail", path, end, e))?;
    let mut buf = Vec::new();
    // Batch numbers of a sealed tail are never checked again.
    let seal = RecordHeader::seal(seq).in_batch(u64::MAX, 0, 1);
    format::encode_as(&mut buf, &seal, fmt, |_| {});
    file.write_all_at(&buf, end)
        .map_err(|e| io_err("write seal", path, end, e))?;
    file.sync_all()
        .map_err(|e| io_err("fsync sealed segment", path, end, e))
}
