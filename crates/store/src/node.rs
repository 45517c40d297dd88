//! The node's database: bound workspaces, the synced tree (merge base) and
//! the local hash cache.

use std::path::Path;

use gm_chunk::Manifest;
use gm_core::{CacheRecord, Entry, RelPath, Seq, Versioned, WorkspaceId};
use rusqlite::{OptionalExtension, params};

use crate::cache;
use crate::codec::{entry_columns, entry_from_row};
use crate::{Sqlite, StoreError, open_with};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    epoch TEXT NOT NULL DEFAULT '',
    last_seq INTEGER NOT NULL DEFAULT 0,
    root_dev INTEGER,
    root_ino INTEGER,
    halted TEXT,
    confirm_empty INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- The synced tree: the last version of each path both sides agreed on.
CREATE TABLE synced (
    ws TEXT NOT NULL,
    path TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    hash BLOB,
    size INTEGER NOT NULL,
    executable INTEGER NOT NULL,
    target TEXT,
    PRIMARY KEY (ws, path)
) WITHOUT ROWID;
CREATE INDEX synced_by_hash ON synced (ws, hash) WHERE hash IS NOT NULL;
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
CREATE INDEX hash_cache_by_hash ON hash_cache (ws, hash);
"#,
    // 2: chunk index of large files.
    cache::chunks_schema!(),
    // 3: chunk rows left without the record they describe.
    cache::drop_stale_chunks!(),
    // 4: remote versions a round is about to write to disk (landing
    // intents) and local versions it is about to propose, so a run killed
    // before it persisted the round can tell what it wrote and what the hub
    // may have committed for it (`NodeDb::record_landings`,
    // `record_proposals`).
    r#"
CREATE TABLE proposal (
    ws TEXT NOT NULL,
    path TEXT NOT NULL,
    kind INTEGER NOT NULL,
    hash BLOB,
    size INTEGER NOT NULL,
    executable INTEGER NOT NULL,
    target TEXT,
    PRIMARY KEY (ws, path)
) WITHOUT ROWID;
CREATE TABLE landing (
    ws TEXT NOT NULL,
    path TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    hash BLOB,
    size INTEGER NOT NULL,
    executable INTEGER NOT NULL,
    target TEXT,
    PRIMARY KEY (ws, path)
) WITHOUT ROWID;
"#,
];

pub struct NodeDb {
    sqlite: Sqlite,
}

impl std::ops::Deref for NodeDb {
    type Target = Sqlite;

    fn deref(&self) -> &Sqlite {
        &self.sqlite
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeWorkspace {
    pub epoch: String,
    pub last_seq: Seq,
    /// (dev, ino) of the root directory when it was first synced.
    pub root_identity: Option<(u64, u64)>,
    pub halted: Option<String>,
    pub confirm_empty: bool,
}

/// One atomic step of the node's state.
#[derive(Debug, Default)]
pub struct NodeBatch {
    /// New synced versions (`entry == None`: remove from the synced tree).
    pub synced_put: Vec<(RelPath, Versioned)>,
    pub synced_del: Vec<RelPath>,
    pub cache_put: Vec<(RelPath, CacheRecord)>,
    pub cache_del: Vec<RelPath>,
    /// Chunk lists of large files among `cache_put`.
    pub manifests: Vec<(RelPath, Manifest)>,
    /// Raise the workspace's last seen seq to this (never lowered).
    pub last_seq: Option<Seq>,
    /// Forget the workspace's landing intents (what they announced is in
    /// `synced_put`, or was not written).
    pub clear_landings: bool,
    /// Replace the workspace's proposals in doubt by these.
    pub proposals: Option<Vec<(RelPath, Option<Entry>)>>,
}

impl NodeBatch {
    pub fn is_empty(&self) -> bool {
        self.synced_put.is_empty()
            && self.synced_del.is_empty()
            && self.cache_put.is_empty()
            && self.cache_del.is_empty()
            && self.manifests.is_empty()
            && self.last_seq.is_none()
            && !self.clear_landings
            && self.proposals.is_none()
    }
}

impl NodeDb {
    pub fn open(path: &Path) -> Result<NodeDb, StoreError> {
        let conn = open_with(path, MIGRATIONS)?;
        Ok(NodeDb {
            sqlite: Sqlite::new(path.display().to_string(), conn),
        })
    }

    pub fn workspace(&self, ws: &WorkspaceId) -> Result<Option<NodeWorkspace>, StoreError> {
        type Row = (String, i64, Option<i64>, Option<i64>, Option<String>, i64);
        let row: Option<Row> = self.with(|c| {
            c.query_row(
                "SELECT epoch, last_seq, root_dev, root_ino, halted, confirm_empty FROM workspaces WHERE id = ?1",
                [ws.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
        })?;
        Ok(row.map(
            |(epoch, last_seq, dev, ino, halted, confirm)| NodeWorkspace {
                epoch,
                last_seq: Seq(last_seq as u64),
                root_identity: dev.zip(ino).map(|(d, i)| (d as u64, i as u64)),
                halted,
                confirm_empty: confirm != 0,
            },
        ))
    }

    /// Creates the workspace row if missing.
    pub fn ensure_workspace(&self, ws: &WorkspaceId) -> Result<NodeWorkspace, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO workspaces (id) VALUES (?1)",
                [ws.as_str()],
            )
        })?;
        self.workspace(ws)?
            .ok_or_else(|| StoreError::UnknownWorkspace(ws.to_string()))
    }

    /// Starts over against a hub journal with another epoch: the synced tree
    /// is forgotten (files on disk stay and are merged like a first sync).
    pub fn reset_epoch(&self, ws: &WorkspaceId, epoch: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            tx.execute("DELETE FROM synced WHERE ws = ?1", [ws.as_str()])?;
            tx.execute("DELETE FROM landing WHERE ws = ?1", [ws.as_str()])?;
            tx.execute("DELETE FROM proposal WHERE ws = ?1", [ws.as_str()])?;
            tx.execute(
                "UPDATE workspaces SET epoch = ?2, last_seq = 0 WHERE id = ?1",
                params![ws.as_str(), epoch],
            )?;
            tx.commit()
        })
    }

    pub fn set_root_identity(
        &self,
        ws: &WorkspaceId,
        identity: (u64, u64),
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET root_dev = ?2, root_ino = ?3 WHERE id = ?1",
                params![ws.as_str(), identity.0 as i64, identity.1 as i64],
            )
        })?;
        Ok(())
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

    /// Marks an emptying (or replacement) of the root as deliberate.
    pub fn request_confirm_empty(&self, ws: &WorkspaceId) -> Result<bool, StoreError> {
        let changed = self.with(|c| {
            c.execute(
                "UPDATE workspaces SET confirm_empty = 1 WHERE id = ?1",
                [ws.as_str()],
            )
        })?;
        Ok(changed > 0)
    }

    /// Consumes a pending confirmation.
    pub fn take_confirm_empty(&self, ws: &WorkspaceId) -> Result<bool, StoreError> {
        let changed = self.with(|c| {
            c.execute(
                "UPDATE workspaces SET confirm_empty = 0 WHERE id = ?1 AND confirm_empty = 1",
                [ws.as_str()],
            )
        })?;
        Ok(changed > 0)
    }

    /// The rows of a table of versioned entries (`synced`, `landing`,
    /// `proposal`), with `seq_expr` as their seq column.
    fn read_versioned(
        &self,
        table: &str,
        seq_expr: &str,
        ws: &WorkspaceId,
    ) -> Result<Vec<crate::VersionedRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT path, {seq_expr}, kind, hash, size, executable, target FROM {table} WHERE ws = ?1 ORDER BY path"
            ))?;
            stmt.query_map([ws.as_str()], |r| Ok((r.get(0)?, r.get(1)?, entry_from_row(r, 2)?)))?
                .collect()
        })
    }

    /// The whole synced tree of a workspace.
    pub fn synced(&self, ws: &WorkspaceId) -> Result<Vec<(RelPath, Versioned)>, StoreError> {
        let rows = self.read_versioned("synced", "seq", ws)?;
        self.versioned_rows(rows)
    }

    pub fn apply(&self, ws: &WorkspaceId, batch: &NodeBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            {
                put_versioned(&tx, "synced", ws, &batch.synced_put)?;
                let mut del =
                    tx.prepare_cached("DELETE FROM synced WHERE ws = ?1 AND path = ?2")?;
                for path in &batch.synced_del {
                    del.execute(params![ws.as_str(), path.as_str()])?;
                }
            }
            cache::put(
                &tx,
                ws,
                &batch.cache_put,
                &batch.cache_del,
                &batch.manifests,
            )?;
            if batch.clear_landings {
                tx.execute("DELETE FROM landing WHERE ws = ?1", [ws.as_str()])?;
            }
            if let Some(proposals) = &batch.proposals {
                tx.execute("DELETE FROM proposal WHERE ws = ?1", [ws.as_str()])?;
                put_proposals(&tx, ws, proposals)?;
            }
            if let Some(seq) = batch.last_seq {
                tx.execute(
                    "UPDATE workspaces SET last_seq = MAX(last_seq, ?2) WHERE id = ?1",
                    params![ws.as_str(), seq.0 as i64],
                )?;
            }
            tx.commit()
        })
    }

    /// Records, durably, the remote versions a round is about to write to
    /// disk, before it writes them. If the process dies before the round
    /// persists what it did, the next run finds here what it may have
    /// written (see `NodeTrees::landed`). Cleared by `NodeBatch::clear_landings`.
    pub fn record_landings(
        &self,
        ws: &WorkspaceId,
        items: &[(RelPath, Versioned)],
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            put_versioned(&tx, "landing", ws, items)?;
            tx.commit()
        })
    }

    /// Records, durably, local versions about to be proposed: the hub may
    /// commit them although the answer never arrives (a cut connection, a
    /// kill), and the next run must then know the journal's version is its
    /// own (see `NodeTrees::in_doubt`). A batch's `proposals` replaces them.
    pub fn record_proposals(
        &self,
        ws: &WorkspaceId,
        items: &[(RelPath, Option<Entry>)],
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = crate::write_tx(c)?;
            put_proposals(&tx, ws, items)?;
            tx.commit()
        })
    }

    /// The proposals in doubt a previous run left.
    pub fn proposals(&self, ws: &WorkspaceId) -> Result<Vec<(RelPath, Option<Entry>)>, StoreError> {
        let rows = self.read_versioned("proposal", "0", ws)?;
        Ok(self
            .versioned_rows(rows)?
            .into_iter()
            .map(|(path, state)| (path, state.entry))
            .collect())
    }

    /// The landing intents a previous run left (it stopped before
    /// persisting the round that made them).
    pub fn landings(&self, ws: &WorkspaceId) -> Result<Vec<(RelPath, Versioned)>, StoreError> {
        let rows = self.read_versioned("landing", "seq", ws)?;
        self.versioned_rows(rows)
    }

    /// Local files whose cached hash is `hash` (sources for local copies).
    pub fn cached_paths_with_hash(
        &self,
        ws: &WorkspaceId,
        hash: &gm_core::ContentHash,
        limit: usize,
    ) -> Result<Vec<RelPath>, StoreError> {
        let rows: Vec<String> = self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT path FROM hash_cache WHERE ws = ?1 AND hash = ?2 LIMIT ?3",
            )?;
            stmt.query_map(
                params![ws.as_str(), hash.as_bytes().as_slice(), limit as i64],
                |r| r.get(0),
            )?
            .collect()
        })?;
        rows.into_iter().map(|p| self.path_of(p)).collect()
    }
}

fn put_proposals(
    tx: &rusqlite::Transaction<'_>,
    ws: &WorkspaceId,
    items: &[(RelPath, Option<Entry>)],
) -> rusqlite::Result<()> {
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO proposal (ws, path, kind, hash, size, executable, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for (path, entry) in items {
        let [kind, hash, size, exec, target] = entry_columns(entry.as_ref());
        put.execute(params![
            ws.as_str(),
            path.as_str(),
            kind,
            hash,
            size,
            exec,
            target
        ])?;
    }
    Ok(())
}

/// Writes versioned entries into `table` (`synced` or `landing`).
fn put_versioned(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    ws: &WorkspaceId,
    items: &[(RelPath, Versioned)],
) -> rusqlite::Result<()> {
    let mut put = tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO {table} (ws, path, seq, kind, hash, size, executable, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?;
    for (path, state) in items {
        let [kind, hash, size, exec, target] = entry_columns(state.entry.as_ref());
        put.execute(params![
            ws.as_str(),
            path.as_str(),
            state.seq.0 as i64,
            kind,
            hash,
            size,
            exec,
            target
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::ContentHash;

    #[test]
    fn synced_tree_round_trip_and_epoch_reset() {
        let dir = tempfile::tempdir().unwrap();
        let db = NodeDb::open(&dir.path().join("node.db")).unwrap();
        let ws = WorkspaceId::new("w").unwrap();
        db.ensure_workspace(&ws).unwrap();
        db.reset_epoch(&ws, "e1").unwrap();
        let file = Entry::File {
            hash: ContentHash::of(b"x"),
            size: 1,
            executable: true,
        };
        let batch = NodeBatch {
            synced_put: vec![(
                RelPath::new("f").unwrap(),
                Versioned {
                    entry: Some(file.clone()),
                    seq: Seq(4),
                },
            )],
            last_seq: Some(Seq(4)),
            ..Default::default()
        };
        db.apply(&ws, &batch).unwrap();
        db.apply(
            &ws,
            &NodeBatch {
                last_seq: Some(Seq(2)),
                ..Default::default()
            },
        )
        .unwrap();
        let state = db.workspace(&ws).unwrap().unwrap();
        assert_eq!(
            (state.epoch.as_str(), state.last_seq),
            ("e1", Seq(4)),
            "last_seq never goes down"
        );
        assert_eq!(db.synced(&ws).unwrap()[0].1.entry, Some(file));
        assert!(db.request_confirm_empty(&ws).unwrap());
        assert!(db.take_confirm_empty(&ws).unwrap());
        assert!(!db.take_confirm_empty(&ws).unwrap());
        db.reset_epoch(&ws, "e2").unwrap();
        assert!(db.synced(&ws).unwrap().is_empty());
        assert_eq!(db.workspace(&ws).unwrap().unwrap().last_seq, Seq(0));
    }

    #[test]
    fn landing_intents_and_proposals_last_until_replaced_or_the_epoch_resets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let ws = WorkspaceId::new("w").unwrap();
        let intent = (
            RelPath::new("d/f").unwrap(),
            Versioned {
                entry: Some(Entry::File {
                    hash: ContentHash::of(b"x"),
                    size: 1,
                    executable: false,
                }),
                seq: Seq(7),
            },
        );
        {
            let db = NodeDb::open(&path).unwrap();
            db.ensure_workspace(&ws).unwrap();
            db.record_landings(&ws, std::slice::from_ref(&intent))
                .unwrap();
        }
        // A new run (after a crash) finds them.
        let db = NodeDb::open(&path).unwrap();
        assert_eq!(db.landings(&ws).unwrap(), vec![intent.clone()]);
        // A batch without the flag keeps them.
        db.apply(
            &ws,
            &NodeBatch {
                last_seq: Some(Seq(1)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(db.landings(&ws).unwrap().len(), 1);
        db.apply(
            &ws,
            &NodeBatch {
                clear_landings: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(db.landings(&ws).unwrap().is_empty());
        db.record_landings(&ws, std::slice::from_ref(&intent))
            .unwrap();
        let (path, state) = intent;
        db.record_proposals(&ws, &[(path.clone(), state.entry.clone())])
            .unwrap();
        db.record_proposals(&ws, &[(RelPath::new("gone").unwrap(), None)])
            .unwrap();
        assert_eq!(db.proposals(&ws).unwrap().len(), 2);
        db.apply(
            &ws,
            &NodeBatch {
                proposals: Some(vec![(path.clone(), None)]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(db.proposals(&ws).unwrap(), vec![(path, None)]);
        db.reset_epoch(&ws, "e2").unwrap();
        assert!(db.landings(&ws).unwrap().is_empty());
        assert!(db.proposals(&ws).unwrap().is_empty());
    }
}
