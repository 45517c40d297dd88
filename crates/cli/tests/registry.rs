//! The registry end to end: the real binary as a hub (SQLite in its data
//! dir, or PostgreSQL through GM_DATABASE_URL), a real node attaching a
//! workspace, and the `session`/`template`/`instance`/`nodes` commands with
//! `--json`, pages, filters and bad input.

mod common;

use common::*;
use serde_json::Value;

fn ids(list: &Value, key: &str) -> Vec<i64> {
    list[key]
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["id"].as_i64().expect("id"))
        .collect()
}

fn instance_count(hub: &Hub) -> usize {
    ok(hub, &["instance", "list", "--limit", "1000"])["instances"]
        .as_array()
        .expect("instances")
        .len()
}

/// The whole CLI surface against one hub; a node attaches `ws1` first.
fn exercise(hub: &Hub, base: &std::path::Path) {
    let node = Node::new(base, hub, "laptop", "ws1");
    let output = node.once();
    assert!(
        output.status.success(),
        "node --once: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Attach recorded the node and an active session bound to it.
    let nodes = ok(hub, &["nodes"]);
    assert_eq!(nodes["nodes"][0]["id"], "laptop");
    let session = ok(hub, &["session", "show", "ws1"]);
    assert_eq!(session["state"], "active");
    assert_eq!(session["nodes"][0]["node_id"], "laptop");

    // Templates.
    let coder = ok(
        hub,
        &[
            "template",
            "create",
            "coder",
            "--description",
            "writes code",
            "--config",
            r#"{"model": "m"}"#,
        ],
    );
    assert_eq!(coder["config"]["model"], "m");
    let err = fails(hub, &["template", "create", "coder"]);
    assert_eq!(err, "error: template \"coder\" already exists");
    let plain = ok(hub, &["template", "create", "plain"]);
    assert_eq!(plain["config"], serde_json::json!({}));

    // Two instances without config: changing one leaves the other `{}`.
    let args = [
        "instance",
        "create",
        "--template",
        "coder",
        "--node",
        "laptop",
        "--session",
        "ws1",
    ];
    let one = ok(hub, &args);
    let two = ok(hub, &args);
    assert_eq!(one["config"], serde_json::json!({}));
    assert_eq!(one["status"], "pending");
    let one_id = one["id"].as_i64().expect("id").to_string();
    let two_id = two["id"].as_i64().expect("id").to_string();
    let changed = ok(
        hub,
        &["instance", "set-config", &one_id, r#"{"gpu": true}"#],
    );
    assert_eq!(changed["config"]["gpu"], true);
    assert_eq!(
        ok(hub, &["instance", "show", &two_id])["config"],
        serde_json::json!({})
    );

    // Bad input: a clear error, nothing written.
    let before = instance_count(hub);
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "nope",
            "--node",
            "laptop",
            "--session",
            "ws1",
        ],
    );
    assert_eq!(err, "error: unknown template \"nope\"");
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "coder",
            "--node",
            "laptop",
            "--session",
            "ws1",
            "--config",
            "{oops",
        ],
    );
    assert!(
        err.starts_with("error: invalid input: config \"{oops\": malformed JSON"),
        "{err}"
    );
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "coder",
            "--node",
            "laptop",
            "--session",
            "ws1",
            "--status",
            "runing",
        ],
    );
    assert_eq!(
        err,
        "error: invalid input: status \"runing\": unknown status; allowed: pending, running, stopped, failed"
    );
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "coder",
            "--node",
            "desktop",
            "--session",
            "ws1",
        ],
    );
    assert!(err.contains("unknown node \"desktop\""), "{err}");
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "coder",
            "--node",
            "laptop",
            "--session",
            "ws9",
        ],
    );
    assert_eq!(err, "error: unknown session \"ws9\"");
    let err = fails(hub, &["instance", "set-status", &two_id, "done"]);
    assert!(err.contains("status \"done\": unknown status"), "{err}");
    let err = fails(hub, &["instance", "set-config", &two_id, "[1, 2]"]);
    assert!(err.contains("must be a JSON object, not an array"), "{err}");
    let err = fails(hub, &["template", "create", "bad name"]);
    assert!(err.contains("template \"bad name\""), "{err}");
    let err = fails(hub, &["instance", "list", "--after", "not-a-cursor"]);
    assert!(err.contains("after \"not-a-cursor\""), "{err}");
    assert_eq!(instance_count(hub), before);
    assert_eq!(ok(hub, &["instance", "show", &two_id])["status"], "pending");

    // Pages: 7 instances, 3 per page, every id once, in order.
    for status in ["running", "running", "stopped", "failed", "running"] {
        ok(
            hub,
            &[
                "instance",
                "create",
                "--template",
                "plain",
                "--node",
                "laptop",
                "--session",
                "ws1",
                "--status",
                status,
            ],
        );
    }
    let all = ids(&ok(hub, &["instance", "list"]), "instances");
    assert_eq!(all.len(), 7);
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["instance", "list", "--limit", "3"];
        if let Some(cursor) = &after {
            args.extend(["--after", cursor.as_str()]);
        }
        let page = ok(hub, &args);
        pages += 1;
        paged.extend(ids(&page, "instances"));
        match page["next_cursor"].as_str() {
            Some(cursor) => after = Some(cursor.to_string()),
            None => break,
        }
    }
    assert_eq!((paged, pages), (all.clone(), 3));

    // Filters.
    let running = ok(hub, &["instance", "list", "--status", "running"]);
    assert_eq!(ids(&running, "instances").len(), 3);
    let of_plain = ok(
        hub,
        &[
            "instance",
            "list",
            "--template",
            "plain",
            "--node",
            "laptop",
            "--session",
            "ws1",
        ],
    );
    assert_eq!(ids(&of_plain, "instances").len(), 5);
    let elsewhere = ok(hub, &["instance", "list", "--node", "desktop"]);
    assert_eq!(ids(&elsewhere, "instances"), Vec::<i64>::new());

    // A template in use cannot be deleted.
    let err = fails(hub, &["template", "delete", "coder"]);
    assert!(
        err.contains("refused: template \"coder\" is used by 2 instance(s)"),
        "{err}"
    );
    ok(hub, &["instance", "delete", &one_id]);
    ok(hub, &["instance", "delete", &two_id]);
    ok(hub, &["template", "delete", "coder"]);
    let err = fails(hub, &["template", "show", "coder"]);
    assert_eq!(err, "error: unknown template \"coder\"");

    // Archive: eligible for the purge; a node attaching again reactivates.
    let archived = ok(hub, &["session", "archive", "ws1"]);
    assert_eq!(archived["state"], "archived");
    let listed = ok(hub, &["session", "list", "--state", "archived"]);
    assert_eq!(listed["sessions"][0]["id"], "ws1");
    let err = fails(
        hub,
        &[
            "instance",
            "create",
            "--template",
            "plain",
            "--node",
            "laptop",
            "--session",
            "ws1",
        ],
    );
    assert!(err.contains("\"ws1\" is archived"), "{err}");
    assert!(node.once().status.success());
    assert_eq!(ok(hub, &["session", "show", "ws1"])["state"], "active");

    ok(hub, &["session", "create", "ws2"]);
    let err = fails(hub, &["session", "create", "ws2"]);
    assert_eq!(err, "error: session \"ws2\" already exists");

    // Human output: a table.
    let output = cli(hub, &["instance", "list", "--status", "running"]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("      ID TEMPLATE"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    // The token is checked like every other call.
    let output = command()
        .args(["session", "list", "--hub", &hub.url, "--token", "wrong"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("refused the token"));
}

#[test]
fn registry_cli_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hub = Hub::start(dir.path());
    exercise(&hub, dir.path());

    // The registry lives in state.db next to the sync tables and survives
    // a restart.
    hub.stop();
    hub.spawn();
    assert_eq!(ok(&hub, &["session", "show", "ws1"])["state"], "active");
    assert_eq!(instance_count(&hub), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_cli_on_postgres() {
    let Ok(url) = std::env::var("GM_TEST_POSTGRES_URL") else {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !in_ci,
            "CI is set but GM_TEST_POSTGRES_URL is not: the PostgreSQL tests must run in CI"
        );
        eprintln!("skipping PostgreSQL: GM_TEST_POSTGRES_URL not set");
        return;
    };
    // A fresh schema, so tests can share the server.
    let schema = format!("gm_cli_{:016x}", rand::random::<u64>());
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&mut conn)
            .await
            .expect("create schema");
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");

    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut hub = Hub::start_with(&base, &[("GM_DATABASE_URL", scoped.as_str())]);
        exercise(&hub, &base);
        hub.stop();
    })
    .await
    .expect("cli test");

    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let sessions: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM \"{schema}\".registry_sessions"
    )))
    .fetch_one(&mut conn)
    .await
    .expect("count sessions");
    assert_eq!(sessions, 2, "the hub wrote its registry to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop schema");
}
