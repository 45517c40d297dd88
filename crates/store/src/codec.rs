//! Row encodings shared by the hub and node databases: entries (kind, hash,
//! size, executable, target) and hash-cache records.

use gm_core::{CacheRecord, ContentHash, Entry, Kind, Stat};
use rusqlite::Row;
use rusqlite::types::Value;

pub const KIND_TOMBSTONE: i64 = 0;
pub const KIND_FILE: i64 = 1;
pub const KIND_DIR: i64 = 2;
pub const KIND_SYMLINK: i64 = 3;

/// `(kind, hash, size, executable, target)` columns for an entry.
pub fn entry_columns(entry: Option<&Entry>) -> [Value; 5] {
    match entry {
        None => [
            Value::Integer(KIND_TOMBSTONE),
            Value::Null,
            Value::Integer(0),
            Value::Integer(0),
            Value::Null,
        ],
        Some(Entry::File {
            hash,
            size,
            executable,
        }) => [
            Value::Integer(KIND_FILE),
            Value::Blob(hash.as_bytes().to_vec()),
            Value::Integer(*size as i64),
            Value::Integer(i64::from(*executable)),
            Value::Null,
        ],
        Some(Entry::Dir) => [
            Value::Integer(KIND_DIR),
            Value::Null,
            Value::Integer(0),
            Value::Integer(0),
            Value::Null,
        ],
        Some(Entry::Symlink { target }) => [
            Value::Integer(KIND_SYMLINK),
            Value::Null,
            Value::Integer(0),
            Value::Integer(0),
            Value::Text(target.clone()),
        ],
    }
}

/// Decodes the five entry columns starting at `at`.
pub fn entry_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<Result<Option<Entry>, String>> {
    let kind: i64 = row.get(at)?;
    Ok(match kind {
        KIND_TOMBSTONE => Ok(None),
        KIND_FILE => {
            let size: i64 = row.get(at + 2)?;
            let executable: i64 = row.get(at + 3)?;
            hash_at(row, at + 1)?.map(|hash| {
                Some(Entry::File {
                    hash,
                    size: size as u64,
                    executable: executable != 0,
                })
            })
        }
        KIND_DIR => Ok(Some(Entry::Dir)),
        KIND_SYMLINK => {
            let target: String = row.get(at + 4)?;
            Ok(Some(Entry::Symlink { target }))
        }
        other => Err(format!("unknown entry kind {other}")),
    })
}

fn kind_code(kind: Kind) -> i64 {
    match kind {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
        Kind::Other => 4,
    }
}

fn kind_from_code(code: i64) -> Kind {
    match code {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// `(kind, size, mtime_ns, ctime_ns, ino, dev, mode, hash, recorded_ns)`.
pub fn cache_columns(record: &CacheRecord) -> [Value; 9] {
    let s = &record.stat;
    [
        Value::Integer(kind_code(s.kind)),
        Value::Integer(s.size as i64),
        Value::Integer(s.mtime_ns),
        Value::Integer(s.ctime_ns),
        Value::Integer(s.ino as i64),
        Value::Integer(s.dev as i64),
        Value::Integer(i64::from(s.mode)),
        Value::Blob(record.hash.as_bytes().to_vec()),
        Value::Integer(record.recorded_ns),
    ]
}

/// The content hash in column `at`, read in place (no copy per row: a
/// restart reads 200,000 of them).
fn hash_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Result<ContentHash, String>> {
    Ok(match row.get_ref(at)?.as_blob() {
        Ok(bytes) => ContentHash::from_slice(bytes).map_err(|e| e.to_string()),
        Err(err) => Err(format!("hash column: {err}")),
    })
}

pub fn cache_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<Result<CacheRecord, String>> {
    let hash = hash_at(row, at + 7)?;
    let stat = Stat {
        kind: kind_from_code(row.get(at)?),
        size: row.get::<_, i64>(at + 1)? as u64,
        mtime_ns: row.get(at + 2)?,
        ctime_ns: row.get(at + 3)?,
        ino: row.get::<_, i64>(at + 4)? as u64,
        dev: row.get::<_, i64>(at + 5)? as u64,
        mode: row.get::<_, i64>(at + 6)? as u32,
    };
    let recorded_ns = row.get(at + 8)?;
    Ok(hash.map(|hash| CacheRecord {
        stat,
        hash,
        recorded_ns,
    }))
}

/// Bounds for "everything strictly under `dir`": paths in `(dir + "/", dir + "0")`,
/// since '0' is the byte after '/'.
pub fn subtree_bounds(dir: &str) -> (String, String) {
    (format!("{dir}/"), format!("{dir}0"))
}
