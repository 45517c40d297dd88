//! Agent instances: create (checked against template, node and session),
//! show, filtered keyset lists, status and config updates, delete; plus
//! the query plans of the lists (for tests) and a bulk loader (for tests and
//! the benchmark).
//!
//! Each filter column has an index `(column, id)`; a filtered page is one
//! range of that index read in order (see `list_query`), with no sort.

use std::collections::HashMap;

use gm_core::{NodeId, WorkspaceId};
use sqlx::error::ErrorKind;

use crate::sessions::cut_page;
use crate::types::{CursorKind, encode_cursor};
use crate::{
    Backend, Instance, InstanceFilter, InstanceId, InstanceStatus, JsonObject, NewInstance, Page,
    Paged, Registry, RegistryError, TemplateName, now_ms, on_pool, violates,
};

/// An instance row as read; the template's name comes from `template_names`.
type InstanceRow = (i64, i64, String, String, String, String, i64, i64);

/// One row for `Registry::bulk_insert_instances`.
#[derive(Debug, Clone)]
pub struct BulkInstance {
    pub template_id: i64,
    pub node: NodeId,
    pub session: WorkspaceId,
    pub status: InstanceStatus,
}

/// A list query: SQL text plus its bind values, in order.
struct ListQuery {
    sql: String,
    binds: Vec<Bind>,
}

enum Bind {
    Text(String),
    Int(i64),
}

impl Registry {
    fn instance_columns(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => {
                "i.id, i.template_id, i.node_id, i.session_id, i.status, i.config, \
                 i.created_ms, i.updated_ms"
            }
            Backend::Postgres => {
                "i.id, i.template_id, i.node_id, i.session_id, i.status, i.config::text, \
                 i.created_ms, i.updated_ms"
            }
        }
    }

    /// The names of these templates, from the cache or, for ids it lacks,
    /// one query.
    async fn template_names(
        &self,
        ids: impl Iterator<Item = i64>,
    ) -> Result<HashMap<i64, TemplateName>, RegistryError> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self
                .template_names
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for id in ids {
                match cache.get(&id) {
                    Some(name) => {
                        found.insert(id, name.clone());
                    }
                    None if !missing.contains(&id) => missing.push(id),
                    None => {}
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let placeholders: Vec<String> = (1..=missing.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT id, name FROM registry_templates WHERE id IN ({})",
            placeholders.join(", ")
        );
        let rows: Vec<(i64, String)> = on_pool!(self, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for id in &missing {
                query = query.bind(*id);
            }
            query.fetch_all(pool).await
        })
        .map_err(self.db())?;
        let mut cache = self
            .template_names
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (id, name) in rows {
            let name = TemplateName::new(&name)
                .map_err(|e| self.corrupt(format!("template {id}: {e}")))?;
            cache.insert(id, name.clone());
            found.insert(id, name);
        }
        Ok(found)
    }

    /// Rows -> instances, with their templates' names.
    async fn instances_from_rows(
        &self,
        rows: Vec<InstanceRow>,
    ) -> Result<Vec<Instance>, RegistryError> {
        let names = self.template_names(rows.iter().map(|row| row.1)).await?;
        rows.into_iter()
            .map(|row| {
                let (id, template_id, node, session, status, config, created_ms, updated_ms) = row;
                let bad = |e: &dyn std::fmt::Display| self.corrupt(format!("instance {id}: {e}"));
                Ok(Instance {
                    id: InstanceId(id),
                    template_id,
                    template: names
                        .get(&template_id)
                        .cloned()
                        .ok_or_else(|| bad(&format!("no template {template_id}")))?,
                    node: NodeId::new(&node).map_err(|e| bad(&e))?,
                    session: WorkspaceId::new(&session).map_err(|e| bad(&e))?,
                    status: InstanceStatus::parse(&status).map_err(|e| bad(&e))?,
                    config: JsonObject::parse("config", &config).map_err(|e| bad(&e))?,
                    created_ms,
                    updated_ms,
                })
            })
            .collect()
    }

    /// Creates an instance. Refused, writing nothing, when the template,
    /// node or session does not exist or the session is archived. One
    /// statement: the template and the active session are joined in, the
    /// node is checked by its foreign key.
    pub async fn create_instance(&self, new: &NewInstance) -> Result<Instance, RegistryError> {
        let now = now_ms();
        let config_value = match self.backend {
            Backend::Sqlite => "$6",
            Backend::Postgres => "$6::jsonb",
        };
        let (columns, values) = match new.config {
            None => ("", String::new()),
            Some(_) => (", config", format!(", {config_value}")),
        };
        let sql = format!(
            "INSERT INTO registry_instances \
             (template_id, node_id, session_id, status, created_ms, updated_ms{columns}) \
             SELECT t.id, $2, s.id, $4, $5, $5{values} \
             FROM registry_templates t, registry_sessions s \
             WHERE t.name = $1 AND s.id = $3 AND s.state = 'active' \
             RETURNING id"
        );
        let config = new.config.as_ref().map(JsonObject::to_json);
        let inserted: Result<Option<i64>, sqlx::Error> = on_pool!(self, pool => {
            let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(new.template.as_str())
                .bind(new.node.as_str())
                .bind(new.session.as_str())
                .bind(new.status.as_str())
                .bind(now);
            if let Some(config) = &config {
                query = query.bind(config.clone());
            }
            query.fetch_optional(pool).await
        });
        let id = match inserted {
            Ok(Some(id)) => InstanceId(id),
            Ok(None) => return Err(self.why_not_created(new).await),
            Err(err) if violates(&err, ErrorKind::ForeignKeyViolation) => {
                return Err(self.why_not_created(new).await);
            }
            Err(err) => return Err(self.db()(err)),
        };
        tracing::info!(instance = id.0, template = %new.template, node = %new.node, session = %new.session, "instance created");
        self.require_instance(id).await
    }

    /// Names the reference that made a create fail.
    async fn why_not_created(&self, new: &NewInstance) -> RegistryError {
        let check = async {
            let template: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT id FROM registry_templates WHERE name = $1",
            )
            .bind(new.template.as_str())
            .fetch_optional(pool)
            .await)?;
            if template.is_none() {
                return Ok(RegistryError::NotFound {
                    what: "template",
                    key: new.template.to_string(),
                });
            }
            let node: Option<String> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT id FROM registry_nodes WHERE id = $1",
            )
            .bind(new.node.as_str())
            .fetch_optional(pool)
            .await)?;
            if node.is_none() {
                return Ok(RegistryError::Refused(format!(
                    "unknown node {:?}: a node is registered when it first attaches to the hub",
                    new.node.as_str()
                )));
            }
            let state: Option<String> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT state FROM registry_sessions WHERE id = $1",
            )
            .bind(new.session.as_str())
            .fetch_optional(pool)
            .await)?;
            Ok(match state.as_deref() {
                None => RegistryError::NotFound {
                    what: "session",
                    key: new.session.to_string(),
                },
                Some("archived") => RegistryError::Refused(format!(
                    "session {:?} is archived; instances are created in active sessions",
                    new.session.as_str()
                )),
                // Everything exists now: a concurrent change raced us.
                Some(_) => RegistryError::Refused(
                    "the template, node or session changed while the instance was created; retry"
                        .to_string(),
                ),
            })
        };
        match check.await {
            Ok(err) => err,
            Err(source) => self.db()(source),
        }
    }

    async fn require_instance(&self, id: InstanceId) -> Result<Instance, RegistryError> {
        self.instance(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: "instance",
                key: id.to_string(),
            })
    }

    pub async fn instance(&self, id: InstanceId) -> Result<Option<Instance>, RegistryError> {
        let sql = format!(
            "SELECT {} FROM registry_instances i WHERE i.id = $1",
            self.instance_columns()
        );
        let row: Option<InstanceRow> =
            on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(pool)
            .await)
            .map_err(self.db())?;
        match row {
            Some(row) => Ok(self.instances_from_rows(vec![row]).await?.pop()),
            None => Ok(None),
        }
    }

    /// Builds a list page. With filters, the first of node, session,
    /// template, status is the *seek* column `c`, whose `(c, id)` index must
    /// serve the page as one range read in order, `limit + 1` entries:
    /// - SQLite: `c = value AND id > cursor ORDER BY id` (its planner seeks
    ///   `(c=? AND id>?)`; a row-value form would seek on `c` alone, because
    ///   `id` is the rowid);
    /// - PostgreSQL: `(c, id) > (value, cursor) AND c <= value ORDER BY c,
    ///   id`, which only that index can serve in order. With the plain form
    ///   its planner may walk the primary key and filter, which reads the
    ///   whole table when the value is rare or its rows are all recent.
    ///
    /// Other filters are plain equalities on the rows the range yields.
    fn list_query(
        &self,
        filter: &InstanceFilter,
        page: &Page,
        prefix: &str,
    ) -> Result<ListQuery, RegistryError> {
        let after = page.after_id(CursorKind::Instances)?;
        let mut binds = Vec::new();
        let mut next = |bind: Bind| {
            binds.push(bind);
            binds.len()
        };
        // (column, SQL value expression) for every filter that is set, in
        // seek-priority order.
        let mut filters: Vec<(&str, String)> = Vec::new();
        if let Some(node) = &filter.node {
            let n = next(Bind::Text(node.to_string()));
            filters.push(("i.node_id", format!("${n}")));
        }
        if let Some(session) = &filter.session {
            let n = next(Bind::Text(session.to_string()));
            filters.push(("i.session_id", format!("${n}")));
        }
        if let Some(template) = &filter.template {
            let n = next(Bind::Text(template.to_string()));
            filters.push((
                "i.template_id",
                format!("(SELECT id FROM registry_templates WHERE name = ${n})"),
            ));
        }
        if let Some(status) = filter.status {
            let n = next(Bind::Text(status.as_str().to_string()));
            filters.push(("i.status", format!("${n}")));
        }
        let cursor = next(Bind::Int(after));
        let limit = next(Bind::Int(i64::from(page.limit()) + 1));
        // SQLite picks plans by estimate; on a low-selectivity column (four
        // statuses) it may walk the primary key instead, which makes page
        // latency depend on the data. The seek index is named outright.
        let indexed_by = match (self.backend, filters.first()) {
            (Backend::Sqlite, Some((column, _))) => match *column {
                "i.node_id" => " INDEXED BY registry_instances_by_node",
                "i.session_id" => " INDEXED BY registry_instances_by_session",
                "i.template_id" => " INDEXED BY registry_instances_by_template",
                "i.status" => " INDEXED BY registry_instances_by_status",
                _ => "",
            },
            _ => "",
        };
        let (conditions, order) = match filters.split_first() {
            None => (format!("i.id > ${cursor}"), "i.id".to_string()),
            Some(((column, value), rest)) => {
                let (seek, order) = match self.backend {
                    Backend::Sqlite => (
                        format!("{column} = {value} AND i.id > ${cursor}"),
                        "i.id".to_string(),
                    ),
                    Backend::Postgres => (
                        format!("({column}, i.id) > ({value}, ${cursor}) AND {column} <= {value}"),
                        format!("{column}, i.id"),
                    ),
                };
                let mut conditions = vec![seek];
                conditions.extend(rest.iter().map(|(c, v)| format!("{c} = {v}")));
                (conditions.join(" AND "), order)
            }
        };
        let sql = format!(
            "{prefix}SELECT {} FROM registry_instances i{indexed_by} WHERE {conditions} ORDER BY {order} LIMIT ${limit}",
            self.instance_columns(),
        );
        Ok(ListQuery { sql, binds })
    }

    /// Instances in id order, narrowed by every filter that is set.
    pub async fn list_instances(
        &self,
        filter: &InstanceFilter,
        page: &Page,
    ) -> Result<Paged<Instance>, RegistryError> {
        let ListQuery { sql, binds } = self.list_query(filter, page, "")?;
        let rows: Vec<InstanceRow> = on_pool!(self, pool => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for bind in binds {
                query = match bind {
                    Bind::Text(text) => query.bind(text),
                    Bind::Int(int) => query.bind(int),
                };
            }
            query.fetch_all(pool).await
        })
        .map_err(self.db())?;
        let mut items = self.instances_from_rows(rows).await?;
        let next_cursor = cut_page(&mut items, page.limit())
            .map(|last| encode_cursor(CursorKind::Instances, &last.id.0.to_string()));
        Ok(Paged { items, next_cursor })
    }

    /// The plan the database picks for `list_instances(filter, page)`, one
    /// line per plan node: SQLite's `EXPLAIN QUERY PLAN` details or
    /// PostgreSQL's `EXPLAIN` lines. For tests that pin index use.
    pub async fn explain_list_instances(
        &self,
        filter: &InstanceFilter,
        page: &Page,
    ) -> Result<Vec<String>, RegistryError> {
        let prefix = match self.backend {
            Backend::Sqlite => "EXPLAIN QUERY PLAN ",
            Backend::Postgres => "EXPLAIN ",
        };
        let ListQuery { sql, binds } = self.list_query(filter, page, prefix)?;
        let lines: Vec<String> = match &self.pool {
            crate::Pool::Sqlite(pool) => {
                let mut query =
                    sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(sql))
                        .persistent(false);
                for bind in binds {
                    query = match bind {
                        Bind::Text(text) => query.bind(text),
                        Bind::Int(int) => query.bind(int),
                    };
                }
                query
                    .fetch_all(pool)
                    .await
                    .map(|rows| rows.into_iter().map(|(_, _, _, detail)| detail).collect())
            }
            crate::Pool::Postgres(pool) => {
                let mut query =
                    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).persistent(false);
                for bind in binds {
                    query = match bind {
                        Bind::Text(text) => query.bind(text),
                        Bind::Int(int) => query.bind(int),
                    };
                }
                query.fetch_all(pool).await
            }
        }
        .map_err(self.db())?;
        Ok(lines)
    }

    pub async fn set_instance_status(
        &self,
        id: InstanceId,
        status: InstanceStatus,
    ) -> Result<Instance, RegistryError> {
        let changed = on_pool!(self, pool => sqlx::query(
            "UPDATE registry_instances SET status = $2, updated_ms = $3 WHERE id = $1",
        )
        .bind(id.0)
        .bind(status.as_str())
        .bind(now_ms())
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(RegistryError::NotFound {
                what: "instance",
                key: id.to_string(),
            });
        }
        tracing::info!(instance = id.0, status = %status, "instance status set");
        self.require_instance(id).await
    }

    /// Replaces one instance's config; no other row changes.
    pub async fn set_instance_config(
        &self,
        id: InstanceId,
        config: &JsonObject,
    ) -> Result<Instance, RegistryError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "UPDATE registry_instances SET config = $2, updated_ms = $3 WHERE id = $1"
            }
            Backend::Postgres => {
                "UPDATE registry_instances SET config = $2::jsonb, updated_ms = $3 WHERE id = $1"
            }
        };
        let changed = on_pool!(self, pool => sqlx::query(sql)
            .bind(id.0)
            .bind(config.to_json())
            .bind(now_ms())
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(RegistryError::NotFound {
                what: "instance",
                key: id.to_string(),
            });
        }
        tracing::info!(instance = id.0, "instance config set");
        self.require_instance(id).await
    }

    pub async fn delete_instance(&self, id: InstanceId) -> Result<(), RegistryError> {
        let deleted = on_pool!(self, pool => sqlx::query(
            "DELETE FROM registry_instances WHERE id = $1",
        )
        .bind(id.0)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if deleted == 0 {
            return Err(RegistryError::NotFound {
                what: "instance",
                key: id.to_string(),
            });
        }
        tracing::info!(instance = id.0, "instance deleted");
        Ok(())
    }

    /// Bulk load for tests and benchmarks: nodes and sessions (ignored if
    /// present), then instances with a default config, 1000 rows per
    /// statement, all in one transaction. Not used by the hub.
    pub async fn bulk_insert(
        &self,
        nodes: &[NodeId],
        sessions: &[WorkspaceId],
        instances: &[BulkInstance],
    ) -> Result<(), RegistryError> {
        const ROWS: usize = 1000;
        let now = now_ms();
        let values = |rows: usize, width: usize| -> String {
            (0..rows)
                .map(|r| {
                    let cols: Vec<String> =
                        (1..=width).map(|c| format!("${}", r * width + c)).collect();
                    format!("({})", cols.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for chunk in nodes.chunks(ROWS) {
                let sql = format!(
                    "INSERT INTO registry_nodes (id, name, created_ms, last_seen_ms) VALUES {} \
                     ON CONFLICT (id) DO NOTHING",
                    values(chunk.len(), 4)
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for node in chunk {
                    query = query.bind(node.as_str()).bind(node.as_str()).bind(now).bind(now);
                }
                query.execute(&mut *tx).await?;
            }
            for chunk in sessions.chunks(ROWS) {
                let sql = format!(
                    "INSERT INTO registry_sessions (id, state, created_ms, last_activity_ms) VALUES {} \
                     ON CONFLICT (id) DO NOTHING",
                    values(chunk.len(), 4)
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for session in chunk {
                    query = query.bind(session.as_str()).bind("active").bind(now).bind(now);
                }
                query.execute(&mut *tx).await?;
            }
            for chunk in instances.chunks(ROWS) {
                let sql = format!(
                    "INSERT INTO registry_instances \
                     (template_id, node_id, session_id, status, created_ms, updated_ms) VALUES {}",
                    values(chunk.len(), 6)
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for row in chunk {
                    query = query
                        .bind(row.template_id)
                        .bind(row.node.as_str())
                        .bind(row.session.as_str())
                        .bind(row.status.as_str())
                        .bind(now)
                        .bind(now);
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.db())?;
        Ok(())
    }
}
