//! OS file watching: ghostmirror's own recursive inotify watch. Changed
//! paths are handed to a callback as absolute paths; the caller maps them to
//! workspaces and debounces. What it guarantees:
//! - **Only what the caller keeps is watched.** A directory whose path
//!   `keep` rejects (staging, internal dirs) gets no watch at all, so the
//!   files an owner writes there make no events anywhere (not even dropped
//!   ones), and nothing under it is reported.
//! - **A new directory is watched before it is reported.** A directory
//!   created in or moved into the tree is walked and watched on the
//!   watcher's thread, and only then reported (as one path that stands for
//!   its subtree). The owner scans that subtree after the report, so an
//!   entry made before its directory's watch existed is seen by that scan,
//!   and one made after makes an event.
//! - **A watch follows its directory, not a path** (see `WatchSet`): a
//!   directory moved or exchanged within the tree is reported under its
//!   new path, one moved out of the tree is no longer watched.
//! - **Lost events are never swallowed.** A queue overflow or a read error
//!   is reported as `WatchEvent::Rescan`.
//! - **A partial watch says so.** Past the inotify watch limit, what was
//!   watched stays live and `Watcher::complete` turns false (a new
//!   directory that cannot be watched is still reported, so its contents
//!   are scanned once); the owner then rescans more often
//!   (`GM_UNWATCHED_RESCAN_INTERVAL`).
//! - **Symlinks are not followed:** like the scanner, the watcher stays
//!   inside the root.
//!
//! The watch set is one walk of the tree that reads directories only (one
//! `inotify_add_watch` and one `lstat` per directory, no stat per file).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use crate::error::FsError;

#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Something changed at or under these paths.
    Changed(Vec<PathBuf>),
    /// Events were lost: rescan everything under the watched directory.
    Rescan(String),
}

/// What every directory is watched for. Access and open events are not
/// asked for; a write is reported as it happens (`MODIFY`, for a file kept
/// open and appended to) and when closed.
fn mask() -> WatchMask {
    WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MODIFY
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// Keeps a recursive watch alive until dropped. Dropping it stops its
/// thread and closes the inotify instance.
pub struct Watcher {
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    directories: Arc<AtomicUsize>,
    complete: Arc<AtomicBool>,
}

impl Watcher {
    /// Watches `dir` and every directory under it that `keep` accepts, then
    /// reports changes to `deliver` from a thread of its own. Fails if not
    /// even `dir` can be watched. Past the inotify watch limit the watch is
    /// partial: what it got stays watched, the error is logged, and
    /// `complete` says so (the owner's periodic rescans cover the rest;
    /// failing outright left nothing live at all).
    pub fn new(
        dir: &Path,
        keep: impl Fn(&Path) -> bool + Send + 'static,
        deliver: impl FnMut(WatchEvent) + Send + 'static,
    ) -> Result<Watcher, FsError> {
        Watcher::with_limit(dir, keep, deliver, None)
    }

    /// `new`, with at most `limit` watches (a stand-in for the kernel's
    /// limit, which tests cannot lower for one process).
    fn with_limit(
        dir: &Path,
        keep: impl Fn(&Path) -> bool + Send + 'static,
        deliver: impl FnMut(WatchEvent) + Send + 'static,
        limit: Option<usize>,
    ) -> Result<Watcher, FsError> {
        let fail = |what: &'static str, err: io::Error| FsError::io(what, dir.display(), err);
        let inotify = Inotify::init().map_err(|e| fail("start watcher", e))?;
        let mut set = WatchSet {
            inotify,
            by_wd: HashMap::new(),
            by_path: BTreeMap::new(),
            root: dir.to_path_buf(),
            keep: Box::new(keep),
            directories: Arc::new(AtomicUsize::new(0)),
            complete: Arc::new(AtomicBool::new(true)),
            limit,
        };
        match set.add_tree(dir) {
            Ok(()) => {}
            Err(err) if set.by_path.is_empty() => return Err(fail("watch", err)),
            Err(err) => set.incomplete(dir, &err),
        }
        if set.by_path.is_empty() {
            return Err(fail("watch", io::ErrorKind::NotFound.into()));
        }
        let wake = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| fail("start watcher", e.into()))?,
        );
        let stop = wake.clone();
        let directories = set.directories.clone();
        let complete = set.complete.clone();
        let thread = std::thread::Builder::new()
            .name("gm-watch".into())
            .spawn(move || set.run(&stop, deliver))
            .map_err(|e| fail("start watcher", e))?;
        Ok(Watcher {
            wake,
            thread: Some(thread),
            directories,
            complete,
        })
    }

    /// False while the watch limit leaves part of the tree unwatched: from
    /// the start, or since a directory made later could not be watched.
    /// True again once a walk of the whole tree (after a queue overflow)
    /// watched every directory.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// How many directories are watched now.
    pub fn directories(&self) -> usize {
        self.directories.load(Ordering::Relaxed)
    }

    /// A handle that reads `directories` and `complete` while the watcher
    /// lives (both read 0 and false once it is gone).
    pub fn state(&self) -> WatchState {
        WatchState {
            directories: Arc::downgrade(&self.directories),
            complete: Arc::downgrade(&self.complete),
        }
    }

    /// `new`, except that a debug build given the test fault `watch:fail`
    /// fails the way a watcher without inotify does, and one given
    /// `watch:limit=N` stops at N watches the way one past the kernel's
    /// limit does (for tests of the owners' fallback to periodic rescans).
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
        let limit = test_fault
            .filter(|_| cfg!(debug_assertions))
            .and_then(|fault| fault.strip_prefix("watch:limit="))
            .and_then(|n| n.parse().ok());
        Watcher::with_limit(dir, keep, deliver, limit)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Err(err) = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes()) {
            tracing::warn!(error = %err, "cannot stop the watcher thread");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How often an owner walks its whole tree: every `usual` under a
/// complete watch, and every `unwatched` (if sooner) while there is no
/// watcher or part of the tree is unwatched.
pub fn rescan_interval(
    watcher: Option<&Watcher>,
    usual: Duration,
    unwatched: Duration,
) -> Duration {
    if watcher.is_some_and(Watcher::complete) {
        usual
    } else {
        usual.min(unwatched)
    }
}

/// What a status report says about a watcher (see `Watcher::state`).
#[derive(Debug, Clone, Default)]
pub struct WatchState {
    directories: std::sync::Weak<AtomicUsize>,
    complete: std::sync::Weak<AtomicBool>,
}

impl WatchState {
    pub fn directories(&self) -> usize {
        self.directories
            .upgrade()
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    pub fn complete(&self) -> bool {
        self.complete
            .upgrade()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The watches of one inotify instance, by descriptor and by path. Paths
/// order component-wise, so a subtree's watches are one range of `by_path`.
///
/// A watch belongs to a directory (an inode), not to a path: each records
/// the inode it was added for, and whenever a directory leaves or arrives
/// at a path, the watches under that path are checked against what is
/// there now. A path's watches are never dropped just because a directory
/// left it: with `RENAME_EXCHANGE` the arriving directory's event comes
/// first, and dropping by path would drop its watch.
struct WatchSet {
    inotify: Inotify,
    by_wd: HashMap<WatchDescriptor, Watched>,
    by_path: BTreeMap<PathBuf, WatchDescriptor>,
    root: PathBuf,
    keep: Box<dyn Fn(&Path) -> bool + Send>,
    /// `by_path.len()`, for `Watcher::directories`.
    directories: Arc<AtomicUsize>,
    /// For `Watcher::complete`.
    complete: Arc<AtomicBool>,
    /// At most this many watches (tests only; see `Watcher::with_limit`).
    limit: Option<usize>,
}

/// Where a watched directory is, and which inode was watched there.
struct Watched {
    path: PathBuf,
    ino: u64,
}

/// One event read from the instance, owned (the read buffer is reused).
struct RawEvent {
    wd: WatchDescriptor,
    mask: EventMask,
    name: Option<OsString>,
}

impl WatchSet {
    /// Watches `top` and the directories under it that `keep` accepts. A
    /// directory that vanishes (or turns out not to be one) while walked is
    /// skipped: its parent's watch reports that. Fails only when a watch
    /// cannot be added for another reason (the watch limit, `ENOSPC`).
    fn add_tree(&mut self, top: &Path) -> io::Result<()> {
        self.walk_and_watch(top, &mut |_| {})
    }

    /// `add_tree`, calling `watched` with each descriptor it adds (or finds).
    fn walk_and_watch(
        &mut self,
        top: &Path,
        watched: &mut dyn FnMut(&WatchDescriptor),
    ) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut stack = vec![top.to_path_buf()];
        while let Some(dir) = stack.pop() {
            // The watch comes before the read: an entry made after the
            // read makes an event, one made before it is in the read.
            let mut mask = mask();
            if dir != self.root {
                mask |= WatchMask::DONT_FOLLOW;
            }
            let added = match self.limit {
                Some(limit) if self.by_path.len() >= limit => {
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
                _ => self.inotify.watches().add(&dir, mask),
            };
            let wd = match added {
                Ok(wd) => wd,
                Err(err) if vanished(&err) => continue,
                Err(err) => return Err(err),
            };
            // The inode watched (if the path changed in between, the event
            // of that change checks this record again).
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            watched(&wd);
            self.remember(wd, dir.clone(), meta.ino());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let path = entry.path();
                    if (self.keep)(&path) {
                        stack.push(path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records `wd` as the watch of the directory at `path`. Watching an
    /// inode again returns its descriptor, so a directory moved within the
    /// tree keeps its watch under its new path. A different directory that
    /// was watched at `path` has left it: its watch goes (if it arrives
    /// elsewhere in the tree, that arrival watches it again).
    fn remember(&mut self, wd: WatchDescriptor, path: PathBuf, ino: u64) {
        let record = Watched {
            path: path.clone(),
            ino,
        };
        if let Some(old) = self.by_wd.insert(wd.clone(), record)
            && old.path != path
            && self.by_path.get(&old.path) == Some(&wd)
        {
            self.by_path.remove(&old.path);
        }
        if let Some(previous) = self.by_path.insert(path.clone(), wd.clone())
            && previous != wd
            && self.by_wd.get(&previous).is_some_and(|w| w.path == path)
        {
            self.drop_watch(previous);
        }
        self.counted();
    }

    /// Checks every watch at or under `top` against the directory there
    /// now, and drops those whose directory left (moved away, out of the
    /// tree, or replaced).
    fn verify(&mut self, top: &Path) {
        use std::os::unix::fs::MetadataExt;
        let under: Vec<(PathBuf, WatchDescriptor)> = self
            .by_path
            .range(top.to_path_buf()..)
            .take_while(|(path, _)| path.starts_with(top))
            .map(|(path, wd)| (path.clone(), wd.clone()))
            .collect();
        for (path, wd) in under {
            let here = std::fs::symlink_metadata(&path)
                .ok()
                .filter(|m| m.is_dir())
                .map(|m| m.ino());
            let current = self
                .by_wd
                .get(&wd)
                .is_some_and(|w| w.path == path && Some(w.ino) == here);
            if !current {
                self.by_path.remove(&path);
                if self.by_wd.get(&wd).is_some_and(|w| w.path == path) {
                    self.drop_watch(wd);
                }
            }
        }
        self.counted();
    }

    /// Brings the watch set in line with the tree after events were lost:
    /// a directory made meanwhile gets its watch, one moved within the tree
    /// keeps its descriptor under its new path, and one moved out (or not
    /// found again) loses its watch.
    fn rewatch(&mut self) -> io::Result<()> {
        let mut seen: std::collections::HashSet<WatchDescriptor> = Default::default();
        let root = self.root.clone();
        let walked = self.walk_and_watch(&root, &mut |wd| {
            seen.insert(wd.clone());
        });
        let gone: Vec<WatchDescriptor> = self
            .by_wd
            .keys()
            .filter(|wd| !seen.contains(*wd))
            .cloned()
            .collect();
        for wd in gone {
            self.drop_watch(wd);
        }
        let by_wd = &self.by_wd;
        self.by_path
            .retain(|path, wd| by_wd.get(wd).is_some_and(|w| w.path == *path));
        self.counted();
        match &walked {
            Ok(()) => self.complete.store(true, Ordering::Relaxed),
            Err(err) => self.incomplete(&root, err),
        }
        walked
    }

    /// Records that `dir` (or part of it) could not be watched, logging it
    /// the first time the watch turns incomplete.
    fn incomplete(&self, dir: &Path, err: &io::Error) {
        if self.complete.swap(false, Ordering::Relaxed) {
            tracing::error!(
                dir = %dir.display(),
                watched = self.by_path.len(),
                error = %err,
                "cannot watch every directory (raise fs.inotify.max_user_watches); \
                 the rest is seen by periodic rescans only"
            );
        } else {
            tracing::debug!(dir = %dir.display(), error = %err, "cannot watch a directory");
        }
    }

    /// Forgets `wd` and removes it from the kernel (which fails harmlessly
    /// if the kernel dropped it already).
    fn drop_watch(&mut self, wd: WatchDescriptor) {
        self.forget_wd(&wd);
        let _ = self.inotify.watches().remove(wd);
    }

    /// Forgets `wd` (the kernel dropped it: its directory is gone).
    fn forget_wd(&mut self, wd: &WatchDescriptor) {
        if let Some(watched) = self.by_wd.remove(wd)
            && self.by_path.get(&watched.path) == Some(wd)
        {
            self.by_path.remove(&watched.path);
        }
        self.counted();
    }

    fn counted(&self) {
        self.directories
            .store(self.by_path.len(), Ordering::Relaxed);
    }

    fn run(mut self, stop: &OwnedFd, mut deliver: impl FnMut(WatchEvent)) {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let (ready, stopping) = {
                let mut fds = [
                    PollFd::new(&self.inotify, PollFlags::IN),
                    PollFd::new(stop, PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) => (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(err) => {
                        deliver(WatchEvent::Rescan(format!("watcher poll failed: {err}")));
                        return;
                    }
                }
            };
            if stopping {
                return;
            }
            if !ready {
                continue;
            }
            let events: Vec<RawEvent> = match self.inotify.read_events(&mut buffer) {
                Ok(events) => events
                    .map(|e| RawEvent {
                        wd: e.wd,
                        mask: e.mask,
                        name: e.name.map(|n| n.to_os_string()),
                    })
                    .collect(),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => {
                    deliver(WatchEvent::Rescan(format!("watcher read failed: {err}")));
                    return;
                }
            };
            let (changed, lost) = self.absorb(events);
            if let Some(why) = lost {
                deliver(WatchEvent::Rescan(why));
            }
            if !changed.is_empty() {
                deliver(WatchEvent::Changed(changed));
            }
        }
    }

    /// Applies one read's events to the watch set and returns the paths
    /// they changed (in order, repeats in a row folded) and why events were
    /// lost, if they were. A directory that arrives is watched (and what
    /// was watched at its path before is checked); the watches under a path
    /// a directory left are checked at once, so later events of the same
    /// read from a directory that moved out are not reported.
    fn absorb(&mut self, events: Vec<RawEvent>) -> (Vec<PathBuf>, Option<String>) {
        let mut changed: Vec<PathBuf> = Vec::new();
        let mut lost: Option<String> = None;
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // The lost events may have made, moved or removed
                // directories: watch the tree as it is now.
                lost = Some(match self.rewatch() {
                    Ok(()) => "watcher queue overflowed".into(),
                    Err(err) => {
                        format!("watcher queue overflowed; cannot watch the tree again: {err}")
                    }
                });
                continue;
            }
            if event.mask.contains(EventMask::IGNORED) {
                self.forget_wd(&event.wd);
                continue;
            }
            let Some(watched) = self.by_wd.get(&event.wd) else {
                continue;
            };
            let path = match event.name {
                Some(name) => watched.path.join(name),
                // An event on a watched directory itself: its parent's
                // watch reports it too, except for the root.
                None if watched.path == self.root => watched.path.clone(),
                None => continue,
            };
            if path != self.root && !(self.keep)(&path) {
                continue;
            }
            if event.mask.contains(EventMask::ISDIR) {
                if event.mask.contains(EventMask::MOVED_FROM) {
                    // Later events of this read from a directory that left
                    // must not be reported under its old path.
                    self.verify(&path);
                } else if event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                {
                    let replaced = self
                        .by_path
                        .range(path.clone()..)
                        .next()
                        .is_some_and(|(p, _)| p.starts_with(&path));
                    // One that cannot be watched is still reported (its
                    // contents are scanned now); its later changes wait for
                    // the owner's rescan.
                    if let Err(err) = self.add_tree(&path) {
                        self.incomplete(&path, &err);
                    }
                    if replaced {
                        self.verify(&path);
                    }
                }
            }
            if changed.last() != Some(&path) {
                changed.push(path);
            }
        }
        (changed, lost)
    }
}

/// An error that means the directory is no longer there to watch.
fn vanished(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::EACCES) | Some(libc::ELOOP)
    )
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
        let mut owner = Owner::watch(&root, |_| true);
        std::fs::write(outside.join("deep/out.txt"), b"outside").unwrap();
        std::fs::write(outside.join("top.txt"), b"outside").unwrap();
        std::fs::write(root.join("inner/in.txt"), b"inside").unwrap();
        owner.until(|seen| seen.contains(&root.join("inner/in.txt")));
        let seen = &owner.seen;
        let behind = root.join("link");
        assert!(
            seen.iter().all(|p| !p.starts_with(&behind)),
            "a change behind the link was reported: {seen:?}"
        );
    }

    /// Stalls a watcher's thread in a delivery, so that it stops reading
    /// and the kernel's event queue fills up.
    struct Hold {
        armed: Arc<AtomicBool>,
        held: mpsc::Receiver<()>,
        release: mpsc::Sender<()>,
    }

    impl Hold {
        /// Holds the next delivery, overflows the kernel's queue by writing
        /// in `root`, runs `meanwhile` while events are being lost, then
        /// lets the watcher go on.
        fn overflow(&self, root: &Path, meanwhile: impl FnOnce()) {
            let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(16384);
            self.armed.store(true, Ordering::SeqCst);
            std::fs::write(root.join("first"), b"").unwrap();
            self.held.recv_timeout(Duration::from_secs(10)).unwrap();
            for i in 0..queued {
                std::fs::write(root.join(format!("f{}", i % 64)), b"x").unwrap();
            }
            meanwhile();
            self.release.send(()).unwrap();
        }
    }

    /// Collects what a watcher reports, the way an owner uses it: a
    /// reported directory is walked when its report arrives.
    struct Owner {
        rx: mpsc::Receiver<WatchEvent>,
        watcher: Watcher,
        seen: std::collections::BTreeSet<PathBuf>,
    }

    impl Owner {
        fn watch(root: &Path, keep: impl Fn(&Path) -> bool + Send + 'static) -> Owner {
            Owner::watch_limited(root, keep, None)
        }

        /// `watch` with at most `limit` watches.
        fn watch_limited(
            root: &Path,
            keep: impl Fn(&Path) -> bool + Send + 'static,
            limit: Option<usize>,
        ) -> Owner {
            let (tx, rx) = mpsc::channel();
            let watcher = Watcher::with_limit(
                root,
                keep,
                move |event| {
                    let _ = tx.send(event);
                },
                limit,
            )
            .unwrap();
            Owner {
                rx,
                watcher,
                seen: Default::default(),
            }
        }

        /// `watch_limited`, with deliveries the returned `Hold` can stall.
        fn watch_holdable(root: &Path, limit: Option<usize>) -> (Owner, Hold) {
            let armed = Arc::new(AtomicBool::new(false));
            let (held_tx, held) = mpsc::channel::<()>();
            let (release, release_rx) = mpsc::channel::<()>();
            let (tx, rx) = mpsc::channel();
            let holding = armed.clone();
            let watcher = Watcher::with_limit(
                root,
                |_| true,
                move |event| {
                    if holding.swap(false, Ordering::SeqCst) {
                        let _ = held_tx.send(());
                        let _ = release_rx.recv();
                    }
                    let _ = tx.send(event);
                },
                limit,
            )
            .unwrap();
            let owner = Owner {
                rx,
                watcher,
                seen: Default::default(),
            };
            let hold = Hold {
                armed,
                held,
                release,
            };
            (owner, hold)
        }

        /// Takes reports until the rescan that follows a queue overflow.
        fn until_overflow_rescan(&mut self) {
            loop {
                match self.rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(WatchEvent::Rescan(why)) => {
                        assert_eq!(why, "watcher queue overflowed");
                        return;
                    }
                    Ok(WatchEvent::Changed(_)) => {}
                    Err(_) => panic!("no rescan after an overflow"),
                }
            }
        }

        /// Takes reports until `done` holds for what was seen (walked
        /// directories included), or fails after 10 s without one.
        fn until(&mut self, done: impl Fn(&std::collections::BTreeSet<PathBuf>) -> bool) {
            while !done(&self.seen) {
                match self.rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(WatchEvent::Changed(paths)) => {
                        for path in paths {
                            let mut stack = vec![path];
                            while let Some(path) = stack.pop() {
                                if let Ok(entries) = std::fs::read_dir(&path)
                                    && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir())
                                {
                                    stack.extend(entries.flatten().map(|e| e.path()));
                                }
                                self.seen.insert(path);
                            }
                        }
                    }
                    Ok(WatchEvent::Rescan(why)) => panic!("rescan: {why}"),
                    Err(_) => panic!("not reported; seen: {:?}", self.seen),
                }
            }
        }

        /// Reports that arrive within `quiet` (none expected to matter).
        fn drain(&mut self, quiet: Duration) -> Vec<PathBuf> {
            let mut got = Vec::new();
            while let Ok(event) = self.rx.recv_timeout(quiet) {
                if let WatchEvent::Changed(paths) = event {
                    got.extend(paths);
                }
            }
            got
        }
    }

    /// Entries made in a directory right after it was created or moved in
    /// (before any watch on it could exist) are seen: the directory is
    /// watched before it is reported, and the owner walks it on the
    /// report. Later writes in those directories report on their own.
    #[test]
    fn entries_made_in_a_new_directory_at_once_are_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let mut owner = Owner::watch(&root, |_| true);
        let mut expected = Vec::new();
        for i in 0..200 {
            // Created in place, nested, with a file at the bottom.
            let deep = root.join(format!("made{i}/a/b"));
            std::fs::create_dir_all(&deep).unwrap();
            std::fs::write(deep.join("f"), b"x").unwrap();
            expected.push(deep.join("f"));
            // Moved in from outside, then written into at once.
            let away = outside.join(format!("away{i}"));
            std::fs::create_dir_all(away.join("sub")).unwrap();
            let moved = root.join(format!("moved{i}"));
            std::fs::rename(&away, &moved).unwrap();
            std::fs::create_dir(moved.join("sub/new")).unwrap();
            std::fs::write(moved.join("sub/new/g"), b"y").unwrap();
            expected.push(moved.join("sub/new/g"));
        }
        owner.until(|seen| expected.iter().all(|p| seen.contains(p)));
        // And the new directories are watched: later writes there report.
        let later: Vec<PathBuf> = (0..200)
            .flat_map(|i| {
                [
                    root.join(format!("made{i}/a/b/later")),
                    root.join(format!("moved{i}/sub/new/later")),
                ]
            })
            .collect();
        for path in &later {
            std::fs::write(path, b"z").unwrap();
        }
        owner.until(|seen| later.iter().all(|p| seen.contains(p)));
    }

    /// A directory moved within the tree reports under its new path; one
    /// moved out of the root stops being watched. Events of one instance
    /// arrive in order, so once the last inside change is seen, anything
    /// reported for the moved-out tree would have come first.
    #[test]
    fn moved_directories_report_under_their_new_path_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/deep")).unwrap();
        std::fs::create_dir_all(root.join("gone/deep")).unwrap();
        let mut owner = Owner::watch(&root, |_| true);
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        std::fs::rename(root.join("gone"), dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/deep/x"), b"outside").unwrap();
        std::fs::write(root.join("b/deep/x"), b"inside").unwrap();
        owner.until(|seen| seen.contains(&root.join("b/deep/x")));
        std::fs::write(root.join("last"), b"").unwrap();
        owner.until(|seen| seen.contains(&root.join("last")));
        // The old paths are reported (as gone), nothing under them is.
        let seen = &owner.seen;
        let stale = |p: &PathBuf| {
            p.starts_with(root.join("a/deep"))
                || p.starts_with(root.join("gone/deep"))
                || !p.starts_with(&root)
        };
        assert!(seen.contains(&root.join("a")), "{seen:?}");
        assert!(!seen.iter().any(stale), "{seen:?}");
    }

    /// A directory `keep` rejects is not watched (the owner's own writes
    /// there make no events at all) and nothing under it is reported.
    #[test]
    fn directories_the_owner_does_not_keep_are_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let staging = root.join(".staging");
        std::fs::create_dir_all(staging.join("old")).unwrap();
        let skip = staging.clone();
        let mut owner = Owner::watch(&root, move |p| !p.starts_with(&skip));
        assert_eq!(owner.watcher.directories(), 1, "only the root is watched");
        for i in 0..50 {
            std::fs::write(staging.join(format!("s{i}")), b"staged").unwrap();
            std::fs::write(staging.join(format!("old/s{i}")), b"staged").unwrap();
        }
        std::fs::create_dir(staging.join("new")).unwrap();
        std::fs::write(staging.join("new/s"), b"staged").unwrap();
        std::fs::rename(staging.join("s0"), root.join("landed")).unwrap();
        owner.until(|seen| seen.contains(&root.join("landed")));
        let late = owner.drain(Duration::from_millis(200));
        let all: Vec<&PathBuf> = owner.seen.iter().chain(late.iter()).collect();
        assert!(all.iter().all(|p| !p.starts_with(&staging)), "{all:?}");
        assert_eq!(owner.watcher.directories(), 1, "only the root is watched");
    }

    /// Dropping a watcher closes its inotify instance: more watchers than
    /// the default per-user instance limit (128) come and go in turn.
    #[test]
    fn a_dropped_watcher_closes_its_instance() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..300 {
            let watcher = Watcher::new(dir.path(), |_| true, |_| {}).unwrap();
            drop(watcher);
        }
    }

    /// After the kernel's event queue overflows, the owner is told to
    /// rescan, and the directories made or moved while events were lost
    /// are watched (under their new paths): later writes there report.
    #[test]
    fn after_an_overflow_new_and_moved_directories_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/deep")).unwrap();
        std::fs::create_dir_all(root.join("gone")).unwrap();
        let (mut owner, hold) = Owner::watch_holdable(&root, None);
        hold.overflow(&root, || {
            std::fs::create_dir_all(root.join("late/deeper")).unwrap();
            std::fs::rename(root.join("a"), root.join("b")).unwrap();
            std::fs::rename(root.join("gone"), dir.path().join("out")).unwrap();
        });
        owner.until_overflow_rescan();
        // a/deep, b/deep... : root, b, b/deep, late, late/deeper.
        assert_eq!(owner.watcher.directories(), 5);
        std::fs::write(dir.path().join("out/x"), b"outside").unwrap();
        std::fs::write(root.join("late/deeper/x"), b"").unwrap();
        std::fs::write(root.join("b/deep/x"), b"").unwrap();
        owner.until(|seen| {
            seen.contains(&root.join("late/deeper/x")) && seen.contains(&root.join("b/deep/x"))
        });
        let seen = &owner.seen;
        assert!(
            !seen.iter().any(|p| p.starts_with(root.join("a/"))),
            "{seen:?}"
        );
        assert!(
            !seen.iter().any(|p| p.starts_with(root.join("gone/"))),
            "{seen:?}"
        );
    }

    /// Random directory churn (create, delete, rename within the tree, in
    /// and out of it, and exchanges of two entries) while the watcher runs;
    /// afterwards a file written in every directory of the tree is reported.
    /// An exchange reports the arriving entry before the leaving one, so a
    /// watcher that drops a path's watches when a directory leaves it would
    /// drop the arriving directory's.
    #[test]
    fn after_random_directory_churn_every_directory_is_watched() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        for seed in 0..6u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(&outside).unwrap();
            let mut owner = Owner::watch(&root, |_| true);
            let names = ["a", "b", "c.md"];
            let pick = |rng: &mut StdRng, base: &Path| -> PathBuf {
                let depth = rng.random_range(1..=3);
                let mut path = base.to_path_buf();
                for _ in 0..depth {
                    path.push(names[rng.random_range(0..names.len())]);
                }
                path
            };
            for op in 0..1500 {
                let here = pick(&mut rng, &root);
                let base = if rng.random_bool(0.8) {
                    &root
                } else {
                    &outside
                };
                let there = pick(&mut rng, base);
                let _ = match rng.random_range(0..10) {
                    0..3 => std::fs::create_dir_all(here.join("x")),
                    3 => std::fs::write(&here, b"f"),
                    4 => std::fs::rename(&here, &there),
                    5 => std::fs::rename(&there, &here),
                    6..9 => renameat_with(CWD, &here, CWD, &there, RenameFlags::EXCHANGE)
                        .map_err(std::io::Error::from),
                    _ => std::fs::remove_dir_all(&here).or_else(|_| std::fs::remove_file(&here)),
                };
                if op % 100 == 0 {
                    let _ = owner.drain(Duration::from_millis(1));
                }
            }
            // Settle, then probe every directory.
            let _ = owner.drain(Duration::from_millis(300));
            let mut probes = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).unwrap().flatten() {
                    if entry.file_type().unwrap().is_dir() {
                        stack.push(entry.path());
                    }
                }
                let probe = d.join("probe");
                std::fs::write(&probe, b"p").unwrap();
                probes.push(probe);
            }
            owner.seen.clear();
            owner.until(|seen| probes.iter().all(|p| seen.contains(p)));
            assert!(
                owner.seen.iter().all(|p| p.starts_with(&root)),
                "seed {seed}: {:?}",
                owner.seen
            );
        }
    }

    /// Two directories exchanged (`RENAME_EXCHANGE`), and a directory
    /// exchanged with a file: both directories are watched at their new
    /// paths afterwards.
    #[test]
    fn exchanged_directories_are_watched_at_their_new_paths() {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/in_a")).unwrap();
        std::fs::create_dir_all(root.join("b/in_b")).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("f"), b"file").unwrap();
        let mut owner = Owner::watch(&root, |_| true);
        renameat_with(
            CWD,
            root.join("a"),
            CWD,
            root.join("b"),
            RenameFlags::EXCHANGE,
        )
        .unwrap();
        renameat_with(
            CWD,
            root.join("d"),
            CWD,
            root.join("f"),
            RenameFlags::EXCHANGE,
        )
        .unwrap();
        let _ = owner.drain(Duration::from_millis(200));
        let probes = [
            root.join("a/in_b/p"),
            root.join("b/in_a/p"),
            root.join("a/p"),
            root.join("b/p"),
            root.join("f/p"),
        ];
        for probe in &probes {
            std::fs::write(probe, b"p").unwrap();
        }
        owner.seen.clear();
        owner.until(|seen| probes.iter().all(|p| seen.contains(p)));
    }

    /// Past the watch limit the watcher keeps what it got (and says it is
    /// incomplete) instead of failing outright; a directory made later that
    /// cannot be watched is reported (its contents are scanned once) and
    /// keeps the watch incomplete.
    #[test]
    fn past_the_watch_limit_the_watched_part_stays_live() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for name in ["a", "b", "c", "d", "e"] {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        let mut owner = Owner::watch_limited(&root, |_| true, Some(3));
        assert!(!owner.watcher.complete());
        assert_eq!(owner.watcher.directories(), 3);
        std::fs::write(root.join("top"), b"").unwrap();
        owner.until(|seen| seen.contains(&root.join("top")));
        std::fs::create_dir(root.join("new")).unwrap();
        owner.until(|seen| seen.contains(&root.join("new")));
        assert!(!owner.watcher.complete());
        assert_eq!(owner.watcher.directories(), 3);
        let full = Watcher::new(&root, |_| true, |_| {}).unwrap();
        assert!(full.complete());
        assert_eq!(full.directories(), 7);
    }

    /// A watch that turned incomplete (a new directory past the limit) is
    /// complete again once the walk after a queue overflow watched every
    /// directory there is by then.
    #[test]
    fn an_overflow_walk_that_watches_everything_completes_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for name in ["a", "b"] {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        let (mut owner, hold) = Owner::watch_holdable(&root, Some(3));
        assert!(owner.watcher.complete());
        std::fs::create_dir(root.join("x")).unwrap();
        owner.until(|seen| seen.contains(&root.join("x")));
        assert!(!owner.watcher.complete(), "x is past the limit");
        std::fs::remove_dir(root.join("x")).unwrap();
        std::fs::remove_dir(root.join("a")).unwrap();
        owner.until(|seen| seen.contains(&root.join("a")));
        let waited = std::time::Instant::now();
        while owner.watcher.directories() != 2 {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "a's watch is not gone"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        hold.overflow(&root, || {});
        owner.until_overflow_rescan();
        assert!(owner.watcher.complete());
        assert_eq!(owner.watcher.directories(), 2);
    }
}
