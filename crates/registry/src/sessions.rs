//! Nodes and sessions: the Attach hook (node seen, session active, node
//! bound to it), session create/archive/show/list, and the set of active
//! sessions that the orphan purge reads.
//!
//! SQLite write transactions here start with a write, so the connection
//! takes the write lock (waiting on the busy timeout) before it reads;
//! a read-then-write transaction could fail on a stale snapshot instead.

use std::collections::BTreeSet;

use gm_core::{NodeId, WorkspaceId};
use sqlx::error::ErrorKind;

use crate::types::{CursorKind, encode_cursor};
use crate::{
    BoundNode, Node, Page, Paged, Registry, RegistryError, Session, SessionState, now_ms, on_pool,
    violates,
};

/// What an Attach did to the session's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// First time anyone attached it: created active.
    Created,
    /// It was active: last activity and the node binding updated.
    Updated,
    /// It was archived and a node attached it again: active again, so the
    /// orphan purge leaves it alone.
    Reactivated,
}

type SessionRow = (String, String, i64, i64, Option<i64>);
const SESSION_COLUMNS: &str = "id, state, created_ms, last_activity_ms, archived_ms";

impl Registry {
    fn session_from_row(&self, row: SessionRow) -> Result<Session, RegistryError> {
        let (id, state, created_ms, last_activity_ms, archived_ms) = row;
        Ok(Session {
            id: WorkspaceId::new(&id).map_err(|e| self.corrupt(format!("session id: {e}")))?,
            state: SessionState::parse(&state)
                .map_err(|e| self.corrupt(format!("session {id}: {e}")))?,
            created_ms,
            last_activity_ms,
            archived_ms,
            nodes: Vec::new(),
        })
    }

    /// The Attach hook: records that `node` attached `session` now. Creates
    /// the node and the session if new, updates last seen / last activity,
    /// binds the node to the session, and makes an archived session active
    /// again. One transaction.
    pub async fn session_attached(
        &self,
        session: &WorkspaceId,
        node: &NodeId,
    ) -> Result<AttachOutcome, RegistryError> {
        let now = now_ms();
        let previous: Option<String> = on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO registry_nodes (id, name, created_ms, last_seen_ms) \
                 VALUES ($1, $1, $2, $2) \
                 ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
            )
            .bind(node.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let previous: Option<String> =
                sqlx::query_scalar("SELECT state FROM registry_sessions WHERE id = $1")
                    .bind(session.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            sqlx::query(
                "INSERT INTO registry_sessions (id, state, created_ms, last_activity_ms) \
                 VALUES ($1, 'active', $2, $2) \
                 ON CONFLICT (id) DO UPDATE SET last_activity_ms = excluded.last_activity_ms, \
                 state = 'active', archived_ms = NULL",
            )
            .bind(session.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO registry_session_nodes (session_id, node_id, first_seen_ms, last_seen_ms) \
                 VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (session_id, node_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
            )
            .bind(session.as_str())
            .bind(node.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(previous)
        }.await)
        .map_err(self.db())?;
        Ok(match previous.as_deref() {
            None => AttachOutcome::Created,
            Some("archived") => AttachOutcome::Reactivated,
            Some(_) => AttachOutcome::Updated,
        })
    }

    /// Creates the sessions that are missing, active, and leaves existing
    /// ones (archived included) alone. Returns how many were created. The
    /// hub calls it at start for every mirror it holds, so a mirror made
    /// before the registry existed is never taken for an orphan.
    pub async fn ensure_sessions(&self, ids: &[WorkspaceId]) -> Result<u64, RegistryError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let created = on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let mut created = 0;
            for id in ids {
                created += sqlx::query(
                    "INSERT INTO registry_sessions (id, state, created_ms, last_activity_ms) \
                     VALUES ($1, 'active', $2, $2) ON CONFLICT (id) DO NOTHING",
                )
                .bind(id.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(created)
        }.await)
        .map_err(self.db())?;
        Ok(created)
    }

    /// Creates an active session; refused if it exists.
    pub async fn create_session(&self, id: &WorkspaceId) -> Result<Session, RegistryError> {
        let now = now_ms();
        let inserted = on_pool!(self, pool => sqlx::query(
            "INSERT INTO registry_sessions (id, state, created_ms, last_activity_ms) \
             VALUES ($1, 'active', $2, $2)",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match inserted {
            Ok(_) => {}
            Err(err) if violates(&err, ErrorKind::UniqueViolation) => {
                return Err(RegistryError::AlreadyExists {
                    what: "session",
                    key: id.to_string(),
                });
            }
            Err(err) => return Err(self.db()(err)),
        }
        tracing::info!(session = %id, "session created");
        self.require_session(id).await
    }

    /// Archives a session (it becomes eligible for the orphan purge).
    /// Archiving an archived session keeps its first archive time.
    pub async fn archive_session(&self, id: &WorkspaceId) -> Result<Session, RegistryError> {
        let now = now_ms();
        let changed = on_pool!(self, pool => sqlx::query(
            "UPDATE registry_sessions SET state = 'archived', \
             archived_ms = COALESCE(archived_ms, $2) WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(RegistryError::NotFound {
                what: "session",
                key: id.to_string(),
            });
        }
        tracing::info!(session = %id, "session archived");
        self.require_session(id).await
    }

    async fn require_session(&self, id: &WorkspaceId) -> Result<Session, RegistryError> {
        self.session(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: "session",
                key: id.to_string(),
            })
    }

    /// One session with the nodes bound to it.
    pub async fn session(&self, id: &WorkspaceId) -> Result<Option<Session>, RegistryError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM registry_sessions WHERE id = $1");
        let row: Option<SessionRow> =
            on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_optional(pool)
            .await)
            .map_err(self.db())?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut session = self.session_from_row(row)?;
        let bound: Vec<(String, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT node_id, first_seen_ms, last_seen_ms FROM registry_session_nodes \
             WHERE session_id = $1 ORDER BY node_id",
        )
        .bind(id.as_str())
        .fetch_all(pool)
        .await)
        .map_err(self.db())?;
        for (node, first_seen_ms, last_seen_ms) in bound {
            session.nodes.push(BoundNode {
                node: NodeId::new(&node).map_err(|e| self.corrupt(format!("node id: {e}")))?,
                first_seen_ms,
                last_seen_ms,
            });
        }
        Ok(Some(session))
    }

    /// Sessions in id order, optionally only those in `state`.
    pub async fn list_sessions(
        &self,
        state: Option<SessionState>,
        page: &Page,
    ) -> Result<Paged<Session>, RegistryError> {
        let after = page.after_key(CursorKind::Sessions)?.unwrap_or_default();
        let fetch = i64::from(page.limit()) + 1;
        let rows: Vec<SessionRow> = match state {
            Some(state) => {
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM registry_sessions \
                     WHERE state = $1 AND id > $2 ORDER BY id LIMIT $3"
                );
                on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(state.as_str())
                    .bind(&after)
                    .bind(fetch)
                    .fetch_all(pool)
                    .await)
            }
            None => {
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM registry_sessions \
                     WHERE id > $1 ORDER BY id LIMIT $2"
                );
                on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(&after)
                    .bind(fetch)
                    .fetch_all(pool)
                    .await)
            }
        }
        .map_err(self.db())?;
        let mut items = rows
            .into_iter()
            .map(|row| self.session_from_row(row))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = cut_page(&mut items, page.limit())
            .map(|last| encode_cursor(CursorKind::Sessions, last.id.as_str()));
        Ok(Paged { items, next_cursor })
    }

    /// The ids of every active session: what the orphan purge keeps. Fails
    /// whole on any error or unreadable row, so a caller never mistakes a
    /// partial read for the full set.
    pub async fn active_sessions(&self) -> Result<BTreeSet<WorkspaceId>, RegistryError> {
        let ids: Vec<String> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM registry_sessions WHERE state = 'active' ORDER BY id",
        )
        .fetch_all(pool)
        .await)
        .map_err(self.db())?;
        ids.iter()
            .map(|id| WorkspaceId::new(id).map_err(|e| self.corrupt(format!("session id: {e}"))))
            .collect()
    }

    /// Nodes in id order.
    pub async fn list_nodes(&self, page: &Page) -> Result<Paged<Node>, RegistryError> {
        let after = page.after_key(CursorKind::Nodes)?.unwrap_or_default();
        let rows: Vec<(String, String, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, name, created_ms, last_seen_ms FROM registry_nodes \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(&after)
        .bind(i64::from(page.limit()) + 1)
        .fetch_all(pool)
        .await)
        .map_err(self.db())?;
        let mut items = rows
            .into_iter()
            .map(|(id, name, created_ms, last_seen_ms)| {
                Ok(Node {
                    id: NodeId::new(&id).map_err(|e| self.corrupt(format!("node id: {e}")))?,
                    name,
                    created_ms,
                    last_seen_ms,
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        let next_cursor = cut_page(&mut items, page.limit())
            .map(|last| encode_cursor(CursorKind::Nodes, last.id.as_str()));
        Ok(Paged { items, next_cursor })
    }
}

/// Lists fetch one row more than the page holds: if it came, drop it and
/// return the page's last row (whose key is the next cursor).
pub(crate) fn cut_page<T>(items: &mut Vec<T>, limit: u32) -> Option<&T> {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last()
    } else {
        None
    }
}
