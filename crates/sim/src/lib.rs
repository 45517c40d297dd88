//! Deterministic simulation of ghostmirror (issue 8): the hub's and the
//! nodes' real decision logic (`gm_core::decide_commit`, `decide_node`,
//! `NodeTrees` planning, conflict-copy names) in one process, against a
//! modelled filesystem (`disk`) and network (`net`), with random user
//! operations, message delays and reordering within each stream's
//! guarantees, disconnects and crashes, all driven by one seeded RNG
//! (`rng`). No clock, no threads, no IO: a seed is a run.
//!
//! Owns: the models of the hub (`hub`), of a node (`node`), of the world
//! that drives them (`world`), and the checks after the run settles: all
//! replicas identical, no lost content, no staging left, journal seqs
//! strictly increasing (and streamed in order, and `last_seq` never going
//! back). Does not own any decision: where the real code decides, the
//! simulation calls it. RELIABILITY.md at the repository root says what is
//! modelled and what is not.

pub mod disk;
pub mod hub;
pub mod net;
pub mod node;
pub mod rng;
pub mod trace;
pub mod world;

pub use world::{Config, Failure, Stats, World};

use gm_core::Entry;

/// Runs one seed.
pub fn run_seed(seed: u64, config: &Config) -> Result<Stats, Failure> {
    World::new(seed, config.clone()).run()
}

/// A short name for an entry in traces: `-` (absent), `dir`, `c<id>` for a
/// file (`x` when executable), `-> t<id>` for a symlink.
pub fn show(entry: Option<&Entry>) -> String {
    match entry {
        None => "-".into(),
        Some(Entry::Dir) => "dir".into(),
        Some(Entry::File {
            size, executable, ..
        }) => format!("c{size}{}", if *executable { "x" } else { "" }),
        Some(Entry::Symlink { target }) => format!("->{target}"),
    }
}
