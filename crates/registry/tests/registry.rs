//! The registry suite: every function here runs twice, against SQLite and
//! against PostgreSQL (see `common`), on a fresh database each time.

mod common;

use gm_core::{NodeId, WorkspaceId};
use gm_registry::{
    AttachOutcome, BulkInstance, InstanceFilter, InstanceId, InstanceStatus, JsonObject,
    NewInstance, NewTemplate, Page, Registry, RegistryError, SessionState, TemplateName,
};

suite!(
    migrations_are_recorded,
    attach_records_nodes_and_sessions,
    sessions_create_archive_list,
    templates_create_list_delete,
    instances_create_filter_update_delete,
    instances_without_config_get_fresh_defaults,
    bad_input_is_refused_and_writes_nothing,
    pages_walk_every_row_once,
    filtered_lists_use_their_index,
    node_tokens_are_hashed_granted_replaced_and_revoked,
);

fn ws(id: &str) -> WorkspaceId {
    WorkspaceId::new(id).expect("workspace id")
}

fn node(id: &str) -> NodeId {
    NodeId::new(id).expect("node id")
}

fn name(raw: &str) -> TemplateName {
    TemplateName::new(raw).expect("template name")
}

fn json(raw: &str) -> JsonObject {
    JsonObject::parse("config", raw).expect("json")
}

async fn template(registry: &Registry, raw: &str) {
    registry
        .create_template(&NewTemplate::new(name(raw), "", None).expect("new template"))
        .await
        .expect("create template");
}

fn new_instance(template: &str, on: &str, session: &str) -> NewInstance {
    NewInstance {
        template: name(template),
        node: node(on),
        session: ws(session),
        status: InstanceStatus::Pending,
        config: None,
    }
}

async fn all_instances(registry: &Registry, filter: &InstanceFilter) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut page = Page::first(1000).expect("page");
    loop {
        let got = registry
            .list_instances(filter, &page)
            .await
            .expect("list instances");
        ids.extend(got.items.iter().map(|i| i.id.0));
        match got.next_cursor {
            Some(cursor) => page = Page::new(1000, &cursor).expect("page"),
            None => return ids,
        }
    }
}

async fn count_instances(registry: &Registry) -> usize {
    all_instances(registry, &InstanceFilter::default())
        .await
        .len()
}

async fn migrations_are_recorded(registry: &Registry) {
    assert_eq!(
        registry.applied_migrations().await.expect("migrations"),
        gm_registry::migration_versions()
    );
}

async fn attach_records_nodes_and_sessions(registry: &Registry) {
    let outcome = registry
        .session_attached(&ws("s1"), &node("laptop"))
        .await
        .expect("attach");
    assert_eq!(outcome, AttachOutcome::Created);
    let first = registry
        .session(&ws("s1"))
        .await
        .expect("show")
        .expect("s1");
    assert_eq!(first.state, SessionState::Active);
    assert_eq!(first.nodes.len(), 1);

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let outcome = registry
        .session_attached(&ws("s1"), &node("desktop"))
        .await
        .expect("attach");
    assert_eq!(outcome, AttachOutcome::Updated);
    let outcome = registry
        .session_attached(&ws("s1"), &node("laptop"))
        .await
        .expect("attach");
    assert_eq!(outcome, AttachOutcome::Updated);
    let session = registry
        .session(&ws("s1"))
        .await
        .expect("show")
        .expect("s1");
    let bound: Vec<&str> = session.nodes.iter().map(|b| b.node.as_str()).collect();
    assert_eq!(bound, ["desktop", "laptop"]);
    assert!(session.last_activity_ms > first.last_activity_ms);
    assert_eq!(session.created_ms, first.created_ms);
    let laptop = &session.nodes[1];
    assert!(laptop.last_seen_ms > laptop.first_seen_ms);

    let nodes = registry
        .list_nodes(&Page::first(0).expect("page"))
        .await
        .expect("nodes");
    let ids: Vec<&str> = nodes.items.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["desktop", "laptop"]);

    // Archived, then attached again: active again, so not purged.
    registry.archive_session(&ws("s1")).await.expect("archive");
    assert!(registry.active_sessions().await.expect("active").is_empty());
    let outcome = registry
        .session_attached(&ws("s1"), &node("laptop"))
        .await
        .expect("attach");
    assert_eq!(outcome, AttachOutcome::Reactivated);
    let session = registry
        .session(&ws("s1"))
        .await
        .expect("show")
        .expect("s1");
    assert_eq!(session.state, SessionState::Active);
    assert_eq!(session.archived_ms, None);
    assert!(
        registry
            .active_sessions()
            .await
            .expect("active")
            .contains(&ws("s1"))
    );
}

async fn sessions_create_archive_list(registry: &Registry) {
    for id in ["b", "a", "c", "e", "d"] {
        registry.create_session(&ws(id)).await.expect("create");
    }
    match registry.create_session(&ws("a")).await {
        Err(RegistryError::AlreadyExists {
            what: "session", ..
        }) => {}
        other => panic!("duplicate session: {other:?}"),
    }
    match registry.archive_session(&ws("zz")).await {
        Err(RegistryError::NotFound {
            what: "session", ..
        }) => {}
        other => panic!("archive unknown: {other:?}"),
    }
    let archived = registry.archive_session(&ws("c")).await.expect("archive");
    assert_eq!(archived.state, SessionState::Archived);
    let when = archived.archived_ms.expect("archived_ms");
    let again = registry
        .archive_session(&ws("c"))
        .await
        .expect("archive again");
    assert_eq!(again.archived_ms, Some(when), "first archive time is kept");

    let active = registry.active_sessions().await.expect("active");
    let active: Vec<&str> = active.iter().map(|w| w.as_str()).collect();
    assert_eq!(active, ["a", "b", "d", "e"]);

    // ensure_sessions creates what is missing and never reactivates.
    let created = registry
        .ensure_sessions(&[ws("c"), ws("f"), ws("a")])
        .await
        .expect("ensure");
    assert_eq!(created, 1);
    let c = registry.session(&ws("c")).await.expect("show").expect("c");
    assert_eq!(c.state, SessionState::Archived);

    let page = registry
        .list_sessions(Some(SessionState::Active), &Page::first(2).expect("page"))
        .await
        .expect("list");
    let ids: Vec<&str> = page.items.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    let cursor = page.next_cursor.expect("more pages");
    let page = registry
        .list_sessions(
            Some(SessionState::Active),
            &Page::new(2, &cursor).expect("page"),
        )
        .await
        .expect("list");
    let ids: Vec<&str> = page.items.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["d", "e"]);
    let page = registry
        .list_sessions(
            Some(SessionState::Active),
            &Page::new(2, &page.next_cursor.expect("more")).expect("page"),
        )
        .await
        .expect("list");
    let ids: Vec<&str> = page.items.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["f"]);
    assert_eq!(page.next_cursor, None);

    let archived = registry
        .list_sessions(Some(SessionState::Archived), &Page::first(0).expect("page"))
        .await
        .expect("list");
    assert_eq!(archived.items.len(), 1);
    let all = registry
        .list_sessions(None, &Page::first(0).expect("page"))
        .await
        .expect("list");
    assert_eq!(all.items.len(), 6);
}

async fn templates_create_list_delete(registry: &Registry) {
    let plain = registry
        .create_template(&NewTemplate::new(name("coder"), "writes code", None).expect("new"))
        .await
        .expect("create");
    assert_eq!(plain.config.to_json(), "{}");
    assert_eq!(plain.description, "writes code");
    let configured = registry
        .create_template(
            &NewTemplate::new(
                name("reviewer"),
                "",
                Some(json(r#"{"model": "x", "limits": {"tokens": 5}}"#)),
            )
            .expect("new"),
        )
        .await
        .expect("create");
    assert_eq!(
        configured.config.to_json(),
        r#"{"limits":{"tokens":5},"model":"x"}"#
    );
    template(registry, "a-first").await;

    let page = registry
        .list_templates(&Page::first(2).expect("page"))
        .await
        .expect("list");
    let names: Vec<&str> = page.items.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a-first", "coder"]);
    let page = registry
        .list_templates(&Page::new(2, &page.next_cursor.expect("more")).expect("page"))
        .await
        .expect("list");
    let names: Vec<&str> = page.items.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["reviewer"]);
    assert_eq!(page.next_cursor, None);

    let shown = registry
        .template(&name("reviewer"))
        .await
        .expect("show")
        .expect("exists");
    assert_eq!(shown, configured);

    // In use: refused with a message that says by how many, nothing deleted.
    registry
        .session_attached(&ws("s"), &node("n"))
        .await
        .expect("attach");
    let first = registry
        .create_instance(&new_instance("coder", "n", "s"))
        .await
        .expect("instance");
    registry
        .create_instance(&new_instance("coder", "n", "s"))
        .await
        .expect("instance");
    match registry.delete_template(&name("coder")).await {
        Err(RegistryError::Refused(message)) => {
            assert!(
                message.starts_with("template \"coder\" is used by 2 instance(s)"),
                "{message}"
            );
        }
        other => panic!("delete in use: {other:?}"),
    }
    assert!(
        registry
            .template(&name("coder"))
            .await
            .expect("show")
            .is_some()
    );
    assert_eq!(count_instances(registry).await, 2);

    registry.delete_instance(first.id).await.expect("delete");
    let second = all_instances(registry, &InstanceFilter::default()).await;
    registry
        .delete_instance(InstanceId(second[0]))
        .await
        .expect("delete");
    registry
        .delete_template(&name("coder"))
        .await
        .expect("delete unused");
    assert!(
        registry
            .template(&name("coder"))
            .await
            .expect("show")
            .is_none()
    );
    match registry.delete_template(&name("coder")).await {
        Err(RegistryError::NotFound {
            what: "template", ..
        }) => {}
        other => panic!("delete twice: {other:?}"),
    }
}

async fn instances_create_filter_update_delete(registry: &Registry) {
    for (session, on) in [("s1", "n1"), ("s1", "n2"), ("s2", "n2")] {
        registry
            .session_attached(&ws(session), &node(on))
            .await
            .expect("attach");
    }
    template(registry, "t1").await;
    template(registry, "t2").await;
    let plan = [
        ("t1", "n1", "s1", InstanceStatus::Pending),
        ("t1", "n2", "s1", InstanceStatus::Running),
        ("t2", "n2", "s2", InstanceStatus::Running),
        ("t2", "n1", "s1", InstanceStatus::Failed),
        ("t1", "n2", "s2", InstanceStatus::Stopped),
    ];
    let mut ids = Vec::new();
    for (t, n, s, status) in plan {
        let created = registry
            .create_instance(&NewInstance {
                status,
                ..new_instance(t, n, s)
            })
            .await
            .expect("create");
        assert_eq!(created.template.as_str(), t);
        assert_eq!(created.node.as_str(), n);
        assert_eq!(created.session.as_str(), s);
        assert_eq!(created.status, status);
        ids.push(created.id.0);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let pick = |wanted: &[usize]| -> Vec<i64> { wanted.iter().map(|&i| ids[i]).collect() };

    let check = |filter: InstanceFilter, expect: Vec<i64>| async move {
        assert_eq!(all_instances(registry, &filter).await, expect, "{filter:?}");
    };
    check(InstanceFilter::default(), pick(&[0, 1, 2, 3, 4])).await;
    check(
        InstanceFilter {
            node: Some(node("n1")),
            ..Default::default()
        },
        pick(&[0, 3]),
    )
    .await;
    check(
        InstanceFilter {
            session: Some(ws("s2")),
            ..Default::default()
        },
        pick(&[2, 4]),
    )
    .await;
    check(
        InstanceFilter {
            template: Some(name("t2")),
            ..Default::default()
        },
        pick(&[2, 3]),
    )
    .await;
    check(
        InstanceFilter {
            status: Some(InstanceStatus::Running),
            ..Default::default()
        },
        pick(&[1, 2]),
    )
    .await;
    check(
        InstanceFilter {
            node: Some(node("n2")),
            session: Some(ws("s1")),
            template: Some(name("t1")),
            status: Some(InstanceStatus::Running),
        },
        pick(&[1]),
    )
    .await;
    check(
        InstanceFilter {
            template: Some(name("no-such-template")),
            ..Default::default()
        },
        vec![],
    )
    .await;

    let id = InstanceId(ids[0]);
    let before = registry.instance(id).await.expect("show").expect("exists");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let after = registry
        .set_instance_status(id, InstanceStatus::Running)
        .await
        .expect("set status");
    assert_eq!(after.status, InstanceStatus::Running);
    assert!(after.updated_ms > before.updated_ms);
    assert_eq!(after.created_ms, before.created_ms);

    registry.delete_instance(id).await.expect("delete");
    assert!(registry.instance(id).await.expect("show").is_none());
    match registry.delete_instance(id).await {
        Err(RegistryError::NotFound {
            what: "instance", ..
        }) => {}
        other => panic!("delete twice: {other:?}"),
    }
    match registry
        .set_instance_status(id, InstanceStatus::Failed)
        .await
    {
        Err(RegistryError::NotFound {
            what: "instance", ..
        }) => {}
        other => panic!("status of deleted: {other:?}"),
    }
    // Ids are never reused.
    let next = registry
        .create_instance(&new_instance("t1", "n1", "s1"))
        .await
        .expect("create");
    assert!(next.id.0 > ids[4]);
}

/// The predecessor shared one JSON default between rows: changing one
/// row's config changed every row that had been created without one.
async fn instances_without_config_get_fresh_defaults(registry: &Registry) {
    registry
        .session_attached(&ws("s"), &node("n"))
        .await
        .expect("attach");
    template(registry, "t").await;
    let one = registry
        .create_instance(&new_instance("t", "n", "s"))
        .await
        .expect("create");
    let two = registry
        .create_instance(&new_instance("t", "n", "s"))
        .await
        .expect("create");
    assert_eq!(one.config.to_json(), "{}");
    assert_eq!(two.config.to_json(), "{}");

    let changed = registry
        .set_instance_config(one.id, &json(r#"{"gpu": true}"#))
        .await
        .expect("set config");
    assert_eq!(changed.config.to_json(), r#"{"gpu":true}"#);
    let two = registry.instance(two.id).await.expect("show").expect("two");
    assert_eq!(two.config.to_json(), "{}");
    let one = registry.instance(one.id).await.expect("show").expect("one");
    assert_eq!(one.config.to_json(), r#"{"gpu":true}"#);

    // Templates too.
    template(registry, "u").await;
    let t = registry
        .template(&name("t"))
        .await
        .expect("show")
        .expect("t");
    let u = registry
        .template(&name("u"))
        .await
        .expect("show")
        .expect("u");
    assert_eq!(
        (t.config.to_json(), u.config.to_json()),
        ("{}".into(), "{}".into())
    );
}

async fn bad_input_is_refused_and_writes_nothing(registry: &Registry) {
    registry
        .session_attached(&ws("s"), &node("n"))
        .await
        .expect("attach");
    registry.create_session(&ws("old")).await.expect("create");
    registry.archive_session(&ws("old")).await.expect("archive");
    template(registry, "t").await;
    registry
        .create_instance(&new_instance("t", "n", "s"))
        .await
        .expect("create");
    let before = count_instances(registry).await;

    let message = |result: Result<gm_registry::Instance, RegistryError>| -> String {
        match result {
            Ok(instance) => panic!("accepted: {instance:?}"),
            Err(err) => err.to_string(),
        }
    };
    let err = message(
        registry
            .create_instance(&new_instance("nope", "n", "s"))
            .await,
    );
    assert_eq!(err, "unknown template \"nope\"");
    let err = message(
        registry
            .create_instance(&new_instance("t", "ghost", "s"))
            .await,
    );
    assert!(err.contains("unknown node \"ghost\""), "{err}");
    let err = message(
        registry
            .create_instance(&new_instance("t", "n", "nowhere"))
            .await,
    );
    assert_eq!(err, "unknown session \"nowhere\"");
    let err = message(
        registry
            .create_instance(&new_instance("t", "n", "old"))
            .await,
    );
    assert!(err.contains("\"old\" is archived"), "{err}");
    assert_eq!(count_instances(registry).await, before);

    // Duplicate template name: refused, the first one is unchanged.
    let first = registry
        .template(&name("t"))
        .await
        .expect("show")
        .expect("t");
    match registry
        .create_template(
            &NewTemplate::new(name("t"), "other", Some(json(r#"{"x": 1}"#))).expect("new"),
        )
        .await
    {
        Err(err @ RegistryError::AlreadyExists { .. }) => {
            assert_eq!(err.to_string(), "template \"t\" already exists");
        }
        other => panic!("duplicate template: {other:?}"),
    }
    assert_eq!(
        registry.template(&name("t")).await.expect("show"),
        Some(first)
    );

    // Malformed JSON and unknown statuses never become values, so no call
    // can carry them; the errors name the field and the value.
    let err = JsonObject::parse("config", "{\"a\":")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("config \"{\\\"a\\\":\": malformed JSON"),
        "{err}"
    );
    let err = InstanceStatus::parse("done").unwrap_err().to_string();
    assert_eq!(
        err,
        "status \"done\": unknown status; allowed: pending, running, stopped, failed"
    );

    // A cursor from another list, a page too large.
    let sessions = registry
        .list_sessions(None, &Page::first(1).expect("page"))
        .await
        .expect("list");
    let cursor = sessions.next_cursor.expect("two sessions");
    let err = registry
        .list_instances(
            &InstanceFilter::default(),
            &Page::new(10, &cursor).expect("page"),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("after "), "{err}");
    assert!(Page::first(5000).is_err());
    assert_eq!(count_instances(registry).await, before);
}

async fn pages_walk_every_row_once(registry: &Registry) {
    let nodes: Vec<NodeId> = (0..3).map(|i| node(&format!("n{i}"))).collect();
    let sessions: Vec<WorkspaceId> = (0..4).map(|i| ws(&format!("s{i}"))).collect();
    template(registry, "t").await;
    let template_id = registry
        .template(&name("t"))
        .await
        .expect("show")
        .expect("t")
        .id;
    let rows: Vec<BulkInstance> = (0..2500)
        .map(|i| BulkInstance {
            template_id,
            node: nodes[i % 3].clone(),
            session: sessions[i % 4].clone(),
            status: InstanceStatus::ALL[i % 4],
        })
        .collect();
    registry
        .bulk_insert(&nodes, &sessions, &rows)
        .await
        .expect("bulk insert");

    let filter = InstanceFilter {
        node: Some(node("n1")),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut page = Page::first(100).expect("page");
    let mut pages = 0;
    loop {
        let got = registry.list_instances(&filter, &page).await.expect("list");
        pages += 1;
        assert!(got.items.len() <= 100);
        assert!(got.items.iter().all(|i| i.node.as_str() == "n1"));
        seen.extend(got.items.iter().map(|i| i.id.0));
        match got.next_cursor {
            Some(cursor) => page = Page::new(100, &cursor).expect("page"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 833);
    assert_eq!(pages, 9);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert_eq!(count_instances(registry).await, 2500);
}

/// Each filtered list reads its own index: SQLite's plan says `USING
/// INDEX <name>` (no table scan, no sort); PostgreSQL, on 20,000 rows after
/// ANALYZE, scans the index instead of the table.
async fn filtered_lists_use_their_index(registry: &Registry) {
    let nodes: Vec<NodeId> = (0..50).map(|i| node(&format!("node-{i}"))).collect();
    let sessions: Vec<WorkspaceId> = (0..200).map(|i| ws(&format!("session-{i}"))).collect();
    let mut templates = Vec::new();
    for i in 0..10 {
        let created = registry
            .create_template(&NewTemplate::new(name(&format!("tpl-{i}")), "", None).expect("new"))
            .await
            .expect("create");
        templates.push(created.id);
    }
    let rows: Vec<BulkInstance> = (0..20_000)
        .map(|i| BulkInstance {
            template_id: templates[i % 10],
            node: nodes[(i * 7) % 50].clone(),
            session: sessions[(i * 13) % 200].clone(),
            status: InstanceStatus::ALL[i % 4],
        })
        .collect();
    registry
        .bulk_insert(&nodes, &sessions, &rows)
        .await
        .expect("bulk insert");
    registry.analyze().await.expect("analyze");

    let cases = [
        (
            "registry_instances_by_node",
            InstanceFilter {
                node: Some(node("node-3")),
                ..Default::default()
            },
        ),
        (
            "registry_instances_by_session",
            InstanceFilter {
                session: Some(ws("session-17")),
                ..Default::default()
            },
        ),
        (
            "registry_instances_by_template",
            InstanceFilter {
                template: Some(name("tpl-4")),
                ..Default::default()
            },
        ),
        (
            "registry_instances_by_status",
            InstanceFilter {
                status: Some(InstanceStatus::Failed),
                ..Default::default()
            },
        ),
    ];
    // The first page and a page from the middle (a cursor).
    let middle = gm_registry::types::cursor_for_instance(InstanceId(10_000));
    for (index, filter) in cases {
        for page in [
            Page::first(100).expect("page"),
            Page::new(100, &middle).expect("page"),
        ] {
            let plan = registry
                .explain_list_instances(&filter, &page)
                .await
                .expect("explain");
            let text = plan.join("\n");
            eprintln!("{filter:?}:\n{text}\n");
            match registry.backend() {
                gm_registry::Backend::Sqlite => {
                    // One seek: equality on the column, then the id range.
                    let seek = seeks_by_column_then_id(&text, index);
                    assert!(
                        seek,
                        "{filter:?} does not seek {index} by (column=? AND id>?):\n{text}"
                    );
                    assert!(
                        !text.lines().any(|l| l.starts_with("SCAN i")),
                        "{filter:?} scans the table:\n{text}"
                    );
                    assert!(!text.contains("TEMP B-TREE"), "{filter:?} sorts:\n{text}");
                }
                gm_registry::Backend::Postgres => {
                    assert!(
                        text.contains(&format!("Index Scan using {index} on registry_instances"))
                            || text.contains(&format!(
                                "Index Only Scan using {index} on registry_instances"
                            )),
                        "{filter:?} does not scan {index}:\n{text}"
                    );
                    assert!(
                        !text.contains("Seq Scan on registry_instances"),
                        "{filter:?} scans the table:\n{text}"
                    );
                    assert!(!text.contains("Sort"), "{filter:?} sorts:\n{text}");
                }
            }
        }
    }
}

/// True when SQLite's plan searches `index` with an equality on its column
/// and a range on id, e.g. `USING INDEX registry_instances_by_node
/// (node_id=? AND id>?)`.
fn seeks_by_column_then_id(plan: &str, index: &str) -> bool {
    plan.lines().any(|line| {
        (line.contains(&format!("USING INDEX {index} ("))
            || line.contains(&format!("USING COVERING INDEX {index} (")))
            && line.contains("=? AND id>?)")
    })
}

async fn node_tokens_are_hashed_granted_replaced_and_revoked(registry: &Registry) {
    let first = registry
        .create_node_token(&node("laptop"), &[ws("w1"), ws("w2")])
        .await
        .expect("create");
    let (named, secret) = gm_registry::parse_node_token(&first.token).expect("token format");
    assert_eq!(named, node("laptop"));
    let access = registry.node_access().await.expect("access");
    assert_eq!(access.len(), 1);
    assert!(access[0].verify(secret));
    assert!(!access[0].verify("not-the-secret"));
    assert_eq!(access[0].workspaces.len(), 2);
    // Only the hash is stored: the secret appears nowhere in the database.
    let stored: Vec<String> = registry
        .node_access()
        .await
        .unwrap()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    assert!(stored.iter().all(|row| !row.contains(secret)));
    // A new token replaces the old one and its grants.
    let second = registry
        .create_node_token(&node("laptop"), &[ws("w3")])
        .await
        .expect("replace");
    let access = registry.node_access().await.expect("access");
    assert!(!access[0].verify(secret), "the old token no longer works");
    let (_, new_secret) = gm_registry::parse_node_token(&second.token).unwrap();
    assert!(access[0].verify(new_secret));
    assert_eq!(
        access[0]
            .workspaces
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>(),
        ["w3"]
    );
    registry
        .revoke_node_token(&node("laptop"))
        .await
        .expect("revoke");
    let access = registry.node_access().await.expect("access");
    assert!(access[0].revoked && !access[0].verify(new_secret));
    assert!(matches!(
        registry.revoke_node_token(&node("nobody")).await,
        Err(RegistryError::NotFound { .. })
    ));
}
