//! ghostmirror's persistent state, on SQLite: the only crate that speaks SQL.
//!
//! - `HubDb` (`DATA_DIR/state.db`): workspaces, the per-workspace journal
//!   (`entries`: each path's latest state and the seq that made it,
//!   tombstones included, so "changes since N" is an index range scan),
//!   the mirror hash cache and the conflict log.
//! - `NodeDb` (`STATE_DIR/node.db`): bound workspaces, the synced tree
//!   (merge base) with its seqs, and the local hash cache.
//!
//! Guarantees: WAL mode with `synchronous=FULL`, so a committed transaction
//! survives a crash (a journal seq handed to a node is never reused); each
//! batch of changes is one transaction; schema changes are numbered
//! migrations applied at open (`PRAGMA user_version`). Calls block: async
//! callers run them on blocking threads.

#[macro_use]
pub mod cache;
mod codec;
pub mod hub;
pub mod node;

pub use cache::ChunkLocation;

use std::collections::HashMap;

use gm_chunk::Manifest;
use gm_core::{CacheRecord, CacheRecords, ContentHash, RelPath, Seq, Versioned, WorkspaceId};
pub use hub::{ConflictRow, HubDb, HubWorkspace, RecordBatch, WorkspaceCounts};
pub use node::{NodeBatch, NodeDb, NodeWorkspace};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: corrupt row: {what}")]
    Corrupt { path: String, what: String },
    #[error(
        "database {path} has schema version {found}, newer than this build knows ({known}); upgrade ghostmirror"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("unknown workspace {0}")]
    UnknownWorkspace(String),
}

/// One SQLite file of the sync state: its connection (used from blocking
/// threads only) and what the hub's and the node's databases share: row
/// decoding and the hash cache with its chunk index.
pub struct Sqlite {
    path: String,
    conn: std::sync::Mutex<rusqlite::Connection>,
}

/// A write transaction: it takes the write lock when it begins (waiting
/// on the busy timeout), so it never reads a snapshot another connection
/// (the registry's, on the hub's `state.db`) makes stale before it writes.
/// A deferred one that read first failed at once with SQLITE_BUSY then.
pub(crate) fn write_tx(
    conn: &mut rusqlite::Connection,
) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

pub(crate) type VersionedRow = (String, i64, Result<Option<gm_core::Entry>, String>);

impl Sqlite {
    fn new(path: String, conn: rusqlite::Connection) -> Sqlite {
        Sqlite {
            path,
            conn: std::sync::Mutex::new(conn),
        }
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    pub(crate) fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    pub(crate) fn path_of(&self, raw: String) -> Result<RelPath, StoreError> {
        RelPath::from_string(raw).map_err(|e| self.corrupt(e.to_string()))
    }

    /// Decodes `(path, seq, entry columns)` rows of the journal or the synced tree.
    pub(crate) fn versioned_rows(
        &self,
        rows: Vec<VersionedRow>,
    ) -> Result<Vec<(RelPath, Versioned)>, StoreError> {
        rows.into_iter()
            .map(|(path, seq, entry)| {
                Ok((
                    self.path_of(path)?,
                    Versioned {
                        entry: entry.map_err(|e| self.corrupt(e))?,
                        seq: Seq(seq as u64),
                    },
                ))
            })
            .collect()
    }

    /// The cache record of one path.
    pub fn cache_get(
        &self,
        ws: &WorkspaceId,
        path: &RelPath,
    ) -> Result<Option<CacheRecord>, StoreError> {
        let row = self.with(|c| cache::get(c, ws, path))?;
        row.transpose().map_err(|e| self.corrupt(e))
    }

    /// Cache records at or under `top` (all when `None`).
    pub fn cache_under(
        &self,
        ws: &WorkspaceId,
        top: Option<&RelPath>,
    ) -> Result<CacheRecords, StoreError> {
        let rows = self.with(|c| cache::under(c, ws, top))?;
        let records = rows
            .into_iter()
            .map(|(path, record)| Ok((self.path_of(path)?, record.map_err(|e| self.corrupt(e))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(CacheRecords::from_sorted(records))
    }

    /// The stored chunk list of `path` (`None` when none is stored).
    pub fn manifest(
        &self,
        ws: &WorkspaceId,
        path: &RelPath,
    ) -> Result<Option<Manifest>, StoreError> {
        let rows = self.with(|c| cache::manifest(c, ws, path))?;
        if rows.is_empty() {
            return Ok(None);
        }
        cache::decode_manifest(rows)
            .map(Some)
            .map_err(|e| self.corrupt(e))
    }

    /// Where each chunk hash can be read locally, for those that can.
    pub fn locate_chunks(
        &self,
        ws: &WorkspaceId,
        hashes: &[ContentHash],
    ) -> Result<HashMap<ContentHash, ChunkLocation>, StoreError> {
        let rows = self.with(|c| cache::locate(c, ws, hashes))?;
        let mut out = HashMap::with_capacity(rows.len());
        for (hash, (path, offset, len)) in rows {
            out.insert(
                hash,
                ChunkLocation {
                    path: self.path_of(path)?,
                    offset,
                    len,
                },
            );
        }
        Ok(out)
    }
}

/// Opens a SQLite file with the project's pragmas and applies `migrations`.
fn open_with(
    path: &std::path::Path,
    migrations: &[&str],
) -> Result<rusqlite::Connection, StoreError> {
    let shown = path.display().to_string();
    let err = |source| StoreError::Sqlite {
        path: shown.clone(),
        source,
    };
    let mut conn = rusqlite::Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(err)?;
    let known = migrations.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: shown,
            found: version,
            known,
        });
    }
    for (index, sql) in migrations.iter().enumerate().skip(version as usize) {
        let tx = write_tx(&mut conn).map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(database = %shown, version = index + 1, "applied schema migration");
    }
    Ok(conn)
}

#[cfg(test)]
mod plans {
    //! Lookups by content hash must use their index on both databases (the
    //! planner's default there was a scan of the workspace's rows).
    use super::*;

    fn plan(db: &Sqlite, sql: &str, args: usize) -> String {
        db.with(|c| {
            let values: Vec<rusqlite::types::Value> = [
                rusqlite::types::Value::Text("w".into()),
                rusqlite::types::Value::Blob(vec![7; 32]),
                rusqlite::types::Value::Integer(3),
            ][..args]
                .to_vec();
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let rows: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(values), |r| r.get(3))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows.join("; "))
        })
        .unwrap()
    }

    #[test]
    fn lookups_by_hash_search_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubDb::open(&dir.path().join("state.db")).unwrap();
        let node = NodeDb::open(&dir.path().join("node.db")).unwrap();
        let cases: [(&Sqlite, &str, usize, &str); 5] = [
            (
                &hub,
                cache::LOCATE_CHUNK,
                2,
                "chunks_by_hash (ws=? AND hash=?)",
            ),
            (
                &hub,
                cache::LOCATE_WHOLE,
                2,
                "hash_cache_by_hash (ws=? AND hash=?)",
            ),
            (
                &hub,
                hub::PATHS_WITH_HASH,
                3,
                "entries_by_hash (ws=? AND hash=?)",
            ),
            (
                &node,
                cache::LOCATE_CHUNK,
                2,
                "chunks_by_hash (ws=? AND hash=?)",
            ),
            (
                &node,
                cache::LOCATE_WHOLE,
                2,
                "hash_cache_by_hash (ws=? AND hash=?)",
            ),
        ];
        for (db, sql, args, index) in cases {
            let found = plan(db, sql, args);
            assert!(found.contains(index), "{sql}: {found}");
            assert!(!found.contains("PRIMARY KEY"), "{sql}: {found}");
        }
    }
}
