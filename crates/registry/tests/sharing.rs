//! Sharing: the registry and gm-store's sync tables in one SQLite file
//! (DATA_DIR/state.db), and several registries (hubs) on one PostgreSQL
//! database.

mod common;

use std::sync::Arc;

use gm_core::{NodeId, WorkspaceId};
use gm_registry::{Page, Registry};

fn ws(id: &str) -> WorkspaceId {
    WorkspaceId::new(id).expect("workspace id")
}

/// gm-store (rusqlite, its own `user_version` migrations) and the registry
/// (sqlx, `_sqlx_migrations`) open the same file in either order, write to
/// it at the same time without "database is locked", and reopen cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_store_share_state_db() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let store = Arc::new(gm_store::HubDb::open(&path).expect("open store"));
    let registry = Registry::open_sqlite(&path).await.expect("open registry");

    // The store also journals (a transaction that reads the last seq, then
    // writes): it must wait for the registry's write lock, not fail with
    // SQLITE_BUSY because the registry committed after its read.
    let journal = ws("store-journal");
    store
        .ensure_workspace(&journal, 0)
        .expect("journal workspace");
    let writer = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..300 {
                store
                    .ensure_workspace(&ws(&format!("store-{i}")), i)
                    .expect("store write");
                let batch = gm_store::RecordBatch {
                    changes: vec![(
                        gm_core::RelPath::new(&format!("dir-{i}")).expect("path"),
                        gm_core::Versioned {
                            entry: Some(gm_core::Entry::Dir),
                            seq: gm_core::Seq(i as u64 + 1),
                        },
                    )],
                    origin: "hub".into(),
                    ..Default::default()
                };
                store.record(&journal, &batch).expect("journal write");
            }
        })
    };
    let node = NodeId::new("n").expect("node");
    for i in 0..300 {
        registry
            .session_attached(&ws(&format!("reg-{i}")), &node)
            .await
            .expect("registry write");
    }
    writer.await.expect("store writer");
    registry.close().await;
    drop(store);

    // Reopen in the other order: both histories are intact and not re-run.
    let registry = Registry::open_sqlite(&path).await.expect("reopen registry");
    let store = gm_store::HubDb::open(&path).expect("reopen store");
    assert_eq!(store.workspaces().expect("workspaces").len(), 301);
    assert_eq!(registry.active_sessions().await.expect("active").len(), 300);
    assert_eq!(
        registry.applied_migrations().await.expect("migrations"),
        gm_registry::migration_versions()
    );
    let journal_mode: String = {
        use sqlx::Connection;
        let url = format!("sqlite://{}", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .expect("journal mode")
    };
    assert_eq!(journal_mode, "wal");
    registry.close().await;
}

/// Two hubs on one PostgreSQL database: both migrate at start (one waits
/// for the other's lock) and both record attaches of the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_one_postgres_database() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let (schema, scoped) = common::postgres_schema(&url).await;
    let (a, b) = tokio::join!(
        Registry::open_postgres(&scoped),
        Registry::open_postgres(&scoped)
    );
    let (a, b) = (a.expect("hub a"), b.expect("hub b"));
    let session = ws("shared");
    let (node_a, node_b) = (
        NodeId::new("node-a").expect("node"),
        NodeId::new("node-b").expect("node"),
    );
    let (ra, rb) = tokio::join!(
        a.session_attached(&session, &node_a),
        b.session_attached(&session, &node_b),
    );
    ra.expect("attach via a");
    rb.expect("attach via b");
    let seen = b.session(&session).await.expect("show").expect("exists");
    assert_eq!(seen.nodes.len(), 2);
    let nodes = a
        .list_nodes(&Page::first(0).expect("page"))
        .await
        .expect("nodes");
    assert_eq!(nodes.items.len(), 2);
    a.close().await;
    b.close().await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop schema");
}
