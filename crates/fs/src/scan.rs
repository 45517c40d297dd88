//! Stat walks and the hash-cache rule.
//!
//! `scan_tree` walks a root (or one subtree) without following symlinks,
//! stats every entry and hashes only regular files whose stat differs from
//! their cache record, or whose record is racily clean: taken so soon after
//! the file's last change (`racy_window`) that a further write in the same
//! timestamp tick could hide behind an identical stat. Racy records are
//! re-verified on a later scan once the window has passed, after which a
//! restart costs a stat walk and no hashing at all.
//!
//! The walk skips `.ghostmirror/` at the root and reports (never syncs)
//! names that are not valid paths and special files (sockets, fifos,
//! devices). A walk, the cache it is compared with (`CacheRecords`) and
//! the scan's entries are all in path order: the comparison is a merge.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use gm_chunk::Manifest;
use gm_core::{CacheRecord, CacheRecords, ContentHash, Entry, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::error::FsError;
use crate::ignore::IgnoreRules;
use crate::io::IoGate;
use crate::root::{Root, read_link_at};
use crate::stat::from_raw;
use gm_core::{Kind, Stat};

#[derive(Debug, Clone)]
pub struct ScanConfig {
    pub racy_window_ns: i64,
    /// Trust a root whose filesystem probed as moving the ctime on every
    /// write after a stat: no racy window there (`Root::racy_window_for`).
    pub racy_probe: bool,
    /// Threads that hash file content.
    pub hash_workers: usize,
    /// Threads that read directories and stat their entries during a walk
    /// (more than cores pays on a cold cache: stats wait on the disk).
    pub walk_threads: usize,
    /// Outstanding reads and read rate, shared with every other bulk reader
    /// of the process.
    pub io: Arc<IoGate>,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            racy_window_ns: 2_000_000_000,
            racy_probe: true,
            hash_workers: std::thread::available_parallelism().map_or(2, usize::from),
            walk_threads: default_walk_threads(),
            io: Arc::new(IoGate::unlimited()),
        }
    }
}

/// Walk threads unless configured: twice the cores, at least 4. Stats on
/// a cold cache wait on the disk (or, on NFS, on a round trip), and more
/// threads than cores keep more of them in flight.
pub fn default_walk_threads() -> usize {
    (2 * std::thread::available_parallelism().map_or(2, usize::from)).max(4)
}

impl ScanConfig {
    /// The racy window for a record of a file of `root` that stats as `stat`.
    pub fn racy_window(&self, root: &Root, stat: &Stat) -> i64 {
        root.racy_window_for(stat, self.racy_window_ns, self.racy_probe)
    }
}

/// One entry found on disk.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub path: RelPath,
    pub entry: Entry,
    pub stat: Stat,
}

#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// Every entry under the scanned subtree, parents before children.
    pub entries: Vec<Scanned>,
    /// New or changed cache records to persist.
    pub cache_updates: Vec<(RelPath, CacheRecord)>,
    /// Files whose content was read and hashed.
    pub hashed: u64,
    /// Files whose hash came from the cache.
    pub cache_hits: u64,
    /// The most threads that hashed at once (workers and the helpers of
    /// large files): never above `ScanConfig::hash_workers`.
    pub most_hashing: usize,
    /// Large files hashed with a helper thread.
    pub helped: u64,
    /// Chunk lists of the large files hashed by this scan (to persist with
    /// their cache records).
    pub manifests: Vec<(RelPath, Manifest)>,
    /// Records written by this scan that are still racily clean.
    pub racy: u64,
    /// Entries that were skipped, with why.
    pub problems: Vec<String>,
    /// Paths that exist but could not be read (changed while hashed, no
    /// permission): callers must treat them as unknown, never as deleted.
    /// A directory here stands for its whole subtree.
    pub unreadable: Vec<RelPath>,
    /// Cache records (of the given cache) for files that are no longer
    /// there: to delete.
    pub stale_cache: Vec<RelPath>,
    /// False when the subtree's top does not exist.
    pub found: bool,
}

/// The root's top-level entries with how many entries each holds (itself
/// included), counted by a walk that reads directories and stats nothing
/// (the entry types come from `readdir`). A node cuts a full round over a
/// large tree into slices of whole top-level subtrees with it. `None` when a
/// top-level name is not a valid path: only a scan of the whole root reports
/// such a name, so such a root is not cut. The counts are an estimate: the
/// tree may change while it is counted, and ignore rules are not applied.
pub fn top_level_sizes(root: &Root) -> Result<Option<Vec<(RelPath, u64)>>, FsError> {
    fn count(dir: &std::path::Path) -> u64 {
        let Ok(reader) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for item in reader.flatten() {
            total += 1;
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                total += count(&item.path());
            }
        }
        total
    }
    let reader = std::fs::read_dir(root.path())
        .map_err(|e| FsError::io("read directory", root.path().display(), e))?;
    let mut tops = Vec::new();
    for item in reader {
        let item = item.map_err(|e| FsError::io("read directory", root.path().display(), e))?;
        let name = item.file_name();
        if name.as_encoded_bytes() == gm_core::INTERNAL_DIR.as_bytes() {
            continue;
        }
        let Some(path) = name.to_str().and_then(|n| RelPath::new(n).ok()) else {
            return Ok(None);
        };
        let below = if item.file_type().is_ok_and(|t| t.is_dir()) {
            count(&item.path())
        } else {
            0
        };
        tops.push((path, 1 + below));
    }
    tops.sort();
    Ok(Some(tops))
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

struct Walked {
    path: RelPath,
    stat: Stat,
    link_target: Option<String>,
}

/// What a walk found, before any file is hashed.
#[derive(Default)]
pub struct Walk {
    walked: Vec<Walked>,
    problems: Vec<String>,
    unreadable: Vec<RelPath>,
    found: bool,
    most_reading: usize,
}

impl Walk {
    /// The most threads that were reading a directory at once.
    pub fn most_threads_reading(&self) -> usize {
        self.most_reading
    }
}

/// Walks `root` (or the subtree at `top`; only `top` itself when not
/// `recursive`) and returns what it holds, with file hashes from `cache`
/// where the stat allows and fresh hashes elsewhere.
pub fn scan_tree(
    root: &Root,
    top: Option<&RelPath>,
    recursive: bool,
    cache: &CacheRecords,
    config: &ScanConfig,
    ignore: &IgnoreRules,
) -> Result<ScanOutcome, FsError> {
    let walk = walk_tree(root, top, recursive, config, ignore)?;
    Ok(hash_walked(root, walk, cache, config))
}

/// The walk of `scan_tree`: every entry of the subtree with its stat (and
/// a symlink's target), nothing hashed. Directories are read by up to
/// `walk_threads` threads at once (helpers start once two directories
/// wait; a subtree with one directory is read by the calling thread
/// alone). The walk is in path order (each thread sorts its part while
/// the others still read). A caller can load the hash cache meanwhile and
/// then finish with `hash_walked` (`walk_while_loading` does both).
pub fn walk_tree(
    root: &Root,
    top: Option<&RelPath>,
    recursive: bool,
    config: &ScanConfig,
    ignore: &IgnoreRules,
) -> Result<Walk, FsError> {
    let mut walk = Walk {
        found: true,
        ..Default::default()
    };
    let first = match top {
        None => {
            let fd = rustix::fs::openat(
                root.dir_fd(),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| FsError::io("open directory", root.path().display(), e))?;
            Some(DirToRead::Open(fd, None))
        }
        Some(top) => {
            let Some(stat) = root.lstat(top)? else {
                walk.found = false;
                return Ok(walk);
            };
            if ignore.is_ignored(top, stat.kind == Kind::Dir) {
                walk.found = false;
                return Ok(walk);
            }
            let mut first = None;
            if stat.kind == Kind::Dir && recursive {
                match root.open_dir(top) {
                    Ok(fd) => first = Some(DirToRead::Open(fd, Some(top.clone()))),
                    Err(err) if err.is_not_found() => {
                        walk.found = false;
                        return Ok(walk);
                    }
                    Err(err) => return Err(err),
                }
            }
            let link_target = if stat.kind == Kind::Symlink {
                Some(root.read_link(top)?)
            } else {
                None
            };
            walk.walked.push(Walked {
                path: top.clone(),
                stat,
                link_target,
            });
            first
        }
    };
    let Some(first) = first else {
        return Ok(walk);
    };
    // This thread reads the first directory, and goes on down while each
    // holds a single subdirectory (a root holding one project directory);
    // helpers start once two directories wait (a live edit's round over
    // one directory spawns none).
    let mut pending = vec![first];
    while pending.len() == 1
        && let Some(dir) = pending.pop()
    {
        read_dir(root, dir, &mut walk, &mut pending, ignore);
    }
    walk.most_reading = 1;
    let helpers = config.walk_threads.max(1) - 1;
    if helpers == 0 || pending.is_empty() {
        while let Some(dir) = pending.pop() {
            read_dir(root, dir, &mut walk, &mut pending, ignore);
        }
        walk.walked.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        return Ok(walk);
    }
    let queue = DirQueue {
        state: Mutex::new(QueueState {
            waiting: pending,
            reading: 0,
            most_reading: 0,
            failed: false,
        }),
        wake: Condvar::new(),
    };
    let parts: Vec<Walk> = std::thread::scope(|scope| {
        // Each thread sorts its part; the sort of their concatenation
        // below merges the sorted runs.
        let work = || {
            let mut part = queue.work(root, ignore);
            part.walked.sort_unstable_by(|a, b| a.path.cmp(&b.path));
            part
        };
        let threads: Vec<_> = (0..helpers).map(|_| scope.spawn(work)).collect();
        let mut parts = vec![work()];
        parts.extend(threads.into_iter().filter_map(|thread| thread.join().ok()));
        parts
    });
    // A thread that failed took its part of the tree with it: the walk
    // fails rather than report those entries as gone.
    let (failed, most_reading) = queue
        .state
        .lock()
        .map_or((true, 0), |state| (state.failed, state.most_reading));
    walk.most_reading = walk.most_reading.max(most_reading);
    if failed {
        return Err(FsError::io(
            "walk",
            root.path().display(),
            std::io::Error::other("a scan thread failed"),
        ));
    }
    for part in parts {
        walk.walked.extend(part.walked);
        walk.problems.extend(part.problems);
        walk.unreadable.extend(part.unreadable);
    }
    walk.walked.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(walk)
}

/// Walks each of `tops` in turn while a second thread runs `load` for the
/// same tops, one top ahead (what the caller compares a walk with: its
/// hash cache, its journal entries), and hands each walk with its load to
/// `finish`, in order. The first failure stops the walks, and the loader
/// with them. (A restart spent a fifth of its round, on the node and on
/// the hub, loading before walking.) `before_walking` runs on the walking
/// thread once the loader has started and before the first walk: the hub
/// waits there for its watcher, so loading overlaps the watch's setup.
#[allow(clippy::too_many_arguments)]
pub fn walk_while_loading<T: Send, E: From<FsError> + Send>(
    root: &Root,
    tops: &[Option<RelPath>],
    recursive: bool,
    config: &ScanConfig,
    ignore: &IgnoreRules,
    load: impl Fn(Option<&RelPath>) -> Result<T, E> + Sync,
    before_walking: impl FnOnce(),
    mut finish: impl FnMut(Option<&RelPath>, Walk, T) -> Result<(), E>,
) -> Result<(), E> {
    std::thread::scope(|scope| {
        let (sender, loaded) = std::sync::mpsc::sync_channel(1);
        let load = &load;
        let started = std::time::Instant::now();
        scope.spawn(move || {
            for top in tops {
                let loaded = load(top.as_ref());
                tracing::trace!(top = ?top, at_ms = started.elapsed().as_millis() as u64, "scan: loaded");
                // The walks stopped (a failure): nothing more to load.
                if sender.send(loaded).is_err() {
                    break;
                }
            }
        });
        before_walking();
        tracing::trace!(
            at_ms = started.elapsed().as_millis() as u64,
            "scan: walking"
        );
        for top in tops {
            let walk = walk_tree(root, top.as_ref(), recursive, config, ignore);
            tracing::trace!(top = ?top, at_ms = started.elapsed().as_millis() as u64, "scan: walked");
            let loaded = loaded.recv().map_err(|_| {
                FsError::io(
                    "load what a scan compares with",
                    root.path().display(),
                    std::io::Error::other("the loading thread stopped"),
                )
            })??;
            finish(top.as_ref(), walk?, loaded)?;
            tracing::trace!(top = ?top, at_ms = started.elapsed().as_millis() as u64, "scan: compared");
        }
        Ok(())
    })
}

/// Finishes a scan from its walk: hashes every file `cache` cannot vouch
/// for (on up to `hash_workers` threads, `io` permitting) and lists the
/// cache records of files no longer there.
pub fn hash_walked(
    root: &Root,
    walk: Walk,
    cache: &CacheRecords,
    config: &ScanConfig,
) -> ScanOutcome {
    let mut outcome = ScanOutcome {
        found: walk.found,
        problems: walk.problems,
        unreadable: walk.unreadable,
        ..Default::default()
    };
    let walked = walk.walked;
    // Hash what the cache cannot vouch for, on a bounded pool.
    let mut to_hash = Vec::new();
    // The cached hash of each file the cache vouches for, by walk index.
    let mut cached: Vec<Option<ContentHash>> = Vec::with_capacity(walked.len());
    // Files that have a record: when every record has its file, none is
    // stale (the usual restart), and no list of them is made.
    let mut with_record = 0usize;
    // The walk and the cache are both in path order: one merge.
    let mut records = cache.iter().peekable();
    for (index, item) in walked.iter().enumerate() {
        let mut hash = None;
        while records.next_if(|(path, _)| *path < item.path).is_some() {}
        let record = records
            .next_if(|(path, _)| *path == item.path)
            .map(|(_, record)| record);
        if item.stat.kind == Kind::File {
            with_record += usize::from(record.is_some());
            match record {
                Some(record)
                    if record.valid_for(&item.stat, config.racy_window(root, &record.stat)) =>
                {
                    outcome.cache_hits += 1;
                    hash = Some(record.hash);
                }
                _ => to_hash.push(index),
            }
        }
        cached.push(hash);
    }
    let (hashed, threads) = hash_many(
        root,
        &walked,
        &to_hash,
        config.hash_workers.max(1),
        &config.io,
    );
    outcome.most_hashing = threads.most.into_inner();
    outcome.helped = threads.helped.into_inner() as u64;
    let mut fresh: HashMap<usize, (ContentHash, Stat)> = HashMap::with_capacity(hashed.len());
    for (index, result) in hashed {
        match result {
            Ok((hash, stat, manifest)) => {
                fresh.insert(index, (hash, stat));
                if let Some(manifest) = manifest {
                    outcome
                        .manifests
                        .push((walked[index].path.clone(), manifest));
                }
            }
            Err(err) => {
                outcome.problems.push(err.to_string());
                outcome.unreadable.push(walked[index].path.clone());
            }
        }
    }
    outcome.hashed = fresh.len() as u64;
    let recorded_ns = now_ns();

    for (index, item) in walked.into_iter().enumerate() {
        let entry = match item.stat.kind {
            Kind::Dir => Entry::Dir,
            Kind::Symlink => match item.link_target {
                Some(target) => Entry::Symlink { target },
                None => continue,
            },
            Kind::File => {
                let (hash, stat) = match fresh.remove(&index) {
                    Some((hash, stat)) => {
                        let record = CacheRecord {
                            stat,
                            hash,
                            recorded_ns,
                        };
                        if record.is_racy(config.racy_window(root, &stat)) {
                            outcome.racy += 1;
                        }
                        outcome.cache_updates.push((item.path.clone(), record));
                        (hash, stat)
                    }
                    None => match cached[index] {
                        Some(hash) => (hash, item.stat),
                        // Could not be hashed (changed while read, vanished): left for the next scan.
                        None => continue,
                    },
                };
                outcome.entries.push(Scanned {
                    path: item.path,
                    entry: Entry::File {
                        hash,
                        size: stat.size,
                        executable: stat.executable(),
                    },
                    stat,
                });
                continue;
            }
            Kind::Other => continue,
        };
        outcome.entries.push(Scanned {
            path: item.path,
            entry,
            stat: item.stat,
        });
    }
    // Built in walk order: in path order.
    if with_record == cache.len() {
        return outcome;
    }
    // Records without a file: one more merge, of the cache and the files.
    let mut files = outcome
        .entries
        .iter()
        .filter(|e| matches!(e.entry, Entry::File { .. }))
        .map(|e| &e.path)
        .peekable();
    let mut stale = Vec::new();
    for (path, _) in cache.iter() {
        while files.next_if(|file| *file < path).is_some() {}
        if files.next_if(|file| *file == path).is_none()
            && !outcome
                .unreadable
                .iter()
                .any(|u| u == path || u.is_ancestor_of(path))
        {
            stale.push(path.clone());
        }
    }
    outcome.stale_cache = stale;
    outcome
}

/// A directory waiting to be read: open already, or a subdirectory to
/// open (relative to its parent, which stays open only while one of its
/// subdirectories waits: a wide tree does not hold a descriptor per
/// waiting directory).
enum DirToRead {
    Open(OwnedFd, Option<RelPath>),
    Child {
        parent: Arc<OwnedFd>,
        name: String,
        path: RelPath,
    },
}

/// The directories waiting to be read and how many threads are reading
/// one; the walk is over when both are zero, or when a thread failed.
struct DirQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

struct QueueState {
    waiting: Vec<DirToRead>,
    reading: usize,
    most_reading: usize,
    failed: bool,
}

impl DirQueue {
    /// Reads directories until none waits and none is being read. A
    /// panic while reading one marks the walk failed and stops every
    /// thread (none is left waiting for a directory that never comes).
    fn work(&self, root: &Root, ignore: &IgnoreRules) -> Walk {
        let mut part = Walk::default();
        let mut found = Vec::new();
        loop {
            let Some(dir) = self.next() else {
                return part;
            };
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read_dir(root, dir, &mut part, &mut found, ignore)
            }));
            let Ok(mut state) = self.state.lock() else {
                return part;
            };
            state.reading -= 1;
            state.failed |= read.is_err();
            let more = !found.is_empty();
            state.waiting.append(&mut found);
            let done = state.failed || (state.waiting.is_empty() && state.reading == 0);
            drop(state);
            if more || done {
                self.wake.notify_all();
            }
        }
    }

    /// The next directory to read, or `None` when the walk is over.
    fn next(&self) -> Option<DirToRead> {
        let mut state = self.state.lock().ok()?;
        loop {
            if state.failed {
                return None;
            }
            if let Some(dir) = state.waiting.pop() {
                state.reading += 1;
                state.most_reading = state.most_reading.max(state.reading);
                return Some(dir);
            }
            if state.reading == 0 {
                return None;
            }
            state = self.wake.wait(state).ok()?;
        }
    }
}

/// Reads one directory: its entries go to `walk`, its subdirectories to
/// `pending`. Nothing here fails the walk; what cannot be read is a
/// problem, and unreadable (never taken as deleted).
fn read_dir(
    root: &Root,
    dir: DirToRead,
    walk: &mut Walk,
    pending: &mut Vec<DirToRead>,
    ignore: &IgnoreRules,
) {
    let (dir, prefix) = match dir {
        DirToRead::Open(fd, prefix) => (fd, prefix),
        DirToRead::Child { parent, name, path } => {
            match rustix::fs::openat(
                &*parent,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => (fd, Some(path)),
                // Gone (or replaced by a file) since it was stat'ed: this
                // round does not look at it; the watcher reports what
                // happened and a later round does.
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => {
                    walk.unreadable.push(path);
                    return;
                }
                Err(e) => {
                    walk.problems.push(format!(
                        "open directory {}/{path}: {e}",
                        root.path().display()
                    ));
                    walk.unreadable.push(path);
                    return;
                }
            }
        }
    };
    let problems = &mut walk.problems;
    let unreadable = &mut walk.unreadable;
    let shown_dir = match &prefix {
        Some(p) => format!("{}/{}", root.path().display(), p),
        None => root.path().display().to_string(),
    };
    let reader = match rustix::fs::Dir::read_from(&dir) {
        Ok(reader) => reader,
        Err(e) => {
            problems.push(format!("read directory {shown_dir}: {e}"));
            if let Some(prefix) = prefix {
                unreadable.push(prefix);
            }
            return;
        }
    };
    let dir = Arc::new(dir);
    for item in reader {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                problems.push(format!("read directory {shown_dir}: {e}"));
                if let Some(prefix) = &prefix {
                    unreadable.push(prefix.clone());
                }
                break;
            }
        };
        let raw = item.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        if prefix.is_none() && raw == gm_core::INTERNAL_DIR.as_bytes() {
            continue;
        }
        let name = match std::str::from_utf8(raw) {
            Ok(name) => name,
            Err(_) => {
                problems.push(format!(
                    "{shown_dir}/{}: name is not valid UTF-8; not synced",
                    String::from_utf8_lossy(raw)
                ));
                continue;
            }
        };
        let path = match &prefix {
            Some(p) => p.join(name),
            None => RelPath::new(name),
        };
        let path = match path {
            Ok(path) => path,
            Err(err) => {
                problems.push(format!("{shown_dir}/{name}: {err}; not synced"));
                continue;
            }
        };
        let stat = match rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(raw) => from_raw(&raw),
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => {
                problems.push(format!("stat {shown_dir}/{name}: {e}"));
                unreadable.push(path);
                continue;
            }
        };
        if ignore.is_ignored(&path, stat.kind == Kind::Dir) {
            continue;
        }
        let mut link_target = None;
        match stat.kind {
            Kind::Dir => pending.push(DirToRead::Child {
                parent: dir.clone(),
                name: name.to_string(),
                path: path.clone(),
            }),
            Kind::Symlink => {
                match read_link_at(dir.as_fd(), name, &format!("{shown_dir}/{name}")) {
                    Ok(target) => link_target = Some(target),
                    Err(err) => {
                        problems.push(err.to_string());
                        unreadable.push(path);
                        continue;
                    }
                }
            }
            Kind::Other => {
                problems.push(format!(
                    "{shown_dir}/{name}: special file (socket, fifo or device); not synced"
                ));
                continue;
            }
            Kind::File => {}
        }
        walk.walked.push(Walked {
            path,
            stat,
            link_target,
        });
    }
}

type HashResult = (
    usize,
    Result<(ContentHash, Stat, Option<Manifest>), FsError>,
);

fn hash_many(
    root: &Root,
    walked: &[Walked],
    indices: &[usize],
    workers: usize,
    io: &IoGate,
) -> (Vec<HashResult>, HashThreads) {
    let threads = HashThreads::default();
    if indices.is_empty() {
        return (Vec::new(), threads);
    }
    let spawned = workers.min(indices.len());
    // Hashing threads allowed but not at work: a large file takes one for
    // a helper that hashes while its worker reads and cuts (a 512 MiB file
    // alone: 620 -> 375 ms), so never more than `workers` threads hash.
    let idle = AtomicUsize::new(workers - spawned);
    let hash_one = |index: usize| {
        let path = &walked[index].path;
        let helped = walked[index].stat.size >= gm_chunk::CHUNKED_MIN
            && idle
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
        let busy = 1 + usize::from(helped);
        let now = threads.busy.fetch_add(busy, Ordering::AcqRel) + busy;
        threads.most.fetch_max(now, Ordering::AcqRel);
        if helped {
            threads.helped.fetch_add(1, Ordering::Relaxed);
        }
        let permit = io.acquire();
        let mut result = root.hash_file_gated(path, io, helped);
        // A file that changed while being read gets one more try.
        if matches!(result, Err(FsError::TargetChanged { .. })) {
            result = root.hash_file_gated(path, io, helped);
        }
        drop(permit);
        threads.busy.fetch_sub(busy, Ordering::AcqRel);
        if helped {
            idle.fetch_add(1, Ordering::AcqRel);
        }
        (index, result)
    };
    if spawned <= 1 {
        // One file (a live edit, a racy re-check) or one worker: no thread
        // to spawn and join.
        let results = indices.iter().map(|&index| hash_one(index)).collect();
        return (results, threads);
    }
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(indices.len()));
    std::thread::scope(|scope| {
        for _ in 0..spawned {
            scope.spawn(|| {
                let mut local = Vec::new();
                loop {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = indices.get(at) else { break };
                    local.push(hash_one(index));
                }
                // Out of files: this thread's slot may help a large one.
                idle.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut all) = results.lock() {
                    all.extend(local);
                }
            });
        }
    });
    (results.into_inner().unwrap_or_default(), threads)
}

/// How many threads hash at once, the most seen, and the files helped.
#[derive(Default)]
struct HashThreads {
    busy: AtomicUsize,
    most: AtomicUsize,
    helped: AtomicUsize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    /// A scan of the whole tree with no cache and no ignore rules.
    fn scan_fresh(root: &Root, config: &ScanConfig) -> ScanOutcome {
        scan_tree(
            root,
            None,
            true,
            &CacheRecords::default(),
            config,
            &IgnoreRules::none(),
        )
        .unwrap()
    }

    fn cache_of(outcome: &ScanOutcome, into: &mut CacheRecords) {
        for (path, record) in &outcome.cache_updates {
            into.insert(path.clone(), *record);
        }
    }

    #[test]
    fn second_scan_hashes_nothing_once_records_are_settled() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"one").unwrap();
        std::fs::write(dir.path().join("top"), b"two").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let config = ScanConfig {
            racy_window_ns: 0,
            hash_workers: 2,
            ..Default::default()
        };
        let mut cache = CacheRecords::default();
        let first = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!(first.hashed, 2);
        let names: Vec<_> = first
            .entries
            .iter()
            .map(|e| e.path.as_str().to_string())
            .collect();
        assert_eq!(names, ["a", "a/b", "a/b/f", "link", "top"]);
        assert!(
            matches!(&first.entries[3].entry, Entry::Symlink { target } if target == "/etc/passwd")
        );
        cache_of(&first, &mut cache);
        let second = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!((second.hashed, second.cache_hits), (0, 2));
        // A change is seen; a subtree scan sees only its subtree.
        std::fs::write(dir.path().join("a/b/f"), b"changed").unwrap();
        let sub = scan_tree(
            &root,
            Some(&rel("a/b")),
            true,
            &cache,
            &config,
            &IgnoreRules::none(),
        )
        .unwrap();
        assert_eq!(sub.hashed, 1);
        assert_eq!(sub.entries.len(), 2);
        assert_eq!(
            sub.entries[1].entry.file_hash(),
            Some(ContentHash::of(b"changed"))
        );
    }

    /// The scan merges its walk with the cache, both in path order: over
    /// a tree that several threads walk, every record of an unchanged file
    /// is used, and exactly the records of files gone are stale.
    #[test]
    fn a_walk_by_several_threads_meets_every_record_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        // Names whose byte order differs from component order ("a.b"
        // sorts between "a" and "a/...").
        for d in ["a", "a.b", "a-c", "b", "a/x", "a/x.y", "b/z"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
            for f in 0..40 {
                std::fs::write(dir.path().join(d).join(format!("f{f}")), d).unwrap();
            }
        }
        let config = ScanConfig {
            racy_window_ns: 0,
            walk_threads: 3,
            hash_workers: 2,
            ..Default::default()
        };
        let mut cache = CacheRecords::default();
        let first = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!(first.hashed, 280);
        let paths: Vec<&RelPath> = first.entries.iter().map(|e| &e.path).collect();
        assert!(
            paths.windows(2).all(|w| w[0] < w[1]),
            "entries in path order"
        );
        cache_of(&first, &mut cache);
        // Records of files that are gone: some removed now, one never there.
        std::fs::remove_file(dir.path().join("a.b/f7")).unwrap();
        std::fs::remove_dir_all(dir.path().join("a/x.y")).unwrap();
        let ghost = cache.iter().next().map(|(_, r)| *r).unwrap();
        cache.insert(RelPath::new("a/x/zz").unwrap(), ghost);
        let second = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!(second.hashed, 0);
        assert_eq!(second.cache_hits, 239);
        let mut expected: Vec<String> = (0..40).map(|f| format!("a/x.y/f{f}")).collect();
        expected.push("a.b/f7".into());
        expected.push("a/x/zz".into());
        expected.sort();
        let stale: Vec<&str> = second.stale_cache.iter().map(|p| p.as_str()).collect();
        assert_eq!(stale, expected);
    }

    #[test]
    fn racy_records_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let config = ScanConfig {
            racy_window_ns: 60_000_000_000,
            racy_probe: false,
            hash_workers: 1,
            ..Default::default()
        };
        let mut cache = CacheRecords::default();
        let first = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!(first.racy, 1);
        cache_of(&first, &mut cache);
        let second = scan_tree(&root, None, true, &cache, &config, &IgnoreRules::none()).unwrap();
        assert_eq!(second.hashed, 1, "a racily clean record is not trusted");
    }

    /// A large file is hashed with a helper thread only when a hashing
    /// thread is free: the threads hashing at once never exceed
    /// `hash_workers`, and helped or not, every hash and chunk list is the
    /// same.
    #[test]
    fn helpers_for_large_files_stay_within_the_hash_workers() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let large = |i: u8| -> Vec<u8> {
            (0..3u32 << 20)
                .map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
                .collect()
        };
        let scan = |workers: usize| {
            let config = ScanConfig {
                racy_window_ns: 0,
                hash_workers: workers,
                ..Default::default()
            };
            scan_fresh(&root, &config)
        };
        let check = |outcome: &ScanOutcome, files: u8| {
            assert_eq!(outcome.manifests.len(), files as usize);
            for (path, manifest) in &outcome.manifests {
                let data = std::fs::read(dir.path().join(path.as_str())).unwrap();
                assert_eq!(*manifest, gm_chunk::chunk_slice(&data), "{path}");
                let hashed = outcome.entries.iter().find(|e| e.path == *path).unwrap();
                assert!(
                    matches!(hashed.entry, Entry::File { hash, .. } if hash == ContentHash::of(&data)),
                    "{path}"
                );
            }
        };
        std::fs::write(dir.path().join("big0"), large(0)).unwrap();

        let alone = scan(1);
        assert_eq!((alone.helped, alone.most_hashing), (0, 1), "one worker");
        check(&alone, 1);
        let helped = scan(2);
        assert_eq!(
            (helped.helped, helped.most_hashing),
            (1, 2),
            "a free thread"
        );
        check(&helped, 1);

        for i in 1..6 {
            std::fs::write(dir.path().join(format!("big{i}")), large(i)).unwrap();
            std::fs::write(dir.path().join(format!("small{i}")), [i; 100]).unwrap();
        }
        for workers in [1, 2, 3] {
            let outcome = scan(workers);
            assert!(
                (1..=workers).contains(&outcome.most_hashing),
                "{} threads hashed at once with {workers} workers",
                outcome.most_hashing
            );
            check(&outcome, 6);
        }
    }

    #[test]
    fn hashing_respects_the_io_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        for i in 0..64 {
            std::fs::write(dir.path().join(format!("f{i}")), vec![i as u8; 64 << 10]).unwrap();
        }
        let config = ScanConfig {
            racy_window_ns: 0,
            hash_workers: 8,
            io: Arc::new(IoGate::new(2, None)),
            ..Default::default()
        };
        let outcome = scan_fresh(&root, &config);
        assert_eq!(outcome.hashed, 64);
        let seen = config.io.max_observed();
        assert!(
            (1..=2).contains(&seen),
            "{seen} reads at once with a limit of 2"
        );
    }

    #[test]
    fn ignored_paths_are_neither_walked_nor_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        std::fs::write(dir.path().join(".gmignore"), "*.log\nbuild/\n").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"k").unwrap();
        std::fs::write(dir.path().join("debug.log"), b"l").unwrap();
        std::fs::create_dir_all(dir.path().join("build/deep")).unwrap();
        std::fs::write(dir.path().join("build/deep/out.o"), b"o").unwrap();
        let rules = IgnoreRules::load(&root);
        let outcome = scan_tree(
            &root,
            None,
            true,
            &CacheRecords::default(),
            &ScanConfig::default(),
            &rules,
        )
        .unwrap();
        let names: Vec<_> = outcome
            .entries
            .iter()
            .map(|e| e.path.as_str().to_string())
            .collect();
        assert_eq!(names, [".gmignore", "keep.txt"]);
        assert_eq!(outcome.hashed, 2);
        let sub = scan_tree(
            &root,
            Some(&rel("build/deep")),
            true,
            &CacheRecords::default(),
            &ScanConfig::default(),
            &rules,
        )
        .unwrap();
        assert!(!sub.found && sub.entries.is_empty());
    }

    #[test]
    fn internal_dir_and_special_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        std::fs::write(dir.path().join(".ghostmirror/x"), b"internal").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let outcome = scan_fresh(&root, &ScanConfig::default());
        assert!(outcome.entries.is_empty(), "{:?}", outcome.entries);
        assert_eq!(outcome.problems.len(), 1);
        assert!(outcome.problems[0].contains("fifo"));
        let missing = scan_tree(
            &root,
            Some(&rel("nope/x")),
            true,
            &CacheRecords::default(),
            &ScanConfig::default(),
            &IgnoreRules::none(),
        )
        .unwrap();
        assert!(!missing.found);
    }

    /// A tree of nested directories, files, symlinks and ignored paths.
    fn tangled_tree(base: &std::path::Path) {
        std::fs::write(base.join(".gmignore"), "skip/\n").unwrap();
        for a in 0..6 {
            for b in 0..5 {
                let dir = base.join(format!("d{a}/e{b}"));
                std::fs::create_dir_all(dir.join("f/g")).unwrap();
                std::fs::write(dir.join("x.txt"), format!("{a}{b}")).unwrap();
                std::fs::write(dir.join("f/g/y"), format!("y{a}{b}")).unwrap();
                std::os::unix::fs::symlink("x.txt", dir.join("link")).unwrap();
            }
            std::fs::create_dir_all(base.join(format!("d{a}/skip/deep"))).unwrap();
            std::fs::write(base.join(format!("d{a}/skip/deep/z")), b"z").unwrap();
        }
        std::fs::write(base.join("top.txt"), b"t").unwrap();
    }

    #[test]
    fn walks_on_many_threads_find_what_one_thread_finds() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        tangled_tree(dir.path());
        let rules = IgnoreRules::load(&root);
        let scan = |workers: usize, top: Option<&RelPath>| {
            let config = ScanConfig {
                walk_threads: workers,
                ..ScanConfig::default()
            };
            let outcome =
                scan_tree(&root, top, true, &CacheRecords::default(), &config, &rules).unwrap();
            assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
            let found: Vec<(String, Entry)> = outcome
                .entries
                .into_iter()
                .map(|e| (e.path.as_str().to_string(), e.entry))
                .collect();
            (found, outcome.hashed)
        };
        let (one, hashed) = scan(1, None);
        // 6 × (d, skip-less: 5 × (e, x.txt, f, f/g, f/g/y, link)) + top files.
        assert_eq!(one.len(), 6 * (1 + 5 * 6) + 2);
        assert_eq!(hashed, 6 * 5 * 2 + 2);
        assert!(one.iter().all(|(p, _)| !p.contains("skip")));
        for workers in [2, 3, 8] {
            assert_eq!(
                scan(workers, None),
                (one.clone(), hashed),
                "{workers} workers"
            );
        }
        let d2 = rel("d2");
        let (sub, _) = scan(4, Some(&d2));
        let want: Vec<_> = one
            .iter()
            .filter(|(p, _)| p == "d2" || p.starts_with("d2/"))
            .cloned()
            .collect();
        assert_eq!(sub, want);
    }

    #[test]
    fn records_of_files_no_longer_there_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let rules = IgnoreRules::load(&root);
        let config = ScanConfig {
            racy_window_ns: 0,
            ..ScanConfig::default()
        };
        let mut cache = CacheRecords::default();
        let first = scan_tree(&root, None, true, &cache, &config, &rules).unwrap();
        cache_of(&first, &mut cache);
        assert!(first.stale_cache.is_empty());
        let again = scan_tree(&root, None, true, &cache, &config, &rules).unwrap();
        assert!(again.stale_cache.is_empty());
        assert_eq!(again.hashed, 0);
        // A file gone and a file that became a directory.
        std::fs::remove_file(dir.path().join("a")).unwrap();
        std::fs::remove_file(dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let after = scan_tree(&root, None, true, &cache, &config, &rules).unwrap();
        let mut stale: Vec<&str> = after.stale_cache.iter().map(RelPath::as_str).collect();
        stale.sort();
        assert_eq!(stale, ["a", "b"]);
    }

    #[test]
    fn no_more_threads_read_directories_than_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        for i in 0..64 {
            for j in 0..4 {
                std::fs::create_dir_all(dir.path().join(format!("w{i}/d{j}"))).unwrap();
            }
        }
        let rules = IgnoreRules::load(&root);
        for threads in [1, 2, 3] {
            let config = ScanConfig {
                walk_threads: threads,
                ..ScanConfig::default()
            };
            let walk = walk_tree(&root, None, true, &config, &rules).unwrap();
            let most = walk.most_threads_reading();
            assert!((1..=threads).contains(&most), "{most} with {threads}");
            assert_eq!(walk.walked.len(), 64 * 5);
        }
    }
}
