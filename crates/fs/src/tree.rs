//! A whole directory tree built in a root's staging area and renamed into
//! place in one step: the atomic write path for directories (skills going
//! into the registry).
//!
//! `Root::stage_tree(target)` makes an empty directory in staging that
//! will become `target`. The caller adds directories, files (hashed while
//! written, checked against the expected hash, mode set, fsynced) and
//! symlinks below `target`, parents first, named by their final paths in
//! the root; `finish` sets the directories' final mode and fsyncs them
//! bottom-up; `place` renames the tree onto `target`, which must not exist
//! (`RENAME_NOREPLACE`: an existing entry is never overwritten), and fsyncs
//! the parent. A tree dropped before
//! `place` is deleted; one left by a crash is removed by the next start's
//! staging reclamation. So the target path holds either nothing or the
//! whole, durable tree.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use gm_core::{ContentHash, Hasher, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::error::FsError;
use crate::root::{FileMode, LiveName, Root, dir_flags, remove_tree_at};
use crate::stat::from_raw;
use gm_core::Stat;

/// A directory tree being built in staging. See the module comment.
pub struct StagedTree {
    staging: OwnedFd,
    name: String,
    /// Where the tree goes in its root.
    target: RelPath,
    top: OwnedFd,
    /// Directories made below the top, in creation order (parents first).
    dirs: Vec<RelPath>,
    shown: String,
    placed: bool,
    _owned: LiveName,
}

impl Root {
    /// Starts an empty staged tree in this root's staging area, to be
    /// placed at `target`.
    pub fn stage_tree(&self, target: &RelPath) -> Result<StagedTree, FsError> {
        let (staging, name, owned) = self.staging_entry("tree")?;
        let shown = format!("{}/{name}", self.staging_shown());
        rustix::fs::mkdirat(&staging, name.as_str(), Mode::from_raw_mode(0o700))
            .map_err(|e| FsError::io("create staged tree", &shown, e))?;
        let top = rustix::fs::openat(&staging, name.as_str(), dir_flags(), Mode::empty())
            .map_err(|e| FsError::io("open staged tree", &shown, e))?;
        Ok(StagedTree {
            staging,
            name,
            target: target.clone(),
            top,
            dirs: Vec::new(),
            shown,
            placed: false,
            _owned: owned,
        })
    }
}

impl StagedTree {
    fn shown(&self, path: &RelPath) -> String {
        format!("{} (staged in {})", path, self.shown)
    }

    /// Opens the directory that will hold `path`, a path strictly below
    /// the target (its parent must have been added already).
    fn parent(&self, path: &RelPath) -> Result<OwnedFd, FsError> {
        if !self.target.is_ancestor_of(path) {
            return Err(FsError::Unsupported {
                path: self.shown(path),
                what: format!("is not below {}, where this tree goes", self.target),
            });
        }
        let mut current = rustix::fs::openat(&self.top, ".", dir_flags(), Mode::empty())
            .map_err(|e| FsError::io("open staged tree", &self.shown, e))?;
        if let Some(parent) = path.parent() {
            let depth = self.target.components().count();
            for component in parent.components().skip(depth) {
                current = rustix::fs::openat(&current, component, dir_flags(), Mode::empty())
                    .map_err(|e| match e {
                        Errno::NOTDIR | Errno::LOOP => FsError::NotADirectory {
                            path: self.shown(path),
                        },
                        other => FsError::io("open directory", self.shown(path), other),
                    })?;
            }
        }
        Ok(current)
    }

    /// Adds a directory (its parent first).
    pub fn make_dir(&mut self, path: &RelPath) -> Result<(), FsError> {
        let parent = self.parent(path)?;
        rustix::fs::mkdirat(&parent, path.file_name(), Mode::from_raw_mode(0o700))
            .map_err(|e| FsError::io("create directory", self.shown(path), e))?;
        self.dirs.push(path.clone());
        Ok(())
    }

    /// Adds a symlink (never followed).
    pub fn make_symlink(&mut self, path: &RelPath, target: &str) -> Result<(), FsError> {
        gm_core::entry::check_symlink_target(target).map_err(|what| FsError::Unsupported {
            path: self.shown(path),
            what,
        })?;
        let parent = self.parent(path)?;
        rustix::fs::symlinkat(target, &parent, path.file_name())
            .map_err(|e| FsError::io("create symlink", self.shown(path), e))
    }

    /// Adds a file with the bytes of `content`, hashed while written. The
    /// hash must be `expected` (else nothing of it stays); the mode is set
    /// on the open file and the file is fsynced before this returns.
    /// Returns the bytes written.
    pub fn write_file(
        &mut self,
        path: &RelPath,
        content: &mut dyn Read,
        expected: ContentHash,
        mode: FileMode,
    ) -> Result<u64, FsError> {
        let parent = self.parent(path)?;
        let shown = self.shown(path);
        let fd = rustix::fs::openat(
            &parent,
            path.file_name(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| FsError::io("create file", &shown, e))?;
        let mut file = std::fs::File::from(fd);
        let mut hasher = Hasher::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        let outcome = (|| {
            loop {
                let read = content
                    .read(&mut buffer)
                    .map_err(|e| FsError::io("read", &shown, e))?;
                if read == 0 {
                    break;
                }
                std::io::Write::write_all(&mut file, &buffer[..read])
                    .map_err(|e| FsError::io("write", &shown, e))?;
                hasher.update(&buffer[..read]);
                written += read as u64;
            }
            let actual = hasher.finalize();
            if actual != expected {
                return Err(FsError::HashMismatch {
                    path: shown.clone(),
                    expected: expected.to_hex(),
                    actual: actual.to_hex(),
                });
            }
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode.bits()))
                .map_err(|e| FsError::io("chmod", &shown, e))?;
            file.sync_all().map_err(|e| FsError::io("fsync", &shown, e))
        })();
        if let Err(err) = outcome {
            drop(file);
            let _ = rustix::fs::unlinkat(&parent, path.file_name(), AtFlags::empty());
            return Err(err);
        }
        Ok(written)
    }

    /// Gives every directory (the top included) `dir_mode` and makes them
    /// durable, children before parents. After this the tree is complete
    /// on disk; only `place` remains.
    pub fn finish(&mut self, dir_mode: u32) -> Result<(), FsError> {
        for path in self.dirs.iter().rev() {
            let parent = self.parent(path)?;
            let dir = rustix::fs::openat(&parent, path.file_name(), dir_flags(), Mode::empty())
                .map_err(|e| FsError::io("open directory", self.shown(path), e))?;
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(dir_mode))
                .map_err(|e| FsError::io("chmod directory", self.shown(path), e))?;
            rustix::fs::fsync(&dir)
                .map_err(|e| FsError::io("fsync directory", self.shown(path), e))?;
        }
        // The top keeps its write bit until it is placed: moving a
        // directory to another parent rewrites its `..` entry.
        rustix::fs::fsync(&self.top).map_err(|e| FsError::io("fsync", &self.shown, e))?;
        rustix::fs::fsync(&self.staging).map_err(|e| FsError::io("fsync", &self.shown, e))
    }

    /// Renames the finished tree onto its target in `root` (the root whose
    /// staging holds it), which must not exist: an existing entry there is
    /// never overwritten (`FsError::Exists`). Then gives the top
    /// `dir_mode` and makes the rename durable.
    pub fn place(mut self, root: &Root, dir_mode: u32) -> Result<Stat, FsError> {
        let path = self.target.clone();
        let path = &path;
        let parent = root.parent_dir(path)?;
        match rustix::fs::renameat_with(
            &self.staging,
            self.name.as_str(),
            &parent,
            path.file_name(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST | Errno::NOTEMPTY) => {
                return Err(FsError::Exists {
                    path: root.shown_path(path),
                });
            }
            Err(e) => return Err(FsError::io("rename into place", root.shown_path(path), e)),
        }
        self.placed = true;
        rustix::fs::fchmod(&self.top, Mode::from_raw_mode(dir_mode))
            .map_err(|e| FsError::io("chmod directory", root.shown_path(path), e))?;
        rustix::fs::fsync(&self.top)
            .map_err(|e| FsError::io("fsync directory", root.shown_path(path), e))?;
        rustix::fs::fsync(&parent)
            .map_err(|e| FsError::io("fsync directory", root.shown_path(path), e))?;
        let stat = rustix::fs::fstat(&self.top)
            .map_err(|e| FsError::io("stat", root.shown_path(path), e))?;
        Ok(from_raw(&stat))
    }
}

impl Drop for StagedTree {
    fn drop(&mut self) {
        if !self.placed {
            let _ = remove_tree_at(self.staging.as_fd(), &self.name, &self.shown);
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

    fn build(root: &Root, target: &str) -> StagedTree {
        let mut tree = root.stage_tree(&rel(target)).unwrap();
        tree.make_dir(&rel(&format!("{target}/docs"))).unwrap();
        let body = b"# skill\n";
        tree.write_file(
            &rel(&format!("{target}/SKILL.md")),
            &mut &body[..],
            ContentHash::of(body),
            FileMode::read_only(false),
        )
        .unwrap();
        tree.write_file(
            &rel(&format!("{target}/docs/run.sh")),
            &mut &b"#!/bin/sh\n"[..],
            ContentHash::of(b"#!/bin/sh\n"),
            FileMode::read_only(true),
        )
        .unwrap();
        tree.make_symlink(&rel(&format!("{target}/docs/link")), "../nowhere")
            .unwrap();
        assert!(
            tree.make_dir(&rel("elsewhere/x")).is_err(),
            "only paths below the target"
        );
        tree.finish(0o555).unwrap();
        tree
    }

    #[test]
    fn a_tree_lands_whole_read_only_and_never_over_an_existing_entry() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let tree = build(&root, "skill");
        assert!(
            !dir.path().join("skill").exists(),
            "nothing visible before place"
        );
        let stat = tree.place(&root, 0o555).unwrap();
        assert_eq!(stat.mode & 0o777, 0o555);
        let mode = |p: &str| {
            std::fs::symlink_metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("skill/SKILL.md"), 0o444);
        assert_eq!(mode("skill/docs/run.sh"), 0o555);
        assert_eq!(mode("skill/docs"), 0o555);
        assert_eq!(
            std::fs::read_link(dir.path().join("skill/docs/link")).unwrap(),
            std::path::Path::new("../nowhere")
        );
        assert_eq!(root.staging_entries().unwrap(), 0);

        // A second tree onto the same name is refused and removed.
        let again = build(&root, "skill");
        let err = again.place(&root, 0o555).unwrap_err();
        assert!(matches!(err, FsError::Exists { .. }), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("skill/SKILL.md")).unwrap(),
            b"# skill\n"
        );
        assert_eq!(
            root.staging_entries().unwrap(),
            0,
            "the refused tree is gone"
        );
    }

    #[test]
    fn a_wrong_hash_or_a_dropped_tree_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let mut tree = root.stage_tree(&rel("s")).unwrap();
        let err = tree
            .write_file(
                &rel("s/SKILL.md"),
                &mut &b"abc"[..],
                ContentHash::of(b"abd"),
                FileMode::read_only(false),
            )
            .unwrap_err();
        assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
        drop(tree);
        assert_eq!(root.staging_entries().unwrap(), 0);
        // A finished, read-only tree left by a crash is reclaimed whole.
        let tree = build(&root, "s");
        std::mem::forget(tree);
        assert_eq!(root.staging_entries().unwrap(), 1);
        let reopened = Root::open(dir.path(), "t2").unwrap();
        let cleared = reopened.clear_staging().unwrap();
        assert_eq!(cleared.len(), 1);
        assert_eq!(reopened.staging_entries().unwrap(), 0);
    }

    #[test]
    fn remove_tree_takes_a_whole_directory_away() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        build(&root, "s").place(&root, 0o555).unwrap();
        let stat = root.lstat(&rel("s")).unwrap().unwrap();
        root.remove_tree(&rel("s"), stat).unwrap();
        assert!(!dir.path().join("s").exists());
        assert_eq!(root.staging_entries().unwrap(), 0);
        // Something else at the path is not removed.
        std::fs::write(dir.path().join("s"), b"file").unwrap();
        assert!(root.remove_tree(&rel("s"), stat).is_err());
        assert!(dir.path().join("s").exists());
    }
}
