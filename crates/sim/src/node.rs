//! A simulated node with one workspace: its disk, what it persisted
//! (`node.db`: synced tree and `last_seq`), and the in-memory session that
//! a disconnect or crash throws away.
//!
//! A session follows `gm_node::session`: subscribe from the persisted
//! `last_seq`, absorb the catch-up, a full first round, then rounds on
//! journal events (which are absorbed only between rounds), watcher
//! events, follow-ups and released deferred deletions. A round follows
//! `gm_node::reconcile::Replica::round`: the plan comes from the real
//! `gm_core::NodeTrees` (scope, candidates, plan, checkpoint) and is
//! carried out step by step, so other replicas, the network and the user
//! act between any two steps: remote writes parents first (dirs, symlinks,
//! local copies, chmod), downloads (received into staging, then landed),
//! proposals of local writes in batches with up to two calls in flight,
//! remote deletions children first, proposals of deletions, persist.
//! Every landing checks its target against the scan (`Expect`).
//!
//! Does not model: hash caches and racily-clean files, ignore rules,
//! chunked transfers and uploads, the safety brake, epochs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gm_core::{ContentHash, Entry, NodeId, NodeTrees, RelPath, Scope, Seq, Versioned};

use crate::disk::{Disk, DiskError, Expect, Seen};
use crate::net::{Op, OpResult, ToHub, ToNode};
use crate::rng::Rng;
use crate::trace::Trace;

/// How long (in steps) deletions must have been quiet before deferred
/// local deletions are proposed.
pub const DELETE_DELAY: u64 = 40;

type Local = Option<(Entry, Seen)>;

#[derive(Debug, Clone)]
struct ApplyItem {
    path: RelPath,
    target: Versioned,
    local: Local,
}

#[derive(Debug, Clone)]
struct ProposeItem {
    path: RelPath,
    base: Seq,
    local: Local,
}

/// One op of a call: path, base, what was proposed, and the newest synced
/// seq known for it and its parents when it was sent.
type Member = (RelPath, Seq, Local, Seq);

#[derive(Debug, Clone)]
struct Download {
    path: RelPath,
    hash: ContentHash,
    executable: bool,
    expect: Expect,
    target: Versioned,
}

#[derive(Debug)]
struct Proposing {
    queue: Vec<(ProposeItem, bool)>,
    next: Vec<(ProposeItem, bool)>,
    pass: u32,
    start: usize,
    in_flight: VecDeque<(u64, Vec<Member>)>,
    hub_has: BTreeSet<ContentHash>,
}

#[derive(Debug)]
enum Stage {
    ApplyWrites,
    AwaitDownload {
        call: u64,
    },
    /// Received into staging; landing is the next step.
    Staged {
        landed: Vec<(Download, Result<(), String>)>,
    },
    ProposeClearing,
    ProposeWrites,
    ApplyDeletes,
    ProposeDeletes,
    Persist,
}

#[derive(Debug)]
struct Round {
    stage: Stage,
    apply_writes: VecDeque<ApplyItem>,
    downloads: Vec<Download>,
    propose_clearing: Vec<ProposeItem>,
    propose_writes: Vec<ProposeItem>,
    apply_deletes: VecDeque<ApplyItem>,
    propose_deletes: Vec<ProposeItem>,
    proposing: Option<Proposing>,
}

/// Why a session wants a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first, full round after the catch-up.
    First,
    /// Journal events arrived: absorb them all, then a round.
    Journal,
    /// The watcher's debounce ran out.
    Watcher,
    /// The tick found follow-ups.
    FollowUp,
    /// The tick found deferred deletions due.
    Deletions,
    /// The periodic full rescan.
    Rescan,
}

#[derive(Debug)]
pub struct Session {
    pub conn: u64,
    pub caught_up: bool,
    first_round_done: bool,
    pub trees: NodeTrees,
    /// Subscription messages received during the live loop, not yet absorbed.
    pub inbox: VecDeque<ToNode>,
    round: Option<Round>,
    /// Answers that arrived, by call.
    answers: BTreeMap<u64, ToNode>,
    last_deletion: Option<u64>,
    /// Synced records not yet persisted.
    unpersisted: Vec<(RelPath, Versioned)>,
    /// Highest seq received on the stream (seqs must increase).
    last_streamed: Seq,
    /// Staging files of this session's downloads.
    staged: usize,
    /// Persisted landing intents the next persist clears.
    landings_recorded: bool,
    /// Persisted proposals the next persist replaces.
    proposals_recorded: bool,
}

#[derive(Debug)]
pub struct SimNode {
    pub index: usize,
    pub id: NodeId,
    pub disk: Disk,
    /// Persisted (`node.db`).
    pub db_synced: BTreeMap<RelPath, Versioned>,
    pub db_last_seq: Seq,
    /// Persisted landing intents (`NodeDb::record_landings`).
    db_landing: BTreeMap<RelPath, Versioned>,
    /// Persisted proposals in doubt (`NodeDb::record_proposals`).
    db_proposals: BTreeMap<RelPath, Option<Entry>>,
    pub session: Option<Session>,
    /// Proposals a lost connection left unanswered, carried to the next
    /// session (`NodeTrees::in_doubt`; across a crash only the latest version of
    /// each path survives, through the persisted proposals).
    in_doubt: BTreeMap<RelPath, Vec<Option<Entry>>>,
    /// Watcher paths not yet part of a round.
    pub dirty: BTreeSet<RelPath>,
    /// Staging files on disk.
    pub staging: usize,
    next_call: u64,
    /// Highest seq ever agreed per path (a check, not state of the node).
    high_water: BTreeMap<RelPath, Seq>,
    /// Broken promises found while running.
    pub violations: Vec<String>,
}

/// What a step sends to the hub.
pub type Outbox = Vec<ToHub>;

impl SimNode {
    pub fn new(index: usize, id: NodeId) -> SimNode {
        SimNode {
            index,
            id,
            disk: Disk::default(),
            db_synced: BTreeMap::new(),
            db_last_seq: Seq::ZERO,
            db_landing: BTreeMap::new(),
            db_proposals: BTreeMap::new(),
            session: None,
            in_doubt: BTreeMap::new(),
            dirty: BTreeSet::new(),
            staging: 0,
            next_call: 0,
            high_water: BTreeMap::new(),
            violations: Vec::new(),
        }
    }

    /// Moves the disk's change log into the watcher's dirty set.
    pub fn watch(&mut self) {
        for path in self.disk.touched.drain(..) {
            self.dirty.insert(path);
        }
    }

    /// A new session on connection `conn`: the in-memory state starts from
    /// what was persisted; staging left by an earlier run is cleared.
    pub fn start_session(&mut self, conn: u64, out: &mut Outbox) {
        self.staging = 0;
        self.dirty.clear();
        self.disk.touched.clear();
        let mut trees = NodeTrees::new(self.db_synced.clone(), self.db_last_seq);
        trees.in_doubt = std::mem::take(&mut self.in_doubt);
        trees.landed = self.db_landing.clone();
        for (path, entry) in &self.db_proposals {
            trees.sent(path, entry.clone());
        }
        self.session = Some(Session {
            conn,
            caught_up: false,
            first_round_done: false,
            trees,
            inbox: VecDeque::new(),
            round: None,
            answers: BTreeMap::new(),
            last_deletion: None,
            unpersisted: Vec::new(),
            last_streamed: self.db_last_seq,
            staged: 0,
            landings_recorded: false,
            proposals_recorded: !self.db_proposals.is_empty(),
        });
        out.push(ToHub::Subscribe {
            since: self.db_last_seq,
        });
    }

    /// The session ends (connection lost): what the round did so far is
    /// persisted (`Replica::round` on an error), proposals without an
    /// answer stay in doubt for the next session, the rest of the
    /// in-memory state is dropped; downloads in progress drop their
    /// staging files. With `crash`, the process died: nothing more is
    /// persisted and staging stays on disk until the next start.
    pub fn end_session(&mut self, crash: bool, trace: &mut Trace) {
        if !crash && self.session.is_some() {
            self.persist(trace);
        }
        if let Some(session) = self.session.take() {
            if !crash {
                self.in_doubt = session.trees.in_doubt.clone();
            } else {
                self.in_doubt.clear();
            }
            self.check_resumable(&session);
            if !crash {
                self.staging -= session.staged;
            }
        }
        self.dirty.clear();
    }

    /// `last_seq` must never pass a remote change not yet applied: the next
    /// session subscribes from it and would never see that change again.
    fn check_resumable(&mut self, session: &Session) {
        for (path, state) in &session.trees.remote {
            if state.seq <= self.db_last_seq {
                self.violations.push(format!(
                    "{}: persisted last_seq {} passes the pending change {path}@{}",
                    self.id, self.db_last_seq, state.seq
                ));
            }
        }
    }

    /// A message from the hub.
    pub fn receive(&mut self, message: ToNode) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match message {
            ToNode::Changes(changes) => {
                for (path, state) in &changes {
                    if state.seq <= session.last_streamed {
                        self.violations.push(format!(
                            "{}: journal event {path}@{} after {} on the same stream",
                            self.id, state.seq, session.last_streamed
                        ));
                    }
                    session.last_streamed = session.last_streamed.max(state.seq);
                }
                if session.caught_up {
                    session.inbox.push_back(ToNode::Changes(changes));
                } else {
                    for (path, state) in changes {
                        session.trees.absorb(path, state);
                    }
                }
            }
            ToNode::CaughtUp(seq) => {
                if session.caught_up {
                    session.inbox.push_back(ToNode::CaughtUp(seq));
                } else {
                    session.trees.saw_seq(seq);
                    session.caught_up = true;
                }
            }
            ToNode::CommitDone { call, .. } | ToNode::Downloaded { call, .. } => {
                session.answers.insert(call, message);
            }
        }
    }

    /// True while a round runs.
    pub fn in_round(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.round.is_some())
    }

    /// True when the running round can take its next step (not waiting
    /// for an answer).
    pub fn can_step(&self) -> bool {
        let Some(session) = &self.session else {
            return false;
        };
        let Some(round) = &session.round else {
            return false;
        };
        match &round.stage {
            Stage::AwaitDownload { call } => session.answers.contains_key(call),
            Stage::ProposeClearing | Stage::ProposeWrites | Stage::ProposeDeletes => {
                match &round.proposing {
                    Some(p) => match p.in_flight.front() {
                        Some((call, _)) if p.in_flight.len() >= 2 || p.start >= p.queue.len() => {
                            session.answers.contains_key(call)
                        }
                        _ => true,
                    },
                    None => true,
                }
            }
            _ => true,
        }
    }

    /// The rounds this node may start now.
    pub fn triggers(&self, now: u64) -> Vec<Trigger> {
        let Some(session) = &self.session else {
            return Vec::new();
        };
        if !session.caught_up || session.round.is_some() {
            return Vec::new();
        }
        if !session.first_round_done {
            return vec![Trigger::First];
        }
        let mut triggers = Vec::new();
        if !session.inbox.is_empty() {
            triggers.push(Trigger::Journal);
        }
        if !self.dirty.is_empty() {
            triggers.push(Trigger::Watcher);
        }
        if !session.trees.follow_up.is_empty() {
            triggers.push(Trigger::FollowUp);
        }
        if self.deletions_due(now) {
            triggers.push(Trigger::Deletions);
        }
        triggers
    }

    pub fn deletions_due(&self, now: u64) -> bool {
        self.session.as_ref().is_some_and(|s| {
            !s.trees.deferred.is_empty()
                && s.last_deletion.is_none_or(|at| now >= at + DELETE_DELAY)
        })
    }

    /// When deferred deletions become due (for the settling phase).
    pub fn deletions_due_at(&self) -> Option<u64> {
        let session = self.session.as_ref()?;
        if session.trees.deferred.is_empty() {
            return None;
        }
        Some(session.last_deletion.map_or(0, |at| at + DELETE_DELAY))
    }

    /// Starts a round for `trigger`: scan, plan, adopt.
    pub fn start_round(&mut self, trigger: Trigger, now: u64, trace: &mut Trace) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let (scope, release) = match trigger {
            Trigger::First => {
                session.first_round_done = true;
                (Scope::Full, false)
            }
            Trigger::Journal => {
                while let Some(message) = session.inbox.pop_front() {
                    match message {
                        ToNode::Changes(changes) => {
                            for (path, state) in changes {
                                session.trees.absorb(path, state);
                            }
                        }
                        ToNode::CaughtUp(seq) => session.trees.saw_seq(seq),
                        _ => {}
                    }
                }
                (
                    Scope::Subtrees(std::mem::take(&mut self.dirty).into_iter().collect()),
                    false,
                )
            }
            Trigger::Watcher => (
                Scope::Subtrees(std::mem::take(&mut self.dirty).into_iter().collect()),
                false,
            ),
            Trigger::FollowUp => (Scope::Subtrees(Vec::new()), false),
            Trigger::Deletions => (
                Scope::Subtrees(session.trees.deferred.iter().cloned().collect()),
                true,
            ),
            Trigger::Rescan => (Scope::Full, false),
        };
        let full_with_landings = scope == Scope::Full && !session.trees.landed.is_empty();
        let tops = session.trees.tops(scope.clone());
        // The scan: everything on disk under the tops.
        let local: BTreeMap<RelPath, (Entry, Seen)> = self
            .disk
            .items()
            .keys()
            .filter(|path| gm_core::plan::in_scope(tops.as_deref(), path))
            .filter_map(|path| self.disk.seen(path).map(|seen| (path.clone(), seen)))
            .collect();
        let candidates = session
            .trees
            .candidates(tops.as_deref(), local.keys(), |_, _| false);
        let plan = session.trees.plan(
            candidates,
            |path| local.get(path).map(|(entry, _)| entry),
            release,
        );
        if plan.deferred_more {
            session.last_deletion = Some(now);
        }
        if full_with_landings {
            session.trees.landed.clear();
            session.landings_recorded = true;
        }
        // `Replica::apply_writes`: intents are durable before anything lands.
        for (path, target) in &plan.apply_writes {
            self.db_landing.insert(path.clone(), target.clone());
            session.landings_recorded = true;
        }
        trace.line(format!(
            "{} round {trigger:?} {}: adopt {} apply {}+{} propose {}+{}+{} deferred {}",
            self.id,
            match &tops {
                None => "full".to_string(),
                Some(tops) => format!("{tops:?}"),
            },
            plan.adopt.len(),
            plan.apply_writes.len(),
            plan.apply_deletes.len(),
            plan.propose_clearing.len(),
            plan.propose_writes.len(),
            plan.propose_deletes.len(),
            session.trees.deferred.len(),
        ));
        for (path, state) in plan.adopt {
            set_synced(
                session,
                &mut self.high_water,
                &mut self.violations,
                &path,
                state,
            );
        }
        let applies = |list: Vec<(RelPath, Versioned)>| -> VecDeque<ApplyItem> {
            list.into_iter()
                .map(|(path, target)| ApplyItem {
                    local: local.get(&path).cloned(),
                    path,
                    target,
                })
                .collect()
        };
        let proposals = |list: Vec<(RelPath, Seq)>| -> Vec<ProposeItem> {
            list.into_iter()
                .map(|(path, base)| ProposeItem {
                    local: local.get(&path).cloned(),
                    path,
                    base,
                })
                .collect()
        };
        session.round = Some(Round {
            stage: Stage::ApplyWrites,
            apply_writes: applies(plan.apply_writes),
            downloads: Vec::new(),
            propose_clearing: proposals(plan.propose_clearing),
            propose_writes: proposals(plan.propose_writes),
            apply_deletes: applies(plan.apply_deletes),
            propose_deletes: proposals(plan.propose_deletes),
            proposing: None,
        });
    }

    /// One step of the running round. Returns true when the round ended.
    pub fn step(&mut self, rng: &mut Rng, out: &mut Outbox, trace: &mut Trace) -> bool {
        let Some(session) = self.session.as_mut() else {
            return true;
        };
        let Some(mut round) = session.round.take() else {
            return true;
        };
        let done = self.step_round(&mut round, rng, out, trace);
        if let Some(session) = self.session.as_mut()
            && !done
        {
            session.round = Some(round);
        }
        done
    }

    fn step_round(
        &mut self,
        round: &mut Round,
        rng: &mut Rng,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> bool {
        match std::mem::replace(&mut round.stage, Stage::Persist) {
            Stage::ApplyWrites => {
                if let Some(item) = round.apply_writes.pop_front() {
                    if let Some(download) = self.apply_write(item, trace) {
                        round.downloads.push(download);
                    }
                    round.stage = Stage::ApplyWrites;
                } else if !round.downloads.is_empty() {
                    let call = self.call();
                    out.push(ToHub::Download {
                        call,
                        items: round
                            .downloads
                            .iter()
                            .map(|d| (d.path.clone(), d.hash))
                            .collect(),
                    });
                    round.stage = Stage::AwaitDownload { call };
                } else {
                    self.begin_proposing(round, Stage::ProposeClearing);
                }
            }
            Stage::AwaitDownload { call } => {
                let session = self.session.as_mut().expect("a round runs in a session");
                let Some(ToNode::Downloaded { items, .. }) = session.answers.remove(&call) else {
                    round.stage = Stage::AwaitDownload { call };
                    return false;
                };
                let downloads = std::mem::take(&mut round.downloads);
                let mut landed = Vec::new();
                for (download, item) in downloads.into_iter().zip(items) {
                    if item.is_ok() {
                        // Received into a staging file.
                        self.staging += 1;
                        session.staged += 1;
                    }
                    landed.push((download, item.map(|_| ())));
                }
                round.stage = Stage::Staged { landed };
            }
            Stage::Staged { landed } => {
                for (download, received) in landed {
                    let path = download.path.clone();
                    match received {
                        Ok(()) => {
                            self.staging -= 1;
                            if let Some(session) = self.session.as_mut() {
                                session.staged -= 1;
                            }
                            let entry = Entry::File {
                                hash: download.hash,
                                size: download.target.entry.as_ref().map_or(0, |e| match e {
                                    Entry::File { size, .. } => *size,
                                    _ => 0,
                                }),
                                executable: download.executable,
                            };
                            match self.disk.place(&path, entry, download.expect) {
                                Ok(_) => {
                                    trace.line(format!("{} downloaded {path}", self.id));
                                    self.synced(&path, download.target);
                                }
                                Err(err) => self.note_failure(&path, &err, trace),
                            }
                        }
                        Err(why) => {
                            trace.line(format!("{} download {path} unavailable: {why}", self.id));
                            self.follow_up(&path);
                        }
                    }
                }
                self.begin_proposing(round, Stage::ProposeClearing);
            }
            Stage::ProposeClearing => {
                if self.propose_step(round, rng, out, trace) {
                    self.begin_proposing(round, Stage::ProposeWrites);
                } else {
                    round.stage = Stage::ProposeClearing;
                }
            }
            Stage::ProposeWrites => {
                if self.propose_step(round, rng, out, trace) {
                    round.stage = Stage::ApplyDeletes;
                } else {
                    round.stage = Stage::ProposeWrites;
                }
            }
            Stage::ApplyDeletes => {
                if let Some(item) = round.apply_deletes.pop_front() {
                    self.apply_delete(item, trace);
                    round.stage = Stage::ApplyDeletes;
                } else {
                    self.begin_proposing(round, Stage::ProposeDeletes);
                }
            }
            Stage::ProposeDeletes => {
                if self.propose_step(round, rng, out, trace) {
                    round.stage = Stage::Persist;
                } else {
                    round.stage = Stage::ProposeDeletes;
                }
            }
            Stage::Persist => {
                self.persist(trace);
                return true;
            }
        }
        false
    }

    fn call(&mut self) -> u64 {
        self.next_call += 1;
        self.next_call
    }

    fn session(&mut self) -> &mut Session {
        self.session.as_mut().expect("a round runs in a session")
    }

    fn synced(&mut self, path: &RelPath, state: Versioned) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        set_synced(
            session,
            &mut self.high_water,
            &mut self.violations,
            path,
            state,
        );
    }

    fn follow_up(&mut self, path: &RelPath) {
        self.session().trees.follow_up.insert(path.clone());
    }

    fn note_failure(&mut self, path: &RelPath, err: &DiskError, trace: &mut Trace) {
        trace.line(format!("{} could not land {path}: {err:?}", self.id));
        self.follow_up(path);
    }

    /// `Replica::apply_writes` for one item; returns it when it must be
    /// downloaded.
    fn apply_write(&mut self, item: ApplyItem, trace: &mut Trace) -> Option<Download> {
        let target_entry = item.target.entry.clone()?;
        let mut expect = match &item.local {
            Some((_, seen)) => Expect::Unchanged(seen.stamp),
            None => Expect::Absent,
        };
        let kind_changes = item.local.as_ref().is_some_and(|(local, _)| {
            std::mem::discriminant(local) != std::mem::discriminant(&target_entry) || local.is_dir()
        });
        if kind_changes
            && let Some((local_entry, seen)) = &item.local
            && !(local_entry.is_dir() && target_entry.is_dir())
        {
            match self.disk.remove(&item.path, *seen) {
                Ok(()) => expect = Expect::Absent,
                Err(err) => {
                    self.note_failure(&item.path, &err, trace);
                    return None;
                }
            }
        }
        let result = match &target_entry {
            Entry::Dir => self.disk.make_dir(&item.path).map(|_| ()),
            Entry::Symlink { .. } => self
                .disk
                .place(&item.path, target_entry.clone(), expect)
                .map(|_| ()),
            Entry::File {
                hash, executable, ..
            } => {
                if let (Some((Entry::File { hash: here, .. }, seen)), Expect::Unchanged(_)) =
                    (&item.local, expect)
                    && here == hash
                {
                    self.disk
                        .set_executable(&item.path, *executable, seen.stamp)
                        .map(|_| ())
                } else if self.copy_local(&item.path, &target_entry, *hash, expect) {
                    Ok(())
                } else {
                    return Some(Download {
                        path: item.path,
                        hash: *hash,
                        executable: *executable,
                        expect,
                        target: item.target,
                    });
                }
            }
        };
        match result {
            Ok(()) => {
                trace.line(format!(
                    "{} wrote {} = {}",
                    self.id,
                    item.path,
                    crate::show(Some(&target_entry))
                ));
                self.synced(&item.path, item.target);
            }
            Err(err) => self.note_failure(&item.path, &err, trace),
        }
        None
    }

    /// Content already in the workspace (a rename or copy elsewhere):
    /// copied locally, checked against its hash.
    fn copy_local(
        &mut self,
        path: &RelPath,
        entry: &Entry,
        hash: ContentHash,
        expect: Expect,
    ) -> bool {
        let session = self.session.as_ref().expect("a round runs in a session");
        let mut sources: Vec<RelPath> = session
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
            // The hash cache: files scanned with that content.
            sources = self
                .disk
                .items()
                .iter()
                .filter(|(_, item)| item.entry.file_hash() == Some(hash))
                .map(|(p, _)| p.clone())
                .take(4)
                .collect();
        }
        for source in sources {
            if &source == path {
                continue;
            }
            let holds = self
                .disk
                .read_file(&source)
                .is_ok_and(|(e, _)| e.file_hash() == Some(hash));
            if !holds {
                continue;
            }
            if self.disk.place(path, entry.clone(), expect).is_ok() {
                return true;
            }
        }
        false
    }

    /// `Replica::apply_deletes` for one item.
    fn apply_delete(&mut self, item: ApplyItem, trace: &mut Trace) {
        let result = match &item.local {
            Some((_, seen)) => self.disk.remove(&item.path, *seen),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                trace.line(format!("{} removed {}", self.id, item.path));
                self.synced(&item.path, item.target);
            }
            Err(DiskError::NotEmpty(_)) => {
                // New local content inside: it is proposed, and the hub
                // brings the directory back.
                trace.line(format!("{} kept non-empty {}", self.id, item.path));
            }
            Err(err) => self.note_failure(&item.path, &err, trace),
        }
    }

    fn begin_proposing(&mut self, round: &mut Round, stage: Stage) {
        let items = match stage {
            Stage::ProposeClearing => std::mem::take(&mut round.propose_clearing),
            Stage::ProposeWrites => std::mem::take(&mut round.propose_writes),
            _ => std::mem::take(&mut round.propose_deletes),
        };
        // `Replica::propose`: recorded before anything is sent.
        let session = self.session.as_mut().expect("a round runs in a session");
        for item in &items {
            self.db_proposals.insert(
                item.path.clone(),
                item.local.as_ref().map(|(e, _)| e.clone()),
            );
        }
        if !items.is_empty() {
            session.proposals_recorded = true;
        }
        let hub_has: BTreeSet<ContentHash> = session
            .trees
            .synced
            .values()
            .filter_map(|v| v.entry.as_ref().and_then(Entry::file_hash))
            .collect();
        round.proposing = Some(Proposing {
            queue: items.into_iter().map(|i| (i, false)).collect(),
            next: Vec::new(),
            pass: 1,
            start: 0,
            in_flight: VecDeque::new(),
            hub_has,
        });
        round.stage = stage;
    }

    /// `Replica::propose`, one step: send a batch, or take the answer of the
    /// oldest call in flight, or start the next pass. True when done.
    fn propose_step(
        &mut self,
        round: &mut Round,
        rng: &mut Rng,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> bool {
        let Some(mut p) = round.proposing.take() else {
            return true;
        };
        let done = self.propose_inner(&mut p, rng, out, trace);
        if !done {
            round.proposing = Some(p);
        }
        done
    }

    fn propose_inner(
        &mut self,
        p: &mut Proposing,
        rng: &mut Rng,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> bool {
        if let Some((call, _)) = p.in_flight.front()
            && (p.in_flight.len() >= 2 || p.start >= p.queue.len())
        {
            let call = *call;
            let Some(ToNode::CommitDone { results, .. }) = self.session().answers.remove(&call)
            else {
                return false;
            };
            let Some((_, members)) = p.in_flight.pop_front() else {
                return false;
            };
            self.finish_batch(members, results, &mut p.next, trace);
            return false;
        }
        if p.start < p.queue.len() {
            // One batch; its size stands for the byte budget.
            let budget = 1 + rng.below(3);
            let mut ops = Vec::new();
            let mut members = Vec::new();
            let mut index = p.start;
            while index < p.queue.len() && ops.len() < budget {
                let (item, force_inline) = p.queue[index].clone();
                index += 1;
                if let Some((op, local)) = self.make_op(&item, force_inline, &p.hub_has) {
                    ops.push(op);
                    let known = self.session().trees.known_seq(&item.path);
                    self.session()
                        .trees
                        .sent(&item.path, local.as_ref().map(|(e, _)| e.clone()));
                    members.push((item.path.clone(), item.base, local, known));
                }
            }
            p.start = index;
            if !ops.is_empty() {
                let call = self.call();
                trace.line(format!(
                    "{} commit call {call}: {}",
                    self.id,
                    ops.iter()
                        .map(|op| format!(
                            "{}@{}={}",
                            op.path,
                            op.base,
                            crate::show(op.entry.as_ref())
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.push(ToHub::Commit { call, ops });
                p.in_flight.push_back((call, members));
            }
            return false;
        }
        // This pass is over (nothing in flight, nothing left to send).
        p.queue = std::mem::take(&mut p.next);
        p.start = 0;
        if p.queue.is_empty() {
            return true;
        }
        if p.pass >= 3 {
            for (item, _) in std::mem::take(&mut p.queue) {
                self.follow_up(&item.path);
            }
            return true;
        }
        p.pass += 1;
        false
    }

    /// `Replica::make_op`: a small file is read whole when it is sent
    /// inline, and what was read is what is proposed. `None` when it is no
    /// longer a readable file.
    fn make_op(
        &mut self,
        item: &ProposeItem,
        force_inline: bool,
        hub_has: &BTreeSet<ContentHash>,
    ) -> Option<(Op, Local)> {
        let mut local = item.local.clone();
        let mut inline = false;
        if let Some((
            Entry::File {
                hash, executable, ..
            },
            _,
        )) = &local
            && (force_inline || !hub_has.contains(hash))
        {
            match self.disk.read_file(&item.path) {
                Ok((Entry::File { hash, size, .. }, stamp)) => {
                    local = Some((
                        Entry::File {
                            hash,
                            size,
                            executable: *executable,
                        },
                        Seen { dir: false, stamp },
                    ));
                    inline = true;
                }
                _ => {
                    self.follow_up(&item.path);
                    return None;
                }
            }
        }
        let op = Op {
            path: item.path.clone(),
            base: item.base,
            entry: local.as_ref().map(|(e, _)| e.clone()),
            inline,
        };
        Some((op, local))
    }

    /// `Replica::finish_batch`: each answer of one commit call.
    fn finish_batch(
        &mut self,
        members: Vec<Member>,
        results: Vec<OpResult>,
        next: &mut Vec<(ProposeItem, bool)>,
        trace: &mut Trace,
    ) {
        for ((path, base, local, known), result) in members.into_iter().zip(results) {
            self.session().trees.answered(&path);
            match result {
                OpResult::Committed(seq) => {
                    let entry = local.as_ref().map(|(e, _)| e.clone());
                    self.session().trees.refused.remove(&path);
                    self.synced(&path, Versioned { entry, seq });
                }
                OpResult::Conflict { current, copy } => {
                    self.on_conflict(&path, local, current, copy, trace);
                }
                OpResult::NeedContent => {
                    let item = ProposeItem { path, base, local };
                    match &item.local {
                        Some((Entry::File { .. }, _)) => next.push((item, true)),
                        _ => self.follow_up(&item.path),
                    }
                }
                OpResult::Refused(reason) => {
                    trace.line(format!("{} refused {path}: {reason}", self.id));
                    let entry = local.map(|(e, _)| e);
                    self.session().trees.refuse(path, entry, reason, known);
                }
            }
        }
    }

    /// `Replica::on_conflict`: the local version moves to the copy name the
    /// hub chose (a rename), and the hub's version comes next round.
    fn on_conflict(
        &mut self,
        path: &RelPath,
        local: Local,
        current: Versioned,
        copy: Option<(RelPath, Versioned)>,
        trace: &mut Trace,
    ) {
        let expected_after = match copy {
            Some((copy_path, copy_state)) => {
                let Some((entry, seen)) = &local else {
                    self.follow_up(path);
                    return;
                };
                match self.disk.rename_noreplace(path, &copy_path, *seen) {
                    Ok(_) => {
                        trace.line(format!("{} conflict: {path} -> {copy_path}", self.id));
                        self.synced(&copy_path, copy_state);
                        if entry.is_dir() {
                            self.follow_up(&copy_path);
                        }
                        None
                    }
                    Err(err) => {
                        trace.line(format!(
                            "{} conflict copy of {path} not moved: {err:?}",
                            self.id
                        ));
                        self.follow_up(path);
                        return;
                    }
                }
            }
            None => local.map(|(e, _)| e),
        };
        trace.line(format!(
            "{} conflict on {path}: hub keeps {}",
            self.id,
            crate::show(current.entry.as_ref())
        ));
        self.session()
            .trees
            .after_conflict(path, expected_after, current);
    }

    /// `Replica::persist`: the synced records of the round and the
    /// checkpoint, in one transaction.
    fn persist(&mut self, trace: &mut Trace) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let checkpoint = session.trees.checkpoint();
        if std::mem::take(&mut session.landings_recorded) {
            self.db_landing.clear();
        }
        if std::mem::take(&mut session.proposals_recorded) {
            self.db_proposals = session
                .trees
                .in_doubt
                .iter()
                .filter_map(|(path, sent)| sent.last().map(|e| (path.clone(), e.clone())))
                .collect();
        }
        for (path, state) in session.unpersisted.drain(..) {
            self.db_synced.insert(path, state);
        }
        for path in &checkpoint.dropped_tombstones {
            self.db_synced.remove(path);
        }
        if checkpoint.last_seq < self.db_last_seq {
            self.violations.push(format!(
                "{}: last_seq went back from {} to {}",
                self.id, self.db_last_seq, checkpoint.last_seq
            ));
        }
        self.db_last_seq = checkpoint.last_seq;
        if let Some(session) = self.session.take() {
            self.check_resumable(&session);
            self.session = Some(session);
        }
        trace.line(format!(
            "{} persisted last_seq {}",
            self.id, checkpoint.last_seq
        ));
    }
}

/// Records an agreed version, checking that a path's agreed version never
/// goes back to an older seq (a late journal event must never undo a newer
/// state, e.g. resurrect a deletion).
fn set_synced(
    session: &mut Session,
    high_water: &mut BTreeMap<RelPath, Seq>,
    violations: &mut Vec<String>,
    path: &RelPath,
    state: Versioned,
) {
    let high = high_water.entry(path.clone()).or_insert(Seq::ZERO);
    if state.seq < *high {
        violations.push(format!(
            "{path}: agreed version went back from seq {} to {}",
            *high, state.seq
        ));
    }
    *high = (*high).max(state.seq);
    session.trees.set_synced(path, state.clone());
    session.unpersisted.push((path.clone(), state));
}
