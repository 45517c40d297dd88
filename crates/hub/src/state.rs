//! The hub's shared state: the database, the registry, the skills, the open
//! mirrors, the pending uploads and the counters.
//!
//! Concurrency: each workspace has one async commit lock (`Workspace::seq`)
//! that serializes every journal write (node commits and mirror scans);
//! the guard owns the workspace's current seq, so seqs are handed out only
//! while holding it. Disk and database work runs on blocking threads with
//! the guard moved in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use gm_core::{ContentHash, Kind, RelPath, Seq, Stat, WorkspaceId};
use gm_fs::{DirLock, Root, StagedFile};
use gm_registry::{Registry, RegistryError};
use gm_store::HubDb;
use tokio::sync::watch;

use crate::HubConfig;

/// A duration histogram with fixed buckets (seconds), for `/metrics`.
pub struct Histogram {
    buckets: Vec<(f64, AtomicU64)>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        Histogram {
            buckets: bounds.iter().map(|b| (*b, AtomicU64::new(0))).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in &self.buckets {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) per bucket, then the count and the sum in seconds.
    pub fn read(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let buckets = self
            .buckets
            .iter()
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Monotonic counters, exposed by `status` and `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub files_hashed: AtomicU64,
    pub hash_cache_hits: AtomicU64,
    pub files_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub files_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub conflicts: AtomicU64,
    pub refused_ops: AtomicU64,
    pub hub_side_changes: AtomicU64,
    pub local_copies: AtomicU64,
    pub chunk_bytes_reused: AtomicU64,
    pub staging_reclaimed: AtomicU64,
    pub purges: AtomicU64,
    /// Directories promoted into the skill registry.
    pub skill_promotions: AtomicU64,
    /// Promotions refused (name taken, no SKILL.md, changed while copied…).
    pub skill_promotions_refused: AtomicU64,
    /// Refused operations by reason.
    pub refused_by_reason: Mutex<BTreeMap<&'static str, u64>>,
    /// Duration of mirror scans (observations), by scope.
    pub scan_seconds: Histogram,
    /// Duration of commit requests (node proposals reconciled into the mirror).
    pub commit_seconds: Histogram,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CounterSnapshot {
    pub files_hashed: u64,
    pub hash_cache_hits: u64,
    pub files_received: u64,
    pub bytes_received: u64,
    pub files_sent: u64,
    pub bytes_sent: u64,
    pub conflicts: u64,
    pub refused_ops: u64,
    pub hub_side_changes: u64,
    pub local_copies: u64,
    pub chunk_bytes_reused: u64,
    pub staging_reclaimed: u64,
    pub purges: u64,
    pub skill_promotions: u64,
    pub skill_promotions_refused: u64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one refused operation.
    pub fn refuse(&self, reason: &'static str) {
        self.refused_ops.fetch_add(1, Ordering::Relaxed);
        *self
            .refused_by_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            files_hashed: get(&self.files_hashed),
            hash_cache_hits: get(&self.hash_cache_hits),
            files_received: get(&self.files_received),
            bytes_received: get(&self.bytes_received),
            files_sent: get(&self.files_sent),
            bytes_sent: get(&self.bytes_sent),
            conflicts: get(&self.conflicts),
            refused_ops: get(&self.refused_ops),
            hub_side_changes: get(&self.hub_side_changes),
            local_copies: get(&self.local_copies),
            chunk_bytes_reused: get(&self.chunk_bytes_reused),
            staging_reclaimed: get(&self.staging_reclaimed),
            purges: get(&self.purges),
            skill_promotions: get(&self.skill_promotions),
            skill_promotions_refused: get(&self.skill_promotions_refused),
        }
    }
}

/// How long the hub remembers a write of its own for `Workspace::not_own_writes`
/// (its watcher events arrive within the debounce, at most a second later).
pub const OWN_WRITE_TTL: Duration = Duration::from_secs(5);

/// What one of the hub's recorded commits left at a path.
#[derive(Debug, Clone, Copy)]
pub enum OwnWrite {
    /// Nothing.
    Absent,
    /// This file, exactly (the stat its cache record holds).
    File(Stat),
    /// This directory (same inode; its times change as entries land in it,
    /// and each of those has its own event).
    Dir { dev: u64, ino: u64 },
}

impl OwnWrite {
    fn matches(&self, now: Option<&Stat>) -> bool {
        match (self, now) {
            (OwnWrite::Absent, None) => true,
            (OwnWrite::File(then), Some(now)) => now.unchanged_since(then),
            (OwnWrite::Dir { dev, ino }, Some(now)) => {
                now.kind == Kind::Dir && now.dev == *dev && now.ino == *ino
            }
            _ => false,
        }
    }
}

/// One mirrored workspace.
pub struct Workspace {
    pub id: WorkspaceId,
    pub epoch: String,
    pub mirror_path: PathBuf,
    root: RwLock<Arc<Root>>,
    /// The commit lock; its guard owns the current journal seq.
    pub seq: Arc<tokio::sync::Mutex<Seq>>,
    /// Latest committed seq, for subscribers to wait on.
    pub committed: watch::Sender<u64>,
    /// Connected subscribers: subscription id -> node id.
    pub subscribers: Mutex<BTreeMap<u64, String>>,
    /// Cache records still racily clean: path -> when they can be settled.
    pub racy: Mutex<BTreeMap<RelPath, Instant>>,
    /// What the hub's own recorded commits left at each path, for
    /// `OWN_WRITE_TTL`: the watcher reports these writes back, and an event
    /// whose path still looks exactly so needs no observation.
    own_writes: Mutex<HashMap<RelPath, (OwnWrite, Instant)>>,
    /// Why the safety brake stopped this workspace, if it did.
    pub halted: Mutex<Option<String>>,
}

impl Workspace {
    pub fn root(&self) -> Arc<Root> {
        self.root.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace_root(&self, root: Root) {
        *self.root.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(root);
    }

    pub fn halted(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Remembers what recorded commits left on disk (see `own_writes`).
    pub fn expect_own(&self, writes: Vec<(RelPath, OwnWrite)>) {
        if writes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.extend(writes.into_iter().map(|(path, write)| (path, (write, now))));
    }

    /// Of `paths` (from watcher events), those that need observing: all
    /// but the ones still exactly as a recent commit of the hub left them.
    /// Stats the remembered ones (blocking). A third party's write in the
    /// same timestamp tick as the hub's leaves the same stat; the racy
    /// re-verification of that path's cache record still catches it.
    pub fn not_own_writes(&self, paths: BTreeSet<RelPath>) -> BTreeSet<RelPath> {
        let own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        if own.is_empty() {
            return paths;
        }
        let expected: Vec<(RelPath, OwnWrite)> = paths
            .iter()
            .filter_map(|p| own.get(p).map(|(w, _)| (p.clone(), *w)))
            .collect();
        drop(own);
        let root = self.root();
        let mut paths = paths;
        for (path, write) in expected {
            let Ok(now) = root.lstat(&path) else { continue };
            if write.matches(now.as_ref()) {
                paths.remove(&path);
            }
        }
        paths
    }

    /// Forgets own writes older than `OWN_WRITE_TTL`.
    pub fn expire_own_writes(&self) {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.retain(|_, (_, at)| at.elapsed() < OWN_WRITE_TTL);
    }

    pub fn mark_racy(&self, paths: impl IntoIterator<Item = RelPath>, window: Duration) {
        let due = Instant::now() + window + Duration::from_millis(50);
        let mut racy = self.racy.lock().unwrap_or_else(|p| p.into_inner());
        for path in paths {
            racy.insert(path, due);
        }
    }

    pub fn racy_count(&self) -> usize {
        self.racy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A latch: closed until `open`, then open for good; `wait` blocks while
/// it is closed.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A file a node uploaded, waiting for the commit that names it.
pub struct Upload {
    pub staged: StagedFile,
    pub at: Instant,
    /// The chunk list of a large file, stored with its cache record.
    pub manifest: Option<gm_chunk::Manifest>,
}

pub struct Hub {
    pub config: HubConfig,
    pub db: Arc<HubDb>,
    /// Nodes, sessions, templates, instances, skill records (SQLite in
    /// state.db, or PostgreSQL).
    pub registry: Arc<Registry>,
    /// Who may call: the admin token and the node tokens.
    pub access: Arc<crate::auth::Access>,
    /// The skill registry's files and what this hub knows of each name.
    pub skills: crate::skills::Skills,
    pub mirrors: PathBuf,
    /// Opens once the watcher on `mirrors/` is set up (or has failed to
    /// start): no mirror is walked before, so no change falls between a walk
    /// and the watch.
    pub watching: Gate,
    /// The watcher's state for status reports (set once it started).
    pub watch_state: std::sync::OnceLock<gm_fs::watch::WatchState>,
    pub workspaces: Mutex<BTreeMap<WorkspaceId, Arc<Workspace>>>,
    pub uploads: Mutex<HashMap<(WorkspaceId, ContentHash), Upload>>,
    pub counters: Counters,
    pub started: Instant,
    /// Staging-file tag of this hub instance.
    pub tag: String,
    ready: AtomicBool,
    draining: AtomicBool,
    next_subscription: AtomicU64,
    _lock: DirLock,
}

impl Hub {
    /// Takes the data dir's lock, then opens state.db and the registry
    /// (applying both migration histories).
    pub async fn open(config: HubConfig) -> anyhow::Result<Hub> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
        let lock = DirLock::acquire(&config.data_dir, "hub.lock")
            .map_err(|e| anyhow::anyhow!("{e}; a second hub on the same data dir is refused"))?;
        let mirrors = config.data_dir.join("mirrors");
        std::fs::create_dir_all(&mirrors)
            .with_context(|| format!("create {}", mirrors.display()))?;
        let state_db = config.data_dir.join("state.db");
        let db = HubDb::open(&state_db).context("open hub data dir")?;
        let registry = match &config.database_url {
            Some(url) => Registry::open_postgres(url)
                .await
                .context("open the registry on PostgreSQL (GM_DATABASE_URL)")?,
            None => Registry::open_sqlite(&state_db)
                .await
                .with_context(|| format!("open the registry in {}", state_db.display()))?,
        };
        let access = crate::auth::Access::new(config.token.clone());
        access
            .refresh(&registry)
            .await
            .context("read the node tokens")?;
        let tag = format!("hub{:08x}", rand::random::<u32>());
        let skills = crate::skills::Skills::open(
            &config.data_dir,
            &tag,
            config.skill_promote_quiet,
            config.test_fault.clone(),
        )?;
        Ok(Hub {
            config,
            db: Arc::new(db),
            registry: Arc::new(registry),
            access: Arc::new(access),
            skills,
            mirrors,
            watching: Gate::default(),
            watch_state: std::sync::OnceLock::new(),
            workspaces: Mutex::new(BTreeMap::new()),
            uploads: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            started: Instant::now(),
            tag,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            next_subscription: AtomicU64::new(1),
            _lock: lock,
        })
    }

    /// The sessions the registry holds active: the mirrors the orphan purge
    /// must keep. An error means "unknown", never "none": a caller must not
    /// purge on it.
    pub async fn active_sessions(&self) -> Result<BTreeSet<WorkspaceId>, RegistryError> {
        self.registry.active_sessions().await
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// True once shutdown started: readiness is false and new transfers are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn next_subscription_id(&self) -> u64 {
        self.next_subscription.fetch_add(1, Ordering::Relaxed)
    }

    pub fn workspace(&self, id: &WorkspaceId) -> Option<Arc<Workspace>> {
        self.workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all_workspaces(&self) -> Vec<Arc<Workspace>> {
        self.workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Where a mirror's files are staged: beside `mirrors/`, not inside the
    /// mirror, so the watcher of `mirrors/` never sees staging's events
    /// (several per file written; they were a quarter of the hub's CPU in
    /// an initial sync of small files).
    pub fn staging_dir(&self, id: &WorkspaceId) -> PathBuf {
        self.config.data_dir.join("staging").join(id.as_str())
    }

    /// Opens (creating if new) the workspace and its mirror directory.
    /// Blocking.
    pub fn open_workspace(&self, id: &WorkspaceId) -> anyhow::Result<(Arc<Workspace>, bool)> {
        if let Some(ws) = self.workspace(id) {
            return Ok((ws, false));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let row = self.db.ensure_workspace(id, now)?;
        let mirror_path = self.mirrors.join(id.as_str());
        let root = Root::create_with_staging(&mirror_path, &self.tag, &self.staging_dir(id))?
            .with_ownership(self.config.ownership.clone());
        let cleared = root.clear_staging()?;
        self.log_reclaimed(id, &root, &cleared, "left by an earlier hub");
        let (committed, _) = watch::channel(row.seq.0);
        let ws = Arc::new(Workspace {
            id: id.clone(),
            epoch: row.epoch,
            mirror_path,
            root: RwLock::new(Arc::new(root)),
            seq: Arc::new(tokio::sync::Mutex::new(row.seq)),
            committed,
            subscribers: Mutex::new(BTreeMap::new()),
            racy: Mutex::new(BTreeMap::new()),
            own_writes: Mutex::new(HashMap::new()),
            halted: Mutex::new(row.halted),
        });
        let mut map = self.workspaces.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(id.clone()).or_insert(ws);
        Ok((entry.clone(), true))
    }

    /// Drops an open workspace (its mirror was purged).
    pub fn forget_workspace(&self, id: &WorkspaceId) {
        self.workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(ws, _), _| ws != id);
        let staging = self.staging_dir(id);
        if let Err(err) = std::fs::remove_dir_all(&staging)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(workspace = %id, staging = %staging.display(), error = %err, "cannot remove the purged mirror's staging");
        }
    }

    /// Logs and counts removed staging entries of `root`'s staging (which
    /// is `staging_dir` unless that is on another mount than the mirror).
    pub fn log_reclaimed(
        &self,
        id: &WorkspaceId,
        root: &Root,
        reclaimed: &[gm_fs::Reclaimed],
        why: &str,
    ) {
        for entry in reclaimed {
            tracing::info!(
                workspace = %id,
                path = %format!("{}/{}", root.staging_shown(), entry.name),
                age_secs = entry.age.as_secs(),
                bytes = entry.size,
                why,
                "removed stale staging entry"
            );
        }
        Counters::add(&self.counters.staging_reclaimed, reclaimed.len() as u64);
    }

    /// Writes `DATA_DIR/hub.json` with the bound addresses, for scripts and tests.
    pub fn write_endpoints(&self, grpc: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
        let path = self.config.data_dir.join("hub.json");
        let body = serde_json::json!({
            "grpc": format!("{}://{grpc}", if self.config.tls.is_some() { "https" } else { "http" }),
            "admin": format!("http://{admin}"),
            "pid": std::process::id(),
        });
        let tmp = self.config.data_dir.join("hub.json.tmp");
        std::fs::write(&tmp, body.to_string())
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }

    pub fn remove_endpoints(&self) {
        let _ = std::fs::remove_file(self.config.data_dir.join("hub.json"));
    }

    /// Adopts every workspace known to the database or present as a
    /// directory under `mirrors/`, then reconciles each mirror with its
    /// journal (a stat walk; only changed files are hashed).
    pub async fn startup_scan(self: &Arc<Self>) -> anyhow::Result<()> {
        let hub = self.clone();
        let ids = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<WorkspaceId>> {
            let mut ids: Vec<WorkspaceId> = hub.db.workspaces()?.into_iter().map(|w| w.id).collect();
            for entry in std::fs::read_dir(&hub.mirrors).with_context(|| format!("list {}", hub.mirrors.display()))? {
                let entry = entry?;
                if !entry.file_type()?.is_dir() {
                    continue;
                }
                if let Some(id) = entry.file_name().to_str().and_then(|n| WorkspaceId::new(n).ok())
                    && !ids.contains(&id)
                {
                    tracing::info!(workspace = %id, "adopting a mirror directory not yet in the database");
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .await??;
        // A mirror made before the registry existed (or while it was on
        // another database) gets an active session, so it is not an orphan.
        let created = self
            .registry
            .ensure_sessions(&ids)
            .await
            .context("record the mirrors' sessions in the registry")?;
        let active = self
            .active_sessions()
            .await
            .context("read the active sessions")?;
        // Skills before any mirror is scanned: half-done registrations are
        // finished or rolled back, and every scan sees the links.
        crate::skills::load(self).await?;
        tracing::info!(
            mirrors = ids.len(),
            sessions_created = created,
            active_sessions = active.len(),
            "registry sessions checked"
        );
        for id in ids {
            let hub = self.clone();
            let opened = tokio::task::spawn_blocking(move || hub.open_workspace(&id)).await?;
            let (ws, _) = match opened {
                Ok(opened) => opened,
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "cannot open a workspace mirror; it stays offline");
                    continue;
                }
            };
            if let Err(err) =
                crate::observe::observe_workspace(self, &ws, crate::observe::Scope::Full).await
            {
                tracing::error!(workspace = %ws.id, error = %format!("{err:#}"), "startup scan failed");
            }
            if let Err(err) = crate::skills::find_candidates(self, &ws.id) {
                tracing::error!(workspace = %ws.id, error = %format!("{err:#}"), "listing skill candidates failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(kind: Kind, ino: u64, mtime_ns: i64) -> Stat {
        Stat {
            kind,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
            ino,
            dev: 1,
            mode: 0o644,
        }
    }

    #[test]
    fn a_gate_holds_waiters_until_it_opens_and_stays_open() {
        let gate = Arc::new(Gate::default());
        let passed = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (gate, passed) = (gate.clone(), passed.clone());
            std::thread::spawn(move || {
                gate.wait();
                passed.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!passed.load(Ordering::SeqCst), "passed a closed gate");
        gate.open();
        waiter.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
        // Open for good: later waits return at once.
        gate.wait();
    }

    #[test]
    fn own_writes_match_only_what_the_hub_left() {
        let file = stat(Kind::File, 7, 100);
        let own = OwnWrite::File(file);
        assert!(own.matches(Some(&file)));
        assert!(
            !own.matches(Some(&stat(Kind::File, 7, 101))),
            "changed since"
        );
        assert!(!own.matches(Some(&stat(Kind::File, 8, 100))), "replaced");
        assert!(!own.matches(None), "removed");

        let dir = OwnWrite::Dir { dev: 1, ino: 9 };
        // Entries landing in it move its times: still the hub's directory.
        assert!(dir.matches(Some(&stat(Kind::Dir, 9, 500))));
        assert!(!dir.matches(Some(&stat(Kind::Dir, 10, 100))), "replaced");
        assert!(!dir.matches(Some(&stat(Kind::File, 9, 100))));
        assert!(!dir.matches(None));

        assert!(OwnWrite::Absent.matches(None));
        assert!(!OwnWrite::Absent.matches(Some(&file)), "created since");
    }
}
