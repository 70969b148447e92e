//! NBD wire constants and the fixed-size message layouts we parse and emit.
//!
//! Values follow the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`). Everything is
//! big-endian on the wire. Only the subset bd speaks is here: fixed newstyle negotiation, simple
//! replies, compact (non-extended) request headers.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (client → server, 32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
pub const CLIENT_FLAGS_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// Transmission flags (16 bits).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Minimum block size we advertise: any byte offset and length is served.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Preferred block size we advertise: the page size, below which backends read-modify-write.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;

/// The longest string (export name, message) the protocol allows.
pub const STRING_BYTES_MAX: usize = 4096;

/// Length of a compact request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Length of a simple reply header on the wire.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;

/// A transmission request header as the client sent it (not yet validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Parses a compact request header; `None` if the magic is wrong (the stream is then
    /// unsynchronised and the connection must be closed).
    pub fn parse(buf: &[u8; REQUEST_HEADER_BYTES]) -> Option<Self> {
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            kind: u16::from_be_bytes([buf[6], buf[7]]),
            cookie: u64::from_be_bytes(buf[8..16].try_into().ok()?),
            offset: u64::from_be_bytes(buf[16..24].try_into().ok()?),
            len: u32::from_be_bytes(buf[24..28].try_into().ok()?),
        })
    }

    /// Encodes the header as a client would (used by tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Encodes a simple reply header.
pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes an option reply (header and payload) into `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Payloads are built from bounded strings and fixed fields, far below 4 GiB.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(RequestHeader::parse(&h.encode()), Some(h));
    }

    #[test]
    fn request_header_rejects_bad_magic() {
        let mut raw = RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            len: 1,
        }
        .encode();
        raw[3] ^= 1;
        assert_eq!(RequestHeader::parse(&raw), None);
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        assert_eq!(&out[16..20], &0u32.to_be_bytes());
    }
}
