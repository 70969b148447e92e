//! Entry payloads that name their place: the first 16 bytes are the group and index, the rest a
//! byte derived from both, so a misplaced, torn or zeroed entry cannot pass for the right one.
//! Each test picks the length (its spread of sizes across sectors and records).

use bytes::Bytes;

/// `len` (at least 16) bytes for entry `index` of `group`.
pub fn tagged(group: u64, index: u64, len: usize) -> Bytes {
    assert!(len >= 16, "a tagged payload needs 16 bytes, got {len}");
    let mut v = vec![(group * 7 + index) as u8; len];
    v[..8].copy_from_slice(&group.to_le_bytes());
    v[8..16].copy_from_slice(&index.to_le_bytes());
    Bytes::from(v)
}
