//! The modelled filesystem of one replica (a node's workspace root or the
//! hub's mirror): a tree of entries, each with a `Stamp` standing for what
//! `lstat` tells apart (inode, mtime, ctime, mode).
//!
//! The engine's operations follow `gm_fs::Root`: writes land only when the
//! target is still what the plan saw (`Expect`), missing parents are
//! created, a non-directory parent refuses, a directory is removed only
//! when empty, a conflict rename never replaces. User operations (the
//! workload) change the tree without any of those checks, like a person
//! with a shell. Every change is logged in `touched` for the replica's
//! watcher.
//!
//! Invariant: every entry's parent is a directory in the tree.

use std::collections::BTreeMap;

use gm_core::{Entry, RelPath};

/// What lstat tells apart: changes on every write, chmod or rename of a
/// file or symlink; a directory keeps its stamp (its inode) for life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub entry: Entry,
    pub stamp: Stamp,
}

/// Why an engine operation did not land (the `gm_fs::FsError` cases the
/// engine reacts to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskError {
    /// The target is not what the plan expected.
    TargetChanged(RelPath),
    /// A directory to remove still has entries.
    NotEmpty(RelPath),
    /// A parent is not a directory.
    NotADirectory(RelPath),
    /// Not there, or not a regular file where one was needed.
    NotFound(RelPath),
}

/// What the target of a write must be just before the write lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Unchanged(Stamp),
}

/// What a scan saw at a path: its kind and stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub dir: bool,
    pub stamp: Stamp,
}

#[derive(Debug, Clone, Default)]
pub struct Disk {
    items: BTreeMap<RelPath, Item>,
    next_stamp: u64,
    /// Changes made so far (for telling a settled run).
    changes: u64,
    /// Paths changed since the watcher last looked.
    pub touched: Vec<RelPath>,
}

impl Disk {
    pub fn get(&self, path: &RelPath) -> Option<&Item> {
        self.items.get(path)
    }

    pub fn entry(&self, path: &RelPath) -> Option<&Entry> {
        self.items.get(path).map(|item| &item.entry)
    }

    pub fn seen(&self, path: &RelPath) -> Option<(Entry, Seen)> {
        self.items.get(path).map(|item| {
            (
                item.entry.clone(),
                Seen {
                    dir: item.entry.is_dir(),
                    stamp: item.stamp,
                },
            )
        })
    }

    pub fn items(&self) -> &BTreeMap<RelPath, Item> {
        &self.items
    }

    /// Every entry, without stamps: what replicas compare.
    pub fn tree(&self) -> BTreeMap<RelPath, Entry> {
        self.items
            .iter()
            .map(|(path, item)| (path.clone(), item.entry.clone()))
            .collect()
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn has_children(&self, path: &RelPath) -> bool {
        self.items.keys().any(|other| path.is_ancestor_of(other))
    }

    /// `path` and everything under it.
    pub fn subtree(&self, top: &RelPath) -> Vec<RelPath> {
        self.items
            .keys()
            .filter(|other| *other == top || top.is_ancestor_of(other))
            .cloned()
            .collect()
    }

    fn stamp(&mut self) -> Stamp {
        self.next_stamp += 1;
        Stamp(self.next_stamp)
    }

    fn put(&mut self, path: &RelPath, entry: Entry) -> Stamp {
        let stamp = self.stamp();
        self.items.insert(path.clone(), Item { entry, stamp });
        self.touched.push(path.clone());
        self.changes += 1;
        stamp
    }

    fn take(&mut self, path: &RelPath) -> Option<Item> {
        let item = self.items.remove(path);
        if item.is_some() {
            self.touched.push(path.clone());
            self.changes += 1;
        }
        item
    }

    /// Fails when an existing ancestor is not a directory.
    fn check_parents(&self, path: &RelPath) -> Result<(), DiskError> {
        for ancestor in path.ancestors() {
            match self.items.get(&ancestor) {
                Some(item) if !item.entry.is_dir() => {
                    return Err(DiskError::NotADirectory(ancestor));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// True when every ancestor exists (as a directory).
    fn parents_exist(&self, path: &RelPath) -> bool {
        path.ancestors()
            .iter()
            .all(|ancestor| self.items.get(ancestor).is_some_and(|i| i.entry.is_dir()))
    }

    fn create_parents(&mut self, path: &RelPath) -> Result<(), DiskError> {
        self.check_parents(path)?;
        for ancestor in path.ancestors() {
            if !self.items.contains_key(&ancestor) {
                self.put(&ancestor, Entry::Dir);
            }
        }
        Ok(())
    }

    // ---- engine operations (gm_fs::Root) ----

    /// `Root::make_dir`: parents too; an existing directory is fine.
    pub fn make_dir(&mut self, path: &RelPath) -> Result<Stamp, DiskError> {
        self.create_parents(path)?;
        match self.items.get(path) {
            Some(item) if item.entry.is_dir() => Ok(item.stamp),
            Some(_) => Err(DiskError::TargetChanged(path.clone())),
            None => Ok(self.put(path, Entry::Dir)),
        }
    }

    /// A file or symlink renamed into place from staging, if the target is
    /// still `expect` (never over a directory).
    pub fn place(
        &mut self,
        path: &RelPath,
        entry: Entry,
        expect: Expect,
    ) -> Result<Stamp, DiskError> {
        debug_assert!(!entry.is_dir());
        self.create_parents(path)?;
        let fits = match (expect, self.items.get(path)) {
            (Expect::Absent, None) => true,
            (Expect::Unchanged(planned), Some(now)) => now.stamp == planned && !now.entry.is_dir(),
            _ => false,
        };
        if !fits {
            return Err(DiskError::TargetChanged(path.clone()));
        }
        Ok(self.put(path, entry))
    }

    /// `Root::set_executable` on a file that is still `expect`.
    pub fn set_executable(
        &mut self,
        path: &RelPath,
        executable: bool,
        expect: Stamp,
    ) -> Result<Stamp, DiskError> {
        let Some(item) = self.items.get(path) else {
            return Err(DiskError::NotFound(path.clone()));
        };
        let Entry::File { hash, size, .. } = item.entry.clone() else {
            return Err(DiskError::NotFound(path.clone()));
        };
        if item.stamp != expect {
            return Err(DiskError::TargetChanged(path.clone()));
        }
        Ok(self.put(
            path,
            Entry::File {
                hash,
                size,
                executable,
            },
        ))
    }

    /// `Root::remove`: a file or symlink only if unchanged since `expect`,
    /// a directory only if empty; already absent is success.
    pub fn remove(&mut self, path: &RelPath, expect: Seen) -> Result<(), DiskError> {
        self.check_parents(path)?;
        let Some(current) = self.items.get(path) else {
            return Ok(());
        };
        if current.entry.is_dir() && expect.dir {
            if self.has_children(path) {
                return Err(DiskError::NotEmpty(path.clone()));
            }
            self.take(path);
            return Ok(());
        }
        if current.stamp != expect.stamp || current.entry.is_dir() != expect.dir {
            return Err(DiskError::TargetChanged(path.clone()));
        }
        self.take(path);
        Ok(())
    }

    /// `Root::rename_noreplace`: moves `from` (still `expect`; for a
    /// directory, the same directory) with everything under it to `to`,
    /// which must not exist. Returns the stamp at `to`.
    pub fn rename_noreplace(
        &mut self,
        from: &RelPath,
        to: &RelPath,
        expect: Seen,
    ) -> Result<Stamp, DiskError> {
        if !self.parents_exist(from) {
            return Err(DiskError::NotFound(from.clone()));
        }
        let Some(current) = self.items.get(from) else {
            return Err(DiskError::TargetChanged(from.clone()));
        };
        if current.stamp != expect.stamp || current.entry.is_dir() != expect.dir {
            return Err(DiskError::TargetChanged(from.clone()));
        }
        if to == from || from.is_ancestor_of(to) {
            return Err(DiskError::TargetChanged(to.clone()));
        }
        self.create_parents(to)?;
        if self.items.contains_key(to) {
            return Err(DiskError::TargetChanged(to.clone()));
        }
        Ok(self.move_tree(from, to))
    }

    /// Reads a regular file: its entry and stamp.
    pub fn read_file(&self, path: &RelPath) -> Result<(Entry, Stamp), DiskError> {
        match self.items.get(path) {
            Some(item) if matches!(item.entry, Entry::File { .. }) => {
                Ok((item.entry.clone(), item.stamp))
            }
            _ => Err(DiskError::NotFound(path.clone())),
        }
    }

    // ---- user operations (the workload; no checks beyond the tree's shape) ----

    /// Writes `entry` at `path` (parents must exist), replacing a file or
    /// symlink there.
    pub fn user_write(&mut self, path: &RelPath, entry: Entry) -> bool {
        if !self.parents_exist(path) || self.items.get(path).is_some_and(|i| i.entry.is_dir()) {
            return false;
        }
        self.put(path, entry);
        true
    }

    /// `mkdir` (parents must exist, path must not).
    pub fn user_mkdir(&mut self, path: &RelPath) -> bool {
        if !self.parents_exist(path) || self.items.contains_key(path) {
            return false;
        }
        self.put(path, Entry::Dir);
        true
    }

    /// `rm -rf`: returns what was removed.
    pub fn user_remove_tree(&mut self, path: &RelPath) -> Vec<(RelPath, Entry)> {
        let mut removed = Vec::new();
        for victim in self.subtree(path) {
            if let Some(item) = self.take(&victim) {
                removed.push((victim, item.entry));
            }
        }
        removed
    }

    /// `mv` to a path that does not exist.
    pub fn user_rename(&mut self, from: &RelPath, to: &RelPath) -> bool {
        if !self.items.contains_key(from)
            || self.items.contains_key(to)
            || !self.parents_exist(to)
            || to == from
            || from.is_ancestor_of(to)
        {
            return false;
        }
        self.move_tree(from, to);
        true
    }

    /// Moves a subtree. Files and symlinks moved get a new stamp at the top
    /// (rename changes ctime); directories keep theirs (same inode), and
    /// so does everything below the top.
    fn move_tree(&mut self, from: &RelPath, to: &RelPath) -> Stamp {
        let mut moved = Vec::new();
        for path in self.subtree(from) {
            if let Some(item) = self.take(&path) {
                moved.push((path, item));
            }
        }
        let mut top_stamp = Stamp(0);
        for (path, mut item) in moved {
            let target = if &path == from {
                if !item.entry.is_dir() {
                    item.stamp = self.stamp();
                }
                top_stamp = item.stamp;
                to.clone()
            } else {
                match path.rebase(from, to) {
                    Ok(target) => target,
                    // Too long to exist under the new name: a real rename
                    // would have failed; the workload avoids such names.
                    Err(_) => continue,
                }
            };
            self.touched.push(target.clone());
            self.changes += 1;
            self.items.insert(target, item);
        }
        top_stamp
    }

    /// Sets up an entry without logging it (initial state).
    pub fn seed(&mut self, path: &RelPath, entry: Entry) {
        let stamp = self.stamp();
        self.items.insert(path.clone(), Item { entry, stamp });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::ContentHash;

    fn p(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    fn file(content: &str) -> Entry {
        Entry::File {
            hash: ContentHash::of(content.as_bytes()),
            size: content.len() as u64,
            executable: false,
        }
    }

    #[test]
    fn engine_writes_check_their_target() {
        let mut disk = Disk::default();
        let first = disk.place(&p("a/b"), file("1"), Expect::Absent).unwrap();
        assert!(
            disk.entry(&p("a")).is_some_and(Entry::is_dir),
            "parents made"
        );
        assert!(disk.place(&p("a/b"), file("2"), Expect::Absent).is_err());
        let second = disk
            .place(&p("a/b"), file("2"), Expect::Unchanged(first))
            .unwrap();
        assert_eq!(
            disk.place(&p("a/b"), file("3"), Expect::Unchanged(first)),
            Err(DiskError::TargetChanged(p("a/b")))
        );
        assert_eq!(
            disk.place(&p("a/b/c"), file("3"), Expect::Absent),
            Err(DiskError::NotADirectory(p("a/b")))
        );
        let dir = Seen {
            dir: true,
            stamp: Stamp(0),
        };
        assert_eq!(disk.remove(&p("a"), dir), Err(DiskError::NotEmpty(p("a"))));
        let stale = Seen {
            dir: false,
            stamp: first,
        };
        assert!(disk.remove(&p("a/b"), stale).is_err());
        let fresh = Seen {
            dir: false,
            stamp: second,
        };
        disk.remove(&p("a/b"), fresh).unwrap();
        disk.remove(&p("a"), dir).unwrap();
        assert!(disk.is_empty());
    }

    #[test]
    fn renames_move_subtrees_and_never_replace() {
        let mut disk = Disk::default();
        disk.make_dir(&p("d/e")).unwrap();
        disk.place(&p("d/e/f"), file("1"), Expect::Absent).unwrap();
        disk.place(&p("x"), file("2"), Expect::Absent).unwrap();
        let dir = disk.seen(&p("d")).unwrap().1;
        assert!(disk.rename_noreplace(&p("d"), &p("x"), dir).is_err());
        disk.rename_noreplace(&p("d"), &p("y/z"), dir).unwrap();
        let names: Vec<&str> = disk.items().keys().map(RelPath::as_str).collect();
        assert_eq!(names, ["x", "y", "y/z", "y/z/e", "y/z/e/f"]);
    }
}
