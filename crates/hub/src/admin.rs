//! The admin HTTP port:
//! - `GET /healthz`: 200 once the hub accepts nodes (process up and started);
//! - `GET /readyz`: 200 when the database answers, the data dir is
//!   writable and the hub is not draining for shutdown; 503 with the reason
//!   otherwise;
//! - `GET /metrics`: Prometheus text format, rendered from the hub's own
//!   counters (the same numbers `status --json` shows).

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::{Histogram, Hub};

pub async fn serve(hub: Arc<Hub>, listener: TcpListener, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
    if hub.is_ready() || hub.is_draining() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn readyz(State(hub): State<Arc<Hub>>) -> (StatusCode, String) {
    if hub.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining for shutdown\n".into(),
        );
    }
    if !hub.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
    }
    let checked = tokio::task::spawn_blocking(move || -> Result<(), String> {
        hub.db.workspaces().map_err(|e| format!("database: {e}"))?;
        let probe = hub
            .config
            .data_dir
            .join(format!(".readyz-{}", std::process::id()));
        std::fs::write(&probe, b"ok").map_err(|e| {
            format!(
                "data dir {} not writable: {e}",
                hub.config.data_dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    })
    .await;
    match checked {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n")),
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP ghostmirror_{name} {help}\n# TYPE ghostmirror_{name} {kind}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    family(out, name, "histogram", help);
    let (buckets, count, sum) = histogram.read();
    for (bound, cumulative) in buckets {
        let _ = writeln!(
            out,
            "ghostmirror_{name}_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "ghostmirror_{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "ghostmirror_{name}_sum {sum}");
    let _ = writeln!(out, "ghostmirror_{name}_count {count}");
}

async fn metrics(State(hub): State<Arc<Hub>>) -> String {
    let hub2 = hub.clone();
    let journal = tokio::task::spawn_blocking(move || {
        hub2.all_workspaces()
            .into_iter()
            .map(|ws| {
                let live = hub2
                    .db
                    .counts(&ws.id)
                    .map(|c| c.files + c.dirs + c.symlinks)
                    .unwrap_or(0);
                (ws.id.to_string(), live)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let c = hub.counters.snapshot();
    let mut out = String::new();
    let counters: [(&str, &str, u64); 15] = [
        (
            "files_synced_total{direction=\"from_nodes\"}",
            "Files synced, by direction.",
            c.files_received,
        ),
        (
            "files_synced_total{direction=\"to_nodes\"}",
            "",
            c.files_sent,
        ),
        (
            "bytes_synced_total{direction=\"from_nodes\"}",
            "Bytes of file content moved on the wire, by direction.",
            c.bytes_received,
        ),
        (
            "bytes_synced_total{direction=\"to_nodes\"}",
            "",
            c.bytes_sent,
        ),
        (
            "chunk_bytes_total{source=\"reused\"}",
            "Bytes of uploaded large files, by where they came from.",
            c.chunk_bytes_reused,
        ),
        (
            "chunk_bytes_total{source=\"fetched\"}",
            "",
            c.bytes_received,
        ),
        (
            "hash_cache_total{result=\"hit\"}",
            "Hash cache lookups during scans, by result.",
            c.hash_cache_hits,
        ),
        ("hash_cache_total{result=\"miss\"}", "", c.files_hashed),
        (
            "files_rehashed_total",
            "Files whose content was read and hashed.",
            c.files_hashed,
        ),
        ("conflicts_total", "Conflicts decided.", c.conflicts),
        (
            "hub_side_changes_total",
            "Changes found in mirrors, written by other programs.",
            c.hub_side_changes,
        ),
        (
            "staging_reclaimed_total",
            "Stale staging entries removed.",
            c.staging_reclaimed,
        ),
        ("purges_total", "Mirrors purged.", c.purges),
        (
            "skill_promotions_total{result=\"done\"}",
            "Promotions of directories under .skills/ into the skill registry, by result.",
            c.skill_promotions,
        ),
        (
            "skill_promotions_total{result=\"refused\"}",
            "",
            c.skill_promotions_refused,
        ),
    ];
    let mut declared = std::collections::BTreeSet::new();
    for (name, help, value) in counters {
        let base = name.split('{').next().unwrap_or(name);
        if declared.insert(base) {
            family(&mut out, base, "counter", help);
        }
        let _ = writeln!(out, "ghostmirror_{name} {value}");
    }
    family(
        &mut out,
        "refused_ops_total",
        "counter",
        "Operations refused, by reason.",
    );
    let refused = hub
        .counters
        .refused_by_reason
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if refused.is_empty() {
        let _ = writeln!(out, "ghostmirror_refused_ops_total{{reason=\"none\"}} 0");
    }
    for (reason, count) in refused {
        let _ = writeln!(
            out,
            "ghostmirror_refused_ops_total{{reason=\"{}\"}} {count}",
            escape(reason)
        );
    }
    histogram(
        &mut out,
        "scan_duration_seconds",
        "Duration of mirror scans.",
        &hub.counters.scan_seconds,
    );
    histogram(
        &mut out,
        "commit_duration_seconds",
        "Duration of node commit requests.",
        &hub.counters.commit_seconds,
    );
    let workspaces = hub.all_workspaces();
    family(
        &mut out,
        "connected_nodes",
        "gauge",
        "Node subscriptions open now.",
    );
    let connected: usize = workspaces
        .iter()
        .map(|ws| {
            ws.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
        })
        .sum();
    let _ = writeln!(out, "ghostmirror_connected_nodes {connected}");
    family(
        &mut out,
        "journal_seq",
        "gauge",
        "Latest journal seq per workspace.",
    );
    for ws in &workspaces {
        let _ = writeln!(
            out,
            "ghostmirror_journal_seq{{workspace=\"{}\"}} {}",
            escape(ws.id.as_str()),
            *ws.committed.borrow()
        );
    }
    family(
        &mut out,
        "journal_entries",
        "gauge",
        "Live journal entries (files, directories, links) per workspace.",
    );
    for (id, live) in journal {
        let _ = writeln!(
            out,
            "ghostmirror_journal_entries{{workspace=\"{}\"}} {live}",
            escape(&id)
        );
    }
    family(
        &mut out,
        "workspace_halted",
        "gauge",
        "1 when the safety brake stopped the workspace.",
    );
    for ws in &workspaces {
        let _ = writeln!(
            out,
            "ghostmirror_workspace_halted{{workspace=\"{}\"}} {}",
            escape(ws.id.as_str()),
            u8::from(ws.halted().is_some())
        );
    }
    family(
        &mut out,
        "skills",
        "gauge",
        "Skill names this hub knows, by state (unavailable: active but its files are missing here).",
    );
    let mut by_state: std::collections::BTreeMap<&str, u64> =
        [("active", 0), ("reserved", 0), ("unavailable", 0)].into();
    for known in hub.skills.snapshot().values() {
        let state = match known {
            crate::skills::Known::Active(_) => "active",
            crate::skills::Known::Reserved => "reserved",
            crate::skills::Known::Unavailable(_) => "unavailable",
        };
        *by_state.entry(state).or_default() += 1;
    }
    for (state, count) in by_state {
        let _ = writeln!(out, "ghostmirror_skills{{state=\"{state}\"}} {count}");
    }
    family(&mut out, "ready", "gauge", "1 while the hub accepts work.");
    let _ = writeln!(
        out,
        "ghostmirror_ready {}",
        u8::from(hub.is_ready() && !hub.is_draining())
    );
    out
}
