//! One workspace's three trees and the step that brings them together.
//!
//! - synced: the last version of each path both sides agreed on, with the
//!   hub seq that made it (persisted in `node.db`; the merge base);
//! - local: what the disk holds now (a scan, with the hash cache);
//! - remote: journal changes from the hub not yet in the synced tree.
//!
//! A round scans the paths in scope and plans them with
//! `gm_core::NodeTrees::plan` (the pure part, shared with the simulation in
//! `gm_sim`), then: adopts remote versions the disk already holds, writes
//! remote versions over paths the user did not change, and proposes local
//! changes to the hub. Conflicts are decided by the hub; the node then
//! moves its version to the conflict-copy name the hub chose (a rename, no
//! bytes) and takes the hub's version at the path.
//!
//! Invariants:
//! - A local change is never overwritten: writes check the target against
//!   the scan (`Expect`) just before they land.
//! - `last_seq` persisted in `node.db` never passes a remote change that
//!   is not yet applied, so a crash or restart re-receives it.
//! - Safety brake: a root that is gone, replaced or empty while the synced
//!   tree is not halts the workspace before any deletion is proposed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_core::{
    CacheRecord, ContentHash, Entry, NodeTrees, RelPath, Seq, Stat, Versioned, WorkspaceId,
};
use gm_fs::{
    Expect, FileMode, FsError, IgnoreRules, Root, ScanOutcome, hash_walked, walk_while_loading,
};
use gm_proto::pb;
use gm_store::{NodeBatch, NodeDb};

use crate::client::{Client, SyncError};
use crate::transfer::{self, DownloadFailure, DownloadItem};
use crate::{NodeConfig, Progress};

/// Large files uploaded at once, one stream each. Two keep both ends busy
/// (one file being read and hashed while another is written) without
/// multiplying memory: each stream holds at most a few chunks.
const UPLOADS_IN_FLIGHT: usize = 2;

/// Synced and cache records a round gathers before it writes them to
/// `node.db` mid-round (see `Replica::flush_if_large`).
const FLUSH_RECORDS: usize = 16_384;

pub use gm_core::Scope;

/// What a round did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoundStats {
    pub adopted: usize,
    pub applied: usize,
    pub proposed: usize,
    pub conflicts: usize,
    pub refused: usize,
    pub failed: usize,
}

impl RoundStats {
    pub fn idle(&self) -> bool {
        self.adopted + self.applied + self.proposed + self.failed == 0
    }

    fn add(&mut self, other: &RoundStats) {
        self.adopted += other.adopted;
        self.applied += other.applied;
        self.proposed += other.proposed;
        self.conflicts += other.conflicts;
        self.refused += other.refused;
        self.failed += other.failed;
    }
}

type Local = Option<(Entry, Stat)>;

/// A commit request on its way, and what each op in it proposed.
type CommitCall =
    tokio::task::JoinHandle<Result<tonic::Response<pb::CommitResponse>, tonic::Status>>;
/// One op of a call: path, base, what was proposed, and the newest synced
/// seq known for it and its parents when it was sent (see `NodeTrees::refuse`).
type Member = (RelPath, Seq, Local, Seq);

struct ApplyItem {
    path: RelPath,
    target: Versioned,
    local: Local,
}

struct ProposeItem {
    path: RelPath,
    base: Seq,
    local: Local,
}

pub struct Replica {
    pub id: WorkspaceId,
    pub root: Arc<Root>,
    pub config: Arc<NodeConfig>,
    pub db: Arc<NodeDb>,
    pub client: Client,
    /// Synced and remote trees and the bookkeeping between rounds (forced
    /// paths after conflicts, refused versions, follow-ups, deferred
    /// deletions). Local deletions are deferred until no new deletion has
    /// been seen for `delete_delay`: a root being emptied (`rm -rf`, an
    /// unmount) is then seen empty by the brake before any of its
    /// deletions leave the node.
    pub trees: NodeTrees,
    last_deletion: Option<Instant>,
    /// Set by `confirm-empty`: the next emptying is deliberate.
    pub emptying_confirmed: bool,
    /// Last reported problems with `.gmignore` (reported once per change).
    ignore_problems: Vec<String>,
    pub progress: Arc<Progress>,
    /// Files landed by group commit since the last filesystem sync; synced
    /// before the synced tree records them.
    needs_sync: bool,
    /// Cache records still racily clean: path -> when to re-verify.
    pub racy: BTreeMap<RelPath, Instant>,
    batch: NodeBatch,
    /// Paths the hub last sent flagged read-only (a registered skill's
    /// files): they land without write permission.
    read_only: HashSet<RelPath>,
    /// Landing intents exist in `node.db` that the next persist clears:
    /// recorded by this round, or loaded at start and used by a plan.
    landings_recorded: bool,
    /// Proposals in doubt were recorded in `node.db` (or loaded from it):
    /// the next persist replaces them by those still in doubt.
    proposals_recorded: bool,
    /// Where `trees.in_doubt` goes when this session ends.
    in_doubt_carry: Option<Arc<std::sync::Mutex<InDoubt>>>,
}

/// Proposals sent without an answer, by path (`NodeTrees::in_doubt`).
pub type InDoubt = BTreeMap<RelPath, Vec<Option<Entry>>>;

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(carry) = self.in_doubt_carry.take() {
            let mut slot = carry.lock().unwrap_or_else(|p| p.into_inner());
            *slot = std::mem::take(&mut self.trees.in_doubt);
        }
    }
}

impl Replica {
    pub fn new(
        id: WorkspaceId,
        root: Arc<Root>,
        config: Arc<NodeConfig>,
        db: Arc<NodeDb>,
        client: Client,
        synced: BTreeMap<RelPath, Versioned>,
        last_seq: Seq,
    ) -> Replica {
        Replica {
            id,
            root,
            config,
            db,
            client,
            trees: NodeTrees::new(synced, last_seq),
            last_deletion: None,
            emptying_confirmed: false,
            ignore_problems: Vec::new(),
            progress: Arc::new(Progress::default()),
            needs_sync: false,
            racy: BTreeMap::new(),
            batch: NodeBatch::default(),
            in_doubt_carry: None,
            landings_recorded: false,
            proposals_recorded: false,
            read_only: HashSet::new(),
        }
    }

    /// The permissions a file lands with at `path`.
    fn file_mode(&self, path: &RelPath, executable: bool) -> FileMode {
        FileMode {
            executable,
            read_only: self.read_only.contains(path),
        }
    }

    /// Remembers whether the hub's latest state of `path` is read-only.
    fn note_read_only(&mut self, path: &RelPath, read_only: bool) {
        if read_only {
            self.read_only.insert(path.clone());
        } else {
            self.read_only.remove(path);
        }
    }

    /// Takes what a previous run left in `node.db`: landing intents and
    /// proposals whose answer it never persisted.
    pub fn load_intents(&mut self) -> Result<(), SyncError> {
        self.trees.landed = self.db.landings(&self.id)?.into_iter().collect();
        let proposals = self.db.proposals(&self.id)?;
        self.proposals_recorded = !proposals.is_empty();
        for (path, entry) in proposals {
            self.trees.sent(&path, entry);
        }
        Ok(())
    }

    /// Takes the proposals a previous session left in doubt, and hands
    /// this session's back to `carry` when it ends.
    pub fn carry_in_doubt(&mut self, carry: Arc<std::sync::Mutex<InDoubt>>) {
        self.trees.in_doubt = std::mem::take(&mut *carry.lock().unwrap_or_else(|p| p.into_inner()));
        self.in_doubt_carry = Some(carry);
    }

    /// Takes journal changes from the subscription.
    pub fn absorb(&mut self, changes: &[pb::PathState]) {
        for wire in changes {
            let (path, state) = match gm_proto::path_state(wire) {
                Ok(parsed) => parsed,
                Err(err) => {
                    tracing::warn!(workspace = %self.id, error = %err, "ignoring an invalid change from the hub");
                    continue;
                }
            };
            self.note_read_only(&path, wire.read_only);
            self.trees.absorb(path, state);
        }
    }

    pub fn saw_seq(&mut self, seq: Seq) {
        self.trees.saw_seq(seq);
    }

    /// True when nothing is pending on either side.
    pub fn settled(&self) -> bool {
        self.trees.settled()
    }

    /// Records the agreed version of a path. Deletions are kept as
    /// tombstones (with their seq) until every older journal event has been
    /// absorbed, so a late event can never bring a deleted path back.
    fn set_synced(&mut self, path: &RelPath, state: Versioned) {
        self.trees.set_synced(path, state.clone());
        self.batch.synced_put.push((path.clone(), state));
    }

    /// Live entries in the synced tree.
    pub fn live_synced(&self) -> usize {
        self.trees.live_synced()
    }

    fn put_cache(&mut self, path: &RelPath, stat: Stat, hash: ContentHash) {
        let record = CacheRecord {
            stat,
            hash,
            recorded_ns: gm_fs::scan::now_ns(),
        };
        if record.is_racy(self.config.scan.racy_window(&self.root, &stat)) {
            self.racy.insert(path.clone(), racy_due(&self.config));
        }
        self.batch.cache_put.push((path.clone(), record));
    }

    fn halt(&mut self, reason: String) -> SyncError {
        tracing::error!(workspace = %self.id, reason = %reason, "workspace halted by the safety brake; nothing is propagated");
        if let Err(err) = self.db.set_halted(&self.id, Some(&reason)) {
            tracing::error!(workspace = %self.id, error = %err, "cannot record the halt");
        }
        SyncError::Halted(reason)
    }

    /// Writes what the round changed, and the highest seq below every
    /// change still pending.
    pub async fn persist(&mut self) -> Result<(), SyncError> {
        if std::mem::take(&mut self.needs_sync) {
            let root = self.root.clone();
            tokio::task::spawn_blocking(move || root.sync_filesystem()).await??;
        }
        let checkpoint = self.trees.checkpoint();
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear_landings = std::mem::take(&mut self.landings_recorded);
        if std::mem::take(&mut self.proposals_recorded) {
            batch.proposals = Some(
                self.trees
                    .in_doubt
                    .iter()
                    .filter_map(|(path, sent)| sent.last().map(|e| (path.clone(), e.clone())))
                    .collect(),
            );
        }
        batch.last_seq = Some(checkpoint.last_seq);
        batch.synced_del.extend(checkpoint.dropped_tombstones);
        let db = self.db.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || db.apply(&id, &batch)).await??;
        Ok(())
    }

    /// Mid-round: writes the synced and cache records gathered so far once
    /// there are `FLUSH_RECORDS` of them, so a round over a large tree holds
    /// a bounded batch (an initial sync of 200,000 files held them all).
    /// What a failing round persists anyway, minus the two things only the
    /// end of a round may settle: landing intents (files of this round may
    /// still be landing) and proposals in doubt stay as recorded.
    async fn flush_if_large(&mut self) -> Result<(), SyncError> {
        if self.batch.synced_put.len() + self.batch.cache_put.len() < FLUSH_RECORDS {
            return Ok(());
        }
        let landings = std::mem::take(&mut self.landings_recorded);
        let proposals = std::mem::take(&mut self.proposals_recorded);
        let result = self.persist().await;
        self.landings_recorded |= landings;
        self.proposals_recorded |= proposals;
        result
    }

    /// True when deferred local deletions have been quiet long enough.
    pub fn deletions_due(&self) -> bool {
        !self.trees.deferred.is_empty()
            && self
                .last_deletion
                .is_none_or(|at| at.elapsed() >= self.config.delete_delay)
    }

    /// Paths whose local deletion waits.
    pub fn deferred_deletions(&self) -> Vec<RelPath> {
        self.trees.deferred.iter().cloned().collect()
    }

    /// One round over `scope`. Local deletions are only proposed when
    /// `release_deletes` is set; otherwise they wait in `deferred`.
    ///
    /// A round that fails part way (a call cut off, the hub gone) still
    /// persists what it did: files it landed, conflict copies it moved. They
    /// are on disk; without their synced records the next session would
    /// take them for local changes and turn the hub's next version of those
    /// paths into conflict copies (found by the network-fault test).
    pub async fn round(
        &mut self,
        scope: Scope,
        release_deletes: bool,
    ) -> Result<RoundStats, SyncError> {
        let result = match scope {
            Scope::Full => self.full_round(release_deletes).await,
            scope => self.round_steps(scope, release_deletes).await,
        };
        if result.is_err()
            && let Err(err) = self.persist().await
        {
            tracing::warn!(workspace = %self.id, error = %err, "cannot record what the failed round did; the next session looks at those paths again");
        }
        result
    }

    /// A round over the whole workspace. A large tree (more than
    /// `slice_entries` entries on disk or in the synced tree) goes in
    /// slices of whole top-level subtrees, so that a round holds the scan,
    /// hash cache and plan of one slice at a time rather than of the whole
    /// tree (an initial sync of 200,000 files held all of them at once).
    /// Deletions wait until every slice has proposed its creations and
    /// updates, then go in one last pass: a file moved between two slices
    /// finds its bytes still on the hub, as in an unsliced round.
    ///
    /// A dead run's landing intents get one unsliced round: every slice
    /// ends with a persist that clears the intents in `node.db`, which
    /// later slices would still need after another crash.
    async fn full_round(&mut self, release_deletes: bool) -> Result<RoundStats, SyncError> {
        let slices = if self.trees.landed.is_empty() {
            self.slices().await?
        } else {
            None
        };
        let Some(slices) = slices else {
            return self.round_steps(Scope::Full, release_deletes).await;
        };
        let mut total = RoundStats::default();
        tracing::debug!(workspace = %self.id, slices = slices.len(), "full round in slices");
        for tops in slices {
            let stats = self.round_steps(Scope::Subtrees(tops), false).await?;
            total.add(&stats);
            release_free_memory();
        }
        if release_deletes && !self.trees.deferred.is_empty() {
            let deferred = self.deferred_deletions();
            let stats = self.round_steps(Scope::Subtrees(deferred), true).await?;
            total.add(&stats);
        }
        Ok(total)
    }

    /// The slices of a full round, or `None` for one unsliced round. The
    /// disk is counted (directories read, nothing stat'ed) for a first
    /// round and for a synced tree of more than one slice; a smaller synced
    /// tree is taken as a small workspace without counting (a restart of a
    /// 30,000-file workspace pays no second walk). A workspace that grew
    /// past a slice while the node was away is then synced in one round.
    async fn slices(&self) -> Result<Option<Vec<Vec<RelPath>>>, SyncError> {
        let limit = self.config.slice_entries;
        let synced = self.trees.synced.len() as u64;
        if synced > 0 && synced <= limit {
            return Ok(None);
        }
        // A root that cannot be listed (gone, replaced, unreadable) gets
        // the unsliced round, whose checks halt or report it.
        let root = self.root.clone();
        let Ok(Some(on_disk)) =
            tokio::task::spawn_blocking(move || gm_fs::scan::top_level_sizes(&root)).await?
        else {
            return Ok(None);
        };
        // Tops gone from the disk still hold synced entries to delete; a
        // top weighs what the disk or the synced tree holds, whichever is more.
        let mut known: BTreeMap<&str, u64> = BTreeMap::new();
        for path in self.trees.synced.keys().chain(self.trees.remote.keys()) {
            let top = path
                .as_str()
                .split_once('/')
                .map_or(path.as_str(), |(t, _)| t);
            *known.entry(top).or_default() += 1;
        }
        let mut sizes: BTreeMap<RelPath, u64> = on_disk.into_iter().collect();
        for (top, count) in known {
            if let Ok(top) = RelPath::new(top) {
                let size = sizes.entry(top).or_default();
                *size = (*size).max(count);
            }
        }
        Ok(gm_core::slice_tops(sizes.into_iter().collect(), limit))
    }

    async fn round_steps(
        &mut self,
        scope: Scope,
        release_deletes: bool,
    ) -> Result<RoundStats, SyncError> {
        if !self.root.still_in_place() {
            return Err(self.halt(format!(
                "workspace root {} vanished or was replaced; nothing was deleted. If that is deliberate run `ghostmirror confirm-empty --state-dir {} {}`",
                self.root.path().display(),
                self.config.state_dir.display(),
                self.id
            )));
        }
        let scope_was_full_with_landings =
            matches!(scope, Scope::Full) && !self.trees.landed.is_empty();
        let tops: Option<Vec<RelPath>> = self.trees.tops(scope);
        let rules = Arc::new(IgnoreRules::load(&self.root));
        if rules.problems != self.ignore_problems {
            for problem in &rules.problems {
                tracing::warn!(workspace = %self.id, problem = %problem, "ignore rules");
            }
            self.ignore_problems = rules.problems.clone();
        }
        let started = Instant::now();
        let scans = self.scan(tops.clone(), rules.clone()).await?;
        let scanned = started.elapsed();
        let mut scanned_entries: Vec<(RelPath, (Entry, Stat))> = Vec::new();
        let mut unreadable: Vec<RelPath> = Vec::new();
        for scan in scans {
            for problem in &scan.problems {
                tracing::warn!(workspace = %self.id, problem = %problem, "skipped while scanning");
            }
            for (path, record) in &scan.cache_updates {
                if record.is_racy(self.config.scan.racy_window(&self.root, &record.stat)) {
                    self.racy.insert(path.clone(), racy_due(&self.config));
                }
            }
            self.batch.cache_put.extend(scan.cache_updates);
            self.batch.cache_del.extend(scan.stale_cache);
            self.batch.manifests.extend(scan.manifests);
            unreadable.extend(scan.unreadable);
            scanned_entries.extend(
                scan.entries
                    .into_iter()
                    .map(|item| (item.path, (item.entry, item.stat))),
            );
        }
        // Each scan is sorted: the map is built from the sorted runs in one
        // pass, not by a search per entry.
        let mut local: BTreeMap<RelPath, (Entry, Stat)> = scanned_entries.into_iter().collect();
        let is_unreadable = |path: &RelPath| {
            unreadable
                .iter()
                .any(|u| u == path || u.is_ancestor_of(path))
        };

        // Ignored paths are neither sent nor applied (the scan already
        // skipped them locally); remote changes to them are consumed
        // without being applied.
        let ignored = |path: &RelPath, state: &Versioned| match &state.entry {
            Some(entry) => rules.is_ignored(path, entry.is_dir()),
            None => rules.is_ignored_any(path),
        };
        let mut candidates = self
            .trees
            .candidates(tops.as_deref(), local.keys(), ignored);
        candidates.retain(|path| !is_unreadable(path));
        let plan = self.trees.plan(
            candidates,
            |path| local.get(path).map(|(entry, _)| entry),
            release_deletes,
        );
        let planned = started.elapsed();
        if scope_was_full_with_landings {
            // A dead run's intents served this (full) round's plan.
            self.trees.landed.clear();
            self.landings_recorded = true;
        }
        if plan.deferred_more {
            self.last_deletion = Some(Instant::now());
        }

        let mut stats = RoundStats::default();
        for (path, state) in plan.adopt {
            // The disk already holds the content; a skill's file that became
            // read-only (a promotion) loses its write bits here.
            if let (
                Some((
                    Entry::File {
                        hash, executable, ..
                    },
                    stat,
                )),
                true,
            ) = (local.get(&path), self.read_only.contains(&path))
            {
                let mode = FileMode::read_only(*executable);
                if !mode.matches(stat.mode) {
                    match self.root.set_mode(&path, mode, *stat) {
                        Ok(now) => self.put_cache(&path, now, *hash),
                        Err(err) => {
                            self.note_failure(&path, &err, &mut stats);
                            continue;
                        }
                    }
                }
            }
            self.set_synced(&path, state);
            stats.adopted += 1;
        }
        // Each planned path takes its scan entry out of `local`, which is
        // then dropped: a round over a large tree does not hold the scan
        // twice while it transfers.
        fn applies(
            local: &mut BTreeMap<RelPath, (Entry, Stat)>,
            list: Vec<(RelPath, Versioned)>,
        ) -> Vec<ApplyItem> {
            list.into_iter()
                .map(|(path, target)| ApplyItem {
                    local: local.remove(&path),
                    path,
                    target,
                })
                .collect()
        }
        fn proposals(
            local: &mut BTreeMap<RelPath, (Entry, Stat)>,
            list: Vec<(RelPath, Seq)>,
        ) -> Vec<ProposeItem> {
            list.into_iter()
                .map(|(path, base)| ProposeItem {
                    local: local.remove(&path),
                    path,
                    base,
                })
                .collect()
        }
        let apply_writes = applies(&mut local, plan.apply_writes);
        let apply_deletes = applies(&mut local, plan.apply_deletes);
        let propose_clearing = proposals(&mut local, plan.propose_clearing);
        let propose_writes = proposals(&mut local, plan.propose_writes);
        let propose_deletes = proposals(&mut local, plan.propose_deletes);
        drop(local);

        // Safety brake: an empty root with a non-empty synced tree proposes nothing.
        let deletes = propose_clearing.len() + propose_deletes.len();
        if deletes > 0 && self.live_synced() > 0 && self.root.is_empty()? {
            let confirmed = std::mem::take(&mut self.emptying_confirmed)
                || self.db.take_confirm_empty(&self.id)?;
            if !confirmed {
                return Err(self.halt(format!(
                    "workspace root {} is empty but {} entries were synced (an unmounted volume looks like this); nothing was deleted. If the emptying is deliberate run `ghostmirror confirm-empty --state-dir {} {}`",
                    self.root.path().display(),
                    self.live_synced(),
                    self.config.state_dir.display(),
                    self.id
                )));
            }
            tracing::warn!(workspace = %self.id, deletes, "emptying confirmed; propagating the deletions");
        }

        // Creations and updates go parent-first, deletions child-first; new
        // content lands before old content leaves, so renames find their bytes.
        // (The plan orders each list: parents first, deletions children first.)
        self.progress.plan(
            apply_writes
                .iter()
                .chain(&apply_deletes)
                .map(|a| a.target.entry.as_ref())
                .chain(
                    propose_clearing
                        .iter()
                        .chain(&propose_writes)
                        .chain(&propose_deletes)
                        .map(|p| p.local.as_ref().map(|(e, _)| e)),
                ),
        );
        self.apply_writes(apply_writes, &mut stats).await?;
        // A directory replaced by a file: its children go first, so the
        // hub can replace the then empty directory.
        self.propose(propose_clearing, &mut stats).await?;
        self.propose(propose_writes, &mut stats).await?;
        self.apply_deletes(apply_deletes, &mut stats);
        self.propose(propose_deletes, &mut stats).await?;
        let transferred = started.elapsed();
        self.persist().await?;
        // Idle rounds are logged only when slow (a restart's first round
        // over an unchanged tree), with where their time went.
        if !stats.idle() || started.elapsed() >= Duration::from_millis(50) {
            tracing::debug!(
                workspace = %self.id,
                ?stats,
                scan_ms = scanned.as_millis() as u64,
                plan_ms = (planned - scanned).as_millis() as u64,
                transfer_ms = (transferred - planned).as_millis() as u64,
                persist_ms = (started.elapsed() - transferred).as_millis() as u64,
                "round done"
            );
        }
        Ok(stats)
    }

    async fn scan(
        &self,
        tops: Option<Vec<RelPath>>,
        rules: Arc<IgnoreRules>,
    ) -> Result<Vec<ScanOutcome>, SyncError> {
        let root = self.root.clone();
        let db = self.db.clone();
        let id = self.id.clone();
        let config = self.config.scan.clone();
        // The hash cache of each subtree loads from node.db while the
        // subtree is walked.
        let scans = tokio::task::spawn_blocking(move || -> Result<Vec<ScanOutcome>, SyncError> {
            let tops: Vec<Option<RelPath>> = match tops {
                None => vec![None],
                Some(tops) => tops.into_iter().map(Some).collect(),
            };
            let mut out = Vec::with_capacity(tops.len());
            walk_while_loading(
                &root,
                &tops,
                true,
                &config,
                &rules,
                |top| Ok::<_, SyncError>(db.cache_under(&id, top)?),
                || {},
                |_, walk, cache| {
                    out.push(hash_walked(&root, walk, &cache, &config));
                    Ok(())
                },
            )?;
            Ok(out)
        })
        .await??;
        Ok(scans)
    }

    /// Writes remote versions over paths the user did not change.
    async fn apply_writes(
        &mut self,
        mut items: Vec<ApplyItem>,
        stats: &mut RoundStats,
    ) -> Result<(), SyncError> {
        items.sort_by(|a, b| a.path.cmp(&b.path));
        // Durably announce what is about to land, so a run killed before
        // this round persists can still tell these files are the hub's.
        let intents: Vec<(RelPath, Versioned)> = items
            .iter()
            .filter(|item| item.target.entry.is_some())
            .map(|item| (item.path.clone(), item.target.clone()))
            .collect();
        if !intents.is_empty() {
            let (db, id) = (self.db.clone(), self.id.clone());
            tokio::task::spawn_blocking(move || db.record_landings(&id, &intents)).await??;
            self.landings_recorded = true;
        }
        // A group of landings is made durable by one filesystem sync before
        // `persist` records it; a lone change is fsynced by itself (a
        // `syncfs` also waits for unrelated dirty data).
        let grouped = items.len() >= gm_fs::root::GROUP_COMMIT_MIN;
        let mut downloads: Vec<(DownloadItem, Versioned)> = Vec::new();
        for item in items {
            let Some(target_entry) = item.target.entry.clone() else {
                continue;
            };
            let expect = match &item.local {
                Some((_, stat)) => Expect::Unchanged(*stat),
                None => Expect::Absent,
            };
            // A different kind of entry is in the way: remove it first (it
            // is the synced version, so nothing is lost).
            let kind_changes = item.local.as_ref().is_some_and(|(local, _)| {
                std::mem::discriminant(local) != std::mem::discriminant(&target_entry)
                    || local.is_dir()
            });
            let expect = if kind_changes {
                let Some((local_entry, stat)) = &item.local else {
                    continue;
                };
                if local_entry.is_dir() && target_entry.is_dir() {
                    expect
                } else {
                    match self.root.remove(&item.path, *stat) {
                        Ok(()) => Expect::Absent,
                        Err(err) => {
                            self.note_failure(&item.path, &err, stats);
                            continue;
                        }
                    }
                }
            } else {
                expect
            };
            let result = match &target_entry {
                Entry::Dir if grouped => {
                    self.needs_sync = true;
                    self.root.make_dir_unsynced(&item.path).map(|_| None)
                }
                Entry::Dir => self.root.make_dir(&item.path).map(|_| None),
                Entry::Symlink { target } => self
                    .root
                    .make_symlink(&item.path, target, expect)
                    .map(|_| None),
                Entry::File {
                    hash, executable, ..
                } => {
                    let mode = self.file_mode(&item.path, *executable);
                    if let (Some((Entry::File { hash: here, .. }, stat)), Expect::Unchanged(_)) =
                        (&item.local, expect)
                        && here == hash
                    {
                        self.root
                            .set_mode(&item.path, mode, *stat)
                            .map(|s| Some((s, *hash)))
                    } else if let Some(stat) = self.copy_local(&item.path, *hash, mode, expect) {
                        Ok(Some((stat, *hash)))
                    } else {
                        downloads.push((
                            DownloadItem {
                                path: item.path.clone(),
                                hash: *hash,
                                mode,
                                expect,
                            },
                            item.target.clone(),
                        ));
                        continue;
                    }
                }
            };
            match result {
                Ok(file) => {
                    if let Some((stat, hash)) = file {
                        self.put_cache(&item.path, stat, hash);
                    }
                    self.progress.advance(item.target.entry.as_ref());
                    self.set_synced(&item.path, item.target);
                    stats.applied += 1;
                }
                Err(err) => self.note_failure(&item.path, &err, stats),
            }
            self.flush_if_large().await?;
        }
        // Large files by chunks, one at a time; a corrupt transfer is retried.
        let (large, downloads): (Vec<_>, Vec<_>) = downloads.into_iter().partition(|(_, target)| {
            matches!(&target.entry, Some(Entry::File { size, .. }) if *size >= gm_chunk::CHUNKED_MIN)
        });
        for (item, target) in large {
            let size = match &target.entry {
                Some(Entry::File { size, .. }) => *size,
                _ => continue,
            };
            let mut outcome = None;
            for _attempt in 0..3 {
                let result = transfer::download_chunked(
                    &mut self.client,
                    &self.db,
                    &self.id,
                    &self.root,
                    &item,
                    size,
                    self.config.compression.content(),
                )
                .await?;
                let corrupt = matches!(result, Err(DownloadFailure::Corrupt));
                outcome = Some(result);
                if !corrupt {
                    break;
                }
                tracing::warn!(workspace = %self.id, path = %item.path, "downloaded content did not match its hash; retrying");
            }
            match outcome {
                Some(Ok((stat, manifest))) => {
                    self.put_cache(&item.path, stat, item.hash);
                    self.batch.manifests.push((item.path.clone(), manifest));
                    self.progress.advance(target.entry.as_ref());
                    self.set_synced(&item.path, target);
                    stats.applied += 1;
                }
                Some(Err(DownloadFailure::Local(err))) => {
                    self.note_failure(&item.path, &err, stats)
                }
                Some(Err(failure)) => {
                    tracing::debug!(workspace = %self.id, path = %item.path, ?failure, "download not landed; waiting for the journal");
                    stats.failed += 1;
                    self.trees.follow_up.insert(item.path.clone());
                }
                None => {}
            }
            self.flush_if_large().await?;
        }
        // Small files in bounded batches; a corrupt transfer is retried.
        let mut content_client =
            crate::client::compressed_if(&self.client, self.config.compression.content());
        for chunk in downloads.chunks(512) {
            let mut attempt_items: Vec<usize> = (0..chunk.len()).collect();
            for attempt in 0..3 {
                if attempt_items.is_empty() {
                    break;
                }
                let request: Vec<DownloadItem> = attempt_items
                    .iter()
                    .map(|&i| DownloadItem {
                        path: chunk[i].0.path.clone(),
                        hash: chunk[i].0.hash,
                        mode: chunk[i].0.mode,
                        expect: chunk[i].0.expect,
                    })
                    .collect();
                let outcomes =
                    transfer::download(&mut content_client, &self.id, &self.root, &request).await?;
                self.needs_sync = true;
                let mut again = Vec::new();
                for (position, &i) in attempt_items.iter().enumerate() {
                    let (item, target) = &chunk[i];
                    match outcomes.get(&position) {
                        Some(Ok(stat)) => {
                            self.put_cache(&item.path, *stat, item.hash);
                            self.progress.advance(target.entry.as_ref());
                            self.set_synced(&item.path, target.clone());
                            stats.applied += 1;
                        }
                        Some(Err(DownloadFailure::Corrupt)) if attempt < 2 => {
                            tracing::warn!(workspace = %self.id, path = %item.path, "downloaded content did not match its hash; retrying");
                            again.push(i);
                        }
                        Some(Err(DownloadFailure::Local(err))) => {
                            self.note_failure(&item.path, err, stats)
                        }
                        Some(Err(DownloadFailure::Unavailable(why))) => {
                            tracing::debug!(workspace = %self.id, path = %item.path, why = %why, "download not landed; waiting for the journal");
                            stats.failed += 1;
                            self.trees.follow_up.insert(item.path.clone());
                        }
                        Some(Err(DownloadFailure::Corrupt)) => {
                            tracing::warn!(workspace = %self.id, path = %item.path, "downloaded content kept failing its hash check");
                            stats.failed += 1;
                            self.trees.follow_up.insert(item.path.clone());
                        }
                        None => {
                            stats.failed += 1;
                            self.trees.follow_up.insert(item.path.clone());
                        }
                    }
                }
                attempt_items = again;
            }
            self.flush_if_large().await?;
        }
        Ok(())
    }

    /// Lands content already present in this workspace (a rename or a copy
    /// on the other side): bytes move on disk, not on the wire.
    fn copy_local(
        &mut self,
        path: &RelPath,
        hash: ContentHash,
        mode: FileMode,
        expect: Expect,
    ) -> Option<Stat> {
        let mut sources: Vec<RelPath> = self
            .trees
            .synced
            .iter()
            .filter(|(p, v)| {
                *p != path && v.entry.as_ref().and_then(Entry::file_hash) == Some(hash)
            })
            .map(|(p, _)| p.clone())
            .take(4)
            .collect();
        if sources.is_empty() {
            sources = self.db.cached_paths_with_hash(&self.id, &hash, 4).ok()?;
        }
        for source in sources {
            if &source == path {
                continue;
            }
            let Ok(mut staged) = self.root.stage_file() else {
                return None;
            };
            if staged.copy_from(&self.root, &source).is_err() || staged.hash() != hash {
                continue;
            }
            if let Ok(stat) = staged.commit(&self.root, path, hash, mode, expect) {
                return Some(stat);
            }
        }
        None
    }

    fn apply_deletes(&mut self, items: Vec<ApplyItem>, stats: &mut RoundStats) {
        for item in items {
            let result = match &item.local {
                Some((_, stat)) => self.root.remove(&item.path, *stat),
                None => Ok(()),
            };
            match result {
                Ok(()) => {
                    self.batch.cache_del.push(item.path.clone());
                    self.progress.advance(None);
                    self.set_synced(&item.path, item.target);
                    stats.applied += 1;
                }
                Err(FsError::NotEmpty { .. }) => {
                    // New local content inside: it is proposed, and the hub
                    // brings the directory back.
                    tracing::debug!(workspace = %self.id, path = %item.path, "remote deletion of a directory that has new local content");
                }
                Err(err) => self.note_failure(&item.path, &err, stats),
            }
        }
    }

    fn note_failure(&mut self, path: &RelPath, err: &FsError, stats: &mut RoundStats) {
        if err.is_retryable() {
            tracing::debug!(workspace = %self.id, path = %path, error = %err, "changed locally during the plan; looking again");
        } else {
            tracing::warn!(workspace = %self.id, path = %path, error = %err, "could not apply a remote change");
        }
        stats.failed += 1;
        self.trees.follow_up.insert(path.clone());
    }

    /// Proposes local changes in batches; handles each answer.
    async fn propose(
        &mut self,
        items: Vec<ProposeItem>,
        stats: &mut RoundStats,
    ) -> Result<(), SyncError> {
        if items.is_empty() {
            return Ok(());
        }
        // Durably, before anything is sent: the hub may commit these and
        // the answer be lost, even to a kill.
        let sending: Vec<(RelPath, Option<Entry>)> = items
            .iter()
            .map(|item| {
                (
                    item.path.clone(),
                    item.local.as_ref().map(|(e, _)| e.clone()),
                )
            })
            .collect();
        let (db, id) = (self.db.clone(), self.id.clone());
        tokio::task::spawn_blocking(move || db.record_proposals(&id, &sending)).await??;
        self.proposals_recorded = true;
        // Small contents the hub holds are proposed by hash alone. Only a
        // 64-bit prefix of each hash is kept (a quarter of the memory, 8 MB
        // at 200,000 files): a prefix that matches by chance sends a file
        // without its bytes, the hub answers `NeedContent`, and the next
        // pass sends them inline.
        let inline_max = self.config.inline_max;
        let hub_has: HashSet<u64> = self
            .trees
            .synced
            .values()
            .filter_map(|v| match &v.entry {
                Some(Entry::File { hash, size, .. }) if *size <= inline_max => {
                    Some(hash_prefix(hash))
                }
                _ => None,
            })
            .collect();
        let mut queue: Vec<(ProposeItem, bool)> = items.into_iter().map(|i| (i, false)).collect();
        let mut round = 0;
        while !queue.is_empty() && round < 3 {
            round += 1;
            let mut next: Vec<(ProposeItem, bool)> = Vec::new();
            let mut start = 0;
            let mut in_flight: VecDeque<(CommitCall, Vec<Member>)> = VecDeque::new();
            while start < queue.len() {
                // Build one batch within the byte budget.
                let mut ops = Vec::new();
                let mut members = Vec::new();
                let mut bytes = 0u64;
                let mut index = start;
                while index < queue.len() && ops.len() < 4096 {
                    let (item, force_inline) = &queue[index];
                    let op = self.make_op(item, *force_inline, &hub_has);
                    index += 1;
                    let Some((op, item_local)) = op else {
                        // Vanished: nothing to propose, settled for this round.
                        self.progress.advance(item.local.as_ref().map(|(e, _)| e));
                        continue;
                    };
                    bytes += op.data.as_ref().map_or(0, |d| d.len() as u64);
                    ops.push(op);
                    let known = self.trees.known_seq(&item.path);
                    self.trees
                        .sent(&item.path, item_local.as_ref().map(|(e, _)| e.clone()));
                    members.push((item.path.clone(), item.base, item_local, known));
                    if bytes >= self.config.batch_bytes {
                        break;
                    }
                }
                start = index;
                if ops.is_empty() {
                    continue;
                }
                let request = pb::CommitRequest {
                    workspace: self.id.to_string(),
                    node_id: self.config.node_id.to_string(),
                    ops,
                };
                // Up to two batches in flight: the next one is read and sent
                // while the hub still commits the previous one.
                let mut client = crate::client::compressed_if(
                    &self.client,
                    self.config.compression.commit(request.ops.len(), bytes),
                );
                in_flight.push_back((
                    tokio::spawn(async move { client.commit(request).await }),
                    members,
                ));
                if in_flight.len() < 2 && start < queue.len() {
                    continue;
                }
                if let Some((call, members)) = in_flight.pop_front() {
                    self.finish_batch(call, members, stats, &mut next).await?;
                }
            }
            while let Some((call, members)) = in_flight.pop_front() {
                self.finish_batch(call, members, stats, &mut next).await?;
            }
            queue = next;
        }
        for (item, _) in queue {
            self.trees.follow_up.insert(item.path);
        }
        Ok(())
    }

    /// Waits for one commit batch and handles each answer.
    async fn finish_batch(
        &mut self,
        call: CommitCall,
        members: Vec<Member>,
        stats: &mut RoundStats,
        next: &mut Vec<(ProposeItem, bool)>,
    ) -> Result<(), SyncError> {
        let response = call
            .await?
            .map_err(|s| SyncError::from_status(s, "commit"))?
            .into_inner();
        let mut uploads: Vec<(ProposeItem, transfer::FileToSend)> = Vec::new();
        for ((path, base, local, known), result) in members.into_iter().zip(response.results) {
            self.trees.answered(&path);
            // A path the hub wants content for is proposed again (inline
            // or after its upload): it counts once, when it is settled.
            if !matches!(result.outcome, Some(pb::op_result::Outcome::NeedContent(_))) {
                stats.proposed += 1;
                self.progress.advance(local.as_ref().map(|(e, _)| e));
            }
            match result.outcome {
                Some(pb::op_result::Outcome::Committed(done)) => {
                    let entry = local.as_ref().map(|(e, _)| e.clone());
                    self.trees.refused.remove(&path);
                    self.set_synced(
                        &path,
                        Versioned {
                            entry,
                            seq: Seq(done.seq),
                        },
                    );
                }
                Some(pb::op_result::Outcome::Conflict(conflict)) => {
                    stats.conflicts += 1;
                    self.on_conflict(&path, local, conflict);
                }
                Some(pb::op_result::Outcome::NeedContent(_)) => {
                    let item = ProposeItem { path, base, local };
                    match &item.local {
                        Some((Entry::File { size, .. }, _)) if *size <= self.config.inline_max => {
                            next.push((item, true))
                        }
                        Some((Entry::File { hash, size, .. }, _)) => {
                            let file = transfer::FileToSend {
                                path: item.path.clone(),
                                hash: *hash,
                                size: *size,
                                manifest: None,
                            };
                            uploads.push((item, file));
                        }
                        _ => {
                            stats.proposed += 1;
                            stats.failed += 1;
                            self.progress.advance(item.local.as_ref().map(|(e, _)| e));
                            self.trees.follow_up.insert(item.path.clone());
                        }
                    }
                }
                Some(pb::op_result::Outcome::Refused(reason)) => {
                    stats.refused += 1;
                    tracing::warn!(workspace = %self.id, path = %path, reason = %reason, "the hub refused a local change; it stays local");
                    let entry = local.map(|(e, _)| e);
                    self.trees.refuse(path, entry, reason, known);
                }
                None => {
                    stats.failed += 1;
                    self.trees.follow_up.insert(path);
                }
            }
        }
        if !uploads.is_empty() {
            // The chunk lists this round's scan computed, not yet in
            // node.db; one serves an upload only when the scan's record
            // for its path (the last one) holds the content proposed.
            let hashed: HashMap<&RelPath, ContentHash> = self
                .batch
                .cache_put
                .iter()
                .map(|(p, record)| (p, record.hash))
                .collect();
            let scanned: HashMap<&RelPath, &gm_chunk::Manifest> =
                self.batch.manifests.iter().map(|(p, m)| (p, m)).collect();
            for (_, file) in &mut uploads {
                if hashed.get(&file.path) == Some(&file.hash) {
                    file.manifest = scanned.get(&file.path).map(|m| (*m).clone());
                }
            }
        }
        self.upload_all(uploads, stats, next).await?;
        self.flush_if_large().await
    }

    /// Uploads the large files the hub asked for, `UPLOADS_IN_FLIGHT` at a
    /// time (one stream each), so reading, the wire and the hub's writing
    /// and hashing overlap across files. Each uploaded file is proposed
    /// again; one that did not complete is followed up later.
    async fn upload_all(
        &mut self,
        uploads: Vec<(ProposeItem, transfer::FileToSend)>,
        stats: &mut RoundStats,
        next: &mut Vec<(ProposeItem, bool)>,
    ) -> Result<(), SyncError> {
        use futures::StreamExt;
        let sends = uploads.into_iter().map(|(item, file)| {
            let (mut client, db, id, root, io) = (
                self.client.clone(),
                self.db.clone(),
                self.id.clone(),
                self.root.clone(),
                self.config.scan.io.clone(),
            );
            let compress = self.config.compression.content();
            async move {
                let sent =
                    transfer::upload(&mut client, &db, &id, &root, &file, io, compress).await;
                (item, sent)
            }
        });
        let mut done = futures::stream::iter(sends).buffer_unordered(UPLOADS_IN_FLIGHT);
        while let Some((item, sent)) = done.next().await {
            match sent {
                Ok(sent) => {
                    tracing::debug!(workspace = %self.id, path = %item.path, chunks = sent.chunks, sent_chunks = sent.sent_chunks, sent_bytes = sent.sent_bytes, "uploaded");
                    next.push((item, false))
                }
                Err(SyncError::Fatal(err)) if err.to_string().contains("token") => {
                    return Err(SyncError::Fatal(err));
                }
                Err(err) => {
                    tracing::info!(workspace = %self.id, path = %item.path, error = %err, "upload did not complete; will try again");
                    stats.proposed += 1;
                    stats.failed += 1;
                    self.progress.advance(item.local.as_ref().map(|(e, _)| e));
                    self.trees.follow_up.insert(item.path.clone());
                }
            }
        }
        Ok(())
    }

    /// The wire op for one proposal; reads small files whole (the hash sent
    /// is the hash of the bytes sent). `None` when the file vanished.
    fn make_op(
        &mut self,
        item: &ProposeItem,
        force_inline: bool,
        hub_has: &HashSet<u64>,
    ) -> Option<(pb::CommitOp, Local)> {
        let mut local = item.local.clone();
        let mut data = None;
        if let Some((
            Entry::File {
                hash,
                size,
                executable,
            },
            _,
        )) = &local
        {
            let small = *size <= self.config.inline_max;
            if small && (force_inline || !hub_has.contains(&hash_prefix(hash))) {
                match self.root.read_whole(&item.path) {
                    Ok((bytes, read_hash, stat)) => {
                        let executable = *executable;
                        if read_hash != *hash {
                            // Changed since the scan: propose what was read.
                            self.put_cache(&item.path, stat, read_hash);
                        }
                        local = Some((
                            Entry::File {
                                hash: read_hash,
                                size: bytes.len() as u64,
                                executable,
                            },
                            stat,
                        ));
                        data = Some(bytes);
                    }
                    Err(err) => {
                        tracing::debug!(workspace = %self.id, path = %item.path, error = %err, "file changed while being read; looking again");
                        self.trees.follow_up.insert(item.path.clone());
                        return None;
                    }
                }
            }
        }
        let op = pb::CommitOp {
            path: item.path.to_string(),
            base_seq: item.base.0,
            entry: local.as_ref().map(|(e, _)| gm_proto::entry_to_wire(e)),
            data,
        };
        Some((op, local))
    }

    /// True when `copy` on disk is a file with the same bytes as the local
    /// file version `entry` (read and hashed: conflicts are rare).
    fn already_kept(&self, entry: &Entry, copy: &RelPath) -> bool {
        let Entry::File { hash, .. } = entry else {
            return false;
        };
        matches!(self.root.hash_file(copy), Ok((found, _, _)) if found == *hash)
    }

    /// The hub kept its version at `path`. Ours, if it had content, is on
    /// the hub under the copy name: move the local version there (a rename)
    /// and take the hub's version at `path` in the next round.
    fn on_conflict(&mut self, path: &RelPath, local: Local, conflict: pb::Conflict) {
        let current = match conflict.current.as_ref().map(gm_proto::path_state) {
            Some(Ok((_, current))) => {
                let read_only = conflict.current.as_ref().is_some_and(|c| c.read_only);
                self.note_read_only(path, read_only);
                current
            }
            _ => {
                tracing::warn!(workspace = %self.id, path = %path, "conflict answer without a valid current state");
                self.trees.follow_up.insert(path.clone());
                return;
            }
        };
        let copy = conflict.copy.as_ref().map(gm_proto::path_state);
        let expected_after = match copy {
            Some(Ok((copy_path, copy_state))) => {
                let Some((entry, stat)) = &local else {
                    self.trees.follow_up.insert(path.clone());
                    return;
                };
                match self.root.rename_noreplace(path, &copy_path, *stat) {
                    Ok(new_stat) => {
                        tracing::info!(workspace = %self.id, path = %path, copy = %copy_path, "conflict: the local version now lives at its conflict-copy name");
                        if let Entry::File { hash, .. } = entry {
                            self.put_cache(&copy_path, new_stat, *hash);
                        }
                        self.batch.cache_del.push(path.clone());
                        self.set_synced(&copy_path, copy_state);
                        if entry.is_dir() {
                            self.trees.follow_up.insert(copy_path);
                        }
                        None
                    }
                    Err(err) if self.already_kept(entry, &copy_path) => {
                        // The copy is here already with these bytes (a
                        // refused directory moved there with its files, and
                        // a file of it refused again at its old path): the
                        // local version is kept, this one is a duplicate.
                        match self.root.remove(path, *stat) {
                            Ok(()) => {
                                tracing::info!(workspace = %self.id, path = %path, copy = %copy_path, moved = %err, "conflict: the local version is already kept at its conflict-copy name; duplicate removed");
                                self.batch.cache_del.push(path.clone());
                                self.set_synced(&copy_path, copy_state);
                                None
                            }
                            Err(err) => {
                                tracing::info!(workspace = %self.id, path = %path, error = %err, "conflict copy not moved yet; the local version changed again");
                                self.trees.follow_up.insert(path.clone());
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::info!(workspace = %self.id, path = %path, error = %err, "conflict copy not moved yet; the local version changed again");
                        self.trees.follow_up.insert(path.clone());
                        return;
                    }
                }
            }
            Some(Err(err)) => {
                tracing::warn!(workspace = %self.id, path = %path, error = %err, "conflict answer with an invalid copy");
                self.trees.follow_up.insert(path.clone());
                return;
            }
            None => local.map(|(e, _)| e),
        };
        self.trees.after_conflict(path, expected_after, current);
    }
}

fn racy_due(config: &NodeConfig) -> Instant {
    Instant::now()
        + Duration::from_nanos(config.scan.racy_window_ns.max(0) as u64)
        + Duration::from_millis(50)
}

/// The first 8 bytes of a content hash, as a set key.
fn hash_prefix(hash: &ContentHash) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(prefix)
}

/// Returns the heap's free pages to the kernel. A sliced round frees each
/// slice's scan and plan while the synced tree keeps growing between them;
/// glibc's allocator keeps such freed pages resident unless asked.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
