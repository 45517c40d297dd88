//! One simulated run: the hub, three nodes, their links, the workload and
//! the faults, all driven by one seeded `Rng`; then settling and the
//! checks.
//!
//! Each step picks one enabled action at random: a user operation on a
//! node or on the hub's mirror, a node starting or continuing a round,
//! the delivery of a message (the head of a subscription stream, or any
//! call or answer in flight), the hub observing its mirror or pushing the
//! journal to a subscriber, a reconnect, or a fault (disconnect, node
//! crash, hub crash, hub crash in the middle of a commit). After the
//! workload, faults stop, every node reconnects, and the run continues
//! until nothing is left to do and a full rescan everywhere changes
//! nothing. Then the invariants are checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gm_core::{ContentHash, Entry, NodeId, RelPath, Seq, Versioned};

use crate::disk::Disk;
use crate::hub::{SimHub, Subscription};
use crate::net::{Link, ToHub, ToNode};
use crate::node::{SimNode, Trigger};
use crate::rng::Rng;
use crate::trace::Trace;

/// The file every replica holds from the start and no operation touches:
/// keeps every root non-empty, so the safety brakes (not modelled) never
/// have a reason to stop a workspace.
pub const ANCHOR: &str = "keep";

const NAMES: [&str; 5] = ["a", "b", "c.txt", "d.md", "e"];
const MAX_DEPTH: usize = 3;
const SETTLE_STEPS: u64 = 40_000;
const BASE_UNIX: i64 = 1_800_000_000;

/// How one run is shaped.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    /// User operations in the workload (spread over nodes and hub).
    pub ops: usize,
    /// Whether disconnects and crashes happen during the workload.
    pub faults: bool,
    /// Trace lines kept for a failure report (`usize::MAX`: all).
    pub trace_lines: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            ops: 60,
            faults: true,
            trace_lines: 400,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub steps: u64,
    pub user_ops: usize,
    pub rounds: usize,
    pub commits: usize,
    pub conflicts: usize,
    pub faults: usize,
    /// Ops the hub refused, and of those "keeps changing".
    pub refused: usize,
    pub keeps_changing: usize,
    pub final_entries: usize,
}

/// A failed run: what broke, and the last trace lines.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub problems: Vec<String>,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "simulation seed {} failed:", self.seed)?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        writeln!(f, "last {} trace lines:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "    {line}")?;
        }
        write!(
            f,
            "rerun with: GM_SIM_SEED={} cargo test -p gm-sim --test seeds -- --nocapture",
            self.seed
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replica {
    Hub,
    Node(usize),
}

#[derive(Debug, Clone, Copy)]
enum Action {
    UserOp(Replica),
    Round(usize, Trigger),
    Step(usize),
    DeliverStream(usize),
    DeliverRequest(usize, usize),
    DeliverAnswer(usize, usize),
    HubObserve,
    HubRescan,
    HubPump(usize),
    HubCall,
    Reconnect(usize),
    Disconnect(usize),
    CrashNode(usize),
    CrashHub,
}

/// Every piece of content a user wrote: file bytes `c<id>` (the entry's
/// `size` carries the id, so traces can name it) or symlink target `t<id>`.
#[derive(Debug, Default)]
struct Contents {
    next: u64,
    written: BTreeMap<u64, String>,
    superseded: BTreeSet<u64>,
    by_hash: HashMap<ContentHash, u64>,
}

impl Contents {
    fn file(&mut self, executable: bool, at: String) -> Entry {
        self.next += 1;
        let id = self.next;
        let hash = ContentHash::of(format!("c{id}").as_bytes());
        self.by_hash.insert(hash, id);
        self.written.insert(id, at);
        Entry::File {
            hash,
            size: id,
            executable,
        }
    }

    fn link(&mut self, at: String) -> Entry {
        self.next += 1;
        let id = self.next;
        self.written.insert(id, at);
        Entry::Symlink {
            target: format!("t{id}"),
        }
    }

    fn id_of(&self, entry: &Entry) -> Option<u64> {
        match entry {
            Entry::File { hash, .. } => self.by_hash.get(hash).copied(),
            Entry::Symlink { target } => target.strip_prefix('t')?.parse().ok(),
            Entry::Dir => None,
        }
    }

    /// A write that did not happen after all.
    fn forget(&mut self, entry: &Entry) {
        if let Some(id) = self.id_of(entry) {
            self.written.remove(&id);
        }
    }

    /// A user replaced or removed `entry`, having seen it.
    fn supersede(&mut self, entry: &Entry) {
        if let Some(id) = self.id_of(entry) {
            self.superseded.insert(id);
        }
    }
}

pub struct World {
    seed: u64,
    config: Config,
    rng: Rng,
    trace: Trace,
    hub: SimHub,
    nodes: Vec<SimNode>,
    links: Vec<Link>,
    contents: Contents,
    now: u64,
    ops_left: usize,
    settling: bool,
    stats: Stats,
}

fn rel(raw: &str) -> RelPath {
    RelPath::new(raw).expect("the simulation's names are valid paths")
}

impl World {
    pub fn new(seed: u64, config: Config) -> World {
        let mut rng = Rng::new(seed);
        let ops_left = config.ops / 2 + rng.below(config.ops + 1);
        let nodes = (0..config.nodes)
            .map(|index| {
                let id = NodeId::new(&format!("n{index}")).expect("valid node id");
                SimNode::new(index, id)
            })
            .collect();
        let links = (0..config.nodes).map(|_| Link::default()).collect();
        let mut world = World {
            seed,
            trace: Trace::new(config.trace_lines),
            config,
            rng,
            hub: SimHub::default(),
            nodes,
            links,
            contents: Contents::default(),
            now: 0,
            ops_left,
            settling: false,
            stats: Stats::default(),
        };
        world.initial_state();
        world
    }

    /// Every replica starts with the same synced tree (the anchor and a
    /// few entries), except that a node may start empty and new.
    fn initial_state(&mut self) {
        let mut tree: Vec<(RelPath, Entry)> =
            vec![(rel(ANCHOR), self.contents.file(false, "initial".into()))];
        let extra = self.rng.below(6);
        for _ in 0..extra {
            let name = *self.rng.pick(&NAMES);
            let path = match tree.iter().find(|(_, e)| e.is_dir()) {
                Some((dir, _)) if self.rng.chance(50) => dir.join(name).ok(),
                _ => RelPath::new(name).ok(),
            };
            let Some(path) = path else { continue };
            if tree.iter().any(|(p, _)| *p == path) {
                continue;
            }
            let entry = match self.rng.below(3) {
                0 => Entry::Dir,
                1 => self.contents.link("initial".into()),
                _ => self.contents.file(false, "initial".into()),
            };
            tree.push((path, entry));
        }
        tree.sort_by(|a, b| a.0.cmp(&b.0));
        for (index, (path, entry)) in tree.iter().enumerate() {
            let state = Versioned {
                entry: Some(entry.clone()),
                seq: Seq(index as u64 + 1),
            };
            self.hub.disk.seed(path, entry.clone());
            self.hub.journal.insert(path.clone(), state);
        }
        self.hub.recorded = Seq(tree.len() as u64);
        self.hub.seq = self.hub.recorded;
        for node in &mut self.nodes {
            if self.rng.chance(15) {
                continue; // a new node: nothing on disk, nothing synced
            }
            for (path, entry) in &tree {
                node.disk.seed(path, entry.clone());
            }
            node.db_synced = self.hub.journal.clone();
            node.db_last_seq = self.hub.recorded;
        }
    }

    /// Runs the workload, settles, checks.
    pub fn run(mut self) -> Result<Stats, Failure> {
        let mut problems = Vec::new();
        // The workload.
        while self.ops_left > 0 {
            self.step_once();
        }
        // Settling: no more user operations or faults.
        self.settling = true;
        self.trace.line("settling".into());
        let mut budget = SETTLE_STEPS;
        let mut settled = false;
        while budget > 0 {
            let before = self.fingerprint();
            while budget > 0 && self.step_once() {
                budget -= 1;
            }
            if budget == 0 {
                break;
            }
            // Nothing to do. Deferred deletions may still wait for time.
            if let Some(due) = self.nodes.iter().filter_map(|n| n.deletions_due_at()).min()
                && due > self.now
            {
                self.now = due;
                continue;
            }
            // A full rescan everywhere must find nothing to do.
            if before == self.fingerprint() && self.rescanned_idle() {
                settled = true;
                break;
            }
            budget = budget.saturating_sub(1);
        }
        if !settled {
            problems.push(format!(
                "did not settle within {SETTLE_STEPS} steps after the workload"
            ));
        }
        problems.extend(self.check(settled));
        self.stats.steps = self.trace.step;
        self.stats.final_entries = self.hub.disk.items().len();
        if problems.is_empty() {
            Ok(self.stats)
        } else {
            Err(Failure {
                seed: self.seed,
                problems,
                trace: self.trace.lines().cloned().collect(),
            })
        }
    }

    /// Hub observes everything and every node runs a full round; true when
    /// that changed nothing and left nothing to do.
    fn rescanned_idle(&mut self) -> bool {
        let before = self.fingerprint();
        self.trace.line("final rescan everywhere".into());
        self.hub.observe(None, &mut self.trace);
        self.hub_watch();
        for index in 0..self.nodes.len() {
            if self.nodes[index].session.is_some() && !self.nodes[index].in_round() {
                self.nodes[index].start_round(Trigger::Rescan, self.now, &mut self.trace);
                self.stats.rounds += 1;
                let mut guard = 0;
                while self.nodes[index].in_round() && self.nodes[index].can_step() && guard < 10_000
                {
                    self.act(Action::Step(index));
                    guard += 1;
                }
            }
        }
        before == self.fingerprint() && self.enabled().is_empty()
    }

    /// What must not change once settled.
    fn fingerprint(&self) -> Vec<u64> {
        let mut print = vec![self.hub.recorded.0, self.hub.disk.changes()];
        for node in &self.nodes {
            print.push(node.disk.changes());
            print.push(node.db_last_seq.0);
            print.push(node.db_synced.len() as u64);
            print.push(self.links[node.index].in_flight() as u64);
        }
        print
    }

    /// One step: picks an enabled action. False when none is enabled.
    fn step_once(&mut self) -> bool {
        let enabled = self.enabled();
        if enabled.is_empty() {
            return false;
        }
        let weights: Vec<u32> = enabled.iter().map(|(w, _)| *w).collect();
        let (_, action) = enabled[self.rng.weighted(&weights)];
        self.trace.step += 1;
        self.now += 1;
        self.act(action);
        true
    }

    fn enabled(&self) -> Vec<(u32, Action)> {
        let mut enabled = Vec::new();
        let workload = !self.settling && self.ops_left > 0;
        if workload {
            enabled.push((30, Action::UserOp(Replica::Hub)));
            for index in 0..self.nodes.len() {
                enabled.push((30, Action::UserOp(Replica::Node(index))));
            }
        }
        for (index, node) in self.nodes.iter().enumerate() {
            let link = &self.links[index];
            match &node.session {
                None => {
                    let weight = if self.settling { 20 } else { 3 };
                    enabled.push((weight, Action::Reconnect(index)));
                }
                Some(_) => {
                    if node.in_round() {
                        if node.can_step() {
                            enabled.push((20, Action::Step(index)));
                        }
                    } else {
                        let triggers = node.triggers(self.now);
                        let live = node.session.as_ref().is_some_and(|s| s.caught_up)
                            && !triggers.contains(&Trigger::First);
                        for trigger in triggers {
                            enabled.push((8, Action::Round(index, trigger)));
                        }
                        if workload && live {
                            // The periodic full rescan under the watcher.
                            enabled.push((1, Action::Round(index, Trigger::Rescan)));
                        }
                    }
                    if workload && self.config.faults {
                        enabled.push((1, Action::Disconnect(index)));
                        enabled.push((1, Action::CrashNode(index)));
                    }
                }
            }
            if !link.stream.is_empty() {
                enabled.push((10, Action::DeliverStream(index)));
            }
            for call in 0..link.requests.len() {
                enabled.push((6, Action::DeliverRequest(index, call)));
            }
            for call in 0..link.answers.len() {
                enabled.push((6, Action::DeliverAnswer(index, call)));
            }
            if let Some(sub) = self.hub.subscriptions.get(&index)
                && sub.sent < self.hub.recorded
            {
                enabled.push((8, Action::HubPump(index)));
            }
        }
        // Observing takes the commit lock: not while a call holds it.
        if self.hub.has_calls() {
            enabled.push((12, Action::HubCall));
        } else if !self.hub.dirty.is_empty() {
            enabled.push((6, Action::HubObserve));
        }
        if workload && !self.hub.has_calls() {
            enabled.push((1, Action::HubRescan));
        }
        if workload && self.config.faults {
            enabled.push((1, Action::CrashHub));
        }
        enabled
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::UserOp(replica) => {
                self.ops_left = self.ops_left.saturating_sub(1);
                self.stats.user_ops += 1;
                self.user_op(replica);
            }
            Action::Round(index, trigger) => {
                self.stats.rounds += 1;
                self.nodes[index].start_round(trigger, self.now, &mut self.trace);
                self.nodes[index].watch();
            }
            Action::Step(index) => {
                let mut out = Vec::new();
                self.nodes[index].step(&mut self.rng, &mut out, &mut self.trace);
                self.nodes[index].watch();
                self.send(index, out);
            }
            Action::DeliverStream(index) => {
                if let Some(message) = self.links[index].stream.pop_front() {
                    self.nodes[index].receive(message);
                }
            }
            Action::DeliverRequest(index, call) => {
                let request = self.links[index].requests.swap_remove(call);
                self.hub_receive(index, request);
            }
            Action::DeliverAnswer(index, call) => {
                let answer = self.links[index].answers.swap_remove(call);
                self.nodes[index].receive(answer);
            }
            Action::HubObserve => {
                let paths: Vec<RelPath> = std::mem::take(&mut self.hub.dirty).into_iter().collect();
                self.hub.observe(Some(paths), &mut self.trace);
                self.hub_watch();
            }
            Action::HubRescan => {
                self.hub.observe(None, &mut self.trace);
                self.hub_watch();
            }
            Action::HubPump(index) => {
                if let Some(sent) = self.hub.subscriptions.get(&index).map(|s| s.sent) {
                    let changes = self.hub.changes_since(sent);
                    if let Some((_, last)) = changes.last()
                        && let Some(sub) = self.hub.subscriptions.get_mut(&index)
                    {
                        sub.sent = last.seq;
                        self.links[index].stream.push_back(ToNode::Changes(changes));
                    }
                }
            }
            Action::HubCall => {
                let now_unix = BASE_UNIX + (self.now / 10) as i64;
                let conflicts_before = self.hub.conflicts.len();
                let finished = self.hub.call_step(now_unix, &mut self.trace);
                self.stats.conflicts += self.hub.conflicts.len() - conflicts_before;
                self.hub_watch();
                if let Some((index, conn, call, results)) = finished {
                    for result in &results {
                        if let crate::net::OpResult::Refused(reason) = result {
                            self.stats.refused += 1;
                            if reason.contains("keeps changing") {
                                self.stats.keeps_changing += 1;
                            }
                        }
                    }
                    // The answer goes back on the connection the call came
                    // on, if it is still there.
                    if self.links[index].up && self.links[index].conn == conn {
                        self.links[index]
                            .answers
                            .push(ToNode::CommitDone { call, results });
                    }
                }
            }
            Action::Reconnect(index) => {
                self.trace.line(format!("n{index} connects"));
                self.links[index].connect();
                let mut out = Vec::new();
                self.nodes[index].start_session(self.links[index].conn, &mut out);
                self.send(index, out);
            }
            Action::Disconnect(index) => {
                self.stats.faults += 1;
                self.trace.line(format!("FAULT n{index} disconnected"));
                self.disconnect(index, false);
            }
            Action::CrashNode(index) => {
                self.stats.faults += 1;
                self.trace.line(format!("FAULT n{index} crashed"));
                self.disconnect(index, true);
            }
            Action::CrashHub => {
                self.stats.faults += 1;
                self.trace.line("FAULT hub crashed".into());
                self.crash_hub();
            }
        }
    }

    fn disconnect(&mut self, index: usize, crash: bool) {
        self.links[index].drop_connection();
        self.nodes[index].end_session(crash, &mut self.trace);
        self.hub.subscriptions.remove(&index);
    }

    fn crash_hub(&mut self) {
        for index in 0..self.nodes.len() {
            if self.links[index].up {
                self.disconnect(index, false);
            }
        }
        self.hub.restart(&mut self.trace);
        self.hub_watch();
    }

    fn send(&mut self, index: usize, out: Vec<ToHub>) {
        for message in out {
            self.links[index].requests.push(message);
        }
    }

    /// The hub's watcher sees every change of its mirror (its own too).
    fn hub_watch(&mut self) {
        for path in self.hub.disk.touched.drain(..) {
            self.hub.dirty.insert(path);
        }
    }

    fn hub_receive(&mut self, index: usize, request: ToHub) {
        let node_id = self.nodes[index].id.clone();
        match request {
            ToHub::Subscribe { since } => {
                let conn = self.links[index].conn;
                let changes = self.hub.changes_since(since);
                let sent = changes.last().map_or(since, |(_, v)| v.seq);
                self.trace.line(format!(
                    "hub: {node_id} subscribes since {since}, {} to catch up",
                    changes.len()
                ));
                if !changes.is_empty() {
                    self.links[index].stream.push_back(ToNode::Changes(changes));
                }
                self.links[index].stream.push_back(ToNode::CaughtUp(sent));
                self.hub
                    .subscriptions
                    .insert(index, Subscription { conn, sent });
            }
            ToHub::Commit { call, ops } => {
                self.stats.commits += 1;
                let conn = self.links[index].conn;
                self.hub.queue_call(index, node_id, conn, call, ops);
            }
            ToHub::Download { call, items } => {
                let items = self.hub.download(&items);
                self.links[index]
                    .answers
                    .push(ToNode::Downloaded { call, items });
            }
        }
    }

    // ---- the workload ----

    fn disk(&mut self, replica: Replica) -> &mut Disk {
        match replica {
            Replica::Hub => &mut self.hub.disk,
            Replica::Node(index) => &mut self.nodes[index].disk,
        }
    }

    /// A path that does not exist yet, under an existing directory.
    fn new_path(&mut self, replica: Replica) -> Option<RelPath> {
        let disk = self.disk(replica);
        let mut parents: Vec<Option<RelPath>> = vec![None];
        parents.extend(
            disk.items()
                .iter()
                .filter(|(p, i)| i.entry.is_dir() && p.components().count() < MAX_DEPTH)
                .map(|(p, _)| Some(p.clone())),
        );
        let parent = self.rng.pick(&parents).clone();
        let name = *self.rng.pick(&NAMES);
        let path = match parent {
            Some(parent) => parent.join(name).ok()?,
            None => rel(name),
        };
        let exists = self.disk(replica).get(&path).is_some();
        (!exists).then_some(path)
    }

    /// An existing entry other than the anchor, optionally only files.
    fn existing(&mut self, replica: Replica, files_only: bool) -> Option<RelPath> {
        let candidates: Vec<RelPath> = self
            .disk(replica)
            .items()
            .iter()
            .filter(|(p, i)| {
                p.as_str() != ANCHOR && (!files_only || matches!(i.entry, Entry::File { .. }))
            })
            .map(|(p, _)| p.clone())
            .collect();
        if candidates.is_empty() {
            None
        } else {
            Some(self.rng.pick(&candidates).clone())
        }
    }

    fn user_op(&mut self, replica: Replica) {
        if replica == Replica::Hub
            && let Some(path) = self.hub.call_path().cloned()
            && self.rng.chance(50)
        {
            self.hub_rewrite(&path);
            return;
        }
        let who = match replica {
            Replica::Hub => "hub".to_string(),
            Replica::Node(index) => format!("n{index}"),
        };
        let kind = self.rng.weighted(&[20, 20, 10, 10, 8, 6, 6, 6, 5]);
        let done: Option<String> = match kind {
            // create a file
            0 => self.new_path(replica).map(|path| {
                let entry = self
                    .contents
                    .file(self.rng.chance(20), format!("{who} {path}"));
                let shown = crate::show(Some(&entry));
                self.disk(replica).user_write(&path, entry);
                format!("create {path} = {shown}")
            }),
            // modify a file
            1 => self.existing(replica, true).map(|path| {
                let old = self.disk(replica).entry(&path).cloned();
                let executable = matches!(
                    old,
                    Some(Entry::File {
                        executable: true,
                        ..
                    })
                );
                if let Some(old) = &old {
                    self.contents.supersede(old);
                }
                let entry = self.contents.file(executable, format!("{who} {path}"));
                let shown = crate::show(Some(&entry));
                self.disk(replica).user_write(&path, entry);
                format!("modify {path} = {shown}")
            }),
            // delete (rm -rf)
            2 => self.existing(replica, false).map(|path| {
                let removed = self.disk(replica).user_remove_tree(&path);
                for (_, entry) in &removed {
                    self.contents.supersede(entry);
                }
                format!("delete {path} ({} entries)", removed.len())
            }),
            // rename
            3 => {
                let from = self.existing(replica, false);
                let to = self.new_path(replica);
                match (from, to) {
                    (Some(from), Some(to)) if self.disk(replica).user_rename(&from, &to) => {
                        Some(format!("rename {from} -> {to}"))
                    }
                    _ => None,
                }
            }
            // mkdir
            4 => self.new_path(replica).and_then(|path| {
                self.disk(replica)
                    .user_mkdir(&path)
                    .then(|| format!("mkdir {path}"))
            }),
            // chmod
            5 => self.existing(replica, true).and_then(|path| {
                let Some(Entry::File {
                    hash,
                    size,
                    executable,
                }) = self.disk(replica).entry(&path).cloned()
                else {
                    return None;
                };
                self.disk(replica).user_write(
                    &path,
                    Entry::File {
                        hash,
                        size,
                        executable: !executable,
                    },
                );
                Some(format!("chmod {path} executable={}", !executable))
            }),
            // symlink
            6 => self.new_path(replica).map(|path| {
                let entry = self.contents.link(format!("{who} {path}"));
                let shown = crate::show(Some(&entry));
                self.disk(replica).user_write(&path, entry);
                format!("symlink {path} = {shown}")
            }),
            // copy a file (same content at a second path: the hub and the
            // nodes then copy it locally instead of moving bytes)
            8 => {
                let from = self.existing(replica, true);
                let to = self.new_path(replica);
                match (from, to) {
                    (Some(from), Some(to)) => {
                        let entry = self.disk(replica).entry(&from).cloned();
                        match entry {
                            Some(entry) if self.disk(replica).user_write(&to, entry.clone()) => {
                                Some(format!("copy {from} -> {to}"))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            // replace an entry by one of another kind
            _ => self.existing(replica, false).map(|path| {
                let removed = self.disk(replica).user_remove_tree(&path);
                let was_dir = removed.iter().any(|(p, e)| *p == path && e.is_dir());
                for (_, entry) in &removed {
                    self.contents.supersede(entry);
                }
                let entry = if was_dir {
                    self.contents.file(false, format!("{who} {path}"))
                } else {
                    Entry::Dir
                };
                let shown = crate::show(Some(&entry));
                if entry.is_dir() {
                    self.disk(replica).user_mkdir(&path);
                } else {
                    self.disk(replica).user_write(&path, entry);
                }
                format!("retype {path} = {shown}")
            }),
        };
        match replica {
            Replica::Hub => self.hub_watch(),
            Replica::Node(index) => self.nodes[index].watch(),
        }
        if let Some(done) = done {
            self.trace.line(format!("USER {who} {done}"));
        }
    }

    /// A hub-side tool writes the path a commit call is working on (a
    /// file there, or a new one), racing the call.
    fn hub_rewrite(&mut self, path: &RelPath) {
        let old = self.hub.disk.entry(path).cloned();
        if old.as_ref().is_some_and(Entry::is_dir) {
            return;
        }
        let entry = self.contents.file(false, format!("hub {path}"));
        let shown = crate::show(Some(&entry));
        if self.hub.disk.user_write(path, entry.clone()) {
            if let Some(old) = &old {
                self.contents.supersede(old);
            }
            self.trace.line(format!(
                "USER hub rewrite {path} = {shown} (racing a commit)"
            ));
        } else {
            self.contents.forget(&entry);
        }
        self.hub_watch();
    }

    // ---- the checks ----

    fn check(&self, settled: bool) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(self.hub.violations.iter().cloned());
        for node in &self.nodes {
            problems.extend(node.violations.iter().cloned());
        }
        let mirror = self.hub.disk.tree();
        let journal = self.hub.live_journal();
        if journal != mirror {
            problems.push(format!(
                "hub journal differs from its mirror: {}",
                diff(&journal, &mirror)
            ));
        }
        for node in &self.nodes {
            let tree = node.disk.tree();
            if tree != mirror {
                problems.push(format!(
                    "{} differs from the hub: {}",
                    node.id,
                    diff(&tree, &mirror)
                ));
            }
            if settled {
                match &node.session {
                    Some(session) => {
                        let synced: BTreeMap<RelPath, Entry> = session
                            .trees
                            .synced
                            .iter()
                            .filter_map(|(p, v)| v.entry.clone().map(|e| (p.clone(), e)))
                            .collect();
                        if synced != journal {
                            problems.push(format!(
                                "{}'s synced tree differs from the journal: {}",
                                node.id,
                                diff(&synced, &journal)
                            ));
                        }
                        if !session.trees.settled() || !session.trees.refused.is_empty() {
                            problems.push(format!(
                                "{} still has work: remote {:?} force {:?} follow-up {:?} deferred {:?} refused {:?}",
                                node.id,
                                session.trees.remote.keys().collect::<Vec<_>>(),
                                session.trees.force.keys().collect::<Vec<_>>(),
                                session.trees.follow_up,
                                session.trees.deferred,
                                session.trees.refused,
                            ));
                        }
                    }
                    None => problems.push(format!("{} is not connected", node.id)),
                }
                if node.db_last_seq != self.hub.recorded {
                    problems.push(format!(
                        "{} persisted last_seq {} but the journal is at {}",
                        node.id, node.db_last_seq, self.hub.recorded
                    ));
                }
            }
            if node.staging != 0 {
                problems.push(format!("{} left {} staging files", node.id, node.staging));
            }
        }
        if self.hub.staging != 0 {
            problems.push(format!("the hub left {} staging files", self.hub.staging));
        }
        // No lost content: everything written and not replaced or removed
        // by a user who saw it is still somewhere in the tree.
        let present: BTreeSet<u64> = mirror
            .values()
            .filter_map(|entry| self.contents.id_of(entry))
            .collect();
        for (id, written) in &self.contents.written {
            if !self.contents.superseded.contains(id) && !present.contains(id) {
                problems.push(format!(
                    "content c{id} / t{id} (written by {written}) is lost"
                ));
            }
        }
        problems
    }
}

fn diff(ours: &BTreeMap<RelPath, Entry>, theirs: &BTreeMap<RelPath, Entry>) -> String {
    let mut lines = Vec::new();
    for (path, entry) in ours {
        match theirs.get(path) {
            Some(other) if other == entry => {}
            Some(other) => lines.push(format!(
                "{path}: {} vs {}",
                crate::show(Some(entry)),
                crate::show(Some(other))
            )),
            None => lines.push(format!("{path}: {} vs absent", crate::show(Some(entry)))),
        }
    }
    for (path, entry) in theirs {
        if !ours.contains_key(path) {
            lines.push(format!("{path}: absent vs {}", crate::show(Some(entry))));
        }
    }
    lines.join("; ")
}
