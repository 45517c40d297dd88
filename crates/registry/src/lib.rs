//! The registry of the mesh: which nodes exist, which sessions (workspaces)
//! are active, which agent templates exist and which agent instances run
//! where, and which skill names are taken (reserved, active, removed). Owns the registry schema, its migrations and every registry query,
//! on SQLite or PostgreSQL (sqlx, runtime queries only).
//!
//! - `Registry::open_sqlite(path)`: the hub's `DATA_DIR/state.db`, shared
//!   with gm-store's sync tables (WAL, busy timeout; every registry table is
//!   prefixed `registry_`, and sqlx's `_sqlx_migrations` table keeps its own
//!   history beside gm-store's `PRAGMA user_version`).
//! - `Registry::open_postgres(url)`: one database for several hubs.
//!
//! Both run the same migration history (`migrations/{sqlite,postgres}/`,
//! same versions and names) at open. Every list is keyset-paginated on an
//! index that ends in the sort key, so a page costs one index range however
//! deep it is. Every write is one statement or one transaction: a request
//! that fails writes nothing.
//!
//! Not here: the wire (gm-hub maps gRPC to these calls), the hash cache and
//! journal (gm-store), deciding what to purge (the hub reads
//! `active_sessions`).

mod error;
mod instances;
mod migrate;
mod sessions;
mod skills;
mod templates;
mod tokens;
pub mod types;

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub use error::{Backend, RegistryError};
pub use instances::BulkInstance;
pub use migrate::{SCHEMA_VERSION, migration_versions};
pub use sessions::AttachOutcome;
pub use skills::{NewSkill, Skill, SkillOrigin, SkillState};
pub use tokens::{NewNodeToken, NodeAccess, parse_node_token};
pub use types::{
    BoundNode, DEFAULT_PAGE, Instance, InstanceFilter, InstanceId, InstanceStatus, JsonObject,
    MAX_PAGE, NewInstance, NewTemplate, Node, Page, Paged, Session, SessionState, Template,
    TemplateName,
};

/// How long a SQLite connection waits for another writer (gm-store's
/// connection to the same file, or another pool connection).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Registry connections read the database file through mmap: a list page
/// touches ~100 random table pages, and mmap serves them from the OS page
/// cache (shared by all connections) without a read() and a copy each.
/// Halves the median page latency at a million instances (BENCHMARKS.md).
const SQLITE_MMAP_BYTES: &str = "268435456";

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the concrete pool, once per backend:
/// the body is compiled for each driver, so queries use the native types.
macro_rules! on_pool {
    ($registry:expr, $pool:ident => $body:expr) => {
        match &$registry.pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// The registry on one database. Cheap to share behind an `Arc`; every
/// method is async and safe to call concurrently.
pub struct Registry {
    pool: Pool,
    backend: Backend,
    /// Template id -> name, for instance rows. Always correct without
    /// invalidation: names never change and ids are never reused (a deleted
    /// template's entry is never asked for again, since no instance can
    /// refer to it). Saves a lookup per row in every list page.
    template_names: std::sync::RwLock<std::collections::HashMap<i64, TemplateName>>,
}

impl Registry {
    /// Opens (creating if missing) a SQLite registry and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Registry, RegistryError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("mmap_size", SQLITE_MMAP_BYTES);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A failed write can leave a connection out of step with its
            // transaction: on SQLITE_FULL or an IO error SQLite rolls the
            // transaction back by itself, sqlx's ROLLBACK then fails and
            // it still counts one transaction open, so the next `begin`
            // opens a SAVEPOINT whose rollback never ends it, and that
            // connection holds the write lock for ever (every other writer
            // of `state.db` then got "database is locked"; found by the
            // disk-full test). Such a connection is closed, not reused.
            .before_acquire(|conn, _meta| {
                Box::pin(async move {
                    let sane = !sqlx::Connection::is_in_transaction(conn);
                    if !sane {
                        tracing::warn!("closing a registry connection left inside a transaction");
                    }
                    Ok(sane)
                })
            })
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|source| RegistryError::Database {
                backend: Backend::Sqlite,
                source,
            })?;
        let registry = Registry {
            pool: Pool::Sqlite(pool),
            backend: Backend::Sqlite,
            template_names: Default::default(),
        };
        registry.migrate().await?;
        tracing::info!(path = %path.display(), "registry open on SQLite");
        Ok(registry)
    }

    /// Connects to PostgreSQL (`postgres://user:password@host:port/db`,
    /// sqlx's URL parameters apply) and applies migrations. Several hubs
    /// may share one database; migrations take PostgreSQL's advisory lock.
    pub async fn open_postgres(url: &str) -> Result<Registry, RegistryError> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            RegistryError::invalid(
                "database URL",
                &redact_url(url),
                format!("not a PostgreSQL URL: {e}"),
            )
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|source| RegistryError::Database {
                backend: Backend::Postgres,
                source,
            })?;
        let registry = Registry {
            pool: Pool::Postgres(pool),
            backend: Backend::Postgres,
            template_names: Default::default(),
        };
        registry.migrate().await?;
        tracing::info!(url = %redact_url(url), "registry open on PostgreSQL");
        Ok(registry)
    }

    /// `postgres://…` or `postgresql://…` opens PostgreSQL; anything else is
    /// refused (SQLite is opened by path).
    pub fn is_postgres_url(url: &str) -> bool {
        url.starts_with("postgres://") || url.starts_with("postgresql://")
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every pooled connection; later calls fail.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }

    pub(crate) fn db(&self) -> impl Fn(sqlx::Error) -> RegistryError + '_ {
        move |source| RegistryError::Database {
            backend: self.backend,
            source,
        }
    }

    pub(crate) fn corrupt(&self, what: impl Into<String>) -> RegistryError {
        RegistryError::Corrupt {
            backend: self.backend,
            what: what.into(),
        }
    }

    /// Updates the planner's statistics (`ANALYZE`), e.g. after a bulk load.
    pub async fn analyze(&self) -> Result<(), RegistryError> {
        on_pool!(self, pool => sqlx::query("ANALYZE").execute(pool).await.map(|_| ()))
            .map_err(self.db())?;
        Ok(())
    }
}

/// The URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Whether a database error is a violation of `kind`.
pub(crate) fn violates(err: &sqlx::Error, kind: sqlx::error::ErrorKind) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    db.kind() == kind
        // SQLite reports an ON DELETE RESTRICT violation with the extended
        // code SQLITE_CONSTRAINT_TRIGGER (1811), which sqlx does not map.
        || (kind == sqlx::error::ErrorKind::ForeignKeyViolation
            && db.message().contains("FOREIGN KEY constraint failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails with SQLITE_FULL inside a transaction (here
    /// through `max_page_count`; on the hub, a full data dir): SQLite rolls
    /// the transaction back itself and sqlx still counts it open. The
    /// connection must not be reused: its next transaction would be a
    /// SAVEPOINT whose rollback keeps the write lock, and the journal
    /// (gm-store, same `state.db`) could never write again.
    #[tokio::test]
    async fn a_connection_out_of_step_after_a_full_disk_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let registry = Registry::open_sqlite(&path).await.unwrap();
        let Pool::Sqlite(pool) = &registry.pool else {
            unreachable!("a SQLite registry");
        };
        sqlx::query("CREATE TABLE scratch (b BLOB)")
            .execute(pool)
            .await
            .unwrap();
        {
            let mut tx = pool.begin().await.unwrap();
            let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA max_page_count = {}",
                pages + 2
            )))
            .execute(&mut *tx)
            .await
            .unwrap();
            let full = sqlx::query("INSERT INTO scratch VALUES (zeroblob(20000))")
                .execute(&mut *tx)
                .await;
            assert!(full.is_err(), "the insert should not fit");
            // SQLite rolled the transaction back; the COMMIT fails, as one
            // that hit a full disk itself does (WAL pages are written at
            // commit), and sqlx still counts the transaction open.
            assert!(tx.commit().await.is_err());
        }
        // Every connection of the pool (it holds 4), the stranded one too.
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(pool.acquire().await.unwrap());
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            sqlx::query("PRAGMA max_page_count = 1073741823")
                .execute(&mut **conn)
                .await
                .unwrap();
            let mut tx = sqlx::Connection::begin(&mut **conn).await.unwrap();
            sqlx::query(
                "INSERT INTO registry_nodes (id, name, created_ms, last_seen_ms) \
                 VALUES ($1, $1, 0, 0)",
            )
            .bind(format!("n{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
            // An error path: rolled back.
            tx.rollback().await.unwrap();
        }
        drop(conns);
        let journal = gm_store::HubDb::open(&path).unwrap();
        journal
            .ensure_workspace(&gm_core::WorkspaceId::new("w").unwrap(), 1)
            .expect("the journal can write after the registry's failed write");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://gm:secret@127.0.0.1:5432/gm?sslmode=disable"),
            "postgres://gm:***@127.0.0.1:5432/gm?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://127.0.0.1/gm"),
            "postgres://127.0.0.1/gm"
        );
        assert!(Registry::is_postgres_url("postgresql://x/y"));
        assert!(!Registry::is_postgres_url("sqlite://x"));
    }
}
