//! The filesystem layer of ghostmirror: everything that touches a workspace
//! root on disk goes through here.
//!
//! What it owns and guarantees:
//! - `Root`: a workspace root held open as a directory handle. Every
//!   create/open/rename/remove below it resolves the path one component at a
//!   time with `O_NOFOLLOW|O_DIRECTORY`, so no operation ever follows a
//!   symlink or leaves the root, whatever the disk looks like meanwhile.
//! - `StagedFile`: the one atomic write path (staging file `O_EXCL` 0600,
//!   hashed while written, mode set on the open file, fsync, target checked,
//!   rename, fsync of the directory); `StagedTree`, its counterpart for a
//!   whole directory (built and fsynced in staging, renamed into place
//!   without ever replacing what is there).
//! - `scan`: stat walks and the hash-cache rule (re-hash only what changed,
//!   plus the racily-clean window).
//! - `watch`: OS file watching, debounced upstream by the caller.
//! - `DirLock`: one process per data/state directory.
//!
//! It does not know about the wire, the database or the sync rules.

pub mod assemble;
pub mod error;
pub mod ignore;
pub mod io;
pub mod lock;
pub mod owner;
pub mod root;
pub mod scan;
pub mod stat;
pub mod tree;
pub mod watch;

pub use assemble::Piece;
pub use error::FsError;
pub use gm_core::{CacheRecord, Kind, Stat};
pub use ignore::IgnoreRules;
pub use io::IoGate;
pub use lock::DirLock;
pub use owner::{ChownPolicy, Ownership};
pub use root::{Expect, FileMode, Reclaimed, Root, StagedFile};
pub use scan::{
    ScanConfig, ScanOutcome, Scanned, Walk, default_walk_threads, hash_walked, scan_tree,
    walk_tree, walk_while_loading,
};
pub use tree::StagedTree;
