//! Agent templates: create, show, list (keyset on the unique name) and
//! delete, which is refused while instances use the template.

use sqlx::error::ErrorKind;

use crate::sessions::cut_page;
use crate::types::{CursorKind, encode_cursor};
use crate::{
    Backend, JsonObject, NewTemplate, Page, Paged, Registry, RegistryError, Template, TemplateName,
    now_ms, on_pool, violates,
};

type TemplateRow = (i64, String, String, String, i64, i64);

impl Registry {
    /// `config` read as text on both backends (JSONB on PostgreSQL).
    fn template_columns(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "id, name, description, config, created_ms, updated_ms",
            Backend::Postgres => "id, name, description, config::text, created_ms, updated_ms",
        }
    }

    fn template_from_row(&self, row: TemplateRow) -> Result<Template, RegistryError> {
        let (id, name, description, config, created_ms, updated_ms) = row;
        Ok(Template {
            id,
            name: TemplateName::new(&name)
                .map_err(|e| self.corrupt(format!("template {id}: {e}")))?,
            description,
            config: JsonObject::parse("config", &config)
                .map_err(|e| self.corrupt(format!("template {id}: {e}")))?,
            created_ms,
            updated_ms,
        })
    }

    /// Creates a template; refused if the name is taken.
    pub async fn create_template(&self, new: &NewTemplate) -> Result<Template, RegistryError> {
        let now = now_ms();
        let inserted = match &new.config {
            // No config: the column's default, a fresh '{}' for this row.
            None => on_pool!(self, pool => sqlx::query(
                "INSERT INTO registry_templates (name, description, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $3)",
            )
            .bind(new.name.as_str())
            .bind(&new.description)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())),
            Some(config) => {
                let sql = match self.backend {
                    Backend::Sqlite => {
                        "INSERT INTO registry_templates (name, description, config, created_ms, updated_ms) \
                         VALUES ($1, $2, $3, $4, $4)"
                    }
                    Backend::Postgres => {
                        "INSERT INTO registry_templates (name, description, config, created_ms, updated_ms) \
                         VALUES ($1, $2, $3::jsonb, $4, $4)"
                    }
                };
                on_pool!(self, pool => sqlx::query(sql)
                    .bind(new.name.as_str())
                    .bind(&new.description)
                    .bind(config.to_json())
                    .bind(now)
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected()))
            }
        };
        match inserted {
            Ok(_) => {}
            Err(err) if violates(&err, ErrorKind::UniqueViolation) => {
                return Err(RegistryError::AlreadyExists {
                    what: "template",
                    key: new.name.to_string(),
                });
            }
            Err(err) => return Err(self.db()(err)),
        }
        tracing::info!(template = %new.name, "template created");
        self.template(&new.name)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: "template",
                key: new.name.to_string(),
            })
    }

    pub async fn template(&self, name: &TemplateName) -> Result<Option<Template>, RegistryError> {
        let sql = format!(
            "SELECT {} FROM registry_templates WHERE name = $1",
            self.template_columns()
        );
        let row: Option<TemplateRow> =
            on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name.as_str())
            .fetch_optional(pool)
            .await)
            .map_err(self.db())?;
        row.map(|row| self.template_from_row(row)).transpose()
    }

    /// Templates in name order.
    pub async fn list_templates(&self, page: &Page) -> Result<Paged<Template>, RegistryError> {
        let after = page.after_key(CursorKind::Templates)?.unwrap_or_default();
        let sql = format!(
            "SELECT {} FROM registry_templates WHERE name > $1 ORDER BY name LIMIT $2",
            self.template_columns()
        );
        let rows: Vec<TemplateRow> =
            on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&after)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(pool)
            .await)
            .map_err(self.db())?;
        let mut items = rows
            .into_iter()
            .map(|row| self.template_from_row(row))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = cut_page(&mut items, page.limit())
            .map(|last| encode_cursor(CursorKind::Templates, last.name.as_str()));
        Ok(Paged { items, next_cursor })
    }

    /// Deletes a template. Refused, naming how many instances use it, while
    /// any does: the foreign key (ON DELETE RESTRICT) decides, so a
    /// concurrent instance create cannot slip between a check and the
    /// delete.
    pub async fn delete_template(&self, name: &TemplateName) -> Result<(), RegistryError> {
        let deleted = on_pool!(self, pool => sqlx::query(
            "DELETE FROM registry_templates WHERE name = $1",
        )
        .bind(name.as_str())
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match deleted {
            Ok(0) => Err(RegistryError::NotFound {
                what: "template",
                key: name.to_string(),
            }),
            Ok(_) => {
                tracing::info!(template = %name, "template deleted");
                Ok(())
            }
            Err(err) if violates(&err, ErrorKind::ForeignKeyViolation) => {
                let used: i64 = on_pool!(self, pool => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM registry_instances WHERE template_id = \
                     (SELECT id FROM registry_templates WHERE name = $1)",
                )
                .bind(name.as_str())
                .fetch_one(pool)
                .await)
                .map_err(self.db())?;
                Err(RegistryError::Refused(format!(
                    "template {:?} is used by {used} instance(s); delete them first \
                     (`ghostmirror instance list --template {name}`)",
                    name.as_str()
                )))
            }
            Err(err) => Err(self.db()(err)),
        }
    }
}
