//! A node's three trees of one workspace, the bookkeeping it carries from
//! one round to the next, and the plan of a round.
//!
//! Owns: absorbing journal events into the remote tree, choosing the paths
//! a round looks at, turning synced / local / remote (+ the `force` entries
//! left by conflicts, deferred deletions and refused versions) into lists
//! of adoptions, disk writes and proposals, and the checkpoint (`last_seq`
//! and which tombstones may go) the node persists.
//!
//! Does not own: any IO. The node (`gm_node::reconcile`) scans the disk,
//! carries out the plan and persists the checkpoint; the simulation
//! (`gm_sim`) does the same against a modelled filesystem. Both call the
//! functions here, so they take the same decisions.
//!
//! Invariants kept here:
//! - a local change is never planned to be overwritten (`decide_node`);
//! - `last_seq` never passes a remote change not yet in the synced tree;
//! - a deletion stays in the synced tree as a tombstone until every older
//!   journal event has been absorbed, so a late event cannot resurrect it;
//! - plans write parents before children, delete children before parents.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::entry::{Entry, Seq, Versioned};
use crate::path::{RelPath, minimal_tops};
use crate::reconcile::{NodeAction, decide_node};

/// Which paths a round looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Full,
    /// These subtrees (plus every pending remote change and follow-up).
    Subtrees(Vec<RelPath>),
}

/// Cuts a full round over a large tree into slices of whole top-level
/// subtrees: `sizes` holds each top-level name with the entries it holds;
/// consecutive tops are grouped while their sum stays within `limit` (a
/// top larger than `limit` is a slice by itself). Every top is in exactly
/// one slice, in the order given. `None` when the whole tree fits in one
/// slice.
pub fn slice_tops(sizes: Vec<(RelPath, u64)>, limit: u64) -> Option<Vec<Vec<RelPath>>> {
    if sizes.iter().map(|(_, n)| n).sum::<u64>() <= limit {
        return None;
    }
    let mut slices: Vec<Vec<RelPath>> = Vec::new();
    let mut current: Vec<RelPath> = Vec::new();
    let mut weight = 0u64;
    for (top, size) in sizes {
        if !current.is_empty() && weight + size > limit {
            slices.push(std::mem::take(&mut current));
            weight = 0;
        }
        current.push(top);
        weight += size;
    }
    if !current.is_empty() {
        slices.push(current);
    }
    Some(slices)
}

/// After a conflict: what the disk should hold at the path once the local
/// version moved away (`expected`), and the hub's version to put there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    pub expected: Option<Entry>,
    pub target: Versioned,
}

/// A local version the hub refused; not proposed again until it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub entry: Option<Entry>,
    pub reason: String,
}

/// What one round does, in the order the node carries it out: adoptions,
/// then writes of remote versions, proposals of the deletions that clear a
/// directory the disk now holds as a file or symlink, proposals of local
/// writes, remote deletions, proposals of local deletions (new content
/// lands before old content leaves, so a rename finds its bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The disk already holds these remote versions: record them as synced.
    pub adopt: Vec<(RelPath, Versioned)>,
    /// Remote versions to write over unchanged local paths, parents first.
    pub apply_writes: Vec<(RelPath, Versioned)>,
    /// Remote deletions of unchanged local paths, children first.
    pub apply_deletes: Vec<(RelPath, Versioned)>,
    /// Local deletions below a directory that the disk now holds as a
    /// file or symlink (`rm -rf d; echo > d`), children first. They go
    /// before `propose_writes` and do not wait for the delete delay: the
    /// hub replaces a directory only once it has no children left, and
    /// would otherwise keep the directory and make the file a conflict
    /// copy although nobody else changed anything.
    pub propose_clearing: Vec<(RelPath, Seq)>,
    /// Local versions to propose with their base seq, parents first.
    pub propose_writes: Vec<(RelPath, Seq)>,
    /// Local deletions to propose with their base seq, children first.
    pub propose_deletes: Vec<(RelPath, Seq)>,
    /// A local deletion started waiting in this round: the delete delay
    /// starts again.
    pub deferred_more: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.adopt.is_empty()
            && self.apply_writes.is_empty()
            && self.apply_deletes.is_empty()
            && self.propose_clearing.is_empty()
            && self.propose_writes.is_empty()
            && self.propose_deletes.is_empty()
    }
}

/// What the node persists after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The highest seq below every remote change still pending.
    pub last_seq: Seq,
    /// Tombstones no journal event can contradict any more: dropped from
    /// the synced tree.
    pub dropped_tombstones: Vec<RelPath>,
}

/// True when `path` is one of `tops` or under one (`None`: everything).
pub fn in_scope(tops: Option<&[RelPath]>, path: &RelPath) -> bool {
    match tops {
        None => true,
        Some(tops) => tops.iter().any(|t| t == path || t.is_ancestor_of(path)),
    }
}

/// The entries of `tree` in scope of `tops`, top by top; a subtree
/// round reads only the ranges under its tops (a live edit's round over a
/// 200,000-entry tree reads a handful), not the whole tree.
fn in_scope_of<'m, V>(
    tree: &'m BTreeMap<RelPath, V>,
    tops: Option<&'m [RelPath]>,
) -> Box<dyn Iterator<Item = (&'m RelPath, &'m V)> + 'm> {
    match tops {
        None => Box::new(tree.iter()),
        // Every path that starts with a top's name (its subtree among
        // them) is one contiguous range in path order.
        Some(tops) => Box::new(tops.iter().flat_map(move |top| {
            tree.range::<RelPath, _>((Bound::Included(top), Bound::Unbounded))
                .take_while(move |(path, _)| path.as_str().starts_with(top.as_str()))
                .filter(move |(path, _)| *path == top || top.is_ancestor_of(path))
        })),
    }
}

/// Looks up keys of a map in ascending order: a few steps forward from the
/// last key found when the next key is near (a full round asks for nearly
/// every key), a fresh search when it is not (a round over a few paths).
struct SortedCursor<'m, V> {
    map: &'m BTreeMap<RelPath, V>,
    ahead: std::iter::Peekable<std::collections::btree_map::Range<'m, RelPath, V>>,
}

impl<'m, V> SortedCursor<'m, V> {
    /// Steps forward before a fresh search.
    const STEPS: usize = 8;

    fn new(map: &'m BTreeMap<RelPath, V>) -> Self {
        SortedCursor {
            map,
            ahead: map.range::<RelPath, _>(..).peekable(),
        }
    }

    /// The value at `key`; keys must come in ascending order.
    fn get(&mut self, key: &RelPath) -> Option<&'m V> {
        for _ in 0..Self::STEPS {
            match self.ahead.peek() {
                Some((at, _)) if *at < key => {
                    self.ahead.next();
                }
                Some((at, value)) if *at == key => return Some(*value),
                _ => return None,
            }
        }
        self.ahead = self
            .map
            .range::<RelPath, _>((Bound::Included(key), Bound::Unbounded))
            .peekable();
        match self.ahead.peek() {
            Some((at, value)) if *at == key => Some(*value),
            _ => None,
        }
    }
}

/// One workspace on a node: the synced tree (merge base, persisted), the
/// remote tree (journal changes not yet synced) and the bookkeeping between
/// rounds. Only `synced` and the checkpoint's `last_seq` survive a restart.
#[derive(Debug, Clone, Default)]
pub struct NodeTrees {
    pub synced: BTreeMap<RelPath, Versioned>,
    pub remote: BTreeMap<RelPath, Versioned>,
    /// Highest journal seq received from the hub.
    pub highest_seen: Seq,
    /// After a conflict: the hub's version to write once the local version
    /// moved to its conflict copy.
    pub force: BTreeMap<RelPath, Forced>,
    /// Local versions the hub refused.
    pub refused: BTreeMap<RelPath, Refused>,
    /// Paths to look at again in the next round.
    pub follow_up: BTreeSet<RelPath>,
    /// Local deletions held back until deleting has been quiet for the
    /// node's delete delay (the node keeps the clock).
    pub deferred: BTreeSet<RelPath>,
    /// Versions proposed whose answer never came (the call was cut off):
    /// the hub may have committed them. Unlike the rest of the session's
    /// bookkeeping this outlives a reconnect (the node carries it to the
    /// next session, and `node.db`'s proposal rows keep the latest version
    /// of each path across a crash). When the journal then shows one of
    /// them at its path, it is the node's own commit: adopted as the
    /// synced base instead of being taken for a concurrent change (which
    /// made a later local edit a conflict copy, and brought back a path
    /// deleted meanwhile; found by the network-fault test).
    pub in_doubt: BTreeMap<RelPath, Vec<Option<Entry>>>,
    /// Remote versions an earlier run was writing to disk when it died,
    /// before it persisted them (the node's landing intents). Where the
    /// disk holds one of them, it is the synced base: otherwise the next
    /// round took it for a local change, proposed it against the hub's
    /// newer version (a conflict copy) or over the hub's deletion (the
    /// path came back). Found by the crash and offline tests.
    pub landed: BTreeMap<RelPath, Versioned>,
}

/// In-doubt versions kept per path (the newest).
const IN_DOUBT_PER_PATH: usize = 4;
/// In-doubt paths kept in all; beyond this the oldest guesses are dropped
/// (a lost one only costs a conflict copy, as before).
const IN_DOUBT_PATHS: usize = 100_000;

impl NodeTrees {
    /// The state a session starts from: the persisted synced tree and
    /// `last_seq`.
    pub fn new(synced: BTreeMap<RelPath, Versioned>, last_seq: Seq) -> NodeTrees {
        NodeTrees {
            synced,
            highest_seen: last_seq,
            ..NodeTrees::default()
        }
    }

    /// Takes one journal change from the subscription. Changes at or below
    /// the path's synced seq, and older than one already pending, are
    /// dropped.
    pub fn absorb(&mut self, path: RelPath, state: Versioned) {
        self.highest_seen = self.highest_seen.max(state.seq);
        let synced_seq = self.synced.get(&path).map_or(Seq::ZERO, |s| s.seq);
        if state.seq <= synced_seq {
            return;
        }
        match self.remote.get(&path) {
            Some(existing) if existing.seq >= state.seq => {}
            _ => {
                // The hub's version changed: refusals that may depend on it
                // (of this path, or below it) are void.
                self.retry_refused(&path, true);
                self.remote.insert(path, state);
            }
        }
    }

    /// Forgets the refusals of `path` (when `itself`) and below it, and
    /// looks at those paths again.
    fn retry_refused(&mut self, path: &RelPath, itself: bool) {
        if self.refused.is_empty() {
            return;
        }
        let retry: Vec<RelPath> = self
            .refused
            .keys()
            .filter(|refused| (itself && *refused == path) || path.is_ancestor_of(refused))
            .cloned()
            .collect();
        for refused in retry {
            self.refused.remove(&refused);
            self.follow_up.insert(refused);
        }
    }

    /// A proposal of `entry` at `path` is being sent: in doubt until its
    /// answer comes.
    pub fn sent(&mut self, path: &RelPath, entry: Option<Entry>) {
        if self.in_doubt.len() >= IN_DOUBT_PATHS && !self.in_doubt.contains_key(path) {
            self.in_doubt.clear();
        }
        let versions = self.in_doubt.entry(path.clone()).or_default();
        if !versions.contains(&entry) {
            if versions.len() >= IN_DOUBT_PER_PATH {
                versions.remove(0);
            }
            versions.push(entry);
        }
    }

    /// The hub answered a proposal at `path` (committed, conflict, refused,
    /// needs content): nothing sent there is in doubt any more; the hub's
    /// state there is known from the answer or the journal.
    pub fn answered(&mut self, path: &RelPath) {
        self.in_doubt.remove(path);
    }

    pub fn saw_seq(&mut self, seq: Seq) {
        self.highest_seen = self.highest_seen.max(seq);
    }

    /// True when nothing is pending on either side.
    pub fn settled(&self) -> bool {
        self.remote.is_empty()
            && self.force.is_empty()
            && self.follow_up.is_empty()
            && self.deferred.is_empty()
    }

    /// Live entries in the synced tree.
    pub fn live_synced(&self) -> usize {
        self.synced.values().filter(|v| v.entry.is_some()).count()
    }

    /// Records the agreed version of a path (a deletion stays as a
    /// tombstone until `checkpoint` finds it settled). When the path is now
    /// an agreed directory, versions refused below it (the hub may have
    /// refused them because the directory was not there yet, or was not a
    /// directory) are looked at again.
    pub fn set_synced(&mut self, path: &RelPath, state: Versioned) {
        if self.remote.get(path).is_some_and(|r| r.seq <= state.seq) {
            self.remote.remove(path);
        }
        if state.entry.as_ref().is_some_and(Entry::is_dir) {
            self.retry_refused(path, false);
        }
        self.synced.insert(path.clone(), state);
    }

    /// The newest seq the node knows for `path` and its ancestors, synced
    /// or pending. A proposal carries it from when it was sent, so that a
    /// refusal can tell whether the hub's state there changed meanwhile
    /// (see `refuse`).
    pub fn known_seq(&self, path: &RelPath) -> Seq {
        let mut known = Seq::ZERO;
        for at in path.ancestors().iter().chain(std::iter::once(path)) {
            for tree in [&self.synced, &self.remote] {
                if let Some(state) = tree.get(at) {
                    known = known.max(state.seq);
                }
            }
        }
        known
    }

    /// The hub refused `entry` at `path`. It is not proposed again until it
    /// changes, or until the hub's version of the path or of a parent
    /// changes (a refusal such as "parent is not a directory" is about the
    /// hub's state, which moves on). If that state already moved since the
    /// proposal was sent (`known_seq_sent`) — two calls in flight reach the
    /// hub in either order — the path is looked at again at once.
    pub fn refuse(
        &mut self,
        path: RelPath,
        entry: Option<Entry>,
        reason: String,
        known_seq_sent: Seq,
    ) {
        if self.known_seq(&path) > known_seq_sent {
            self.follow_up.insert(path);
            return;
        }
        self.refused.insert(path, Refused { entry, reason });
    }

    /// The hub kept `current` at `path`; the disk should hold `expected`
    /// there once the local version moved to its conflict copy (or stayed,
    /// when nothing was copied). The next round writes `current`.
    pub fn after_conflict(&mut self, path: &RelPath, expected: Option<Entry>, current: Versioned) {
        self.force.insert(
            path.clone(),
            Forced {
                expected,
                target: current,
            },
        );
        self.follow_up.insert(path.clone());
    }

    /// The subtrees a round scans (`None`: the whole workspace). A full
    /// round clears the follow-ups; a partial one takes them, with every
    /// pending remote change and forced path.
    pub fn tops(&mut self, scope: Scope) -> Option<Vec<RelPath>> {
        match scope {
            Scope::Full => {
                self.follow_up.clear();
                None
            }
            Scope::Subtrees(mut paths) => {
                paths.extend(self.remote.keys().cloned());
                paths.extend(self.force.keys().cloned());
                paths.extend(std::mem::take(&mut self.follow_up));
                Some(minimal_tops(paths))
            }
        }
    }

    /// The paths a round plans: everything the scan found, and every
    /// synced, remote, forced or refused path in scope. Remote changes to ignored
    /// paths (`ignored`) are consumed without being applied. A subtree
    /// round reads only the parts of the trees under its tops.
    pub fn candidates<'a>(
        &mut self,
        tops: Option<&[RelPath]>,
        local: impl IntoIterator<Item = &'a RelPath>,
        ignored: impl Fn(&RelPath, &Versioned) -> bool,
    ) -> BTreeSet<RelPath> {
        self.remote
            .retain(|path, state| !(in_scope(tops, path) && ignored(path, state)));
        // Sorted runs, concatenated: the set is built by one merge of the
        // runs, not by a lookup per path.
        let mut paths: Vec<RelPath> = local.into_iter().cloned().collect();
        for tree in [&self.synced, &self.remote] {
            paths.extend(
                in_scope_of(tree, tops)
                    .filter(|(p, v)| !ignored(p, v))
                    .map(|(p, _)| p.clone()),
            );
        }
        paths.extend(in_scope_of(&self.force, tops).map(|(p, _)| p.clone()));
        // A refused version that is gone from the disk is forgotten when
        // its path is planned again (and proposed again if it comes back).
        paths.extend(in_scope_of(&self.refused, tops).map(|(p, _)| p.clone()));
        paths.into_iter().collect()
    }

    /// Plans one round over `candidates`; `local` is what the scan found
    /// at a path. Local deletions are proposed only with `release_deletes`;
    /// otherwise they wait in `deferred`. Updates the bookkeeping (forced
    /// paths used up, stale remote changes, deferrals, refusals that no
    /// longer apply) but not the synced tree: the caller records adoptions
    /// and landed changes with `set_synced`.
    pub fn plan<'a>(
        &mut self,
        candidates: BTreeSet<RelPath>,
        local: impl Fn(&RelPath) -> Option<&'a Entry>,
        release_deletes: bool,
    ) -> Plan {
        let mut plan = Plan::default();
        // Each candidate with what the disk holds there and its synced
        // version: one pass, the synced tree walked in step with the
        // candidates (both in path order) rather than searched per path.
        let mut synced_at = SortedCursor::new(&self.synced);
        let rows: Vec<(RelPath, Option<&'a Entry>, Option<&Versioned>)> = candidates
            .into_iter()
            .map(|path| {
                let here = local(&path);
                let synced = synced_at.get(&path);
                (path, here, synced)
            })
            .collect();
        // Directories with new or changed entries below them on disk. (A
        // round that plans a directory scanned its whole subtree, so these
        // entries are among the candidates.) Only a remote change can ask.
        let changed_below: BTreeSet<RelPath> = if self.remote.is_empty() {
            BTreeSet::new()
        } else {
            rows.iter()
                .filter(|(_, here, synced)| {
                    here.is_some() && *here != synced.and_then(|b| b.entry.as_ref())
                })
                .flat_map(|(path, _, _)| path.ancestors())
                .collect()
        };
        // Agreed directories the disk now holds as a file or symlink.
        let retyped: BTreeSet<RelPath> = rows
            .iter()
            .filter(|(_, here, synced)| {
                here.is_some_and(|here| !here.is_dir())
                    && synced.is_some_and(|base| base.entry.as_ref().is_some_and(Entry::is_dir))
            })
            .map(|(path, _, _)| path.clone())
            .collect();
        for (path, here, synced) in rows {
            if let Some(forced) = self.force.remove(&path)
                && here == forced.expected.as_ref()
            {
                if here != forced.target.entry.as_ref() {
                    if forced.target.entry.is_some() {
                        plan.apply_writes.push((path, forced.target));
                    } else {
                        plan.apply_deletes.push((path, forced.target));
                    }
                } else {
                    plan.adopt.push((path, forced.target));
                }
                continue;
            }
            // The journal shows a version this node sent without hearing
            // the answer: its own commit, the base of what is on disk now.
            let synced_seq = synced.map_or(Seq::ZERO, |b| b.seq);
            let own = {
                let base_seq = synced_seq;
                self.remote
                    .get(&path)
                    .filter(|r| r.seq > base_seq)
                    .filter(|r| {
                        self.in_doubt
                            .get(&path)
                            .is_some_and(|sent| sent.contains(&r.entry))
                    })
                    .cloned()
            };
            // Or the disk holds what an earlier run landed without
            // recording it.
            let own = own.or_else(|| {
                self.landed
                    .remove(&path)
                    .filter(|l| l.seq > synced_seq && l.entry.as_ref() == here)
            });
            if let Some(own) = &own {
                self.in_doubt.remove(&path);
                plan.adopt.push((path.clone(), own.clone()));
            }
            let base = own.as_ref().or(synced);
            let base_entry = base.and_then(|b| b.entry.as_ref());
            let base_seq = base.map_or(Seq::ZERO, |b| b.seq);
            let remote = self.remote.get(&path).filter(|r| r.seq > base_seq).cloned();
            let mut action =
                decide_node(base_entry, here, remote.as_ref().map(|r| r.entry.as_ref()));
            // A remote file or symlink would replace a local directory that
            // holds new or changed entries. They could never be proposed
            // under a path that is no longer a directory on the hub, so the
            // directory counts as changed here: proposed against the hub's
            // version, it becomes a conflict copy that keeps its content.
            if action == NodeAction::ApplyRemote
                && here.is_some_and(Entry::is_dir)
                && remote
                    .as_ref()
                    .is_some_and(|r| r.entry.as_ref().is_some_and(|e| !e.is_dir()))
                && changed_below.contains(&path)
            {
                action = NodeAction::Propose;
            }
            let deletes_base = base_entry.is_some();
            if remote.is_none() {
                self.remote.remove(&path);
            }
            if here.is_some() || action != NodeAction::Propose {
                self.deferred.remove(&path);
            }
            match action {
                NodeAction::Nothing => {
                    self.refused.remove(&path);
                }
                NodeAction::AdoptRemote => {
                    if let Some(remote) = remote {
                        plan.adopt.push((path, remote));
                    }
                }
                NodeAction::ApplyRemote => {
                    if let Some(target) = remote {
                        if target.entry.is_some() {
                            plan.apply_writes.push((path, target));
                        } else {
                            plan.apply_deletes.push((path, target));
                        }
                    }
                }
                NodeAction::Propose => {
                    if self
                        .refused
                        .get(&path)
                        .is_some_and(|refused| refused.entry.as_ref() == here)
                    {
                        continue;
                    }
                    let clearing = here.is_none()
                        && deletes_base
                        && path.ancestors().iter().any(|a| retyped.contains(a));
                    if here.is_none() && deletes_base && !release_deletes && !clearing {
                        if self.deferred.insert(path) {
                            plan.deferred_more = true;
                        }
                        continue;
                    }
                    self.deferred.remove(&path);
                    if clearing {
                        plan.propose_clearing.push((path, base_seq));
                    } else if here.is_some() {
                        plan.propose_writes.push((path, base_seq));
                    } else {
                        plan.propose_deletes.push((path, base_seq));
                    }
                }
            }
        }
        // Candidates come in path order (parents first); deletions go
        // children first.
        plan.apply_deletes.reverse();
        plan.propose_clearing.reverse();
        plan.propose_deletes.reverse();
        plan
    }

    /// What to persist after a round: the highest seq below every pending
    /// remote change, and the tombstones at or below it, which are dropped
    /// from the synced tree here.
    pub fn checkpoint(&mut self) -> Checkpoint {
        let pending_floor = self.remote.values().map(|v| v.seq).min();
        let last_seq = match pending_floor {
            Some(floor) => Seq(floor.0.saturating_sub(1)).min(self.highest_seen),
            None => self.highest_seen,
        };
        let dropped_tombstones: Vec<RelPath> = self
            .synced
            .iter()
            .filter(|(_, v)| v.entry.is_none() && v.seq <= last_seq)
            .map(|(p, _)| p.clone())
            .collect();
        for path in &dropped_tombstones {
            self.synced.remove(path);
        }
        Checkpoint {
            last_seq,
            dropped_tombstones,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use proptest::prelude::*;

    fn p(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    fn file(content: &str) -> Entry {
        Entry::File {
            hash: ContentHash::of(content.as_bytes()),
            size: content.len() as u64,
            executable: false,
        }
    }

    fn at(entry: Option<Entry>, seq: u64) -> Versioned {
        Versioned {
            entry,
            seq: Seq(seq),
        }
    }

    fn make(
        synced: &[(&str, Option<Entry>, u64)],
        remote: &[(&str, Option<Entry>, u64)],
    ) -> NodeTrees {
        let mut trees = NodeTrees::new(
            synced
                .iter()
                .map(|(path, entry, seq)| (p(path), at(entry.clone(), *seq)))
                .collect(),
            Seq(0),
        );
        for (path, entry, seq) in remote {
            trees.absorb(p(path), at(entry.clone(), *seq));
        }
        trees
    }

    /// Plans a full round with `local` on disk.
    fn plan_full(trees: &mut NodeTrees, local: &[(&str, Entry)], release: bool) -> Plan {
        let local: BTreeMap<RelPath, Entry> =
            local.iter().map(|(path, e)| (p(path), e.clone())).collect();
        let tops = trees.tops(Scope::Full);
        let candidates = trees.candidates(tops.as_deref(), local.keys(), |_, _| false);
        trees.plan(candidates, |path| local.get(path), release)
    }

    fn names<T>(list: &[(RelPath, T)]) -> Vec<&str> {
        list.iter().map(|(path, _)| path.as_str()).collect()
    }

    #[test]
    fn unchanged_paths_plan_nothing_and_forget_refusals() {
        let mut trees = make(&[("a", Some(file("1")), 1)], &[]);
        trees.refused.insert(
            p("a"),
            Refused {
                entry: Some(file("2")),
                reason: "no".into(),
            },
        );
        let plan = plan_full(&mut trees, &[("a", file("1"))], false);
        assert!(plan.is_empty(), "{plan:?}");
        assert!(trees.refused.is_empty());
    }

    /// A commit the hub applied but whose answer was lost (the connection
    /// was cut), then the user changed or deleted the file: the journal's
    /// version is the node's own and becomes the base, so the change is
    /// proposed against it (no conflict copy) and a deletion is proposed
    /// (not undone by writing the journal's version back). Found by the
    /// network-fault test.
    #[test]
    fn a_lost_answer_is_no_conflict_and_resurrects_nothing() {
        // Changed again after the lost answer.
        let mut trees = make(&[("a", Some(file("0")), 3)], &[]);
        trees.sent(&p("a"), Some(file("1")));
        trees.absorb(p("a"), at(Some(file("1")), 9));
        let plan = plan_full(&mut trees, &[("a", file("2"))], true);
        assert_eq!(plan.adopt, vec![(p("a"), at(Some(file("1")), 9))]);
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq(9))]);
        assert!(trees.in_doubt.is_empty());

        // Created, answer lost, deleted meanwhile.
        let mut trees = make(&[], &[]);
        trees.sent(&p("b"), Some(file("1")));
        trees.absorb(p("b"), at(Some(file("1")), 5));
        let plan = plan_full(&mut trees, &[], true);
        assert!(plan.apply_writes.is_empty(), "{plan:?}");
        assert_eq!(plan.adopt, vec![(p("b"), at(Some(file("1")), 5))]);
        assert_eq!(plan.propose_deletes, vec![(p("b"), Seq(5))]);

        // A deletion whose answer was lost, then the path made again.
        let mut trees = make(&[("c", Some(file("0")), 2)], &[]);
        trees.sent(&p("c"), None);
        trees.absorb(p("c"), at(None, 7));
        let plan = plan_full(&mut trees, &[("c", file("3"))], true);
        assert_eq!(plan.propose_writes, vec![(p("c"), Seq(7))]);
    }

    /// A run died after landing remote versions and before recording
    /// them; the hub then changed one and deleted another. Where the disk
    /// holds the landed version it is the base: the hub's change applies,
    /// the deletion applies. Where the disk holds something else, that is
    /// a local change as before.
    #[test]
    fn versions_landed_by_a_dead_run_are_the_base() {
        let mut trees = make(
            &[],
            &[
                ("a", Some(file("2")), 8),
                ("b", None, 9),
                ("c", Some(file("2")), 10),
            ],
        );
        trees.landed = BTreeMap::from([
            (p("a"), at(Some(file("1")), 4)),
            (p("b"), at(Some(file("1")), 5)),
            (p("c"), at(Some(file("1")), 6)),
        ]);
        let plan = plan_full(
            &mut trees,
            &[("a", file("1")), ("b", file("1")), ("c", file("mine"))],
            true,
        );
        assert_eq!(names(&plan.adopt), vec!["a", "b"]);
        assert_eq!(names(&plan.apply_writes), vec!["a"]);
        assert_eq!(names(&plan.apply_deletes), vec!["b"]);
        assert_eq!(plan.propose_writes, vec![(p("c"), Seq::ZERO)]);
        assert!(trees.landed.is_empty());
    }

    /// In doubt is no licence: a version the node never sent, or one
    /// whose answer came, is a concurrent change as before.
    #[test]
    fn only_unanswered_versions_count_as_own() {
        let mut trees = make(&[("a", Some(file("0")), 3)], &[]);
        trees.sent(&p("a"), Some(file("1")));
        trees.absorb(p("a"), at(Some(file("other")), 9));
        let plan = plan_full(&mut trees, &[("a", file("2"))], true);
        assert!(plan.adopt.is_empty());
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq(3))], "{plan:?}");

        let mut trees = make(&[("a", Some(file("0")), 3)], &[]);
        trees.sent(&p("a"), Some(file("1")));
        trees.answered(&p("a"));
        trees.absorb(p("a"), at(Some(file("1")), 9));
        let plan = plan_full(&mut trees, &[("a", file("2"))], true);
        assert!(plan.adopt.is_empty());
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq(3))], "{plan:?}");
    }

    #[test]
    fn local_changes_are_proposed_with_their_base() {
        let mut trees = make(&[("a", Some(file("1")), 4)], &[]);
        let plan = plan_full(&mut trees, &[("a", file("2")), ("b", Entry::Dir)], false);
        assert_eq!(
            plan.propose_writes,
            vec![(p("a"), Seq(4)), (p("b"), Seq::ZERO)]
        );
    }

    #[test]
    fn local_deletions_wait_until_released() {
        let mut trees = make(
            &[("d", Some(Entry::Dir), 1), ("d/x", Some(file("1")), 2)],
            &[],
        );
        let first = plan_full(&mut trees, &[], false);
        assert!(first.propose_deletes.is_empty());
        assert!(first.deferred_more);
        assert_eq!(trees.deferred.len(), 2);
        // Seen again while still waiting: the delay does not restart.
        let again = plan_full(&mut trees, &[], false);
        assert!(!again.deferred_more);
        let released = plan_full(&mut trees, &[], true);
        assert_eq!(
            released.propose_deletes,
            vec![(p("d/x"), Seq(2)), (p("d"), Seq(1))],
            "children first"
        );
        assert!(trees.deferred.is_empty());
    }

    #[test]
    fn a_deferred_deletion_that_comes_back_is_forgotten() {
        let mut trees = make(&[("a", Some(file("1")), 1)], &[]);
        plan_full(&mut trees, &[], false);
        assert_eq!(trees.deferred.len(), 1);
        let plan = plan_full(&mut trees, &[("a", file("1"))], false);
        assert!(plan.is_empty());
        assert!(trees.deferred.is_empty());
    }

    #[test]
    fn remote_changes_apply_parents_first_and_delete_children_first() {
        let mut trees = make(
            &[("old", Some(Entry::Dir), 1), ("old/x", Some(file("x")), 2)],
            &[
                ("new", Some(Entry::Dir), 5),
                ("new/y", Some(file("y")), 6),
                ("old/x", None, 7),
                ("old", None, 8),
            ],
        );
        let plan = plan_full(
            &mut trees,
            &[("old", Entry::Dir), ("old/x", file("x"))],
            false,
        );
        assert_eq!(names(&plan.apply_writes), ["new", "new/y"]);
        assert_eq!(names(&plan.apply_deletes), ["old/x", "old"]);
        assert!(plan.propose_writes.is_empty() && plan.propose_deletes.is_empty());
    }

    #[test]
    fn disk_that_already_holds_the_remote_version_is_adopted() {
        let mut trees = make(&[("a", Some(file("1")), 1)], &[("a", Some(file("2")), 3)]);
        let plan = plan_full(&mut trees, &[("a", file("2"))], false);
        assert_eq!(plan.adopt, vec![(p("a"), at(Some(file("2")), 3))]);
    }

    #[test]
    fn a_local_change_against_a_remote_change_is_proposed_not_overwritten() {
        let mut trees = make(&[("a", Some(file("1")), 1)], &[("a", Some(file("2")), 3)]);
        let plan = plan_full(&mut trees, &[("a", file("3"))], false);
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq(1))]);
        assert!(plan.apply_writes.is_empty());
        // The remote change stays pending for the round after the conflict.
        assert!(trees.remote.contains_key(&p("a")));
    }

    #[test]
    fn stale_remote_changes_are_dropped() {
        let mut trees = make(&[], &[("a", Some(file("2")), 3)]);
        trees.synced.insert(p("a"), at(Some(file("2")), 3));
        let plan = plan_full(&mut trees, &[("a", file("2"))], false);
        assert!(plan.is_empty());
        assert!(trees.remote.is_empty());
    }

    #[test]
    fn forced_versions_land_only_over_what_the_conflict_left() {
        // The local version moved to its copy: the path is empty, as expected.
        let mut trees = make(&[("a", Some(file("1")), 1)], &[]);
        trees.after_conflict(&p("a"), None, at(Some(file("2")), 4));
        let plan = plan_full(&mut trees, &[], false);
        assert_eq!(plan.apply_writes, vec![(p("a"), at(Some(file("2")), 4))]);
        assert!(trees.force.is_empty());
        // Changed again before the forced write: decided as usual (proposed).
        let mut trees = trees_with_force();
        let plan = plan_full(&mut trees, &[("a", file("9"))], false);
        assert!(plan.apply_writes.is_empty());
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq(1))]);
        assert!(trees.force.is_empty());
        // Modify beat our delete: the hub's version comes back.
        let mut trees = trees_with_force();
        trees.force.insert(
            p("a"),
            Forced {
                expected: None,
                target: at(Some(file("2")), 4),
            },
        );
        let plan = plan_full(&mut trees, &[], false);
        assert_eq!(names(&plan.apply_writes), ["a"]);
        // Disk already equal to the forced target: adopted.
        let mut trees = trees_with_force();
        let plan = plan_full(&mut trees, &[("a", file("2"))], false);
        assert_eq!(plan.adopt, vec![(p("a"), at(Some(file("2")), 4))]);
    }

    fn trees_with_force() -> NodeTrees {
        let mut trees = make(&[("a", Some(file("1")), 1)], &[]);
        trees.after_conflict(&p("a"), Some(file("2")), at(Some(file("2")), 4));
        trees
    }

    #[test]
    fn refused_versions_wait_until_they_change() {
        let mut trees = make(&[], &[]);
        trees.refused.insert(
            p("a"),
            Refused {
                entry: Some(file("1")),
                reason: "parent is a file".into(),
            },
        );
        assert!(plan_full(&mut trees, &[("a", file("1"))], false).is_empty());
        let plan = plan_full(&mut trees, &[("a", file("2"))], false);
        assert_eq!(plan.propose_writes, vec![(p("a"), Seq::ZERO)]);
    }

    #[test]
    fn absorb_keeps_the_newest_change_above_the_synced_seq() {
        let mut trees = make(&[("a", Some(file("1")), 5)], &[]);
        trees.absorb(p("a"), at(Some(file("0")), 4));
        assert!(trees.remote.is_empty());
        trees.absorb(p("b"), at(Some(file("2")), 7));
        trees.absorb(p("b"), at(Some(file("1")), 6));
        assert_eq!(trees.remote[&p("b")].seq, Seq(7));
        assert_eq!(trees.highest_seen, Seq(7));
    }

    #[test]
    fn checkpoint_stays_below_pending_changes_and_keeps_young_tombstones() {
        let mut trees = make(
            &[("gone", None, 3), ("later", None, 9)],
            &[("x", Some(file("1")), 6), ("y", Some(file("1")), 8)],
        );
        trees.saw_seq(Seq(10));
        let checkpoint = trees.checkpoint();
        assert_eq!(checkpoint.last_seq, Seq(5));
        assert_eq!(checkpoint.dropped_tombstones, vec![p("gone")]);
        assert!(trees.synced.contains_key(&p("later")));
        trees.remote.clear();
        let checkpoint = trees.checkpoint();
        assert_eq!(checkpoint.last_seq, Seq(10));
        assert_eq!(checkpoint.dropped_tombstones, vec![p("later")]);
    }

    #[test]
    fn subtree_rounds_look_at_pending_paths_and_follow_ups_too() {
        let mut trees = make(
            &[
                ("a/x", Some(file("1")), 1),
                ("b", Some(file("1")), 2),
                ("c", Some(file("1")), 3),
            ],
            &[("r", Some(file("2")), 4), ("ignored", Some(file("2")), 5)],
        );
        trees.follow_up.insert(p("c"));
        let tops = trees.tops(Scope::Subtrees(vec![p("a")])).unwrap();
        assert_eq!(tops, vec![p("a"), p("c"), p("ignored"), p("r")]);
        assert!(trees.follow_up.is_empty());
        let local = [p("a/new")];
        let candidates = trees.candidates(Some(&tops), local.iter(), |path, _| {
            path.as_str() == "ignored"
        });
        let candidates: Vec<&str> = candidates.iter().map(RelPath::as_str).collect();
        assert_eq!(candidates, ["a/new", "a/x", "c", "r"]);
        assert!(
            !trees.remote.contains_key(&p("ignored")),
            "consumed without being applied"
        );
        trees.follow_up.insert(p("c"));
        assert_eq!(trees.tops(Scope::Full), None);
        assert!(trees.follow_up.is_empty());
    }

    /// Found by gm-sim (seed 9 of the first runs): the hub replaced
    /// directory `b` by a file while a node created `b/x` inside it. The
    /// node kept trying to remove its non-empty `b` (NotEmpty, forever) and
    /// the hub refused `b/x` ("b is a file on the hub"), so `b/x` never
    /// left the node and the replicas never converged. Now the directory
    /// counts as changed: it is proposed, becomes a conflict copy with its
    /// content, and the hub's file takes the path.
    #[test]
    fn regression_seed_9_remote_file_over_a_directory_with_new_content() {
        let mut trees = make(
            &[("b", Some(Entry::Dir), 3), ("b/old", Some(file("o")), 4)],
            &[("b/old", None, 9), ("b", Some(file("f")), 10)],
        );
        let plan = plan_full(
            &mut trees,
            &[
                ("b", Entry::Dir),
                ("b/old", file("o")),
                ("b/x", file("new")),
            ],
            false,
        );
        assert!(plan.apply_writes.is_empty(), "{plan:?}");
        assert_eq!(
            plan.propose_writes,
            vec![(p("b"), Seq(3)), (p("b/x"), Seq::ZERO)]
        );
        // Without new content below, the file replaces the directory (its
        // old child is deleted first).
        let mut trees = make(
            &[("b", Some(Entry::Dir), 3), ("b/old", Some(file("o")), 4)],
            &[("b/old", None, 9), ("b", Some(file("f")), 10)],
        );
        let plan = plan_full(
            &mut trees,
            &[("b", Entry::Dir), ("b/old", file("o"))],
            false,
        );
        assert_eq!(names(&plan.apply_writes), ["b"]);
        assert_eq!(names(&plan.apply_deletes), ["b/old"]);
        // A remote deletion of such a directory stays a deletion: the new
        // child is proposed and the hub brings the directory back.
        let mut trees = make(&[("b", Some(Entry::Dir), 3)], &[("b", None, 10)]);
        let plan = plan_full(
            &mut trees,
            &[("b", Entry::Dir), ("b/x", file("new"))],
            false,
        );
        assert_eq!(names(&plan.apply_deletes), ["b"]);
        assert_eq!(plan.propose_writes, vec![(p("b/x"), Seq::ZERO)]);
    }

    /// Found by gm-sim (seeds 3-6 of the first runs): a version refused
    /// under a parent that was then moved to its conflict copy stayed in
    /// `refused` for ever (its path was never planned again), so `--once`
    /// would report a refusal for a workspace that is in sync.
    #[test]
    fn regression_seed_4_refusals_of_vanished_paths_are_forgotten() {
        let mut trees = make(&[], &[]);
        trees.refused.insert(
            p("b/e"),
            Refused {
                entry: Some(file("1")),
                reason: "b is a file on the hub, not a directory".into(),
            },
        );
        let plan = plan_full(&mut trees, &[], false);
        assert!(plan.is_empty());
        assert!(trees.refused.is_empty());
    }

    /// Found by gm-sim (seed 229 of the first runs): a node proposed `e`
    /// (a new directory) and `e/a` in two calls in flight; the hub took the
    /// second first and refused `e/a` ("e is a symlink on the hub"), then
    /// committed `e`. The refusal arrived after `e` was agreed, and `e/a`
    /// was never proposed again.
    #[test]
    fn regression_seed_229_refusal_after_the_parent_changed_is_retried() {
        let mut trees = make(
            &[("e", Some(Entry::Symlink { target: "t".into() }), 2)],
            &[],
        );
        let sent = trees.known_seq(&p("e/a"));
        assert_eq!(sent, Seq(2));
        trees.set_synced(&p("e"), at(Some(Entry::Dir), 28));
        trees.refuse(p("e/a"), Some(file("a")), "e is a symlink".into(), sent);
        assert!(trees.refused.is_empty());
        assert!(trees.follow_up.contains(&p("e/a")));
        // Parents unchanged since sending: the refusal holds.
        let sent = trees.known_seq(&p("e/b"));
        trees.refuse(p("e/b"), Some(file("b")), "too large".into(), sent);
        assert!(trees.refused.contains_key(&p("e/b")));
        // ...until the parent is agreed again as a directory.
        trees.follow_up.clear();
        trees.set_synced(&p("e"), at(Some(Entry::Dir), 30));
        assert!(trees.refused.is_empty());
        assert!(trees.follow_up.contains(&p("e/b")));
    }

    /// Found by the gm-sim soak (seeds 31086 and 55386): refusals held for
    /// ever after the hub's state they were about had moved on. `a/c.txt`
    /// was refused while `a` was a file on the hub; the hub then deleted
    /// `a`, but the node kept its non-empty directory `a` (a remote deletion
    /// of a directory with new content waits for that content) and never
    /// proposed `a/c.txt` again. Likewise a new directory refused at a path
    /// the hub then gave a file was never proposed again, so it could not
    /// become a conflict copy.
    #[test]
    fn regression_seed_31086_refusals_end_when_the_hub_moves_on() {
        let mut trees = make(&[("a", Some(Entry::Dir), 3)], &[]);
        let sent = trees.known_seq(&p("a/c.txt"));
        trees.refuse(p("a/c.txt"), Some(file("1")), "a is a file".into(), sent);
        trees.refuse(p("x"), Some(Entry::Dir), "x: parent".into(), sent);
        assert_eq!(trees.refused.len(), 2);
        // The hub deletes `a`: the refusal below it is void.
        trees.absorb(p("a"), at(None, 9));
        assert!(!trees.refused.contains_key(&p("a/c.txt")));
        let plan = plan_full(
            &mut trees,
            &[("a", Entry::Dir), ("a/c.txt", file("1"))],
            false,
        );
        assert_eq!(plan.propose_writes, vec![(p("a/c.txt"), Seq::ZERO)]);
        // The hub puts a file at `x`: the refused directory is proposed
        // against it (and becomes a conflict copy).
        trees.absorb(p("x"), at(Some(file("hub")), 10));
        let plan = plan_full(
            &mut trees,
            &[("a", Entry::Dir), ("a/c.txt", file("1")), ("x", Entry::Dir)],
            false,
        );
        assert!(
            plan.propose_writes.contains(&(p("x"), Seq::ZERO)),
            "{plan:?}"
        );
        // A refusal that arrives after such a change is not kept.
        let sent = trees.known_seq(&p("y/z"));
        trees.absorb(p("y"), at(None, 11));
        trees.refuse(p("y/z"), Some(file("2")), "y is a file".into(), sent);
        assert!(!trees.refused.contains_key(&p("y/z")));
        assert!(trees.follow_up.contains(&p("y/z")));
    }

    /// A directory replaced by a file on the node (`rm -rf d; echo > d`):
    /// the children's deletions go first and do not wait for the delete
    /// delay, so the hub (which never replaces a directory that still has
    /// children) replaces it, instead of keeping the directory and making
    /// the file a conflict copy although nothing happened elsewhere.
    #[test]
    fn a_directory_replaced_by_a_file_is_cleared_first() {
        let mut trees = make(
            &[
                ("d", Some(Entry::Dir), 1),
                ("d/e", Some(Entry::Dir), 2),
                ("d/e/x", Some(file("x")), 3),
                ("other", Some(file("o")), 4),
            ],
            &[],
        );
        let plan = plan_full(&mut trees, &[("d", file("now a file"))], false);
        assert_eq!(
            plan.propose_clearing,
            vec![(p("d/e/x"), Seq(3)), (p("d/e"), Seq(2))]
        );
        assert_eq!(plan.propose_writes, vec![(p("d"), Seq(1))]);
        // Other deletions still wait for the delay.
        assert!(plan.propose_deletes.is_empty());
        assert!(trees.deferred.contains(&p("other")));
        assert!(!trees.deferred.contains(&p("d/e/x")));
    }

    fn entry_strategy() -> impl Strategy<Value = Option<Entry>> {
        prop_oneof![
            Just(None),
            Just(Some(Entry::Dir)),
            (0u8..3).prop_map(|c| Some(file(&c.to_string()))),
        ]
    }

    proptest! {
        /// Whatever the trees hold, a round never plans a write or deletion
        /// over a path whose disk differs from its base (unless a conflict
        /// left exactly what the disk holds), and every path changed locally
        /// is proposed, deferred, or refused.
        #[test]
        fn plans_never_overwrite_local_changes(
            rows in proptest::collection::vec((entry_strategy(), entry_strategy(), proptest::option::of(entry_strategy()), any::<bool>()), 1..6),
            release in any::<bool>(),
        ) {
            let mut trees = NodeTrees::default();
            let mut local = BTreeMap::new();
            for (index, (base, here, remote, forced)) in rows.iter().enumerate() {
                let path = p(&format!("p{index}"));
                trees.synced.insert(path.clone(), at(base.clone(), 2));
                if let Some(remote) = remote {
                    trees.absorb(path.clone(), at(remote.clone(), 3));
                }
                if *forced {
                    trees.after_conflict(&path, here.clone(), at(remote.clone().flatten(), 3));
                }
                if let Some(here) = here {
                    local.insert(path, here.clone());
                }
            }
            let tops = trees.tops(Scope::Full);
            let forced = trees.force.clone();
            let candidates = trees.candidates(tops.as_deref(), local.keys(), |_, _| false);
            let plan = trees.plan(candidates, |path| local.get(path), release);
            for (path, _) in plan.apply_writes.iter().chain(&plan.apply_deletes) {
                let here = local.get(path);
                let base = trees.synced[path].entry.as_ref();
                let forced_ok = forced.get(path).is_some_and(|f| f.expected.as_ref() == here);
                prop_assert!(here == base || forced_ok, "{path} overwritten");
            }
            for (index, (base, here, _, _)) in rows.iter().enumerate() {
                let path = p(&format!("p{index}"));
                if here != base && !forced.contains_key(&path) {
                    let proposed = plan.propose_writes.iter().chain(&plan.propose_clearing).chain(&plan.propose_deletes).any(|(p, _)| *p == path);
                    let adopted = plan.adopt.iter().any(|(p, _)| *p == path);
                    prop_assert!(proposed || adopted || trees.deferred.contains(&path), "{path} dropped");
                }
            }
        }
    }

    #[test]
    fn small_trees_are_not_sliced_and_large_ones_keep_every_top_once() {
        let sizes = |list: &[(&str, u64)]| -> Vec<(RelPath, u64)> {
            list.iter().map(|(n, c)| (p(n), *c)).collect()
        };
        assert_eq!(slice_tops(sizes(&[("a", 10), ("b", 20)]), 30), None);
        let slices = slice_tops(
            sizes(&[
                ("a", 10),
                ("b", 20),
                ("big", 100),
                ("c", 5),
                ("d", 25),
                ("e", 1),
            ]),
            30,
        )
        .unwrap();
        let names: Vec<Vec<&str>> = slices
            .iter()
            .map(|s| s.iter().map(RelPath::as_str).collect())
            .collect();
        assert_eq!(
            names,
            vec![vec!["a", "b"], vec!["big"], vec!["c", "d"], vec!["e"]]
        );
    }

    proptest! {
        #[test]
        fn slices_cover_every_top_once_in_order_within_the_limit(
            counts in proptest::collection::vec(1u64..200, 0..40),
            limit in 1u64..300,
        ) {
            let sizes: Vec<(RelPath, u64)> = counts
                .iter()
                .enumerate()
                .map(|(i, c)| (p(&format!("t{i:03}")), *c))
                .collect();
            let total: u64 = counts.iter().sum();
            match slice_tops(sizes.clone(), limit) {
                None => prop_assert!(total <= limit),
                Some(slices) => {
                    prop_assert!(total > limit);
                    let flat: Vec<RelPath> = slices.iter().flatten().cloned().collect();
                    let want: Vec<RelPath> = sizes.iter().map(|(t, _)| t.clone()).collect();
                    prop_assert_eq!(flat, want);
                    let size_of: BTreeMap<RelPath, u64> = sizes.into_iter().collect();
                    for slice in &slices {
                        prop_assert!(!slice.is_empty());
                        let weight: u64 = slice.iter().map(|t| size_of[t]).sum();
                        prop_assert!(slice.len() == 1 || weight <= limit);
                    }
                }
            }
        }
    }

    /// Paths over names that sort around '/' ('-' and '.' sort before it,
    /// letters after), so that a subtree is interleaved with its siblings.
    fn tangled_path() -> impl Strategy<Value = RelPath> {
        proptest::collection::vec(
            prop_oneof![Just("a"), Just("a-b"), Just("a.b"), Just("ab"), Just("b")],
            1..4,
        )
        .prop_map(|names| p(&names.join("/")))
    }

    proptest! {
        /// The range walk of a subtree round reads exactly the entries in
        /// scope, each once.
        #[test]
        fn in_scope_ranges_match_the_scope_rule(
            paths in proptest::collection::btree_set(tangled_path(), 0..40),
            tops in proptest::collection::vec(tangled_path(), 0..4),
            full in any::<bool>(),
        ) {
            let tree: BTreeMap<RelPath, ()> = paths.into_iter().map(|p| (p, ())).collect();
            let tops = minimal_tops(tops);
            let tops = (!full).then_some(tops.as_slice());
            let mut walked: Vec<&RelPath> = in_scope_of(&tree, tops).map(|(p, _)| p).collect();
            walked.sort();
            let mut once = walked.clone();
            once.dedup();
            prop_assert_eq!(&walked, &once);
            let want: Vec<&RelPath> = tree.keys().filter(|p| in_scope(tops, p)).collect();
            prop_assert_eq!(walked, want);
        }

        /// Looking keys up in ascending order through the cursor gives
        /// what a search per key gives, near or far apart.
        #[test]
        fn sorted_cursor_finds_what_a_search_finds(
            keys in proptest::collection::btree_set(0u32..400, 0..200),
            asks in proptest::collection::btree_set(0u32..400, 0..200),
        ) {
            let name = |k: &u32| p(&format!("k{k:03}"));
            let map: BTreeMap<RelPath, u32> = keys.iter().map(|k| (name(k), *k)).collect();
            let mut cursor = SortedCursor::new(&map);
            for ask in &asks {
                let key = name(ask);
                prop_assert_eq!(cursor.get(&key), map.get(&key));
            }
        }
    }
}
