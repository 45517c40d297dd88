//! Conversion of raw `lstat` results into `gm_core::Stat`.

use gm_core::{Kind, Stat};
use rustix::fs::FileType;

// The stat field types differ between targets; the casts are needed on some.
#[allow(clippy::unnecessary_cast)]
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
