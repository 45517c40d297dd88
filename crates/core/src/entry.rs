//! What a path holds in a tree, and the hub sequence number that versioned it.

use crate::hash::ContentHash;

/// A position in a workspace's journal on the hub. `Seq(0)` means "never
/// committed": a path that the hub has not seen has version 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The content of one path. Equality is what "the same version" means for
/// sync: a file is its content hash and its executable bit (the size follows
/// from the hash and is carried for planning), a directory is just a
/// directory, a symlink is its target text, never followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    File {
        hash: ContentHash,
        size: u64,
        executable: bool,
    },
    Dir,
    Symlink {
        target: String,
    },
}

impl Entry {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Entry::File { .. } => "file",
            Entry::Dir => "dir",
            Entry::Symlink { .. } => "symlink",
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir)
    }

    pub fn file_hash(&self) -> Option<ContentHash> {
        match self {
            Entry::File { hash, .. } => Some(*hash),
            _ => None,
        }
    }

    /// True when both name the same bytes, whatever the metadata (a file
    /// whose only change is its executable bit keeps its content).
    pub fn same_content(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::File { hash: a, .. }, Entry::File { hash: b, .. }) => a == b,
            _ => self == other,
        }
    }
}

/// The state of a path at a journal position: `entry == None` is a tombstone
/// (deleted at `seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub entry: Option<Entry>,
    pub seq: Seq,
}

/// Checks a symlink target from disk or the wire: non-empty, no NUL, at most
/// 4096 bytes. The target may point anywhere: links are synced as links and
/// never followed, so a target outside the workspace is not a danger.
pub fn check_symlink_target(target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err("symlink target is empty".into());
    }
    if target.contains('\0') {
        return Err(format!("symlink target {target:?} contains NUL"));
    }
    if target.len() > 4096 {
        return Err(format!(
            "symlink target of {} bytes is too long",
            target.len()
        ));
    }
    Ok(())
}
