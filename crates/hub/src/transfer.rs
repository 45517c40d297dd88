//! Large-file transfer on the hub side.
//!
//! - `upload`: the node sends a file's chunk list; the hub answers with the
//!   chunks it cannot find in this workspace (chunk index, or whole files
//!   with that content), then assembles the file in staging from local
//!   copies and the chunks received (`gm_fs::assemble` checks the whole
//!   file's hash), and keeps it for the commit that names its hash.
//! - `manifest`: the chunk list of a file the hub holds (from the cache, or
//!   computed and cached on first use).
//! - `read_chunks`: byte ranges of a file, zstd where it pays if asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use gm_chunk::{MAX_CHUNKS_PER_FILE, Manifest};
use gm_core::{CacheRecord, ContentHash, RelPath};
use gm_fs::Piece;
use gm_fs::assemble::{AssembleError, assemble, plan_pieces};
use gm_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use crate::state::{Counters, Hub, Upload, Workspace};

fn bad(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(what.to_string())
}

fn internal(err: impl std::fmt::Display) -> Status {
    tracing::error!(error = %err, "transfer failed");
    Status::internal(err.to_string())
}

/// Runs one upload conversation; replies go to `replies`.
pub async fn upload(
    hub: Arc<Hub>,
    workspace_of: impl Fn(&str) -> Result<Arc<Workspace>, Status>,
    mut stream: Streaming<pb::UploadMessage>,
    replies: mpsc::Sender<Result<pb::UploadReply, Status>>,
) -> Result<(), Status> {
    let first = stream
        .next()
        .await
        .ok_or_else(|| bad("empty upload: the first message must be `start`"))??;
    let Some(pb::upload_message::Msg::Start(start)) = first.msg else {
        return Err(bad("the first upload message must be `start`"));
    };
    let ws = workspace_of(&start.workspace)?;
    let hash = ContentHash::from_slice(&start.hash).map_err(bad)?;
    if start.size > hub.config.max_file_size {
        return Err(bad(format!(
            "upload of {} bytes is over the hub's limit of {} bytes",
            start.size, hub.config.max_file_size
        )));
    }
    let count = start.chunk_count as usize;
    if count > MAX_CHUNKS_PER_FILE {
        return Err(bad(format!(
            "{count} chunks in one file; the limit is {MAX_CHUNKS_PER_FILE}"
        )));
    }
    let mut chunks = Vec::with_capacity(count.min(1 << 16));
    while chunks.len() < count {
        let message = stream
            .next()
            .await
            .ok_or_else(|| bad("upload ended inside its chunk list"))??;
        match message.msg {
            Some(pb::upload_message::Msg::Manifest(part)) => {
                if chunks.len() + part.chunks.len() > count {
                    return Err(bad(format!(
                        "the chunk list is longer than the announced {count} chunks"
                    )));
                }
                chunks.extend(gm_proto::chunks(&part.chunks).map_err(bad)?);
            }
            _ => return Err(bad("chunk-list parts must follow the upload start")),
        }
    }
    let manifest = Manifest { chunks };
    manifest
        .check(start.size)
        .map_err(|e| bad(format!("upload for {hash}: {e}")))?;

    // Plan: which chunks the hub already has somewhere in this workspace.
    let db = hub.db.clone();
    let ws_id = ws.id.clone();
    let hashes: Vec<ContentHash> = manifest.chunks.iter().map(|c| c.hash).collect();
    let located = tokio::task::spawn_blocking(move || db.locate_chunks(&ws_id, &hashes))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let locate: HashMap<ContentHash, (RelPath, u64)> = located
        .into_iter()
        .map(|(h, l)| (h, (l.path, l.offset)))
        .collect();
    let pieces = plan_pieces(&manifest, &locate);
    let need: Vec<u32> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Piece::Fetch)
        .map(|(i, _)| i as u32)
        .collect();
    for part in need.chunks(64 * 1024) {
        replies
            .send(Ok(pb::UploadReply {
                need: part.to_vec(),
                need_done: false,
                stored: false,
            }))
            .await
            .map_err(|_| Status::cancelled("node went away"))?;
    }
    replies
        .send(Ok(pb::UploadReply {
            need: Vec::new(),
            need_done: true,
            stored: false,
        }))
        .await
        .map_err(|_| Status::cancelled("node went away"))?;

    // Assemble on a blocking thread; chunk data flows to it through a channel.
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<pb::ChunkData>(8);
    let root = ws.root();
    let assembly_manifest = manifest.clone();
    let assembler = tokio::task::spawn_blocking(move || {
        let mut staged = root.stage_file()?;
        let lens: Vec<u32> = assembly_manifest.chunks.iter().map(|c| c.len).collect();
        let done = assemble(
            &root,
            &mut staged,
            &assembly_manifest,
            &pieces,
            hash,
            |index| {
                let message = chunk_rx
                    .blocking_recv()
                    .ok_or("the upload ended before all needed chunks")?;
                if message.index as usize != index {
                    return Err(format!("expected chunk {index}, got {}", message.index));
                }
                gm_chunk::decode(message.data, message.zstd, lens[index] as usize)
                    .map_err(|e| e.to_string())
            },
        )?;
        Ok::<_, AssembleError>((staged, done))
    });
    let mut forward_error = None;
    while let Some(message) = stream.next().await {
        match message {
            Ok(pb::UploadMessage {
                msg: Some(pb::upload_message::Msg::Chunk(chunk)),
            }) => {
                if chunk_tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(_) => {
                forward_error = Some(bad("only chunk data may follow the chunk list"));
                break;
            }
            Err(status) => {
                forward_error = Some(status);
                break;
            }
        }
    }
    drop(chunk_tx);
    let assembled = assembler.await.map_err(internal)?;
    if let Some(status) = forward_error {
        return Err(status);
    }
    if let Err(AssembleError::SourceChanged { path }) = &assembled {
        // What the hub knows of that path (its cache record and chunk
        // rows) no longer describes the disk; without this every retry
        // would pick the same stale source again.
        if let Err(err) = crate::observe::forget_and_observe(&hub, &ws, path.clone()).await {
            tracing::warn!(workspace = %ws.id, path = %path, error = %format!("{err:#}"), "re-reading a changed chunk source failed");
        }
    }
    let (staged, done) = assembled.map_err(|e| match e {
        AssembleError::Chunk(err) => bad(format!("upload for {hash}: {err}")),
        AssembleError::Mismatch { .. } => {
            bad(format!("uploaded content does not match its hash {hash}"))
        }
        AssembleError::Fetch { index, reason } => bad(format!(
            "upload for {hash} was truncated at chunk {index}: {reason}"
        )),
        AssembleError::SourceChanged { path } => Status::aborted(format!(
            "{path} changed on the hub while used as a chunk source; upload again"
        )),
        AssembleError::Fs(err) => internal(err),
    })?;
    Counters::add(&hub.counters.bytes_received, done.fetched_bytes);
    Counters::add(&hub.counters.chunk_bytes_reused, done.copied_bytes);
    tracing::debug!(workspace = %ws.id, %hash, fetched = done.fetched_bytes, reused = done.copied_bytes, "upload staged");
    let manifest = (start.size >= gm_chunk::CHUNKED_MIN).then_some(manifest);
    hub.uploads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            (ws.id.clone(), hash),
            Upload {
                staged,
                at: Instant::now(),
                manifest,
            },
        );
    replies
        .send(Ok(pb::UploadReply {
            need: Vec::new(),
            need_done: true,
            stored: true,
        }))
        .await
        .map_err(|_| Status::cancelled("node went away"))?;
    Ok(())
}

/// The chunk list of `path`, which must still hold `hash`. Blocking.
pub fn manifest(
    hub: &Hub,
    ws: &Workspace,
    path: &RelPath,
    hash: ContentHash,
) -> Result<Manifest, Status> {
    if let Some((registry, inside)) = hub.skills.resolve(path) {
        // A skill's file: read from the registry, not cached per mirror.
        let (actual, stat, manifest) = registry
            .hash_file(&inside)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Counters::add(&hub.counters.files_hashed, 1);
        if actual != hash {
            return Err(Status::failed_precondition(format!(
                "{path} changed on the hub; wait for its journal entry"
            )));
        }
        return Ok(manifest.unwrap_or_else(|| Manifest::single(hash, stat.size)));
    }
    let record = hub.db.cache_get(&ws.id, path).map_err(internal)?;
    let root = ws.root();
    match record {
        Some(record) if record.hash == hash => {
            if record.stat.size < gm_chunk::CHUNKED_MIN {
                return Ok(Manifest::single(hash, record.stat.size));
            }
            if let Some(manifest) = hub.db.manifest(&ws.id, path).map_err(internal)? {
                return Ok(manifest);
            }
        }
        _ => {}
    }
    // Not cached (or cached without chunks): read it once and remember.
    let (actual, stat, manifest) = root
        .hash_file(path)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Counters::add(&hub.counters.files_hashed, 1);
    if actual != hash {
        return Err(Status::failed_precondition(format!(
            "{path} changed on the hub; wait for its journal entry"
        )));
    }
    let manifest = manifest.unwrap_or_else(|| Manifest::single(hash, stat.size));
    let record = CacheRecord {
        stat,
        hash,
        recorded_ns: gm_fs::scan::now_ns(),
    };
    let stored = (stat.size >= gm_chunk::CHUNKED_MIN).then(|| (path.clone(), manifest.clone()));
    hub.db
        .update_cache(&ws.id, &[(path.clone(), record)], &[], stored.as_slice())
        .map_err(internal)?;
    Ok(manifest)
}

/// Sends byte ranges of `path` as chunk data. Blocking; stops when the
/// receiver goes away. Counts as one file sent.
pub fn read_chunks(
    hub: &Hub,
    ws: &Workspace,
    path: &RelPath,
    ranges: Vec<pb::ChunkRange>,
    compress: bool,
    tx: &mpsc::Sender<Result<pb::ChunkData, Status>>,
) {
    let (root, path) = hub
        .skills
        .resolve(path)
        .unwrap_or_else(|| (ws.root(), path.clone()));
    let path = &path;
    let io = &hub.config.scan.io;
    let _permit = io.acquire();
    let file = match root.open_read(path) {
        Ok((file, _)) => file,
        Err(err) => {
            let _ = tx.blocking_send(Err(Status::failed_precondition(err.to_string())));
            return;
        }
    };
    Counters::add(&hub.counters.files_sent, 1);
    for (index, range) in ranges.into_iter().enumerate() {
        let data = match root.read_range(&file, path, range.offset, range.len) {
            Ok(data) => data,
            Err(err) => {
                let _ = tx.blocking_send(Err(Status::failed_precondition(err.to_string())));
                return;
            }
        };
        io.throttle(data.len());
        Counters::add(&hub.counters.bytes_sent, data.len() as u64);
        let (data, zstd) = gm_chunk::encode(data, compress);
        let message = pb::ChunkData {
            index: index as u32,
            data,
            zstd,
        };
        if tx.blocking_send(Ok(message)).is_err() {
            return;
        }
    }
}
