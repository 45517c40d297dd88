//! The hub's database: workspaces, journal, mirror hash cache, conflicts.

use std::path::Path;

use gm_chunk::Manifest;
use gm_core::{CacheRecord, ContentHash, Entry, RelPath, Seq, Versioned, WorkspaceId};
use rusqlite::{OptionalExtension, params};

use crate::cache;
use crate::codec::{entry_columns, entry_from_row, subtree_bounds};
use crate::{Sqlite, StoreError, open_with};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    created_unix INTEGER NOT NULL,
    halted TEXT,
    confirm_empty INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- The journal, compacted: each path's latest state and the seq that made it.
-- Tombstones (kind 0) stay so that "changes since N" reports deletions.
CREATE TABLE entries (
    ws TEXT NOT NULL REFERENCES workspaces(id),
    path TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    hash BLOB,
    size INTEGER NOT NULL,
    executable INTEGER NOT NULL,
    target TEXT,
    origin TEXT NOT NULL,
    PRIMARY KEY (ws, path)
) WITHOUT ROWID;
CREATE UNIQUE INDEX entries_by_seq ON entries (ws, seq);
CREATE INDEX entries_by_hash ON entries (ws, hash) WHERE hash IS NOT NULL;
CREATE TABLE hash_cache (
    ws TEXT NOT NULL,
    path TEXT NOT NULL,
    kind INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    hash BLOB NOT NULL,
    recorded_ns INTEGER NOT NULL,
    PRIMARY KEY (ws, path)
) WITHOUT ROWID;
CREATE TABLE conflicts (
    ws TEXT NOT NULL REFERENCES workspaces(id),
    path TEXT NOT NULL,
    copy_path TEXT NOT NULL,
    node TEXT NOT NULL,
    at_unix INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX conflicts_by_ws ON conflicts (ws, seq);
"#,
    // 2: chunk index of large files; content lookups in the cache.
    concat!(
        cache::chunks_schema!(),
        "CREATE INDEX hash_cache_by_hash ON hash_cache (ws, hash);\n"
    ),
    // 3: chunk rows left without the record they describe.
    cache::drop_stale_chunks!(),
];

/// Live files with a content hash, through the partial by-hash index.
pub(crate) const PATHS_WITH_HASH: &str = "SELECT path FROM entries INDEXED BY entries_by_hash WHERE ws = ?1 AND hash = ?2 AND kind = 1 LIMIT ?3";

pub struct HubDb {
    sqlite: Sqlite,
    hub_id: String,
}

impl std::ops::Deref for HubDb {
    type Target = Sqlite;

    fn deref(&self) -> &Sqlite {
        &self.sqlite
    }
}

#[derive(Debug, Clone)]
pub struct HubWorkspace {
    pub id: WorkspaceId,
    pub epoch: String,
    pub seq: Seq,
    pub halted: Option<String>,
    pub confirm_empty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRow {
    pub path: RelPath,
    pub copy_path: RelPath,
    pub node: String,
    pub at_unix: i64,
    pub seq: Seq,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkspaceCounts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// One atomic journal step. The caller (holding the workspace's commit
/// lock) numbers the changes: seqs must be increasing and above the
/// workspace's current seq.
#[derive(Debug, Default)]
pub struct RecordBatch {
    pub changes: Vec<(RelPath, Versioned)>,
    /// Who made the changes: a node id, or "hub" for changes found in the mirror.
    pub origin: String,
    pub cache_put: Vec<(RelPath, CacheRecord)>,
    pub cache_del: Vec<RelPath>,
    /// Chunk lists of large files among `cache_put`.
    pub manifests: Vec<(RelPath, Manifest)>,
    pub conflicts: Vec<ConflictRow>,
}

/// A 128-bit random id in hex (hub ids, workspace epochs).
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl HubDb {
    pub fn open(path: &Path) -> Result<HubDb, StoreError> {
        let shown = path.display().to_string();
        let conn = open_with(path, MIGRATIONS)?;
        let existing: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'hub_id'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|source| StoreError::Sqlite {
                path: shown.clone(),
                source,
            })?;
        let hub_id = match existing {
            Some(id) => id,
            None => {
                let id = random_id();
                conn.execute("INSERT INTO meta (key, value) VALUES ('hub_id', ?1)", [&id])
                    .map_err(|source| StoreError::Sqlite {
                        path: shown.clone(),
                        source,
                    })?;
                id
            }
        };
        Ok(HubDb {
            sqlite: Sqlite::new(shown, conn),
            hub_id,
        })
    }

    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    pub fn workspaces(&self) -> Result<Vec<HubWorkspace>, StoreError> {
        let rows: Vec<(String, String, i64, Option<String>, i64)> = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, epoch, seq, halted, confirm_empty FROM workspaces ORDER BY id",
            )?;
            stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect()
        })?;
        rows.into_iter()
            .map(|(id, epoch, seq, halted, confirm)| {
                Ok(HubWorkspace {
                    id: WorkspaceId::new(&id).map_err(|e| self.corrupt(e.to_string()))?,
                    epoch,
                    seq: Seq(seq as u64),
                    halted,
                    confirm_empty: confirm != 0,
                })
            })
            .collect()
    }

    pub fn workspace(&self, ws: &WorkspaceId) -> Result<Option<HubWorkspace>, StoreError> {
        Ok(self.workspaces()?.into_iter().find(|w| &w.id == ws))
    }

    /// Returns the workspace, creating it (with a fresh epoch) if new.
    pub fn ensure_workspace(
        &self,
        ws: &WorkspaceId,
        now_unix: i64,
    ) -> Result<HubWorkspace, StoreError> {
        let epoch = random_id();
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO workspaces (id, epoch, seq, created_unix) VALUES (?1, ?2, 0, ?3)",
                params![ws.as_str(), epoch, now_unix],
            )
        })?;
        self.workspace(ws)?
            .ok_or_else(|| StoreError::UnknownWorkspace(ws.to_string()))
    }

    pub fn set_halted(&self, ws: &WorkspaceId, reason: Option<&str>) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET halted = ?2 WHERE id = ?1",
                params![ws.as_str(), reason],
            )
        })?;
        Ok(())
    }

    /// Removes every trace of a workspace (journal, cache, chunk index,
    /// conflict log): after its mirror was purged. A node attaching the id
    /// again starts a new journal with a new epoch.
    pub fn forget_workspace(&self, ws: &WorkspaceId) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            for table in ["entries", "hash_cache", "chunks", "conflicts"] {
                tx.execute(&format!("DELETE FROM {table} WHERE ws = ?1"), [ws.as_str()])?;
            }
            tx.execute("DELETE FROM workspaces WHERE id = ?1", [ws.as_str()])?;
            tx.commit()
        })
    }

    /// Marks an emptying of the mirror as deliberate (`ghostmirror confirm-empty`).
    pub fn request_confirm_empty(&self, ws: &WorkspaceId) -> Result<bool, StoreError> {
        let changed = self.with(|c| {
            c.execute(
                "UPDATE workspaces SET confirm_empty = 1 WHERE id = ?1",
                params![ws.as_str()],
            )
        })?;
        Ok(changed > 0)
    }

    /// Consumes a pending confirmation.
    pub fn take_confirm_empty(&self, ws: &WorkspaceId) -> Result<bool, StoreError> {
        let changed = self.with(|c| {
            c.execute(
                "UPDATE workspaces SET confirm_empty = 0 WHERE id = ?1 AND confirm_empty = 1",
                params![ws.as_str()],
            )
        })?;
        Ok(changed > 0)
    }

    pub fn entry(&self, ws: &WorkspaceId, path: &RelPath) -> Result<Option<Versioned>, StoreError> {
        let row = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, kind, hash, size, executable, target FROM entries WHERE ws = ?1 AND path = ?2",
            )?;
            stmt.query_row(params![ws.as_str(), path.as_str()], |r| Ok((r.get::<_, i64>(0)?, entry_from_row(r, 1)?)))
                .optional()
        })?;
        match row {
            None => Ok(None),
            Some((seq, entry)) => Ok(Some(Versioned {
                entry: entry.map_err(|e| self.corrupt(e))?,
                seq: Seq(seq as u64),
            })),
        }
    }

    /// Who journaled the current state of a path: a node id, or "hub" for
    /// a change found in the mirror. `None` for a path never journaled.
    pub fn origin(&self, ws: &WorkspaceId, path: &RelPath) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT origin FROM entries WHERE ws = ?1 AND path = ?2")?;
            stmt.query_row(params![ws.as_str(), path.as_str()], |r| r.get(0))
                .optional()
        })
    }

    /// Every journaled path at or under `top` (all paths when `None`),
    /// tombstones included, ordered by path.
    pub fn entries_under(
        &self,
        ws: &WorkspaceId,
        top: Option<&RelPath>,
    ) -> Result<Vec<(RelPath, Versioned)>, StoreError> {
        let rows: Vec<(String, i64, Result<Option<Entry>, String>)> = self.with(|c| match top {
            None => {
                let mut stmt = c.prepare_cached(
                    "SELECT path, seq, kind, hash, size, executable, target FROM entries WHERE ws = ?1 ORDER BY path",
                )?;
                stmt.query_map([ws.as_str()], |r| Ok((r.get(0)?, r.get(1)?, entry_from_row(r, 2)?)))?
                    .collect()
            }
            Some(top) => {
                let (low, high) = subtree_bounds(top.as_str());
                let mut stmt = c.prepare_cached(
                    "SELECT path, seq, kind, hash, size, executable, target FROM entries
                     WHERE ws = ?1 AND (path = ?2 OR (path > ?3 AND path < ?4)) ORDER BY path",
                )?;
                stmt.query_map(params![ws.as_str(), top.as_str(), low, high], |r| {
                    Ok((r.get(0)?, r.get(1)?, entry_from_row(r, 2)?))
                })?
                .collect()
            }
        })?;
        self.versioned_rows(rows)
    }

    /// True when some live entry sits strictly under `dir`.
    pub fn has_live_children(&self, ws: &WorkspaceId, dir: &RelPath) -> Result<bool, StoreError> {
        let (low, high) = subtree_bounds(dir.as_str());
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM entries WHERE ws = ?1 AND path > ?2 AND path < ?3 AND kind != 0)",
            )?;
            stmt.query_row(params![ws.as_str(), low, high], |r| r.get(0))
        })
    }

    /// Journal entries with seq > `since`, in seq order, at most `limit`.
    pub fn changes_since(
        &self,
        ws: &WorkspaceId,
        since: Seq,
        limit: usize,
    ) -> Result<Vec<(RelPath, Versioned)>, StoreError> {
        let rows: Vec<(String, i64, Result<Option<Entry>, String>)> = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT path, seq, kind, hash, size, executable, target FROM entries
                 WHERE ws = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            stmt.query_map(params![ws.as_str(), since.0 as i64, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, entry_from_row(r, 2)?))
            })?
            .collect()
        })?;
        self.versioned_rows(rows)
    }

    /// Live files holding content `hash` (for local copies instead of transfers).
    /// Names its index, as `cache::LOCATE_CHUNK` explains.
    pub fn paths_with_hash(
        &self,
        ws: &WorkspaceId,
        hash: &ContentHash,
        limit: usize,
    ) -> Result<Vec<RelPath>, StoreError> {
        let rows: Vec<String> = self.with(|c| {
            let mut stmt = c.prepare_cached(PATHS_WITH_HASH)?;
            stmt.query_map(
                params![ws.as_str(), hash.as_bytes().as_slice(), limit as i64],
                |r| r.get(0),
            )?
            .collect()
        })?;
        rows.into_iter().map(|p| self.path_of(p)).collect()
    }

    /// Applies one batch atomically (a `write_tx`: the registry shares
    /// `state.db`).
    pub fn record(&self, ws: &WorkspaceId, batch: &RecordBatch) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            let mut last: i64 = tx.query_row("SELECT seq FROM workspaces WHERE id = ?1", [ws.as_str()], |r| r.get(0))?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO entries (ws, path, seq, kind, hash, size, executable, target, origin)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for (path, state) in &batch.changes {
                    let seq = state.seq.0 as i64;
                    if seq <= last {
                        return Err(rusqlite::Error::ToSqlConversionFailure(
                            format!("journal seq {seq} for {path} is not above {last}").into(),
                        ));
                    }
                    last = seq;
                    let [kind, hash, size, exec, target] = entry_columns(state.entry.as_ref());
                    put.execute(params![ws.as_str(), path.as_str(), seq, kind, hash, size, exec, target, batch.origin])?;
                }
            }
            tx.execute("UPDATE workspaces SET seq = ?2 WHERE id = ?1", params![ws.as_str(), last])?;
            cache::put(&tx, ws, &batch.cache_put, &batch.cache_del, &batch.manifests)?;
            {
                let mut log = tx.prepare_cached(
                    "INSERT INTO conflicts (ws, path, copy_path, node, at_unix, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for conflict in &batch.conflicts {
                    log.execute(params![
                        ws.as_str(),
                        conflict.path.as_str(),
                        conflict.copy_path.as_str(),
                        conflict.node,
                        conflict.at_unix,
                        conflict.seq.0 as i64
                    ])?;
                }
            }
            tx.commit()
        })
    }

    /// Updates cache records only (no journal change).
    pub fn update_cache(
        &self,
        ws: &WorkspaceId,
        put: &[(RelPath, CacheRecord)],
        del: &[RelPath],
        manifests: &[(RelPath, Manifest)],
    ) -> Result<(), StoreError> {
        if put.is_empty() && del.is_empty() && manifests.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            cache::put(&tx, ws, put, del, manifests)?;
            tx.commit()
        })
    }

    pub fn conflicts(&self, ws: &WorkspaceId) -> Result<Vec<ConflictRow>, StoreError> {
        let rows: Vec<(String, String, String, i64, i64)> = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT path, copy_path, node, at_unix, seq FROM conflicts WHERE ws = ?1 ORDER BY seq",
            )?;
            stmt.query_map([ws.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                .collect()
        })?;
        rows.into_iter()
            .map(|(path, copy, node, at_unix, seq)| {
                Ok(ConflictRow {
                    path: self.path_of(path)?,
                    copy_path: self.path_of(copy)?,
                    node,
                    at_unix,
                    seq: Seq(seq as u64),
                })
            })
            .collect()
    }

    pub fn counts(&self, ws: &WorkspaceId) -> Result<WorkspaceCounts, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT
                    COALESCE(SUM(kind = 1), 0), COALESCE(SUM(kind = 2), 0), COALESCE(SUM(kind = 3), 0),
                    COALESCE(SUM(CASE WHEN kind = 1 THEN size ELSE 0 END), 0)
                 FROM entries WHERE ws = ?1",
            )?;
            stmt.query_row([ws.as_str()], |r| {
                Ok(WorkspaceCounts {
                    files: r.get::<_, i64>(0)? as u64,
                    dirs: r.get::<_, i64>(1)? as u64,
                    symlinks: r.get::<_, i64>(2)? as u64,
                    bytes: r.get::<_, i64>(3)? as u64,
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkLocation;
    use gm_core::{Kind, Stat};

    fn rel(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    fn file(content: &[u8]) -> Entry {
        Entry::File {
            hash: ContentHash::of(content),
            size: content.len() as u64,
            executable: false,
        }
    }

    /// The cache record of a 1-byte file holding `x`.
    fn x_record() -> CacheRecord {
        CacheRecord {
            stat: Stat {
                kind: Kind::File,
                size: 1,
                mtime_ns: 5,
                ctime_ns: 6,
                ino: 7,
                dev: 8,
                mode: 0o644,
            },
            hash: ContentHash::of(b"x"),
            recorded_ns: 9,
        }
    }

    #[test]
    fn journal_seqs_and_changes_since() {
        let dir = tempfile::tempdir().unwrap();
        let db = HubDb::open(&dir.path().join("state.db")).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        let created = db.ensure_workspace(&ws, 1).unwrap();
        assert_eq!(created.seq, Seq(0));
        let at = |entry, seq| Versioned {
            entry,
            seq: Seq(seq),
        };
        let batch = RecordBatch {
            changes: vec![
                (rel("d"), at(Some(Entry::Dir), 1)),
                (rel("d/f"), at(Some(file(b"x")), 2)),
            ],
            origin: "node-a".into(),
            ..Default::default()
        };
        db.record(&ws, &batch).unwrap();
        let tomb = RecordBatch {
            changes: vec![(rel("d/f"), at(None, 3))],
            origin: "node-a".into(),
            ..Default::default()
        };
        db.record(&ws, &tomb).unwrap();
        let stale = RecordBatch {
            changes: vec![(rel("x"), at(None, 3))],
            origin: "node-a".into(),
            ..Default::default()
        };
        assert!(db.record(&ws, &stale).is_err(), "a seq is never reused");
        let since = db.changes_since(&ws, Seq(1), 100).unwrap();
        assert_eq!(since.len(), 1, "the file's latest state only: {since:?}");
        assert_eq!(
            since[0].1,
            Versioned {
                entry: None,
                seq: Seq(3)
            }
        );
        assert!(!db.has_live_children(&ws, &rel("d")).unwrap());
        assert_eq!(db.workspace(&ws).unwrap().unwrap().seq, Seq(3));
        assert_eq!(db.entries_under(&ws, Some(&rel("d"))).unwrap().len(), 2);
        assert_eq!(
            db.origin(&ws, &rel("d")).unwrap().as_deref(),
            Some("node-a")
        );
        assert_eq!(db.origin(&ws, &rel("never")).unwrap(), None);
        // Same epoch after reopening; state survives.
        drop(db);
        let db = HubDb::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(db.ensure_workspace(&ws, 2).unwrap().epoch, created.epoch);
        assert_eq!(db.counts(&ws).unwrap().dirs, 1);
    }

    /// Another connection to `state.db` (the registry's, through sqlx)
    /// writes all the time. A journal write must wait for it (busy
    /// timeout), never fail: a deferred transaction that read first got
    /// SQLITE_BUSY at once when it tried to write on a snapshot the other
    /// writer had made stale (seen as "scanning the mirror failed: database
    /// is locked" in the offline test, and the hub-side changes of that
    /// scan were not journaled until the next rescan).
    #[test]
    fn journal_writes_wait_for_another_writer_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let db = HubDb::open(&path).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        db.ensure_workspace(&ws, 1).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wrote = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let other = {
            let (path, stop, wrote) = (path.clone(), stop.clone(), wrote.clone());
            std::thread::spawn(move || {
                let conn = rusqlite::Connection::open(&path).unwrap();
                conn.busy_timeout(std::time::Duration::from_secs(10))
                    .unwrap();
                conn.execute("CREATE TABLE IF NOT EXISTS other (n INTEGER)", [])
                    .unwrap();
                let mut writes = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    conn.execute("INSERT INTO other (n) VALUES (1)", [])
                        .unwrap();
                    writes += 1;
                    wrote.store(writes, std::sync::atomic::Ordering::SeqCst);
                    // Busy writers, not a starving one: SQLite's busy wait
                    // is not fair, and an unbroken stream of commits can
                    // hold any other writer off past its timeout.
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                writes
            })
        };
        // The journal writes below race a writer that is already writing
        // (on a loaded machine the thread may start late).
        let started = std::time::Instant::now();
        while wrote.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the other writer never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for seq in 1..=400u64 {
            let batch = RecordBatch {
                changes: vec![(
                    rel(&format!("f{}", seq % 50)),
                    Versioned {
                        entry: Some(file(&seq.to_le_bytes())),
                        seq: Seq(seq),
                    },
                )],
                origin: "hub".into(),
                ..Default::default()
            };
            if let Err(err) = db.record(&ws, &batch) {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                panic!("journal write {seq} failed: {err}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(other.join().unwrap() > 0, "the other writer never wrote");
    }

    /// A hash column that is not a 32-byte blob (a damaged database) is a
    /// corrupt-row error naming the database, for cache and journal alike.
    #[test]
    fn a_damaged_hash_column_is_an_error_naming_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let db = HubDb::open(&path).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        db.ensure_workspace(&ws, 1).unwrap();
        db.update_cache(&ws, &[(rel("f"), x_record())], &[], &[])
            .unwrap();
        let batch = RecordBatch {
            changes: vec![(
                rel("f"),
                Versioned {
                    entry: Some(file(b"x")),
                    seq: Seq(1),
                },
            )],
            origin: "hub".into(),
            ..Default::default()
        };
        db.record(&ws, &batch).unwrap();
        assert_eq!(db.cache_under(&ws, None).unwrap().len(), 1);
        for (table, value) in [("hash_cache", "x'0102'"), ("entries", "'text'")] {
            db.with(|c| c.execute(&format!("UPDATE {table} SET hash = {value}"), []))
                .unwrap();
        }
        let shown = path.display().to_string();
        for err in [
            db.cache_under(&ws, None).map(|_| ()).unwrap_err(),
            db.entries_under(&ws, None).map(|_| ()).unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains(&shown), "{err}");
        }
    }

    #[test]
    fn cache_round_trip_and_subtree_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let db = HubDb::open(&dir.path().join("state.db")).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        db.ensure_workspace(&ws, 1).unwrap();
        let record = x_record();
        db.update_cache(
            &ws,
            &[
                (rel("a/x"), record),
                (rel("a-b"), record),
                (rel("a"), record),
            ],
            &[],
            &[],
        )
        .unwrap();
        let under = db.cache_under(&ws, Some(&rel("a"))).unwrap();
        assert_eq!(under.len(), 2, "a and a/x, not a-b");
        assert_eq!(under.get(&rel("a/x")), Some(&record));
        // Chunk lists are stored, found by chunk hash, and go with their record.
        let chunk = |b: &[u8]| gm_chunk::ChunkRef {
            len: b.len() as u32,
            hash: ContentHash::of(b),
        };
        let manifest = Manifest {
            chunks: vec![chunk(b"one"), chunk(b"second")],
        };
        // (A chunk list sums to its file's size.)
        let large = CacheRecord {
            stat: Stat {
                size: 9,
                ..record.stat
            },
            ..record
        };
        db.update_cache(
            &ws,
            &[(rel("a/x"), large)],
            &[],
            &[(rel("a/x"), manifest.clone())],
        )
        .unwrap();
        assert_eq!(db.manifest(&ws, &rel("a/x")).unwrap(), Some(manifest));
        let found = db
            .locate_chunks(
                &ws,
                &[
                    ContentHash::of(b"second"),
                    ContentHash::of(b"x"),
                    ContentHash::of(b"none"),
                ],
            )
            .unwrap();
        assert_eq!(
            found[&ContentHash::of(b"second")],
            ChunkLocation {
                path: rel("a/x"),
                offset: 3,
                len: 6
            }
        );
        assert_eq!(
            found[&ContentHash::of(b"x")].offset,
            0,
            "a whole small file is a chunk too"
        );
        assert!(!found.contains_key(&ContentHash::of(b"none")));
        db.update_cache(&ws, &[], &[rel("a/x")], &[]).unwrap();
        assert_eq!(db.cache_under(&ws, None).unwrap().len(), 2);
        assert_eq!(
            db.manifest(&ws, &rel("a/x")).unwrap(),
            None,
            "chunks leave with their record"
        );
    }

    /// Found by the crash test with real processes (tests/faults.rs): a
    /// round scanned a large file (queueing its chunk list), then moved it
    /// to its conflict-copy name (queueing the removal of its record) in
    /// the same batch. The removal went first and the chunk list was
    /// written after it: chunk rows for a path with no record, which no
    /// scan ever cleans up. Every later download of that path planned its
    /// bytes from a file that was not there, failed, and the node proposed
    /// a deletion again and again. Likewise a list queued before a write of
    /// smaller content at the path.
    #[test]
    fn chunk_lists_never_outlive_the_record_they_describe() {
        let dir = tempfile::tempdir().unwrap();
        let db = HubDb::open(&dir.path().join("state.db")).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        db.ensure_workspace(&ws, 1).unwrap();
        let chunk = |b: &[u8]| gm_chunk::ChunkRef {
            len: b.len() as u32,
            hash: ContentHash::of(b),
        };
        let manifest = Manifest {
            chunks: vec![chunk(b"one"), chunk(b"second")],
        };
        let record = |size: u64| CacheRecord {
            stat: Stat {
                kind: Kind::File,
                size,
                mtime_ns: 5,
                ctime_ns: 6,
                ino: 7,
                dev: 8,
                mode: 0o644,
            },
            hash: ContentHash::of(b"whole"),
            recorded_ns: 9,
        };
        let second = ContentHash::of(b"second");
        // Removed in the same batch.
        db.update_cache(&ws, &[], &[rel("gone")], &[(rel("gone"), manifest.clone())])
            .unwrap();
        // Replaced by a smaller file in the same batch.
        db.update_cache(
            &ws,
            &[(rel("small"), record(2))],
            &[],
            &[(rel("small"), manifest.clone())],
        )
        .unwrap();
        assert_eq!(db.manifest(&ws, &rel("gone")).unwrap(), None);
        assert_eq!(db.manifest(&ws, &rel("small")).unwrap(), None);
        assert!(db.locate_chunks(&ws, &[second]).unwrap().is_empty());
        // The list of the record's own content stays.
        db.update_cache(
            &ws,
            &[(rel("large"), record(9))],
            &[],
            &[(rel("large"), manifest.clone())],
        )
        .unwrap();
        assert_eq!(
            db.locate_chunks(&ws, &[second]).unwrap()[&second].path,
            rel("large")
        );

        // Rows left by earlier versions go when the database is opened.
        drop(db);
        let raw = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        raw.execute(
            "INSERT INTO chunks (ws, path, idx, offset, len, hash) VALUES ('w', 'orphan', 0, 0, 6, ?1)",
            [ContentHash::of(b"orphan").as_bytes().as_slice()],
        )
        .unwrap();
        raw.pragma_update(None, "user_version", 2).unwrap();
        drop(raw);
        let db = HubDb::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(db.manifest(&ws, &rel("orphan")).unwrap(), None);
        assert_eq!(
            db.locate_chunks(&ws, &[second]).unwrap()[&second].path,
            rel("large")
        );
    }
}
