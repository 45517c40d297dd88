//! Per-node tokens with the real binary: a node reaches only the
//! workspaces granted to its token, cannot act as another node, cannot use
//! admin calls; a revoked token, no token, and a token of another hub are
//! refused, while an honest node keeps syncing.

mod common;

use common::*;

fn create_token(hub: &Hub, node: &str, workspaces: &[&str]) -> String {
    let mut args = vec!["token", "create", "--node", node];
    for ws in workspaces {
        args.extend(["--workspace", ws]);
    }
    let out = cli(hub, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn node_once(
    hub: &Hub,
    dir: &std::path::Path,
    node: &str,
    token: &str,
    ws: &str,
) -> std::process::Output {
    let started = std::time::Instant::now();
    let out = node_once_inner(hub, dir, node, token, ws);
    eprintln!("node {node} {ws}: {:?}", started.elapsed());
    out
}

fn node_once_inner(
    hub: &Hub,
    dir: &std::path::Path,
    node: &str,
    token: &str,
    ws: &str,
) -> std::process::Output {
    let root = dir.join(format!("{node}-{ws}"));
    std::fs::create_dir_all(&root).unwrap();
    command()
        .args([
            "node",
            "--once",
            "--once-timeout",
            "10",
            "--hub",
            &hub.url,
            "--token",
            token,
            "--node-id",
            node,
        ])
        .arg("--state-dir")
        .arg(dir.join(format!("{node}-{ws}-state")))
        .arg("--workspace")
        .arg(format!("{ws}={}", root.display()))
        .output()
        .unwrap()
}

#[test]
fn node_tokens_reach_only_their_workspaces_and_can_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let token = create_token(&hub, "laptop", &["w1"]);
    assert!(token.starts_with("gmn.laptop."), "{token}");
    // The token itself is not stored: only a salted hash.
    let db = std::fs::read(hub.data_dir.join("state.db")).unwrap();
    let secret = token.rsplit('.').next().unwrap();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret is in the database"
    );

    // Its own workspace: fine.
    std::fs::create_dir_all(dir.path().join("laptop-w1")).unwrap();
    std::fs::write(dir.path().join("laptop-w1/file.txt"), "mine").unwrap();
    let out = node_once(&hub, dir.path(), "laptop", &token, "w1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(hub.mirror("w1").join("file.txt")).unwrap(),
        b"mine"
    );

    // Another workspace: refused, and the message says why.
    let out = node_once(&hub, dir.path(), "laptop", &token, "w2");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("may not reach workspace w2"), "{stderr}");
    assert!(
        !hub.mirror("w2").exists(),
        "nothing created for a refused workspace"
    );

    // Acting as another node: refused.
    let out = node_once(&hub, dir.path(), "desktop", &token, "w1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot act as node desktop"));

    // Admin calls: refused for a node token.
    let out = command()
        .args(["status", "--hub", &hub.url, "--token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the admin token"));
    let out = command()
        .args(["session", "list", "--hub", &hub.url, "--token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Revoked: refused from then on.
    let out = cli(&hub, &["token", "revoke", "--node", "laptop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node_once(&hub, dir.path(), "laptop", &token, "w1");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused the token") && stderr.contains("revoked"),
        "{stderr}"
    );

    // A token of another hub means nothing here.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Hub::start(other_dir.path());
    let foreign = create_token(&other, "laptop", &["w1"]);
    let out = node_once(&hub, dir.path(), "laptop", &foreign, "w1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));

    let listed = cli(&hub, &["token", "list", "--json"]);
    let value: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(value[0]["node"], "laptop");
    assert_eq!(value[0]["revoked"], true);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(secret),
        "list never shows tokens"
    );
    let status = hub.status();
    assert!(
        status["counters"]["refused_ops"].as_u64().unwrap_or(0) >= 4,
        "{status}"
    );
}

fn outside_is_empty(outside: &std::path::Path) -> bool {
    std::fs::read_dir(outside)
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

/// While a large file is on its way into `d/`, `d` is swapped for a symlink
/// to a directory outside the root (on the hub, or on the receiving node):
/// not one byte may land outside, and the hub keeps serving.
fn swap_during_transfer(on_hub: bool) {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let mut a = Node::new(dir.path(), &hub, "node-a", "ws");
    let mut b = Node::new(dir.path(), &hub, "node-b", "ws");
    write(&a.path("d/seed.txt"), "seed");
    a.start();
    b.start();
    wait_until("d everywhere", || {
        b.path("d/seed.txt").exists() && hub.mirror("ws").join("d/seed.txt").exists()
    });

    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let (target_root, staging) = if on_hub {
        (hub.mirror("ws"), hub.staging("ws"))
    } else {
        (b.root.clone(), b.root.join(".ghostmirror/staging"))
    };
    std::fs::write(a.path("d/big.bin"), noise(96 << 20, 3)).unwrap();
    wait_until("the transfer is staged", || {
        std::fs::read_dir(&staging)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    std::fs::rename(target_root.join("d"), target_root.join("d-swapped-away")).unwrap();
    std::os::unix::fs::symlink(&outside, target_root.join("d")).unwrap();
    // Let whatever was in flight finish or fail.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(outside_is_empty(&outside), "bytes landed outside the root");
    // The hub keeps serving an honest change.
    write(&a.path("after.txt"), "still syncing");
    wait_until("an honest change after the attack", || {
        hub.mirror("ws").join("after.txt").exists()
    });
    assert!(outside_is_empty(&outside), "bytes landed outside the root");
}

#[test]
fn a_directory_swapped_for_a_symlink_on_the_hub_during_a_transfer_leaks_nothing() {
    swap_during_transfer(true);
}

#[test]
fn a_directory_swapped_for_a_symlink_on_a_node_during_a_transfer_leaks_nothing() {
    swap_during_transfer(false);
}
