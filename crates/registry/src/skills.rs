//! Skill records: the name reservation that makes a name taken before any
//! file is copied, its activation once the content is in place, its
//! roll-back, removal, and the lists `skill list|show` and a starting hub
//! read.
//!
//! Not here: the skill's files (gm-hub keeps them in `DATA_DIR/skills/`)
//! and deciding when to promote.
//!
//! Every change is one statement, so two hubs or two requests racing for a
//! name get exactly one winner from the primary key: `reserve_skill`
//! inserts, or takes back a removed name, and reports `AlreadyExists`
//! otherwise.

use gm_core::{NodeId, SkillName, WorkspaceId};

use crate::{Registry, RegistryError, now_ms, on_pool};

/// Where a skill is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkillState {
    /// The name is taken; the content is being copied into the registry.
    Reserved,
    /// In the registry and linked into every workspace.
    Active,
    /// Removed by an admin; the name may be registered again.
    Removed,
}

impl SkillState {
    pub const ALL: [SkillState; 3] = [
        SkillState::Reserved,
        SkillState::Active,
        SkillState::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkillState::Reserved => "reserved",
            SkillState::Active => "active",
            SkillState::Removed => "removed",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, RegistryError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                RegistryError::invalid(
                    "state",
                    raw,
                    "unknown skill state; allowed: reserved, active, removed",
                )
            })
    }
}

impl std::fmt::Display for SkillState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a skill came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkillOrigin {
    /// Registered by an admin (`ghostmirror skill add`).
    System,
    /// A directory a node (or a hub-side tool, node `hub`) made under
    /// `.skills/` in a workspace.
    Promoted {
        workspace: WorkspaceId,
        node: NodeId,
    },
}

impl SkillOrigin {
    pub fn kind(&self) -> &'static str {
        match self {
            SkillOrigin::System => "system",
            SkillOrigin::Promoted { .. } => "promoted",
        }
    }
}

impl std::fmt::Display for SkillOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkillOrigin::System => f.write_str("system"),
            SkillOrigin::Promoted { workspace, node } => {
                write!(f, "promoted from workspace {workspace} by node {node}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    pub name: SkillName,
    pub state: SkillState,
    pub origin: SkillOrigin,
    /// 1 at the first registration, one more each time a removed name is
    /// registered again or the content is replaced.
    pub version: i64,
    /// Hex BLAKE3 of the skill tree (`gm_core::SkillTree::hash`).
    pub content_hash: String,
    /// The hub whose data dir holds the content.
    pub hub_id: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A reservation to make.
#[derive(Debug, Clone)]
pub struct NewSkill {
    pub name: SkillName,
    pub origin: SkillOrigin,
    pub content_hash: String,
    pub hub_id: String,
}

type SkillRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    String,
    String,
    i64,
    i64,
);

const SKILL_COLUMNS: &str = "name, state, origin, origin_workspace, origin_node, version, \
     content_hash, hub_id, created_ms, updated_ms";

impl Registry {
    fn skill_from_row(&self, row: SkillRow) -> Result<Skill, RegistryError> {
        let (name, state, origin, workspace, node, version, content_hash, hub_id, created, updated) =
            row;
        let corrupt = |what: String| self.corrupt(format!("skill {name:?}: {what}"));
        let origin = match (origin.as_str(), workspace, node) {
            ("system", None, _) => SkillOrigin::System,
            ("promoted", Some(workspace), Some(node)) => SkillOrigin::Promoted {
                workspace: WorkspaceId::new(&workspace).map_err(|e| corrupt(e.to_string()))?,
                node: NodeId::new(&node).map_err(|e| corrupt(e.to_string()))?,
            },
            (other, ..) => return Err(corrupt(format!("origin {other:?} without its columns"))),
        };
        Ok(Skill {
            name: SkillName::new(&name).map_err(|e| corrupt(e.to_string()))?,
            state: SkillState::parse(&state).map_err(|e| corrupt(e.to_string()))?,
            origin,
            version,
            content_hash,
            hub_id,
            created_ms: created,
            updated_ms: updated,
        })
    }

    /// Takes a name: inserts a reservation (version 1), or takes back a
    /// removed name (version + 1). `AlreadyExists` when the name is
    /// reserved or active; nothing is written then.
    pub async fn reserve_skill(&self, new: &NewSkill) -> Result<Skill, RegistryError> {
        let now = now_ms();
        let (workspace, node) = match &new.origin {
            SkillOrigin::System => (None, None),
            SkillOrigin::Promoted { workspace, node } => {
                (Some(workspace.to_string()), Some(node.to_string()))
            }
        };
        let taken = on_pool!(self, pool => sqlx::query(
            "INSERT INTO registry_skills (name, state, origin, origin_workspace, origin_node, \
             version, content_hash, hub_id, created_ms, updated_ms) \
             VALUES ($1, 'reserved', $2, $3, $4, 1, $5, $6, $7, $7) \
             ON CONFLICT (name) DO UPDATE SET state = 'reserved', origin = excluded.origin, \
             origin_workspace = excluded.origin_workspace, origin_node = excluded.origin_node, \
             version = registry_skills.version + 1, content_hash = excluded.content_hash, \
             hub_id = excluded.hub_id, updated_ms = excluded.updated_ms \
             WHERE registry_skills.state = 'removed'",
        )
        .bind(new.name.as_str())
        .bind(new.origin.kind())
        .bind(workspace)
        .bind(node)
        .bind(&new.content_hash)
        .bind(&new.hub_id)
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected() == 0))
        .map_err(self.db())?;
        if taken {
            return Err(RegistryError::AlreadyExists {
                what: "skill",
                key: new.name.to_string(),
            });
        }
        tracing::info!(skill = %new.name, origin = %new.origin, "skill name reserved");
        self.existing_skill(&new.name).await
    }

    async fn existing_skill(&self, name: &SkillName) -> Result<Skill, RegistryError> {
        self.skill(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: "skill",
                key: name.to_string(),
            })
    }

    /// Marks a reservation complete: the content is in place.
    pub async fn activate_skill(&self, name: &SkillName) -> Result<Skill, RegistryError> {
        self.transition(name, "reserved", "active").await
    }

    /// Undoes a reservation that never completed: a first registration is
    /// forgotten, a re-registration of a removed name goes back to removed.
    /// False when there was no reservation to undo.
    pub async fn release_skill(&self, name: &SkillName) -> Result<bool, RegistryError> {
        let released = on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM registry_skills WHERE name = $1 AND state = 'reserved' AND version = 1",
            )
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let restored = sqlx::query(
                "UPDATE registry_skills SET state = 'removed', updated_ms = $2 \
                 WHERE name = $1 AND state = 'reserved'",
            )
            .bind(name.as_str())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok::<_, sqlx::Error>(deleted + restored > 0)
        }.await)
        .map_err(self.db())?;
        if released {
            tracing::info!(skill = %name, "skill reservation released");
        }
        Ok(released)
    }

    /// Marks an active skill removed; its name may be registered again.
    pub async fn remove_skill(&self, name: &SkillName) -> Result<Skill, RegistryError> {
        self.transition(name, "active", "removed").await
    }

    /// Records new content for an active skill (found changed in the
    /// registry directory): a new version.
    pub async fn replace_skill_content(
        &self,
        name: &SkillName,
        content_hash: &str,
    ) -> Result<Skill, RegistryError> {
        let changed = on_pool!(self, pool => sqlx::query(
            "UPDATE registry_skills SET content_hash = $2, version = version + 1, updated_ms = $3 \
             WHERE name = $1 AND state = 'active'",
        )
        .bind(name.as_str())
        .bind(content_hash)
        .bind(now_ms())
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(self.not_in_state(name, "active").await);
        }
        self.existing_skill(name).await
    }

    async fn transition(
        &self,
        name: &SkillName,
        from: &'static str,
        to: &'static str,
    ) -> Result<Skill, RegistryError> {
        let changed = on_pool!(self, pool => sqlx::query(
            "UPDATE registry_skills SET state = $3, updated_ms = $4 WHERE name = $1 AND state = $2",
        )
            .bind(name.as_str())
            .bind(from)
            .bind(to)
            .bind(now_ms())
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(self.not_in_state(name, from).await);
        }
        tracing::info!(skill = %name, state = to, "skill state changed");
        self.existing_skill(name).await
    }

    /// The error for a change that found the skill missing or in another state.
    async fn not_in_state(&self, name: &SkillName, wanted: &str) -> RegistryError {
        match self.skill(name).await {
            Ok(Some(skill)) => RegistryError::Refused(format!(
                "skill {:?} is {}, not {wanted}",
                name.as_str(),
                skill.state
            )),
            Ok(None) => RegistryError::NotFound {
                what: "skill",
                key: name.to_string(),
            },
            Err(err) => err,
        }
    }

    pub async fn skill(&self, name: &SkillName) -> Result<Option<Skill>, RegistryError> {
        let sql = format!("SELECT {SKILL_COLUMNS} FROM registry_skills WHERE name = $1");
        let row: Option<SkillRow> = on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name.as_str())
            .fetch_optional(pool)
            .await)
        .map_err(self.db())?;
        row.map(|row| self.skill_from_row(row)).transpose()
    }

    /// Every skill record (all states, or one), in name order. Skills are
    /// few (a registry of shared instructions), so this is one list, not
    /// pages.
    pub async fn skills(&self, state: Option<SkillState>) -> Result<Vec<Skill>, RegistryError> {
        let rows: Vec<SkillRow> = match state {
            Some(state) => {
                let sql = format!(
                    "SELECT {SKILL_COLUMNS} FROM registry_skills WHERE state = $1 ORDER BY name"
                );
                on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(state.as_str())
                    .fetch_all(pool)
                    .await)
            }
            None => {
                let sql = format!("SELECT {SKILL_COLUMNS} FROM registry_skills ORDER BY name");
                on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(pool)
                    .await)
            }
        }
        .map_err(self.db())?;
        rows.into_iter()
            .map(|row| self.skill_from_row(row))
            .collect()
    }
}
