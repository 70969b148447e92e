//! Recovery: read every segment in order, verify every record's crc, replay
//! the records into the index, and decide what a bad record means.
//!
//! Each segment is read and decoded once, into one buffer reused for all
//! of them: pass 1 keeps what each valid record says (its header, entry
//! table rows or restart point, never its data) and pass 2 replays that.
//! Reading every segment into a fresh allocation twice made a restart
//! mostly page faults and copies (docs/wal.md, "Restart").
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
//! - A last segment whose first block is still the `Reserved` mark of a
//!   file renamed ahead of a rotation (`segment::Adopter`) never had its
//!   first batch on the disk (that batch starts at offset 0 and covers the
//!   block), so nothing in it was acknowledged: it goes back to the free
//!   files without being read further. Anywhere else the mark is corruption.
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
use crate::wal::buf::AlignedBuf;
use crate::wal::format::{self, Decoded, RecordHeader, RecordKind, SegFormat, ALIGN, PREFIX_LEN};
use crate::wal::index::{group_at, EntryLoc, GroupIndex};
use crate::wal::segment::{self, io_err};

pub struct Segment {
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Descriptor batches are written through: `file`, or an `O_DIRECT`
    /// one for segments this session writes with direct I/O.
    pub wfile: Arc<File>,
    /// `O_DIRECT` descriptor large spans of entries are read through when
    /// the WAL writes with direct I/O (its segments are then not in the
    /// page cache, and direct reads of them ran 4x faster than buffered
    /// ones here; see `Wal::read`); `None` where the filesystem refuses
    /// `O_DIRECT` or the WAL writes buffered.
    pub rfile: Option<Arc<File>>,
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

/// `direct_reads`: give each segment an `O_DIRECT` descriptor for entry
/// reads ([`Segment::rfile`]); only a WAL writing with direct I/O uses one.
pub fn recover(dir_path: &Path, dir: &File, direct_reads: bool) -> Result<Recovered, Error> {
    recover_with(dir_path, dir, direct_reads, SCANNED_BYTES_MAX)
}

/// [`recover`] keeping at most `scanned_bytes_max` of pass 1's decoded
/// segments for pass 2.
fn recover_with(
    dir_path: &Path,
    dir: &File,
    direct_reads: bool,
    scanned_bytes_max: usize,
) -> Result<Recovered, Error> {
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
    let mut buf = SegmentBuf::default();
    while let Some(&seq) = seqs.last() {
        let path = dir_path.join(segment::file_name(seq));
        buf.start(&path, seq)?;
        // A free file renamed ahead to be this segment (`segment::Adopter`)
        // whose first block still holds its mark: the segment's first batch
        // never reached the disk, so nothing in it was acknowledged, and
        // whatever later blocks hold need not be read.
        if format::is_reserved(buf.record_at(&path, 0)?, seq) {
            // Back to the free pool rather than deleted (the next segment
            // would otherwise be zero-filled before the store opens), under
            // an unused free number below the oldest segment: below every
            // segment to come (see `Wal::free_files`), and never the number
            // of a segment purged later. Only its mark verifies as a record
            // of `seq`, and says what it says now.
            let below = if seqs.len() > 1 { seqs[0] } else { seq };
            let free = (below.saturating_sub(1024)..below)
                .rev()
                .map(|k| dir_path.join(segment::free_name(k)))
                .find(|f| !f.exists());
            tracing::info!(
                path = %path.display(),
                kept_as = ?free,
                "wal: the next segment's file was renamed ahead of a rotation that had not happened (nothing in it was written); back to the free files"
            );
            match &free {
                Some(f) => std::fs::rename(&path, f).map_err(|e| {
                    io_err("return reserved segment to the free files", &path, 0, e)
                })?,
                None => std::fs::remove_file(&path)
                    .map_err(|e| io_err("remove reserved segment", &path, 0, e))?,
            }
            segment::sync_dir(dir, dir_path)?;
            seqs.pop();
            continue;
        }
        // No valid start record, and nothing after it (in either format)
        // that could not have been in flight with the start record's batch:
        // nothing of this file was ever acknowledged. A recycled file whose
        // start record was not written yet looks like this too: its old
        // records carry another sequence number and do not verify.
        let empty = SegFormat::detect(buf.record_at(&path, 0)?, seq).is_none() && {
            let data = buf.load(&path, seq)?;
            [true, false]
                .into_iter()
                .all(|v4| check_tail_hole(data, 0, None, SegFormat { seq, v4 }).is_ok())
        };
        if !empty {
            break;
        }
        tracing::warn!(
            path = %path.display(),
            torn = buf.load(&path, seq)?.iter().any(|b| *b != 0),
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
    // Pass 1: decode every segment once, and note where each group's
    // history restarts (its latest compact or image record says), so pass 2
    // can skip its older records that survived in segments kept for other
    // groups (the purge rule in `index`). At the first error pass 1 stops
    // collecting restart points and leaves the error to pass 2, which meets
    // it first; segments after it are decoded by pass 2.
    let mut restarts = BTreeMap::new();
    let mut scanned: Vec<Option<Scanned>> = Vec::with_capacity(seqs.len());
    let mut kept_bytes = 0usize;
    for &seq in &seqs {
        let path = dir_path.join(segment::file_name(seq));
        let sc = scan(&path, seq, &mut buf)?;
        let ok = sc.note_restarts(seq, &mut restarts) && sc.end.is_ok();
        kept_bytes = kept_bytes.saturating_add(sc.mem_bytes());
        scanned.push((kept_bytes <= scanned_bytes_max).then_some(sc));
        if !ok {
            break;
        }
    }
    scanned.resize_with(seqs.len(), || None);
    for (i, &seq) in seqs.iter().enumerate() {
        let is_last = i + 1 == seqs.len();
        let path = dir_path.join(segment::file_name(seq));
        let sc = match scanned[i].take() {
            Some(sc) => sc,
            None => scan(&path, seq, &mut buf)?,
        };
        let Scanned { fmt, recs, end } = sc;
        for r in recs {
            let (at, group) = (r.span.0, r.header.group);
            r.apply(seq, &restarts, &mut out.groups)
                .map_err(|reason| corrupt(&path, at, format!("group {group}: {reason}")))?;
        }
        let (end, sealed, bad, last) = end?;
        if !sealed {
            let (off, reason) = bad.expect("an unsealed segment stops at a bad or zero record");
            if !is_last {
                return Err(corrupt(
                    &path,
                    off as u64,
                    format!("{reason}; the segment has no seal record but later segments exist"),
                ));
            }
            // Only the last segment gets here, and after a crash: the
            // records past the hole are checked in its bytes.
            let data = buf.load(&path, seq)?;
            let after = match check_tail_hole(data, off, last, fmt) {
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
        let rfile = if direct_reads {
            segment::open_direct(&path)?.map(Arc::new)
        } else {
            None
        };
        out.segments.insert(
            seq,
            Segment {
                rfile,
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

/// Segment bytes read at a time: a segment is read only as far as its
/// records go (a sealed or active segment is mostly preallocated space).
const READ_CHUNK_BYTES: usize = 4 << 20;
/// What pass 1 keeps of decoded segments for pass 2, at most (estimated
/// bytes, about 5% of a log of 4 KiB entries); segments past it are read
/// and decoded again by pass 2, so a log of any size recovers in bounded
/// memory besides its index.
const SCANNED_BYTES_MAX: usize = 256 << 20;

/// The bytes of one segment file at a time, read from its start only as
/// far as asked, in one allocation reused from segment to segment. Reads
/// are direct (`O_DIRECT`) where the filesystem allows: the WAL writes its
/// segments with direct I/O, so at a restart they are not in the page
/// cache, and 4 MiB direct reads ran 4x faster than buffered ones here
/// (docs/wal.md, "Restart"); the kernel writes back any dirty cached pages
/// of the range first, so buffered-mode segments read the same bytes.
#[derive(Default)]
struct SegmentBuf {
    data: AlignedBuf,
    /// The segment `data` holds the first bytes of, its file and length.
    open: Option<(u64, File, usize)>,
}

impl SegmentBuf {
    /// Starts on segment `seq` (keeps what is read if it holds it already).
    fn start(&mut self, path: &Path, seq: u64) -> Result<(), Error> {
        if self.open.as_ref().is_some_and(|(s, _, _)| *s == seq) {
            return Ok(());
        }
        self.open = None;
        self.data.clear();
        let f = match segment::open_direct(path)? {
            Some(f) => f,
            // The filesystem refuses O_DIRECT (tmpfs on older kernels).
            None => File::open(path).map_err(|e| io_err("open segment", path, 0, e))?,
        };
        let len = f
            .metadata()
            .map_err(|e| io_err("stat segment", path, 0, e))?
            .len() as usize;
        self.open = Some((seq, f, len));
        Ok(())
    }

    /// At least the first `n` bytes of the segment (all of it if shorter),
    /// read [`READ_CHUNK_BYTES`] or more at a time.
    fn upto(&mut self, path: &Path, n: usize) -> Result<&[u8], Error> {
        let (_, f, len) = self.open.as_ref().expect("SegmentBuf::start first");
        let (at, len) = (self.data.len(), *len);
        if at < n.min(len) {
            let upto = n.max(at + READ_CHUNK_BYTES).min(len);
            segment::read_blocks(
                f,
                path,
                "read segment",
                &mut self.data,
                0,
                upto as u64,
                len as u64,
            )?;
        }
        Ok(&self.data)
    }

    /// The whole segment `seq`.
    fn load(&mut self, path: &Path, seq: u64) -> Result<&[u8], Error> {
        self.start(path, seq)?;
        self.upto(path, usize::MAX)
    }

    /// Segment bytes up to the end of the record at `off`, as far as its
    /// prefix tells (a corrupt length reads at most the rest of the file).
    fn record_at(&mut self, path: &Path, off: usize) -> Result<&[u8], Error> {
        let data = self.upto(path, off.saturating_add(PREFIX_LEN))?;
        let Some(prefix) = data.get(off..off + PREFIX_LEN) else {
            return Ok(&self.data);
        };
        let u32_at =
            |i: usize| u32::from_le_bytes(prefix[i..i + 4].try_into().expect("4 bytes")) as usize;
        let end = off.saturating_add(format::pad(
            PREFIX_LEN + u32_at(8).saturating_add(u32_at(12)),
        ));
        self.upto(path, end)
    }
}

/// What pass 1 keeps of one valid record: everything replay needs, not the
/// entries' data.
struct Rec {
    /// Where the record lies in its segment (start, end).
    span: (u64, u64),
    /// File offset of its payload.
    payload_at: u64,
    header: RecordHeader,
    body: Body,
}

/// The part of a record's payload that replay uses, parsed once. A parse
/// error is kept and reported only if pass 2 replays the record (a record
/// before its group's restart point is skipped whatever it holds).
enum Body {
    /// `Entries` and `GroupImage`: the entry table.
    Rows(Result<Vec<format::EntryRow>, String>),
    /// `Compact`: the restart point (`format::parse_restart`).
    Restart(Result<Option<Option<(u64, u64)>>, String>),
    Empty,
}

/// One segment, decoded once.
struct Scanned {
    fmt: SegFormat,
    /// Its valid records in order, up to the seal, a bad or zero record, or
    /// the record that made `end` an error.
    recs: Vec<Rec>,
    /// How the segment ended, or the corruption that stopped the decode
    /// (raised by pass 2 after replaying `recs`).
    end: Result<SegmentEnd, Error>,
}

impl Scanned {
    /// Memory held by the decoded records (estimate).
    fn mem_bytes(&self) -> usize {
        let rows: usize = self
            .recs
            .iter()
            .map(|r| match &r.body {
                Body::Rows(Ok(v)) => v.capacity() * std::mem::size_of::<format::EntryRow>(),
                _ => 0,
            })
            .sum();
        self.recs.capacity() * std::mem::size_of::<Rec>() + rows
    }

    /// Pass 1: notes each group's latest restart point in this segment.
    /// False at a malformed restart point (pass 2 reports it).
    fn note_restarts(&self, seq: u64, restarts: &mut BTreeMap<GroupId, (u64, u64)>) -> bool {
        for r in &self.recs {
            let g = r.header.group;
            match (r.header.kind(), &r.body) {
                (RecordKind::Compact, Body::Restart(Ok(Some(at)))) => {
                    restarts.insert(g, at.unwrap_or((seq, r.span.0)));
                }
                (RecordKind::Compact, Body::Restart(Err(_))) => return false,
                (RecordKind::GroupImage, _) => {
                    restarts.insert(g, (seq, r.span.0));
                }
                (RecordKind::RemoveGroup, _) => {
                    restarts.remove(&g);
                }
                _ => {}
            }
        }
        true
    }
}

impl Rec {
    /// Pass 2: applies the record to the index, unless it lies before its
    /// group's restart point.
    fn apply(
        self,
        seq: u64,
        restarts: &BTreeMap<GroupId, (u64, u64)>,
        groups: &mut BTreeMap<GroupId, GroupIndex>,
    ) -> Result<(), String> {
        let h = &self.header;
        let skippable = matches!(
            h.kind(),
            RecordKind::Entries | RecordKind::Compact | RecordKind::GroupImage
        );
        let end = self.span.1;
        let before = |&(s, o): &(u64, u64)| seq < s || (seq == s && end <= o);
        if skippable && restarts.get(&h.group).is_some_and(before) {
            return Ok(());
        }
        apply(seq, self.payload_at, h, self.body, groups)
    }
}

/// (end of the valid records, sealed?, the bad or zero record (offset,
/// reason) that stopped an unsealed segment, (batch, window) of the last
/// valid record).
type SegmentEnd = (usize, bool, Option<(usize, String)>, Option<(u64, u16)>);

/// Reads segment `seq` (into `buf`, unless it holds it) and decodes it: every record's crc is
/// verified here, once.
fn scan(path: &Path, seq: u64, buf: &mut SegmentBuf) -> Result<Scanned, Error> {
    buf.start(path, seq)?;
    let fmt = SegFormat::detect(buf.record_at(path, 0)?, seq).unwrap_or(SegFormat::current(seq));
    let mut recs = Vec::new();
    let end = decode_segment(path, fmt, buf, &mut recs)?;
    Ok(Scanned { fmt, recs, end })
}

/// Decodes one segment's records into `recs` up to its end, reading it as
/// far as they go. The outer error is a failed read; the inner one the
/// corruption that stopped the decode.
fn decode_segment(
    path: &Path,
    fmt: SegFormat,
    buf: &mut SegmentBuf,
    recs: &mut Vec<Rec>,
) -> Result<Result<SegmentEnd, Error>, Error> {
    let seq = fmt.seq;
    let mut off = 0usize;
    let mut last = None;
    Ok(loop {
        let data = buf.record_at(path, off)?;
        match format::decode_at(data, off, fmt) {
            Decoded::Record {
                header,
                payload_off,
                payload,
                len,
            } => {
                let kind = header.kind();
                if last.is_some_and(|(b, _)| header.batch < b) {
                    break Err(corrupt(
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
                    break Err(corrupt(
                        path,
                        0,
                        format!(
                            "segment does not begin with its start record (kind {kind:?}, seq {})",
                            header.aux
                        ),
                    ));
                }
                if off != 0 && kind == RecordKind::SegmentStart {
                    break Err(corrupt(path, off as u64, "second segment start record"));
                }
                if kind == RecordKind::Reserved {
                    // Only ever at offset 0 of a file not started yet (which
                    // the check above refuses, and `recover` removes when it
                    // is the last).
                    break Err(corrupt(
                        path,
                        off as u64,
                        "reserved-file record inside a segment",
                    ));
                }
                if kind == RecordKind::Seal {
                    if header.aux != seq {
                        break Err(corrupt(
                            path,
                            off as u64,
                            format!("seal record names segment {}", header.aux),
                        ));
                    }
                    break Ok((off + len, true, None, last));
                }
                if kind == RecordKind::SegmentStart || kind == RecordKind::Pad {
                    off += len;
                    continue;
                }
                let body = match kind {
                    RecordKind::Entries | RecordKind::GroupImage => {
                        Body::Rows(format::parse_entries(&header, payload))
                    }
                    RecordKind::Compact => Body::Restart(format::parse_restart(payload)),
                    _ => Body::Empty,
                };
                recs.push(Rec {
                    span: (off as u64, (off + len) as u64),
                    payload_at: (off + payload_off) as u64,
                    header,
                    body,
                });
                off += len;
            }
            Decoded::Zero => {
                break Ok((
                    off,
                    false,
                    Some((off, "zero-filled or unwritten space".into())),
                    last,
                ))
            }
            Decoded::Bad(reason) => break Ok((off, false, Some((off, reason)), last)),
        }
    })
}

/// Applies one valid record to the index; `payload_at` is the payload's
/// file offset.
fn apply(
    seq: u64,
    payload_at: u64,
    h: &RecordHeader,
    body: Body,
    groups: &mut BTreeMap<GroupId, GroupIndex>,
) -> Result<(), String> {
    let kind = h.kind();
    let rows = |body: Body| match body {
        Body::Rows(r) => r,
        _ => unreachable!("{kind:?} records are decoded with their entry table"),
    };
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
    match kind {
        RecordKind::Entries => {
            let rows = rows(body)?;
            group_at(groups, h.group, (seq, payload_at)).append(h.first_index, locs(&rows));
        }
        RecordKind::GroupImage => {
            let rows = rows(body)?;
            let hs = HardState {
                term: h.last_term,
                vote: h.aux,
                disk: 0,
            };
            let mut g = GroupIndex::image((seq, payload_at), hs, (h.first_index, h.first_term));
            g.entries.extend(locs(&rows));
            groups.insert(h.group, g);
        }
        RecordKind::HardState => {
            let hs = HardState {
                term: h.first_term,
                vote: h.aux,
                disk: h.last_index,
            };
            group_at(groups, h.group, (seq, payload_at)).set_hard_state(hs, seq);
        }
        RecordKind::Compact => {
            if let Body::Restart(Err(e)) = body {
                return Err(e);
            }
            group_at(groups, h.group, (seq, payload_at)).compact(h.first_index, h.first_term);
        }
        RecordKind::RemoveGroup => {
            groups.remove(&h.group);
        }
        RecordKind::SegmentStart | RecordKind::Seal | RecordKind::Pad | RecordKind::Reserved => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{Entry, EntryKind};
    use crate::storage::LogStore;
    use crate::wal::{Wal, WalConfig};

    /// A sealed 64 MiB segment holding a few KiB of records is read one
    /// chunk far, not to its preallocated end; reading it whole is asked
    /// for only where the bytes after a hole must be checked.
    #[test]
    fn a_segment_is_read_only_as_far_as_its_records_go() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(tmp.path());
        cfg.log_segment_bytes_max = 64 << 20;
        let mut w = Wal::open(cfg.clone()).unwrap();
        let e: Vec<Entry> = (1..=10)
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: bytes::Bytes::from(vec![index as u8; 1000]),
            })
            .collect();
        w.append(3, &e).unwrap();
        w.sync().unwrap();
        w.close().unwrap();
        let path = tmp.path().join(segment::file_name(1));
        let file_len = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(file_len >= 64 << 20, "segment preallocated: {file_len}");

        let mut buf = SegmentBuf::default();
        let sc = scan(&path, 1, &mut buf).unwrap();
        let (end, sealed, bad, _) = sc.end.unwrap();
        assert!(sealed && bad.is_none());
        assert_eq!(sc.recs.len(), 1, "one entries record");
        assert!(end < 64 << 10, "records end at {end}");
        assert_eq!(buf.data.len(), READ_CHUNK_BYTES, "one chunk read");
        // The same segment again: nothing is read twice.
        assert_eq!(buf.upto(&path, end).unwrap().len(), READ_CHUNK_BYTES);
        assert_eq!(buf.load(&path, 1).unwrap().len(), file_len);
        // And recovery as a whole still finds the group.
        let mut w = Wal::open(cfg).unwrap();
        assert_eq!(w.entries(3, 1, 11).unwrap(), e);
    }

    /// Past its memory budget pass 1 drops what it decoded and pass 2
    /// decodes those segments again: the index rebuilt is the same.
    #[test]
    fn segments_over_the_pass_1_budget_are_decoded_again_to_the_same_index() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(tmp.path());
        cfg.log_segment_bytes_max = 256 << 10;
        cfg.record_bytes_max = 32 << 10;
        let mut w = Wal::open(cfg.clone()).unwrap();
        let mut next = [1u64; 4];
        for round in 0..60u64 {
            for g in 0..4u64 {
                let lo = next[g as usize];
                let e: Vec<Entry> = (lo..lo + 5)
                    .map(|index| Entry {
                        index,
                        term: 1 + round / 20,
                        kind: EntryKind::Normal,
                        data: bytes::Bytes::from(vec![(index + g) as u8; 900]),
                    })
                    .collect();
                w.append(g, &e).unwrap();
                next[g as usize] = lo + 5;
                // Groups 0 and 1 compact as they go (restart points);
                // group 3 is removed once and comes back.
                if g < 2 && round % 7 == 6 {
                    w.compact(g, lo + 2, 1 + round / 20).unwrap();
                }
            }
            if round == 30 {
                w.remove_group(3).unwrap();
                next[3] = 1;
            }
            w.sync().unwrap();
        }
        w.close().unwrap();
        let dir = File::open(tmp.path()).unwrap();
        let kept = recover_with(tmp.path(), &dir, true, usize::MAX).unwrap();
        let again = recover_with(tmp.path(), &dir, true, 0).unwrap();
        assert!(kept.segments.len() > 3, "{} segments", kept.segments.len());
        assert_eq!(format!("{:?}", kept.groups), format!("{:?}", again.groups));
        assert_eq!(kept.next_seq, again.next_seq);
        assert!(kept.groups.get(&0).is_some_and(|g| g.compacted_index > 0));
        assert_eq!(kept.groups.len(), 4);
        assert!(kept.segments.values().all(|s| s.rfile.is_some()));
        let buffered = recover_with(tmp.path(), &dir, false, usize::MAX).unwrap();
        assert!(buffered.segments.values().all(|s| s.rfile.is_none()));
    }
}
