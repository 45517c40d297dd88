//! The hash cache and chunk index, shared by the hub's and the node's
//! databases (same tables, same rules): `hash_cache` maps a path to the
//! stat it was hashed at and its content hash; `chunks` holds the chunk
//! list of large files, indexed by chunk hash so a receiver finds any chunk
//! it already has anywhere in the workspace with one lookup. A path's
//! chunk rows are replaced or removed whenever its cache record is, and
//! exist only next to a record of the same size.

use std::collections::HashMap;

use gm_chunk::{ChunkRef, Manifest};
use gm_core::{CacheRecord, ContentHash, RelPath, WorkspaceId};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use crate::codec::{cache_columns, cache_from_row, subtree_bounds};

/// Schema shared by both databases (part of their second migration).
macro_rules! chunks_schema {
    () => {
        r#"
CREATE TABLE chunks (
    ws TEXT NOT NULL,
    path TEXT NOT NULL,
    idx INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    len INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (ws, path, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_hash ON chunks (ws, hash);
"#
    };
}
pub(crate) use chunks_schema;

/// Migration shared by both databases (their third): removes chunk rows
/// that have no cache record of their list's size, left by batches that
/// removed or replaced a record after queueing its chunk list (see `put`).
macro_rules! drop_stale_chunks {
    () => {
        r#"
DELETE FROM chunks WHERE NOT EXISTS (
    SELECT 1 FROM hash_cache h
    WHERE h.ws = chunks.ws AND h.path = chunks.path
      AND h.size = (SELECT SUM(c.len) FROM chunks c WHERE c.ws = chunks.ws AND c.path = chunks.path)
);
"#
    };
}
pub(crate) use drop_stale_chunks;

const COLUMNS: &str = "path, kind, size, mtime_ns, ctime_ns, ino, dev, mode, hash, recorded_ns";

/// Where a chunk with some hash can be read locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub path: RelPath,
    pub offset: u64,
    pub len: u32,
}

/// Writes cache records (replacing chunk lists) and removes others.
pub fn put(
    tx: &rusqlite::Transaction<'_>,
    ws: &WorkspaceId,
    put: &[(RelPath, CacheRecord)],
    del: &[RelPath],
    manifests: &[(RelPath, Manifest)],
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO hash_cache (ws, path, kind, size, mtime_ns, ctime_ns, ino, dev, mode, hash, recorded_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let mut drop_chunks = tx.prepare_cached("DELETE FROM chunks WHERE ws = ?1 AND path = ?2")?;
    for (path, record) in put {
        let mut values: Vec<rusqlite::types::Value> = vec![
            ws.as_str().to_string().into(),
            path.as_str().to_string().into(),
        ];
        values.extend(cache_columns(record));
        insert.execute(params_from_iter(values))?;
        drop_chunks.execute(params![ws.as_str(), path.as_str()])?;
    }
    let mut delete = tx.prepare_cached("DELETE FROM hash_cache WHERE ws = ?1 AND path = ?2")?;
    for path in del {
        delete.execute(params![ws.as_str(), path.as_str()])?;
        drop_chunks.execute(params![ws.as_str(), path.as_str()])?;
    }
    // A chunk list describes the content of its path's cache record. One
    // queued for content that the same batch then replaced or removed (a
    // scan's list, then a write or a deletion of that path) must not
    // outlive it: chunk rows are written only where the path has a record
    // of the list's size (the records above are already in place). Rows
    // without a record would never be cleaned up (a scan only drops what
    // has a record) and would be offered as a local source of bytes the
    // disk no longer holds.
    let mut size_of =
        tx.prepare_cached("SELECT size FROM hash_cache WHERE ws = ?1 AND path = ?2")?;
    let mut chunk = tx.prepare_cached("INSERT OR REPLACE INTO chunks (ws, path, idx, offset, len, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
    for (path, manifest) in manifests {
        drop_chunks.execute(params![ws.as_str(), path.as_str()])?;
        let total: i64 = manifest.chunks.iter().map(|c| i64::from(c.len)).sum();
        let size: Option<i64> = size_of
            .query_row(params![ws.as_str(), path.as_str()], |r| r.get(0))
            .optional()?;
        if size != Some(total) {
            continue;
        }
        let mut offset = 0i64;
        for (idx, c) in manifest.chunks.iter().enumerate() {
            chunk.execute(params![
                ws.as_str(),
                path.as_str(),
                idx as i64,
                offset,
                i64::from(c.len),
                c.hash.as_bytes().as_slice()
            ])?;
            offset += i64::from(c.len);
        }
    }
    Ok(())
}

type Decoded = Result<CacheRecord, String>;

/// Cache records at or under `top` (all when `None`), in path order.
pub fn under(
    conn: &Connection,
    ws: &WorkspaceId,
    top: Option<&RelPath>,
) -> rusqlite::Result<Vec<(String, Decoded)>> {
    match top {
        None => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM hash_cache WHERE ws = ?1 ORDER BY path"
            ))?;
            stmt.query_map([ws.as_str()], |r| Ok((r.get(0)?, cache_from_row(r, 1)?)))?
                .collect()
        }
        Some(top) => {
            let (low, high) = subtree_bounds(top.as_str());
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM hash_cache WHERE ws = ?1 AND (path = ?2 OR (path > ?3 AND path < ?4)) ORDER BY path"
            ))?;
            stmt.query_map(params![ws.as_str(), top.as_str(), low, high], |r| {
                Ok((r.get(0)?, cache_from_row(r, 1)?))
            })?
            .collect()
        }
    }
}

pub fn get(
    conn: &Connection,
    ws: &WorkspaceId,
    path: &RelPath,
) -> rusqlite::Result<Option<Decoded>> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, size, mtime_ns, ctime_ns, ino, dev, mode, hash, recorded_ns FROM hash_cache WHERE ws = ?1 AND path = ?2",
    )?;
    stmt.query_row(params![ws.as_str(), path.as_str()], |r| {
        cache_from_row(r, 0)
    })
    .optional()
}

/// The chunk list stored for `path` (empty for files below the chunking size).
pub fn manifest(
    conn: &Connection,
    ws: &WorkspaceId,
    path: &RelPath,
) -> rusqlite::Result<Vec<(u32, Vec<u8>)>> {
    let mut stmt = conn
        .prepare_cached("SELECT len, hash FROM chunks WHERE ws = ?1 AND path = ?2 ORDER BY idx")?;
    stmt.query_map(params![ws.as_str(), path.as_str()], |r| {
        Ok((r.get::<_, i64>(0)? as u32, r.get(1)?))
    })?
    .collect()
}

// Lookups by content hash name their index. Without it SQLite's planner
// (no statistics; WITHOUT ROWID tables) prefers the primary key's `ws = ?`
// prefix and scans the workspace's every row per lookup: a 512 MiB file's
// 6,700 chunk lookups took 1.3 s of the hub's CPU. `plans` tests pin these.
pub(crate) const LOCATE_CHUNK: &str = "SELECT path, offset, len FROM chunks INDEXED BY chunks_by_hash WHERE ws = ?1 AND hash = ?2 LIMIT 1";
pub(crate) const LOCATE_WHOLE: &str = "SELECT path, size FROM hash_cache INDEXED BY hash_cache_by_hash WHERE ws = ?1 AND hash = ?2 LIMIT 1";

/// Where each of `hashes` can be found locally: first a chunk of a large
/// file, else a whole small file with that content hash. One prepared
/// statement each, in one read.
pub fn locate(
    conn: &Connection,
    ws: &WorkspaceId,
    hashes: &[ContentHash],
) -> rusqlite::Result<HashMap<ContentHash, (String, u64, u32)>> {
    let mut out = HashMap::new();
    let mut chunk = conn.prepare_cached(LOCATE_CHUNK)?;
    let mut whole = conn.prepare_cached(LOCATE_WHOLE)?;
    for hash in hashes {
        if out.contains_key(hash) {
            continue;
        }
        let found: Option<(String, i64, i64)> = chunk
            .query_row(params![ws.as_str(), hash.as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let found = match found {
            Some(found) => Some(found),
            None => whole
                .query_row(params![ws.as_str(), hash.as_bytes().as_slice()], |r| {
                    Ok((r.get(0)?, 0i64, r.get(1)?))
                })
                .optional()?,
        };
        if let Some((path, offset, len)) = found {
            out.insert(*hash, (path, offset as u64, len as u32));
        }
    }
    Ok(out)
}

/// Decodes the rows of `manifest` into chunk refs.
pub fn decode_manifest(rows: Vec<(u32, Vec<u8>)>) -> Result<Manifest, String> {
    let mut chunks = Vec::with_capacity(rows.len());
    for (len, hash) in rows {
        chunks.push(ChunkRef {
            len,
            hash: ContentHash::from_slice(&hash).map_err(|e| e.to_string())?,
        });
    }
    Ok(Manifest { chunks })
}
