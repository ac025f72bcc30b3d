//! A fixed buffer on the stack for short header values built from a few
//! pieces and decimal numbers (`Cache-Status` parameters, `Content-Range`),
//! written without an allocation until the value is complete.

/// `N` bytes and how many are written. Writing past `N` panics: callers
/// size `N` for the longest value they write.
pub(crate) struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> AsRef<[u8]> for StackBuf<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> StackBuf<N> {
    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `n` in decimal (at most 20 digits).
    pub(crate) fn uint(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }

    /// `n` in decimal, with a `-` when negative.
    pub(crate) fn int(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        self.uint(n.unsigned_abs());
    }
}

#[cfg(test)]
mod tests {
    use super::StackBuf;

    #[test]
    fn numbers_and_pieces() {
        let mut b = StackBuf::<64>::default();
        b.push(b"x=");
        b.int(-12);
        b.push(b" ");
        b.uint(0);
        b.push(b" ");
        b.uint(u64::MAX);
        assert_eq!(b.as_ref(), b"x=-12 0 18446744073709551615");
        assert_eq!(b.len(), 28);
    }
}
