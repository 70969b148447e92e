//! Encoding of what cores exchange over the transport: batches of raft messages (one frame per
//! peer and lane per flush, carrying the messages of many block groups), forwarded client
//! requests with their responses, and hibernation frames (also the liveness ping).
//!
//! Hand-rolled little-endian, because the messages are small fixed-layout records plus raw entry
//! payloads that must stay raw (`Bytes` slices of the received frame, no copy). Everything
//! decoded from a peer is validated here — lengths, tags, entry kinds, configuration entries,
//! consecutive entry indexes — so the raft core never sees a malformed message; a bad frame is
//! an `Err` that the caller logs and drops, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftlog::core::{
    Configuration, Entry, EntryKind, GroupId, Message, MessageBody, NodeId, SnapshotMeta,
};

use crate::block::BlockOp;

/// Frame kinds (the transport carries them opaquely).
pub const KIND_RAFT: u8 = 1;
pub const KIND_FORWARD_REQUEST: u8 = 2;
pub const KIND_FORWARD_RESPONSE: u8 = 3;
/// Hibernation of idle groups and the node-level liveness ping ([`HibernateFrame`]).
pub const KIND_HIBERNATE: u8 = 4;

/// Messages in one raft frame, at most (bounds what a peer can make us allocate up front).
pub const FRAME_MESSAGES_MAX: u32 = 1 << 16;
/// Entries in one AppendEntries, at most.
pub const MESSAGE_ENTRIES_MAX: u32 = 1 << 16;

/// Largest term or log index a peer may send (2^63 - 1). Real values never come near it (one
/// term per election, one index per entry), and the bound keeps the raft core's arithmetic
/// (`term + 1`, `index + entries`) from overflowing on a corrupt or hostile message: a single
/// RequestVote with term `u64::MAX` used to make every node of a cluster adopt it and then
/// panic on `term + 1` at its next campaign (and again after every restart, the term being
/// persisted).
pub const TERM_INDEX_MAX: u64 = i64::MAX as u64;

/// Why a frame was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type R<T> = std::result::Result<T, Malformed>;

struct Reader {
    b: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &str) -> R<()> {
        if self.b.remaining() < n {
            return Err(Malformed(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.b.remaining()
            )));
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> R<u8> {
        self.need(1, what)?;
        Ok(self.b.get_u8())
    }
    fn bool(&mut self, what: &str) -> R<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Malformed(format!("{what}: {v} is not a boolean"))),
        }
    }
    fn u32(&mut self, what: &str) -> R<u32> {
        self.need(4, what)?;
        Ok(self.b.get_u32_le())
    }
    fn u64(&mut self, what: &str) -> R<u64> {
        self.need(8, what)?;
        Ok(self.b.get_u64_le())
    }
    /// A term or log index: at most [`TERM_INDEX_MAX`].
    fn ti(&mut self, what: &str) -> R<u64> {
        let v = self.u64(what)?;
        if v > TERM_INDEX_MAX {
            return Err(Malformed(format!("{what} {v} is above {TERM_INDEX_MAX}")));
        }
        Ok(v)
    }
    fn bytes(&mut self, n: usize, what: &str) -> R<Bytes> {
        self.need(n, what)?;
        Ok(self.b.split_to(n))
    }
    fn end(&self, what: &str) -> R<()> {
        if self.b.has_remaining() {
            return Err(Malformed(format!(
                "{what}: {} trailing bytes",
                self.b.remaining()
            )));
        }
        Ok(())
    }
}

const TAG_REQUEST_VOTE: u8 = 1;
const TAG_REQUEST_VOTE_RESPONSE: u8 = 2;
const TAG_APPEND: u8 = 3;
const TAG_APPEND_RESPONSE: u8 = 4;
const TAG_HEARTBEAT: u8 = 5;
const TAG_HEARTBEAT_RESPONSE: u8 = 6;
const TAG_INSTALL_SNAPSHOT: u8 = 7;
const TAG_INSTALL_SNAPSHOT_RESPONSE: u8 = 8;
const TAG_TIMEOUT_NOW: u8 = 9;

/// Bytes a message takes in a raft frame (used to cut frames at `frame_bytes_max`).
pub fn message_len(m: &Message) -> usize {
    49 + match &m.body {
        MessageBody::AppendEntries { entries, .. } => {
            36 + entries.iter().map(|e| 21 + e.data.len()).sum::<usize>()
        }
        MessageBody::InstallSnapshot { meta } => 20 + meta.conf.encoded_len_max(),
        _ => 48,
    }
}

fn put_message(b: &mut BytesMut, m: &Message) {
    b.put_u64_le(m.group);
    b.put_u64_le(m.from);
    b.put_u64_le(m.to);
    b.put_u64_le(m.term);
    b.put_u64_le(m.disk);
    b.put_u64_le(m.to_disk);
    match &m.body {
        MessageBody::RequestVote {
            pre_vote,
            last_log_index,
            last_log_term,
            leadership_transfer,
        } => {
            b.put_u8(TAG_REQUEST_VOTE);
            b.put_u8(*pre_vote as u8);
            b.put_u64_le(*last_log_index);
            b.put_u64_le(*last_log_term);
            b.put_u8(*leadership_transfer as u8);
        }
        MessageBody::RequestVoteResponse { pre_vote, granted } => {
            b.put_u8(TAG_REQUEST_VOTE_RESPONSE);
            b.put_u8(*pre_vote as u8);
            b.put_u8(*granted as u8);
        }
        MessageBody::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            round,
        } => {
            b.put_u8(TAG_APPEND);
            b.put_u64_le(*prev_log_index);
            b.put_u64_le(*prev_log_term);
            b.put_u64_le(*leader_commit);
            b.put_u64_le(*round);
            b.put_u32_le(entries.len() as u32);
            for e in entries {
                b.put_u64_le(e.index);
                b.put_u64_le(e.term);
                b.put_u8(e.kind as u8);
                b.put_u32_le(e.data.len() as u32);
                b.put_slice(&e.data);
            }
        }
        MessageBody::AppendEntriesResponse {
            success,
            match_index,
            rejected_index,
            conflict_index,
            conflict_term,
            round,
            readonly,
        } => {
            b.put_u8(TAG_APPEND_RESPONSE);
            b.put_u8(*success as u8);
            b.put_u64_le(*match_index);
            b.put_u64_le(*rejected_index);
            b.put_u64_le(*conflict_index);
            b.put_u64_le(*conflict_term);
            b.put_u64_le(*round);
            b.put_u8(*readonly as u8);
        }
        MessageBody::Heartbeat { commit, round } => {
            b.put_u8(TAG_HEARTBEAT);
            b.put_u64_le(*commit);
            b.put_u64_le(*round);
        }
        MessageBody::HeartbeatResponse {
            round,
            readonly,
            last_index,
        } => {
            b.put_u8(TAG_HEARTBEAT_RESPONSE);
            b.put_u64_le(*round);
            b.put_u8(*readonly as u8);
            b.put_u64_le(*last_index);
        }
        MessageBody::InstallSnapshot { meta } => {
            b.put_u8(TAG_INSTALL_SNAPSHOT);
            b.put_u64_le(meta.index);
            b.put_u64_le(meta.term);
            let conf = meta.conf.encode();
            b.put_u32_le(conf.len() as u32);
            b.put_slice(&conf);
        }
        MessageBody::InstallSnapshotResponse { index, success } => {
            b.put_u8(TAG_INSTALL_SNAPSHOT_RESPONSE);
            b.put_u64_le(*index);
            b.put_u8(*success as u8);
        }
        MessageBody::TimeoutNow => b.put_u8(TAG_TIMEOUT_NOW),
    }
}

/// Encodes a batch of raft messages (any groups) into one frame payload.
pub fn encode_messages(msgs: &[Message]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + msgs.iter().map(message_len).sum::<usize>());
    b.put_u32_le(msgs.len() as u32);
    for m in msgs {
        put_message(&mut b, m);
    }
    b.freeze()
}

fn get_message(r: &mut Reader) -> R<Message> {
    let group = r.u64("group")?;
    let from = r.u64("from")?;
    let to = r.u64("to")?;
    let term = r.ti("term")?;
    let disk = r.u64("disk")?;
    let to_disk = r.u64("to_disk")?;
    let tag = r.u8("tag")?;
    let body = match tag {
        TAG_REQUEST_VOTE => MessageBody::RequestVote {
            pre_vote: r.bool("pre_vote")?,
            last_log_index: r.ti("last_log_index")?,
            last_log_term: r.ti("last_log_term")?,
            leadership_transfer: r.bool("leadership_transfer")?,
        },
        TAG_REQUEST_VOTE_RESPONSE => MessageBody::RequestVoteResponse {
            pre_vote: r.bool("pre_vote")?,
            granted: r.bool("granted")?,
        },
        TAG_APPEND => {
            let prev_log_index = r.ti("prev_log_index")?;
            let prev_log_term = r.ti("prev_log_term")?;
            let leader_commit = r.ti("leader_commit")?;
            let round = r.u64("round")?;
            let n = r.u32("entry count")?;
            if n > MESSAGE_ENTRIES_MAX {
                return Err(Malformed(format!(
                    "{n} entries, above {MESSAGE_ENTRIES_MAX}"
                )));
            }
            let mut entries = Vec::with_capacity(n.min(1024) as usize);
            for i in 0..n as u64 {
                let index = r.ti("entry index")?;
                if Some(index) != prev_log_index.checked_add(i + 1) {
                    return Err(Malformed(format!(
                        "entry index {index} does not follow prev_log_index {prev_log_index} + {}",
                        i + 1
                    )));
                }
                let eterm = r.ti("entry term")?;
                let kind = r.u8("entry kind")?;
                let kind = EntryKind::from_u8(kind)
                    .ok_or_else(|| Malformed(format!("unknown entry kind {kind}")))?;
                let len = r.u32("entry length")? as usize;
                let data = r.bytes(len, "entry data")?;
                if kind == EntryKind::Config && Configuration::decode(&data).is_err() {
                    return Err(Malformed(format!(
                        "configuration entry {index} does not decode"
                    )));
                }
                entries.push(Entry {
                    index,
                    term: eterm,
                    kind,
                    data,
                });
            }
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                round,
            }
        }
        TAG_APPEND_RESPONSE => MessageBody::AppendEntriesResponse {
            success: r.bool("success")?,
            match_index: r.ti("match_index")?,
            rejected_index: r.ti("rejected_index")?,
            conflict_index: r.ti("conflict_index")?,
            conflict_term: r.ti("conflict_term")?,
            round: r.u64("round")?,
            readonly: r.bool("readonly")?,
        },
        TAG_HEARTBEAT => MessageBody::Heartbeat {
            commit: r.ti("commit")?,
            round: r.u64("round")?,
        },
        TAG_HEARTBEAT_RESPONSE => MessageBody::HeartbeatResponse {
            round: r.u64("round")?,
            readonly: r.bool("readonly")?,
            last_index: r.ti("last_index")?,
        },
        TAG_INSTALL_SNAPSHOT => {
            let index = r.ti("snapshot index")?;
            let sterm = r.ti("snapshot term")?;
            let len = r.u32("conf length")? as usize;
            let conf = r.bytes(len, "conf")?;
            let conf = Configuration::decode(&conf)
                .map_err(|_| Malformed("snapshot configuration does not decode".into()))?;
            MessageBody::InstallSnapshot {
                meta: SnapshotMeta {
                    index,
                    term: sterm,
                    conf,
                },
            }
        }
        TAG_INSTALL_SNAPSHOT_RESPONSE => MessageBody::InstallSnapshotResponse {
            index: r.ti("index")?,
            success: r.bool("success")?,
        },
        TAG_TIMEOUT_NOW => MessageBody::TimeoutNow,
        t => return Err(Malformed(format!("unknown message tag {t}"))),
    };
    if from == 0 || to == 0 {
        return Err(Malformed("node id 0 is reserved".into()));
    }
    Ok(Message {
        group,
        from,
        to,
        term,
        disk,
        to_disk,
        body,
    })
}

/// Decodes a raft frame payload. Entry payloads are slices of `payload` (no copy).
pub fn decode_messages(payload: Bytes) -> R<Vec<Message>> {
    let mut r = Reader { b: payload };
    let n = r.u32("message count")?;
    if n > FRAME_MESSAGES_MAX {
        return Err(Malformed(format!(
            "{n} messages, above {FRAME_MESSAGES_MAX}"
        )));
    }
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        out.push(get_message(&mut r)?);
    }
    r.end("raft frame")?;
    Ok(out)
}

/// A client request forwarded from a follower to the leader of its block group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardOp {
    Read { offset: u64, len: u32 },
    Op(BlockOp),
}

/// A forwarded request: `req_id u64 | what u8 (0 read, 1 op) | read: offset u64 len u32 | op`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    pub req_id: u64,
    pub op: ForwardOp,
}

impl ForwardRequest {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u64_le(self.req_id);
        match &self.op {
            ForwardOp::Read { offset, len } => {
                b.put_u8(0);
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
            }
            ForwardOp::Op(op) => {
                b.put_u8(1);
                b.put_slice(&op.encode());
            }
        }
        b.freeze()
    }

    pub fn decode(payload: Bytes) -> R<ForwardRequest> {
        let mut r = Reader { b: payload };
        let req_id = r.u64("req_id")?;
        let op = match r.u8("request kind")? {
            0 => {
                let offset = r.u64("offset")?;
                let len = r.u32("len")?;
                r.end("forwarded read")?;
                ForwardOp::Read { offset, len }
            }
            1 => ForwardOp::Op(
                BlockOp::decode(&r.b)
                    .ok_or_else(|| Malformed("forwarded block op does not decode".into()))?,
            ),
            k => return Err(Malformed(format!("unknown forwarded request kind {k}"))),
        };
        Ok(ForwardRequest { req_id, op })
    }
}

/// The leader's answer to a forwarded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardResult {
    /// Done; the data of a read (empty otherwise).
    Ok(Bytes),
    /// This node is not (or no longer) the leader: the origin retries elsewhere.
    NotLeader,
    /// Failed on the leader; the message says why.
    Failed(String),
}

/// `req_id u64 | status u8 (0 ok, 1 not leader, 2 failed) | data or utf-8 reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardResponse {
    pub req_id: u64,
    pub result: ForwardResult,
}

impl ForwardResponse {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u64_le(self.req_id);
        match &self.result {
            ForwardResult::Ok(data) => {
                b.put_u8(0);
                b.put_slice(data);
            }
            ForwardResult::NotLeader => b.put_u8(1),
            ForwardResult::Failed(reason) => {
                b.put_u8(2);
                b.put_slice(reason.as_bytes());
            }
        }
        b.freeze()
    }

    pub fn decode(payload: Bytes) -> R<ForwardResponse> {
        let mut r = Reader { b: payload };
        let req_id = r.u64("req_id")?;
        let result = match r.u8("status")? {
            0 => ForwardResult::Ok(r.b.split_off(0)),
            1 => {
                r.end("not-leader response")?;
                ForwardResult::NotLeader
            }
            2 => ForwardResult::Failed(String::from_utf8_lossy(&r.b).into_owned()),
            s => return Err(Malformed(format!("unknown forward status {s}"))),
        };
        Ok(ForwardResponse { req_id, result })
    }
}

/// What a hibernation frame says (see `crate::hibernate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HibernateWhat {
    /// "I am alive": sent to a peer nothing else was sent to for a while; carries no groups.
    Ping,
    /// Leader → follower: these groups are idle at `SleepAt`; hibernate and acknowledge.
    Sleep,
    /// Follower → leader: hibernated at `SleepAt`.
    Ack,
}

/// A group's idle point: the leader's term and its last (committed, applied) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepAt {
    pub group: GroupId,
    pub term: u64,
    pub index: u64,
    pub log_term: u64,
}

/// `what u8 (0 ping, 1 sleep, 2 ack) | count u32 | count × (group, term, index, log_term: u64)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HibernateFrame {
    pub what: HibernateWhat,
    pub groups: Vec<SleepAt>,
}

impl HibernateFrame {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + 32 * self.groups.len());
        b.put_u8(match self.what {
            HibernateWhat::Ping => 0,
            HibernateWhat::Sleep => 1,
            HibernateWhat::Ack => 2,
        });
        b.put_u32_le(self.groups.len() as u32);
        for g in &self.groups {
            b.put_u64_le(g.group);
            b.put_u64_le(g.term);
            b.put_u64_le(g.index);
            b.put_u64_le(g.log_term);
        }
        b.freeze()
    }

    pub fn decode(payload: Bytes) -> R<HibernateFrame> {
        let mut r = Reader { b: payload };
        let what = match r.u8("hibernate kind")? {
            0 => HibernateWhat::Ping,
            1 => HibernateWhat::Sleep,
            2 => HibernateWhat::Ack,
            k => return Err(Malformed(format!("unknown hibernate kind {k}"))),
        };
        let n = r.u32("hibernate group count")?;
        if n > FRAME_MESSAGES_MAX || (what == HibernateWhat::Ping && n != 0) {
            return Err(Malformed(format!("{n} groups in a {what:?} frame")));
        }
        r.need(32 * n as usize, "hibernate groups")?;
        let mut groups = Vec::with_capacity(n as usize);
        for _ in 0..n {
            groups.push(SleepAt {
                group: r.u64("group")?,
                term: r.ti("term")?,
                index: r.ti("index")?,
                log_term: r.ti("log term")?,
            });
        }
        r.end("hibernate frame")?;
        Ok(HibernateFrame { what, groups })
    }
}

/// Whether a message belongs on the control lane (small and latency critical) rather than the
/// data lane (entries, snapshots).
pub fn is_control(m: &Message) -> bool {
    match &m.body {
        MessageBody::AppendEntries { entries, .. } => entries.is_empty(),
        MessageBody::InstallSnapshot { .. } => false,
        _ => true,
    }
}

/// Node ids mentioned by a batch (for logging a refused frame).
pub fn describe(from: NodeId, group: GroupId, err: &Malformed) -> String {
    format!("frame from node {from} (group field {group}) refused: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Message> {
        let m = |group, body| Message {
            group,
            from: 1,
            to: 2,
            term: 7,
            disk: 0xD15C_0001,
            to_disk: 0xD15C_0002,
            body,
        };
        vec![
            m(
                3,
                MessageBody::RequestVote {
                    pre_vote: true,
                    last_log_index: 9,
                    last_log_term: 6,
                    leadership_transfer: false,
                },
            ),
            m(
                3,
                MessageBody::RequestVoteResponse {
                    pre_vote: false,
                    granted: true,
                },
            ),
            m(
                4,
                MessageBody::AppendEntries {
                    prev_log_index: 10,
                    prev_log_term: 6,
                    entries: vec![
                        Entry {
                            index: 11,
                            term: 7,
                            kind: EntryKind::Normal,
                            data: Bytes::from_static(b"abc"),
                        },
                        Entry {
                            index: 12,
                            term: 7,
                            kind: EntryKind::Config,
                            data: Configuration::new([1, 2]).encode(),
                        },
                    ],
                    leader_commit: 10,
                    round: 5,
                },
            ),
            m(
                4,
                MessageBody::AppendEntriesResponse {
                    success: false,
                    match_index: 1,
                    rejected_index: 2,
                    conflict_index: 3,
                    conflict_term: 4,
                    round: 5,
                    readonly: true,
                },
            ),
            m(
                5,
                MessageBody::Heartbeat {
                    commit: 3,
                    round: 4,
                },
            ),
            m(
                5,
                MessageBody::HeartbeatResponse {
                    round: 4,
                    readonly: false,
                    last_index: 8,
                },
            ),
            m(
                6,
                MessageBody::InstallSnapshot {
                    meta: SnapshotMeta {
                        index: 100,
                        term: 5,
                        conf: Configuration::new([1, 2, 3]),
                    },
                },
            ),
            m(
                6,
                MessageBody::InstallSnapshotResponse {
                    index: 100,
                    success: true,
                },
            ),
            m(6, MessageBody::TimeoutNow),
        ]
    }

    #[test]
    fn messages_round_trip() {
        let msgs = sample();
        let enc = encode_messages(&msgs);
        assert!(enc.len() <= 4 + msgs.iter().map(message_len).sum::<usize>());
        assert_eq!(decode_messages(enc).unwrap(), msgs);
    }

    #[test]
    fn every_truncation_and_random_garbage_is_refused_without_panic() {
        let enc = encode_messages(&sample());
        for n in 0..enc.len() {
            assert!(
                decode_messages(enc.slice(..n)).is_err(),
                "prefix of {n} bytes"
            );
        }
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = decode_messages(Bytes::from(v.clone()));
            let _ = ForwardRequest::decode(Bytes::from(v.clone()));
            let _ = HibernateFrame::decode(Bytes::from(v.clone()));
            let _ = ForwardResponse::decode(Bytes::from(v));
        }
    }

    #[test]
    fn non_consecutive_entries_and_bad_config_are_refused() {
        let bad = Message {
            group: 1,
            from: 1,
            to: 2,
            term: 1,
            disk: 11,
            to_disk: 22,
            body: MessageBody::AppendEntries {
                prev_log_index: 5,
                prev_log_term: 1,
                entries: vec![Entry {
                    index: 7,
                    term: 1,
                    kind: EntryKind::Normal,
                    data: Bytes::new(),
                }],
                leader_commit: 0,
                round: 0,
            },
        };
        assert!(decode_messages(encode_messages(&[bad])).is_err());
        let bad_conf = Message {
            group: 1,
            from: 1,
            to: 2,
            term: 1,
            disk: 11,
            to_disk: 22,
            body: MessageBody::AppendEntries {
                prev_log_index: 0,
                prev_log_term: 0,
                entries: vec![Entry {
                    index: 1,
                    term: 1,
                    kind: EntryKind::Config,
                    data: Bytes::from_static(b"x"),
                }],
                leader_commit: 0,
                round: 0,
            },
        };
        assert!(decode_messages(encode_messages(&[bad_conf])).is_err());
    }

    #[test]
    fn forward_frames_round_trip() {
        let reqs = [
            ForwardRequest {
                req_id: 9,
                op: ForwardOp::Read {
                    offset: 4096,
                    len: 512,
                },
            },
            ForwardRequest {
                req_id: 10,
                op: ForwardOp::Op(BlockOp::Write {
                    offset: 0,
                    data: Bytes::from_static(b"zz"),
                }),
            },
        ];
        for r in reqs {
            assert_eq!(ForwardRequest::decode(r.encode()).unwrap(), r);
        }
        let resps = [
            ForwardResponse {
                req_id: 1,
                result: ForwardResult::Ok(Bytes::from_static(b"data")),
            },
            ForwardResponse {
                req_id: 2,
                result: ForwardResult::NotLeader,
            },
            ForwardResponse {
                req_id: 3,
                result: ForwardResult::Failed("boom".into()),
            },
        ];
        for r in resps {
            assert_eq!(ForwardResponse::decode(r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn hibernate_frames_round_trip_and_refuse_garbage() {
        let at = |group, term| SleepAt {
            group,
            term,
            index: 40,
            log_term: 3,
        };
        let frames = [
            HibernateFrame {
                what: HibernateWhat::Ping,
                groups: vec![],
            },
            HibernateFrame {
                what: HibernateWhat::Sleep,
                groups: vec![at(1, 3), at(7, 3)],
            },
            HibernateFrame {
                what: HibernateWhat::Ack,
                groups: vec![at(2, TERM_INDEX_MAX)],
            },
        ];
        for f in &frames {
            let enc = f.encode();
            assert_eq!(&HibernateFrame::decode(enc.clone()).unwrap(), f);
            for n in 0..enc.len() {
                assert!(HibernateFrame::decode(enc.slice(..n)).is_err(), "{n}");
            }
        }
        let mut trailing = frames[1].encode().to_vec();
        trailing.push(0);
        assert!(HibernateFrame::decode(Bytes::from(trailing)).is_err());
        let hostile = HibernateFrame {
            what: HibernateWhat::Sleep,
            groups: vec![at(1, u64::MAX)],
        };
        assert!(HibernateFrame::decode(hostile.encode()).is_err());
        let ping_with_groups = HibernateFrame {
            what: HibernateWhat::Ping,
            groups: vec![at(1, 1)],
        };
        assert!(HibernateFrame::decode(ping_with_groups.encode()).is_err());
        // A count far beyond the payload is refused before anything is allocated.
        let mut huge = vec![1u8];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(HibernateFrame::decode(Bytes::from(huge)).is_err());
    }

    #[test]
    fn terms_and_indexes_above_the_bound_are_refused() {
        for m in sample() {
            let mut hostile = m.clone();
            hostile.term = u64::MAX;
            assert!(decode_messages(encode_messages(&[hostile])).is_err());
            let mut at_bound = m.clone();
            at_bound.term = TERM_INDEX_MAX;
            assert!(decode_messages(encode_messages(&[at_bound])).is_ok());
        }
        let vote = Message {
            group: 1,
            from: 1,
            to: 2,
            term: 3,
            disk: 11,
            to_disk: 22,
            body: MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: TERM_INDEX_MAX + 1,
                last_log_term: 1,
                leadership_transfer: true,
            },
        };
        let err = decode_messages(encode_messages(&[vote])).unwrap_err();
        assert!(err.0.contains("last_log_index"), "{err}");
        let heartbeat = Message {
            group: 1,
            from: 1,
            to: 2,
            term: 3,
            disk: 11,
            to_disk: 22,
            body: MessageBody::Heartbeat {
                commit: u64::MAX,
                round: u64::MAX,
            },
        };
        assert!(decode_messages(encode_messages(&[heartbeat])).is_err());
    }
}
