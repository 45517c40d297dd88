//! Skills end to end (issue 6): the real binary as a hub and two nodes,
//! and the `skill` commands. Covers: a registered skill appearing in every
//! workspace (a link in each mirror, a read-only copy on each node); node
//! edits, deletions and renames under a skill refused and preserved
//! outside `.skills/`; the shadowing race (200 tries); promotion of a
//! node's new skill reaching the other node; promotion onto an existing
//! name refused with nothing lost; a hub killed at each promotion step
//! recovering; broken layouts reported without a crash; admin-only access.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A local directory holding a skill's files, for `skill add`.
fn skill_source(base: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = base.join(format!("src-{name}"));
    for (path, content) in files {
        write(&dir.join(path), content);
    }
    dir
}

fn add(hub: &Hub, name: &str, dir: &Path) -> Value {
    ok(hub, &["skill", "add", name, dir.to_str().expect("utf-8")])
}

fn skills(hub: &Hub) -> Vec<Value> {
    ok(hub, &["skill", "list"])["skills"]
        .as_array()
        .expect("skills")
        .clone()
}

fn skill<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|s| s["name"] == name)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_only(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.permissions().mode() & 0o222 == 0)
}

fn make_writable(path: &Path) {
    let mut perms = std::fs::metadata(path).expect("stat").permissions();
    perms.set_mode(perms.mode() | 0o200);
    std::fs::set_permissions(path, perms).expect("chmod");
}

/// Conflict copies on a replica: `skills-conflicts/<name>.conflict-*/<below>`
/// -> content.
fn kept_copies(root: &Path, name: &str, below: &str) -> Vec<String> {
    tree(root)
        .into_iter()
        .filter(|(path, _)| {
            path.strip_prefix("skills-conflicts/")
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(dir, rest)| {
                    dir.starts_with(&format!("{name}.conflict-")) && rest == below
                })
        })
        .filter_map(|(_, item)| match item {
            Item::File { content, .. } => Some(String::from_utf8_lossy(&content).to_string()),
            _ => None,
        })
        .collect()
}

fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return String::new();
    };
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// One sample of the hub's `/metrics`, 0 when absent.
fn metric(hub: &Hub, sample: &str) -> f64 {
    http_get(&format!("{}/metrics", hub.admin))
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The hub's log, without terminal colours.
fn hub_log(base: &Path) -> String {
    let raw = read(&base.join("hub.log")).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A hub (skill promotion by quiet period set by `quiet`) and two running
/// nodes, `a` on ws1 and `b` on ws2, both attached.
fn cluster(base: &Path, quiet: &str) -> (Hub, Node, Node) {
    let hub = Hub::start_with(base, &[("GM_SKILL_PROMOTE_QUIET", quiet)]);
    let mut a = Node::new(base, &hub, "a", "ws1");
    let mut b = Node::new(base, &hub, "b", "ws2");
    a.start();
    b.start();
    write(&a.path("seed-a"), "a");
    write(&b.path("seed-b"), "b");
    wait_until("both nodes attached", || {
        hub.mirror("ws1").join("seed-a").exists() && hub.mirror("ws2").join("seed-b").exists()
    });
    (hub, a, b)
}

const REVIEW: &str = "# review\nRead the diff twice.\n";
const GUIDE: &str = "step 1: read\nstep 2: comment\n";

#[test]
fn a_system_skill_reaches_every_workspace_read_only_and_node_edits_are_refused_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (hub, a, b) = cluster(base, "off");
    let src = skill_source(
        base,
        "review",
        &[("SKILL.md", REVIEW), ("notes/guide.txt", GUIDE)],
    );
    let added = add(&hub, "review", &src);
    assert_eq!(added["state"], "active");
    assert_eq!(added["origin"], "system");
    assert_eq!(added["version"], 1);

    // Every workspace: a link in each mirror (one copy on the hub) and a
    // read-only copy on each node.
    for ws in ["ws1", "ws2"] {
        let link = hub.mirror(ws).join(".skills/review");
        wait_until("the link in the mirror", || {
            std::fs::read_link(&link).is_ok_and(|t| t == Path::new("../../../skills/review"))
        });
        assert_eq!(read(&link.join("SKILL.md")).as_deref(), Some(REVIEW));
    }
    for node in [&a, &b] {
        wait_until("the skill on the node", || {
            read(&node.path(".skills/review/SKILL.md")).as_deref() == Some(REVIEW)
                && read(&node.path(".skills/review/notes/guide.txt")).as_deref() == Some(GUIDE)
        });
        assert!(read_only(&node.path(".skills/review/SKILL.md")));
        assert!(read_only(&node.path(".skills/review/notes/guide.txt")));
    }
    let listed = skills(&hub);
    assert_eq!(skill(&listed, "review").expect("listed")["files"], 2);
    let shown = ok(&hub, &["skill", "show", "review"]);
    let paths: Vec<&str> = shown["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"SKILL.md") && paths.contains(&"notes/guide.txt"),
        "{shown}"
    );

    // An edit on a node: refused by the hub, the canonical content comes
    // back, the edit is kept outside .skills/ (on both the node and hub).
    let refused_before = metric(
        &hub,
        "ghostmirror_refused_ops_total{reason=\"skill_read_only\"}",
    );
    let manifest = a.path(".skills/review/SKILL.md");
    make_writable(&manifest);
    std::fs::write(&manifest, "# review\nmy edit\n").expect("edit");
    wait_until("the edit is undone and kept as a copy", || {
        read(&manifest).as_deref() == Some(REVIEW)
            && kept_copies(&a.root, "review", "SKILL.md") == vec!["# review\nmy edit\n"]
            && kept_copies(&hub.mirror("ws1"), "review", "SKILL.md") == vec!["# review\nmy edit\n"]
    });
    assert!(read_only(&manifest), "restored read-only");
    let registry = hub.data_dir.join("skills/review");
    assert_eq!(read(&registry.join("SKILL.md")).as_deref(), Some(REVIEW));
    assert_eq!(
        read(&b.path(".skills/review/SKILL.md")).as_deref(),
        Some(REVIEW)
    );
    let log = hub_log(base);
    assert!(
        log.lines().any(|l| l.contains("refused operation")
            && l.contains("node=a")
            && l.contains("workspace=ws1")
            && l.contains("path=.skills/review/SKILL.md")),
        "no refusal line with node, workspace and path"
    );

    // A deletion: restored.
    let guide = a.path(".skills/review/notes/guide.txt");
    std::fs::remove_file(&guide).expect("delete");
    wait_until("the deleted file is back", || {
        read(&guide).as_deref() == Some(GUIDE)
    });

    // A rename inside the skill: the old name is back, the new one is kept
    // outside .skills/ with its content.
    let renamed = a.path(".skills/review/notes/renamed.txt");
    std::fs::rename(&guide, &renamed).expect("rename");
    wait_until("the rename is undone and its content kept", || {
        read(&guide).as_deref() == Some(GUIDE)
            && !renamed.exists()
            && kept_copies(&a.root, "review", "notes/renamed.txt") == vec![GUIDE]
    });
    let refused_after = metric(
        &hub,
        "ghostmirror_refused_ops_total{reason=\"skill_read_only\"}",
    );
    assert!(
        refused_after >= refused_before + 3.0,
        "refused ops {refused_before} -> {refused_after}"
    );
    // Nothing leaked into the other workspace.
    assert!(!b.path("skills-conflicts").exists());

    // Admin-only: a node's token may not use the skill service.
    let out = cli(
        &hub,
        &["token", "create", "--node", "a", "--workspace", "ws1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for args in [
        vec!["skill", "list"],
        vec!["skill", "promote", "ws1", "x"],
        vec!["skill", "remove", "review"],
    ] {
        let out = command()
            .args(&args)
            .args(["--hub", &hub.url, "--token", &node_token])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} with a node token");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("needs the admin token"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Remove: gone from every workspace, its files in the hub's trash.
    let removed = ok(&hub, &["skill", "remove", "review"]);
    assert_eq!(removed["state"], "removed");
    for root in [
        a.root.clone(),
        b.root.clone(),
        hub.mirror("ws1"),
        hub.mirror("ws2"),
    ] {
        wait_until("the skill is gone", || {
            std::fs::symlink_metadata(root.join(".skills/review")).is_err()
        });
    }
    assert!(!registry.exists());
    let trash: Vec<_> = std::fs::read_dir(hub.data_dir.join("trash"))
        .expect("trash")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        trash.iter().any(|t| t.starts_with("skill-review-")),
        "{trash:?}"
    );
    // The kept edits stay.
    assert_eq!(
        kept_copies(&a.root, "review", "SKILL.md"),
        vec!["# review\nmy edit\n"]
    );
    assert!(skill(&skills(&hub), "review").is_none());

    // The registry changes again (the name taken anew, other content):
    // every node's copy follows, read-only, as the next version.
    let src2 = skill_source(base, "review-2", &[("SKILL.md", "# review v2\n")]);
    let again = add(&hub, "review", &src2);
    assert_eq!(again["version"], 2, "{again}");
    for node in [&a, &b] {
        wait_until("the new version on the node", || {
            read(&node.path(".skills/review/SKILL.md")).as_deref() == Some("# review v2\n")
                && !node.path(".skills/review/notes").exists()
        });
        assert!(read_only(&node.path(".skills/review/SKILL.md")));
    }
}

/// Registering a skill while a node creates a directory of the same name:
/// whichever reaches the hub first, the registered skill owns the name
/// (the only winner) and the node's files survive outside `.skills/`.
/// 200 tries against one hub and node, through the real paths: `skill add`
/// (reservation in the database, staging, rename) racing the node's commit.
#[test]
fn the_shadowing_race_has_one_winner_and_loses_nothing() {
    const TRIES: usize = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (hub, a, _b) = cluster(base, "off");
    let started = std::time::Instant::now();
    for i in 0..TRIES {
        let name = format!("race-{i}");
        let src = skill_source(base, &name, &[("SKILL.md", &format!("system {i}\n"))]);
        let node_write = || {
            write(
                &a.path(&format!(".skills/{name}/SKILL.md")),
                &format!("node {i}\n"),
            )
        };
        // Vary who starts first and by how much.
        if i % 2 == 0 {
            node_write();
            std::thread::sleep(std::time::Duration::from_millis((i % 7) as u64 * 5));
        }
        let add = command()
            .env("GM_LOG", "warn")
            .args(["skill", "add", &name, src.to_str().expect("utf-8")])
            .args(["--hub", &hub.url, "--token", TOKEN])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn skill add");
        if i % 2 == 1 {
            std::thread::sleep(std::time::Duration::from_millis((i % 5) as u64 * 7));
            node_write();
        }
        let out = add.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "try {i}: skill add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{TRIES} races issued in {:?}", started.elapsed());
    // Every try: the registry holds the system content under the name, the
    // node holds it read-only, and the node's version is kept outside
    // .skills/ (once; or more than once when a retried commit kept it again,
    // counted below: a duplicate, never a loss).
    let kept = |root: &Path, name: &str, i: usize| {
        let copies = kept_copies(root, name, "SKILL.md");
        !copies.is_empty() && copies.iter().all(|c| *c == format!("node {i}\n"))
    };
    let pending = |root: &Path| -> Vec<usize> {
        (0..TRIES)
            .filter(|i| {
                let name = format!("race-{i}");
                read(&root.join(format!(".skills/{name}/SKILL.md"))).as_deref()
                    != Some(format!("system {i}\n").as_str())
                    || !kept(root, &name, *i)
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (node, mirror) = (pending(&a.root), pending(&hub.mirror("ws1")));
        if node.is_empty() && mirror.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let show = |i: &usize| {
                let name = format!("race-{i}");
                format!(
                    "{name}: node {:?} copies {:?}; mirror copies {:?}",
                    read(&a.path(&format!(".skills/{name}/SKILL.md"))),
                    tree(&a.root)
                        .into_keys()
                        .filter(|k| k.starts_with(&format!("skills-conflicts/{name}.")))
                        .collect::<Vec<_>>(),
                    kept_copies(&hub.mirror("ws1"), &name, "SKILL.md"),
                )
            };
            panic!(
                "unsettled on the node: {:?}\nunsettled on the hub: {:?}",
                node.iter().take(5).map(show).collect::<Vec<_>>(),
                mirror.iter().take(5).map(show).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let listed = skills(&hub);
    for i in 0..TRIES {
        let name = format!("race-{i}");
        let record = skill(&listed, &name).unwrap_or_else(|| panic!("{name} not registered"));
        assert_eq!(record["origin"], "system", "{record}");
        assert_eq!(record["version"], 1, "{record}");
        assert_eq!(
            read(&hub.data_dir.join(format!("skills/{name}/SKILL.md"))).as_deref(),
            Some(format!("system {i}\n").as_str())
        );
        assert!(read_only(&a.path(&format!(".skills/{name}/SKILL.md"))));
    }
    let twice = (0..TRIES)
        .filter(|i| kept_copies(&a.root, &format!("race-{i}"), "SKILL.md").len() > 1)
        .count();
    eprintln!(
        "{TRIES} races settled in {:?}; node versions kept more than once: {twice}",
        started.elapsed()
    );
}

#[test]
fn a_new_skill_on_one_node_is_promoted_and_reaches_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (hub, a, b) = cluster(base, "500ms");
    write(&a.path(".skills/notes/SKILL.md"), "# notes\n");
    write(&a.path(".skills/notes/how.txt"), "take notes\n");
    wait_until("the promoted skill on the other node", || {
        read(&b.path(".skills/notes/SKILL.md")).as_deref() == Some("# notes\n")
            && read(&b.path(".skills/notes/how.txt")).as_deref() == Some("take notes\n")
    });
    wait_until("the source became the read-only copy", || {
        read_only(&a.path(".skills/notes/SKILL.md")) && read_only(&b.path(".skills/notes/how.txt"))
    });
    assert_eq!(
        read(&a.path(".skills/notes/how.txt")).as_deref(),
        Some("take notes\n")
    );
    let shown = ok(&hub, &["skill", "show", "notes"]);
    assert_eq!(shown["origin"], "promoted", "{shown}");
    assert_eq!(shown["origin_workspace"], "ws1", "{shown}");
    assert_eq!(shown["origin_node"], "a", "{shown}");
    assert_eq!(
        read(&hub.data_dir.join("skills/notes/SKILL.md")).as_deref(),
        Some("# notes\n")
    );
    assert!(
        std::fs::symlink_metadata(hub.mirror("ws1").join(".skills/notes"))
            .expect("link")
            .file_type()
            .is_symlink()
    );
    // Nothing was treated as a conflict.
    assert!(!a.path("skills-conflicts").exists());
    assert!(!b.path("skills-conflicts").exists());
    assert!(metric(&hub, "ghostmirror_skill_promotions_total{result=\"done\"}") >= 1.0);

    // `skill promote` names one at once, without waiting for the quiet
    // period (here on the other node's workspace).
    write(&b.path(".skills/quick/SKILL.md"), "# quick\n");
    wait_until("the candidate on the hub", || {
        hub.mirror("ws2").join(".skills/quick/SKILL.md").exists()
    });
    let out = cli(&hub, &["skill", "promote", "ws2", "quick", "--json"]);
    if out.status.success() {
        let promoted: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(promoted["origin_node"], "b");
    } else {
        // The quiet period won the race: it is a skill either way.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("already exists"), "{err}");
    }
    wait_until("the explicitly promoted skill on the first node", || {
        read(&a.path(".skills/quick/SKILL.md")).as_deref() == Some("# quick\n")
    });
}

#[test]
fn promotion_onto_an_existing_name_is_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (hub, a, b) = cluster(base, "off");
    let src = skill_source(base, "review", &[("SKILL.md", REVIEW)]);
    add(&hub, "review", &src);

    // A name taken in the database: refused, the skill unchanged.
    let err = fails(&hub, &["skill", "promote", "ws1", "review"]);
    assert!(
        err.contains("already exists") && err.contains("never overwritten"),
        "{err}"
    );
    assert_eq!(
        read(&hub.data_dir.join("skills/review/SKILL.md")).as_deref(),
        Some(REVIEW)
    );

    // A name taken on disk only (a directory the database does not know):
    // the rename into place refuses to replace it; the workspace's
    // directory stays where it was and the directory in the way is kept.
    write(&a.path(".skills/tool/SKILL.md"), "# mine\n");
    wait_until("the candidate on the hub", || {
        hub.mirror("ws1").join(".skills/tool/SKILL.md").exists()
    });
    let in_the_way = hub.data_dir.join("skills/tool");
    write(&in_the_way.join("SKILL.md"), "# in the way\n");
    let err = fails(&hub, &["skill", "promote", "ws1", "tool"]);
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(
        read(&in_the_way.join("SKILL.md")).as_deref(),
        Some("# in the way\n")
    );
    assert_eq!(
        read(&a.path(".skills/tool/SKILL.md")).as_deref(),
        Some("# mine\n")
    );
    assert!(!read_only(&a.path(".skills/tool/SKILL.md")));
    assert!(skill(&skills(&hub), "tool").is_none());
    assert!(
        metric(
            &hub,
            "ghostmirror_skill_promotions_total{result=\"refused\"}"
        ) >= 2.0
    );
    // Once it is out of the way the same promotion goes through.
    std::fs::remove_dir_all(&in_the_way).expect("clear");
    let promoted = ok(&hub, &["skill", "promote", "ws1", "tool"]);
    assert_eq!(promoted["version"], 1);
    wait_until("tool on the other node", || {
        read(&b.path(".skills/tool/SKILL.md")).as_deref() == Some("# mine\n")
    });

    // Two workspaces with the same new name: the first promotion wins, the
    // second is refused, and the loser's directory is kept outside .skills/.
    write(&a.path(".skills/dup/SKILL.md"), "# from a\n");
    write(&b.path(".skills/dup/SKILL.md"), "# from b\n");
    wait_until("both candidates on the hub", || {
        hub.mirror("ws1").join(".skills/dup/SKILL.md").exists()
            && hub.mirror("ws2").join(".skills/dup/SKILL.md").exists()
    });
    ok(&hub, &["skill", "promote", "ws1", "dup"]);
    let err = fails(&hub, &["skill", "promote", "ws2", "dup"]);
    assert!(err.contains("already exists"), "{err}");
    wait_until("b holds a's skill and keeps its own version", || {
        read(&b.path(".skills/dup/SKILL.md")).as_deref() == Some("# from a\n")
            && kept_copies(&b.root, "dup", "SKILL.md") == vec!["# from b\n"]
    });
    assert_eq!(
        read(&a.path(".skills/dup/SKILL.md")).as_deref(),
        Some("# from a\n")
    );
}

/// `GM_TEST_FAULT=promote:<step>` aborts the hub at that step of a
/// promotion; the restarted hub finishes it (the files were renamed into
/// place) or rolls it back (they were not), and either way the workspace
/// and the node end consistent.
/// (fault point, whether the promotion is complete after the restart)
const STEPS: [(&str, bool); 5] = [
    ("after-reserve", false),
    ("after-copy", false),
    ("after-rename", true),
    ("after-record", true),
    ("after-link", true),
];

#[test]
fn a_hub_killed_at_each_promotion_step_recovers_consistently() {
    let dir = tempfile::tempdir().expect("tempdir");
    kill_at_each_step(dir.path(), &[]);
}

/// The crash table of ARCHITECTURE.md (Skills): a promotion aborted at
/// each step, then the hub restarted without the fault.
fn kill_at_each_step(base: &Path, env: &[(&str, &str)]) {
    let mut all_env = vec![("GM_SKILL_PROMOTE_QUIET", "off")];
    all_env.extend_from_slice(env);
    let mut hub = Hub::start_with(base, &all_env);
    let mut a = Node::new(base, &hub, "a", "ws1");
    a.start();
    for (done, (step, complete)) in STEPS.into_iter().enumerate() {
        let name = format!("crash-{step}");
        let content = format!("# {step}\n");
        write(&a.path(&format!(".skills/{name}/SKILL.md")), &content);
        write(&a.path(&format!(".skills/{name}/more/data.txt")), step);
        let source = hub
            .mirror("ws1")
            .join(format!(".skills/{name}/more/data.txt"));
        wait_until("the candidate on the hub", || source.exists());

        hub.stop();
        hub.env
            .push(("GM_TEST_FAULT".into(), format!("promote:{step}")));
        hub.spawn();
        let out = cli(&hub, &["skill", "promote", "ws1", &name]);
        assert!(!out.status.success(), "{step}: the hub should have aborted");
        hub.kill();
        let aborts = hub_log(base)
            .matches("GM_TEST_FAULT: aborting the hub at this step")
            .count();
        assert_eq!(
            aborts,
            done + 1,
            "{step}: the hub did not abort at its fault point"
        );
        hub.env.retain(|(k, _)| k != "GM_TEST_FAULT");
        hub.spawn();
        a.stop();
        a.set_hub(&hub);
        a.start();

        let record = skill(&skills(&hub), &name).cloned();
        let staging = hub.data_dir.join("skills/.ghostmirror/staging");
        let staged: Vec<_> = std::fs::read_dir(&staging)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{step}: staging left: {staged:?}");
        if complete {
            let record = record.unwrap_or_else(|| panic!("{step}: not completed"));
            assert_eq!(record["state"], "active", "{step}: {record}");
        } else {
            assert!(record.is_none(), "{step}: not rolled back: {record:?}");
            assert!(!hub.data_dir.join(format!("skills/{name}")).exists());
            // The workspace's directory is where it was, writable, and a
            // new promotion goes through.
            assert_eq!(
                read(&hub.mirror("ws1").join(format!(".skills/{name}/SKILL.md"))).as_deref(),
                Some(content.as_str())
            );
            assert!(!read_only(&a.path(&format!(".skills/{name}/SKILL.md"))));
            ok(&hub, &["skill", "promote", "ws1", &name]);
        }
        // Either way: one copy in the registry, a link in the mirror, the
        // node's files read-only with their content, nothing lost aside.
        assert_eq!(
            read(&hub.data_dir.join(format!("skills/{name}/SKILL.md"))).as_deref(),
            Some(content.as_str()),
            "{step}"
        );
        let link = hub.mirror("ws1").join(format!(".skills/{name}"));
        wait_until("the link in the mirror", || {
            std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink())
        });
        wait_until("the node's copy is the skill", || {
            let manifest = a.path(&format!(".skills/{name}/SKILL.md"));
            read(&manifest).as_deref() == Some(content.as_str())
                && read_only(&manifest)
                && read(&a.path(&format!(".skills/{name}/more/data.txt"))).as_deref() == Some(step)
        });
        assert!(kept_copies(&a.root, &name, "SKILL.md").is_empty(), "{step}");
    }
    let listed = skills(&hub);
    assert_eq!(listed.len(), STEPS.len(), "{listed:?}");
}

#[test]
fn broken_layouts_are_reported_and_nothing_crashes_or_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (mut hub, mut a, b) = cluster(base, "300ms");
    // ws2: `.skills` is a file. ws1: a directory without SKILL.md, and a
    // dangling symlink where a skill could be.
    write(&b.path(".skills"), "not a directory\n");
    write(
        &a.path(".skills/nomanifest/readme.txt"),
        "no manifest here\n",
    );
    std::os::unix::fs::symlink("missing-target", a.path(".skills/dangling")).expect("symlink");
    wait_until("the odd entries on the hub", || {
        hub.mirror("ws2").join(".skills").is_file()
            && hub
                .mirror("ws1")
                .join(".skills/nomanifest/readme.txt")
                .exists()
            && std::fs::symlink_metadata(hub.mirror("ws1").join(".skills/dangling")).is_ok()
    });
    let src = skill_source(base, "review", &[("SKILL.md", REVIEW)]);
    add(&hub, "review", &src);
    wait_until("the skill in ws1", || {
        read(&a.path(".skills/review/SKILL.md")).as_deref() == Some(REVIEW)
    });
    wait_until("the file .skills reported", || {
        hub_log(base).contains(".skills in this mirror is a file, not a directory")
    });
    assert_eq!(
        read(&b.path(".skills")).as_deref(),
        Some("not a directory\n")
    );
    assert_eq!(
        read(&hub.mirror("ws2").join(".skills")).as_deref(),
        Some("not a directory\n")
    );

    // No SKILL.md: never promoted by the quiet period, and `skill promote`
    // says why; `skill list` shows it as a candidate with the reason.
    let err = fails(&hub, &["skill", "promote", "ws1", "nomanifest"]);
    assert!(err.contains("SKILL.md"), "{err}");
    let err = fails(&hub, &["skill", "promote", "ws1", "dangling"]);
    assert!(err.contains("no directory .skills/dangling"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(800));
    let listed = ok(&hub, &["skill", "list"]);
    assert!(skill(listed["skills"].as_array().expect("skills"), "nomanifest").is_none());
    let candidate = listed["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .find(|c| c["name"] == "nomanifest")
        .cloned()
        .unwrap_or_else(|| panic!("no candidate: {listed}"));
    assert!(
        candidate["problem"]
            .as_str()
            .is_some_and(|p| p.contains("SKILL.md")),
        "{candidate}"
    );
    assert_eq!(
        read(&a.path(".skills/nomanifest/readme.txt")).as_deref(),
        Some("no manifest here\n")
    );
    assert_eq!(
        std::fs::read_link(a.path(".skills/dangling")).expect("link"),
        Path::new("missing-target")
    );

    // The registry's copy of a skill vanishes while the hub is down: the
    // mirror's link dangles. Reported, the hub serves on, nodes keep their
    // copies.
    hub.stop();
    let registry = hub.data_dir.join("skills/review");
    make_writable(&registry);
    std::fs::rename(&registry, base.join("review-moved-away")).expect("move away");
    hub.spawn();
    let listed = skills(&hub);
    let review = skill(&listed, "review").expect("still recorded");
    assert!(
        review["problem"]
            .as_str()
            .is_some_and(|p| p.contains("missing")),
        "{review}"
    );
    a.stop();
    a.set_hub(&hub);
    a.start();
    write(&a.path("after-restart"), "x");
    wait_until("the node syncs on", || {
        hub.mirror("ws1").join("after-restart").exists()
    });
    assert_eq!(
        read(&a.path(".skills/review/SKILL.md")).as_deref(),
        Some(REVIEW)
    );
    assert!(http_get(&format!("{}/healthz", hub.admin)).starts_with("HTTP/1.1 200"));
}

/// The registry on PostgreSQL (`GM_TEST_POSTGRES_URL`, a fresh schema): the
/// same crash table, so reservation, release and activation run on that
/// backend too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_at_each_promotion_step_recovers_on_postgres() {
    let Ok(url) = std::env::var("GM_TEST_POSTGRES_URL") else {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !in_ci,
            "CI is set but GM_TEST_POSTGRES_URL is not: the PostgreSQL tests must run in CI"
        );
        eprintln!("skipping PostgreSQL: GM_TEST_POSTGRES_URL not set");
        return;
    };
    let schema = format!("gm_skills_{:016x}", rand::random::<u64>());
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        kill_at_each_step(dir.path(), &[("GM_DATABASE_URL", scoped.as_str())]);
    })
    .await
    .expect("crash table on PostgreSQL");
    let active: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM \"{schema}\".registry_skills WHERE state = 'active'"
    )))
    .fetch_one(&mut conn)
    .await
    .expect("count skills");
    assert_eq!(
        active,
        STEPS.len() as i64,
        "the skills were recorded in PostgreSQL"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop schema");
}
