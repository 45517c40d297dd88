//! OS file watching (inotify through `notify`). Raw events are handed to a
//! callback as absolute paths, keeping only the paths the caller's `keep`
//! accepts: events on internal paths (staging) are dropped on the watcher's
//! thread, before any queue, so a busy owner never accumulates them. The
//! caller maps paths to workspaces and debounces. A queue overflow or watcher
//! error is reported as `WatchEvent::Rescan`, never swallowed.

use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::error::FsError;

#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Something changed at or under these paths.
    Changed(Vec<PathBuf>),
    /// Events were lost: rescan everything under the watched directory.
    Rescan(String),
}

/// Keeps a recursive watch alive until dropped.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

impl Watcher {
    pub fn new(
        dir: &Path,
        keep: impl Fn(&Path) -> bool + Send + 'static,
        mut deliver: impl FnMut(WatchEvent) + Send + 'static,
    ) -> Result<Watcher, FsError> {
        let mut inner =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) => {
                    if event.need_rescan() {
                        deliver(WatchEvent::Rescan("watcher queue overflowed".into()));
                    } else if !matches!(event.kind, EventKind::Access(_)) {
                        let paths: Vec<PathBuf> =
                            event.paths.into_iter().filter(|p| keep(p)).collect();
                        if !paths.is_empty() {
                            deliver(WatchEvent::Changed(paths));
                        }
                    }
                }
                Err(err) => deliver(WatchEvent::Rescan(format!("watcher error: {err}"))),
            })
            .map_err(|e| FsError::io("start watcher", dir.display(), std::io::Error::other(e)))?;
        inner
            .watch(dir, RecursiveMode::Recursive)
            .map_err(|e| FsError::io("watch", dir.display(), std::io::Error::other(e)))?;
        Ok(Watcher { _inner: inner })
    }
}

/// The workspace-relative form of an absolute path under `root`, if valid
/// and not internal.
pub fn relative(root: &Path, path: &Path) -> Option<gm_core::RelPath> {
    let rest = path.strip_prefix(root).ok()?;
    let text = rest.to_str()?;
    gm_core::RelPath::new(text).ok()
}
