//! The simulated hub of one workspace: the mirror (a `Disk`), the journal
//! (path -> latest `Versioned`, seqs strictly increasing), the conflict
//! log, the watcher's pending paths, and the subscriptions.
//!
//! Commits follow `gm_hub::commit` step for step, with the decision taken
//! by the real `gm_core::decide_commit` and copy names from
//! `gm_core::conflict_copy_candidates`: the disk is journaled first when
//! it differs (`sync_disk`), parents are ensured, a directory that is
//! replaced must be empty, a change lands only over what was read, and the
//! journal records of a request stay in memory until a flush (before an
//! observation, a children check, and at the end) so a crash in the middle
//! leaves the disk ahead of the journal, as on a real hub. Observation
//! follows `gm_hub::observe`: deletions children first, then creations
//! parents first, each with the next seq.
//!
//! Does not model: transfers by chunks, hash caches, ignore rules, the
//! safety brake (the workload never empties a mirror), halting.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use gm_core::{
    CommitDecision, ContentHash, Entry, NodeId, RelPath, Seq, Versioned, children_matter,
    conflict_copy_candidates, decide_commit, minimal_tops,
};

use crate::disk::{Disk, DiskError, Expect, Item, Seen};
use crate::net::{Op, OpResult};
use crate::trace::Trace;

/// One node's subscription: the journal is streamed from `sent` on.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub conn: u64,
    pub sent: Seq,
}

#[derive(Debug, Clone)]
pub struct ConflictRow {
    pub path: RelPath,
    pub copy: RelPath,
    pub node: String,
    pub seq: Seq,
}

#[derive(Debug, Default)]
pub struct SimHub {
    pub disk: Disk,
    /// The journal as the database holds it.
    pub journal: BTreeMap<RelPath, Versioned>,
    /// Highest seq the database holds.
    pub recorded: Seq,
    /// The commit lock's counter: above `recorded` while a request has
    /// unflushed records.
    pub seq: Seq,
    pub conflicts: Vec<ConflictRow>,
    /// Paths the mirror's watcher reported and nobody observed yet.
    pub dirty: BTreeSet<RelPath>,
    /// Staging files on disk (prestaged inline content).
    pub staging: usize,
    /// By node index.
    pub subscriptions: BTreeMap<usize, Subscription>,
    /// The commit call holding the commit lock, and those waiting for it.
    pub active: Option<ActiveCall>,
    pub waiting: VecDeque<ActiveCall>,
    /// Broken promises found while running (journal seqs not increasing).
    pub violations: Vec<String>,
}

enum OpError {
    Retry(String),
    Refused(String),
    NeedContent,
}

fn fs_error(err: DiskError) -> OpError {
    match err {
        DiskError::TargetChanged(path) => OpError::Retry(format!("{path} changed")),
        DiskError::NotEmpty(path) => OpError::Retry(format!("{path} not empty")),
        DiskError::NotADirectory(path) => {
            OpError::Refused(format!("{path}: a parent is not a directory on the hub"))
        }
        DiskError::NotFound(path) => OpError::Refused(format!("hub error: {path} not found")),
    }
}

impl SimHub {
    /// Writes journal records in one transaction; refuses (and reports) a
    /// seq that does not increase, as `HubDb::record` does.
    fn record(&mut self, changes: Vec<(RelPath, Versioned)>, trace: &mut Trace) {
        for (path, state) in changes {
            if state.seq <= self.recorded {
                self.violations.push(format!(
                    "journal seq {} for {path} is not above {}",
                    state.seq, self.recorded
                ));
                continue;
            }
            self.recorded = state.seq;
            trace.line(format!(
                "hub journal {} {path} = {}",
                state.seq,
                crate::show(state.entry.as_ref())
            ));
            self.journal.insert(path, state);
        }
        self.seq = self.recorded;
    }

    /// Journal entries with seq > `since`, in seq order (compacted: one per
    /// path, its latest).
    pub fn changes_since(&self, since: Seq) -> Vec<(RelPath, Versioned)> {
        let mut changes: Vec<(RelPath, Versioned)> = self
            .journal
            .iter()
            .filter(|(_, v)| v.seq > since)
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        changes.sort_by_key(|(_, v)| v.seq);
        changes
    }

    pub fn live_journal(&self) -> BTreeMap<RelPath, Entry> {
        self.journal
            .iter()
            .filter_map(|(p, v)| v.entry.clone().map(|e| (p.clone(), e)))
            .collect()
    }

    fn has_live_children(&self, dir: &RelPath) -> bool {
        self.journal
            .iter()
            .any(|(p, v)| v.entry.is_some() && dir.is_ancestor_of(p))
    }

    /// `observe_locked`: journals what differs between the mirror and the
    /// journal under `tops` (`None`: everywhere).
    pub fn observe(&mut self, tops: Option<Vec<RelPath>>, trace: &mut Trace) -> usize {
        let tops: Vec<Option<RelPath>> = match tops {
            None => vec![None],
            Some(paths) => minimal_tops(paths).into_iter().map(Some).collect(),
        };
        let mut creations: Vec<(RelPath, Entry)> = Vec::new();
        let mut deletions: Vec<RelPath> = Vec::new();
        for top in &tops {
            let under = |path: &RelPath| match top {
                None => true,
                Some(top) => top == path || top.is_ancestor_of(path),
            };
            let mut seen: BTreeSet<&RelPath> = BTreeSet::new();
            for (path, item) in self.disk.items() {
                if !under(path) {
                    continue;
                }
                seen.insert(path);
                let live = self.journal.get(path).and_then(|v| v.entry.as_ref());
                if live != Some(&item.entry) {
                    creations.push((path.clone(), item.entry.clone()));
                }
            }
            for (path, state) in &self.journal {
                if state.entry.is_some() && under(path) && !seen.contains(path) {
                    deletions.push(path.clone());
                }
            }
        }
        deletions.sort();
        deletions.dedup();
        creations.sort_by(|a, b| a.0.cmp(&b.0));
        creations.dedup();
        let mut next = self.seq;
        let mut changes = Vec::new();
        for path in deletions.iter().rev() {
            next = next.next();
            changes.push((
                path.clone(),
                Versioned {
                    entry: None,
                    seq: next,
                },
            ));
        }
        for (path, entry) in creations {
            next = next.next();
            changes.push((
                path,
                Versioned {
                    entry: Some(entry),
                    seq: next,
                },
            ));
        }
        let changed = changes.len();
        if changed > 0 {
            trace.line(format!("hub observe: {changed} changes"));
            self.seq = next;
            self.record(changes, trace);
        }
        changed
    }

    /// Takes a Commit request; it runs when the commit lock is free, one
    /// `call_step` at a time.
    pub fn queue_call(&mut self, node: usize, node_id: NodeId, conn: u64, call: u64, ops: Vec<Op>) {
        self.waiting.push_back(ActiveCall {
            node,
            conn,
            call,
            ops,
            next_op: 0,
            attempt: 0,
            last_retry: String::new(),
            decided: None,
            results: Vec::new(),
            ctx: Ctx {
                node: node_id,
                now_unix: 0,
                pending: BTreeMap::new(),
                changes: Vec::new(),
                conflicts: Vec::new(),
                written: HashMap::new(),
                prestaged: Vec::new(),
            },
        });
    }

    /// True when a commit call runs or waits.
    pub fn has_calls(&self) -> bool {
        self.active.is_some() || !self.waiting.is_empty()
    }

    /// The path the running call is about to decide or write, if any.
    pub fn call_path(&self) -> Option<&RelPath> {
        let call = self.active.as_ref()?;
        call.ops.get(call.next_op).map(|op| &op.path)
    }

    /// One step of the commit calls, under the commit lock: start the next
    /// call (its inline files are staged, as a group), or read-and-decide
    /// the current op, or write it. A hub-side write can land between the
    /// decision and the write; the write then finds its target changed and
    /// the op is decided again (three attempts). Returns a finished call:
    /// (node, conn, call, results).
    pub fn call_step(
        &mut self,
        now_unix: i64,
        trace: &mut Trace,
    ) -> Option<(usize, u64, u64, Vec<OpResult>)> {
        let Some(mut call) = self.active.take() else {
            let mut call = self.waiting.pop_front()?;
            call.ctx.now_unix = now_unix;
            trace.line(format!(
                "hub: commit call {} from {} starts",
                call.call, call.ctx.node
            ));
            for op in &call.ops {
                if let (true, Some(Entry::File { hash, .. })) = (op.inline, &op.entry) {
                    call.ctx.prestaged.push((op.path.clone(), *hash));
                    self.staging += 1;
                }
            }
            self.active = Some(call);
            return None;
        };
        if let Some(op) = call.ops.get(call.next_op).cloned() {
            let outcome = match call.decided.take() {
                None => match self.read_op(&mut call.ctx, &op, trace) {
                    Ok(decided) => {
                        call.decided = Some(decided);
                        None
                    }
                    Err(err) => Some(Err(err)),
                },
                Some(decided) => Some(self.write_op(&mut call.ctx, &op, decided, trace)),
            };
            let result = match outcome {
                None => None,
                Some(Ok(result)) => Some(result),
                Some(Err(OpError::Refused(why))) => Some(OpResult::Refused(why)),
                Some(Err(OpError::NeedContent)) => Some(OpResult::NeedContent),
                Some(Err(OpError::Retry(why))) => {
                    call.attempt += 1;
                    call.last_retry = why;
                    (call.attempt >= 3).then(|| {
                        OpResult::Refused(format!(
                            "path keeps changing on the hub ({}); try again",
                            call.last_retry
                        ))
                    })
                }
            };
            if let Some(result) = result {
                trace.line(format!("hub   {} -> {result:?}", op.path));
                call.results.push(result);
                call.next_op += 1;
                call.attempt = 0;
            }
            self.active = Some(call);
            return None;
        }
        // Staged files no op used are removed when the request ends.
        self.staging -= call.ctx.prestaged.len();
        self.flush(&mut call.ctx, trace);
        Some((call.node, call.conn, call.call, call.results))
    }

    fn flush(&mut self, ctx: &mut Ctx, trace: &mut Trace) {
        let changes = std::mem::take(&mut ctx.changes);
        self.record(changes, trace);
        for row in ctx.conflicts.drain(..) {
            self.conflicts.push(row);
        }
        ctx.pending.clear();
    }

    fn current(&self, ctx: &Ctx, path: &RelPath) -> Versioned {
        if let Some(state) = ctx.pending.get(path) {
            return state.clone();
        }
        self.journal.get(path).cloned().unwrap_or(Versioned {
            entry: None,
            seq: Seq::ZERO,
        })
    }

    fn push_change(&mut self, ctx: &mut Ctx, path: &RelPath, entry: Option<Entry>) -> Seq {
        self.seq = self.seq.next();
        let state = Versioned {
            entry,
            seq: self.seq,
        };
        ctx.pending.insert(path.clone(), state.clone());
        ctx.changes.push((path.clone(), state));
        self.seq
    }

    /// The first half of `try_op`: the disk is journaled if it differs,
    /// and the real `decide_commit` decides.
    fn read_op(&mut self, ctx: &mut Ctx, op: &Op, trace: &mut Trace) -> Result<Decided, OpError> {
        let path = &op.path;
        let ours = op.entry.as_ref();
        let disk = self.sync_disk(ctx, path, trace);
        let current = self.current(ctx, path);
        let has_children = if children_matter(&current, ours) {
            self.flush(ctx, trace);
            self.has_live_children(path)
        } else {
            false
        };
        let decision = decide_commit(op.base, &current, has_children, ours);
        Ok(Decided {
            disk,
            current,
            decision,
        })
    }

    /// The second half of `try_op`: carries out the decision over what was
    /// read (a write finds out here when the disk changed meanwhile).
    fn write_op(
        &mut self,
        ctx: &mut Ctx,
        op: &Op,
        decided: Decided,
        trace: &mut Trace,
    ) -> Result<OpResult, OpError> {
        let path = &op.path;
        let ours = op.entry.as_ref();
        let Decided {
            disk,
            current,
            decision,
        } = decided;
        match decision {
            CommitDecision::AlreadyCurrent => Ok(OpResult::Committed(current.seq)),
            CommitDecision::Apply => {
                let seq = self.apply(ctx, path, ours, disk.as_ref(), op.inline, trace)?;
                Ok(OpResult::Committed(seq))
            }
            CommitDecision::KeepTheirs { copy_ours } => {
                let copy = match (copy_ours, ours) {
                    (true, Some(ours)) => {
                        let copy_path = self.free_copy_name(ctx, path, ours)?;
                        let seq =
                            self.apply(ctx, &copy_path, Some(ours), None, op.inline, trace)?;
                        ctx.conflicts.push(ConflictRow {
                            path: path.clone(),
                            copy: copy_path.clone(),
                            node: ctx.node.to_string(),
                            seq,
                        });
                        Some((
                            copy_path,
                            Versioned {
                                entry: Some(ours.clone()),
                                seq,
                            },
                        ))
                    }
                    _ => None,
                };
                Ok(OpResult::Conflict { current, copy })
            }
        }
    }

    /// What the mirror holds at `path`; when it differs from the journal
    /// (a hub-side write not yet seen), journals the subtree first.
    fn sync_disk(&mut self, ctx: &mut Ctx, path: &RelPath, trace: &mut Trace) -> Option<Item> {
        let on_disk = self.disk.get(path).cloned();
        if on_disk.as_ref().map(|i| &i.entry) == self.current(ctx, path).entry.as_ref() {
            return on_disk;
        }
        self.flush(ctx, trace);
        self.observe(Some(vec![path.clone()]), trace);
        self.disk.get(path).cloned()
    }

    fn free_copy_name(
        &mut self,
        ctx: &Ctx,
        path: &RelPath,
        ours: &Entry,
    ) -> Result<RelPath, OpError> {
        for name in conflict_copy_candidates(path, &ctx.node, ctx.now_unix, ours) {
            let name = name.map_err(|e| OpError::Refused(e.to_string()))?;
            if self.current(ctx, &name).entry.is_none() && self.disk.get(&name).is_none() {
                return Ok(name);
            }
        }
        Err(OpError::Refused(format!(
            "{path}: no free conflict-copy name"
        )))
    }

    fn ensure_parents(
        &mut self,
        ctx: &mut Ctx,
        path: &RelPath,
        trace: &mut Trace,
    ) -> Result<(), OpError> {
        for ancestor in path.ancestors() {
            match self.current(ctx, &ancestor).entry {
                Some(Entry::Dir) => continue,
                Some(other) => {
                    return Err(OpError::Refused(format!(
                        "{ancestor} is a {} on the hub, not a directory",
                        other.kind_name()
                    )));
                }
                None => {}
            }
            let disk = self.sync_disk(ctx, &ancestor, trace);
            match disk.map(|i| i.entry) {
                Some(Entry::Dir) => continue,
                Some(other) => {
                    return Err(OpError::Refused(format!(
                        "{ancestor} is a {} on the hub, not a directory",
                        other.kind_name()
                    )));
                }
                None => {
                    self.disk.make_dir(&ancestor).map_err(fs_error)?;
                    self.push_change(ctx, &ancestor, Some(Entry::Dir));
                }
            }
        }
        Ok(())
    }

    /// Puts `ours` at `path` (whose disk holds `disk`) and journals it. A
    /// parent that is not a directory on disk while the journal says it is
    /// gets journaled, and the op is decided again (`gm_hub::commit`).
    fn apply(
        &mut self,
        ctx: &mut Ctx,
        path: &RelPath,
        ours: Option<&Entry>,
        disk: Option<&Item>,
        inline: bool,
        trace: &mut Trace,
    ) -> Result<Seq, OpError> {
        match self.apply_unchecked(ctx, path, ours, disk, inline, trace) {
            Err(OpError::Refused(why)) if why.contains("not a directory") => {
                let mut journaled = false;
                for ancestor in path.ancestors() {
                    let before = self.current(ctx, &ancestor);
                    self.sync_disk(ctx, &ancestor, trace);
                    journaled |= self.current(ctx, &ancestor) != before;
                }
                if journaled {
                    Err(OpError::Retry(why))
                } else {
                    Err(OpError::Refused(why))
                }
            }
            other => other,
        }
    }

    fn apply_unchecked(
        &mut self,
        ctx: &mut Ctx,
        path: &RelPath,
        ours: Option<&Entry>,
        disk: Option<&Item>,
        inline: bool,
        trace: &mut Trace,
    ) -> Result<Seq, OpError> {
        if ours.is_some() {
            self.ensure_parents(ctx, path, trace)?;
        }
        let replace_in_place = matches!(
            (disk.map(|i| &i.entry), ours),
            (Some(Entry::File { .. }), Some(Entry::File { .. }))
                | (Some(Entry::Symlink { .. }), Some(Entry::Symlink { .. }))
        );
        let mut expect = match disk {
            Some(item) if replace_in_place => Expect::Unchanged(item.stamp),
            _ => Expect::Absent,
        };
        if let Some(existing) = disk
            && !replace_in_place
            && ours != Some(&existing.entry)
        {
            let seen = Seen {
                dir: existing.entry.is_dir(),
                stamp: existing.stamp,
            };
            if let Err(err) = self.disk.remove(path, seen) {
                if matches!(err, DiskError::NotEmpty(_)) {
                    // Untracked content under the directory: journal it first.
                    self.flush(ctx, trace);
                    self.observe(Some(vec![path.clone()]), trace);
                }
                return Err(fs_error(err));
            }
            expect = Expect::Absent;
        }
        match ours {
            None => {}
            Some(Entry::Dir) => {
                self.disk.make_dir(path).map_err(fs_error)?;
            }
            Some(link @ Entry::Symlink { .. }) => {
                self.disk
                    .place(path, link.clone(), expect)
                    .map_err(fs_error)?;
            }
            Some(
                file @ Entry::File {
                    hash, executable, ..
                },
            ) => {
                match disk {
                    Some(Item {
                        entry: Entry::File { hash: on_disk, .. },
                        stamp,
                    }) if on_disk == hash => {
                        self.disk
                            .set_executable(path, *executable, *stamp)
                            .map_err(fs_error)?;
                    }
                    _ => self.write_file(ctx, path, file, *hash, expect, inline)?,
                }
                ctx.written.insert(*hash, path.clone());
            }
        }
        Ok(self.push_change(ctx, path, ours.cloned()))
    }

    /// Lands a file from the request's inline bytes or from a file the hub
    /// already holds with the same content (no bytes on the wire).
    fn write_file(
        &mut self,
        ctx: &mut Ctx,
        path: &RelPath,
        file: &Entry,
        hash: ContentHash,
        expect: Expect,
        inline: bool,
    ) -> Result<(), OpError> {
        if inline {
            let staged = ctx
                .prestaged
                .iter()
                .position(|(p, h)| p == path && *h == hash)
                .or_else(|| ctx.prestaged.iter().position(|(_, h)| *h == hash));
            if let Some(index) = staged {
                // The staging file is renamed into place, or removed when
                // the target changed.
                ctx.prestaged.swap_remove(index);
                self.staging -= 1;
            }
            return self
                .disk
                .place(path, file.clone(), expect)
                .map(|_| ())
                .map_err(fs_error);
        }
        let mut sources: Vec<RelPath> = ctx.written.get(&hash).cloned().into_iter().collect();
        sources.extend(
            self.journal
                .iter()
                .filter(|(_, v)| v.entry.as_ref().and_then(Entry::file_hash) == Some(hash))
                .map(|(p, _)| p.clone())
                .take(4),
        );
        for source in sources {
            if &source == path {
                continue;
            }
            let holds = self
                .disk
                .read_file(&source)
                .is_ok_and(|(entry, _)| entry.file_hash() == Some(hash));
            if !holds {
                continue;
            }
            return self
                .disk
                .place(path, file.clone(), expect)
                .map(|_| ())
                .map_err(fs_error);
        }
        Err(OpError::NeedContent)
    }

    /// A Download request: each item's content if the mirror still holds
    /// it at that path.
    pub fn download(&self, items: &[(RelPath, ContentHash)]) -> Vec<Result<ContentHash, String>> {
        items
            .iter()
            .map(|(path, hash)| match self.disk.read_file(path) {
                Ok((entry, _)) if entry.file_hash() == Some(*hash) => Ok(*hash),
                Ok(_) => Err(format!(
                    "{path}: changed on the hub; wait for its journal entry"
                )),
                Err(_) => Err(format!("{path}: not a file on the hub")),
            })
            .collect()
    }

    /// A restart after a crash: staging is cleared and the mirror is
    /// observed whole (the startup scan).
    pub fn restart(&mut self, trace: &mut Trace) {
        // Calls in progress die with the process: their unflushed records
        // are lost; what they put on disk stays.
        self.active = None;
        self.waiting.clear();
        self.seq = self.recorded;
        self.staging = 0;
        self.subscriptions.clear();
        self.dirty.clear();
        self.observe(None, trace);
    }
}

/// A commit call in progress: its ops, where it is, and what it wrote.
#[derive(Debug)]
pub struct ActiveCall {
    node: usize,
    conn: u64,
    call: u64,
    ops: Vec<Op>,
    next_op: usize,
    attempt: u32,
    last_retry: String,
    decided: Option<Decided>,
    results: Vec<OpResult>,
    ctx: Ctx,
}

/// What `read_op` saw and decided.
#[derive(Debug)]
struct Decided {
    disk: Option<Item>,
    current: Versioned,
    decision: CommitDecision,
}

#[derive(Debug)]
struct Ctx {
    node: NodeId,
    now_unix: i64,
    /// Journal states written by this request and not yet flushed.
    pending: BTreeMap<RelPath, Versioned>,
    changes: Vec<(RelPath, Versioned)>,
    conflicts: Vec<ConflictRow>,
    /// Files written by this request, by content.
    written: HashMap<ContentHash, RelPath>,
    /// Inline files staged at the start of the request.
    prestaged: Vec<(RelPath, ContentHash)>,
}
