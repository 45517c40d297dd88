//! The orphan purge: mirrors whose session is not active.
//!
//! A mirror qualifies when the registry does not list its workspace as an
//! active session, no node is subscribed to it, and nothing in it changed
//! for `GM_PURGE_GRACE`. It is first moved (one rename) to
//! `DATA_DIR/trash/<id>-<utc>/` and its journal is forgotten; trash entries
//! older than `GM_TRASH_RETENTION` are deleted. If the active set cannot be
//! read, or is empty while mirrors exist, nothing is purged and an error is
//! logged: an outage must never turn into deleting every workspace.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use gm_core::WorkspaceId;

use crate::state::{Counters, Hub};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeAction {
    pub workspace: String,
    pub action: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct PurgeReport {
    pub actions: Vec<PurgeAction>,
    /// Why the purge refused to run, if it did.
    pub refused: Option<String>,
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Newest change time (mtime or ctime, seconds) of anything in the tree,
/// the internal directory excluded. Blocking.
fn last_touched(dir: &Path) -> std::io::Result<i64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let mut newest = meta.mtime().max(meta.ctime());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            if current == dir && entry.file_name() == gm_core::INTERNAL_DIR {
                continue;
            }
            let meta = entry.metadata()?;
            newest = newest.max(meta.mtime()).max(meta.ctime());
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(newest)
}

/// Runs one purge pass (or plans it, with `dry_run`).
pub async fn run(hub: &Arc<Hub>, dry_run: bool) -> PurgeReport {
    let mut report = PurgeReport::default();
    let mirrors = match list_mirrors(&hub.mirrors) {
        Ok(mirrors) => mirrors,
        Err(err) => {
            let why = format!("cannot list {}: {err}", hub.mirrors.display());
            tracing::error!(reason = %why, "purge skipped; nothing was purged");
            report.refused = Some(why);
            return report;
        }
    };
    let active = match hub.active_sessions().await {
        Ok(active) => active,
        Err(err) => {
            let why = format!("cannot read the active sessions: {err}");
            tracing::error!(reason = %why, "purge skipped; nothing was purged");
            report.refused = Some(why);
            return report;
        }
    };
    if active.is_empty() && !mirrors.is_empty() {
        let why = format!(
            "the active set is empty while {} mirrors exist; an outage looks like this, so nothing is purged",
            mirrors.len()
        );
        tracing::error!(reason = %why, "purge skipped; nothing was purged");
        report.refused = Some(why);
    } else {
        for id in mirrors.iter().filter(|id| !active.contains(*id)) {
            match purge_one(hub, id, dry_run).await {
                Ok(action) => report.actions.push(action),
                Err(err) => {
                    tracing::error!(workspace = %id, error = %format!("{err:#}"), "purging a mirror failed")
                }
            }
        }
    }
    match empty_trash(hub, dry_run) {
        Ok(deleted) => report.actions.extend(deleted),
        Err(err) => tracing::error!(error = %format!("{err:#}"), "emptying the trash failed"),
    }
    report
}

fn list_mirrors(mirrors: &Path) -> std::io::Result<BTreeSet<WorkspaceId>> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(mirrors)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| WorkspaceId::new(n).ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

async fn purge_one(hub: &Arc<Hub>, id: &WorkspaceId, dry_run: bool) -> anyhow::Result<PurgeAction> {
    let mirror = hub.mirrors.join(id.as_str());
    let open = hub.workspace(id);
    if let Some(ws) = &open {
        let subscribers = ws
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if subscribers > 0 {
            return Ok(PurgeAction {
                workspace: id.to_string(),
                action: "keep",
                path: mirror,
                reason: format!("session is not active but {subscribers} node(s) are connected"),
            });
        }
    }
    // Hold the commit lock so no commit lands while the mirror moves.
    let _guard = match &open {
        Some(ws) => Some(ws.seq.clone().lock_owned().await),
        None => None,
    };
    let grace = hub.config.purge_grace;
    let scanned = mirror.clone();
    let touched = tokio::task::spawn_blocking(move || last_touched(&scanned)).await??;
    let idle = Duration::from_secs((now_secs() - touched).max(0) as u64);
    if idle < grace {
        return Ok(PurgeAction {
            workspace: id.to_string(),
            action: "keep",
            path: mirror,
            reason: format!(
                "session is not active but the mirror changed {}s ago (grace {}s)",
                idle.as_secs(),
                grace.as_secs()
            ),
        });
    }
    let trash = hub.config.data_dir.join("trash");
    let target = trash_target(&trash, id.as_str());
    let reason = format!("session is not active; untouched for {}s", idle.as_secs());
    if !dry_run {
        std::fs::create_dir_all(&trash).with_context(|| format!("create {}", trash.display()))?;
        std::fs::rename(&mirror, &target)
            .with_context(|| format!("move {} to {}", mirror.display(), target.display()))?;
        hub.forget_workspace(id);
        let db = hub.db.clone();
        let forget = id.clone();
        tokio::task::spawn_blocking(move || db.forget_workspace(&forget)).await??;
        Counters::add(&hub.counters.purges, 1);
        tracing::warn!(workspace = %id, trash = %target.display(), idle_secs = idle.as_secs(), "purged an orphan mirror to the trash");
    }
    Ok(PurgeAction {
        workspace: id.to_string(),
        action: "trash",
        path: target,
        reason,
    })
}

/// A free name in the trash for `label`: `<label>-<utc>`, or
/// `<label>-<n>-<utc>` when that is taken. The time stays last, where
/// `empty_trash` reads it.
pub(crate) fn trash_target(trash: &Path, label: &str) -> PathBuf {
    let stamp = gm_core::format_utc(now_secs());
    let mut target = trash.join(format!("{label}-{stamp}"));
    let mut attempt = 1;
    while target.exists() {
        target = trash.join(format!("{label}-{attempt}-{stamp}"));
        attempt += 1;
    }
    target
}

fn empty_trash(hub: &Hub, dry_run: bool) -> anyhow::Result<Vec<PurgeAction>> {
    let trash = hub.config.data_dir.join("trash");
    let mut deleted = Vec::new();
    let entries = match std::fs::read_dir(&trash) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
        Err(err) => return Err(err).with_context(|| format!("list {}", trash.display())),
    };
    let retention = hub.config.trash_retention.as_secs() as i64;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, stamp)) = name.rsplit_once('-') else {
            continue;
        };
        let Some(at) = gm_core::parse_utc(stamp) else {
            continue;
        };
        let age = now_secs() - at;
        if age < retention {
            continue;
        }
        if !dry_run {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("delete {}", entry.path().display()))?;
            tracing::warn!(workspace = %id, path = %entry.path().display(), age_secs = age, "deleted a purged mirror after its retention");
        }
        deleted.push(PurgeAction {
            workspace: id.to_string(),
            action: "delete",
            path: entry.path(),
            reason: format!("in the trash for {age}s (retention {retention}s)"),
        });
    }
    Ok(deleted)
}
