//! Test databases for the registry suite: a fresh SQLite file per test, or
//! a fresh schema in the PostgreSQL server named by `GM_TEST_POSTGRES_URL`.
//!
//! Without that variable the PostgreSQL half prints "skipping PostgreSQL:
//! GM_TEST_POSTGRES_URL not set" and passes, except under CI (`CI` set),
//! where a missing server is a failure: CI must run both backends.

#![allow(dead_code)]

use gm_registry::Registry;

pub const PG_ENV: &str = "GM_TEST_POSTGRES_URL";

pub struct TestDb {
    pub registry: Registry,
    pub sqlite_path: Option<std::path::PathBuf>,
    _dir: Option<tempfile::TempDir>,
    /// (server URL, schema) to drop at the end.
    pg: Option<(String, String)>,
}

impl TestDb {
    /// Closes the registry and drops the PostgreSQL schema. A failed test
    /// leaves its schema behind (the CI cluster is thrown away).
    pub async fn finish(self) {
        self.registry.close().await;
        if let Some((url, schema)) = self.pg {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .expect("connect to drop the test schema");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&mut conn)
            .await
            .expect("drop test schema");
        }
    }
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let registry = Registry::open_sqlite(&path).await.expect("open sqlite");
    TestDb {
        registry,
        sqlite_path: Some(path),
        _dir: Some(dir),
        pg: None,
    }
}

/// The PostgreSQL server URL, or `None` (with a visible message) when the
/// suite may skip it.
pub fn postgres_url() -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(
                !in_ci,
                "CI is set but {PG_ENV} is not: the PostgreSQL half of the registry suite must run in CI"
            );
            eprintln!("skipping PostgreSQL: {PG_ENV} not set");
            None
        }
    }
}

/// `url` with `search_path` set to `schema`.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// Creates a fresh schema and returns (its name, a URL whose connections use it).
pub async fn postgres_schema(url: &str) -> (String, String) {
    use sqlx::Connection;
    let schema = format!("gm_test_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {PG_ENV}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&mut conn)
        .await
        .expect("create test schema");
    let scoped = with_search_path(url, &schema);
    (schema, scoped)
}

pub async fn postgres() -> Option<TestDb> {
    let url = postgres_url()?;
    let (schema, scoped) = postgres_schema(&url).await;
    let registry = Registry::open_postgres(&scoped)
        .await
        .expect("open postgres registry");
    Some(TestDb {
        registry,
        sqlite_path: None,
        _dir: None,
        pg: Some((url, schema)),
    })
}

/// Defines each listed suite function as two tests, `sqlite::NAME` and
/// `postgres::NAME`, each on a fresh database.
#[macro_export]
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::sqlite().await;
                    super::$name(&db.registry).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::postgres().await else {
                        return;
                    };
                    super::$name(&db.registry).await;
                    db.finish().await;
                }
            )*
        }
    };
}
