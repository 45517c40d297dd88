//! Node proposals -> disk + journal.
//!
//! For each proposed `(path, ours, base seq)`, under the workspace's commit
//! lock:
//! 1. the path on disk is compared with the journal first, so a write by a
//!    hub-side tool is journaled (and wins as "theirs") before any decision;
//! 2. `gm_core::decide_commit` decides: apply, already current, or keep
//!    theirs (with ours as a conflict copy when it has content, under the
//!    first free name of `gm_core::conflict_copy_candidates`);
//! 3. the change lands through `gm_fs` (staging, hash check, mode, fsync,
//!    target check, rename) and is appended to the batch's journal records;
//!    a landing that finds a non-directory parent the journal does not know
//!    of journals the parents first and decides again.
//!
//! Skills: a proposal at or under `.skills/<name>` for a taken name
//! (reserved, active or unavailable) is never applied there (`skill_guard`):
//! unless it equals what the journal holds, it is refused (metric reason
//! `skill_read_only`, a WARN line with node, workspace and path) and
//! answered as a conflict whose copy lies outside `.skills/`
//! (`skills-conflicts/<name>.conflict-<node>-<utc>/...`, written and
//! journaled like any conflict copy), so the node moves its version there
//! and restores the skill's content. This holds whether or not the
//! workspace's link is in place yet: the name is what counts.
//!
//! The journal records of one request are written in one transaction at
//! the end (or earlier, before a hub-side change must be journaled), so a
//! burst of small files costs one database commit. A crash between a rename
//! and that commit leaves a file the journal does not list: the startup scan
//! journals it, and the node's retry then finds it already current.

use std::collections::HashMap;
use std::sync::Arc;

use gm_core::skills::{skill_component, skill_copy_candidates};
use gm_core::{
    CacheRecord, CacheRecords, CommitDecision, ContentHash, Entry, NodeId, RelPath, Seq, SkillName,
    Stat, Versioned, children_matter, conflict_copy_candidates, decide_commit,
};
use gm_fs::{Expect, FsError, IgnoreRules, Root, StagedFile, scan_tree};
use gm_proto::pb;
use gm_store::{ConflictRow, RecordBatch};

use crate::observe::{Scope, observe_locked};
use crate::state::{Counters, Hub, OwnWrite, Workspace};

enum OpError {
    /// The disk moved under the plan: look again and decide again.
    Retry(String),
    /// The operation is wrong; nothing was changed.
    Refused(Refusal, String),
    /// The hub needs the file's bytes: upload them and commit again.
    NeedContent,
    /// Something a person must look at (disk or database failure).
    Fatal(anyhow::Error),
}

/// Why an operation was refused: the label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    BadPath,
    BadEntry,
    BadContent,
    TooLarge,
    ParentNotDirectory,
    Unsupported,
    Halted,
    NoConflictName,
    KeepsChanging,
    Internal,
    /// A node write under a registered skill.
    SkillReadOnly,
    /// A directory with a registered skill's name, moved aside by the link pass.
    SkillShadow,
}

/// Where a refused version under a skill is kept outside `.skills/`.
enum SkillCopy {
    /// Not kept yet: write it here.
    Free(RelPath),
    /// Already kept here (same content), at this seq.
    Kept(RelPath, Seq),
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadPath => "bad_path",
            Refusal::BadEntry => "bad_entry",
            Refusal::BadContent => "bad_content",
            Refusal::TooLarge => "too_large",
            Refusal::ParentNotDirectory => "parent_not_directory",
            Refusal::Unsupported => "unsupported",
            Refusal::Halted => "halted",
            Refusal::NoConflictName => "no_conflict_name",
            Refusal::KeepsChanging => "keeps_changing",
            Refusal::Internal => "internal",
            Refusal::SkillReadOnly => "skill_read_only",
            Refusal::SkillShadow => "skill_shadow",
        }
    }
}

impl From<FsError> for OpError {
    fn from(err: FsError) -> Self {
        match err {
            FsError::TargetChanged { .. } | FsError::NotEmpty { .. } => {
                OpError::Retry(err.to_string())
            }
            FsError::NotADirectory { path } => OpError::Refused(
                Refusal::ParentNotDirectory,
                format!("{path}: a parent is not a directory on the hub"),
            ),
            FsError::Unsupported { .. } => OpError::Refused(Refusal::Unsupported, err.to_string()),
            other => OpError::Fatal(other.into()),
        }
    }
}

impl From<gm_store::StoreError> for OpError {
    fn from(err: gm_store::StoreError) -> Self {
        OpError::Fatal(err.into())
    }
}

impl From<anyhow::Error> for OpError {
    fn from(err: anyhow::Error) -> Self {
        OpError::Fatal(err)
    }
}

/// What the disk holds at one path, as the journal would record it.
struct DiskState {
    entry: Option<Entry>,
    stat: Option<Stat>,
}

/// Inline files of one Commit request, written to staging with their final
/// mode and made durable by one filesystem sync (group commit, first half:
/// one `syncfs` instead of one fsync per file). Built before the commit
/// lock is taken, so one request's files are written while the previous
/// request commits; a staged file holds no descriptor once prepared.
#[derive(Default)]
pub struct Prestaged {
    files: HashMap<(RelPath, ContentHash, bool), StagedFile>,
    took: std::time::Duration,
}

/// Writes and syncs the inline files of `ops` (see `Prestaged`). Bad ops
/// are skipped, for `commit_locked` to refuse; a file that cannot be
/// prepared takes the one-by-one path there.
pub fn prestage(hub: &Hub, ws: &Workspace, ops: &[pb::CommitOp]) -> anyhow::Result<Prestaged> {
    let started = std::time::Instant::now();
    let mut prestaged = Prestaged::default();
    if ops.iter().filter(|op| op.data.is_some()).count() < gm_fs::root::GROUP_COMMIT_MIN {
        return Ok(prestaged);
    }
    let root = ws.root();
    for op in ops {
        let (Some(data), Some(entry)) = (&op.data, &op.entry) else {
            continue;
        };
        let (
            Ok(path),
            Ok(Entry::File {
                hash,
                size,
                executable,
            }),
        ) = (gm_proto::path(&op.path), gm_proto::entry(&op.path, entry))
        else {
            continue;
        };
        if size != data.len() as u64 || size > hub.config.max_file_size {
            continue;
        }
        let mut staged = root.stage_file()?;
        // Hashed as it is written: content that does not match is dropped
        // here and refused by `commit_locked`.
        staged.write_all(data)?;
        if staged.hash() == hash && staged.prepare(&root, &path, executable).is_ok() {
            prestaged.files.insert((path, hash, executable), staged);
        }
    }
    let synced = std::time::Instant::now();
    if !prestaged.files.is_empty() {
        root.sync_filesystem()?;
    }
    tracing::debug!(
        workspace = %ws.id,
        files = prestaged.files.len(),
        write_ms = (synced - started).as_millis() as u64,
        sync_ms = synced.elapsed().as_millis() as u64,
        "prestaged"
    );
    prestaged.took = started.elapsed();
    Ok(prestaged)
}

/// Handles one Commit request, its inline files already `prestage`d.
/// Blocking; the caller holds the commit lock.
pub fn commit_locked(
    hub: &Hub,
    ws: &Workspace,
    seq: &mut Seq,
    node: &NodeId,
    ops: Vec<pb::CommitOp>,
    prestaged: Prestaged,
) -> anyhow::Result<Vec<pb::OpResult>> {
    let prestage_ms = prestaged.took.as_millis() as u64;
    let mut ctx = Ctx {
        hub,
        ws,
        root: ws.root(),
        seq,
        node,
        now_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        batch: RecordBatch {
            origin: node.to_string(),
            ..Default::default()
        },
        pending: HashMap::new(),
        pending_cache: HashMap::new(),
        written: HashMap::new(),
        racy: Vec::new(),
        own: Vec::new(),
        prestaged: prestaged.files,
        needs_sync: false,
    };
    let started = std::time::Instant::now();
    let count = ops.len();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(ctx.handle(op));
    }
    // Staged files no op took (refused, or landed another way) go now.
    ctx.prestaged.clear();
    let decided = started.elapsed();
    let flushed = ctx.flush();
    hub.counters.commit_seconds.observe(started.elapsed());
    tracing::debug!(
        workspace = %ws.id,
        node = %node,
        ops = count,
        prestage_ms,
        ops_ms = decided.as_millis() as u64,
        flush_ms = (started.elapsed() - decided).as_millis() as u64,
        "commit request"
    );
    match flushed {
        Ok(()) => Ok(results),
        Err(OpError::Fatal(err)) => Err(err),
        Err(OpError::Refused(_, why) | OpError::Retry(why)) => Err(anyhow::anyhow!(why)),
        Err(OpError::NeedContent) => Err(anyhow::anyhow!("journal write needs content")),
    }
}

struct Ctx<'a> {
    hub: &'a Hub,
    ws: &'a Workspace,
    root: Arc<Root>,
    seq: &'a mut Seq,
    node: &'a NodeId,
    now_unix: i64,
    batch: RecordBatch,
    /// Journal states written by this batch and not yet in the database.
    pending: HashMap<RelPath, Versioned>,
    /// Cache records written by this batch (None: removed).
    pending_cache: HashMap<RelPath, Option<CacheRecord>>,
    /// Files written by this batch, by content: sources for local copies.
    written: HashMap<ContentHash, RelPath>,
    racy: Vec<RelPath>,
    /// What this batch's ops left on disk, for `Workspace::expect_own`.
    own: Vec<(RelPath, OwnWrite)>,
    /// `Prestaged` files not landed yet.
    prestaged: HashMap<(RelPath, ContentHash, bool), StagedFile>,
    /// Renames done since the last `sync_filesystem`: synced before the
    /// journal records them.
    needs_sync: bool,
}

fn result(path: &str, outcome: pb::op_result::Outcome) -> pb::OpResult {
    pb::OpResult {
        path: path.to_string(),
        outcome: Some(outcome),
    }
}

impl Ctx<'_> {
    fn handle(&mut self, op: pb::CommitOp) -> pb::OpResult {
        match self.handle_checked(&op) {
            Ok(done) => done,
            Err(OpError::Refused(why, reason)) => {
                self.hub.counters.refuse(why.as_str());
                tracing::warn!(workspace = %self.ws.id, node = %self.node, path = %op.path, reason = %reason, "refused operation");
                result(&op.path, pb::op_result::Outcome::Refused(reason))
            }
            Err(OpError::NeedContent) => result(
                &op.path,
                pb::op_result::Outcome::NeedContent(pb::NeedContent {}),
            ),
            Err(OpError::Retry(why)) => {
                self.hub.counters.refuse(Refusal::KeepsChanging.as_str());
                result(
                    &op.path,
                    pb::op_result::Outcome::Refused(format!(
                        "path keeps changing on the hub ({why}); try again"
                    )),
                )
            }
            Err(OpError::Fatal(err)) => {
                self.hub.counters.refuse(Refusal::Internal.as_str());
                tracing::error!(workspace = %self.ws.id, node = %self.node, path = %op.path, error = %format!("{err:#}"), "commit failed");
                result(
                    &op.path,
                    pb::op_result::Outcome::Refused(format!("hub error: {err:#}")),
                )
            }
        }
    }

    fn handle_checked(&mut self, op: &pb::CommitOp) -> Result<pb::OpResult, OpError> {
        let path = gm_proto::path(&op.path)
            .map_err(|e| OpError::Refused(Refusal::BadPath, e.to_string()))?;
        let ours = match &op.entry {
            Some(wire) => Some(
                gm_proto::entry(&op.path, wire)
                    .map_err(|e| OpError::Refused(Refusal::BadEntry, e.to_string()))?,
            ),
            None => None,
        };
        if let Some(Entry::File { size, .. }) = &ours
            && *size > self.hub.config.max_file_size
        {
            return Err(OpError::Refused(
                Refusal::TooLarge,
                format!(
                    "{path}: {size} bytes is over the hub's limit of {} bytes",
                    self.hub.config.max_file_size
                ),
            ));
        }
        if let Some(data) = &op.data {
            match &ours {
                Some(Entry::File { size, .. }) if *size == data.len() as u64 => {}
                Some(Entry::File { size, .. }) => {
                    return Err(OpError::Refused(
                        Refusal::BadContent,
                        format!(
                            "{path}: inline content is {} bytes but the entry says {size}",
                            data.len()
                        ),
                    ));
                }
                _ => {
                    return Err(OpError::Refused(
                        Refusal::BadContent,
                        format!("{path}: inline content for something that is not a file"),
                    ));
                }
            }
        }
        let mut last = String::new();
        for _attempt in 0..3 {
            match self.try_op(&path, Seq(op.base_seq), ours.as_ref(), op.data.as_deref()) {
                Err(OpError::Retry(why)) => {
                    tracing::debug!(workspace = %self.ws.id, path = %path, why = %why, "path changed under the plan; deciding again");
                    last = why;
                }
                other => return other,
            }
        }
        Err(OpError::Retry(last))
    }

    fn try_op(
        &mut self,
        path: &RelPath,
        base: Seq,
        ours: Option<&Entry>,
        data: Option<&[u8]>,
    ) -> Result<pb::OpResult, OpError> {
        if let Some(name) = self.hub.skills.guarded(path) {
            return self.skill_guard(path, &name, ours, data);
        }
        let (disk, current) = self.sync_disk(path)?;
        let has_children = if children_matter(&current, ours) {
            self.flush()?;
            self.hub.db.has_live_children(&self.ws.id, path)?
        } else {
            false
        };
        match decide_commit(base, &current, has_children, ours) {
            CommitDecision::AlreadyCurrent => Ok(result(
                path.as_str(),
                pb::op_result::Outcome::Committed(pb::Committed { seq: current.seq.0 }),
            )),
            CommitDecision::Apply => {
                let seq = self.apply(path, ours, &disk, data)?;
                self.hub.skills.touch_candidate(&self.ws.id, path);
                Ok(result(
                    path.as_str(),
                    pb::op_result::Outcome::Committed(pb::Committed { seq: seq.0 }),
                ))
            }
            CommitDecision::KeepTheirs { copy_ours } => {
                let copy = match (copy_ours, ours) {
                    (true, Some(ours)) => {
                        let copy_path = self.free_copy_name(path, ours)?;
                        let absent = DiskState {
                            entry: None,
                            stat: None,
                        };
                        let seq = self.apply(&copy_path, Some(ours), &absent, data)?;
                        self.batch.conflicts.push(ConflictRow {
                            path: path.clone(),
                            copy_path: copy_path.clone(),
                            node: self.node.to_string(),
                            at_unix: self.now_unix,
                            seq,
                        });
                        tracing::info!(workspace = %self.ws.id, node = %self.node, path = %path, copy = %copy_path, seq = seq.0, "conflict: the node's version is kept as a copy");
                        Some(gm_proto::path_state_to_wire(
                            &copy_path,
                            &Versioned {
                                entry: Some(ours.clone()),
                                seq,
                            },
                        ))
                    }
                    _ => {
                        tracing::info!(workspace = %self.ws.id, node = %self.node, path = %path, "conflict: the hub's version stays (a modification beats a deletion)");
                        None
                    }
                };
                Counters::add(&self.hub.counters.conflicts, 1);
                Ok(result(
                    path.as_str(),
                    pb::op_result::Outcome::Conflict(pb::Conflict {
                        current: Some(gm_proto::path_state_to_wire(path, &current)),
                        copy,
                    }),
                ))
            }
        }
    }

    /// A proposal under a taken skill name: already current, or refused
    /// with the node's version (when it has content) kept as a conflict
    /// copy outside `.skills/`. The disk under `.skills/<name>` is never
    /// read or written here (it is a link into the registry).
    fn skill_guard(
        &mut self,
        path: &RelPath,
        name: &SkillName,
        ours: Option<&Entry>,
        data: Option<&[u8]>,
    ) -> Result<pb::OpResult, OpError> {
        let current = self.current(path)?;
        if ours == current.entry.as_ref() {
            return Ok(result(
                path.as_str(),
                pb::op_result::Outcome::Committed(pb::Committed { seq: current.seq.0 }),
            ));
        }
        let copy = match ours {
            Some(ours) if !current.entry.as_ref().is_some_and(|c| c.same_content(ours)) => {
                match self.skill_copy_place(path, name, ours)? {
                    SkillCopy::Kept(copy_path, seq) => Some((copy_path, seq, ours.clone())),
                    SkillCopy::Free(copy_path) => {
                        let absent = DiskState {
                            entry: None,
                            stat: None,
                        };
                        let seq = self.apply(&copy_path, Some(ours), &absent, data)?;
                        self.batch.conflicts.push(ConflictRow {
                            path: path.clone(),
                            copy_path: copy_path.clone(),
                            node: self.node.to_string(),
                            at_unix: self.now_unix,
                            seq,
                        });
                        Some((copy_path, seq, ours.clone()))
                    }
                }
            }
            _ => None,
        };
        self.hub.counters.refuse(Refusal::SkillReadOnly.as_str());
        tracing::warn!(
            workspace = %self.ws.id,
            node = %self.node,
            path = %path,
            skill = %name,
            copy = ?copy.as_ref().map(|(p, _, _)| p.as_str()),
            "refused operation: skills are read-only to nodes; the skill's content stays and the node's version is kept outside .skills/"
        );
        let mut current_wire = gm_proto::path_state_to_wire(path, &current);
        current_wire.read_only = self.hub.skills.is_read_only(path);
        Ok(result(
            path.as_str(),
            pb::op_result::Outcome::Conflict(pb::Conflict {
                current: Some(current_wire),
                copy: copy.map(|(copy_path, seq, entry)| {
                    gm_proto::path_state_to_wire(
                        &copy_path,
                        &Versioned {
                            entry: Some(entry),
                            seq,
                        },
                    )
                }),
            }),
        ))
    }

    /// Where the node's version of `path` (under skill `name`) is kept.
    /// A path below the skill goes into this node's newest copy directory
    /// of that skill when its place there is free, or is already kept
    /// there when that place holds the same content: a directory refused
    /// with its files (one request or several, seconds apart) stays one
    /// copy. (The node moves its whole refused directory to the copy name
    /// and proposes its files from there; one of them refused meanwhile
    /// at its old path is then already kept, not kept twice.)
    fn skill_copy_place(
        &mut self,
        path: &RelPath,
        name: &SkillName,
        ours: &Entry,
    ) -> Result<SkillCopy, OpError> {
        if let Some(below) = skill_component(path).and_then(|(_, below)| below)
            && let Some(dir) = self.newest_skill_copy_dir(name)?
            && let Ok(candidate) = dir.join(below)
        {
            let there = self.current(&candidate)?;
            match &there.entry {
                Some(entry) if entry.same_content(ours) => {
                    return Ok(SkillCopy::Kept(candidate, there.seq));
                }
                None if self.root.lstat(&candidate)?.is_none() => {
                    return Ok(SkillCopy::Free(candidate));
                }
                _ => {}
            }
        }
        self.free_skill_copy_name(path, name).map(SkillCopy::Free)
    }

    /// The first free name in `skill_copy_candidates`.
    fn free_skill_copy_name(
        &mut self,
        path: &RelPath,
        name: &SkillName,
    ) -> Result<RelPath, OpError> {
        let candidates = skill_copy_candidates(path, name, self.node, self.now_unix);
        self.first_free(path, candidates)
    }

    /// This node's newest live copy directory of skill `name`
    /// (`skills-conflicts/<name>.conflict-<node>-...`), this batch included.
    fn newest_skill_copy_dir(&self, name: &SkillName) -> Result<Option<RelPath>, OpError> {
        let top = RelPath::new(gm_core::SKILLS_CONFLICTS_DIR)
            .map_err(|e| OpError::Refused(Refusal::NoConflictName, e.to_string()))?;
        let prefix = format!("{}/{name}.conflict-{}-", top, self.node);
        let is_copy_dir = |path: &RelPath, state: &Versioned| {
            state.entry == Some(Entry::Dir)
                && path.parent().as_ref() == Some(&top)
                && path.as_str().starts_with(&prefix)
        };
        let mut newest: Option<(Seq, RelPath)> = None;
        let journaled = self.hub.db.entries_under(&self.ws.id, Some(&top))?;
        let pending = self.pending.iter().map(|(p, v)| (p.clone(), v.clone()));
        for (path, state) in journaled.into_iter().chain(pending) {
            if is_copy_dir(&path, &state) && newest.as_ref().is_none_or(|(seq, _)| state.seq > *seq)
            {
                newest = Some((state.seq, path));
            }
        }
        Ok(newest.map(|(_, path)| path))
    }

    /// The journal's state of a path, this batch included.
    fn current(&self, path: &RelPath) -> Result<Versioned, OpError> {
        if let Some(state) = self.pending.get(path) {
            return Ok(state.clone());
        }
        Ok(self.hub.db.entry(&self.ws.id, path)?.unwrap_or(Versioned {
            entry: None,
            seq: Seq::ZERO,
        }))
    }

    fn cache(&self, path: &RelPath) -> Result<Option<CacheRecord>, OpError> {
        if let Some(record) = self.pending_cache.get(path) {
            return Ok(*record);
        }
        Ok(self.hub.db.cache_get(&self.ws.id, path)?)
    }

    /// What the disk holds at `path`, and the journal's state of it; if
    /// the two differ (a hub-side write not yet seen), journals the disk
    /// first.
    fn sync_disk(&mut self, path: &RelPath) -> Result<(DiskState, Versioned), OpError> {
        let disk = self.read_disk(path)?;
        let current = self.current(path)?;
        if disk.entry == current.entry {
            return Ok((disk, current));
        }
        self.flush()?;
        observe_locked(
            self.hub,
            self.ws,
            self.seq,
            Scope::Subtrees(vec![path.clone()]),
            false,
        )?;
        if self.ws.halted().is_some() {
            return Err(OpError::Refused(
                Refusal::Halted,
                format!("workspace {} is halted on the hub", self.ws.id),
            ));
        }
        let disk = self.read_disk(path)?;
        Ok((disk, self.current(path)?))
    }

    fn read_disk(&mut self, path: &RelPath) -> Result<DiskState, OpError> {
        let cache: CacheRecords = self
            .cache(path)?
            .map(|r| (path.clone(), r))
            .into_iter()
            .collect();
        let scan = scan_tree(
            &self.root,
            Some(path),
            false,
            &cache,
            &self.hub.config.scan,
            &IgnoreRules::none(),
        )?;
        Counters::add(&self.hub.counters.files_hashed, scan.hashed);
        Counters::add(&self.hub.counters.hash_cache_hits, scan.cache_hits);
        if !scan.unreadable.is_empty() {
            return Err(OpError::Retry(scan.problems.join("; ")));
        }
        for (p, record) in scan.cache_updates {
            self.put_cache(p, record);
        }
        self.batch.manifests.extend(scan.manifests);
        Ok(match scan.entries.into_iter().next() {
            Some(item) => DiskState {
                entry: Some(item.entry),
                stat: Some(item.stat),
            },
            None => DiskState {
                entry: None,
                stat: None,
            },
        })
    }

    fn put_cache(&mut self, path: RelPath, record: CacheRecord) {
        if record.is_racy(self.hub.config.scan.racy_window(&self.root, &record.stat)) {
            self.racy.push(path.clone());
        }
        self.pending_cache.insert(path.clone(), Some(record));
        self.batch.cache_put.push((path, record));
    }

    fn push_change(&mut self, path: &RelPath, entry: Option<Entry>) -> Seq {
        *self.seq = self.seq.next();
        let state = Versioned {
            entry,
            seq: *self.seq,
        };
        self.pending.insert(path.clone(), state.clone());
        self.batch.changes.push((path.clone(), state));
        *self.seq
    }

    /// Writes the batch's journal records (one transaction) and wakes subscribers.
    fn flush(&mut self) -> Result<(), OpError> {
        if self.batch.changes.is_empty()
            && self.batch.cache_put.is_empty()
            && self.batch.cache_del.is_empty()
            && self.batch.manifests.is_empty()
        {
            return Ok(());
        }
        if std::mem::take(&mut self.needs_sync) {
            self.root.sync_filesystem()?;
        }
        self.hub.db.record(&self.ws.id, &self.batch)?;
        self.ws.expect_own(std::mem::take(&mut self.own));
        let origin = std::mem::take(&mut self.batch.origin);
        self.batch = RecordBatch {
            origin,
            ..Default::default()
        };
        self.pending.clear();
        self.pending_cache.clear();
        self.ws.committed.send_replace(self.seq.0);
        let window =
            std::time::Duration::from_nanos(self.hub.config.scan.racy_window_ns.max(0) as u64);
        self.ws.mark_racy(std::mem::take(&mut self.racy), window);
        Ok(())
    }

    fn free_copy_name(&mut self, path: &RelPath, ours: &Entry) -> Result<RelPath, OpError> {
        let candidates = conflict_copy_candidates(path, self.node, self.now_unix, ours);
        self.first_free(path, candidates)
    }

    /// The first of `candidates` (copy names for `path`) that neither the
    /// journal nor the disk holds.
    fn first_free<E: std::fmt::Display>(
        &mut self,
        path: &RelPath,
        candidates: impl IntoIterator<Item = Result<RelPath, E>>,
    ) -> Result<RelPath, OpError> {
        for candidate in candidates {
            let candidate =
                candidate.map_err(|e| OpError::Refused(Refusal::NoConflictName, e.to_string()))?;
            if self.current(&candidate)?.entry.is_none() && self.root.lstat(&candidate)?.is_none() {
                return Ok(candidate);
            }
        }
        Err(OpError::Refused(
            Refusal::NoConflictName,
            format!("{path}: no free conflict-copy name"),
        ))
    }

    /// Makes sure every ancestor of `path` is a journaled directory.
    fn ensure_parents(&mut self, path: &RelPath) -> Result<(), OpError> {
        for ancestor in path.ancestors() {
            match self.current(&ancestor)?.entry {
                Some(Entry::Dir) => continue,
                Some(other) => {
                    return Err(OpError::Refused(
                        Refusal::ParentNotDirectory,
                        format!(
                            "{ancestor} is a {} on the hub, not a directory",
                            other.kind_name()
                        ),
                    ));
                }
                None => {}
            }
            let (disk, _) = self.sync_disk(&ancestor)?;
            match disk.entry {
                Some(Entry::Dir) => continue,
                Some(other) => {
                    return Err(OpError::Refused(
                        Refusal::ParentNotDirectory,
                        format!(
                            "{ancestor} is a {} on the hub, not a directory",
                            other.kind_name()
                        ),
                    ));
                }
                None => {
                    if self.prestaged.is_empty() {
                        self.root.make_dir(&ancestor)?;
                    } else {
                        // A group commit: the flush's filesystem sync makes
                        // the directory durable before it is journaled.
                        self.root.make_dir_unsynced(&ancestor)?;
                        self.needs_sync = true;
                    }
                    self.push_change(&ancestor, Some(Entry::Dir));
                }
            }
        }
        Ok(())
    }

    /// Puts `ours` at `path` on disk (which holds `disk`) and journals it.
    ///
    /// A disk that has a non-directory where the journal has a parent
    /// directory (a hub-side change not journaled yet) makes the write fail
    /// with "not a directory": the parents are journaled as they are and
    /// the op is decided again, instead of refusing it for a state the
    /// journal does not show (found by gm-sim, soak seed 175207: the node
    /// kept that refusal for ever while the journal never changed).
    fn apply(
        &mut self,
        path: &RelPath,
        ours: Option<&Entry>,
        disk: &DiskState,
        data: Option<&[u8]>,
    ) -> Result<Seq, OpError> {
        match self.apply_unchecked(path, ours, disk, data) {
            Err(OpError::Refused(Refusal::ParentNotDirectory, why)) => {
                let mut journaled = false;
                for ancestor in path.ancestors() {
                    let before = self.current(&ancestor)?;
                    self.sync_disk(&ancestor)?;
                    journaled |= self.current(&ancestor)? != before;
                }
                if journaled {
                    Err(OpError::Retry(why))
                } else {
                    Err(OpError::Refused(Refusal::ParentNotDirectory, why))
                }
            }
            other => other,
        }
    }

    fn apply_unchecked(
        &mut self,
        path: &RelPath,
        ours: Option<&Entry>,
        disk: &DiskState,
        data: Option<&[u8]>,
    ) -> Result<Seq, OpError> {
        if ours.is_some() {
            self.ensure_parents(path)?;
        }
        // Whatever is there and is not replaced in place goes first.
        let replace_in_place = matches!(
            (&disk.entry, ours),
            (Some(Entry::File { .. }), Some(Entry::File { .. }))
                | (Some(Entry::Symlink { .. }), Some(Entry::Symlink { .. }))
        );
        let mut expect = match disk.stat {
            Some(stat) if replace_in_place => Expect::Unchanged(stat),
            _ => Expect::Absent,
        };
        if let (Some(existing), Some(stat)) = (&disk.entry, disk.stat)
            && !replace_in_place
            && ours != Some(existing)
        {
            if let Err(err) = self.root.remove(path, stat) {
                if matches!(err, FsError::NotEmpty { .. }) {
                    // Untracked content under the directory: journal it first.
                    self.flush()?;
                    observe_locked(
                        self.hub,
                        self.ws,
                        self.seq,
                        Scope::Subtrees(vec![path.clone()]),
                        false,
                    )?;
                }
                return Err(err.into());
            }
            self.pending_cache.insert(path.clone(), None);
            self.batch.cache_del.push(path.clone());
            expect = Expect::Absent;
        }
        match ours {
            None => self.own.push((path.clone(), OwnWrite::Absent)),
            Some(Entry::Dir) => {
                let stat = self.root.make_dir(path)?;
                self.own.push((
                    path.clone(),
                    OwnWrite::Dir {
                        dev: stat.dev,
                        ino: stat.ino,
                    },
                ));
            }
            Some(Entry::Symlink { target }) => {
                self.root.make_symlink(path, target, expect)?;
            }
            Some(Entry::File {
                hash,
                size,
                executable,
            }) => {
                let stat = match (&disk.entry, disk.stat) {
                    (Some(Entry::File { hash: on_disk, .. }), Some(stat)) if on_disk == hash => {
                        let stat = self.root.set_executable(path, *executable, stat)?;
                        self.keep_manifest(path, path)?;
                        stat
                    }
                    _ => self.write_file(path, *hash, *size, *executable, expect, data)?,
                };
                let record = CacheRecord {
                    stat,
                    hash: *hash,
                    recorded_ns: gm_fs::scan::now_ns(),
                };
                self.put_cache(path.clone(), record);
                self.own.push((path.clone(), OwnWrite::File(stat)));
                self.written.insert(*hash, path.clone());
            }
        }
        Ok(self.push_change(path, ours.cloned()))
    }

    /// Carries the chunk list of `from` (same content) over to `to`.
    fn keep_manifest(&mut self, from: &RelPath, to: &RelPath) -> Result<(), OpError> {
        let known = self
            .batch
            .manifests
            .iter()
            .rev()
            .find(|(p, _)| p == from)
            .map(|(_, m)| m.clone());
        let manifest = match known {
            Some(manifest) => Some(manifest),
            None => self.hub.db.manifest(&self.ws.id, from)?,
        };
        if let Some(manifest) = manifest {
            self.batch.manifests.push((to.clone(), manifest));
        }
        Ok(())
    }

    /// Lands a file's content from the request, an upload, or a file the
    /// hub already holds with the same hash (no bytes on the wire).
    fn write_file(
        &mut self,
        path: &RelPath,
        hash: ContentHash,
        size: u64,
        executable: bool,
        expect: Expect,
        data: Option<&[u8]>,
    ) -> Result<Stat, OpError> {
        if let Some(data) = data {
            let prestaged = self
                .prestaged
                .remove(&(path.clone(), hash, executable))
                .or_else(|| {
                    // A conflict copy carries the op's content under another name.
                    let key = self
                        .prestaged
                        .keys()
                        .find(|(_, h, x)| *h == hash && *x == executable)
                        .cloned()?;
                    self.prestaged.remove(&key)
                });
            let landed = match prestaged {
                Some(staged) => {
                    self.needs_sync = true;
                    staged.commit_prepared(&self.root, path, hash, expect)
                }
                None => {
                    let mut staged = self.root.stage_file()?;
                    staged.write_all(data)?;
                    staged.commit(&self.root, path, hash, executable, expect)
                }
            };
            let stat = landed.map_err(|err| match err {
                FsError::HashMismatch { .. } => OpError::Refused(
                    Refusal::BadContent,
                    format!("{path}: inline content does not match its hash"),
                ),
                other => other.into(),
            })?;
            Counters::add(&self.hub.counters.files_received, 1);
            Counters::add(&self.hub.counters.bytes_received, size);
            if size >= gm_chunk::CHUNKED_MIN {
                self.batch
                    .manifests
                    .push((path.clone(), gm_chunk::chunk_slice(data)));
            }
            return Ok(stat);
        }
        let upload = self
            .hub
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.ws.id.clone(), hash));
        if let Some(upload) = upload {
            let stat = upload
                .staged
                .commit(&self.root, path, hash, executable, expect)?;
            Counters::add(&self.hub.counters.files_received, 1);
            if let Some(manifest) = upload.manifest {
                self.batch.manifests.push((path.clone(), manifest));
            }
            return Ok(stat);
        }
        let mut sources: Vec<RelPath> = self.written.get(&hash).cloned().into_iter().collect();
        sources.extend(self.hub.db.paths_with_hash(&self.ws.id, &hash, 4)?);
        for source in sources {
            if &source == path {
                continue;
            }
            // A skill's file is read from the registry, never through the link.
            let (from_root, from) = self
                .hub
                .skills
                .resolve(&source)
                .unwrap_or_else(|| (self.root.clone(), source.clone()));
            let mut staged = self.root.stage_file()?;
            if staged.copy_from(&from_root, &from).is_err() || staged.hash() != hash {
                continue;
            }
            let stat = staged.commit(&self.root, path, hash, executable, expect)?;
            Counters::add(&self.hub.counters.local_copies, 1);
            self.keep_manifest(&source, path)?;
            return Ok(stat);
        }
        Err(OpError::NeedContent)
    }
}
