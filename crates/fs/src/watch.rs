//! OS file watching (inotify through `notify`). Raw events are handed to a
//! callback as absolute paths, keeping only the paths the caller's `keep`
//! accepts: events on internal paths (staging) are dropped on the watcher's
//! thread, before any queue, so a busy owner never accumulates them. The
//! caller maps paths to workspaces and debounces. A queue overflow or watcher
//! error is reported as `WatchEvent::Rescan`, never swallowed. Symlinks are
//! not followed: like the scanner, the watcher stays inside the root.

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
        // Symlinks are entries, never followed: a link to a large tree
        // outside the root made notify walk and watch all of it (and a
        // link to `/` ran out of inotify watches, so nothing was watched).
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut inner = notify::RecommendedWatcher::new(
            move |event: notify::Result<notify::Event>| match event {
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
            },
            config,
        )
        .map_err(|e| FsError::io("start watcher", dir.display(), std::io::Error::other(e)))?;
        inner
            .watch(dir, RecursiveMode::Recursive)
            .map_err(|e| FsError::io("watch", dir.display(), std::io::Error::other(e)))?;
        Ok(Watcher { _inner: inner })
    }

    /// `new`, except that a debug build given the test fault `watch:fail`
    /// fails the way a watcher past an inotify limit does (for tests of the
    /// owners' fallback to periodic rescans).
    pub fn start(
        dir: &Path,
        keep: impl Fn(&Path) -> bool + Send + 'static,
        deliver: impl FnMut(WatchEvent) + Send + 'static,
        test_fault: Option<&str>,
    ) -> Result<Watcher, FsError> {
        if cfg!(debug_assertions) && test_fault == Some("watch:fail") {
            return Err(FsError::io(
                "watch",
                dir.display(),
                std::io::Error::other("GM_TEST_FAULT=watch:fail"),
            ));
        }
        Watcher::new(dir, keep, deliver)
    }
}

/// The workspace-relative form of an absolute path under `root`, if valid
/// and not internal.
pub fn relative(root: &Path, path: &Path) -> Option<gm_core::RelPath> {
    let rest = path.strip_prefix(root).ok()?;
    let text = rest.to_str()?;
    gm_core::RelPath::new(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A change behind a symlink to a directory outside the root is not
    /// reported (the link is not followed); a change inside the root, made
    /// after it, is. inotify delivers one instance's events in order, so
    /// once the inside change arrives, an outside one would have come first.
    #[test]
    fn changes_behind_a_symlink_out_of_the_root_are_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("inner")).unwrap();
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let (tx, rx) = mpsc::channel();
        let _watcher = Watcher::new(
            &root,
            |_| true,
            move |event| {
                let _ = tx.send(event);
            },
        )
        .unwrap();
        std::fs::write(outside.join("deep/out.txt"), b"outside").unwrap();
        std::fs::write(outside.join("top.txt"), b"outside").unwrap();
        std::fs::write(root.join("inner/in.txt"), b"inside").unwrap();
        let mut seen: Vec<PathBuf> = Vec::new();
        while !seen.iter().any(|p| p.ends_with("inner/in.txt")) {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(WatchEvent::Changed(paths)) => seen.extend(paths),
                Ok(WatchEvent::Rescan(why)) => panic!("rescan: {why}"),
                Err(_) => panic!("the change inside the root was not reported: {seen:?}"),
            }
        }
        let behind = root.join("link");
        assert!(
            seen.iter().all(|p| !p.starts_with(&behind)),
            "a change behind the link was reported: {seen:?}"
        );
    }
}
