//! One bound workspace's life on the node.
//!
//! `WorkspaceTask::run` loops over sessions. A session attaches to the hub
//! (learning the workspace's epoch), subscribes to the journal from the
//! last persisted seq, reconciles everything, then (unless `--once`) stays
//! live: watcher events are debounced into subtree rounds, journal events
//! trigger rounds at once, racily-clean records are re-verified and a full
//! rescan runs every `rescan_interval` (`unwatched_rescan_interval` while the
//! watch is missing or incomplete). A lost connection ends the session
//! and the next one starts after a backoff (0.5 s doubling to 30 s), which
//! the log says. A refused token ends the task with an error; a halted
//! workspace waits for its root to come back or for `confirm-empty`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use gm_core::{RelPath, Seq, WorkspaceId};
use gm_fs::Root;
use gm_fs::watch::{WatchEvent, Watcher, relative, rescan_interval};
use gm_proto::pb;
use gm_store::NodeDb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;
use crate::client::{Client, SyncError};
use crate::reconcile::{InDoubt, Replica, Scope};

const TICK: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const ONCE_ROUNDS: usize = 12;

pub struct WorkspaceTask {
    id: WorkspaceId,
    path: PathBuf,
    config: Arc<NodeConfig>,
    db: Arc<NodeDb>,
    client: Client,
    shutdown: CancellationToken,
    tag: String,
    progress: Arc<crate::Progress>,
    /// Proposals whose answer a lost connection swallowed, carried from one
    /// session to the next (`NodeTrees::in_doubt`).
    in_doubt: Arc<std::sync::Mutex<InDoubt>>,
}

/// Journal messages (up to 2,000 changes each) read ahead of the session.
/// Beyond this the reader waits and HTTP/2 flow control holds the hub back:
/// at 64 an initial sync of 200,000 files buffered 10 MB of its own echoes.
const INCOMING_BUFFERED: usize = 4;

enum Incoming {
    Changes(Vec<pb::PathState>),
    CaughtUp(Seq),
    Ended(Option<tonic::Status>),
}

impl WorkspaceTask {
    pub fn new(
        id: WorkspaceId,
        path: PathBuf,
        config: Arc<NodeConfig>,
        db: Arc<NodeDb>,
        client: Client,
        shutdown: CancellationToken,
        progress: Arc<crate::Progress>,
    ) -> WorkspaceTask {
        let tag = format!("node{:08x}", rand::random::<u32>());
        WorkspaceTask {
            id,
            path,
            config,
            db,
            client,
            shutdown,
            tag,
            progress,
            in_doubt: Arc::default(),
        }
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let mut reached_live = false;
            let result = self.session(&mut reached_live).await;
            if reached_live {
                backoff = Duration::from_millis(500);
            }
            match result {
                Ok(()) => return Ok(()),
                Err(SyncError::Fatal(err)) => {
                    tracing::error!(workspace = %self.id, error = %format!("{err:#}"), "workspace sync stopped");
                    return Err(err);
                }
                Err(SyncError::Halted(reason)) => {
                    if self.config.once {
                        return Err(anyhow!("halted: {reason}"));
                    }
                    if !self.wait_until_resumable().await {
                        return Ok(());
                    }
                }
                Err(SyncError::Retry(err)) => {
                    if self.config.once && started.elapsed() >= self.config.once_timeout {
                        return Err(err.context(format!(
                            "gave up after {:?} (hub {})",
                            self.config.once_timeout, self.config.hub_url
                        )));
                    }
                    tracing::warn!(
                        workspace = %self.id,
                        hub = %self.config.hub_url,
                        error = %format!("{err:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "sync interrupted; retrying"
                    );
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Opens the root, checking it against the identity recorded at the
    /// first sync.
    fn open_root(&self) -> Result<Root, SyncError> {
        let row = self.db.ensure_workspace(&self.id)?;
        let has_synced = row.root_identity.is_some();
        let root = match Root::open(&self.path, &self.tag) {
            Ok(root) => root,
            Err(err) if has_synced => {
                return Err(self.halt(format!(
                    "workspace directory {} is not usable ({err}); it was synced before, so nothing is propagated. If it is gone for good run `ghostmirror confirm-empty --state-dir {} {}`",
                    self.path.display(),
                    self.config.state_dir.display(),
                    self.id
                )));
            }
            Err(err) => {
                return Err(SyncError::Fatal(anyhow!(
                    "workspace directory {} cannot be used: {err}",
                    self.path.display()
                )));
            }
        };
        let identity = (root.identity().dev, root.identity().ino);
        match row.root_identity {
            Some(recorded) if recorded != identity => {
                if self.db.take_confirm_empty(&self.id)? {
                    tracing::warn!(workspace = %self.id, "new workspace root confirmed");
                    self.db.set_root_identity(&self.id, identity)?;
                } else {
                    return Err(self.halt(format!(
                        "workspace directory {} was replaced by another directory (a different volume?); nothing is propagated. If that is deliberate run `ghostmirror confirm-empty --state-dir {} {}`",
                        self.path.display(),
                        self.config.state_dir.display(),
                        self.id
                    )));
                }
            }
            _ => {}
        }
        for entry in root.clear_staging()? {
            tracing::info!(
                workspace = %self.id,
                path = %format!(".ghostmirror/staging/{}", entry.name),
                age_secs = entry.age.as_secs(),
                bytes = entry.size,
                "removed staging left by an earlier run"
            );
        }
        Ok(root)
    }

    fn halt(&self, reason: String) -> SyncError {
        tracing::error!(workspace = %self.id, reason = %reason, "workspace halted by the safety brake; nothing is propagated");
        if let Err(err) = self.db.set_halted(&self.id, Some(&reason)) {
            tracing::error!(workspace = %self.id, error = %err, "cannot record the halt");
        }
        SyncError::Halted(reason)
    }

    /// Waits until a halted workspace may sync again: `confirm-empty` was
    /// run, or the original root is back with content. False on shutdown.
    async fn wait_until_resumable(&self) -> bool {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Ok(Some(row)) = self.db.workspace(&self.id) else {
                continue;
            };
            if row.confirm_empty {
                tracing::warn!(workspace = %self.id, "confirm-empty received; resuming");
                let _ = self.db.set_halted(&self.id, None);
                return true;
            }
            if let Ok(root) = Root::open(&self.path, &self.tag) {
                let identity = (root.identity().dev, root.identity().ino);
                if row.root_identity.is_none_or(|r| r == identity)
                    && !root.is_empty().unwrap_or(true)
                {
                    tracing::info!(workspace = %self.id, "workspace root is back; resuming");
                    let _ = self.db.set_halted(&self.id, None);
                    return true;
                }
            }
        }
    }

    async fn session(&self, reached_live: &mut bool) -> Result<(), SyncError> {
        let root = Arc::new(self.open_root()?);
        let mut client = self.client.clone();
        let attach = client
            .attach(pb::AttachRequest {
                workspace: self.id.to_string(),
                node_id: self.config.node_id.to_string(),
            })
            .await
            .map_err(|s| SyncError::from_status(s, "attach"))?
            .into_inner();
        let row = self.db.ensure_workspace(&self.id)?;
        if row.epoch != attach.epoch {
            if !row.epoch.is_empty() {
                tracing::warn!(workspace = %self.id, "the hub's journal for this workspace started over; merging as a first sync (nothing is deleted)");
            }
            self.db.reset_epoch(&self.id, &attach.epoch)?;
        }
        let row = self.db.ensure_workspace(&self.id)?;
        let allow_empty = row.confirm_empty && self.db.take_confirm_empty(&self.id)?;
        if row.root_identity.is_none() || allow_empty {
            self.db
                .set_root_identity(&self.id, (root.identity().dev, root.identity().ino))?;
        }
        // The synced tree loads while the journal subscription opens (a
        // cold restart read node.db before asking the hub for anything).
        // Only this session writes node.db, so the tree matches `last_seq`.
        let synced_load = {
            let (db, id) = (self.db.clone(), self.id.clone());
            tokio::task::spawn_blocking(move || db.synced(&id))
        };

        // Watch before the first scan so nothing written meanwhile is missed.
        // The recursive watch walks the workspace: it is set up on a blocking
        // thread while the subscription opens, and awaited before the scan.
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<WatchEvent>();
        // The queue stays open if the watcher cannot start (its sender goes
        // with it): a closed queue made the live loop spin on `None`.
        let _watch_open = watch_tx.clone();
        let watch_started = (!self.config.once).then(|| {
            let watched = root.path().to_path_buf();
            let id = self.id.clone();
            let test_fault = self.config.test_fault.clone();
            tokio::task::spawn_blocking(move || {
                // `.ghostmirror/` (staging: every landed file makes several
                // events) is neither watched nor reported.
                let keep = {
                    let watched = watched.clone();
                    move |path: &std::path::Path| relative(&watched, path).is_some()
                };
                let watcher = Watcher::start(
                    &watched,
                    keep,
                    move |event| {
                        let _ = watch_tx.send(event);
                    },
                    test_fault.as_deref(),
                );
                match watcher {
                    Ok(w) => {
                        tracing::debug!(workspace = %id, directories = w.directories(), complete = w.complete(), "watching the workspace");
                        Some(w)
                    }
                    Err(err) => {
                        tracing::warn!(workspace = %id, error = %err, "cannot watch the workspace; relying on periodic scans");
                        None
                    }
                }
            })
        });

        let stream = crate::client::compressed_if(&client, self.config.compression.metadata())
            .subscribe(pb::SubscribeRequest {
                workspace: self.id.to_string(),
                epoch: attach.epoch.clone(),
                since: row.last_seq.0,
                node_id: self.config.node_id.to_string(),
            })
            .await
            .map_err(|s| SyncError::from_status(s, "subscribe"))?
            .into_inner();
        let (incoming_tx, mut incoming) = mpsc::channel::<Incoming>(INCOMING_BUFFERED);
        let reader = tokio::spawn(read_stream(stream, incoming_tx));
        let _stop_reader = AbortOnDrop(reader);

        let synced = synced_load.await??.into_iter().collect();
        let mut replica = Replica::new(
            self.id.clone(),
            root.clone(),
            self.config.clone(),
            self.db.clone(),
            client.clone(),
            synced,
            row.last_seq,
        );
        replica.carry_in_doubt(self.in_doubt.clone());
        replica.load_intents()?;
        replica.emptying_confirmed = allow_empty;
        replica.progress = self.progress.clone();

        // Catch up: every journal change since our last seq.
        loop {
            match incoming.recv().await {
                Some(Incoming::Changes(changes)) => replica.absorb(&changes),
                Some(Incoming::CaughtUp(seq)) => {
                    replica.saw_seq(seq);
                    break;
                }
                Some(Incoming::Ended(status)) => return Err(ended(status)),
                None => return Err(SyncError::Retry(anyhow!("subscription closed"))),
            }
        }
        tracing::info!(workspace = %self.id, pending = replica.trees.remote.len(), seq = replica.trees.highest_seen.0, "caught up with the hub");

        let watcher = match watch_started {
            Some(started) => started
                .await
                .map_err(|e| SyncError::Fatal(anyhow!("the watcher's setup failed: {e}")))?,
            None => None,
        };
        let first = replica.round(Scope::Full, self.config.once).await?;
        tracing::info!(workspace = %self.id, ?first, "first reconciliation done");

        if self.config.once {
            let verified = first.idle() && first.refused == 0;
            return self
                .finish_once(&mut replica, &mut incoming, verified)
                .await;
        }
        *reached_live = true;
        let mut dirty: BTreeSet<RelPath> = BTreeSet::new();
        let mut full_pending = false;
        let mut first_event: Option<Instant> = None;
        let mut last_event = Instant::now();
        let mut last_full = Instant::now();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = first_event.map(|first| {
                (last_event + self.config.debounce).min(first + self.config.debounce_max)
            });
            let sleep_until =
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    replica.persist().await?;
                    return Ok(());
                }
                message = incoming.recv() => {
                    match message {
                        Some(Incoming::Changes(changes)) => {
                            replica.absorb(&changes);
                            // Drain what is already here, then apply at once.
                            while let Ok(more) = incoming.try_recv() {
                                match more {
                                    Incoming::Changes(changes) => replica.absorb(&changes),
                                    Incoming::CaughtUp(seq) => replica.saw_seq(seq),
                                    Incoming::Ended(status) => return Err(ended(status)),
                                }
                            }
                            let paths: Vec<RelPath> = std::mem::take(&mut dirty).into_iter().collect();
                            first_event = None;
                            let scope = if std::mem::take(&mut full_pending) { Scope::Full } else { Scope::Subtrees(paths) };
                            replica.round(scope, false).await?;
                        }
                        Some(Incoming::CaughtUp(seq)) => replica.saw_seq(seq),
                        Some(Incoming::Ended(status)) => return Err(ended(status)),
                        None => return Err(SyncError::Retry(anyhow!("subscription closed"))),
                    }
                }
                event = watch_rx.recv() => {
                    match event {
                        Some(WatchEvent::Changed(paths)) => {
                            for path in paths {
                                match relative(root.path(), &path) {
                                    Some(rel) => { dirty.insert(rel); }
                                    None if path == root.path() => full_pending = true,
                                    None => continue,
                                }
                                last_event = Instant::now();
                                first_event.get_or_insert(last_event);
                            }
                        }
                        Some(WatchEvent::Rescan(why)) => {
                            tracing::warn!(workspace = %self.id, reason = %why, "watcher lost events; rescanning");
                            full_pending = true;
                            last_event = Instant::now();
                            first_event.get_or_insert(last_event);
                        }
                        None => {}
                    }
                }
                () = tokio::time::sleep_until(sleep_until.into()), if deadline.is_some() => {
                    first_event = None;
                    let paths: Vec<RelPath> = std::mem::take(&mut dirty).into_iter().collect();
                    let scope = if std::mem::take(&mut full_pending) { Scope::Full } else { Scope::Subtrees(paths) };
                    replica.round(scope, false).await?;
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    // Sooner while part of the workspace (or all) is unwatched.
                    let interval = rescan_interval(
                        watcher.as_ref(),
                        self.config.rescan_interval,
                        self.config.unwatched_rescan_interval,
                    );
                    if now.duration_since(last_full) >= interval {
                        last_full = now;
                        replica.round(Scope::Full, self.config.once).await?;
                        continue;
                    }
                    let due: Vec<RelPath> = replica.racy.iter().filter(|(_, at)| **at <= now).map(|(p, _)| p.clone()).collect();
                    for path in &due {
                        replica.racy.remove(path);
                    }
                    if !due.is_empty() || !replica.trees.follow_up.is_empty() {
                        replica.round(Scope::Subtrees(due), false).await?;
                    }
                    if replica.deletions_due() {
                        let paths = replica.deferred_deletions();
                        replica.round(Scope::Subtrees(paths), true).await?;
                    }
                }
            }
        }
    }

    /// `--once`: rounds until a full round finds nothing to do (no local
    /// change, no remote change, nothing refused) with the journal caught
    /// up. `verified`: the first reconciliation (a full round) already did.
    async fn finish_once(
        &self,
        replica: &mut Replica,
        incoming: &mut mpsc::Receiver<Incoming>,
        mut verified: bool,
    ) -> Result<(), SyncError> {
        for _ in 0..ONCE_ROUNDS {
            while let Ok(message) = incoming.try_recv() {
                match message {
                    Incoming::Changes(changes) => replica.absorb(&changes),
                    Incoming::CaughtUp(seq) => replica.saw_seq(seq),
                    Incoming::Ended(status) => return Err(ended(status)),
                }
            }
            if verified && replica.settled() && replica.trees.refused.is_empty() {
                tracing::info!(workspace = %self.id, seq = replica.trees.highest_seen.0, "workspace equals its mirror");
                return Ok(());
            }
            let full = replica.settled();
            let stats = if full {
                replica.round(Scope::Full, self.config.once).await?
            } else {
                // Give the journal a moment to deliver what our commits caused.
                tokio::time::sleep(Duration::from_millis(50)).await;
                replica.round(Scope::Subtrees(Vec::new()), true).await?
            };
            verified = full && stats.idle() && stats.refused == 0;
        }
        let mut why = Vec::new();
        if !replica.trees.remote.is_empty() {
            why.push(format!(
                "{} remote changes not applied",
                replica.trees.remote.len()
            ));
        }
        for (path, refused) in replica.trees.refused.iter().take(10) {
            why.push(format!("{path}: refused by the hub: {}", refused.reason));
        }
        if !replica.trees.follow_up.is_empty() {
            let sample: Vec<String> = replica
                .trees
                .follow_up
                .iter()
                .take(10)
                .map(|p| p.to_string())
                .collect();
            why.push(format!("still changing: {}", sample.join(", ")));
        }
        Err(SyncError::Fatal(anyhow!(
            "workspace {} does not equal its mirror after {ONCE_ROUNDS} rounds: {}",
            self.id,
            why.join("; ")
        )))
    }
}

fn ended(status: Option<tonic::Status>) -> SyncError {
    match status {
        Some(status) => SyncError::from_status(status, "subscription"),
        None => SyncError::Retry(anyhow!("the hub ended the subscription")),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_stream(mut stream: tonic::Streaming<pb::SubscribeEvent>, tx: mpsc::Sender<Incoming>) {
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if !event.changes.is_empty()
                    && tx.send(Incoming::Changes(event.changes)).await.is_err()
                {
                    return;
                }
                if let Some(seq) = event.caught_up_to
                    && tx.send(Incoming::CaughtUp(Seq(seq))).await.is_err()
                {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Incoming::Ended(None)).await;
                return;
            }
            Err(status) => {
                let _ = tx.send(Incoming::Ended(Some(status))).await;
                return;
            }
        }
    }
}
