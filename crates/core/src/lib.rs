//! Pure domain of ghostmirror: what a path, a hash, a tree entry and a
//! sequence number are, and the decisions taken on them (conflicts, node
//! reconciliation and the plan of a node's round, conflict-copy names,
//! skill names and where skill paths and their refused versions go).
//!
//! Guarantees: no IO, no clock, no randomness. Everything here is a function
//! of its arguments, so every replica that asks the same question gets the
//! same answer, and bytes from disk or the wire become these types only
//! through a check (`RelPath::new`, `ContentHash::from_slice`, `WorkspaceId::new`).

pub mod conflict;
pub mod entry;
pub mod hash;
pub mod meta;
pub mod path;
pub mod plan;
pub mod reconcile;
pub mod skills;

pub use conflict::{
    CommitDecision, MAX_COPY_ATTEMPTS, children_matter, conflict_copy_candidates,
    conflict_copy_name, decide_commit, format_utc, parse_utc,
};
pub use entry::{Entry, Seq, Versioned};
pub use hash::{ContentHash, Hasher};
pub use meta::{CacheRecord, CacheRecords, Kind, Stat};
pub use path::{INTERNAL_DIR, NodeId, PathError, RelPath, WorkspaceId, minimal_tops};
pub use plan::{Checkpoint, Forced, NodeTrees, Plan, Refused, Scope, slice_tops};
pub use reconcile::{NodeAction, decide_node};
pub use skills::{SKILL_MANIFEST, SKILLS_CONFLICTS_DIR, SKILLS_DIR, SkillName, SkillTree};
