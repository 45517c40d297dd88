//! A file's metadata as the sync engine compares it.

use rustix::fs::FileType;

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
    pub fn from_raw(raw: &rustix::fs::Stat) -> Stat {
        let kind = match FileType::from_raw_mode(raw.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            size: raw.st_size as u64,
            mtime_ns: raw.st_mtime as i64 * 1_000_000_000 + raw.st_mtime_nsec as i64,
            ctime_ns: raw.st_ctime as i64 * 1_000_000_000 + raw.st_ctime_nsec as i64,
            ino: raw.st_ino,
            dev: raw.st_dev,
            mode: raw.st_mode & 0o7777,
        }
    }

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

    /// As `unchanged_since` but ignoring ctime, which a rename updates: used
    /// to recognise a file we just moved ourselves.
    pub fn same_file_content(&self, earlier: &Stat) -> bool {
        self.kind == earlier.kind
            && self.size == earlier.size
            && self.mtime_ns == earlier.mtime_ns
            && self.ino == earlier.ino
    }
}
