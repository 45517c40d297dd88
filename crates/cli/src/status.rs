//! `ghostmirror status`: asks the hub and prints a table or JSON.

use gm_proto::pb;
use serde_json::json;

use crate::args::StatusArgs;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let channel = crate::client::connect(&args.hub, &args.token, &args.tls).await?;
    let mut client = pb::sync_client::SyncClient::new(channel);
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| crate::client::refused("status", s))?
        .into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print_table(&status);
    }
    Ok(())
}

fn to_json(status: &pb::StatusResponse) -> serde_json::Value {
    let c = status.counters.unwrap_or_default();
    json!({
        "hub_id": status.hub_id,
        "version": status.version,
        "data_dir": status.data_dir,
        "uptime_secs": status.uptime_secs,
        "startup_scan_done": status.startup_scan_done,
        "counters": {
            "files_hashed": c.files_hashed,
            "hash_cache_hits": c.hash_cache_hits,
            "files_received": c.files_received,
            "bytes_received": c.bytes_received,
            "files_sent": c.files_sent,
            "bytes_sent": c.bytes_sent,
            "conflicts": c.conflicts,
            "refused_ops": c.refused_ops,
            "hub_side_changes": c.hub_side_changes,
            "local_copies": c.local_copies,
            "chunk_bytes_reused": c.chunk_bytes_reused,
            "staging_reclaimed": c.staging_reclaimed,
            "purges": c.purges,
        },
        "settings": status.settings.clone().map(|s| json!({
            "hash_workers": s.hash_workers,
            "walk_threads": s.walk_threads,
            "io_concurrency": s.io_concurrency,
            "read_rate_limit": s.read_rate_limit,
            "io_max_observed": s.io_max_observed,
            "racy_window_ms": s.racy_window_ms,
            "racy_probe": s.racy_probe,
            "exact_ctime_mirrors": s.exact_ctime_mirrors,
            "max_file_size": s.max_file_size,
            "chown": s.chown,
            "rescan_interval_secs": s.rescan_interval_secs,
            "unwatched_rescan_interval_secs": s.unwatched_rescan_interval_secs,
            "watched_directories": s.watched_directories,
            "watch_complete": s.watch_complete,
        })),
        "workspaces": status.workspaces.iter().map(|w| json!({
            "id": w.id,
            "seq": w.seq,
            "files": w.files,
            "dirs": w.dirs,
            "symlinks": w.symlinks,
            "bytes": w.bytes,
            "halted": if w.halted.is_empty() { serde_json::Value::Null } else { json!(w.halted) },
            "subscribers": w.subscribers,
            "racy_entries": w.racy_entries,
            "conflicts": w.conflicts.iter().map(|c| json!({
                "path": c.path,
                "copy_path": c.copy_path,
                "node": c.node_id,
                "at_unix": c.at_unix,
                "seq": c.seq,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_table(status: &pb::StatusResponse) {
    println!(
        "hub {} (ghostmirror {}), data dir {}, up {}s",
        status.hub_id, status.version, status.data_dir, status.uptime_secs
    );
    if let Some(s) = &status.settings
        && !s.watch_complete
    {
        println!(
            "WATCH INCOMPLETE: {} directories watched, full rescans every {} s (no inotify, or raise fs.inotify.max_user_watches)",
            s.watched_directories,
            s.rescan_interval_secs.min(s.unwatched_rescan_interval_secs)
        );
    }
    println!(
        "{:<24} {:>8} {:>8} {:>6} {:>6} {:>12} {:>9}  NODES / STATE",
        "WORKSPACE", "SEQ", "FILES", "DIRS", "LINKS", "BYTES", "CONFLICTS"
    );
    for w in &status.workspaces {
        let state = if w.halted.is_empty() {
            w.subscribers.join(",")
        } else {
            format!("HALTED: {}", w.halted)
        };
        println!(
            "{:<24} {:>8} {:>8} {:>6} {:>6} {:>12} {:>9}  {}",
            w.id,
            w.seq,
            w.files,
            w.dirs,
            w.symlinks,
            w.bytes,
            w.conflicts.len(),
            state
        );
    }
    for w in &status.workspaces {
        for c in &w.conflicts {
            println!(
                "conflict in {}: {} -> {} (from {}, seq {})",
                w.id, c.path, c.copy_path, c.node_id, c.seq
            );
        }
    }
    if let Some(c) = &status.counters {
        println!(
            "files hashed {}, cache hits {}, received {} files / {} bytes, sent {} files / {} bytes, conflicts {}, refused {}, hub-side changes {}",
            c.files_hashed,
            c.hash_cache_hits,
            c.files_received,
            c.bytes_received,
            c.files_sent,
            c.bytes_sent,
            c.conflicts,
            c.refused_ops,
            c.hub_side_changes
        );
    }
}

/// `ghostmirror purge`: runs the hub's orphan purge now (or a dry run).
pub async fn purge(args: crate::args::PurgeArgs) -> anyhow::Result<()> {
    let channel = crate::client::connect(&args.hub, &args.token, &args.tls).await?;
    let mut client = pb::sync_client::SyncClient::new(channel);
    let report = client
        .purge(pb::PurgeRequest {
            dry_run: args.dry_run,
        })
        .await
        .map_err(|s| crate::client::refused("purge", s))?
        .into_inner();
    if args.json {
        let value = json!({
            "dry_run": report.dry_run,
            "error": if report.error.is_empty() { serde_json::Value::Null } else { json!(report.error) },
            "actions": report.actions.iter().map(|a| json!({
                "workspace": a.workspace,
                "action": a.action,
                "path": a.path,
                "reason": a.reason,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let verb = if report.dry_run { "would" } else { "did" };
        for a in &report.actions {
            println!(
                "{verb} {} {} ({}): {}",
                a.action, a.workspace, a.path, a.reason
            );
        }
        if report.actions.is_empty() {
            println!("nothing to purge");
        }
    }
    if !report.error.is_empty() {
        anyhow::bail!("purge refused to run: {}", report.error);
    }
    Ok(())
}
