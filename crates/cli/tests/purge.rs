//! The orphan purge with a real hub, registry and nodes: inactive idle
//! mirrors go to the trash and later away; a dry run changes nothing; an
//! empty or unreadable active set purges nothing.

mod common;

use common::*;

fn purge(hub: &Hub, dry_run: bool) -> (bool, serde_json::Value, String) {
    let mut args = vec!["purge", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = cli(hub, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    (out.status.success(), report, stderr)
}

fn synced_workspace(dir: &std::path::Path, hub: &Hub, node: &str, ws: &str) -> Node {
    let mut n = Node::new(dir, hub, node, ws);
    n.start();
    write(&n.path("file.txt"), ws);
    wait_until("the workspace on the hub", || {
        hub.mirror(ws).join("file.txt").exists()
    });
    n
}

fn trash_entries(hub: &Hub) -> Vec<String> {
    std::fs::read_dir(hub.data_dir.join("trash"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn purge_trashes_inactive_idle_mirrors_and_later_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(
        dir.path(),
        &[("GM_PURGE_GRACE", "0"), ("GM_TRASH_RETENTION", "2")],
    );
    let mut gone = synced_workspace(dir.path(), &hub, "node-a", "old");
    let _kept = synced_workspace(dir.path(), &hub, "node-b", "live");
    gone.stop();
    let out = cli(&hub, &["session", "archive", "old"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ok, report, stderr) = purge(&hub, true);
    assert!(ok, "{stderr}");
    assert_eq!(report["actions"][0]["action"], "trash", "{report}");
    assert_eq!(report["actions"][0]["workspace"], "old");
    assert!(
        hub.mirror("old").join("file.txt").exists(),
        "a dry run changes nothing"
    );
    assert!(trash_entries(&hub).is_empty());

    let (ok, report, stderr) = purge(&hub, false);
    assert!(ok, "{stderr}");
    assert_eq!(
        report["actions"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert!(!hub.mirror("old").exists(), "the mirror left mirrors/");
    let trashed = trash_entries(&hub);
    assert_eq!(trashed.len(), 1);
    assert!(trashed[0].starts_with("old-"), "{trashed:?}");
    assert!(
        hub.data_dir
            .join("trash")
            .join(&trashed[0])
            .join("file.txt")
            .exists(),
        "nothing deleted yet"
    );
    assert!(
        hub.mirror("live").join("file.txt").exists(),
        "the active workspace stays"
    );
    assert_eq!(hub.status()["counters"]["purges"], 1);

    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (ok, report, stderr) = purge(&hub, false);
    assert!(ok, "{stderr}");
    assert_eq!(report["actions"][0]["action"], "delete", "{report}");
    assert!(
        trash_entries(&hub).is_empty(),
        "deleted after the retention"
    );
}

#[test]
fn purge_does_nothing_when_the_active_set_is_empty_or_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), &[("GM_PURGE_GRACE", "0")]);
    let mut node = synced_workspace(dir.path(), &hub, "node-a", "only");
    node.stop();
    let out = cli(&hub, &["session", "archive", "only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every session archived while a mirror exists: looks like an outage.
    let (ok, report, stderr) = purge(&hub, false);
    assert!(!ok, "the purge must refuse");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("active set is empty"),
        "{report}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(hub.mirror("only").join("file.txt").exists());

    // The registry cannot be read.
    let db = rusqlite::Connection::open(hub.data_dir.join("state.db")).unwrap();
    db.execute_batch("ALTER TABLE registry_sessions RENAME TO registry_sessions_gone;")
        .unwrap();
    let (ok, report, _) = purge(&hub, false);
    assert!(!ok);
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("cannot read the active sessions"),
        "{report}"
    );
    assert!(
        hub.mirror("only").join("file.txt").exists(),
        "nothing purged"
    );
    assert!(trash_entries(&hub).is_empty());
}
