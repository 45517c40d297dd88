//! File metadata as change detection sees it, and the hash-cache rule.
//!
//! A cached hash is used for a file only while the file's stat is exactly
//! the recorded one and the record is not racily clean: taken so soon after
//! the file's last change (`window_ns`) that a further write within the same
//! timestamp tick could hide behind an identical stat.

use crate::hash::ContentHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Sockets, fifos, devices: never synced.
    Other,
}

/// The fields of `lstat` that change detection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
}

impl Stat {
    pub fn executable(&self) -> bool {
        self.mode & 0o100 != 0
    }

    /// Same file, same content as far as stat can tell (ctime included: it
    /// changes on every write and cannot be set by programs).
    pub fn unchanged_since(&self, earlier: &Stat) -> bool {
        self.kind == earlier.kind
            && self.size == earlier.size
            && self.mtime_ns == earlier.mtime_ns
            && self.ctime_ns == earlier.ctime_ns
            && self.ino == earlier.ino
            && self.mode == earlier.mode
    }

    /// As `unchanged_since` but ignoring ctime and mode, which a rename or
    /// chmod update: used to recognise a file we just moved ourselves.
    pub fn same_file_content(&self, earlier: &Stat) -> bool {
        self.kind == earlier.kind
            && self.size == earlier.size
            && self.mtime_ns == earlier.mtime_ns
            && self.ino == earlier.ino
    }
}

/// What the hash cache knows about one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRecord {
    pub stat: Stat,
    pub hash: ContentHash,
    /// Wall-clock time (ns since the epoch) when `stat` was taken.
    pub recorded_ns: i64,
}

impl CacheRecord {
    /// True when a change after the record could share its exact stat.
    pub fn is_racy(&self, window_ns: i64) -> bool {
        self.recorded_ns - self.stat.mtime_ns.max(self.stat.ctime_ns) < window_ns
    }

    /// True when the cached hash may be used for a file that stats as `now`.
    pub fn valid_for(&self, now: &Stat, window_ns: i64) -> bool {
        now.unchanged_since(&self.stat) && !self.is_racy(window_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(mtime_ns: i64) -> Stat {
        Stat {
            kind: Kind::File,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: 7,
            dev: 1,
            mode: 0o644,
        }
    }

    #[test]
    fn cache_rule() {
        let s = stat(1_000);
        let record = CacheRecord {
            stat: s,
            hash: ContentHash::of(b"abc"),
            recorded_ns: 1_000 + 5_000,
        };
        // Recorded 5 µs after the change: racy under a 1 ms window, clean under 1 µs.
        assert!(record.is_racy(1_000_000));
        assert!(!record.valid_for(&s, 1_000_000));
        assert!(record.valid_for(&s, 1_000));
        // Any stat difference invalidates.
        let mut other = s;
        other.ctime_ns += 1;
        assert!(!record.valid_for(&other, 1_000));
        other = s;
        other.ino += 1;
        assert!(!record.valid_for(&other, 1_000));
    }
}
