//! A staged file prepared for a group commit holds no descriptor: a
//! commit request of more inline files than the process may open lands
//! whole. (Its own test binary: it lowers the process's limit on open
//! files, which would starve tests running beside it.)

use gm_core::{ContentHash, RelPath};
use gm_fs::{Expect, Root};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

#[test]
fn more_prepared_files_than_the_descriptor_limit_land_in_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path(), "t").unwrap();
    let was = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(64),
            maximum: was.maximum,
        },
    )
    .unwrap();
    let mut prepared = Vec::new();
    for i in 0..500u32 {
        let path = RelPath::new(&format!("d/{i}")).unwrap();
        let content = format!("file {i}");
        let mut staged = root.stage_file().unwrap();
        staged.write_all(content.as_bytes()).unwrap();
        staged.prepare(&root, &path, false).unwrap();
        prepared.push((path, content, staged));
    }
    root.sync_filesystem().unwrap();
    for (path, content, staged) in prepared {
        staged
            .commit_prepared(
                &root,
                &path,
                ContentHash::of(content.as_bytes()),
                Expect::Absent,
            )
            .unwrap();
    }
    setrlimit(Resource::Nofile, was).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("d")).unwrap().count(),
        500
    );
    assert_eq!(
        std::fs::read(dir.path().join("d/499")).unwrap(),
        b"file 499"
    );
}
