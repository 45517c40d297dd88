//! The hub's background work, one task owned by `run`:
//! - the OS watcher on `mirrors/` (started by `watch` before the startup
//!   scan), debounced: paths quiet for `debounce`
//!   (or waiting longer than `debounce_max`) are observed and journaled,
//!   except those still exactly as one of the hub's recorded commits left
//!   them (its own writes, reported back);
//!   a watcher overflow triggers a full (cached) rescan of every mirror;
//! - every tick: racily-clean cache records past their window are
//!   re-verified, halted workspaces are looked at again, stale uploads are
//!   dropped, skill candidates quiet for `GM_SKILL_PROMOTE_QUIET` are
//!   promoted, and every `rescan_interval` each mirror gets a full stat walk
//!   (every `unwatched_rescan_interval` while the watcher is missing or
//!   past the inotify watch limit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_core::{RelPath, WorkspaceId};
use gm_fs::watch::{WatchEvent, Watcher, rescan_interval};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::observe::{Scope, observe_events, observe_workspace, recheck_halted, under_commit_lock};
use crate::state::{Hub, Workspace};

const TICK: Duration = Duration::from_millis(250);
const UPLOAD_TTL: Duration = Duration::from_secs(15 * 60);
/// How often node tokens are re-read from the registry (revocations made
/// through another hub take at most this long).
const TOKEN_REFRESH: Duration = Duration::from_secs(5);
/// How often staging is checked for stale entries (at most).
const RECLAIM_EVERY: Duration = Duration::from_secs(60);

/// What a watcher event means for the mirrors.
enum Dirty {
    Path(WorkspaceId, RelPath),
    Workspace(WorkspaceId),
}

fn classify(mirrors: &std::path::Path, path: &std::path::Path) -> Option<Dirty> {
    let rest = path.strip_prefix(mirrors).ok()?;
    let mut components = rest.components();
    let id = components.next()?.as_os_str().to_str()?;
    let id = WorkspaceId::new(id).ok()?;
    let inner: PathBuf = components.collect();
    if inner.as_os_str().is_empty() {
        return Some(Dirty::Workspace(id));
    }
    // Internal paths (staging) are ours and never journaled.
    let rel = RelPath::new(inner.to_str()?).ok()?;
    Some(Dirty::Path(id, rel))
}

/// The OS watcher on `mirrors/` and the queue of what it reports. The hub
/// starts it before its startup scan walks any mirror, so a change made
/// while (or right after) a mirror is walked is queued, not missed until the
/// next periodic rescan.
pub struct Watching {
    _watcher: Option<Watcher>,
    events: mpsc::UnboundedReceiver<WatchEvent>,
    /// Keeps the queue open when the watcher could not start (its sender
    /// went with it): a closed queue ended the maintenance loop, and with
    /// it the periodic rescans meant to stand in for the watcher.
    _open: mpsc::UnboundedSender<WatchEvent>,
}

/// Starts watching `mirrors/` (every directory of every mirror: this walks
/// the tree once, reading directories only). A watcher that cannot start
/// is logged; periodic rescans remain.
pub fn watch(hub: &Hub) -> Watching {
    let (tx, events) = mpsc::unbounded_channel::<WatchEvent>();
    let mirrors = hub.mirrors.clone();
    // Only mirrors are watched (staging lives beside `mirrors/`; anything
    // else there is neither watched nor reported): every file the hub
    // stages makes several events, and a 200,000-file initial sync once
    // queued millions of them while the hub was busy committing.
    let keep = move |path: &std::path::Path| classify(&mirrors, path).is_some();
    let started = Instant::now();
    let open = tx.clone();
    let watcher = Watcher::start(
        &hub.mirrors,
        keep,
        move |event| {
            let _ = tx.send(event);
        },
        hub.config.test_fault.as_deref(),
    );
    let watcher = match watcher {
        Ok(watcher) => {
            let _ = hub.watch_state.set(watcher.state());
            Some(watcher)
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot watch the mirrors; falling back to periodic scans only");
            None
        }
    };
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        directories = watcher.as_ref().map_or(0, Watcher::directories),
        complete = watcher.as_ref().is_some_and(Watcher::complete),
        "watching the mirrors"
    );
    Watching {
        _watcher: watcher,
        events,
        _open: open,
    }
}

pub async fn run(hub: Arc<Hub>, watching: Watching, shutdown: CancellationToken) {
    let Watching {
        _watcher: watcher,
        events: mut rx,
        _open,
    } = watching;
    let mut dirty: BTreeMap<WorkspaceId, BTreeSet<RelPath>> = BTreeMap::new();
    let mut dirty_all: BTreeSet<WorkspaceId> = BTreeSet::new();
    let mut first_event: Option<Instant> = None;
    let mut last_event = Instant::now();
    let mut timers = Timers {
        full: Instant::now(),
        reclaim: Instant::now(),
        purge: Instant::now(),
        tokens: Instant::now(),
    };
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = first_event
            .map(|first| (last_event + hub.config.debounce).min(first + hub.config.debounce_max));
        let sleep_until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = rx.recv() => {
                let Some(event) = event else { break };
                match event {
                    WatchEvent::Changed(paths) => {
                        for path in paths {
                            match classify(&hub.mirrors, &path) {
                                Some(Dirty::Path(ws, rel)) => { dirty.entry(ws).or_default().insert(rel); }
                                Some(Dirty::Workspace(ws)) => { dirty_all.insert(ws); }
                                None => continue,
                            }
                            last_event = Instant::now();
                            first_event.get_or_insert(last_event);
                        }
                    }
                    WatchEvent::Rescan(why) => {
                        tracing::warn!(reason = %why, "watcher lost events; rescanning every mirror");
                        for ws in hub.all_workspaces() {
                            dirty_all.insert(ws.id.clone());
                        }
                        last_event = Instant::now();
                        first_event.get_or_insert(last_event);
                    }
                }
            }
            () = tokio::time::sleep_until(sleep_until.into()), if deadline.is_some() => {
                first_event = None;
                let paths = std::mem::take(&mut dirty);
                let whole = std::mem::take(&mut dirty_all);
                let mut failed = Vec::new();
                for (id, set) in paths {
                    if whole.contains(&id) {
                        continue;
                    }
                    if let Some(ws) = hub.workspace(&id)
                        && !log_observed(&ws, observe_events(&hub, &ws, set).await)
                    {
                        failed.push(id);
                    }
                }
                for id in whole {
                    if let Some(ws) = hub.workspace(&id)
                        && !observe_logged(&hub, &ws, Scope::Full).await
                    {
                        failed.push(id);
                    }
                }
                // What a failed observation was about is still unjournaled:
                // the whole mirror is observed again in a second (not at
                // the next periodic rescan).
                if !failed.is_empty() {
                    dirty_all.extend(failed);
                    let now = Instant::now();
                    first_event = Some(now);
                    last_event = now + hub.config.debounce_max;
                }
            }
            _ = ticker.tick() => {
                let interval = rescan_interval(
                    watcher.as_ref(),
                    hub.config.rescan_interval,
                    hub.config.unwatched_rescan_interval,
                );
                tick(&hub, &mut timers, interval).await;
            }
        }
    }
}

/// False (after logging why) when the observation failed.
async fn observe_logged(hub: &Arc<Hub>, ws: &Arc<Workspace>, scope: Scope) -> bool {
    log_observed(ws, observe_workspace(hub, ws, scope).await)
}

fn log_observed(ws: &Workspace, result: anyhow::Result<usize>) -> bool {
    match result {
        Ok(_) => true,
        Err(err) => {
            tracing::error!(workspace = %ws.id, error = %format!("{err:#}"), "scanning the mirror failed; trying again");
            false
        }
    }
}

/// When each periodic job last ran.
struct Timers {
    full: Instant,
    reclaim: Instant,
    purge: Instant,
    tokens: Instant,
}

/// The periodic work; a full rescan is due every `rescan_interval`
/// (shorter while part of the mirrors, or all, is unwatched).
async fn tick(hub: &Arc<Hub>, timers: &mut Timers, rescan_interval: Duration) {
    let now = Instant::now();
    // Node tokens made or revoked through another hub on the same database.
    if now.duration_since(timers.tokens) >= TOKEN_REFRESH {
        timers.tokens = now;
        if let Err(err) = hub.access.refresh(&hub.registry).await {
            tracing::warn!(error = %err, "cannot refresh the node tokens; keeping the last known ones");
        }
    }
    let (last_full, last_reclaim, last_purge) =
        (&mut timers.full, &mut timers.reclaim, &mut timers.purge);
    if now.duration_since(*last_purge) >= hub.config.purge_interval {
        *last_purge = now;
        let report = crate::purge::run(hub, false).await;
        if !report.actions.is_empty() {
            tracing::info!(actions = report.actions.len(), "purge pass done");
        }
    }
    if now.duration_since(*last_reclaim) >= RECLAIM_EVERY.min(hub.config.staging_ttl) {
        *last_reclaim = now;
        for ws in hub.all_workspaces() {
            let (hub2, ws2) = (hub.clone(), ws.clone());
            let ttl = hub.config.staging_ttl;
            match tokio::task::spawn_blocking(move || ws2.root().reclaim_staging(ttl)).await {
                Ok(Ok(reclaimed)) => hub2.log_reclaimed(
                    &ws.id,
                    &ws.root(),
                    &reclaimed,
                    "older than GM_STAGING_TTL and not owned by a live transfer",
                ),
                Ok(Err(err)) => {
                    tracing::warn!(workspace = %ws.id, error = %err, "staging reclamation failed")
                }
                Err(err) => {
                    tracing::warn!(workspace = %ws.id, error = %err, "staging reclamation failed")
                }
            }
        }
    }
    let full = now.duration_since(*last_full) >= rescan_interval;
    if full {
        *last_full = now;
    }
    for ws in hub.all_workspaces() {
        ws.expire_own_writes();
        if ws.halted().is_some() {
            if let Err(err) = under_commit_lock(hub, &ws, recheck_halted).await {
                tracing::error!(workspace = %ws.id, error = %format!("{err:#}"), "re-checking a halted workspace failed");
            }
            continue;
        }
        if full {
            observe_logged(hub, &ws, Scope::Full).await;
            continue;
        }
        let due: Vec<RelPath> = {
            let racy = ws.racy.lock().unwrap_or_else(|p| p.into_inner());
            racy.iter()
                .filter(|(_, at)| **at <= now)
                .map(|(p, _)| p.clone())
                .take(10_000)
                .collect()
        };
        if !due.is_empty() {
            observe_logged(hub, &ws, Scope::Exact(due)).await;
        }
    }
    crate::skills::promote_quiet(hub).await;
    let mut uploads = hub.uploads.lock().unwrap_or_else(|p| p.into_inner());
    uploads.retain(|_, upload| now.duration_since(upload.at) < UPLOAD_TTL);
}
