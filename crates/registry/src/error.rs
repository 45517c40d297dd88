//! The registry's error type: what callers react to differently (bad input,
//! missing or duplicate records, a refused change, the database itself).

use std::fmt;

/// Which database a registry runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A value from a user or the wire is not acceptable. Nothing was written.
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A record the request names does not exist. Nothing was written.
    #[error("unknown {what} {key:?}")]
    NotFound { what: &'static str, key: String },
    /// A record with that key exists already. Nothing was written.
    #[error("{what} {key:?} already exists")]
    AlreadyExists { what: &'static str, key: String },
    /// The request is well-formed but the registry's state refuses it
    /// (a template still in use, an archived session). Nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The database failed or is unreachable; may succeed when retried.
    #[error("registry database ({backend}): {source}")]
    Database {
        backend: Backend,
        #[source]
        source: sqlx::Error,
    },
    #[error("registry schema migration ({backend}): {source}")]
    Migrate {
        backend: Backend,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A stored value that this build cannot read.
    #[error("registry database ({backend}): corrupt row: {what}")]
    Corrupt { backend: Backend, what: String },
}

impl RegistryError {
    /// An `Invalid` error; the value is shortened so that a 64 KiB config
    /// does not end up whole in a message.
    pub(crate) fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> Self {
        const SHOWN: usize = 120;
        let value = if value.chars().count() > SHOWN {
            let mut short: String = value.chars().take(SHOWN).collect();
            short.push('…');
            short
        } else {
            value.to_string()
        };
        RegistryError::Invalid {
            field,
            value,
            reason: reason.into(),
        }
    }

    /// True for failures of the database itself (connection, pool, I/O),
    /// where the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RegistryError::Database {
                source: sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed,
                ..
            }
        )
    }
}
