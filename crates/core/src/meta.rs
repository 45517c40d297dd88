//! File metadata as change detection sees it, and the hash-cache rule.
//!
//! A cached hash is used for a file only while the file's stat is exactly
//! the recorded one and the record is not racily clean: taken so soon after
//! the file's last change (`window_ns`) that a further write within the same
//! timestamp tick could hide behind an identical stat.

use crate::hash::ContentHash;
use crate::path::RelPath;

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

/// Cache records in path order, one per path: what a scan compares its
/// walk with. A walk is in path order too, so a scan merges the two
/// instead of making 100,000 hash-map lookups (and building the map).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheRecords(Vec<(RelPath, CacheRecord)>);

impl CacheRecords {
    /// Records already in strictly increasing path order (a database's
    /// primary-key scan); sorted here when they are not, the later of two
    /// records of one path kept.
    pub fn from_sorted(records: Vec<(RelPath, CacheRecord)>) -> CacheRecords {
        if records.windows(2).all(|w| w[0].0 < w[1].0) {
            return CacheRecords(records);
        }
        records.into_iter().collect()
    }

    pub fn get(&self, path: &RelPath) -> Option<&CacheRecord> {
        self.0
            .binary_search_by(|(known, _)| known.cmp(path))
            .ok()
            .map(|at| &self.0[at].1)
    }

    /// Adds or replaces the record of `path`.
    pub fn insert(&mut self, path: RelPath, record: CacheRecord) {
        match self.0.binary_search_by(|(known, _)| known.cmp(&path)) {
            Ok(at) => self.0[at].1 = record,
            Err(at) => self.0.insert(at, (path, record)),
        }
    }

    /// In path order.
    pub fn iter(&self) -> std::slice::Iter<'_, (RelPath, CacheRecord)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(RelPath, CacheRecord)> for CacheRecords {
    /// Any order; of two records of one path the later is kept.
    fn from_iter<I: IntoIterator<Item = (RelPath, CacheRecord)>>(iter: I) -> Self {
        let mut records: Vec<(RelPath, CacheRecord)> = iter.into_iter().collect();
        // Stable: records of one path stay in their order, and the last
        // of each run is the one kept.
        records.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(RelPath, CacheRecord)> = Vec::with_capacity(records.len());
        for (path, record) in records {
            match kept.last_mut() {
                Some(last) if last.0 == path => last.1 = record,
                _ => kept.push((path, record)),
            }
        }
        CacheRecords(kept)
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

    #[test]
    fn cache_records_keep_path_order_and_the_last_record_of_a_path() {
        let record = |n: i64| CacheRecord {
            stat: stat(n),
            hash: ContentHash::of(&n.to_le_bytes()),
            recorded_ns: n,
        };
        let path = |p: &str| RelPath::new(p).expect("path");
        // "a.b" sorts before "a/b" byte-wise, as the database orders them.
        let records: CacheRecords = [("a/b", 1), ("a.b", 2), ("a", 3), ("a/b", 4)]
            .into_iter()
            .map(|(p, n)| (path(p), record(n)))
            .collect();
        let order: Vec<&str> = records.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(order, ["a", "a.b", "a/b"]);
        assert_eq!(records.get(&path("a/b")), Some(&record(4)));
        assert_eq!(records.get(&path("b")), None);
        let mut records = records;
        records.insert(path("0"), record(5));
        records.insert(path("a"), record(6));
        assert_eq!(records.len(), 4);
        assert_eq!(records.get(&path("a")), Some(&record(6)));
        assert_eq!(records.iter().next().map(|(p, _)| p.as_str()), Some("0"));
        // Unsorted input to from_sorted is sorted, not trusted.
        let unsorted = vec![(path("b"), record(1)), (path("a"), record(2))];
        let sorted = CacheRecords::from_sorted(unsorted);
        assert_eq!(sorted.get(&path("a")), Some(&record(2)));
        assert_eq!(sorted.iter().next().map(|(p, _)| p.as_str()), Some("a"));
    }
}
