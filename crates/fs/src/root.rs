//! A workspace root held open, and every operation below it.
//!
//! Invariants:
//! - Paths are `RelPath`s (validated, no `..`, nothing under `.ghostmirror/`).
//! - Each operation opens the parent directory one component at a time from
//!   the root handle with `O_NOFOLLOW|O_DIRECTORY`, then acts on the last
//!   name with a `*at` call that does not follow it either. A symlink
//!   anywhere in the path, or a directory swapped for one meanwhile, makes
//!   the operation fail; nothing is ever read or written outside the root.
//! - Every content change goes through `StagedFile::commit` or `place`:
//!   the new version is complete, hashed, has its final mode and is fsynced
//!   before it appears at its final path; the target is checked against the
//!   caller's expectation just before the rename, and a changed target is
//!   never overwritten.
//! - Removal moves the entry aside into staging first and checks it is
//!   still the planned version; anything else is put back.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use gm_chunk::Manifest;
use gm_core::{ContentHash, Hasher, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::FsError;
use crate::owner::{Ownership, Target};
use crate::stat::from_raw;
use gm_core::{Kind, Stat};

/// Fewest files for which a group commit (one `syncfs`) beats one fsync
/// per file: `syncfs` also waits for unrelated dirty data, so a single
/// live edit is fsynced alone.
pub const GROUP_COMMIT_MIN: usize = 8;

/// Where staging lives inside each root.
pub const STAGING_DIR: &str = "staging";

/// What the caller expects at the target path just before a change lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing is there.
    Absent,
    /// The entry is still exactly the one the plan saw.
    Unchanged(Stat),
}

/// A staging entry removed by reclamation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub name: String,
    pub age: std::time::Duration,
    pub size: u64,
}

/// Names of staging entries owned by live transfers of this process.
type LiveSet = Arc<Mutex<HashSet<String>>>;

/// Marks a staging name as owned by a live transfer until dropped.
pub(crate) struct LiveName {
    live: LiveSet,
    name: String,
}

impl Drop for LiveName {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// A workspace root held open as a directory handle.
pub struct Root {
    path: PathBuf,
    dir: OwnedFd,
    staging: Arc<OwnedFd>,
    /// Where staging is, for messages (`ROOT/.ghostmirror/staging` unless
    /// the root was opened with a staging directory of its own).
    staging_shown: String,
    staging_tag: String,
    identity: Stat,
    /// Staging entries that live transfers own: never reclaimed.
    live: LiveSet,
    /// Who owns what this root writes (`GM_CHOWN`).
    ownership: Arc<Ownership>,
    /// The device on which a write after a stat always moves the ctime
    /// (see `ctime_moves_after_stat`), when the root's filesystem does.
    exact_ctime_dev: Option<u64>,
}

/// What a walk to a parent directory does with a missing component.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    Fail,
    Create,
    Stop,
}

pub(crate) enum Parent<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsFd for Parent<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Parent::Root(fd) => *fd,
            Parent::Owned(fd) => fd.as_fd(),
        }
    }
}

pub(crate) fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Cleared once the kernel says it has no `openat2` (before 5.6, or a
/// seccomp filter that hides it): every walk then goes by components.
static OPENAT2_WORKS: AtomicBool = AtomicBool::new(true);

/// The directory at `below` (a valid relative path) under `dir`, opened in
/// one call that follows no symlink and cannot leave `dir`; `None` on any
/// failure (the caller walks by components and reports it).
fn open_beneath(dir: BorrowedFd<'_>, below: &str) -> Option<OwnedFd> {
    if !OPENAT2_WORKS.load(Ordering::Relaxed) {
        return None;
    }
    match rustix::fs::openat2(
        dir,
        below,
        dir_flags(),
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Some(fd),
        Err(Errno::NOSYS) => {
            OPENAT2_WORKS.store(false, Ordering::Relaxed);
            None
        }
        Err(_) => None,
    }
}

/// Whether a write that follows a stat always gets a newer ctime on the
/// filesystem of `staging`. Linux's multigrain timestamps (6.13+; ext4,
/// xfs, btrfs, tmpfs) give it: once a ctime has been read, the next change
/// takes a fine-grained one. Elsewhere timestamps come from a clock that
/// ticks every few milliseconds (or seconds), and a write in the same tick
/// as the stat leaves the stat unchanged: a cache record is then trusted
/// only once a racy window has passed. Probed with eight write/stat pairs
/// microseconds apart on a scratch file in staging; any ctime that does not
/// move, or any error, answers no.
fn ctime_moves_after_stat(staging: &OwnedFd, tag: &str) -> bool {
    let name = random_name(tag, "probe");
    let Ok(fd) = rustix::fs::openat(
        staging,
        name.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return false;
    };
    let mut last: Option<i64> = None;
    let mut moves = true;
    for _ in 0..8 {
        let ctime = match rustix::io::pwrite(&fd, b"x", 0).and_then(|_| rustix::fs::fstat(&fd)) {
            Ok(raw) => from_raw(&raw).ctime_ns,
            Err(_) => {
                moves = false;
                break;
            }
        };
        if last.is_some_and(|last| ctime <= last) {
            moves = false;
            break;
        }
        last = Some(ctime);
    }
    drop(fd);
    let _ = rustix::fs::unlinkat(staging, name.as_str(), AtFlags::empty());
    moves
}

/// Whether an entry renames from `from` into `to` and back (one mount).
/// Leaves nothing behind either way.
fn renames_between(from: &OwnedFd, to: &OwnedFd, tag: &str) -> bool {
    let name = random_name(tag, "probe");
    let made = rustix::fs::mkdirat(from, name.as_str(), Mode::from_raw_mode(0o700));
    if made.is_err() {
        return false;
    }
    let there = rustix::fs::renameat(from, name.as_str(), to, name.as_str()).is_ok();
    let back = there && rustix::fs::renameat(to, name.as_str(), from, name.as_str()).is_ok();
    let dir = if there && !back { to } else { from };
    let _ = rustix::fs::unlinkat(dir, name.as_str(), AtFlags::REMOVEDIR);
    back
}

fn random_name(tag: &str, kind: &str) -> String {
    format!("{tag}-{kind}-{:016x}", rand::random::<u64>())
}

/// The permissions a file lands with. Only the executable bit syncs;
/// `read_only` is for copies nobody may edit in place (materialized
/// skills, the skill registry): no write bit for anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileMode {
    pub executable: bool,
    pub read_only: bool,
}

impl FileMode {
    pub fn read_only(executable: bool) -> FileMode {
        FileMode {
            executable,
            read_only: true,
        }
    }

    pub fn bits(self) -> u32 {
        match (self.executable, self.read_only) {
            (false, false) => 0o644,
            (true, false) => 0o755,
            (false, true) => 0o444,
            (true, true) => 0o555,
        }
    }

    /// True when a file of mode `mode` already has these permissions.
    pub fn matches(self, mode: u32) -> bool {
        mode & 0o777 == self.bits()
    }
}

impl From<bool> for FileMode {
    /// An ordinary synced file: writable by its owner, executable or not.
    fn from(executable: bool) -> FileMode {
        FileMode {
            executable,
            read_only: false,
        }
    }
}

impl Root {
    /// Opens an existing directory as a workspace root and prepares its
    /// staging directory. `staging_tag` names this process's staging files.
    pub fn open(path: &Path, staging_tag: &str) -> Result<Root, FsError> {
        Root::open_with_staging(path, staging_tag, None)
    }

    /// `open`, with staging in `staging` (created if needed) instead of
    /// `ROOT/.ghostmirror/staging`, so that a watcher of the root never
    /// sees the many events of writing staged files (the hub keeps its
    /// mirrors' staging beside `mirrors/`). Staged entries are renamed into
    /// the root, so both must be on one mount: when a rename between them
    /// fails (`EXDEV`: another filesystem or mount) the root's own staging
    /// is used, with a warning.
    pub fn open_with_staging(
        path: &Path,
        staging_tag: &str,
        staging: Option<&Path>,
    ) -> Result<Root, FsError> {
        let shown = path.display().to_string();
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOTDIR => FsError::NotADirectory {
                path: shown.clone(),
            },
            other => FsError::io("open workspace root", &shown, other),
        })?;
        let identity =
            from_raw(&rustix::fs::fstat(&dir).map_err(|e| FsError::io("stat", &shown, e))?);
        let internal = open_or_make_dir(dir.as_fd(), gm_core::INTERNAL_DIR, 0o700, &shown)?;
        let own_staging = || -> Result<(OwnedFd, String), FsError> {
            Ok((
                open_or_make_dir(internal.as_fd(), STAGING_DIR, 0o700, &shown)?,
                format!("{shown}/{}/{STAGING_DIR}", gm_core::INTERNAL_DIR),
            ))
        };
        let (staging, staging_shown) = match staging {
            None => own_staging()?,
            Some(outside) => {
                std::fs::create_dir_all(outside)
                    .map_err(|e| FsError::io("create directory", outside.display(), e))?;
                let outside_shown = outside.display().to_string();
                let fd = rustix::fs::open(outside, dir_flags(), Mode::empty())
                    .map_err(|e| FsError::io("open directory", &outside_shown, e))?;
                if renames_between(&fd, &internal, staging_tag) {
                    (fd, outside_shown)
                } else {
                    tracing::warn!(root = %shown, staging = %outside_shown, "staging is on another mount than the root; using the root's own");
                    own_staging()?
                }
            }
        };
        let exact_ctime_dev = ctime_moves_after_stat(&staging, staging_tag).then_some(identity.dev);
        tracing::debug!(root = %shown, exact_ctime = exact_ctime_dev.is_some(), "probed timestamps");
        Ok(Root {
            path: path.to_path_buf(),
            dir,
            staging: Arc::new(staging),
            staging_shown,
            staging_tag: staging_tag.to_string(),
            identity,
            live: LiveSet::default(),
            ownership: Arc::new(Ownership::off()),
            exact_ctime_dev,
        })
    }

    /// Creates the directory (and its parents) if needed, then opens it
    /// with `open_with_staging`.
    pub fn create_with_staging(
        path: &Path,
        staging_tag: &str,
        staging: &Path,
    ) -> Result<Root, FsError> {
        std::fs::create_dir_all(path)
            .map_err(|e| FsError::io("create directory", path.display(), e))?;
        Root::open_with_staging(path, staging_tag, Some(staging))
    }

    /// The racy window for a cache record of a file that stats as `stat`:
    /// none on this root's own filesystem when its probe showed that a
    /// write after a stat always gets a newer ctime (a later change can
    /// then never hide behind the recorded stat), else `window_ns`.
    /// `probe` false (`GM_RACY_PROBE=false`) always gives `window_ns`.
    pub fn racy_window_for(&self, stat: &Stat, window_ns: i64, probe: bool) -> i64 {
        if probe && self.exact_ctime_dev == Some(stat.dev) {
            0
        } else {
            window_ns
        }
    }

    /// Whether this root's filesystem gives every write after a stat a
    /// newer ctime (what `racy_window_for` relies on).
    pub fn exact_ctime(&self) -> bool {
        self.exact_ctime_dev.is_some()
    }

    /// Creates the directory (and its parents) if needed, then opens it.
    pub fn create(path: &Path, staging_tag: &str) -> Result<Root, FsError> {
        std::fs::create_dir_all(path)
            .map_err(|e| FsError::io("create directory", path.display(), e))?;
        Root::open(path, staging_tag)
    }

    /// Where staging is, for messages (the root's own, or the directory
    /// given to `open_with_staging` when renames from it reach the root).
    pub fn staging_shown(&self) -> &str {
        &self.staging_shown
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the ownership policy for everything this root writes.
    pub fn with_ownership(mut self, ownership: Arc<Ownership>) -> Root {
        self.ownership = ownership;
        self
    }

    /// Gives an open staging file the owner of `path`'s directory (created
    /// first when `create_parents`).
    fn own_file(&self, file: &File, path: &RelPath, create_parents: bool) -> Result<(), FsError> {
        if !self.ownership.active() {
            return Ok(());
        }
        let parent = self.parent(path, create_parents)?;
        self.ownership
            .apply(&parent, Target::Open(file.as_fd()), &self.shown(path))
    }

    /// The root directory as it was when opened.
    pub fn identity(&self) -> &Stat {
        &self.identity
    }

    /// True while the configured path still names the directory we hold
    /// open (not removed, not replaced, not unmounted from under us).
    pub fn still_in_place(&self) -> bool {
        match rustix::fs::stat(&self.path) {
            Ok(raw) => {
                let now = from_raw(&raw);
                now.kind == Kind::Dir
                    && now.ino == self.identity.ino
                    && now.dev == self.identity.dev
            }
            Err(_) => false,
        }
    }

    fn shown(&self, path: &RelPath) -> String {
        format!("{}/{}", self.path.display(), path)
    }

    /// A new staging name of `kind`, owned (kept from reclamation) while
    /// the returned guard lives, with a handle on the staging directory.
    pub(crate) fn staging_entry(&self, kind: &str) -> Result<(OwnedFd, String, LiveName), FsError> {
        let name = random_name(&self.staging_tag, kind);
        let owned = self.own(&name);
        let staging = self
            .staging
            .try_clone()
            .map_err(|e| FsError::io("dup staging handle", self.path.display(), e))?;
        Ok((staging, name, owned))
    }

    /// The parent directory of `path` (created if missing), for callers
    /// in this crate that rename into it.
    pub(crate) fn parent_dir(&self, path: &RelPath) -> Result<Parent<'_>, FsError> {
        self.parent(path, true)
    }

    /// `path` as it is shown in errors and logs.
    pub(crate) fn shown_path(&self, path: &RelPath) -> String {
        self.shown(path)
    }

    /// Opens the parent directory of `path`, never following a symlink;
    /// with `create`, missing directories on the way are created.
    fn parent(&self, path: &RelPath, create: bool) -> Result<Parent<'_>, FsError> {
        self.walk_to_parent(
            path,
            if create {
                Missing::Create
            } else {
                Missing::Fail
            },
        )
    }

    /// The deepest existing directory on the way to `path`'s parent (the
    /// parent itself when it exists). A directory created later on that way
    /// takes this one's owner, so a file bound for it can be owned now.
    fn nearest_dir(&self, path: &RelPath) -> Result<Parent<'_>, FsError> {
        self.walk_to_parent(path, Missing::Stop)
    }

    /// The one walk from the root to `path`'s parent, component by
    /// component from directory fds, never following a symlink.
    ///
    /// Where the kernel has `openat2`, an existing parent is first opened
    /// in one call that refuses any symlink on the way and any escape from
    /// the root (`RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`): the same
    /// guarantee, one system call instead of one open and close per
    /// component (walks were 13 % of the hub's CPU committing 30,000 small
    /// files). Any failure, a missing directory included, takes the
    /// component walk, which decides what the failure means.
    fn walk_to_parent(&self, path: &RelPath, missing: Missing) -> Result<Parent<'_>, FsError> {
        let Some(parent) = path.parent() else {
            return Ok(Parent::Root(self.dir.as_fd()));
        };
        if let Some(fd) = open_beneath(self.dir.as_fd(), parent.as_str()) {
            return Ok(Parent::Owned(fd));
        }
        let mut current = Parent::Root(self.dir.as_fd());
        let mut walked = String::new();
        for component in parent.components() {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(component);
            let opened = match rustix::fs::openat(&current, component, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if missing == Missing::Stop => break,
                Err(Errno::NOENT) if missing == Missing::Create => {
                    self.create_dir_in(
                        &current,
                        component,
                        &format!("{}/{walked}", self.path.display()),
                    )?;
                    rustix::fs::openat(&current, component, dir_flags(), Mode::empty())
                        .map_err(|e| self.walk_error(&walked, e))?
                }
                Err(e) => return Err(self.walk_error(&walked, e)),
            };
            current = Parent::Owned(opened);
        }
        Ok(current)
    }

    fn walk_error(&self, walked: &str, errno: Errno) -> FsError {
        let shown = format!("{}/{walked}", self.path.display());
        match errno {
            Errno::NOTDIR | Errno::LOOP => FsError::NotADirectory { path: shown },
            other => FsError::io("open directory", shown, other),
        }
    }

    fn stat_at(&self, parent: &Parent<'_>, path: &RelPath) -> Result<Option<Stat>, FsError> {
        match rustix::fs::statat(parent, path.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(raw) => Ok(Some(from_raw(&raw))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(FsError::io("stat", self.shown(path), e)),
        }
    }

    /// `lstat` of a path; `None` when it does not exist, including when a
    /// parent is missing or is not a directory (then it cannot exist).
    pub fn lstat(&self, path: &RelPath) -> Result<Option<Stat>, FsError> {
        let parent = match self.parent(path, false) {
            Ok(parent) => parent,
            Err(err) if err.is_not_found() => return Ok(None),
            Err(FsError::NotADirectory { .. }) => return Ok(None),
            Err(err) => return Err(err),
        };
        self.stat_at(&parent, path)
    }

    /// The entries of the directory at `path`, one level, with their
    /// `lstat` (nothing is followed), in name order; names that are not
    /// UTF-8 are left out. An absent directory is empty.
    pub fn read_dir(&self, path: &RelPath) -> Result<Vec<(String, Stat)>, FsError> {
        let dir = match self.open_dir(path) {
            Ok(dir) => dir,
            Err(err) if err.is_not_found() => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let shown = self.shown(path);
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir)
            .map_err(|e| FsError::io("read directory", &shown, e))?
        {
            let entry = entry.map_err(|e| FsError::io("read directory", &shown, e))?;
            let raw = entry.file_name();
            if raw.to_bytes() == b"." || raw.to_bytes() == b".." {
                continue;
            }
            let Ok(name) = raw.to_str() else { continue };
            match rustix::fs::statat(&dir, raw, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => out.push((name.to_string(), from_raw(&stat))),
                Err(Errno::NOENT) => {}
                Err(e) => return Err(FsError::io("stat", format!("{shown}/{name}"), e)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The target text of a symlink.
    pub fn read_link(&self, path: &RelPath) -> Result<String, FsError> {
        let parent = self.parent(path, false)?;
        read_link_at(&parent, path.file_name(), &self.shown(path))
    }

    /// Opens a regular file for reading, refusing symlinks and anything else.
    pub fn open_read(&self, path: &RelPath) -> Result<(File, Stat), FsError> {
        let parent = self.parent(path, false)?;
        let fd = rustix::fs::openat(
            &parent,
            path.file_name(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP => FsError::Unsupported {
                path: self.shown(path),
                what: "is a symlink, not a file".into(),
            },
            other => FsError::io("open", self.shown(path), other),
        })?;
        let stat = from_raw(
            &rustix::fs::fstat(&fd).map_err(|e| FsError::io("stat", self.shown(path), e))?,
        );
        if stat.kind != Kind::File {
            return Err(FsError::Unsupported {
                path: self.shown(path),
                what: "is not a regular file".into(),
            });
        }
        Ok((File::from(fd), stat))
    }

    /// Reads and hashes a whole file, cutting it into chunks when it is
    /// large (one pass). Fails with `TargetChanged` if the file changed while
    /// it was read, so a hash always matches one real version.
    pub fn hash_file(
        &self,
        path: &RelPath,
    ) -> Result<(ContentHash, Stat, Option<Manifest>), FsError> {
        self.hash_file_gated(path, &crate::io::IoGate::unlimited(), false)
    }

    /// `hash_file` with every read counted against `io`'s rate limit (the
    /// caller holds an `io` permit). `helped`: a large file is hashed on a
    /// second thread while this one reads and cuts it (the caller counts
    /// that thread against its hashing threads).
    pub fn hash_file_gated(
        &self,
        path: &RelPath,
        io: &crate::io::IoGate,
        helped: bool,
    ) -> Result<(ContentHash, Stat, Option<Manifest>), FsError> {
        let (file, before) = self.open_read(path)?;
        let read = if helped {
            gm_chunk::chunk_reader_helped
        } else {
            gm_chunk::chunk_reader
        };
        let chunked = read(io.reader(&file), before.size).map_err(|e| match e {
            gm_chunk::ChunkError::Read(io) => FsError::io("read", self.shown(path), io),
            other => FsError::io(
                "read",
                self.shown(path),
                std::io::Error::other(other.to_string()),
            ),
        })?;
        let after = from_raw(
            &rustix::fs::fstat(&file).map_err(|e| FsError::io("stat", self.shown(path), e))?,
        );
        if !after.unchanged_since(&before) || chunked.size != after.size {
            return Err(FsError::TargetChanged {
                path: self.shown(path),
            });
        }
        Ok((chunked.hash, after, chunked.manifest))
    }

    /// Reads `len` bytes at `offset` of a file (a chunk), never following a
    /// symlink.
    pub fn read_range(
        &self,
        file: &File,
        path: &RelPath,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, FsError> {
        let mut data = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut data, offset)
            .map_err(|e| FsError::io("read", self.shown(path), e))?;
        Ok(data)
    }

    /// Reads a whole (small) file, returning its bytes, their hash and the stat.
    pub fn read_whole(&self, path: &RelPath) -> Result<(Vec<u8>, ContentHash, Stat), FsError> {
        let (mut file, before) = self.open_read(path)?;
        let mut data = Vec::with_capacity(before.size as usize);
        file.read_to_end(&mut data)
            .map_err(|e| FsError::io("read", self.shown(path), e))?;
        let after = from_raw(
            &rustix::fs::fstat(&file).map_err(|e| FsError::io("stat", self.shown(path), e))?,
        );
        if !after.unchanged_since(&before) {
            return Err(FsError::TargetChanged {
                path: self.shown(path),
            });
        }
        let hash = ContentHash::of(&data);
        Ok((data, hash, after))
    }

    /// Starts a new staged file: `O_EXCL`, mode 0600, in this root's staging.
    pub fn stage_file(&self) -> Result<StagedFile, FsError> {
        let name = random_name(&self.staging_tag, "file");
        let owned = self.own(&name);
        let fd = rustix::fs::openat(
            &self.staging,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| {
            FsError::io(
                "create staging file",
                format!("{}/{name}", self.staging_shown),
                e,
            )
        })?;
        Ok(StagedFile {
            staging: self.staging.clone(),
            name,
            file: Some(File::from(fd)),
            content: Content::Writing(Box::default()),
            written: 0,
            writeback_from: 0,
            _owned: owned,
        })
    }

    /// Checks `expect` against the target, then renames the staged entry
    /// `staged_name` onto `path` and fsyncs the directory.
    fn place(&self, staged_name: &str, path: &RelPath, expect: Expect) -> Result<Stat, FsError> {
        self.place_with(staged_name, path, expect, true)
    }

    /// On failure the staged entry is removed: whatever went wrong (a
    /// parent that is not a directory, a changed target, an IO error), no
    /// staging entry outlives the attempt.
    fn place_with(
        &self,
        staged_name: &str,
        path: &RelPath,
        expect: Expect,
        sync_dir: bool,
    ) -> Result<Stat, FsError> {
        let placed = self.place_unchecked(staged_name, path, expect, sync_dir);
        if placed.is_err() {
            // Gone already if the rename happened.
            let _ = rustix::fs::unlinkat(&self.staging, staged_name, AtFlags::empty());
        }
        placed
    }

    fn place_unchecked(
        &self,
        staged_name: &str,
        path: &RelPath,
        expect: Expect,
        sync_dir: bool,
    ) -> Result<Stat, FsError> {
        let parent = self.parent(path, true)?;
        let current = self.stat_at(&parent, path)?;
        let result = match (expect, current) {
            (Expect::Absent, None) => rustix::fs::renameat_with(
                &self.staging,
                staged_name,
                &parent,
                path.file_name(),
                RenameFlags::NOREPLACE,
            ),
            (Expect::Unchanged(planned), Some(now))
                if now.unchanged_since(&planned) && now.kind != Kind::Dir =>
            {
                rustix::fs::renameat(&self.staging, staged_name, &parent, path.file_name())
            }
            _ => Err(Errno::EXIST),
        };
        match result {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                return Err(FsError::TargetChanged {
                    path: self.shown(path),
                });
            }
            Err(e) => return Err(FsError::io("rename into place", self.shown(path), e)),
        }
        if sync_dir {
            rustix::fs::fsync(&parent)
                .map_err(|e| FsError::io("fsync directory", self.shown(path), e))?;
        }
        self.stat_at(&parent, path)?
            .ok_or_else(|| FsError::TargetChanged {
                path: self.shown(path),
            })
    }

    /// Flushes everything written on this root's filesystem (`syncfs`):
    /// one barrier for a whole group of staged files or renames.
    pub fn sync_filesystem(&self) -> Result<(), FsError> {
        rustix::fs::syncfs(&self.dir).map_err(|e| FsError::io("syncfs", self.path.display(), e))
    }

    /// Creates directory `name` in `parent` (an existing one is fine). With
    /// an ownership policy, it is made in staging, given the parent's owner,
    /// then renamed into place, so it never shows with another owner.
    fn create_dir_in(&self, parent: &impl AsFd, name: &str, shown: &str) -> Result<(), FsError> {
        if !self.ownership.active() {
            return match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => Ok(()),
                Err(e) => Err(FsError::io("create directory", shown, e)),
            };
        }
        let staged = random_name(&self.staging_tag, "dir");
        let _owned = self.own(&staged);
        rustix::fs::mkdirat(&self.staging, staged.as_str(), Mode::from_raw_mode(0o755))
            .map_err(|e| FsError::io("create directory", shown, e))?;
        let placed = self
            .ownership
            .apply(
                parent,
                Target::Entry(self.staging.as_fd(), staged.as_str()),
                shown,
            )
            .and_then(|()| {
                match rustix::fs::renameat_with(
                    &self.staging,
                    staged.as_str(),
                    parent,
                    name,
                    RenameFlags::NOREPLACE,
                ) {
                    Ok(()) | Err(Errno::EXIST) => Ok(()),
                    Err(e) => Err(FsError::io("create directory", shown, e)),
                }
            });
        // Left behind only when someone else created the directory first.
        let _ = rustix::fs::unlinkat(&self.staging, staged.as_str(), AtFlags::REMOVEDIR);
        placed
    }

    /// Creates a directory (parents too). An existing directory is fine.
    pub fn make_dir(&self, path: &RelPath) -> Result<Stat, FsError> {
        self.make_dir_with(path, true)
    }

    /// `make_dir` without the directory fsync, for a group commit whose
    /// caller makes everything durable with one `sync_filesystem` before
    /// recording it.
    pub fn make_dir_unsynced(&self, path: &RelPath) -> Result<Stat, FsError> {
        self.make_dir_with(path, false)
    }

    fn make_dir_with(&self, path: &RelPath, sync_dir: bool) -> Result<Stat, FsError> {
        let parent = self.parent(path, true)?;
        match self.stat_at(&parent, path)? {
            Some(stat) if stat.kind == Kind::Dir => return Ok(stat),
            Some(_) => {
                return Err(FsError::TargetChanged {
                    path: self.shown(path),
                });
            }
            None => {}
        }
        self.create_dir_in(&parent, path.file_name(), &self.shown(path))?;
        if sync_dir {
            rustix::fs::fsync(&parent)
                .map_err(|e| FsError::io("fsync directory", self.shown(path), e))?;
        }
        match self.stat_at(&parent, path)? {
            Some(stat) if stat.kind == Kind::Dir => Ok(stat),
            _ => Err(FsError::TargetChanged {
                path: self.shown(path),
            }),
        }
    }

    /// Creates (or replaces, per `expect`) a symlink, atomically.
    pub fn make_symlink(
        &self,
        path: &RelPath,
        target: &str,
        expect: Expect,
    ) -> Result<Stat, FsError> {
        gm_core::entry::check_symlink_target(target).map_err(|what| FsError::Unsupported {
            path: self.shown(path),
            what,
        })?;
        let name = random_name(&self.staging_tag, "link");
        let _owned = self.own(&name);
        rustix::fs::symlinkat(target, &self.staging, name.as_str())
            .map_err(|e| FsError::io("create symlink", self.shown(path), e))?;
        if self.ownership.active() {
            let owned = self.parent(path, true).and_then(|parent| {
                self.ownership.apply(
                    &parent,
                    Target::Entry(self.staging.as_fd(), name.as_str()),
                    &self.shown(path),
                )
            });
            if let Err(err) = owned {
                let _ = rustix::fs::unlinkat(&self.staging, name.as_str(), AtFlags::empty());
                return Err(err);
            }
        }
        self.place(&name, path, expect)
    }

    /// Sets or clears the executable bit of a file that is still `expect`.
    pub fn set_executable(
        &self,
        path: &RelPath,
        executable: bool,
        expect: Stat,
    ) -> Result<Stat, FsError> {
        self.set_mode(path, FileMode::from(executable), expect)
    }

    /// Gives a file that is still `expect` the permissions of `mode`.
    pub fn set_mode(&self, path: &RelPath, mode: FileMode, expect: Stat) -> Result<Stat, FsError> {
        let (file, now) = self.open_read(path)?;
        if !now.unchanged_since(&expect) {
            return Err(FsError::TargetChanged {
                path: self.shown(path),
            });
        }
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode.bits()))
            .map_err(|e| FsError::io("chmod", self.shown(path), e))?;
        Ok(from_raw(
            &rustix::fs::fstat(&file).map_err(|e| FsError::io("stat", self.shown(path), e))?,
        ))
    }

    /// Removes a file, symlink or empty directory that is still the planned
    /// version `expect`. A file is first moved aside into staging and checked
    /// there, so a write that lands between the check and the removal is
    /// put back instead of lost. Already absent is success.
    pub fn remove(&self, path: &RelPath, expect: Stat) -> Result<(), FsError> {
        let parent = match self.parent(path, false) {
            Ok(parent) => parent,
            Err(err) if err.is_not_found() => return Ok(()),
            Err(err) => return Err(err),
        };
        let Some(current) = self.stat_at(&parent, path)? else {
            return Ok(());
        };
        if current.kind == Kind::Dir && expect.kind == Kind::Dir {
            return match rustix::fs::unlinkat(&parent, path.file_name(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => rustix::fs::fsync(&parent)
                    .map_err(|e| FsError::io("fsync directory", self.shown(path), e)),
                Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => Err(FsError::NotEmpty {
                    path: self.shown(path),
                }),
                Err(e) => Err(FsError::io("remove directory", self.shown(path), e)),
            };
        }
        if !current.unchanged_since(&expect) {
            return Err(FsError::TargetChanged {
                path: self.shown(path),
            });
        }
        let aside = random_name(&self.staging_tag, "removed");
        let _owned = self.own(&aside);
        rustix::fs::renameat(&parent, path.file_name(), &self.staging, aside.as_str())
            .map_err(|e| FsError::io("move aside for removal", self.shown(path), e))?;
        let moved = rustix::fs::statat(&self.staging, aside.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map(|raw| from_raw(&raw))
            .map_err(|e| FsError::io("stat moved entry", self.shown(path), e))?;
        if moved.same_file_content(&expect) {
            rustix::fs::unlinkat(&self.staging, aside.as_str(), AtFlags::empty())
                .map_err(|e| FsError::io("remove", self.shown(path), e))?;
            rustix::fs::fsync(&parent)
                .map_err(|e| FsError::io("fsync directory", self.shown(path), e))?;
            return Ok(());
        }
        // Changed between the check and the move: put it back, never lose it.
        self.restore_aside(&aside, &parent, path)?;
        Err(FsError::TargetChanged {
            path: self.shown(path),
        })
    }

    fn restore_aside(
        &self,
        aside: &str,
        parent: &Parent<'_>,
        path: &RelPath,
    ) -> Result<(), FsError> {
        match rustix::fs::renameat_with(
            &self.staging,
            aside,
            parent,
            path.file_name(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                let restored = format!(
                    "{}.ghostmirror-restored-{:08x}",
                    path.file_name(),
                    rand::random::<u32>()
                );
                tracing::warn!(path = %path, restored = %restored, "a new entry appeared while restoring; keeping both");
                rustix::fs::renameat_with(
                    &self.staging,
                    aside,
                    parent,
                    restored.as_str(),
                    RenameFlags::NOREPLACE,
                )
                .map_err(|e| FsError::io("restore moved entry", self.shown(path), e))
            }
            Err(e) => Err(FsError::io("restore moved entry", self.shown(path), e)),
        }
    }

    /// Renames `from` (still `expect`) to `to`, which must not exist. Used
    /// to turn a local version into its conflict copy without moving bytes.
    pub fn rename_noreplace(
        &self,
        from: &RelPath,
        to: &RelPath,
        expect: Stat,
    ) -> Result<Stat, FsError> {
        let from_parent = self.parent(from, false)?;
        let current = self
            .stat_at(&from_parent, from)?
            .ok_or_else(|| FsError::TargetChanged {
                path: self.shown(from),
            })?;
        let same = if expect.kind == Kind::Dir {
            current.kind == Kind::Dir && current.ino == expect.ino
        } else {
            current.unchanged_since(&expect)
        };
        if !same {
            return Err(FsError::TargetChanged {
                path: self.shown(from),
            });
        }
        let to_parent = self.parent(to, true)?;
        rustix::fs::renameat_with(
            &from_parent,
            from.file_name(),
            &to_parent,
            to.file_name(),
            RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            Errno::EXIST => FsError::TargetChanged {
                path: self.shown(to),
            },
            other => FsError::io("rename", self.shown(from), other),
        })?;
        rustix::fs::fsync(&to_parent)
            .map_err(|e| FsError::io("fsync directory", self.shown(to), e))?;
        rustix::fs::fsync(&from_parent)
            .map_err(|e| FsError::io("fsync directory", self.shown(from), e))?;
        self.stat_at(&to_parent, to)?
            .ok_or_else(|| FsError::TargetChanged {
                path: self.shown(to),
            })
    }

    /// Removes a whole directory tree that is still the directory `expect`
    /// (same inode): it is moved aside into staging in one rename, so the
    /// path is never seen half-emptied, then deleted there. Already absent
    /// is success. The caller must know nothing in it is lost (its content
    /// exists elsewhere); a crash before the deletion leaves it in staging,
    /// which the next start removes.
    pub fn remove_tree(&self, path: &RelPath, expect: Stat) -> Result<(), FsError> {
        let parent = match self.parent(path, false) {
            Ok(parent) => parent,
            Err(err) if err.is_not_found() => return Ok(()),
            Err(err) => return Err(err),
        };
        let Some(current) = self.stat_at(&parent, path)? else {
            return Ok(());
        };
        if current.kind != Kind::Dir || current.ino != expect.ino || expect.kind != Kind::Dir {
            return Err(FsError::TargetChanged {
                path: self.shown(path),
            });
        }
        let aside = random_name(&self.staging_tag, "removed");
        let _owned = self.own(&aside);
        rustix::fs::renameat(&parent, path.file_name(), &self.staging, aside.as_str())
            .map_err(|e| FsError::io("move aside for removal", self.shown(path), e))?;
        rustix::fs::fsync(&parent)
            .map_err(|e| FsError::io("fsync directory", self.shown(path), e))?;
        remove_tree_at(
            &self.staging,
            &aside,
            &format!("{}/{aside}", self.staging_shown),
        )
    }

    /// Removes every staging entry of this root that no live transfer of
    /// this process owns: at start (everything is left by an earlier
    /// process) or later with `min_age` so only stale entries go.
    pub fn reclaim_staging(&self, min_age: std::time::Duration) -> Result<Vec<Reclaimed>, FsError> {
        let shown = self.staging_shown.clone();
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.staging)
            .map_err(|e| FsError::io("read directory", &shown, e))?
        {
            let entry = entry.map_err(|e| FsError::io("read directory", &shown, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(entry.file_name().to_owned());
            }
        }
        let now_ns = crate::scan::now_ns();
        let mut reclaimed = Vec::new();
        for name in &names {
            let text = name.to_string_lossy().into_owned();
            if self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&text)
            {
                continue;
            }
            let stat =
                match rustix::fs::statat(&self.staging, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                {
                    Ok(raw) => from_raw(&raw),
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(FsError::io("stat staging entry", &shown, e)),
                };
            let age =
                std::time::Duration::from_nanos(now_ns.saturating_sub(stat.mtime_ns).max(0) as u64);
            if age < min_age {
                continue;
            }
            match rustix::fs::unlinkat(&self.staging, name.as_c_str(), AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOENT) => continue,
                Err(Errno::ISDIR) => {
                    // A staged tree or a directory moved aside: all of it.
                    remove_tree_at(&self.staging, &text, &format!("{shown}/{text}"))?;
                }
                Err(e) => return Err(FsError::io("remove staging entry", &shown, e)),
            }
            reclaimed.push(Reclaimed {
                name: text,
                age,
                size: stat.size,
            });
        }
        Ok(reclaimed)
    }

    /// Removes every staging entry not owned by this process (call before
    /// any transfer starts).
    pub fn clear_staging(&self) -> Result<Vec<Reclaimed>, FsError> {
        self.reclaim_staging(std::time::Duration::ZERO)
    }

    fn own(&self, name: &str) -> LiveName {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        LiveName {
            live: self.live.clone(),
            name: name.to_string(),
        }
    }

    /// True when the root holds nothing but the internal directory.
    pub fn is_empty(&self) -> Result<bool, FsError> {
        let shown = self.path.display().to_string();
        for entry in rustix::fs::Dir::read_from(&self.dir)
            .map_err(|e| FsError::io("read directory", &shown, e))?
        {
            let entry = entry.map_err(|e| FsError::io("read directory", &shown, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." && name != gm_core::INTERNAL_DIR.as_bytes() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// How many entries the staging directory holds now.
    pub fn staging_entries(&self) -> Result<usize, FsError> {
        let shown = self.staging_shown.clone();
        let mut count = 0;
        for entry in rustix::fs::Dir::read_from(&self.staging)
            .map_err(|e| FsError::io("read directory", &shown, e))?
        {
            let entry = entry.map_err(|e| FsError::io("read directory", &shown, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                count += 1;
            }
        }
        Ok(count)
    }

    /// The root directory handle, for the scanner.
    pub(crate) fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Opens the directory at `path` (no symlink followed anywhere).
    pub(crate) fn open_dir(&self, path: &RelPath) -> Result<OwnedFd, FsError> {
        let parent = self.parent(path, false)?;
        rustix::fs::openat(&parent, path.file_name(), dir_flags(), Mode::empty()).map_err(|e| {
            match e {
                Errno::NOTDIR | Errno::LOOP => FsError::NotADirectory {
                    path: self.shown(path),
                },
                other => FsError::io("open directory", self.shown(path), other),
            }
        })
    }
}

fn open_or_make_dir(
    parent: BorrowedFd<'_>,
    name: &str,
    mode: u32,
    shown: &str,
) -> Result<OwnedFd, FsError> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(FsError::io(
                "create directory",
                format!("{shown}/{name}"),
                e,
            ));
        }
    }
    rustix::fs::openat(parent, name, dir_flags(), Mode::empty()).map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => FsError::NotADirectory {
            path: format!("{shown}/{name}"),
        },
        other => FsError::io("open directory", format!("{shown}/{name}"), other),
    })
}

/// Deletes the directory `name` in `parent` and everything below it,
/// without following a symlink anywhere. Directories without a write bit
/// (a finished skill tree) are made writable first. Used only inside
/// staging, on trees nobody else refers to.
pub(crate) fn remove_tree_at(parent: impl AsFd, name: &str, shown: &str) -> Result<(), FsError> {
    let dir = match rustix::fs::openat(&parent, name, dir_flags(), Mode::empty()) {
        Ok(dir) => dir,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return match rustix::fs::unlinkat(&parent, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(FsError::io("remove", shown, e)),
            };
        }
        Err(e) => return Err(FsError::io("open directory", shown, e)),
    };
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))
        .map_err(|e| FsError::io("chmod directory", shown, e))?;
    let mut names = Vec::new();
    for entry in
        rustix::fs::Dir::read_from(&dir).map_err(|e| FsError::io("read directory", shown, e))?
    {
        let entry = entry.map_err(|e| FsError::io("read directory", shown, e))?;
        let raw = entry.file_name().to_bytes();
        if raw != b"." && raw != b".." {
            names.push(entry.file_name().to_owned());
        }
    }
    for child in names {
        let text = child.to_string_lossy().into_owned();
        match rustix::fs::unlinkat(&dir, child.as_c_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR | Errno::PERM) => {
                remove_tree_at(&dir, &text, &format!("{shown}/{text}"))?
            }
            Err(e) => return Err(FsError::io("remove", format!("{shown}/{text}"), e)),
        }
    }
    drop(dir);
    match rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(FsError::io("remove directory", shown, e)),
    }
}

pub(crate) fn read_link_at(dir: impl AsFd, name: &str, shown: &str) -> Result<String, FsError> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())
        .map_err(|e| FsError::io("read symlink", shown, e))?;
    String::from_utf8(target.into_bytes()).map_err(|_| FsError::Unsupported {
        path: shown.to_string(),
        what: "symlink target is not valid UTF-8".into(),
    })
}

/// A large staged file asks the kernel to start writing its pages out after
/// each this many bytes, so the disk works while the rest arrives and the
/// commit's fsync waits only for the tail (a 512 MiB upload otherwise left
/// all of its pages dirty for that one fsync: 1.6 s of 7.6 s for 2 GiB).
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writeback of `len` bytes at `offset` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). A hint: durability still
/// comes from the fsync before the commit, so a failure is only logged.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: the descriptor is open for the duration of the call; the
    // call reads no memory of ours.
    let done = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if done != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range");
    }
}

/// A file being written in staging. Dropping it without `commit` removes it.
pub struct StagedFile {
    staging: Arc<OwnedFd>,
    name: String,
    /// Open while written; closed by `prepare`.
    file: Option<File>,
    content: Content,
    written: u64,
    /// Bytes before this offset have had their writeback started.
    writeback_from: u64,
    /// Keeps the name out of staging reclamation while the file lives.
    _owned: LiveName,
}

/// What a staged file holds: hashed as it is written; once prepared for a
/// group commit, only its hash and stat are kept (no descriptor, no hasher),
/// so a request may hold thousands of prepared files.
enum Content {
    Writing(Box<Hasher>),
    /// Mode set, waiting for the group's `sync_filesystem` and its commit.
    Prepared {
        hash: ContentHash,
        stat: Stat,
    },
}

impl StagedFile {
    /// Appends bytes, hashing them as they are written.
    pub fn write_all(&mut self, data: &[u8]) -> Result<(), FsError> {
        let Some(file) = self.file.as_mut() else {
            return Err(FsError::Unsupported {
                path: self.name.clone(),
                what: "staged file already finished".into(),
            });
        };
        let Content::Writing(hasher) = &mut self.content else {
            return Err(FsError::Unsupported {
                path: self.name.clone(),
                what: "staged file already prepared".into(),
            });
        };
        file.write_all(data)
            .map_err(|e| FsError::io("write staging file", &self.name, e))?;
        hasher.update(data);
        self.written += data.len() as u64;
        if self.written - self.writeback_from >= WRITEBACK_STEP {
            start_writeback(
                file,
                self.writeback_from,
                self.written - self.writeback_from,
            );
            self.writeback_from = self.written;
        }
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.written
    }

    /// Reads back bytes already written (a chunk that repeats in the file).
    pub fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, FsError> {
        let Some(file) = self.file.as_ref() else {
            return Err(FsError::Unsupported {
                path: self.name.clone(),
                what: "staged file already finished".into(),
            });
        };
        let mut data = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut data, offset)
            .map_err(|e| FsError::io("read staging file", &self.name, e))?;
        Ok(data)
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// The hash of everything written so far.
    pub fn hash(&self) -> ContentHash {
        match &self.content {
            Content::Writing(hasher) => hasher.finalize(),
            Content::Prepared { hash, .. } => *hash,
        }
    }

    /// Copies a file of `root` into this staged file (a local copy: bytes
    /// move on disk, never on the wire).
    pub fn copy_from(&mut self, root: &Root, source: &RelPath) -> Result<(), FsError> {
        let (mut file, _) = root.open_read(source)?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = file
                .read(&mut buffer)
                .map_err(|e| FsError::io("read", root.shown(source), e))?;
            if read == 0 {
                return Ok(());
            }
            self.write_all(&buffer[..read])?;
        }
    }

    /// The commit: checks the whole-content hash once, sets the mode on the
    /// file (prepared or not), fsyncs it, checks the target is still
    /// `expect`, renames it into place and fsyncs the directory. On any failure the staging file
    /// is removed and nothing is visible at `path`.
    pub fn commit(
        mut self,
        root: &Root,
        path: &RelPath,
        expected: ContentHash,
        mode: impl Into<FileMode>,
        expect: Expect,
    ) -> Result<Stat, FsError> {
        let mode = mode.into();
        let actual = self.hash();
        if actual != expected {
            return Err(FsError::HashMismatch {
                path: root.shown(path),
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            });
        }
        let file = match self.file.take() {
            Some(file) => file,
            // Prepared for a group that did not form: opened again to be
            // synced on its own.
            None => File::from(
                rustix::fs::openat(
                    &self.staging,
                    self.name.as_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| FsError::io("open staging file", root.shown(path), e))?,
            ),
        };
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode.bits()))
            .map_err(|e| FsError::io("chmod staging file", root.shown(path), e))?;
        root.own_file(&file, path, true)?;
        file.sync_all()
            .map_err(|e| FsError::io("fsync staging file", root.shown(path), e))?;
        let staged = staged_stat(&file, root, path)?;
        drop(file);
        let name = std::mem::take(&mut self.name);
        Ok(as_landed(staged, root.place(&name, path, expect)?))
    }

    /// Group commit, step 1: sets the final mode on the open file. The
    /// caller then makes the group durable with one
    /// `Root::sync_filesystem` before any `commit_prepared`.
    pub fn prepare(
        &mut self,
        root: &Root,
        path: &RelPath,
        mode: impl Into<FileMode>,
    ) -> Result<(), FsError> {
        let mode = mode.into();
        let Some(file) = self.file.as_ref() else {
            return Err(FsError::Unsupported {
                path: self.name.clone(),
                what: "staged file already finished".into(),
            });
        };
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode.bits()))
            .map_err(|e| FsError::io("chmod staging file", &self.name, e))?;
        // Parents are not created here (the commit journals them when it
        // lands the file); a missing one will take the owner of its nearest
        // existing ancestor, so the file takes that owner too.
        if root.ownership.active() {
            let parent = root.nearest_dir(path)?;
            root.ownership
                .apply(&parent, Target::Open(file.as_fd()), &root.shown(path))?;
        }
        let stat = staged_stat(file, root, path)?;
        self.content = Content::Prepared {
            hash: self.hash(),
            stat,
        };
        // The group's `sync_filesystem` makes it durable; no descriptor needed.
        self.file = None;
        Ok(())
    }

    /// Group commit, step 2: checks the hash and the target, renames into
    /// place. The content and mode were made durable by the caller's
    /// `sync_filesystem` after `prepare`; the rename is made durable by the
    /// caller's next `sync_filesystem`, which must come before anything
    /// records the file as landed.
    pub fn commit_prepared(
        mut self,
        root: &Root,
        path: &RelPath,
        expected: ContentHash,
        expect: Expect,
    ) -> Result<Stat, FsError> {
        let Content::Prepared { hash, stat } = self.content else {
            return Err(FsError::Unsupported {
                path: root.shown(path),
                what: "staged file was not prepared for a group commit".into(),
            });
        };
        if hash != expected {
            return Err(FsError::HashMismatch {
                path: root.shown(path),
                expected: expected.to_hex(),
                actual: hash.to_hex(),
            });
        }
        let name = std::mem::take(&mut self.name);
        Ok(as_landed(
            stat,
            root.place_with(&name, path, expect, false)?,
        ))
    }
}

fn staged_stat(file: &File, root: &Root, path: &RelPath) -> Result<Stat, FsError> {
    Ok(from_raw(&rustix::fs::fstat(file).map_err(|e| {
        FsError::io("stat staging file", root.shown(path), e)
    })?))
}

/// The stat to record for content just landed: the one found at the path
/// after the rename, when it is still the staged file unchanged (a rename
/// moves only the ctime). When anything else got there first (a write in
/// the instant between the rename and that stat, or another file renamed
/// over it), a stat no file can have, so no cache record vouches for
/// content the hub or node did not write: the next look hashes the file.
/// (With no racy window, see `racy_window_for`, nothing else would.)
fn as_landed(staged: Stat, found: Stat) -> Stat {
    if found.same_file_content(&staged) {
        found
    } else {
        tracing::debug!(
            ?staged,
            ?found,
            "landed file changed before it was recorded"
        );
        Stat {
            ctime_ns: i64::MIN,
            ..found
        }
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = rustix::fs::unlinkat(&self.staging, self.name.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn rel(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    #[test]
    fn racy_window_is_waived_only_on_a_probed_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = Root::open(dir.path(), "t").unwrap();
        // The probe leaves nothing behind in staging.
        assert!(
            root.reclaim_staging(std::time::Duration::ZERO)
                .unwrap()
                .is_empty()
        );
        let here = root.identity;
        let elsewhere = Stat {
            dev: here.dev + 1,
            ..here
        };
        root.exact_ctime_dev = Some(here.dev);
        assert_eq!(root.racy_window_for(&here, 2_000, true), 0);
        assert_eq!(root.racy_window_for(&here, 2_000, false), 2_000);
        assert_eq!(root.racy_window_for(&elsewhere, 2_000, true), 2_000);
        root.exact_ctime_dev = None;
        assert_eq!(root.racy_window_for(&here, 2_000, true), 2_000);
    }

    fn write(
        root: &Root,
        path: &str,
        data: &[u8],
        executable: bool,
        expect: Expect,
    ) -> Result<Stat, FsError> {
        let mut staged = root.stage_file()?;
        staged.write_all(data)?;
        staged.commit(root, &rel(path), ContentHash::of(data), executable, expect)
    }

    #[test]
    fn a_landing_changed_before_its_stat_is_recorded_so_it_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let landed = write(&root, "f", b"ours", false, Expect::Absent).unwrap();
        let now = root.lstat(&rel("f")).unwrap().unwrap();
        assert!(
            now.unchanged_since(&landed),
            "an undisturbed landing records its stat"
        );
        let staged = Stat {
            ctime_ns: landed.ctime_ns - 5,
            mode: 0o600,
            ..landed
        };
        assert_eq!(
            as_landed(staged, landed),
            landed,
            "the rename moves only the ctime"
        );
        let written = Stat {
            mtime_ns: landed.mtime_ns + 1,
            size: 9,
            ..landed
        };
        let recorded = as_landed(staged, written);
        assert!(!written.unchanged_since(&recorded));
        let replaced = Stat {
            ino: landed.ino + 1,
            ..landed
        };
        assert!(!replaced.unchanged_since(&as_landed(staged, replaced)));
    }

    #[test]
    fn staging_outside_the_root_lands_there_and_falls_back_across_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("staging/w");
        let root = Root::create_with_staging(&dir.path().join("mirror"), "t", &outside).unwrap();
        let mut staged = root.stage_file().unwrap();
        staged.write_all(b"payload").unwrap();
        // The staged file lives outside the root, where a watcher of the
        // root does not see it.
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        let internal = dir.path().join("mirror/.ghostmirror/staging");
        assert!(!internal.exists() || std::fs::read_dir(&internal).unwrap().count() == 0);
        staged
            .commit(
                &root,
                &rel("a/f"),
                ContentHash::of(b"payload"),
                false,
                Expect::Absent,
            )
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("mirror/a/f")).unwrap(),
            b"payload"
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "probes leave nothing"
        );

        // Staging on another filesystem (tmpfs) cannot rename into the
        // root: the root's own staging is used instead.
        let shm = std::path::Path::new("/dev/shm");
        let other_fs = std::fs::metadata(shm).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.dev() != root.identity.dev
        });
        if other_fs && let Ok(far) = tempfile::tempdir_in(shm) {
            let root =
                Root::create_with_staging(&dir.path().join("mirror2"), "t", far.path()).unwrap();
            write(&root, "g", b"x", false, Expect::Absent).unwrap();
            assert_eq!(std::fs::read(dir.path().join("mirror2/g")).unwrap(), b"x");
            assert_eq!(std::fs::read_dir(far.path()).unwrap().count(), 0);
        }
    }

    /// Found by the crash test with real processes (tests/faults.rs): a
    /// landing whose parent had become a file (another replica replaced the
    /// directory meanwhile) failed before the rename and left its staged
    /// file behind, one per file of a downloaded batch, for the rest of the
    /// session. Every failed landing now removes what it staged.
    #[test]
    fn a_landing_that_fails_before_the_rename_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        write(
            &root,
            "a",
            b"a file where a directory was",
            false,
            Expect::Absent,
        )
        .unwrap();
        // One by one.
        let err = write(&root, "a/x", b"x", false, Expect::Absent).unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        // Group commit.
        let mut staged = root.stage_file().unwrap();
        staged.write_all(b"y").unwrap();
        staged.prepare(&root, &rel("b"), false).unwrap();
        let err = staged
            .commit_prepared(&root, &rel("a/y"), ContentHash::of(b"y"), Expect::Absent)
            .unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        // A symlink.
        let err = root
            .make_symlink(&rel("a/l"), "t", Expect::Absent)
            .unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        // A target that changed.
        let err = write(&root, "a", b"other", false, Expect::Absent).unwrap_err();
        assert!(matches!(err, FsError::TargetChanged { .. }), "{err}");
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn atomic_write_creates_parents_sets_mode_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let stat = write(&root, "a/b/c.sh", b"#!/bin/sh\n", true, Expect::Absent).unwrap();
        assert_eq!(stat.mode & 0o777, 0o755);
        let on_disk = std::fs::metadata(dir.path().join("a/b/c.sh")).unwrap();
        assert_eq!(on_disk.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::read(dir.path().join("a/b/c.sh")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn group_commit_lands_after_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let mut staged = Vec::new();
        for i in 0..10u8 {
            let mut file = root.stage_file().unwrap();
            file.write_all(&[i; 100]).unwrap();
            file.prepare(&root, &rel(&format!("d/{i}")), i % 2 == 0)
                .unwrap();
            staged.push((i, file));
        }
        root.sync_filesystem().unwrap();
        for (i, file) in staged {
            let stat = file
                .commit_prepared(
                    &root,
                    &rel(&format!("d/{i}")),
                    ContentHash::of(&[i; 100]),
                    Expect::Absent,
                )
                .unwrap();
            assert_eq!(stat.executable(), i % 2 == 0);
        }
        root.sync_filesystem().unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("d/3")).unwrap(),
            vec![3u8; 100]
        );
        assert_eq!(root.staging_entries().unwrap(), 0);
        // Unprepared files are refused by the group path.
        let mut file = root.stage_file().unwrap();
        file.write_all(b"x").unwrap();
        assert!(
            file.commit_prepared(&root, &rel("x"), ContentHash::of(b"x"), Expect::Absent)
                .is_err()
        );
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn a_prepared_file_commits_alone_too() {
        // A group that did not form: the prepared file (its descriptor
        // closed) is opened again, synced and landed on its own.
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let mut file = root.stage_file().unwrap();
        file.write_all(b"alone").unwrap();
        file.prepare(&root, &rel("e/x.sh"), true).unwrap();
        assert!(file.write_all(b"more").is_err(), "prepared means finished");
        assert_eq!(file.hash(), ContentHash::of(b"alone"));
        let stat = file
            .commit(
                &root,
                &rel("e/x.sh"),
                ContentHash::of(b"alone"),
                true,
                Expect::Absent,
            )
            .unwrap();
        assert!(stat.executable());
        assert_eq!(std::fs::read(dir.path().join("e/x.sh")).unwrap(), b"alone");
        // The wrong hash is refused, prepared or not, and leaves nothing.
        let mut file = root.stage_file().unwrap();
        file.write_all(b"y").unwrap();
        file.prepare(&root, &rel("y"), false).unwrap();
        let err = file
            .commit_prepared(&root, &rel("y"), ContentHash::of(b"z"), Expect::Absent)
            .unwrap_err();
        assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
        assert!(!dir.path().join("y").exists());
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn reclamation_spares_live_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        // Left by an earlier process, and old.
        let stale = dir.path().join(".ghostmirror/staging/old-file");
        std::fs::write(&stale, b"partial").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // A live transfer that has been quiet just as long.
        let mut live = root.stage_file().unwrap();
        live.write_all(b"slow").unwrap();
        for entry in std::fs::read_dir(dir.path().join(".ghostmirror/staging"))
            .unwrap()
            .flatten()
        {
            std::fs::File::options()
                .write(true)
                .open(entry.path())
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let reclaimed = root
            .reclaim_staging(std::time::Duration::from_secs(3600))
            .unwrap();
        assert_eq!(reclaimed.len(), 1, "{reclaimed:?}");
        assert_eq!(reclaimed[0].name, "old-file");
        assert_eq!(reclaimed[0].size, 7);
        assert!(reclaimed[0].age >= std::time::Duration::from_secs(7000));
        assert_eq!(
            root.staging_entries().unwrap(),
            1,
            "the live transfer stays"
        );
        live.write_all(b" and done").unwrap();
        live.commit(
            &root,
            &rel("f"),
            ContentHash::of(b"slow and done"),
            false,
            Expect::Absent,
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            b"slow and done"
        );
    }

    #[test]
    fn hash_mismatch_discards_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let mut staged = root.stage_file().unwrap();
        staged.write_all(b"actual").unwrap();
        let err = staged
            .commit(
                &root,
                &rel("x"),
                ContentHash::of(b"expected"),
                false,
                Expect::Absent,
            )
            .unwrap_err();
        assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
        assert!(!dir.path().join("x").exists());
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn changed_target_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let planned = write(&root, "f", b"one", false, Expect::Absent).unwrap();
        // Someone else writes in between.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("f"), b"theirs!").unwrap();
        let err = write(&root, "f", b"two", false, Expect::Unchanged(planned)).unwrap_err();
        assert!(matches!(err, FsError::TargetChanged { .. }), "{err}");
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"theirs!");
        // Expecting absence where something exists fails too.
        assert!(matches!(
            write(&root, "f", b"3", false, Expect::Absent),
            Err(FsError::TargetChanged { .. })
        ));
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn symlinked_parent_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let err = write(&root, "link/escape", b"x", false, Expect::Absent).unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(root.open_read(&rel("link/escape")).is_err());
        // A symlink as the final component is not opened for reading either.
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("s")).unwrap();
        assert!(root.open_read(&rel("s")).is_err());
        assert_eq!(
            root.read_link(&rel("s")).unwrap(),
            outside.path().join("secret").display().to_string()
        );
    }

    #[test]
    fn the_one_call_walk_follows_no_symlink_and_stays_beneath() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::create_dir_all(outside.path().join("c")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a/out")).unwrap();
        std::os::unix::fs::symlink("b", dir.path().join("a/rel")).unwrap();
        let root_fd = rustix::fs::open(dir.path(), dir_flags(), Mode::empty()).unwrap();
        let opened = open_beneath(root_fd.as_fd(), "a/b");
        if !OPENAT2_WORKS.load(Ordering::Relaxed) {
            return; // A kernel without openat2: the component walk is all there is.
        }
        let opened = opened.expect("a/b opens in one call");
        let there = rustix::fs::fstat(&opened).unwrap();
        let want = std::fs::metadata(dir.path().join("a/b")).unwrap();
        assert_eq!(there.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
        // Through a symlink, absolute or relative, or to a missing
        // directory: nothing is opened (the component walk reports why).
        assert!(open_beneath(root_fd.as_fd(), "a/out/c").is_none());
        assert!(open_beneath(root_fd.as_fd(), "a/out").is_none());
        assert!(open_beneath(root_fd.as_fd(), "a/rel").is_none());
        assert!(open_beneath(root_fd.as_fd(), "a/missing").is_none());
        let root = Root::open(dir.path(), "t").unwrap();
        let err = write(&root, "a/out/c/escape", b"x", false, Expect::Absent).unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        assert!(!outside.path().join("c/escape").exists());
        write(&root, "a/b/in", b"x", false, Expect::Absent).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b/in")).unwrap(), b"x");
    }

    #[test]
    fn remove_checks_the_planned_version() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let planned = write(&root, "f", b"one", false, Expect::Absent).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("f"), b"edited").unwrap();
        assert!(matches!(
            root.remove(&rel("f"), planned),
            Err(FsError::TargetChanged { .. })
        ));
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"edited");
        let now = root.lstat(&rel("f")).unwrap().unwrap();
        root.remove(&rel("f"), now).unwrap();
        assert!(!dir.path().join("f").exists());
        root.remove(&rel("f"), now).unwrap();
        let d = root.make_dir(&rel("d/e")).unwrap();
        let d_parent = root.lstat(&rel("d")).unwrap().unwrap();
        assert!(matches!(
            root.remove(&rel("d"), d_parent),
            Err(FsError::NotEmpty { .. })
        ));
        root.remove(&rel("d/e"), d).unwrap();
        root.remove(&rel("d"), d_parent).unwrap();
        assert_eq!(root.staging_entries().unwrap(), 0);
    }

    #[test]
    fn symlinks_and_renames() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let link = root
            .make_symlink(&rel("l"), "../../outside", Expect::Absent)
            .unwrap();
        assert_eq!(link.kind, Kind::Symlink);
        assert_eq!(root.read_link(&rel("l")).unwrap(), "../../outside");
        let link2 = root
            .make_symlink(&rel("l"), "other", Expect::Unchanged(link))
            .unwrap();
        let moved = root
            .rename_noreplace(&rel("l"), &rel("sub/l2"), link2)
            .unwrap();
        assert_eq!(moved.kind, Kind::Symlink);
        assert_eq!(root.read_link(&rel("sub/l2")).unwrap(), "other");
        let stat = write(&root, "f", b"x", false, Expect::Absent).unwrap();
        let stat = root.set_executable(&rel("f"), true, stat).unwrap();
        assert!(stat.executable());
        assert!(
            root.rename_noreplace(&rel("f"), &rel("sub/l2"), stat)
                .is_err()
        );
    }

    #[test]
    fn replaced_root_is_detected() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("ws");
        std::fs::create_dir(&path).unwrap();
        let root = Root::open(&path, "t").unwrap();
        assert!(root.still_in_place());
        std::fs::rename(&path, parent.path().join("old")).unwrap();
        assert!(!root.still_in_place());
        std::fs::create_dir(&path).unwrap();
        assert!(!root.still_in_place());
    }
}
