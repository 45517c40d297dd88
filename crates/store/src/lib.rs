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
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(database = %shown, version = index + 1, "applied schema migration");
    }
    Ok(conn)
}
