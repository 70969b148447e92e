//! On-disk record format of the WAL.
//!
//! A segment file is a sequence of records, each starting at an 8-byte
//! aligned offset:
//!
//! ```text
//! prefix (16 bytes, little endian, hand-encoded so it can be read before
//!         anything is trusted):
//!   magic u32 | crc32 u32 | header_len u32 | payload_len u32
//! header  (header_len bytes): rkyv archive of `RecordHeader`
//!         (format version, kind, group, index and term range, aux,
//!         batch number within the segment, batches of the segment already
//!         durable when it was encoded, writer's in-flight window)
//! payload (payload_len bytes): raw; for `Entries` records, per entry a
//!         24-byte table row (term u64, data_len u32, data_crc u32, kind u8,
//!         7 zero bytes) followed by the entry's data
//! zero padding to the next multiple of 8
//! ```
//!
//! The crc32 covers everything from `header_len` to the end of the payload,
//! so a record is either entirely valid or rejected. From format version 4
//! on (magic [`MAGIC`]) the crc also covers the segment's sequence number,
//! which is not stored in the record: segment files are recycled (a purged
//! file becomes a later segment, see `segment`), and a record left over from
//! a file's previous life then never verifies in its new one, so recovery
//! sees the end of the log where the new records end. Versions 2 and 3
//! (magic [`MAGIC_V3`], crc without the sequence number) are still read; a
//! segment holds records of one kind only, that of its start record. The per-entry data crc
//! lets a single entry be read back (for replication) and verified without
//! reading its whole record. The 8-byte alignment lets recovery scan forward
//! past a bad record to tell a torn tail (nothing valid follows) from
//! corruption in the middle (a valid record follows).
//!
//! Every record carries the number of the batch (one write + fdatasync)
//! it was written in, counted from 0 within its segment, how many batches
//! of the segment were already durable (acknowledged) when it was encoded,
//! and the writer's in-flight window `batches_in_flight_max`. Up to that
//! many batches are on the disk at once and may complete in any order, so
//! after a crash a later batch can be on disk while an earlier one is
//! missing; recovery uses the three numbers to tell such a hole at the tail
//! (unacknowledged batches within `window` of the last good record) from
//! corruption (see `recovery`). Version 2 added the three fields.
//!
//! With direct I/O every batch is written at a 4096-aligned offset with a
//! length that is a multiple of 4096: the writer ends each batch with a
//! `Pad` record up to that boundary, so the file holds no gap that is not a
//! valid record (a zero gap would look like a lost batch to recovery).
//!
//! A `Compact` record of version 5 carries a 16-byte payload: where the
//! group's history restarts (segment u64, byte offset u64, little endian;
//! both 0 = at this record), a byte inside the record holding the group's
//! first live entry after the compaction. Recovery ignores the group's
//! entries and compaction records before it (see `recovery` and the purge
//! rule in `index`). Version 4 compact records carry no payload.
//!
//! A free file taken ahead to be the next segment starts with a `Reserved`
//! record (kind 9, naming that segment) until the segment's first batch
//! overwrites it: recovery returns a last segment that still starts with it
//! to the free files without reading the rest (see `segment::Adopter` and `recovery`).
//!
//! Every segment starts with a `SegmentStart` record naming its sequence
//! number and ends with a `Seal` record once the writer moves on to the next
//! one (or closes cleanly): a segment other than the last that lacks its seal
//! lost data.

use rkyv::rancor;

use crate::core::types::{EntryKind, GroupId, HardState, Index, Term};
use crate::wal::buf::EncodeBuf;

/// Records of format versions 4 and 5: the crc covers the segment's
/// sequence number.
pub const MAGIC: u32 = 0xBD0A_11E8;
/// Records of format versions 2 and 3 (read, never written).
pub const MAGIC_V3: u32 = 0xBD0A_11E7;
/// Bumped on any incompatible change of the record layout. Version 5 gave
/// compact records the group's restart point; version 4 mixed the
/// segment's sequence number into the crc (recycled segment files);
/// version 3 added the `Pad` record kind (direct I/O); version 2 and 3
/// files are still read.
pub const FORMAT_VERSION: u16 = 5;
/// Oldest version read with [`MAGIC`] (5 added the compact record's
/// restart point; a version 4 binary refuses version 5 records).
const FORMAT_VERSION_V4: u16 = 4;
/// Newest version written with [`MAGIC_V3`].
const FORMAT_VERSION_V3: u16 = 3;
/// Oldest version recovery reads.
pub const FORMAT_VERSION_READ_MIN: u16 = 2;
/// Largest `batches_in_flight_max` a writer may use (and recovery accepts
/// in a record): bounds how far past a hole recovery may look.
pub const WINDOW_MAX: u16 = 64;
pub const PREFIX_LEN: usize = 16;
pub const ALIGN: usize = 8;
pub const ENTRY_ROW_LEN: usize = 24;
/// Payload of a version 5 `Compact` record (see the module docs).
pub const RESTART_LEN: usize = 16;

/// The restart point in a `Compact` record's payload: `Ok(None)` for a
/// version 4 record (no payload), `Ok(Some(None))` for "at this record".
pub fn parse_restart(payload: &[u8]) -> Result<Option<Option<(u64, u64)>>, String> {
    match payload.len() {
        0 => Ok(None),
        RESTART_LEN => {
            let seg = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
            let off = u64::from_le_bytes(payload[8..].try_into().expect("8 bytes"));
            Ok(Some((seg != 0).then_some((seg, off))))
        }
        n => Err(format!("compact record with a payload of {n} bytes")),
    }
}
/// Upper bound on one record's payload, whatever the configuration: a
/// corrupt length field can never make recovery allocate more than this.
pub const PAYLOAD_BYTES_MAX: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    SegmentStart = 1,
    Entries = 2,
    HardState = 3,
    Compact = 4,
    RemoveGroup = 5,
    Seal = 6,
    GroupImage = 7,
    Pad = 8,
    /// First record of a free file renamed ahead to be segment `aux`
    /// (`segment::Adopter`): until the segment's start record overwrites it,
    /// nothing in the file was written in this life.
    Reserved = 9,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::SegmentStart,
            2 => RecordKind::Entries,
            3 => RecordKind::HardState,
            4 => RecordKind::Compact,
            5 => RecordKind::RemoveGroup,
            6 => RecordKind::Seal,
            7 => RecordKind::GroupImage,
            8 => RecordKind::Pad,
            9 => RecordKind::Reserved,
            _ => return None,
        })
    }
}

/// The fixed-size record header, archived with rkyv. Field use by kind:
/// - `Entries`: `first_index..=last_index`, `first_term`/`last_term`.
/// - `HardState`: `first_term` = term, `aux` = vote, `last_index` = disk id
///   (0 in records written before disk ids existed).
/// - `Compact`: `first_index` = index, `first_term` = term.
/// - `SegmentStart`/`Seal`: `aux` = the segment's sequence number.
/// - `Pad`: no fields; its payload (ignored) fills a direct-I/O batch up to
///   the next 4096-byte boundary.
/// - `GroupImage` (the group's whole state, replacing whatever came before):
///   `first_index`/`first_term` = compaction point, `last_index` = last
///   entry, `last_term` = hard-state term, `aux` = vote; the payload is the
///   entry table of `first_index+1..=last_index`. The disk id is not in it:
///   a `HardState` record follows the image.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub version: u16,
    pub kind: u8,
    pub group: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub first_term: u64,
    pub last_term: u64,
    pub aux: u64,
    /// Batch number within the segment (the `SegmentStart` record is in
    /// batch 0); set by the writer when it encodes the record.
    pub batch: u64,
    /// Batches `0..acked` of the segment were durable when this record was
    /// encoded.
    pub acked: u64,
    /// The writer's `batches_in_flight_max`.
    pub window: u16,
}

impl RecordHeader {
    fn new(kind: RecordKind, group: GroupId) -> RecordHeader {
        RecordHeader {
            version: FORMAT_VERSION,
            kind: kind as u8,
            group,
            first_index: 0,
            last_index: 0,
            first_term: 0,
            last_term: 0,
            aux: 0,
            batch: 0,
            acked: 0,
            window: 1,
        }
    }

    /// The same header placed in batch `batch` of a writer with `window`,
    /// when batches `0..acked` are durable.
    pub fn in_batch(mut self, batch: u64, acked: u64, window: u16) -> RecordHeader {
        self.batch = batch;
        self.acked = acked;
        self.window = window;
        self
    }

    pub fn segment_start(seq: u64) -> RecordHeader {
        RecordHeader {
            aux: seq,
            ..RecordHeader::new(RecordKind::SegmentStart, 0)
        }
    }

    pub fn seal(seq: u64) -> RecordHeader {
        RecordHeader {
            aux: seq,
            ..RecordHeader::new(RecordKind::Seal, 0)
        }
    }

    pub fn hard_state(group: GroupId, hs: HardState) -> RecordHeader {
        RecordHeader {
            first_term: hs.term,
            aux: hs.vote,
            last_index: hs.disk,
            ..RecordHeader::new(RecordKind::HardState, group)
        }
    }

    pub fn compact(group: GroupId, index: Index, term: Term) -> RecordHeader {
        RecordHeader {
            first_index: index,
            first_term: term,
            ..RecordHeader::new(RecordKind::Compact, group)
        }
    }

    /// The payload of a `Compact` record: where the group's history
    /// restarts, `None` = at this record.
    pub fn restart_payload(at: Option<(u64, u64)>) -> [u8; RESTART_LEN] {
        let (seg, off) = at.unwrap_or((0, 0));
        let mut b = [0u8; RESTART_LEN];
        b[..8].copy_from_slice(&seg.to_le_bytes());
        b[8..].copy_from_slice(&off.to_le_bytes());
        b
    }

    pub fn reserved(seq: u64) -> RecordHeader {
        RecordHeader {
            aux: seq,
            ..RecordHeader::new(RecordKind::Reserved, 0)
        }
    }

    pub fn pad() -> RecordHeader {
        RecordHeader::new(RecordKind::Pad, 0)
    }

    pub fn remove(group: GroupId) -> RecordHeader {
        RecordHeader::new(RecordKind::RemoveGroup, group)
    }

    pub fn entries(group: GroupId, first: (Index, Term), last: (Index, Term)) -> RecordHeader {
        RecordHeader {
            first_index: first.0,
            first_term: first.1,
            last_index: last.0,
            last_term: last.1,
            ..RecordHeader::new(RecordKind::Entries, group)
        }
    }

    pub fn image(
        group: GroupId,
        compacted: (Index, Term),
        last: Index,
        hs: HardState,
    ) -> RecordHeader {
        RecordHeader {
            first_index: compacted.0,
            first_term: compacted.1,
            last_index: last,
            last_term: hs.term,
            aux: hs.vote,
            ..RecordHeader::new(RecordKind::GroupImage, group)
        }
    }

    pub fn kind(&self) -> RecordKind {
        RecordKind::from_u8(self.kind).expect("kind validated at decode")
    }
}

/// Length of the archived header; the same for every record of a version.
pub fn header_len() -> usize {
    static LEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LEN.get_or_init(|| serialize_header(&RecordHeader::segment_start(0)).len())
}

fn serialize_header(h: &RecordHeader) -> rkyv::util::AlignedVec {
    rkyv::to_bytes::<rancor::Error>(h).expect("serializing a plain struct cannot fail")
}

pub fn pad(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// Total on-disk size of a record with `payload_len` payload bytes.
pub fn record_len(payload_len: usize) -> usize {
    pad(PREFIX_LEN + header_len() + payload_len)
}

/// Payload length of an `Entries` record holding entries of these data sizes.
pub fn entries_payload_len(data_lens: impl Iterator<Item = usize>) -> usize {
    data_lens.map(|l| ENTRY_ROW_LEN + l).sum()
}

/// Which records a segment holds: its sequence number, and whether they are
/// of format 4 or later (crc over the sequence number too) or older.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegFormat {
    pub seq: u64,
    pub v4: bool,
}

impl SegFormat {
    /// What this writer writes into segment `seq`.
    pub fn current(seq: u64) -> SegFormat {
        SegFormat { seq, v4: true }
    }

    /// The magic every record of this segment starts with.
    pub fn magic(&self) -> u32 {
        if self.v4 {
            MAGIC
        } else {
            MAGIC_V3
        }
    }

    fn crc(&self, body: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if self.v4 {
            h.update(&self.seq.to_le_bytes());
        }
        h.update(body);
        h.finalize()
    }

    /// [`Self::crc`] of `head` followed by the bytes `tail` hashed.
    fn crc_then(&self, head: &[u8], tail: &crc32fast::Hasher) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if self.v4 {
            h.update(&self.seq.to_le_bytes());
        }
        h.update(head);
        h.combine(tail);
        h.finalize()
    }

    fn versions(&self) -> std::ops::RangeInclusive<u16> {
        if self.v4 {
            FORMAT_VERSION_V4..=FORMAT_VERSION
        } else {
            FORMAT_VERSION_READ_MIN..=FORMAT_VERSION_V3
        }
    }

    /// The format of segment `seq` as its first record shows, if that is a
    /// valid start record of either format.
    pub fn detect(data: &[u8], seq: u64) -> Option<SegFormat> {
        [true, false].into_iter().find_map(|v4| {
            let f = SegFormat { seq, v4 };
            match decode_at(data, 0, f) {
                Decoded::Record { header, .. } if header.kind == RecordKind::SegmentStart as u8 => {
                    Some(f)
                }
                _ => None,
            }
        })
    }
}

/// Appends one record of segment `seq` (format [`FORMAT_VERSION`]) to `buf`;
/// `payload` writes the payload bytes. Returns the offset of the payload
/// within `buf`.
pub fn encode<B: EncodeBuf>(
    buf: &mut B,
    h: &RecordHeader,
    seq: u64,
    payload: impl FnOnce(&mut B),
) -> usize {
    encode_as(buf, h, SegFormat::current(seq), payload)
}

/// [`encode`] for a payload whose crc the caller builds as it writes:
/// `payload` returns a hasher over exactly the bytes it appended. Entry
/// records combine the per-entry data crcs they compute anyway
/// (`crc32fast::Hasher::combine`), so the record crc costs no second pass
/// over large data (it was ~15% of the writer's CPU with 64 KiB entries).
pub fn encode_prehashed<B: EncodeBuf>(
    buf: &mut B,
    h: &RecordHeader,
    seq: u64,
    payload: impl FnOnce(&mut B) -> crc32fast::Hasher,
) -> usize {
    encode_inner(buf, h, SegFormat::current(seq), |b| Some(payload(b)))
}

/// [`encode`] in the given format (an older one only to seal a segment
/// written by an older version, and in tests).
#[doc(hidden)]
pub fn encode_as<B: EncodeBuf>(
    buf: &mut B,
    h: &RecordHeader,
    fmt: SegFormat,
    payload: impl FnOnce(&mut B),
) -> usize {
    encode_inner(buf, h, fmt, |b| {
        payload(b);
        None
    })
}

fn encode_inner<B: EncodeBuf>(
    buf: &mut B,
    h: &RecordHeader,
    fmt: SegFormat,
    payload: impl FnOnce(&mut B) -> Option<crc32fast::Hasher>,
) -> usize {
    let mut h = *h;
    h.version = if fmt.v4 {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_V3
    };
    let h = &h;
    let start = buf.len();
    debug_assert_eq!(start % ALIGN, 0, "records start aligned");
    buf.extend_from_slice(&[0u8; PREFIX_LEN]);
    let hb = serialize_header(h);
    debug_assert_eq!(hb.len(), header_len());
    buf.extend_from_slice(&hb);
    let payload_start = buf.len();
    let hashed = payload(buf);
    let payload_len = buf.len() - payload_start;
    assert!(
        payload_len <= PAYLOAD_BYTES_MAX,
        "record payload over the format limit"
    );
    buf[start..start + 4].copy_from_slice(&fmt.magic().to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&(hb.len() as u32).to_le_bytes());
    buf[start + 12..start + 16].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let crc = match hashed {
        None => fmt.crc(&buf[start + 8..]),
        Some(p) => {
            let crc = fmt.crc_then(&buf[start + 8..payload_start], &p);
            debug_assert_eq!(crc, fmt.crc(&buf[start + 8..]), "prehashed payload crc");
            crc
        }
    };
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.resize(start + pad(buf.len() - start), 0);
    payload_start - start
}

/// One `align`-byte block marking a file as segment `seq`'s before anything
/// of it is written: a `Reserved` record, padded. The first batch of the
/// segment starts at offset 0 and covers at least this block, so while the
/// block is intact the segment's first batch never reached the disk, and
/// nothing in the file was acknowledged ([`is_reserved`]).
pub fn reserved_block(seq: u64, align: usize) -> Vec<u8> {
    // Stamped as batch 0 of a window of 1: a reader that does not know the
    // kind (or finds the mark torn and the pad intact) takes the block for
    // an unacknowledged first batch, which is what it is.
    let stamp = |h: RecordHeader| h.in_batch(0, 0, 1);
    let mut b = Vec::with_capacity(align);
    encode(&mut b, &stamp(RecordHeader::reserved(seq)), seq, |_| {});
    let n = pad_len(b.len() as u64, align as u64) as usize;
    encode_pad(&mut b, &stamp(RecordHeader::pad()), seq, n);
    assert_eq!(b.len(), align, "a reserved block is one block");
    b
}

/// Whether `data` (a segment's bytes from offset 0) starts with a valid
/// `Reserved` record of segment `seq` (see [`reserved_block`]).
pub fn is_reserved(data: &[u8], seq: u64) -> bool {
    matches!(
        decode_at(data, 0, SegFormat::current(seq)),
        Decoded::Record { header, .. }
            if header.kind == RecordKind::Reserved as u8 && header.aux == seq
    )
}

/// Bytes of `Pad` records that bring a batch ending at (8-aligned) `end`
/// to a multiple of `align`: 0 if it is there already, else the gap, or the
/// gap plus `align` when the gap is smaller than the smallest record.
pub fn pad_len(end: u64, align: u64) -> u64 {
    let gap = end.next_multiple_of(align) - end;
    if gap == 0 || gap >= record_len(0) as u64 {
        gap
    } else {
        gap + align
    }
}

/// Appends `Pad` records (as header `h`, with its batch stamps) filling
/// exactly `len` bytes, a result of [`pad_len`]. One record when it fits
/// the format's payload limit, which any sane `align` does.
pub fn encode_pad<B: EncodeBuf>(buf: &mut B, h: &RecordHeader, seq: u64, len: usize) {
    debug_assert_eq!(h.kind, RecordKind::Pad as u8);
    if len == 0 {
        return;
    }
    let payload = len - PREFIX_LEN - header_len();
    assert!(
        len >= record_len(0) && len.is_multiple_of(ALIGN) && payload <= PAYLOAD_BYTES_MAX,
        "bad pad length {len}"
    );
    let start = buf.len();
    encode(buf, h, seq, |b| {
        let n = b.len();
        b.resize(n + payload, 0)
    });
    debug_assert_eq!(buf.len() - start, len);
}

/// Writes one entry's table row and data (`crc` = crc32 of `data`); the data
/// starts `ENTRY_ROW_LEN` bytes after the row.
pub fn encode_entry<B: EncodeBuf>(buf: &mut B, term: Term, kind: EntryKind, data: &[u8], crc: u32) {
    debug_assert_eq!(crc, crc32fast::hash(data));
    buf.extend_from_slice(&entry_row(term, kind, data.len(), crc));
    buf.extend_from_slice(data);
}

/// Data at least this long is added to a record's crc by combining its own
/// crc (`crc32fast::Hasher::combine`: a few hundred shift-and-xor steps
/// whatever the length) rather than by hashing it again. Below it, hashing
/// is cheaper: a profile of the 3-replica NBD cell showed `combine` costing
/// more than the hashing it replaced for 4 KiB entries.
const COMBINE_BYTES_MIN: usize = 16 << 10;

/// [`encode_entry`] that also adds the bytes it writes to `h`, using `crc`
/// for data of [`COMBINE_BYTES_MIN`] or more instead of reading it again.
pub fn encode_entry_hashed<B: EncodeBuf>(
    buf: &mut B,
    term: Term,
    kind: EntryKind,
    data: &[u8],
    crc: u32,
    h: &mut crc32fast::Hasher,
) {
    debug_assert_eq!(crc, crc32fast::hash(data));
    let row = entry_row(term, kind, data.len(), crc);
    h.update(&row);
    if data.len() >= COMBINE_BYTES_MIN {
        h.combine(&crc32fast::Hasher::new_with_initial_len(
            crc,
            data.len() as u64,
        ));
    } else {
        h.update(data);
    }
    buf.extend_from_slice(&row);
    buf.extend_from_slice(data);
}

fn entry_row(term: Term, kind: EntryKind, len: usize, crc: u32) -> [u8; ENTRY_ROW_LEN] {
    let mut r = [0u8; ENTRY_ROW_LEN];
    r[..8].copy_from_slice(&term.to_le_bytes());
    r[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    r[12..16].copy_from_slice(&crc.to_le_bytes());
    r[16] = kind as u8;
    r
}

/// What lies at an offset of a segment.
#[derive(Debug)]
pub enum Decoded<'a> {
    Record {
        header: RecordHeader,
        /// Offset of the payload relative to the record start.
        payload_off: usize,
        payload: &'a [u8],
        /// Total length including padding.
        len: usize,
    },
    /// Only zero bytes from here on up to the next prefix: unwritten space.
    Zero,
    Bad(String),
}

/// Decodes the record at `off` of `buf` (a whole segment of format `fmt`),
/// verifying the crc.
pub fn decode_at(buf: &[u8], off: usize, fmt: SegFormat) -> Decoded<'_> {
    let rest = &buf[off.min(buf.len())..];
    if rest.len() < PREFIX_LEN {
        return if rest.iter().all(|b| *b == 0) {
            Decoded::Zero
        } else {
            Decoded::Bad("truncated record prefix".into())
        };
    }
    let u32_at = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
    if rest[..PREFIX_LEN].iter().all(|b| *b == 0) {
        return Decoded::Zero;
    }
    if u32_at(0) != fmt.magic() {
        return Decoded::Bad(format!(
            "bad magic {:#010x} (expected {:#010x})",
            u32_at(0),
            fmt.magic()
        ));
    }
    let hl = u32_at(8) as usize;
    let pl = u32_at(12) as usize;
    if hl != header_len() {
        return Decoded::Bad(format!("header length {hl}, expected {}", header_len()));
    }
    if pl > PAYLOAD_BYTES_MAX || PREFIX_LEN + hl + pl > rest.len() {
        return Decoded::Bad(format!(
            "record of {} bytes extends past the end of the file",
            PREFIX_LEN + hl + pl
        ));
    }
    let body = &rest[8..PREFIX_LEN + hl + pl];
    let crc = fmt.crc(body);
    if crc != u32_at(4) {
        return Decoded::Bad(format!(
            "crc mismatch (stored {:#010x}, computed {crc:#010x}{})",
            u32_at(4),
            if fmt.v4 {
                "; or a record of an earlier use of this recycled file"
            } else {
                ""
            }
        ));
    }
    // rkyv needs aligned bytes; the header sits at an 8-aligned file offset
    // but the read buffer's own alignment is unknown, so copy it.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(hl);
    aligned.extend_from_slice(&rest[PREFIX_LEN..PREFIX_LEN + hl]);
    let header = match rkyv::access::<ArchivedRecordHeader, rancor::Error>(&aligned) {
        Ok(a) => match rkyv::deserialize::<RecordHeader, rancor::Error>(a) {
            Ok(h) => h,
            Err(e) => return Decoded::Bad(format!("header does not decode: {e}")),
        },
        Err(e) => return Decoded::Bad(format!("header does not validate: {e}")),
    };
    if !fmt.versions().contains(&header.version) {
        return Decoded::Bad(format!(
            "unsupported format version {} for magic {:#010x}",
            header.version,
            fmt.magic()
        ));
    }
    if RecordKind::from_u8(header.kind).is_none() {
        return Decoded::Bad(format!("unknown record kind {}", header.kind));
    }
    if header.window == 0 || header.window > WINDOW_MAX {
        return Decoded::Bad(format!("in-flight window {} out of range", header.window));
    }
    let payload_off = PREFIX_LEN + hl;
    Decoded::Record {
        header,
        payload_off,
        payload: &rest[payload_off..payload_off + pl],
        len: pad(PREFIX_LEN + hl + pl).min(rest.len()),
    }
}

/// One entry of an `Entries` record, as found by [`parse_entries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRow {
    pub index: Index,
    pub term: Term,
    pub kind: EntryKind,
    /// Offset of the data relative to the payload start.
    pub data_off: usize,
    pub len: u32,
    pub crc: u32,
}

/// Parses the entry table of an `Entries` or `GroupImage` record (whose crc
/// was verified).
pub fn parse_entries(h: &RecordHeader, payload: &[u8]) -> Result<Vec<EntryRow>, String> {
    let (first, n) = if h.kind == RecordKind::GroupImage as u8 {
        if h.last_index < h.first_index {
            return Err(format!(
                "image range {}..={} is negative",
                h.first_index, h.last_index
            ));
        }
        (h.first_index + 1, h.last_index - h.first_index)
    } else {
        if h.last_index < h.first_index {
            return Err(format!(
                "entry range {}..={} is empty",
                h.first_index, h.last_index
            ));
        }
        (h.first_index, h.last_index - h.first_index + 1)
    };
    let mut rows = Vec::with_capacity(n.min(1 << 16) as usize);
    let mut off = 0usize;
    for i in 0..n {
        if payload.len() < off + ENTRY_ROW_LEN {
            return Err(format!("entry table ends early at entry {i} of {n}"));
        }
        let r = &payload[off..off + ENTRY_ROW_LEN];
        let term = u64::from_le_bytes(r[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap());
        let crc = u32::from_le_bytes(r[12..16].try_into().unwrap());
        let kind =
            EntryKind::from_u8(r[16]).ok_or_else(|| format!("unknown entry kind {}", r[16]))?;
        let data_off = off + ENTRY_ROW_LEN;
        if payload.len() < data_off + len as usize {
            return Err(format!("entry {i} data extends past the payload"));
        }
        rows.push(EntryRow {
            index: first + i,
            term,
            kind,
            data_off,
            len,
            crc,
        });
        off = data_off + len as usize;
    }
    if off != payload.len() {
        return Err(format!("{} trailing payload bytes", payload.len() - off));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_block_is_one_block_recognised_for_its_segment_only() {
        let b = reserved_block(42, 4096);
        assert_eq!(b.len(), 4096);
        assert!(is_reserved(&b, 42));
        assert!(!is_reserved(&b, 43), "the sequence number is in the crc");
        assert!(SegFormat::detect(&b, 42).is_none(), "not a start record");
        let mut start = Vec::new();
        encode(&mut start, &RecordHeader::segment_start(42), 42, |_| {});
        assert!(!is_reserved(&start, 42));
        let mut torn = b.clone();
        torn[40] ^= 1;
        assert!(!is_reserved(&torn, 42));
    }

    const F: SegFormat = SegFormat { seq: 7, v4: true };

    fn sample() -> Vec<u8> {
        sample_as(F)
    }

    fn sample_as(f: SegFormat) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_as(&mut buf, &RecordHeader::segment_start(7), f, |_| {});
        let h = RecordHeader::entries(3, (10, 2), (11, 2));
        encode_as(&mut buf, &h, f, |b| {
            encode_entry(b, 2, EntryKind::Normal, b"hello", crc32fast::hash(b"hello"));
            encode_entry(b, 2, EntryKind::Noop, b"", 0);
        });
        buf
    }

    #[test]
    fn records_round_trip() {
        let buf = sample();
        let Decoded::Record { header, len, .. } = decode_at(&buf, 0, F) else {
            panic!("first record must decode")
        };
        assert_eq!(header, RecordHeader::segment_start(7));
        assert_eq!(len % ALIGN, 0);
        let Decoded::Record {
            header, payload, ..
        } = decode_at(&buf, len, F)
        else {
            panic!("second record must decode")
        };
        let rows = parse_entries(&header, payload).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(&payload[rows[0].data_off..rows[0].data_off + 5], b"hello");
        assert_eq!(rows[1].kind, EntryKind::Noop);
        assert!(matches!(decode_at(&buf, buf.len(), F), Decoded::Zero));
    }

    #[test]
    fn a_prehashed_record_is_the_same_bytes() {
        let datas: [&[u8]; 4] = [b"hello", b"", &[0x5a; 65536], &[7; 3]];
        let h = RecordHeader::entries(3, (10, 2), (13, 2));
        let f = SegFormat::current(7);
        let mut plain = Vec::new();
        encode(&mut plain, &h, 7, |b| {
            for d in datas {
                encode_entry(b, 2, EntryKind::Normal, d, crc32fast::hash(d));
            }
        });
        let mut pre = Vec::new();
        encode_prehashed(&mut pre, &h, 7, |b| {
            let mut hasher = crc32fast::Hasher::new();
            for d in datas {
                encode_entry_hashed(b, 2, EntryKind::Normal, d, crc32fast::hash(d), &mut hasher);
            }
            hasher
        });
        assert_eq!(plain, pre);
        assert!(matches!(decode_at(&pre, 0, f), Decoded::Record { .. }));
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let buf = sample();
        let Decoded::Record { len: first, .. } = decode_at(&buf, 0, F) else {
            panic!()
        };
        // Flip each byte of the second record's prefix+header+payload.
        let end = buf.len();
        for i in first..end {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            match decode_at(&b, first, F) {
                Decoded::Record { .. } => {
                    // Only the alignment padding is not covered.
                    assert!(
                        i >= first + PREFIX_LEN + header_len() + 24 * 2 + 5,
                        "byte {i} not covered"
                    );
                }
                Decoded::Bad(_) | Decoded::Zero => {}
            }
        }
    }

    #[test]
    fn pad_records_fill_exactly_to_the_boundary() {
        let min = record_len(0) as u64;
        assert_eq!(pad_len(8192, 4096), 0);
        assert_eq!(pad_len(4096 - min, 4096), min);
        // A gap smaller than the smallest record spills into the next block.
        assert_eq!(pad_len(4096 - 8, 4096), 8 + 4096);
        for start in (0..4096u64 * 2).step_by(8) {
            let mut buf = vec![0xeeu8; start as usize];
            let n = pad_len(start, 4096);
            let h = RecordHeader::pad().in_batch(3, 2, 4);
            encode_pad(&mut buf, &h, 7, n as usize);
            assert_eq!(buf.len() as u64, start + n);
            assert_eq!(buf.len() % 4096, 0, "start {start}");
            if n > 0 {
                match decode_at(&buf, start as usize, F) {
                    Decoded::Record { header, len, .. } => {
                        assert_eq!(header, h);
                        assert_eq!(len as u64, n);
                    }
                    d => panic!("start {start}: {d:?}"),
                }
            }
        }
    }

    #[test]
    fn truncated_record_is_bad() {
        let buf = sample();
        assert!(matches!(
            decode_at(&buf[..buf.len() - 9], 0, F),
            Decoded::Record { .. }
        ));
        let Decoded::Record { len, .. } = decode_at(&buf, 0, F) else {
            panic!()
        };
        assert!(matches!(
            decode_at(&buf[..buf.len() - 9], len, F),
            Decoded::Bad(_)
        ));
    }

    #[test]
    fn a_record_verifies_only_in_its_own_segment_and_format() {
        let buf = sample();
        let Decoded::Record { len, .. } = decode_at(&buf, 0, F) else {
            panic!()
        };
        // The same bytes read as segment 8 (the file recycled): the crc fails.
        let other = SegFormat { seq: 8, v4: true };
        match decode_at(&buf, len, other) {
            Decoded::Bad(why) => assert!(why.contains("crc mismatch"), "{why}"),
            d => panic!("a record of segment 7 decoded in segment 8: {d:?}"),
        }
        // Neither format reads the other's records.
        let v3 = SegFormat { seq: 7, v4: false };
        assert!(matches!(decode_at(&buf, 0, v3), Decoded::Bad(_)));
        let old = sample_as(v3);
        assert!(matches!(decode_at(&old, 0, F), Decoded::Bad(_)));
        let Decoded::Record { header, len, .. } = decode_at(&old, 0, v3) else {
            panic!("a version 3 record must still decode")
        };
        assert_eq!(header.version, 3);
        // Format 3 has no sequence number in its crc.
        let v3_other = SegFormat { seq: 99, v4: false };
        assert!(matches!(
            decode_at(&old, len, v3_other),
            Decoded::Record { .. }
        ));
        assert_eq!(SegFormat::detect(&buf, 7), Some(F));
        assert_eq!(SegFormat::detect(&old, 7), Some(v3));
        assert_eq!(SegFormat::detect(&buf, 8), None);
        assert_eq!(
            SegFormat::detect(&buf[len..], 7),
            None,
            "not a start record"
        );
    }
}
