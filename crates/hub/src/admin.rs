//! The admin HTTP port: `GET /healthz` (200 once the hub accepts nodes,
//! 503 before and while stopping) and `GET /metrics` (Prometheus text).

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::Hub;

pub async fn serve(hub: Arc<Hub>, listener: TcpListener, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(hub);
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %err, "admin HTTP server failed");
    }
}

async fn healthz(State(hub): State<Arc<Hub>>) -> (StatusCode, &'static str) {
    if hub.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> String {
    let c = hub.counters.snapshot();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP ghostmirror_{name} {help}\n# TYPE ghostmirror_{name} counter\nghostmirror_{name} {value}"
        );
    };
    counter(
        "files_hashed_total",
        "Files whose content was read and hashed.",
        c.files_hashed,
    );
    counter(
        "hash_cache_hits_total",
        "Files whose hash came from the persistent cache.",
        c.hash_cache_hits,
    );
    counter(
        "files_received_total",
        "Files received from nodes.",
        c.files_received,
    );
    counter(
        "bytes_received_total",
        "Bytes received from nodes.",
        c.bytes_received,
    );
    counter("files_sent_total", "Files sent to nodes.", c.files_sent);
    counter("bytes_sent_total", "Bytes sent to nodes.", c.bytes_sent);
    counter("conflicts_total", "Conflicts decided.", c.conflicts);
    counter("refused_ops_total", "Operations refused.", c.refused_ops);
    counter(
        "hub_side_changes_total",
        "Changes found in mirrors, written by other programs.",
        c.hub_side_changes,
    );
    counter(
        "local_copies_total",
        "Files whose content came from a file the hub already held.",
        c.local_copies,
    );
    let _ = writeln!(
        out,
        "# HELP ghostmirror_journal_seq Latest journal seq per workspace.\n# TYPE ghostmirror_journal_seq gauge"
    );
    for ws in hub.all_workspaces() {
        let _ = writeln!(
            out,
            "ghostmirror_journal_seq{{workspace=\"{}\"}} {}",
            ws.id,
            *ws.committed.borrow()
        );
    }
    let _ = writeln!(
        out,
        "# HELP ghostmirror_workspace_halted 1 when the safety brake stopped the workspace.\n# TYPE ghostmirror_workspace_halted gauge"
    );
    for ws in hub.all_workspaces() {
        let _ = writeln!(
            out,
            "ghostmirror_workspace_halted{{workspace=\"{}\"}} {}",
            ws.id,
            u8::from(ws.halted().is_some())
        );
    }
    out
}
