//! Content hashes: BLAKE3 over the whole content of a file (or a symlink's
//! target). A `ContentHash` from the wire is only built through
//! `from_slice`, which checks the length.

use std::fmt;

/// A BLAKE3 hash of a file's whole content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

/// Incremental hasher; the one way content gets hashed.
#[derive(Default, Clone)]
pub struct Hasher(blake3::Hasher);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a content hash must be 32 bytes, got {0}")]
pub struct HashLengthError(pub usize);

impl ContentHash {
    pub const LEN: usize = 32;

    pub fn of(data: &[u8]) -> Self {
        ContentHash(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, HashLengthError> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| HashLengthError(bytes.len()))?;
        Ok(ContentHash(array))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    /// The hash of empty content.
    pub fn empty() -> Self {
        Self::of(&[])
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finalize(&self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_one_shot() {
        let mut hasher = Hasher::new();
        hasher.update(b"hello ");
        hasher.update(b"world");
        assert_eq!(hasher.finalize(), ContentHash::of(b"hello world"));
    }

    #[test]
    fn from_slice_checks_length() {
        assert_eq!(ContentHash::from_slice(&[0; 31]), Err(HashLengthError(31)));
        assert!(ContentHash::from_slice(&[0; 32]).is_ok());
    }
}
