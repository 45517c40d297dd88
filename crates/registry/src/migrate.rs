//! Versioned schema migrations, one history for both backends: the same
//! versions and names, each with its dialect's SQL. Applied at open by
//! sqlx's migrator, which records them in `_sqlx_migrations` and refuses a
//! database that has a migration this build does not know.

use std::borrow::Cow;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::{Backend, Registry, RegistryError, on_pool};

/// (version, name, SQL) for SQLite.
const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "registry",
        include_str!("../migrations/sqlite/0001_registry.sql"),
    ),
    (
        2,
        "node_tokens",
        include_str!("../migrations/sqlite/0002_node_tokens.sql"),
    ),
    (
        3,
        "skills",
        include_str!("../migrations/sqlite/0003_skills.sql"),
    ),
];

/// (version, name, SQL) for PostgreSQL: the same history as `SQLITE`.
const POSTGRES: &[(i64, &str, &str)] = &[
    (
        1,
        "registry",
        include_str!("../migrations/postgres/0001_registry.sql"),
    ),
    (
        2,
        "node_tokens",
        include_str!("../migrations/postgres/0002_node_tokens.sql"),
    ),
    (
        3,
        "skills",
        include_str!("../migrations/postgres/0003_skills.sql"),
    ),
];

fn migrator(backend: Backend) -> Migrator {
    let list = match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    Migrator::with_migrations(
        list.iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The schema version this build brings (the last migration's).
pub const SCHEMA_VERSION: i64 = 3;

/// Every migration version this build brings, in order: 1, 2, … up to
/// `SCHEMA_VERSION` with no gap (a unit test holds both lists to that).
pub fn migration_versions() -> Vec<i64> {
    SQLITE.iter().map(|&(version, _, _)| version).collect()
}

impl Registry {
    pub(crate) async fn migrate(&self) -> Result<(), RegistryError> {
        let migrator = migrator(self.backend);
        on_pool!(self, pool => migrator.run(pool).await).map_err(|source| {
            RegistryError::Migrate {
                backend: self.backend,
                source,
            }
        })?;
        Ok(())
    }

    /// The versions applied to this database, in order.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, RegistryError> {
        let versions: Vec<i64> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version"
        )
        .fetch_all(pool)
        .await)
        .map_err(self.db())?;
        Ok(versions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_history() {
        let names = |list: &[(i64, &str, &str)]| -> Vec<(i64, String)> {
            list.iter().map(|(v, n, _)| (*v, n.to_string())).collect()
        };
        assert_eq!(names(SQLITE), names(POSTGRES));
        let versions: Vec<i64> = SQLITE.iter().map(|(v, _, _)| *v).collect();
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected, "versions are 1, 2, 3, … with no gap");
    }

    /// A database made by a build that knew only the first `known`
    /// migrations (version 1: templates and all; version 2: node tokens)
    /// migrates to the current version on open, and keeps its rows.
    async fn an_older_database_migrates_and_keeps_its_rows(known: usize) {
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .expect("open");
            let older = Migrator::with_migrations(
                SQLITE[..known]
                    .iter()
                    .map(|&(version, name, sql)| {
                        Migration::new(
                            version,
                            Cow::Borrowed(name),
                            MigrationType::Simple,
                            sql.into_sql_str(),
                            false,
                        )
                    })
                    .collect(),
            );
            older
                .run(&pool)
                .await
                .expect("migrate to the older version");
            sqlx::query(
                "INSERT INTO registry_templates (name, created_ms, updated_ms) VALUES ('t', 1, 1)",
            )
            .execute(&pool)
            .await
            .expect("insert");
            pool.close().await;
        }
        let registry = Registry::open_sqlite(&path).await.expect("reopen");
        assert_eq!(
            registry.applied_migrations().await.expect("applied"),
            (1..=SCHEMA_VERSION).collect::<Vec<_>>()
        );
        let template = crate::TemplateName::new("t").expect("name");
        assert!(registry.template(&template).await.expect("read").is_some());
        assert!(registry.skills(None).await.expect("skills").is_empty());
        registry.close().await;
    }

    #[tokio::test]
    async fn a_version_1_database_migrates_and_keeps_its_rows() {
        an_older_database_migrates_and_keeps_its_rows(1).await;
    }

    #[tokio::test]
    async fn a_version_2_database_migrates_and_keeps_its_rows() {
        an_older_database_migrates_and_keeps_its_rows(2).await;
    }

    #[test]
    fn every_table_and_index_exists_on_both() {
        let objects = |sql: &str| -> Vec<String> {
            let mut found: Vec<String> = sql
                .lines()
                .filter_map(|line| {
                    let line = line.trim_start();
                    let rest = line
                        .strip_prefix("CREATE TABLE ")
                        .or_else(|| line.strip_prefix("CREATE INDEX "))?;
                    rest.split_whitespace().next().map(str::to_string)
                })
                .collect();
            found.sort();
            found
        };
        for ((_, _, lite), (_, _, pg)) in SQLITE.iter().zip(POSTGRES) {
            assert_eq!(objects(lite), objects(pg));
        }
    }
}
