//! A walk holds a descriptor per directory being read and per directory
//! with subdirectories still waiting, not one per waiting directory: a
//! directory with more subdirectories than the process may open files is
//! walked in full. (Its own test binary: it lowers the process's limit on
//! open files, which would starve tests running beside it.)

use gm_fs::{IgnoreRules, Root, ScanConfig, scan_tree};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

#[test]
fn a_directory_wider_than_the_descriptor_limit_is_walked_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide");
    for i in 0..600 {
        let sub = wide.join(format!("s{i:04}"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), i.to_string()).unwrap();
    }
    let root = Root::open(dir.path(), "t").unwrap();
    let rules = IgnoreRules::load(&root);
    let was = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(128),
            maximum: was.maximum,
        },
    )
    .unwrap();
    for workers in [1, 4] {
        let config = ScanConfig {
            walk_threads: workers,
            ..ScanConfig::default()
        };
        let outcome = scan_tree(
            &root,
            None,
            true,
            &gm_core::CacheRecords::default(),
            &config,
            &rules,
        )
        .unwrap();
        assert!(
            outcome.problems.is_empty(),
            "{workers} workers: {:?}",
            &outcome.problems[..outcome.problems.len().min(3)]
        );
        assert!(outcome.unreadable.is_empty());
        // wide, 600 directories, 600 files.
        assert_eq!(outcome.entries.len(), 1 + 600 * 2, "{workers} workers");
    }
    setrlimit(Resource::Nofile, was).unwrap();
}
