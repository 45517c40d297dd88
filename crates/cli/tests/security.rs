//! Per-node tokens with the real binary: a node reaches only the
//! workspaces granted to its token, cannot act as another node, cannot use
//! admin calls; a revoked token, no token, and a token of another hub are
//! refused, while an honest node keeps syncing.

mod common;

use common::*;

fn cli(hub: &Hub, args: &[&str]) -> std::process::Output {
    command()
        .args(args)
        .args(["--hub", &hub.url, "--token", TOKEN])
        .output()
        .expect("run the CLI")
}

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
