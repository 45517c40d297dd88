//! End-to-end behaviour: the real binary as a hub and two nodes over
//! 127.0.0.1, each test in its own temp dirs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

const WS: &str = "ws1";

/// Fields drop in order: processes (printing their logs on failure) before
/// the temp dir that holds the logs.
struct Cluster {
    hub: Hub,
    a: Node,
    b: Node,
    base: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    let hub = Hub::start(&base);
    let a = Node::new(&base, &hub, "node-a", WS);
    let b = Node::new(&base, &hub, "node-b", WS);
    Cluster {
        hub,
        a,
        b,
        base,
        _dir: dir,
    }
}

impl Cluster {
    fn mirror(&self) -> std::path::PathBuf {
        self.hub.mirror(WS)
    }

    fn converged(&self, what: &str) -> std::collections::BTreeMap<String, Item> {
        wait_converged(what, &[&self.a.root, &self.b.root, &self.mirror()])
    }

    fn all(
        &self,
        what: &str,
        condition: impl Fn(&std::collections::BTreeMap<String, Item>) -> bool,
    ) -> std::collections::BTreeMap<String, Item> {
        wait_all(
            what,
            &[&self.a.root, &self.b.root, &self.mirror()],
            condition,
        )
    }
}

fn conflict_copies(tree: &std::collections::BTreeMap<String, Item>, stem: &str) -> Vec<String> {
    tree.keys()
        .filter(|k| k.starts_with(&format!("{stem}.conflict-")))
        .cloned()
        .collect()
}

#[test]
fn initial_sync_both_ways() {
    let mut c = cluster();
    write(&c.a.path("from-a/one.txt"), "one");
    write(&c.a.path("shared.txt"), "same");
    write(&c.b.path("from-b/two.txt"), "two");
    write(&c.b.path("shared.txt"), "same");
    std::fs::create_dir_all(c.b.path("empty/dir")).unwrap();
    std::os::unix::fs::symlink("../../outside/target", c.b.path("escape")).unwrap();
    c.a.start();
    c.b.start();
    let tree = c.converged("both nodes' files everywhere");
    assert_eq!(tree.get("from-a/one.txt"), Some(&file("one")));
    assert_eq!(tree.get("from-b/two.txt"), Some(&file("two")));
    assert_eq!(tree.get("shared.txt"), Some(&file("same")));
    assert_eq!(tree.get("empty/dir"), Some(&Item::Dir));
    assert_eq!(
        tree.get("escape"),
        Some(&Item::Link("../../outside/target".into())),
        "a link leaving the workspace stays a link"
    );
    assert!(
        conflict_copies(&tree, "shared").is_empty(),
        "identical files are not conflicts"
    );
}

#[test]
fn live_changes_reach_the_other_node() {
    let mut c = cluster();
    c.a.start();
    c.b.start();
    // create
    write(&c.a.path("docs/readme.md"), "v1");
    c.all("create", |t| t.get("docs/readme.md") == Some(&file("v1")));
    // modify
    write(&c.a.path("docs/readme.md"), "v2 longer");
    c.all("modify", |t| {
        t.get("docs/readme.md") == Some(&file("v2 longer"))
    });
    // mkdir (empty)
    std::fs::create_dir(c.b.path("empty")).unwrap();
    c.all("mkdir", |t| t.get("empty") == Some(&Item::Dir));
    // rmdir
    std::fs::remove_dir(c.a.path("empty")).unwrap();
    c.all("rmdir", |t| !t.contains_key("empty"));
    // chmod +x
    write(&c.b.path("run.sh"), "#!/bin/sh\necho hi\n");
    c.all("script arrives", |t| t.contains_key("run.sh"));
    std::fs::set_permissions(c.b.path("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    c.all("chmod +x", |t| {
        matches!(
            t.get("run.sh"),
            Some(Item::File {
                executable: true,
                ..
            })
        )
    });
    // symlink
    std::os::unix::fs::symlink("docs/readme.md", c.a.path("link")).unwrap();
    c.all("symlink", |t| {
        t.get("link") == Some(&Item::Link("docs/readme.md".into()))
    });
    // rename a file and a directory
    std::fs::rename(c.b.path("docs/readme.md"), c.b.path("docs/README.md")).unwrap();
    c.all("rename file", |t| {
        t.get("docs/README.md") == Some(&file("v2 longer")) && !t.contains_key("docs/readme.md")
    });
    write(&c.a.path("tree/x/1"), "1");
    write(&c.a.path("tree/x/2"), "2");
    c.all("tree arrives", |t| t.contains_key("tree/x/2"));
    std::fs::rename(c.a.path("tree"), c.a.path("moved")).unwrap();
    c.all("rename dir", |t| {
        t.get("moved/x/1") == Some(&file("1")) && !t.contains_key("tree")
    });
    // delete
    std::fs::remove_file(c.b.path("run.sh")).unwrap();
    std::fs::remove_file(c.b.path("link")).unwrap();
    let tree = c.all("delete", |t| {
        !t.contains_key("run.sh") && !t.contains_key("link")
    });
    assert!(
        tree.keys().all(|k| !k.contains(".conflict-")),
        "no conflicts in plain live edits: {tree:?}"
    );
}

/// The hub watches its mirrors before its startup scan walks them: a file
/// written into a mirror between the end of that scan and the hub's first
/// periodic rescan (an hour away here) is journaled all the same. A test
/// fault holds the hub for 3 s after the scan; the file is written then.
#[test]
fn a_mirror_change_right_after_the_startup_scan_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("hub/mirrors").join(WS);
    write(&mirror.join("seed.txt"), "there before the start");
    let log = dir.path().join("hub.log");
    let writer = std::thread::spawn(move || {
        wait_until("the hub pauses after its startup scan", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("GM_TEST_FAULT: pausing")
        });
        write(&mirror.join("late.txt"), "written after the scan");
    });
    let hub = Hub::start_with(
        dir.path(),
        &[
            ("GM_TEST_FAULT", "startup:pause-after-scan"),
            ("GM_RESCAN_INTERVAL", "3600"),
        ],
    );
    writer.join().expect("the writer thread");
    wait_until_for(
        "the hub journals the file written after its scan",
        Duration::from_secs(20),
        || hub.workspace_status(WS)["files"] == 2,
    );
    assert!(
        hub.log_text().contains("late.txt"),
        "the hub's log names late.txt"
    );
}

/// Starts a hub (with `env`) on a mirror that holds `seed`, checks that
/// its log says `says` and that the seed is journaled, then writes `later`
/// into the mirror and waits up to 20 s for it to be journaled.
fn hub_journals_a_later_file(env: &[(&str, &str)], seed: &str, says: &str, later: &str, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("hub/mirrors").join(WS);
    write(&mirror.join(seed), "there before the start");
    let hub = Hub::start_with(dir.path(), env);
    assert!(hub.log_text().contains(says), "the hub says {says:?}");
    assert_eq!(hub.workspace_status(WS)["files"], 1);
    // Status says the watch is incomplete, and which interval is in use.
    let settings = &hub.status()["settings"];
    assert_eq!(settings["watch_complete"], false);
    let interval = env
        .iter()
        .find(|(name, _)| *name == "GM_UNWATCHED_RESCAN_INTERVAL")
        .map_or("30", |(_, value)| value);
    assert_eq!(
        settings["unwatched_rescan_interval_secs"].to_string(),
        interval
    );
    let table = command()
        .args(["status", "--hub", &hub.url, "--token", TOKEN])
        .output()
        .expect("run status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!(
            "WATCH INCOMPLETE: {} directories watched, full rescans every {interval} s",
            settings["watched_directories"]
        )),
        "{table}"
    );
    write(&mirror.join(later), "written after the start");
    wait_until_for(why, Duration::from_secs(20), || {
        hub.workspace_status(WS)["files"] == 2
    });
}

/// A hub whose watcher cannot start (an inotify limit; a test fault here)
/// says so and keeps journaling its mirrors through the periodic rescan,
/// which comes every `GM_UNWATCHED_RESCAN_INTERVAL` (the usual interval
/// stays 10 minutes). (The closed event queue used to end the whole
/// maintenance loop.)
#[test]
fn a_hub_without_a_watcher_still_journals_through_its_rescans() {
    hub_journals_a_later_file(
        &[
            ("GM_TEST_FAULT", "watch:fail"),
            ("GM_UNWATCHED_RESCAN_INTERVAL", "1"),
        ],
        "seed.txt",
        "cannot watch the mirrors",
        "later.txt",
        "a periodic rescan journals the new file",
    );
}

/// A hub past the inotify watch limit (a test fault stops at two watches:
/// `mirrors/` and the mirror's top) keeps what it watches live and says
/// the rest is left to rescans. It used to drop the whole watch, so even
/// the top of the mirror waited for the periodic rescan (10 minutes here).
#[test]
fn a_hub_past_the_watch_limit_keeps_the_watched_part_live() {
    hub_journals_a_later_file(
        &[
            ("GM_TEST_FAULT", "watch:limit=2"),
            ("GM_UNWATCHED_RESCAN_INTERVAL", "600"),
        ],
        "deep/seed.txt",
        "cannot watch every directory",
        "top.txt",
        "the watched top of the mirror is journaled live",
    );
}

/// Past the watch limit, what is unwatched is rescanned every
/// `GM_UNWATCHED_RESCAN_INTERVAL`, not every `GM_RESCAN_INTERVAL` (10
/// minutes by default): a file written in an unwatched directory is
/// journaled within seconds.
#[test]
fn a_hub_past_the_watch_limit_rescans_sooner() {
    hub_journals_a_later_file(
        &[
            ("GM_TEST_FAULT", "watch:limit=2"),
            ("GM_UNWATCHED_RESCAN_INTERVAL", "1"),
        ],
        "deep/seed.txt",
        "cannot watch every directory",
        "deep/later.txt",
        "a rescan journals the file in the unwatched directory",
    );
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name: state is the first, utime the 12th.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Starts node a with the test fault `fault` and
/// `GM_UNWATCHED_RESCAN_INTERVAL=1` on a workspace that holds `seed`,
/// checks that its log says `says` and that the seed reaches the hub, runs
/// `meanwhile`, then writes `later` and waits up to 20 s for it on the hub.
fn node_sends_a_later_file(
    fault: &str,
    seed: &str,
    says: &str,
    meanwhile: impl FnOnce(&Cluster),
    later: &str,
    why: &str,
) {
    let mut c = cluster();
    c.a.env.push(("GM_TEST_FAULT".into(), fault.into()));
    c.a.env
        .push(("GM_UNWATCHED_RESCAN_INTERVAL".into(), "1".into()));
    write(&c.a.path(seed), "before the start");
    c.a.start();
    wait_until(&format!("node a says {says:?}"), || {
        c.a.log_text().contains(says)
    });
    wait_until("the seed reaches the hub", || {
        c.mirror().join(seed).exists()
    });
    meanwhile(&c);
    write(&c.a.path(later), "found by a rescan");
    wait_until_for(why, Duration::from_secs(20), || {
        c.mirror().join(later).exists()
    });
}

/// A node whose watcher cannot start (an inotify limit; a test fault here)
/// says so, stays idle and syncs through its periodic rescans, which come
/// every `GM_UNWATCHED_RESCAN_INTERVAL`. (Its live loop used to spin on
/// the closed event queue: a core's worth of CPU.)
#[test]
fn a_node_without_a_watcher_idles_and_syncs_through_its_rescans() {
    node_sends_a_later_file(
        "watch:fail",
        "seed.txt",
        "cannot watch the workspace",
        |c| {
            let pid = c.a.pid().expect("node a runs");
            let before = cpu_seconds(pid);
            std::thread::sleep(Duration::from_secs(2));
            let used = cpu_seconds(pid) - before;
            assert!(
                used < 1.0,
                "node a used {used:.2} s of CPU in 2 s with nothing to do"
            );
        },
        "later.txt",
        "a periodic rescan sends the new file",
    );
}

/// A node past the inotify watch limit (a test fault stops at one watch,
/// the workspace's top) rescans every `GM_UNWATCHED_RESCAN_INTERVAL`: a
/// file written in an unwatched directory reaches the hub within seconds,
/// not at the 10-minute rescan.
#[test]
fn a_node_past_the_watch_limit_rescans_sooner() {
    node_sends_a_later_file(
        "watch:limit=1",
        "deep/seed.txt",
        "cannot watch every directory",
        |_| {},
        "deep/later.txt",
        "a rescan sends the file in the unwatched directory",
    );
}

#[test]
fn hub_side_write_reaches_both_nodes() {
    let mut c = cluster();
    c.a.start();
    c.b.start();
    write(&c.a.path("seed"), "s");
    c.all("seed", |t| t.contains_key("seed"));
    write(
        &c.mirror().join("tool/output.txt"),
        "written by a hub-side tool",
    );
    c.all("hub-side file on every replica", |t| {
        t.get("tool/output.txt") == Some(&file("written by a hub-side tool"))
    });
    std::fs::remove_file(c.mirror().join("seed")).unwrap();
    c.all("hub-side delete", |t| !t.contains_key("seed"));
    let status = c.hub.status();
    assert!(
        status["counters"]["hub_side_changes"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
}

#[test]
fn offline_node_catches_up_without_loss() {
    let mut c = cluster();
    write(&c.a.path("keep.txt"), "k");
    write(&c.a.path("edit-on-a.txt"), "a0");
    write(&c.a.path("edit-on-b.txt"), "b0");
    c.a.start();
    c.b.start();
    c.all("seed", |t| t.contains_key("edit-on-b.txt"));
    c.b.stop();
    // Changes on both sides while b is offline.
    write(&c.a.path("edit-on-a.txt"), "a1");
    write(&c.a.path("new-on-a/f"), "na");
    write(&c.mirror().join("new-on-hub"), "nh");
    write(&c.b.path("edit-on-b.txt"), "b1");
    write(&c.b.path("new-on-b/f"), "nb");
    std::fs::remove_file(c.b.path("keep.txt")).unwrap();
    c.wait_a_on_hub();
    c.b.start();
    let tree = c.converged("b catches up");
    assert_eq!(tree.get("edit-on-a.txt"), Some(&file("a1")));
    assert_eq!(tree.get("edit-on-b.txt"), Some(&file("b1")));
    assert_eq!(tree.get("new-on-a/f"), Some(&file("na")));
    assert_eq!(tree.get("new-on-b/f"), Some(&file("nb")));
    assert_eq!(tree.get("new-on-hub"), Some(&file("nh")));
    assert!(
        !tree.contains_key("keep.txt"),
        "b's offline deletion propagates"
    );
}

impl Cluster {
    /// Waits until the hub's mirror equals a's tree.
    fn wait_a_on_hub(&self) {
        wait_converged("a and hub agree", &[&self.a.root, &self.mirror()]);
    }
}

#[test]
fn concurrent_edit_ends_with_one_version_and_one_conflict_copy() {
    let mut c = cluster();
    write(&c.a.path("notes.txt"), "base");
    c.a.start();
    c.b.start();
    c.all("seed", |t| t.get("notes.txt") == Some(&file("base")));
    c.b.stop();
    write(&c.a.path("notes.txt"), "edited on a");
    wait_until("a's edit on the hub", || {
        std::fs::read(c.mirror().join("notes.txt")).ok() == Some(b"edited on a".to_vec())
    });
    write(&c.b.path("notes.txt"), "edited on b");
    c.b.start();
    let tree = c.all("one canonical version plus one conflict copy", |t| {
        conflict_copies(t, "notes").len() == 1
    });
    assert_eq!(
        tree.get("notes.txt"),
        Some(&file("edited on a")),
        "the version the hub had first keeps the name"
    );
    let copy = &conflict_copies(&tree, "notes")[0];
    assert_eq!(tree.get(copy), Some(&file("edited on b")));
    assert!(
        copy.starts_with("notes.conflict-node-b-") && copy.ends_with(".txt"),
        "{copy}"
    );
    let status = c.hub.workspace_status(WS);
    assert_eq!(
        status["conflicts"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    // Stays that way: nothing else appears.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.converged("stable").len(), tree.len());
}

#[test]
fn simultaneous_live_edits_keep_both_versions() {
    let mut c = cluster();
    write(&c.a.path("race.txt"), "base");
    c.a.start();
    c.b.start();
    c.all("seed", |t| t.get("race.txt") == Some(&file("base")));
    write(&c.a.path("race.txt"), "from a");
    write(&c.b.path("race.txt"), "from b");
    let tree = c.all("both versions kept on every replica", |t| {
        let mut contents: Vec<Vec<u8>> = t
            .iter()
            .filter(|(k, _)| k.starts_with("race"))
            .filter_map(|(_, v)| match v {
                Item::File { content, .. } => Some(content.clone()),
                _ => None,
            })
            .collect();
        contents.sort();
        contents == vec![b"from a".to_vec(), b"from b".to_vec()]
    });
    assert_eq!(conflict_copies(&tree, "race").len(), 1, "{tree:?}");
}

#[test]
fn modify_vs_delete_keeps_the_modified_file() {
    let mut c = cluster();
    write(&c.a.path("deleted-on-a.txt"), "0");
    write(&c.a.path("deleted-on-b.txt"), "0");
    c.a.start();
    c.b.start();
    c.all("seed", |t| {
        t.contains_key("deleted-on-a.txt") && t.contains_key("deleted-on-b.txt")
    });
    c.b.stop();
    std::fs::remove_file(c.a.path("deleted-on-a.txt")).unwrap();
    write(&c.a.path("deleted-on-b.txt"), "modified on a");
    wait_until("a's changes on the hub", || {
        !c.mirror().join("deleted-on-a.txt").exists()
    });
    write(&c.b.path("deleted-on-a.txt"), "modified on b");
    std::fs::remove_file(c.b.path("deleted-on-b.txt")).unwrap();
    c.b.start();
    let tree = c.all("modified files survive", |t| {
        t.get("deleted-on-a.txt") == Some(&file("modified on b"))
            && t.get("deleted-on-b.txt") == Some(&file("modified on a"))
    });
    assert!(
        tree.keys().all(|k| !k.contains(".conflict-")),
        "no copies needed: {tree:?}"
    );
}

/// Found by the simulation (gm-sim, seed 9 of its first runs): a directory
/// replaced by a file on the hub while an offline node added to it. The
/// node kept failing to remove its non-empty directory and the hub refused
/// the new file ("d is a file on the hub"), for ever. Now the node's
/// directory becomes a conflict copy that keeps its content.
#[test]
fn directory_replaced_by_a_file_keeps_new_content_inside() {
    let mut c = cluster();
    write(&c.a.path("keep.txt"), "k");
    write(&c.a.path("d/old.txt"), "old");
    c.a.start();
    c.b.start();
    c.all("seed", |t| t.contains_key("d/old.txt"));
    c.b.stop();
    std::fs::remove_dir_all(c.mirror().join("d")).unwrap();
    write(&c.mirror().join("d"), "now a file");
    wait_until("a has the hub's file", || {
        std::fs::read(c.a.path("d")).ok() == Some(b"now a file".to_vec())
    });
    write(&c.b.path("d/new.txt"), "new on b");
    c.b.start();
    let tree = c.all("the file keeps the path, b's directory is a copy", |t| {
        t.get("d") == Some(&file("now a file"))
            && t.iter().any(|(k, v)| {
                k.starts_with("d.conflict-node-b-")
                    && k.ends_with("/new.txt")
                    && *v == file("new on b")
            })
    });
    assert!(!tree.contains_key("d/old.txt"), "{tree:?}");
}

/// A directory replaced by a file on a node (`rm -rf d; echo > d`) becomes
/// that file everywhere, without a conflict copy: the node deletes the
/// directory's children before it proposes the file. (Before, the hub kept
/// the directory, which still had children, and made the file a copy.)
#[test]
fn directory_replaced_by_a_file_on_a_node_is_no_conflict() {
    let mut c = cluster();
    write(&c.a.path("keep.txt"), "k");
    write(&c.a.path("d/e/x.txt"), "x");
    c.a.start();
    c.b.start();
    c.all("seed", |t| t.contains_key("d/e/x.txt"));
    std::fs::remove_dir_all(c.a.path("d")).unwrap();
    write(&c.a.path("d"), "now a file");
    let tree = c.all("d is a file everywhere", |t| {
        t.get("d") == Some(&file("now a file"))
    });
    assert!(tree.keys().all(|k| !k.contains(".conflict-")), "{tree:?}");
}

#[test]
fn emptied_root_deletes_nothing_until_confirmed() {
    let mut c = cluster();
    for i in 0..20 {
        write(
            &c.a.path(&format!("d{}/f{i}", i % 3)),
            &format!("content {i}"),
        );
    }
    c.a.start();
    c.b.start();
    let before = c.converged("seed");
    assert_eq!(before.len(), 23);
    // Empty b's root under the running node (what an unmounted volume looks like).
    for entry in std::fs::read_dir(&c.b.root).unwrap().flatten() {
        if entry.file_name() == ".ghostmirror" {
            continue;
        }
        std::fs::remove_dir_all(entry.path()).unwrap();
    }
    wait_until("b halts", || {
        c.b.log_text().contains("halted by the safety brake")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tree(&c.a.root), before, "nothing deleted on a");
    assert_eq!(tree(&c.mirror()), before, "nothing deleted on the hub");
    // The documented command makes the emptying deliberate.
    let out = command()
        .args(["confirm-empty", WS, "--state-dir"])
        .arg(&c.b.state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.all("deliberate emptying propagates", |t| t.is_empty());
}

/// The same brake when the full round goes in slices (a synced tree larger
/// than `GM_SLICE_ENTRIES`): the deletions of every slice wait for the last
/// pass, which sees the empty root and halts.
#[test]
fn emptied_root_halts_a_round_in_slices() {
    let mut c = cluster();
    c.a.env.push(("GM_SLICE_ENTRIES".into(), "4".into()));
    for i in 0..20 {
        write(
            &c.a.path(&format!("d{}/f{i}", i % 3)),
            &format!("content {i}"),
        );
    }
    let out = c.a.once();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = tree(&c.mirror());
    assert_eq!(before.len(), 23);
    for entry in std::fs::read_dir(&c.a.root).unwrap().flatten() {
        if entry.file_name() != ".ghostmirror" {
            std::fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    let out = c.a.once();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("full round in slices"), "{stderr}");
    assert!(stderr.contains("halted by the safety brake"), "{stderr}");
    assert_eq!(tree(&c.mirror()), before, "nothing deleted on the hub");
}

/// `node --once` without a terminal ends with one line of final figures,
/// and a file the hub asks content for (uploaded, then proposed again)
/// counts once: 2/2 files, 3 MiB and 100 bytes, not 3/2 and 6 MiB.
#[test]
fn once_reports_each_file_once_in_its_final_progress_line() {
    let c = cluster();
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::create_dir_all(&c.a.root).unwrap();
    std::fs::write(c.a.path("big.bin"), &big).unwrap();
    write(&c.a.path("small.txt"), &"s".repeat(100));
    let out = c.a.once();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let last = stderr
        .lines()
        .filter(|l| l.starts_with("progress (done): "))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "{stderr}");
    assert!(
        last[0].starts_with("progress (done): 2/2 files, 3.00 MiB/3.00 MiB,"),
        "{}",
        last[0]
    );
}

#[test]
fn hub_restart_rehashes_no_unchanged_file() {
    let mut c = cluster();
    for i in 0..50 {
        write(
            &c.a.path(&format!("dir{}/file{i}.txt", i % 5)),
            &format!("payload {i}"),
        );
    }
    c.a.start();
    c.wait_a_on_hub();
    wait_until("racily clean records settled", || {
        c.hub.workspace_status(WS)["racy_entries"] == 0
    });
    c.hub.stop();
    c.hub.spawn();
    let status = c.hub.status();
    assert_eq!(status["startup_scan_done"], true);
    assert_eq!(status["counters"]["files_hashed"], 0, "{status}");
    assert_eq!(status["counters"]["hash_cache_hits"], 50, "{status}");
    // And the restarted hub still syncs.
    c.a.set_hub(&c.hub);
    c.a.stop();
    c.a.start();
    write(&c.a.path("after-restart"), "x");
    wait_until("sync after restart", || {
        c.mirror().join("after-restart").exists()
    });
}

#[test]
fn internal_directory_is_never_synced() {
    let mut c = cluster();
    c.a.start();
    c.b.start();
    write(&c.a.path(".ghostmirror/private"), "internal");
    write(
        &c.a.path("sub/.ghostmirror/visible"),
        "only the root's is internal",
    );
    c.all("nested .ghostmirror syncs", |t| {
        t.contains_key("sub/.ghostmirror/visible")
    });
    assert!(!c.b.path(".ghostmirror/private").exists());
    assert!(!c.mirror().join(".ghostmirror/private").exists());
}

#[test]
fn node_once_reports_success_and_failures() {
    let c = cluster();
    write(&c.a.path("f"), "x");
    let ok = c.a.once();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = c.b.once();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(tree(&c.b.root).get("f"), Some(&file("x")));

    // A wrong token: refused, non-zero, and the message says so.
    let out = command()
        .args([
            "node",
            "--once",
            "--hub",
            &c.hub.url,
            "--token",
            "wrong",
            "--node-id",
            "n",
        ])
        .arg("--state-dir")
        .arg(c.base.join("s1"))
        .arg("--workspace")
        .arg(format!("{WS}={}", c.a.root.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the token"), "{stderr}");

    // An unreachable hub: retried with backoff (and said so), then non-zero.
    let out = command()
        .args([
            "node",
            "--once",
            "--hub",
            "http://127.0.0.1:1",
            "--token",
            TOKEN,
            "--node-id",
            "n",
            "--once-timeout",
            "2",
        ])
        .arg("--state-dir")
        .arg(c.base.join("s2"))
        .arg("--workspace")
        .arg(format!("{WS}={}", c.a.root.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying") && stderr.contains("unreachable"),
        "{stderr}"
    );

    // A missing workspace directory.
    let out = command()
        .args([
            "node",
            "--once",
            "--hub",
            &c.hub.url,
            "--token",
            TOKEN,
            "--node-id",
            "n",
        ])
        .arg("--state-dir")
        .arg(c.base.join("s3"))
        .arg("--workspace")
        .arg(format!("{WS}={}", c.base.join("does-not-exist").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does-not-exist"), "{stderr}");
}

#[test]
fn second_hub_on_the_same_data_dir_is_refused() {
    let c = cluster();
    let out = command()
        .args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(&c.hub.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another ghostmirror process"),
        "{stderr}"
    );
}

fn http_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn hub_starts_with_no_flags_and_generates_a_private_token() {
    let dir = tempfile::tempdir().unwrap();
    // Only this test uses the default ports.
    let mut child = command()
        .arg("hub")
        .env("HOME", dir.path())
        .env_remove("XDG_DATA_HOME")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let data = dir.path().join(".local/share/ghostmirror");
    let ready = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        data.join("hub.json").exists()
    });
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let health = http_get("http://127.0.0.1:7071/healthz");
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "hub did not start on defaults: {log}");
    let mode = std::fs::metadata(data.join("token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        log.contains(&data.join("token").display().to_string()),
        "the log says where the token is: {log}"
    );
    assert!(health.unwrap_or_default().starts_with("HTTP/1.1 200"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = command()
        .args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("hub"))
        .env("GM_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The line naming the bound addresses comes after hub.json is written.
    wait_until("hub starts and says where it listens", || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"grpc\""))
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        text.contains("\"grpc\""),
        "structured fields are fields: {text}"
    );
}

fn counter(hub: &Hub, name: &str) -> u64 {
    hub.status()["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn large_files_move_only_the_chunks_that_changed() {
    use std::io::{Seek, SeekFrom, Write};
    let mut c = cluster();
    c.a.start();
    c.b.start();
    let original = noise(8 << 20, 11);
    std::fs::write(c.a.path("big.bin"), &original).unwrap();
    c.all("big file everywhere", |t| matches!(t.get("big.bin"), Some(Item::File { content, .. }) if content.len() == 8 << 20));
    let received = counter(&c.hub, "bytes_received");
    let sent = counter(&c.hub, "bytes_sent");
    assert!(
        received >= 8 << 20,
        "the first copy crosses the wire: {received}"
    );

    // Overwrite 256 KiB in the middle, in place.
    let patch = noise(256 << 10, 12);
    let mut expected = original.clone();
    expected[4 << 20..(4 << 20) + patch.len()].copy_from_slice(&patch);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(c.a.path("big.bin"))
        .unwrap();
    file.seek(SeekFrom::Start(4 << 20)).unwrap();
    file.write_all(&patch).unwrap();
    drop(file);
    let want = Item::File {
        content: expected,
        executable: false,
    };
    c.all("patched file everywhere", |t| {
        t.get("big.bin") == Some(&want)
    });
    let up = counter(&c.hub, "bytes_received") - received;
    let down = counter(&c.hub, "bytes_sent") - sent;
    assert!(
        up < 1536 << 10,
        "node -> hub moved {up} bytes for a 256 KiB change"
    );
    assert!(
        down < 1536 << 10,
        "hub -> node moved {down} bytes for a 256 KiB change"
    );
    assert!(
        counter(&c.hub, "chunk_bytes_reused") >= 6 << 20,
        "{}",
        c.hub.status()
    );

    // A rename moves no file bytes.
    let (received, sent) = (
        counter(&c.hub, "bytes_received"),
        counter(&c.hub, "bytes_sent"),
    );
    std::fs::rename(c.a.path("big.bin"), c.a.path("renamed.bin")).unwrap();
    c.all("renamed everywhere", |t| {
        t.get("renamed.bin") == Some(&want) && !t.contains_key("big.bin")
    });
    assert_eq!(counter(&c.hub, "bytes_received"), received);
    assert_eq!(counter(&c.hub, "bytes_sent"), sent);
}

#[test]
fn ignored_paths_are_never_sent_or_journaled() {
    let mut c = cluster();
    write(&c.a.path(".gmignore"), "*.log\nbuild/\n");
    write(&c.a.path("keep.txt"), "k");
    write(&c.a.path("debug.log"), "noise");
    write(&c.a.path("build/out.o"), "object");
    c.a.start();
    c.b.start();
    let mirror = c.mirror();
    let others: [&std::path::Path; 2] = [&c.b.root, &mirror];
    wait_all("rules and kept files on b and the hub", &others, |t| {
        t.contains_key(".gmignore") && t.contains_key("keep.txt")
    });
    write(&c.a.path("later.log"), "more noise");
    write(&c.a.path("sub/x.txt"), "x");
    wait_all("later file", &others, |t| t.contains_key("sub/x.txt"));
    // A hub-side tool writing an ignored file: not journaled either.
    write(&c.mirror().join("tool.log"), "hub noise");
    write(&c.mirror().join("tool.txt"), "hub ok");
    wait_until("hub-side file reaches b", || c.b.path("tool.txt").exists());
    for root in [&c.b.root, &c.mirror()] {
        let tree = tree(root);
        assert!(
            !tree.contains_key("debug.log")
                && !tree.contains_key("build")
                && !tree.contains_key("later.log"),
            "{tree:?}"
        );
    }
    assert!(!c.b.path("tool.log").exists());
    assert!(
        c.a.path("debug.log").exists(),
        "ignored files stay where they are"
    );
}

#[test]
fn io_limits_are_honoured_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(
        dir.path(),
        &[
            ("GM_HASH_WORKERS", "4"),
            ("GM_WALK_THREADS", "3"),
            ("GM_IO_CONCURRENCY", "1"),
            ("GM_READ_RATE_LIMIT", "64M"),
        ],
    );
    let mut a = Node::new(dir.path(), &hub, "node-a", WS);
    a.start();
    write(&a.path("seed"), "s");
    wait_until("workspace exists on the hub", || {
        hub.mirror(WS).join("seed").exists()
    });
    for i in 0..40 {
        write(
            &hub.mirror(WS).join(format!("tool/{i}.bin")),
            &"x".repeat(64 * 1024 + i),
        );
    }
    wait_until("hub-side files reach the node", || {
        a.path("tool/39.bin").exists()
    });
    let status = hub.status();
    let settings = &status["settings"];
    assert_eq!(settings["hash_workers"], 4, "{status}");
    assert_eq!(settings["walk_threads"], 3, "{status}");
    assert_eq!(settings["io_concurrency"], 1, "{status}");
    assert_eq!(settings["read_rate_limit"], 64 << 20, "{status}");
    assert_eq!(settings["rescan_interval_secs"], 600, "{status}");
    assert_eq!(settings["watch_complete"], true, "{status}");
    // mirrors/, the mirror, tool/.
    assert_eq!(settings["watched_directories"], 3, "{status}");
    let observed = settings["io_max_observed"].as_u64().unwrap_or(99);
    assert!(
        (1..=1).contains(&observed),
        "observed {observed} reads at once with a limit of 1: {status}"
    );
}

#[test]
fn invalid_settings_fail_at_start_and_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("GM_IO_CONCURRENCY", "0"),
        ("GM_HASH_WORKERS", "0"),
        ("GM_READ_RATE_LIMIT", "fast"),
        ("GM_UNWATCHED_RESCAN_INTERVAL", "0"),
    ] {
        let out = command()
            .args([
                "hub",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
            ])
            .arg("--data-dir")
            .arg(dir.path().join(key))
            .env(key, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{key}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key)
                || stderr.contains(&key.to_lowercase().replace("gm_", "").replace('_', "-")),
            "{key}: {stderr}"
        );
    }
}

#[test]
fn stale_staging_of_a_killed_hub_is_removed_at_start() {
    let mut c = cluster();
    c.a.start();
    write(&c.a.path("f"), "x");
    wait_until("workspace on the hub", || c.mirror().join("f").exists());
    c.hub.kill();
    // What a transfer cut by SIGKILL leaves behind.
    let staging = c.hub.staging(WS);
    std::fs::write(
        staging.join("hubdeadbeef-file-0123456789abcdef"),
        vec![7u8; 4096],
    )
    .unwrap();
    c.hub.spawn();
    assert_eq!(
        std::fs::read_dir(&staging).unwrap().count(),
        0,
        "stale staging removed at start"
    );
    assert_eq!(c.hub.status()["counters"]["staging_reclaimed"], 1);
    let log = std::fs::read_to_string(c.base.join("hub.log")).unwrap();
    assert!(
        log.contains("removed stale staging entry")
            && log.contains("hubdeadbeef-file-0123456789abcdef"),
        "{log}"
    );
}

/// A strict reader of the Prometheus text format: every family declared
/// once with HELP and TYPE before its samples, every sample `name{labels} value`
/// with a float value. Returns samples by their full name.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut types = std::collections::BTreeMap::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap().to_string();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name, kind.to_string()).is_none(),
                "family declared twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let base = name.split('{').next().unwrap();
        if let Some(labels) = name.strip_prefix(base)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (key, quoted) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                base.strip_suffix(suffix)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(base);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        samples.insert(name.to_string(), value);
    }
    samples
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_syncs() {
    let mut c = cluster();
    let admin = c.hub.admin.clone();
    let get = |path: &str| http_get(&format!("{admin}{path}")).unwrap_or_default();
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    let body = |response: String| {
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    };
    let before = parse_prometheus(&body(get("/metrics")));
    c.a.start();
    write(&c.a.path("one.txt"), "1");
    write(&c.a.path("two.txt"), "22");
    wait_until("files on the hub", || c.mirror().join("two.txt").exists());
    let after = parse_prometheus(&body(get("/metrics")));
    let key = "ghostmirror_files_synced_total{direction=\"from_nodes\"}";
    assert!(after[key] >= before[key] + 2.0, "{before:?} -> {after:?}");
    assert!(after["ghostmirror_commit_duration_seconds_count"] >= 1.0);
    assert!(after["ghostmirror_connected_nodes"] >= 1.0);
    assert_eq!(after["ghostmirror_journal_entries{workspace=\"ws1\"}"], 2.0);
}

#[test]
fn small_files_travel_inline_in_batches_bounded_by_bytes() {
    let mut c = cluster();
    let admin = c.hub.admin.clone();
    let metrics = || {
        let response = http_get(&format!("{admin}/metrics")).unwrap_or_default();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        parse_prometheus(&body)
    };
    // 300 files of 1 KiB (300 KiB) with a 64 KiB byte budget per commit
    // batch, and one 2 MiB file (over the 1 MiB inline limit).
    c.a.env.push(("GM_BATCH_BYTES".into(), "64K".into()));
    for i in 0..300 {
        let content: String = format!("{i:04}").repeat(256);
        write(&c.a.path(&format!("d{}/f{i}.txt", i % 7)), &content);
    }
    std::fs::write(c.a.path("big.bin"), noise(2 << 20, 17)).unwrap();
    let commits = "ghostmirror_commit_duration_seconds_count";
    let before = metrics();
    let out = c.a.once();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = metrics();
    let tree = tree(&c.mirror());
    assert_eq!(tree.len(), 300 + 7 + 1, "every file and directory landed");
    let calls = after[commits] - before.get(commits).copied().unwrap_or(0.0);
    // Inline bytes of 300 KiB in batches of at most 64 KiB: at least five
    // commit calls, and far fewer than one per file (the directories and
    // the large file's two proposals ride along).
    assert!(
        (5.0..=12.0).contains(&calls),
        "{calls} commit calls for 300 small files"
    );
    // Only the large file went through an upload stream.
    let uploads = c
        .hub
        .log_text()
        .lines()
        .filter(|line| line.contains("upload staged"))
        .count();
    assert_eq!(uploads, 1, "{}", c.hub.log_text());
}

#[test]
fn a_large_tree_syncs_in_slices_and_moves_between_slices_send_no_bytes() {
    let mut c = cluster();
    // Slices of at most 24 entries: each top-level directory below (11
    // entries) shares a slice with at most one other.
    c.a.env.push(("GM_SLICE_ENTRIES".into(), "24".into()));
    for top in 0..8 {
        for i in 0..10 {
            write(
                &c.a.path(&format!("t{top}/f{i}.txt")),
                &format!("{top}-{i}"),
            );
        }
    }
    write(&c.a.path("top-file.txt"), "at the root");
    std::fs::write(c.a.path("t0/big.bin"), noise(2 << 20, 23)).unwrap();
    let once = |c: &Cluster| {
        let out = c.a.once();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let uploads = |c: &Cluster| {
        c.hub
            .log_text()
            .lines()
            .filter(|line| line.contains("upload staged"))
            .count()
    };
    let log = once(&c);
    assert!(log.contains("full round in slices"), "{log}");
    assert_eq!(tree(&c.mirror()), tree(&c.a.root), "initial sync in slices");
    assert_eq!(uploads(&c), 1, "{}", c.hub.log_text());

    // Offline: a whole top-level directory goes, the large file moves to
    // another slice's directory, a new top-level directory comes.
    std::fs::remove_dir_all(c.a.path("t1")).unwrap();
    std::fs::rename(c.a.path("t0/big.bin"), c.a.path("t7/big.bin")).unwrap();
    write(&c.a.path("t8/new.txt"), "new");
    let log = once(&c);
    assert!(log.contains("full round in slices"), "{log}");
    let mirror = c.mirror();
    assert_eq!(tree(&mirror), tree(&c.a.root), "changes in slices");
    assert!(!mirror.join("t1").exists() && !mirror.join("t0/big.bin").exists());
    // The move's new path was proposed before the old one's deletion: the
    // hub still held the content and no bytes were uploaded again.
    assert_eq!(uploads(&c), 1, "{}", c.hub.log_text());
}

/// Starts a large transfer and stops the process in the middle of it.
fn stop_during_transfer(stop_hub: bool) {
    let mut c = cluster();
    c.a.start();
    write(&c.a.path("seed"), "s");
    wait_until("seed on the hub", || c.mirror().join("seed").exists());
    if !stop_hub {
        c.b.start();
        wait_until("seed on b", || c.b.path("seed").exists());
    }
    std::fs::write(c.a.path("big.bin"), noise(192 << 20, 5)).unwrap();
    let (root, staging) = if stop_hub {
        (c.mirror(), c.hub.staging(WS))
    } else {
        (c.b.root.clone(), c.b.root.join(".ghostmirror/staging"))
    };
    wait_until("the transfer has started", || {
        std::fs::read_dir(&staging)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    if stop_hub {
        c.hub.stop();
    } else {
        c.b.stop();
    }
    let landed = std::fs::metadata(root.join("big.bin")).map(|m| m.len());
    assert!(
        matches!(landed, Err(_) | Ok(201_326_592)),
        "a partial file is visible: {landed:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "staging left behind by an orderly stop: {left:?}"
    );
}

#[test]
fn sigterm_on_the_hub_during_a_transfer_leaves_no_partial_file_or_staging() {
    stop_during_transfer(true);
}

#[test]
fn sigterm_on_a_node_during_a_transfer_leaves_no_partial_file_or_staging() {
    stop_during_transfer(false);
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: this test needs root (it changes file ownership)");
    }
    root
}

fn owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

#[test]
fn chown_on_gives_each_write_its_directory_owner() {
    if !running_as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), &[("GM_CHOWN", "on")]);
    let mut a = Node::new(dir.path(), &hub, "node-a", WS);
    a.start();
    write(&a.path("seed"), "s");
    wait_until("workspace on the hub", || {
        hub.mirror(WS).join("seed").exists()
    });
    let owned = hub.mirror(WS).join("owned");
    std::fs::create_dir(&owned).unwrap();
    std::os::unix::fs::chown(&owned, Some(4242), Some(4343)).unwrap();
    wait_until("the directory reaches the node", || {
        a.path("owned").exists()
    });
    write(&a.path("owned/file.txt"), "content");
    write(&a.path("owned/sub/deep.txt"), "deeper");
    std::os::unix::fs::symlink("file.txt", a.path("owned/link")).unwrap();
    wait_until("files on the hub", || {
        hub.mirror(WS).join("owned/sub/deep.txt").exists()
            && hub.mirror(WS).join("owned/link").exists()
    });
    assert_eq!(owner(&owned.join("file.txt")), (4242, 4343));
    assert_eq!(owner(&owned.join("sub")), (4242, 4343));
    assert_eq!(owner(&owned.join("sub/deep.txt")), (4242, 4343));
    assert_eq!(owner(&owned.join("link")), (4242, 4343));
    assert_eq!(hub.status()["settings"]["chown"], "on");
}

#[test]
fn chown_auto_gives_up_once_when_not_permitted_and_keeps_syncing() {
    if !running_as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The hub runs as `nobody`, in a data dir it owns.
    let data = dir.path().join("hub");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hub = Hub::start_wrapped(
        dir.path(),
        &[("GM_CHOWN", "auto")],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    let mut a = Node::new(dir.path(), &hub, "node-a", WS);
    a.start();
    write(&a.path("seed"), "s");
    wait_until("workspace on the hub", || {
        hub.mirror(WS).join("seed").exists()
    });
    // A directory someone else (root) owns, writable by the hub.
    let shared = hub.mirror(WS).join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    wait_until("the directory reaches the node", || {
        a.path("shared").exists()
    });
    for i in 0..3 {
        write(&a.path(&format!("shared/{i}.txt")), "x");
    }
    wait_until("files keep syncing", || shared.join("2.txt").exists());
    assert_eq!(
        owner(&shared.join("0.txt")).0,
        65534,
        "ownership left alone"
    );
    let log = std::fs::read_to_string(dir.path().join("hub.log")).unwrap();
    assert_eq!(
        log.matches("cannot change file ownership here").count(),
        1,
        "one warning: {log}"
    );
    assert_eq!(
        hub.status()["settings"]["chown"],
        "auto (off: not permitted here)"
    );
}

/// Compressible text: `len` bytes of numbered lines.
fn text(len: usize, seed: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0;
    while out.len() < len {
        out.extend_from_slice(
            format!("{seed}:{line} the workspace keeps its notes here, line after line\n")
                .as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// Writes 20 text files of 32 KiB and one of 3 MiB (above the inline
/// limit: it travels as chunks) under `dir`; returns their bytes.
fn write_text_files(dir: &std::path::Path, seed: usize) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut total = 0;
    for i in 0..20 {
        let content = text(32 << 10, seed + i);
        total += content.len() as u64;
        std::fs::write(dir.join(format!("note-{i}.txt")), content).unwrap();
    }
    let big = text(3 << 20, seed + 100);
    total += big.len() as u64;
    std::fs::write(dir.join("big.log"), big).unwrap();
    total
}

#[test]
fn compression_setting_decides_whether_content_travels_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let upstream: std::net::SocketAddr = hub.url.trim_start_matches("http://").parse().unwrap();
    let mut wire = std::collections::BTreeMap::new();
    let mut metadata_wire = std::collections::BTreeMap::new();
    for (seed, mode) in [(1000, "metadata"), (2000, "always"), (3000, "never")] {
        let ws = format!("w-{mode}");
        let proxy = common::proxy::FaultProxy::start(upstream, 1);
        let mut node = Node::new(dir.path(), &hub, mode, &ws);
        node.set_hub_url(&proxy.url());
        node.env.push(("GM_COMPRESSION".into(), mode.into()));
        // Up: inline files and chunks.
        let mut content = write_text_files(&node.path("up"), seed);
        let out = node.once();
        assert!(out.status.success(), "{mode}: {}", node.log_text());
        // Down: small-file downloads and chunks.
        content += write_text_files(&hub.mirror(&ws).join("down"), seed + 500);
        wait_until("the hub journals its own files", || {
            hub.workspace_status(&ws)["files"].as_u64() == Some(42)
        });
        let out = node.once();
        assert!(out.status.success(), "{mode}: {}", node.log_text());
        let got = std::fs::read(node.path("down/big.log")).unwrap();
        assert_eq!(got, text(3 << 20, seed + 600), "{mode}");
        let log = node.log_text();
        assert!(
            log.lines().any(|line| line.contains("node settings")
                && line.contains("compression")
                && line.contains(&format!("\"{mode}\""))),
            "the node's settings line names {mode}: {log}"
        );
        // Metadata only: directories made on the hub reach the node as
        // journal events, with no content.
        let before = proxy.stats().bytes;
        let dirs = hub.workspace_status(&ws)["dirs"].as_u64().unwrap_or(0);
        for i in 0..400 {
            std::fs::create_dir_all(
                hub.mirror(&ws)
                    .join(format!("meta/a-directory-with-a-long-name-{i:04}")),
            )
            .unwrap();
        }
        wait_until("the hub journals its directories", || {
            hub.workspace_status(&ws)["dirs"].as_u64() == Some(dirs + 401)
        });
        let out = node.once();
        assert!(out.status.success(), "{mode}: {}", node.log_text());
        assert!(node.path("meta/a-directory-with-a-long-name-0399").is_dir());
        let metadata = proxy.stats().bytes - before;
        wire.insert(mode, (before, content));
        metadata_wire.insert(mode, metadata);
    }
    assert!(
        metadata_wire["never"] > 2 * metadata_wire["metadata"]
            && metadata_wire["never"] > 2 * metadata_wire["always"],
        "journal events compress unless the setting is never: {metadata_wire:?}"
    );
    for mode in ["metadata", "never"] {
        let (bytes, content) = wire[mode];
        assert!(
            bytes >= content,
            "{mode}: {bytes} bytes on the wire for {content} bytes of content"
        );
    }
    let (bytes, content) = wire["always"];
    assert!(
        bytes * 4 < content,
        "always: {bytes} bytes on the wire for {content} bytes of compressible content"
    );
}
