//! Buffers aligned for `O_DIRECT`: the WAL encodes records straight into
//! memory that the kernel can DMA from, so a batch is never copied again
//! between encoding and the disk; the engine reads and writes data-file
//! blocks through them (`AlignedBuf::zeroed`).

use std::ops::{Deref, DerefMut};

/// Alignment (and length granularity) of direct writes: the largest logical
/// block size of common disks, and the page size.
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; DIRECT_ALIGN]);

const _: () = assert!(std::mem::size_of::<Block>() == DIRECT_ALIGN);
const _: () = assert!(std::mem::align_of::<Block>() == DIRECT_ALIGN);

/// A growable byte buffer whose first byte is 4096-aligned. Its memory is
/// kept (not shrunk) by `clear`, so a reused buffer costs no allocation.
#[derive(Default)]
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes, allocated exactly (the data-file I/O of
    /// the engine reads and writes whole blocks through these). `len` must
    /// be a positive multiple of [`DIRECT_ALIGN`].
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(DIRECT_ALIGN),
            "aligned buffer of {len} bytes"
        );
        AlignedBuf {
            blocks: vec![Block([0; DIRECT_ALIGN]); len / DIRECT_ALIGN],
            len,
        }
    }

    fn capacity(&self) -> usize {
        self.blocks.len() * DIRECT_ALIGN
    }

    fn grow_to(&mut self, n: usize) {
        if n <= self.capacity() {
            return;
        }
        let want = n.div_ceil(DIRECT_ALIGN).max(2 * self.blocks.len());
        self.blocks.resize(want, Block([0; DIRECT_ALIGN]));
    }

    fn all_mut(&mut self) -> &mut [u8] {
        let n = self.capacity();
        // SAFETY: `blocks` is `n` initialized bytes (Block is a plain byte
        // array without padding); u8 has alignment 1.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), n) }
    }

    pub fn extend_from_slice(&mut self, s: &[u8]) {
        let (at, end) = (self.len, self.len + s.len());
        self.grow_to(end);
        self.all_mut()[at..end].copy_from_slice(s);
        self.len = end;
    }

    pub fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    /// Sets the length to `n`; new bytes are `v`.
    pub fn resize(&mut self, n: usize, v: u8) {
        if n > self.len {
            self.grow_to(n);
            let at = self.len;
            self.all_mut()[at..n].fill(v);
        }
        self.len = n;
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends what `read` puts into the `n` bytes it is handed (they hold
    /// whatever an earlier use left: nothing is zeroed for a read that will
    /// overwrite it), keeping the first `got` of them; returns `got`. The
    /// bytes handed over start at `len()`, so they are 4096-aligned when
    /// `len()` is a multiple of [`DIRECT_ALIGN`] (direct reads).
    pub fn read_into(
        &mut self,
        n: usize,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let at = self.len;
        self.grow_to(at + n);
        let got = read(&mut self.all_mut()[at..at + n])?;
        assert!(got <= n, "read reported {got} bytes into {n}");
        self.len = at + got;
        Ok(got)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as in `all_mut`, and `len <= capacity`.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let n = self.len;
        &mut self.all_mut()[..n]
    }
}

/// What the record encoder writes into: a plain `Vec` (tests, recovery)
/// or an [`AlignedBuf`] (the writer's batches).
pub trait EncodeBuf: DerefMut<Target = [u8]> {
    fn extend_from_slice(&mut self, s: &[u8]);
    fn push(&mut self, b: u8);
    fn resize(&mut self, n: usize, v: u8);
}

impl EncodeBuf for Vec<u8> {
    fn extend_from_slice(&mut self, s: &[u8]) {
        Vec::extend_from_slice(self, s)
    }
    fn push(&mut self, b: u8) {
        Vec::push(self, b)
    }
    fn resize(&mut self, n: usize, v: u8) {
        Vec::resize(self, n, v)
    }
}

impl EncodeBuf for AlignedBuf {
    fn extend_from_slice(&mut self, s: &[u8]) {
        AlignedBuf::extend_from_slice(self, s)
    }
    fn push(&mut self, b: u8) {
        AlignedBuf::push(self, b)
    }
    fn resize(&mut self, n: usize, v: u8) {
        AlignedBuf::resize(self, n, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_aligned_and_keeps_contents_across_growth() {
        let mut b = AlignedBuf::default();
        assert!(b.is_empty());
        let mut want = Vec::new();
        for i in 0..20_000u32 {
            let bytes = i.to_le_bytes();
            b.extend_from_slice(&bytes);
            want.extend_from_slice(&bytes);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        }
        b.push(7);
        want.push(7);
        b.resize(want.len() + 100, 0);
        want.resize(want.len() + 100, 0);
        assert_eq!(&b[..], &want[..]);
        b[3] = 99;
        assert_eq!(b[3], 99);
        let cap = b.capacity();
        b.clear();
        assert_eq!(b.len(), 0);
        assert_eq!(b.capacity(), cap, "clear keeps the memory");
        b.extend_from_slice(b"abc");
        assert_eq!(&b[..], b"abc");
    }

    #[test]
    fn read_into_keeps_what_was_read_and_stays_aligned() {
        let mut b = AlignedBuf::default();
        let got = b
            .read_into(8192, |s| {
                assert_eq!(s.len(), 8192);
                assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
                s[..5000].fill(7);
                Ok(5000)
            })
            .unwrap();
        assert_eq!(got, 5000);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|x| *x == 7));
        let err = b.read_into(4096, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(b.len(), 5000, "a failed read appends nothing");
    }
}
