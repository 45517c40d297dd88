//! Disk -> journal: finds what changed in a mirror (written by hub-side
//! tools, or anything else not done through a node commit) and journals it
//! with origin "hub", so it reaches every node.
//!
//! Invariants:
//! - A path that exists but could not be read is never journaled as deleted.
//! - Safety brake: a mirror directory that vanished or was replaced, or that
//!   turns up empty while its journal lists live entries, halts the
//!   workspace and journals nothing, until `confirm-empty` says it was
//!   deliberate or the same directory is back with content.
//! - Cache records taken within the racily-clean window are re-verified once
//!   the window has passed (`Scope::Exact`), so a restart trusts them.
//! - Skills: a scan that touches `.skills` runs the link pass first
//!   (`skills::link_locked`); a canonical link `.skills/<name>` is never
//!   journaled as a link, it stands for the registry's tree of that skill
//!   (`Skills::overlay`), and the scanner never walks through it.

use std::collections::BTreeSet;

use gm_core::minimal_tops;
use std::sync::Arc;

use anyhow::Context;
use gm_core::skills::skill_component;
use gm_core::{CacheRecords, Entry, RelPath, SKILLS_DIR, Seq, Versioned};
use gm_fs::{IgnoreRules, Root};
use gm_store::RecordBatch;

use crate::state::{Counters, Hub, Workspace};

#[derive(Debug, Clone)]
pub enum Scope {
    /// The whole mirror.
    Full,
    /// These paths and everything under them.
    Subtrees(Vec<RelPath>),
    /// Exactly these paths (no recursion): re-verification of racy records.
    Exact(Vec<RelPath>),
}

/// Runs `work` under the workspace's commit lock (its guard owns the
/// journal seq), on a blocking thread.
pub async fn under_commit_lock<T: Send + 'static>(
    hub: &Arc<Hub>,
    ws: &Arc<Workspace>,
    work: impl FnOnce(&Hub, &Workspace, &mut Seq) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let mut guard = ws.seq.clone().lock_owned().await;
    let (hub, ws) = (hub.clone(), ws.clone());
    tokio::task::spawn_blocking(move || work(&hub, &ws, &mut guard))
        .await
        .context("observe task")?
}

/// Observes under the workspace's commit lock, on a blocking thread.
pub async fn observe_workspace(
    hub: &Arc<Hub>,
    ws: &Arc<Workspace>,
    scope: Scope,
) -> anyhow::Result<usize> {
    under_commit_lock(hub, ws, move |hub, ws, seq| {
        observe_locked(hub, ws, seq, scope, false)
    })
    .await
}

/// Observes the paths of watcher events, except those still exactly as
/// one of the hub's recorded commits left them (its own writes, reported
/// back). Filtered under the commit lock: a commit still landing files
/// when the events come has recorded them (and its own writes) by then.
pub async fn observe_events(
    hub: &Arc<Hub>,
    ws: &Arc<Workspace>,
    paths: BTreeSet<RelPath>,
) -> anyhow::Result<usize> {
    under_commit_lock(hub, ws, move |hub, ws, seq| {
        let paths = ws.not_own_writes(paths);
        if paths.is_empty() {
            return Ok(0);
        }
        let scope = Scope::Subtrees(paths.into_iter().collect());
        observe_locked(hub, ws, seq, scope, false)
    })
    .await
}

/// Drops the cache record and chunk rows of `path`, then observes it
/// (hashing it again if it is there): for a path that turned out not to
/// hold what they said (a chunk source that failed its check).
pub async fn forget_and_observe(
    hub: &Arc<Hub>,
    ws: &Arc<Workspace>,
    path: RelPath,
) -> anyhow::Result<usize> {
    under_commit_lock(hub, ws, move |hub, ws, seq| {
        let forget = RecordBatch {
            origin: "hub".into(),
            cache_del: vec![path.clone()],
            ..Default::default()
        };
        hub.db.record(&ws.id, &forget)?;
        observe_locked(hub, ws, seq, Scope::Subtrees(vec![path]), false)
    })
    .await
}

pub fn halt(hub: &Hub, ws: &Workspace, reason: String) {
    let mut halted = ws.halted.lock().unwrap_or_else(|p| p.into_inner());
    if halted.as_deref() != Some(reason.as_str()) {
        tracing::error!(workspace = %ws.id, reason = %reason, "workspace halted by the safety brake; nothing is propagated");
        if let Err(err) = hub.db.set_halted(&ws.id, Some(&reason)) {
            tracing::error!(workspace = %ws.id, error = %err, "cannot record the halt");
        }
    }
    *halted = Some(reason);
}

fn unhalt(hub: &Hub, ws: &Workspace) -> anyhow::Result<()> {
    hub.db.set_halted(&ws.id, None)?;
    *ws.halted.lock().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}

/// True when a scan of `scope` looks at `.skills` or something in it.
fn touches_skills(scope: &Scope) -> bool {
    let touches = |path: &RelPath| path.as_str() == SKILLS_DIR || skill_component(path).is_some();
    match scope {
        Scope::Full => true,
        Scope::Subtrees(paths) | Scope::Exact(paths) => paths.iter().any(touches),
    }
}

/// The body of an observation; the caller holds the commit lock (`seq`).
/// `allow_empty` is set when an emptying was confirmed. A scope that
/// touches `.skills` runs the skills' link pass first.
pub fn observe_locked(
    hub: &Hub,
    ws: &Workspace,
    seq: &mut Seq,
    scope: Scope,
    allow_empty: bool,
) -> anyhow::Result<usize> {
    if touches_skills(&scope) && ws.halted().is_none() {
        crate::skills::link_locked(hub, ws, seq)?;
    }
    observe_unlinked(hub, ws, seq, scope, allow_empty)
}

/// An observation without the link pass (the link pass itself uses it).
pub fn observe_unlinked(
    hub: &Hub,
    ws: &Workspace,
    seq: &mut Seq,
    scope: Scope,
    allow_empty: bool,
) -> anyhow::Result<usize> {
    let started = std::time::Instant::now();
    let result = observe_inner(hub, ws, seq, scope, allow_empty);
    hub.counters.scan_seconds.observe(started.elapsed());
    result
}

fn observe_inner(
    hub: &Hub,
    ws: &Workspace,
    seq: &mut Seq,
    scope: Scope,
    allow_empty: bool,
) -> anyhow::Result<usize> {
    if ws.halted().is_some() {
        return Ok(0);
    }
    let root = ws.root();
    if !root.still_in_place() {
        halt(
            hub,
            ws,
            format!(
                "mirror directory {} was removed or replaced; run `ghostmirror confirm-empty --data-dir {} {}` if that was deliberate",
                ws.mirror_path.display(),
                hub.config.data_dir.display(),
                ws.id
            ),
        );
        return Ok(0);
    }
    // Paths inside a linked skill are looked at through the skill's top.
    let (tops, recursive): (Vec<Option<RelPath>>, bool) = match scope {
        Scope::Full => (vec![None], true),
        Scope::Subtrees(paths) => (
            minimal_tops(hub.skills.scan_tops(paths, false))
                .into_iter()
                .map(Some)
                .collect(),
            true,
        ),
        Scope::Exact(paths) => {
            let kept = hub.skills.scan_tops(paths.clone(), true);
            if kept.len() != paths.len() {
                let mut pending = ws.racy.lock().unwrap_or_else(|p| p.into_inner());
                for path in paths.iter().filter(|p| !kept.contains(p)) {
                    pending.remove(path);
                }
            }
            (kept.into_iter().map(Some).collect(), false)
        }
    };

    let mut creations: Vec<(RelPath, Entry)> = Vec::new();
    let mut deletions: Vec<RelPath> = Vec::new();
    let mut batch = RecordBatch {
        origin: "hub".into(),
        ..Default::default()
    };
    let mut racy = Vec::new();
    let rules = IgnoreRules::load(&root);
    for problem in &rules.problems {
        tracing::warn!(workspace = %ws.id, problem = %problem, "ignore rules");
    }
    // A second thread loads each top's cache records and journal entries
    // while this one walks it (the restart of a 100,000-file mirror spent
    // 300 ms loading them before walking).
    gm_fs::walk_while_loading(
        &root,
        &tops,
        recursive,
        &hub.config.scan,
        &rules,
        |top| known_under(hub, ws, top, recursive),
        || hub.watching.wait(),
        |top, walk, (cache, journal)| -> anyhow::Result<()> {
            let scan = gm_fs::hash_walked(&root, walk, &cache, &hub.config.scan);
            drop(cache);
            Counters::add(&hub.counters.files_hashed, scan.hashed);
            Counters::add(&hub.counters.hash_cache_hits, scan.cache_hits);
            for problem in &scan.problems {
                tracing::warn!(workspace = %ws.id, problem = %problem, "skipped while scanning the mirror");
            }
            // A skill's link stands for the skill's tree; an unavailable
            // skill's paths stay as the journal has them.
            let (mut disk, frozen) = hub.skills.overlay(
                top,
                scan.entries
                    .into_iter()
                    .map(|item| (item.path, item.entry))
                    .collect(),
            );
            // The scan is in path order; a skill's tree is appended.
            disk.sort_by(|a, b| a.0.cmp(&b.0));
            let is_frozen =
                |path: &RelPath| frozen.iter().any(|f| f == path || f.is_ancestor_of(path));
            // Ignored paths are neither journaled nor deleted.
            let mut live = journal
                .iter()
                .filter_map(|(path, v)| v.entry.as_ref().map(|e| (path, e)))
                .filter(|(path, e)| !rules.is_ignored(path, e.is_dir()) && !is_frozen(path))
                .peekable();
            let unreadable = |path: &RelPath| {
                scan.unreadable
                    .iter()
                    .any(|u| u == path || u.is_ancestor_of(path))
            };
            // Disk and journal, both in path order, in one merge: what the
            // journal lacks or has otherwise is a creation, what the disk
            // lacks (and could read) a deletion.
            let mut gone = |path: &RelPath| {
                if !unreadable(path) {
                    deletions.push(path.clone());
                }
            };
            for (path, entry) in disk {
                while let Some((known, _)) = live.next_if(|(known, _)| **known < path) {
                    gone(known);
                }
                match live.next_if(|(known, _)| **known == path) {
                    Some((_, known)) if *known == entry => {}
                    _ => creations.push((path, entry)),
                }
            }
            for (known, _) in live {
                gone(known);
            }
            for (path, record) in &scan.cache_updates {
                if record.is_racy(hub.config.scan.racy_window(&root, &record.stat)) {
                    racy.push(path.clone());
                }
            }
            batch.cache_put.extend(scan.cache_updates);
            batch.manifests.extend(scan.manifests);
            batch.cache_del.extend(scan.stale_cache.iter().cloned());
            Ok(())
        },
    )?;

    if !deletions.is_empty() && !allow_empty && root.is_empty()? {
        let counts = hub.db.counts(&ws.id)?;
        let live = counts.files + counts.dirs + counts.symlinks;
        if live > 0 {
            halt(
                hub,
                ws,
                format!(
                    "mirror directory {} is empty but its journal lists {live} entries (an unmounted volume looks like this); nothing was deleted. If the emptying is deliberate run `ghostmirror confirm-empty --data-dir {} {}`",
                    ws.mirror_path.display(),
                    hub.config.data_dir.display(),
                    ws.id
                ),
            );
            return Ok(0);
        }
    }

    // Children go before their parents when deleting, after them when creating.
    deletions.sort();
    deletions.dedup();
    creations.sort_by(|a, b| a.0.cmp(&b.0));
    let mut next = *seq;
    for path in deletions.iter().rev() {
        next = next.next();
        tracing::info!(workspace = %ws.id, path = %path, seq = next.0, "mirror change: deleted");
        batch.changes.push((
            path.clone(),
            Versioned {
                entry: None,
                seq: next,
            },
        ));
    }
    for (path, entry) in creations {
        next = next.next();
        tracing::info!(workspace = %ws.id, path = %path, seq = next.0, kind = entry.kind_name(), "mirror change");
        batch.changes.push((
            path,
            Versioned {
                entry: Some(entry),
                seq: next,
            },
        ));
    }
    for (path, _) in &batch.changes {
        hub.skills.touch_candidate(&ws.id, path);
    }
    let changed = batch.changes.len();
    if changed > 0
        || !batch.cache_put.is_empty()
        || !batch.cache_del.is_empty()
        || !batch.manifests.is_empty()
    {
        hub.db.record(&ws.id, &batch)?;
    }
    if changed > 0 {
        *seq = next;
        ws.committed.send_replace(next.0);
        Counters::add(&hub.counters.hub_side_changes, changed as u64);
    }
    // Re-verified records leave the racy set only now that the database
    // holds their new record (status must never show a settled count early).
    if !recursive {
        let mut pending = ws.racy.lock().unwrap_or_else(|p| p.into_inner());
        for path in tops.iter().flatten() {
            pending.remove(path);
        }
    }
    ws.mark_racy(
        racy,
        std::time::Duration::from_nanos(hub.config.scan.racy_window_ns.max(0) as u64),
    );
    Ok(changed)
}

/// Cache records and journal entries in path order of what an
/// observation of `top` looks at: the path alone when not `recursive`.
#[allow(clippy::type_complexity)]
fn known_under(
    hub: &Hub,
    ws: &Workspace,
    top: Option<&RelPath>,
    recursive: bool,
) -> anyhow::Result<(CacheRecords, Vec<(RelPath, Versioned)>)> {
    Ok(match (top, recursive) {
        (Some(path), false) => (
            hub.db
                .cache_get(&ws.id, path)?
                .map(|record| CacheRecords::from_sorted(vec![(path.clone(), record)]))
                .unwrap_or_default(),
            hub.db
                .entry(&ws.id, path)?
                .map(|v| (path.clone(), v))
                .into_iter()
                .collect(),
        ),
        (top, _) => (
            hub.db.cache_under(&ws.id, top)?,
            hub.db.entries_under(&ws.id, top)?,
        ),
    })
}

/// Looks at a halted workspace again: a confirmed emptying (or replacement)
/// is journaled as it is now; a mirror that is back in place with content
/// resumes. Anything else stays halted.
pub fn recheck_halted(hub: &Hub, ws: &Workspace, seq: &mut Seq) -> anyhow::Result<()> {
    if ws.halted().is_none() {
        return Ok(());
    }
    if hub.db.take_confirm_empty(&ws.id)? {
        if !ws.root().still_in_place() {
            let root =
                Root::create_with_staging(&ws.mirror_path, &hub.tag, &hub.staging_dir(&ws.id))?
                    .with_ownership(hub.config.ownership.clone());
            ws.replace_root(root);
        }
        unhalt(hub, ws)?;
        tracing::warn!(workspace = %ws.id, "emptying confirmed; journaling the mirror as it is now");
        observe_locked(hub, ws, seq, Scope::Full, true)?;
        return Ok(());
    }
    let root = ws.root();
    if root.still_in_place() && !root.is_empty()? {
        unhalt(hub, ws)?;
        tracing::info!(workspace = %ws.id, "mirror directory is back; resuming");
        observe_locked(hub, ws, seq, Scope::Full, false)?;
    }
    Ok(())
}
