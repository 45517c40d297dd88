//! `ghostmirror status`: asks the hub and prints a table or JSON.

use gm_proto::pb;
use serde_json::json;
use tonic::transport::Endpoint;

use crate::args::StatusArgs;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let token = args.token.resolve()?;
    let channel = Endpoint::from_shared(args.hub.clone())
        .map_err(|e| anyhow::anyhow!("hub address {:?} is not a valid URL: {e}", args.hub))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("hub unreachable at {}: {e}", args.hub))?;
    let header: tonic::metadata::MetadataValue<_> =
        format!("Bearer {token}").parse().map_err(|_| {
            anyhow::anyhow!("the token contains characters that cannot travel in a header")
        })?;
    let mut client = pb::sync_client::SyncClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert(gm_proto::AUTH_HEADER, header.clone());
            Ok(req)
        },
    );
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated => {
                anyhow::anyhow!("the hub refused the token: {}", s.message())
            }
            _ => anyhow::anyhow!("status failed: {}", s.message()),
        })?
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
        },
        "settings": status.settings.clone().map(|s| json!({
            "hash_workers": s.hash_workers,
            "io_concurrency": s.io_concurrency,
            "read_rate_limit": s.read_rate_limit,
            "io_max_observed": s.io_max_observed,
            "racy_window_ms": s.racy_window_ms,
            "max_file_size": s.max_file_size,
            "chown": s.chown,
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
