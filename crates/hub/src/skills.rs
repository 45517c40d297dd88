//! The global skill registry on the hub: `DATA_DIR/skills/<name>/` holds
//! one copy of each skill, recorded in gm-registry (name, origin, version,
//! state, content hash); every mirror has `.skills/<name>` as a symlink
//! into it, so hub-side tools read that one copy.
//!
//! How skills reach nodes: the journal of every workspace lists
//! `.skills/<name>` and everything below it as ordinary entries with the
//! registry's content (a canonical link on disk stands for that tree, see
//! `overlay`), flagged read-only on the wire, so nodes materialize real,
//! read-only files through the usual downloads (`resolve` serves them from
//! the registry). The link itself is never journaled and never followed by
//! a scan.
//!
//! Owns:
//! - the names this hub knows (`Known`): reserved, active (with its tree)
//!   or unavailable (active in the database, files missing here);
//! - registration, the one atomic path into the registry for both a system
//!   skill (`add`, files sent by `ghostmirror skill add`) and a promotion
//!   (`promote`, a directory under `.skills/` in a workspace): the name is
//!   reserved in the database first, the tree is built in the registry's
//!   staging, fsynced, renamed into place without replacing anything,
//!   recorded active, then linked into every workspace;
//! - start-up recovery (`load`): a reservation whose directory is in place
//!   is completed, any other is rolled back;
//! - the link pass (`link_locked`), run under a workspace's commit lock:
//!   links every active skill, moves a directory that shadows one to
//!   `skills-conflicts/` (kept, journaled), removes links of removed skills;
//! - candidates: directories under `.skills/` that are not skills, promoted
//!   once quiet for `GM_SKILL_PROMOTE_QUIET`;
//! - test-only fault points (`GM_TEST_FAULT=promote:<step>`, debug builds).
//!
//! Does not own: the refusal of node writes under a skill (`commit` asks
//! `guarded`), the scan (`observe` asks `overlay`), the records (gm-registry).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use gm_core::skills::{registry_path, skill_component, skill_copy_candidates, skills_dir};
use gm_core::{
    CacheRecords, Entry, Kind, NodeId, RelPath, Seq, SkillName, SkillTree, Versioned, WorkspaceId,
};
use gm_fs::{Expect, FileMode, FsError, IgnoreRules, Root, scan_tree};
use gm_registry::{NewSkill, RegistryError, Skill, SkillOrigin, SkillState};
use gm_store::{ConflictRow, RecordBatch};

use crate::observe::{Scope, observe_unlinked};
use crate::state::{Counters, Hub, Workspace};

/// Mode of every directory in the registry: nobody writes into a skill
/// through a mirror's link.
const REGISTRY_DIR_MODE: u32 = 0o555;
/// Largest skill `skill add` accepts, in bytes of file content.
pub const MAX_SKILL_BYTES: u64 = 16 << 20;
/// The node id conflict copies made by the hub itself carry.
const HUB_NODE: &str = "hub";

/// The target of `mirrors/<ws>/.skills/<name>`: relative, so it survives a
/// moved data dir and a mirror moved to `DATA_DIR/trash/<id>/`.
pub fn link_target(name: &SkillName) -> String {
    format!("../../../skills/{name}")
}

/// What this hub knows about a name.
#[derive(Debug, Clone)]
pub enum Known {
    /// Being registered: node writes under it are refused; not linked yet.
    Reserved,
    /// In the registry and linked into every workspace.
    Active(Arc<SkillTree>),
    /// Active in the database but its directory here is missing or
    /// unreadable: never linked, and its paths in the journals are left as
    /// they are (nodes keep their copies).
    Unavailable(String),
}

/// A directory under `.skills/` that is not a skill (yet).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub last_change: Instant,
    /// Why it is not promoted, once a promotion was refused or failed; a
    /// new change clears it.
    pub problem: Option<String>,
}

/// Why a skill request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    #[error("{0}")]
    NotFound(String),
    /// The name is taken: a skill is never overwritten.
    #[error("{0}")]
    Exists(String),
    /// The state refuses it (no SKILL.md, not a directory, draining).
    #[error("{0}")]
    Refused(String),
    /// The source changed under the copy: try again.
    #[error("{0}")]
    Retry(String),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<FsError> for SkillError {
    fn from(err: FsError) -> Self {
        SkillError::Internal(err.into())
    }
}

impl From<gm_store::StoreError> for SkillError {
    fn from(err: gm_store::StoreError) -> Self {
        SkillError::Internal(err.into())
    }
}

impl From<tokio::task::JoinError> for SkillError {
    fn from(err: tokio::task::JoinError) -> Self {
        SkillError::Internal(err.into())
    }
}

/// The content of a skill to register.
pub enum Source {
    /// Files sent with `skill add`, by registry path (`<name>/...`).
    Bytes(HashMap<RelPath, Vec<u8>>),
    /// `.skills/<name>/` in a mirror.
    Mirror(Arc<Root>),
}

pub struct Skills {
    /// `DATA_DIR/skills` held open: skills at `<name>/`, staged trees in
    /// its `.ghostmirror/staging/`.
    pub root: Arc<Root>,
    known: RwLock<BTreeMap<SkillName, Known>>,
    candidates: Mutex<BTreeMap<(WorkspaceId, SkillName), Candidate>>,
    /// Problems already logged, so a scan does not repeat them.
    reported: Mutex<BTreeSet<String>>,
    /// `GM_SKILL_PROMOTE_QUIET`; `None`: only `skill promote`.
    pub quiet: Option<Duration>,
    fault: Option<String>,
}

impl Skills {
    /// Opens (creating) the registry directory and removes staged trees a
    /// dead process left. Blocking.
    pub fn open(
        data_dir: &std::path::Path,
        tag: &str,
        quiet: Option<Duration>,
        fault: Option<String>,
    ) -> anyhow::Result<Skills> {
        let path = data_dir.join("skills");
        let root = Root::create(&path, tag)
            .with_context(|| format!("open the skill registry {}", path.display()))?;
        for entry in root.clear_staging()? {
            tracing::info!(path = %format!("skills/.ghostmirror/staging/{}", entry.name), "removed a staged skill left by an earlier hub");
        }
        Ok(Skills {
            root: Arc::new(root),
            known: RwLock::new(BTreeMap::new()),
            candidates: Mutex::new(BTreeMap::new()),
            reported: Mutex::new(BTreeSet::new()),
            quiet,
            fault,
        })
    }

    /// Test builds only: aborts the process at `step` of a registration
    /// when `GM_TEST_FAULT=promote:<step>` (see ARCHITECTURE.md, crash cases).
    fn fault(&self, step: &str) {
        if cfg!(debug_assertions)
            && let Some(fault) = &self.fault
            && fault.strip_prefix("promote:") == Some(step)
        {
            tracing::error!(step, "GM_TEST_FAULT: aborting the hub at this step");
            std::process::abort();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<SkillName, Known>> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SkillName, Known>> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn known(&self, name: &SkillName) -> Option<Known> {
        self.read().get(name).cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<SkillName, Known> {
        self.read().clone()
    }

    /// The skill whose name `path` is at or under, when that name is taken
    /// (reserved, active or unavailable): node writes there are refused.
    pub fn guarded(&self, path: &RelPath) -> Option<SkillName> {
        let name = gm_core::skills::skill_of(path)?;
        self.read().contains_key(&name).then_some(name)
    }

    /// True for paths of a registered skill: nodes write them read-only.
    pub fn is_read_only(&self, path: &RelPath) -> bool {
        gm_core::skills::skill_of(path).is_some_and(|name| {
            matches!(
                self.read().get(&name),
                Some(Known::Active(_) | Known::Unavailable(_))
            )
        })
    }

    /// Where the content of a path inside an active skill is read from:
    /// the registry, never through the mirror's link.
    pub fn resolve(&self, path: &RelPath) -> Option<(Arc<Root>, RelPath)> {
        let name = gm_core::skills::skill_of(path)?;
        match self.read().get(&name) {
            Some(Known::Active(_)) => Some((self.root.clone(), registry_path(path)?)),
            _ => None,
        }
    }

    /// Notes a change under `.skills/<name>` for a name that is not a
    /// skill: a promotion candidate, quiet from now on.
    pub fn touch_candidate(&self, ws: &WorkspaceId, path: &RelPath) {
        let Some((raw, _)) = skill_component(path) else {
            return;
        };
        let Ok(name) = SkillName::new(raw) else {
            return;
        };
        if self.read().contains_key(&name) {
            return;
        }
        self.candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (ws.clone(), name),
                Candidate {
                    last_change: Instant::now(),
                    problem: None,
                },
            );
    }

    fn set_candidate_problem(&self, ws: &WorkspaceId, name: &SkillName, problem: String) {
        if let Some(candidate) = self
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(ws.clone(), name.clone()))
        {
            candidate.problem = Some(problem);
        }
    }

    pub fn candidates(&self) -> BTreeMap<(WorkspaceId, SkillName), Candidate> {
        self.candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn forget_candidate(&self, ws: &WorkspaceId, name: &SkillName) {
        self.candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ws.clone(), name.clone()));
    }

    /// Logs `problem` once (at WARN) until `clear_report` for its key.
    fn report_once(&self, key: String, problem: &str, ws: Option<&WorkspaceId>) {
        let fresh = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
        if fresh {
            match ws {
                Some(ws) => tracing::warn!(workspace = %ws, problem, "skills"),
                None => tracing::warn!(problem, "skills"),
            }
        }
    }

    fn clear_report(&self, key: &str) {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Paths a scan of `tops` should look at instead: a path inside a
    /// linked skill stands for the whole skill (the scanner cannot walk
    /// through the link). With `exact` (no recursion), such paths are
    /// dropped: they have no cache records to settle.
    pub fn scan_tops(&self, tops: Vec<RelPath>, exact: bool) -> Vec<RelPath> {
        let known = self.read();
        let mut out = Vec::with_capacity(tops.len());
        for top in tops {
            match gm_core::skills::skill_of(&top) {
                Some(name)
                    if top != name.dir()
                        && matches!(
                            known.get(&name),
                            Some(Known::Active(_) | Known::Unavailable(_))
                        ) =>
                {
                    if !exact {
                        out.push(name.dir());
                    }
                }
                _ => out.push(top),
            }
        }
        out
    }

    /// What a scan of `top` found, as the journal must see it: a canonical
    /// link at `.skills/<name>` of an active skill stands for the
    /// registry's tree of that skill; for an unavailable one, its paths
    /// are returned in `frozen` (neither journaled nor deleted). Anything
    /// else is what the disk holds.
    pub fn overlay(
        &self,
        top: Option<&RelPath>,
        scanned: Vec<(RelPath, Entry)>,
    ) -> (Vec<(RelPath, Entry)>, Vec<RelPath>) {
        let known = self.read();
        if known.is_empty() {
            return (scanned, Vec::new());
        }
        let mut linked: Vec<(RelPath, Option<Arc<SkillTree>>)> = Vec::new();
        for (name, state) in known.iter() {
            let dir = name.dir();
            if let Some(top) = top
                && !(top == &dir || top.is_ancestor_of(&dir))
            {
                continue;
            }
            let target = link_target(name);
            let is_link = scanned.iter().any(|(path, entry)| {
                path == &dir && matches!(entry, Entry::Symlink { target: t } if *t == target)
            });
            if !is_link {
                continue;
            }
            match state {
                Known::Active(tree) => linked.push((dir, Some(tree.clone()))),
                Known::Unavailable(_) => linked.push((dir, None)),
                Known::Reserved => {}
            }
        }
        if linked.is_empty() {
            return (scanned, Vec::new());
        }
        let mut out: Vec<(RelPath, Entry)> = scanned
            .into_iter()
            .filter(|(path, _)| {
                !linked
                    .iter()
                    .any(|(dir, _)| dir == path || dir.is_ancestor_of(path))
            })
            .collect();
        let mut frozen = Vec::new();
        for (dir, tree) in linked {
            match tree {
                Some(tree) => out.extend(tree.in_workspace()),
                None => frozen.push(dir),
            }
        }
        (out, frozen)
    }
}

/// Reads a skill's tree from the registry directory (hashing its files;
/// skills are small). An error says what is wrong. Blocking.
fn scan_registry(hub: &Hub, name: &SkillName) -> Result<SkillTree, String> {
    let root = &hub.skills.root;
    let top = name.registry_dir();
    match root.lstat(&top) {
        Ok(Some(stat)) if stat.kind == Kind::Dir => {}
        Ok(Some(_)) => {
            return Err(format!(
                "{}/skills/{name} is not a directory",
                hub.config.data_dir.display()
            ));
        }
        Ok(None) => {
            return Err(format!(
                "{}/skills/{name} is missing",
                hub.config.data_dir.display()
            ));
        }
        Err(err) => return Err(err.to_string()),
    }
    let scan = scan_tree(
        root,
        Some(&top),
        true,
        &CacheRecords::default(),
        &hub.config.scan,
        &IgnoreRules::none(),
    )
    .map_err(|e| e.to_string())?;
    if !scan.unreadable.is_empty() {
        return Err(scan.problems.join("; "));
    }
    Counters::add(&hub.counters.files_hashed, scan.hashed);
    SkillTree::from_registry(name, scan.entries.iter().map(|s| (&s.path, &s.entry)))
        .map_err(|e| e.to_string())
}

/// Start-up: recovers half-done registrations of this hub, then loads every
/// skill the database lists (before any workspace is scanned).
pub async fn load(hub: &Arc<Hub>) -> anyhow::Result<()> {
    let records = hub
        .registry
        .skills(None)
        .await
        .context("read the skill registry")?;
    let hub_id = hub.db.hub_id().to_string();
    let mut loaded = BTreeMap::new();
    for record in records {
        let name = record.name.clone();
        match record.state {
            SkillState::Removed => continue,
            SkillState::Reserved if record.hub_id != hub_id => {
                loaded.insert(name, Known::Reserved);
            }
            SkillState::Reserved => {
                if let Some(known) = recover(hub, &record).await? {
                    loaded.insert(name, known);
                }
            }
            SkillState::Active => {
                let known = load_active(hub, &record).await?;
                loaded.insert(name, known);
            }
        }
    }
    let active = loaded
        .values()
        .filter(|k| matches!(k, Known::Active(_)))
        .count();
    *hub.skills.write() = loaded;
    let hub2 = hub.clone();
    tokio::task::spawn_blocking(move || trash_strays(&hub2)).await??;
    tracing::info!(active, "skill registry loaded");
    Ok(())
}

/// A reservation this hub left: complete it when its directory is in
/// place (the rename is the commit point: it comes after the tree was
/// fsynced), roll it back otherwise.
async fn recover(hub: &Arc<Hub>, record: &Skill) -> anyhow::Result<Option<Known>> {
    let name = record.name.clone();
    let hub2 = hub.clone();
    let scanned = tokio::task::spawn_blocking(
        move || -> anyhow::Result<Option<Result<SkillTree, String>>> {
            Ok(hub2
                .skills
                .root
                .lstat(&name.registry_dir())?
                .map(|_| scan_registry(&hub2, &name)))
        },
    )
    .await??;
    match scanned {
        Some(Ok(tree)) if tree.hash().to_hex() == record.content_hash => {
            hub.registry.activate_skill(&record.name).await?;
            tracing::warn!(skill = %record.name, origin = %record.origin, "recovered a half-done skill registration: its files were in place, it is now active");
            Ok(Some(Known::Active(Arc::new(tree))))
        }
        Some(found) => {
            let why = match found {
                Ok(tree) => format!(
                    "content {} is not the reserved {}",
                    tree.hash().to_hex(),
                    record.content_hash
                ),
                Err(why) => why,
            };
            let hub2 = hub.clone();
            let name = record.name.clone();
            let trashed = tokio::task::spawn_blocking(move || to_trash(&hub2, &name)).await??;
            hub.registry.release_skill(&record.name).await?;
            tracing::error!(skill = %record.name, reason = %why, trash = %trashed.display(), "a half-done skill registration left a directory that is not what was reserved; moved to the trash and rolled back");
            Ok(None)
        }
        None => {
            hub.registry.release_skill(&record.name).await?;
            tracing::warn!(skill = %record.name, origin = %record.origin, "rolled back a half-done skill registration: its files never reached the registry");
            Ok(None)
        }
    }
}

async fn load_active(hub: &Arc<Hub>, record: &Skill) -> anyhow::Result<Known> {
    let name = record.name.clone();
    let hub2 = hub.clone();
    let scanned = tokio::task::spawn_blocking(move || scan_registry(&hub2, &name)).await?;
    let tree = match scanned {
        Ok(tree) => tree,
        Err(why) => {
            tracing::error!(skill = %record.name, reason = %why, "an active skill's files are not usable here; it is not linked and nodes keep their copies");
            return Ok(Known::Unavailable(why));
        }
    };
    let hash = tree.hash().to_hex();
    if hash != record.content_hash {
        let updated = hub
            .registry
            .replace_skill_content(&record.name, &hash)
            .await?;
        tracing::warn!(skill = %record.name, version = updated.version, "a skill's files changed outside ghostmirror; recorded as a new version");
    }
    if !tree.has_manifest() {
        tracing::warn!(skill = %record.name, "a skill has no SKILL.md at its top");
    }
    Ok(Known::Active(Arc::new(tree)))
}

/// Moves `DATA_DIR/skills/<name>` to `DATA_DIR/trash/skill-<name>-<utc>`,
/// made writable so the trash can be emptied later. Blocking.
fn to_trash(hub: &Hub, name: &SkillName) -> anyhow::Result<std::path::PathBuf> {
    let from = hub.skills.root.path().join(name.as_str());
    let trash = hub.config.data_dir.join("trash");
    std::fs::create_dir_all(&trash).with_context(|| format!("create {}", trash.display()))?;
    let target = crate::purge::trash_target(&trash, &format!("skill-{name}"));
    make_writable(&from)?;
    std::fs::rename(&from, &target)
        .with_context(|| format!("move {} to {}", from.display(), target.display()))?;
    Ok(target)
}

/// Gives every directory of a tree its owner's write bit back (a
/// registry tree is read-only), never following a symlink.
fn make_writable(top: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            continue;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dir.display()))?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Directories in the registry that no reserved or active skill owns (a
/// removal interrupted after its record): moved to the trash. Blocking.
fn trash_strays(hub: &Hub) -> anyhow::Result<()> {
    let known = hub.skills.snapshot();
    let listing = std::fs::read_dir(hub.skills.root.path())
        .with_context(|| format!("list {}", hub.skills.root.path().display()))?;
    for entry in listing {
        let entry = entry?;
        let Some(raw) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if raw == gm_core::INTERNAL_DIR {
            continue;
        }
        match SkillName::new(&raw) {
            Ok(name) if known.contains_key(&name) => {}
            Ok(name) => {
                let trashed = to_trash(hub, &name)?;
                tracing::warn!(skill = %name, trash = %trashed.display(), "a directory in the skill registry belongs to no skill; moved to the trash");
            }
            Err(_) => {
                tracing::warn!(entry = %raw, "an entry in the skill registry is not a skill name; left alone");
            }
        }
    }
    Ok(())
}

/// The refusal for a name that is taken, saying by what.
fn exists(name: &SkillName, record: Option<&Skill>) -> SkillError {
    SkillError::Exists(match record {
        Some(skill) => format!(
            "skill {name} already exists ({}, version {}, {}); a skill is never overwritten",
            skill.origin, skill.version, skill.state
        ),
        None => format!("skill {name} is being registered; a skill is never overwritten"),
    })
}

/// Takes the name, first here (from this moment node writes under
/// `.skills/<name>` are refused), then in the database, which decides
/// between hubs and requests racing for it.
async fn reserve(hub: &Hub, new: &NewSkill) -> Result<Skill, SkillError> {
    let taken = {
        let mut known = hub.skills.write();
        let taken = known.contains_key(&new.name);
        if !taken {
            known.insert(new.name.clone(), Known::Reserved);
        }
        taken
    };
    if taken {
        let record = hub.registry.skill(&new.name).await.ok().flatten();
        return Err(exists(&new.name, record.as_ref()));
    }
    match hub.registry.reserve_skill(new).await {
        Ok(skill) => Ok(skill),
        Err(err) => {
            {
                let mut known = hub.skills.write();
                if matches!(known.get(&new.name), Some(Known::Reserved)) {
                    known.remove(&new.name);
                }
            }
            Err(match err {
                RegistryError::AlreadyExists { .. } => {
                    let record = hub.registry.skill(&new.name).await.ok().flatten();
                    exists(&new.name, record.as_ref())
                }
                other => other.into(),
            })
        }
    }
}

/// Undoes a reservation whose files never landed.
async fn release(hub: &Hub, name: &SkillName) {
    match hub.registry.release_skill(name).await {
        Ok(_) => {
            let mut known = hub.skills.write();
            if matches!(known.get(name), Some(Known::Reserved)) {
                known.remove(name);
            }
        }
        Err(err) => {
            tracing::error!(skill = %name, error = %err, "cannot release a skill reservation; the next start rolls it back");
        }
    }
}

/// The atomic path into the registry: reserve, build the tree in staging
/// (every file hashed while copied and checked, read-only, fsynced), rename
/// it into place (never over an existing name), record it active. A crash
/// anywhere leaves no skill or a complete one; `load` finishes the latter.
async fn register(
    hub: &Arc<Hub>,
    tree: SkillTree,
    origin: SkillOrigin,
    source: Source,
) -> Result<Skill, SkillError> {
    if hub.is_draining() {
        return Err(SkillError::Refused(
            "the hub is shutting down; retry shortly".into(),
        ));
    }
    let name = tree.name().clone();
    let new = NewSkill {
        name: name.clone(),
        origin,
        content_hash: tree.hash().to_hex(),
        hub_id: hub.db.hub_id().to_string(),
    };
    reserve(hub, &new).await?;
    hub.skills.fault("after-reserve");
    let tree = Arc::new(tree);
    let (hub2, tree2) = (hub.clone(), tree.clone());
    let installed = tokio::task::spawn_blocking(move || install(&hub2, &tree2, &source)).await;
    match installed {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            release(hub, &name).await;
            return Err(err);
        }
        Err(err) => {
            release(hub, &name).await;
            return Err(err.into());
        }
    }
    // From here the files are in place: if recording fails, the next start
    // completes the registration.
    let active = hub.registry.activate_skill(&name).await?;
    hub.skills.fault("after-record");
    hub.skills.write().insert(name, Known::Active(tree));
    Ok(active)
}

/// Builds the tree in the registry's staging and renames it into place.
/// Blocking.
fn install(hub: &Hub, tree: &SkillTree, source: &Source) -> Result<(), SkillError> {
    let root = &hub.skills.root;
    let name = tree.name();
    let mut staged = root.stage_tree(&name.registry_dir())?;
    let changed = |path: &RelPath, err: FsError| {
        SkillError::Retry(format!(
            "{path} changed while it was copied into the registry ({err}); nothing was registered, try again"
        ))
    };
    for (path, entry) in tree.entries() {
        let Some(registry) = registry_path(path) else {
            continue;
        };
        match entry {
            Entry::Dir => staged.make_dir(&registry)?,
            Entry::Symlink { target } => staged.make_symlink(&registry, target)?,
            Entry::File {
                hash, executable, ..
            } => {
                let mode = FileMode::read_only(*executable);
                match source {
                    Source::Bytes(files) => {
                        let data = files.get(&registry).ok_or_else(|| {
                            SkillError::Internal(anyhow::anyhow!("no content for {registry}"))
                        })?;
                        staged.write_file(&registry, &mut &data[..], *hash, mode)?;
                    }
                    Source::Mirror(mirror) => {
                        let (mut file, _) = mirror.open_read(path).map_err(|e| changed(path, e))?;
                        staged
                            .write_file(&registry, &mut file, *hash, mode)
                            .map_err(|e| match e {
                                FsError::HashMismatch { .. } => changed(path, e),
                                other => other.into(),
                            })?;
                    }
                }
            }
        }
    }
    staged.finish(REGISTRY_DIR_MODE)?;
    hub.skills.fault("after-copy");
    match staged.place(root, REGISTRY_DIR_MODE) {
        Ok(_) => {}
        Err(FsError::Exists { path }) => {
            return Err(SkillError::Exists(format!(
                "{path} exists already; a skill is never overwritten"
            )));
        }
        Err(err) => return Err(err.into()),
    }
    hub.skills.fault("after-rename");
    Ok(())
}

/// `ghostmirror skill add`: registers a system skill from files.
pub async fn add(
    hub: &Arc<Hub>,
    tree: SkillTree,
    files: HashMap<RelPath, Vec<u8>>,
) -> Result<Skill, SkillError> {
    if !tree.has_manifest() {
        return Err(SkillError::Refused(format!(
            "skill {} has no {} at its top; a skill directory needs one",
            tree.name(),
            gm_core::SKILL_MANIFEST
        )));
    }
    let skill = register(hub, tree, SkillOrigin::System, Source::Bytes(files)).await?;
    tracing::info!(skill = %skill.name, version = skill.version, hash = %skill.content_hash, "system skill registered");
    link_everywhere(hub).await;
    Ok(skill)
}

/// Promotes `.skills/<name>/` of a workspace into the registry; then the
/// directory becomes the link and every workspace gets the skill. Holds
/// the workspace's commit lock from reading the directory to linking it,
/// so no node commit lands in it meanwhile.
pub async fn promote(
    hub: &Arc<Hub>,
    ws_id: &WorkspaceId,
    name: &SkillName,
) -> Result<Skill, SkillError> {
    let result = promote_inner(hub, ws_id, name).await;
    match &result {
        Ok(skill) => {
            Counters::add(&hub.counters.skill_promotions, 1);
            hub.skills.forget_candidate(ws_id, name);
            tracing::info!(skill = %name, workspace = %ws_id, origin = %skill.origin, version = skill.version, "skill promoted into the registry");
        }
        Err(err) => {
            Counters::add(&hub.counters.skill_promotions_refused, 1);
            tracing::warn!(skill = %name, workspace = %ws_id, reason = %err, "skill promotion refused; the workspace's directory stays where it was");
        }
    }
    result
}

async fn promote_inner(
    hub: &Arc<Hub>,
    ws_id: &WorkspaceId,
    name: &SkillName,
) -> Result<Skill, SkillError> {
    let ws = hub
        .workspace(ws_id)
        .ok_or_else(|| SkillError::NotFound(format!("workspace {ws_id} is not on this hub")))?;
    if hub.skills.known(name).is_some() {
        let record = hub.registry.skill(name).await.ok().flatten();
        return Err(exists(name, record.as_ref()));
    }
    let guard = ws.seq.clone().lock_owned().await;
    let (hub2, ws2, name2) = (hub.clone(), ws.clone(), name.clone());
    let (mut guard, entries, origin) = tokio::task::spawn_blocking(move || {
        let mut guard = guard;
        // Journal what a hub-side tool may have changed there first.
        crate::observe::observe_locked(
            &hub2,
            &ws2,
            &mut guard,
            Scope::Subtrees(vec![name2.dir()]),
            false,
        )?;
        let entries = hub2.db.entries_under(&ws2.id, Some(&name2.dir()))?;
        let manifest = name2.dir().join(gm_core::SKILL_MANIFEST)?;
        let origin = hub2.db.origin(&ws2.id, &manifest)?;
        anyhow::Ok((guard, entries, origin))
    })
    .await??;
    if let Some(reason) = ws.halted() {
        return Err(SkillError::Refused(format!(
            "workspace {ws_id} is halted: {reason}"
        )));
    }
    let top = entries.iter().find(|(path, _)| *path == name.dir());
    if !matches!(
        top,
        Some((
            _,
            Versioned {
                entry: Some(Entry::Dir),
                ..
            }
        ))
    ) {
        return Err(SkillError::NotFound(format!(
            "workspace {ws_id} has no directory .skills/{name} to promote"
        )));
    }
    let live = entries
        .iter()
        .filter_map(|(path, state)| state.entry.as_ref().map(|entry| (path, entry)));
    let tree = SkillTree::from_workspace(name, live);
    if !tree.has_manifest() {
        return Err(SkillError::Refused(format!(
            ".skills/{name} in workspace {ws_id} has no {} at its top; a skill directory needs one",
            gm_core::SKILL_MANIFEST
        )));
    }
    let node = origin
        .and_then(|raw| NodeId::new(&raw).ok())
        .map_or_else(|| NodeId::new(HUB_NODE), Ok)
        .map_err(|e| SkillError::Internal(e.into()))?;
    let origin = SkillOrigin::Promoted {
        workspace: ws_id.clone(),
        node,
    };
    let skill = register(hub, tree, origin, Source::Mirror(ws.root())).await?;
    // The source becomes the link, here first (the lock is still ours).
    let (hub2, ws2) = (hub.clone(), ws.clone());
    guard = tokio::task::spawn_blocking(move || {
        link_locked(&hub2, &ws2, &mut guard)?;
        anyhow::Ok(guard)
    })
    .await??;
    hub.skills.fault("after-link");
    drop(guard);
    link_everywhere(hub).await;
    Ok(skill)
}

/// `ghostmirror skill remove`: the record first (a crash after it leaves a
/// directory no skill owns, trashed at the next start), then the links and
/// the journals, then the files go to the trash.
pub async fn remove(hub: &Arc<Hub>, name: &SkillName) -> Result<Skill, SkillError> {
    match hub.skills.known(name) {
        None => {
            return Err(SkillError::NotFound(format!(
                "skill {name} is not in the registry"
            )));
        }
        Some(Known::Reserved) => {
            return Err(SkillError::Refused(format!(
                "skill {name} is being registered; remove it once it is active"
            )));
        }
        Some(_) => {}
    }
    let skill = hub.registry.remove_skill(name).await?;
    hub.skills.write().remove(name);
    link_everywhere(hub).await;
    let (hub2, name2) = (hub.clone(), name.clone());
    let trashed =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<std::path::PathBuf>> {
            match hub2.skills.root.lstat(&name2.registry_dir())? {
                Some(_) => Ok(Some(to_trash(&hub2, &name2)?)),
                None => Ok(None),
            }
        })
        .await??;
    tracing::info!(skill = %name, trash = ?trashed, "skill removed from the registry and every workspace");
    Ok(skill)
}

/// Runs the link pass in every workspace, one commit lock at a time.
pub async fn link_everywhere(hub: &Arc<Hub>) {
    for ws in hub.all_workspaces() {
        let guard = ws.seq.clone().lock_owned().await;
        let (hub2, ws2) = (hub.clone(), ws.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            link_locked(&hub2, &ws2, &mut guard)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(workspace = %ws.id, error = %format!("{err:#}"), "linking the skills into the mirror failed")
            }
            Err(err) => {
                tracing::error!(workspace = %ws.id, error = %err, "linking the skills into the mirror failed")
            }
        }
    }
}

/// True when the directory at `.skills/<name>` in the mirror holds exactly
/// `tree` (the promoted source, or an identical copy). Blocking.
fn holds_tree(hub: &Hub, ws: &Workspace, root: &Root, tree: &SkillTree) -> anyhow::Result<bool> {
    let top = tree.name().dir();
    let cache = hub.db.cache_under(&ws.id, Some(&top))?;
    let scan = scan_tree(
        root,
        Some(&top),
        true,
        &cache,
        &hub.config.scan,
        &IgnoreRules::none(),
    )?;
    if !scan.unreadable.is_empty() {
        return Ok(false);
    }
    let found = SkillTree::from_workspace(
        tree.name(),
        scan.entries.iter().map(|s| (&s.path, &s.entry)),
    );
    Ok(&found == tree)
}

/// The first copy name for `path` free in the journal and on disk.
fn free_copy(
    hub: &Hub,
    ws: &Workspace,
    root: &Root,
    path: &RelPath,
    name: &SkillName,
    node: &NodeId,
    now: i64,
) -> anyhow::Result<RelPath> {
    for candidate in skill_copy_candidates(path, name, node, now) {
        let candidate = candidate?;
        let journaled = hub
            .db
            .entry(&ws.id, &candidate)?
            .is_some_and(|v| v.entry.is_some());
        if !journaled && root.lstat(&candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{path}: no free name under {}",
        gm_core::SKILLS_CONFLICTS_DIR
    )
}

/// The link pass of one workspace, under its commit lock (`seq`): every
/// active skill gets its link at `.skills/<name>`, journaled as the
/// registry's tree at fresh seqs (nodes then hold it read-only). What was
/// at that path is either the promoted source (same content: removed) or
/// a shadow (anything else: moved to `skills-conflicts/`, journaled, listed
/// as a conflict). Links of skills no longer in the registry are removed.
/// A `.skills` that is not a directory is reported and nothing is linked.
pub fn link_locked(hub: &Hub, ws: &Workspace, seq: &mut Seq) -> anyhow::Result<()> {
    if ws.halted().is_some() {
        return Ok(());
    }
    let skills = &hub.skills;
    let known = skills.snapshot();
    let root = ws.root();
    let top = skills_dir();
    let wants_links = known.values().any(|k| matches!(k, Known::Active(_)));
    let report_key = format!("{}:.skills", ws.id);
    match root.lstat(&top)? {
        None if !wants_links => return Ok(()),
        None => {
            root.make_dir(&top)?;
        }
        Some(stat) if stat.kind == Kind::Dir => skills.clear_report(&report_key),
        Some(stat) => {
            let kind = match stat.kind {
                Kind::File => "file",
                Kind::Symlink => "symlink",
                _ => "special file",
            };
            skills.report_once(
                report_key,
                &format!(
                    ".skills in this mirror is a {kind}, not a directory: skills are not linked into this workspace until it is moved away"
                ),
                Some(&ws.id),
            );
            return Ok(());
        }
    }
    let now = crate::purge::now_secs();
    let hub_node = NodeId::new(HUB_NODE)?;
    let mut batch = RecordBatch {
        origin: HUB_NODE.into(),
        ..Default::default()
    };
    let mut next = *seq;
    let mut observe_after: Vec<RelPath> = Vec::new();
    let mut shadows: Vec<(RelPath, RelPath)> = Vec::new();
    // Links of skills that are gone: the hub's own, taken away. (The scan
    // that follows journals the deletion of what they stood for.)
    for (raw, stat) in root.read_dir(&top)? {
        let Ok(name) = SkillName::new(&raw) else {
            continue;
        };
        if stat.kind != Kind::Symlink || known.contains_key(&name) {
            continue;
        }
        let path = name.dir();
        if root.read_link(&path)? == link_target(&name) {
            root.remove(&path, stat)?;
            tracing::info!(workspace = %ws.id, skill = %name, "removed the link of a skill that left the registry");
            observe_after.push(path);
        }
    }
    let mut top_journaled = hub
        .db
        .entry(&ws.id, &top)?
        .is_some_and(|v| v.entry == Some(Entry::Dir));
    for (name, state) in &known {
        let Known::Active(tree) = state else {
            continue;
        };
        let path = name.dir();
        let target = link_target(name);
        match root.lstat(&path)? {
            Some(stat) if stat.kind == Kind::Symlink && root.read_link(&path)? == target => {
                continue;
            }
            None => {}
            Some(stat) => {
                if stat.kind == Kind::Dir && holds_tree(hub, ws, &root, tree)? {
                    // The promoted directory itself, or an identical copy:
                    // its content is the registry's.
                    root.remove_tree(&path, stat)?;
                } else {
                    let copy = free_copy(hub, ws, &root, &path, name, &hub_node, now)?;
                    root.rename_noreplace(&path, &copy, stat)?;
                    hub.counters
                        .refuse(crate::commit::Refusal::SkillShadow.as_str());
                    tracing::warn!(workspace = %ws.id, node = HUB_NODE, path = %path, copy = %copy, skill = %name, "refused operation: a directory had the name of a registered skill; it is kept outside .skills/ and the skill takes its name");
                    observe_after.push(copy.clone());
                    shadows.push((path.clone(), copy));
                }
                skills.forget_candidate(&ws.id, name);
            }
        }
        root.make_symlink(&path, &target, Expect::Absent)?;
        tracing::info!(workspace = %ws.id, skill = %name, "skill linked into the mirror");
        if !top_journaled {
            next = next.next();
            batch.changes.push((
                top.clone(),
                Versioned {
                    entry: Some(Entry::Dir),
                    seq: next,
                },
            ));
            top_journaled = true;
        }
        // The skill's tree at fresh seqs: every node writes it (again),
        // read-only; what the journal had below it and the tree lacks goes.
        let wanted: BTreeSet<&RelPath> = tree.entries().iter().map(|(p, _)| p).collect();
        let stale: Vec<RelPath> = hub
            .db
            .entries_under(&ws.id, Some(&path))?
            .into_iter()
            .filter(|(p, v)| v.entry.is_some() && *p != path && !wanted.contains(p))
            .map(|(p, _)| p)
            .collect();
        for gone in stale.into_iter().rev() {
            next = next.next();
            batch.changes.push((
                gone,
                Versioned {
                    entry: None,
                    seq: next,
                },
            ));
        }
        for (p, entry) in tree.in_workspace() {
            next = next.next();
            batch.changes.push((
                p,
                Versioned {
                    entry: Some(entry),
                    seq: next,
                },
            ));
        }
    }
    if !batch.changes.is_empty() {
        hub.db.record(&ws.id, &batch)?;
        *seq = next;
        ws.committed.send_replace(next.0);
    }
    if !observe_after.is_empty() {
        observe_unlinked(hub, ws, seq, Scope::Subtrees(observe_after), false)?;
    }
    if !shadows.is_empty() {
        let mut conflicts = RecordBatch {
            origin: HUB_NODE.into(),
            ..Default::default()
        };
        for (path, copy) in shadows {
            let at = hub.db.entry(&ws.id, &copy)?.map_or(*seq, |v| v.seq);
            conflicts.conflicts.push(ConflictRow {
                path,
                copy_path: copy,
                node: HUB_NODE.into(),
                at_unix: now,
                seq: at,
            });
        }
        hub.db.record(&ws.id, &conflicts)?;
    }
    Ok(())
}

/// Maintenance: promotes every candidate quiet for `GM_SKILL_PROMOTE_QUIET`.
/// A refused or failed one keeps its reason (in `skill list`) until it
/// changes again.
pub async fn promote_quiet(hub: &Arc<Hub>) {
    let Some(quiet) = hub.skills.quiet else {
        return;
    };
    let due: Vec<(WorkspaceId, SkillName)> = hub
        .skills
        .candidates()
        .into_iter()
        .filter(|(_, c)| c.problem.is_none() && c.last_change.elapsed() >= quiet)
        .map(|(key, _)| key)
        .collect();
    for (ws, name) in due {
        match promote(hub, &ws, &name).await {
            Ok(_) => {}
            Err(SkillError::NotFound(_)) => hub.skills.forget_candidate(&ws, &name),
            Err(err) => hub
                .skills
                .set_candidate_problem(&ws, &name, err.to_string()),
        }
    }
}

/// Every directory `.skills/<name>` of a workspace journal that is not a
/// skill: candidates again after a restart.
pub fn find_candidates(hub: &Hub, ws: &WorkspaceId) -> anyhow::Result<()> {
    for (path, state) in hub.db.entries_under(ws, Some(&skills_dir()))? {
        if state.entry.as_ref().is_some_and(Entry::is_dir) && path.parent() == Some(skills_dir()) {
            hub.skills.touch_candidate(ws, &path);
        }
    }
    Ok(())
}

/// A skill record with what this hub knows of its files.
pub struct SkillView {
    pub record: Skill,
    pub tree: Option<Arc<SkillTree>>,
    /// Empty when all is well.
    pub problem: String,
}

pub fn view(hub: &Hub, record: Skill) -> SkillView {
    let (tree, problem) = match hub.skills.known(&record.name) {
        Some(Known::Active(tree)) => {
            let problem = if tree.has_manifest() {
                String::new()
            } else {
                format!("no {} at its top", gm_core::SKILL_MANIFEST)
            };
            (Some(tree), problem)
        }
        Some(Known::Unavailable(why)) => (None, why),
        Some(Known::Reserved) | None => (None, String::new()),
    };
    SkillView {
        record,
        tree,
        problem,
    }
}
