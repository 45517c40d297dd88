//! Moving file content between node and hub.
//!
//! Small files come in batches (`download`): each streams into a staging
//! file (hashed as written) and lands through `StagedFile::commit`, which
//! checks the whole-file hash once and refuses to overwrite a target that
//! changed since the plan. Large files move by chunks: only the chunks the
//! receiver cannot find in its own workspace cross the wire
//! (`download_chunked`, `upload`), the assembled file checked against its
//! hash before it lands.

use std::collections::HashMap;
use std::sync::Arc;

use gm_chunk::Manifest;
use gm_core::{ContentHash, RelPath, Stat, WorkspaceId};
use gm_fs::assemble::{AssembleError, assemble, plan_pieces};
use gm_fs::{Expect, FileMode, FsError, Piece, Root, StagedFile};
use gm_proto::pb;
use gm_store::NodeDb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, SyncError};

/// One group-committed file: its index in the request and how it landed.
type Landed = (usize, Result<Stat, FsError>);

pub struct DownloadItem {
    pub path: RelPath,
    pub hash: ContentHash,
    /// The executable bit, and read-only for a skill's file.
    pub mode: FileMode,
    pub expect: Expect,
}

/// Why one download did not land.
#[derive(Debug)]
pub enum DownloadFailure {
    /// The received bytes did not hash to the expected value: try again.
    Corrupt,
    /// The hub could not serve it (changed or gone there): wait for the journal.
    Unavailable(String),
    /// Landing it failed (local target changed, disk error).
    Local(FsError),
}

/// Fetches `items` in one stream. Returns one outcome per item index.
pub async fn download(
    client: &mut Client,
    workspace: &WorkspaceId,
    root: &Arc<Root>,
    items: &[DownloadItem],
) -> Result<HashMap<usize, Result<Stat, DownloadFailure>>, SyncError> {
    let request = pb::DownloadRequest {
        workspace: workspace.to_string(),
        items: items
            .iter()
            .map(|item| pb::DownloadItem {
                path: item.path.to_string(),
                hash: item.hash.as_bytes().to_vec(),
            })
            .collect(),
    };
    let mut stream = client
        .download(request)
        .await
        .map_err(|s| SyncError::from_status(s, "download"))?
        .into_inner();
    let mut staged: HashMap<usize, StagedFile> = HashMap::new();
    let mut finished: Vec<(usize, StagedFile)> = Vec::new();
    let mut outcomes = HashMap::new();
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => return Err(SyncError::from_status(status, "download")),
        };
        let index = message.index as usize;
        let Some(item) = items.get(index) else {
            return Err(SyncError::Retry(anyhow::anyhow!(
                "hub sent data for unknown item {index}"
            )));
        };
        if !message.error.is_empty() {
            staged.remove(&index);
            outcomes.insert(index, Err(DownloadFailure::Unavailable(message.error)));
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = staged.entry(index) {
            slot.insert(root.stage_file()?);
        }
        if !message.data.is_empty()
            && let Some(file) = staged.get_mut(&index)
            && let Err(err) = file.write_all(&message.data)
        {
            staged.remove(&index);
            outcomes.insert(index, Err(DownloadFailure::Local(err)));
            continue;
        }
        if message.last
            && let Some(mut file) = staged.remove(&index)
        {
            match file.prepare(root, &item.path, item.mode) {
                Ok(()) => finished.push((index, file)),
                Err(err) => {
                    outcomes.insert(index, Err(DownloadFailure::Local(err)));
                }
            }
        }
    }
    // Group commit: one filesystem sync for every file of the batch, then
    // the renames (the caller syncs again before recording them).
    if !finished.is_empty() {
        let root = root.clone();
        let grouped = finished.len() >= gm_fs::root::GROUP_COMMIT_MIN;
        let landed = tokio::task::block_in_place(move || -> Result<Vec<Landed>, FsError> {
            if grouped {
                root.sync_filesystem()?;
            }
            Ok(finished
                .into_iter()
                .map(|(index, file)| {
                    let item = &items[index];
                    let result = if grouped {
                        file.commit_prepared(&root, &item.path, item.hash, item.expect)
                    } else {
                        file.commit(&root, &item.path, item.hash, item.mode, item.expect)
                    };
                    (index, result)
                })
                .collect())
        })?;
        for (index, result) in landed {
            let outcome = match result {
                Ok(stat) => Ok(stat),
                Err(FsError::HashMismatch { .. }) => Err(DownloadFailure::Corrupt),
                Err(err) => Err(DownloadFailure::Local(err)),
            };
            outcomes.insert(index, outcome);
        }
    }
    for index in 0..items.len() {
        outcomes.entry(index).or_insert_with(|| {
            Err(DownloadFailure::Unavailable(
                "stream ended before the item".into(),
            ))
        });
    }
    Ok(outcomes)
}

/// The chunk list of a local file that should hold `hash`: from the cache
/// when it vouches for that content, else read once. Blocking.
fn local_manifest(
    db: &NodeDb,
    workspace: &WorkspaceId,
    root: &Root,
    path: &RelPath,
    hash: ContentHash,
    size: u64,
) -> Result<Manifest, SyncError> {
    if let Some(record) = db.cache_get(workspace, path)?
        && record.hash == hash
    {
        if size < gm_chunk::CHUNKED_MIN {
            return Ok(Manifest::single(hash, size));
        }
        if let Some(manifest) = db.manifest(workspace, path)? {
            return Ok(manifest);
        }
    }
    let (actual, stat, manifest) = root.hash_file(path)?;
    if actual != hash {
        return Err(SyncError::Retry(anyhow::anyhow!(
            "{path} changed since it was proposed"
        )));
    }
    Ok(manifest.unwrap_or_else(|| Manifest::single(hash, stat.size)))
}

/// One local file to upload: where it is and what it should hold.
pub struct FileToSend {
    pub path: RelPath,
    pub hash: ContentHash,
    pub size: u64,
    /// The chunk list this round's scan computed for `hash`, when it did
    /// (its cache rows are written at the end of the round, so `node.db`
    /// does not have it yet); saves reading and chunking the file again.
    pub manifest: Option<Manifest>,
}

/// Sends one large file: its chunk list first, then only the chunks the hub
/// says it lacks. The hub stages it for the commit that names `hash`.
pub async fn upload(
    client: &mut Client,
    db: &Arc<NodeDb>,
    workspace: &WorkspaceId,
    root: &Arc<Root>,
    file: &FileToSend,
    io: Arc<gm_fs::IoGate>,
    compress: bool,
) -> Result<UploadStats, SyncError> {
    let (path, hash, size) = (&file.path, file.hash, file.size);
    let manifest = match &file.manifest {
        Some(manifest) if manifest.size() == size => manifest.clone(),
        _ => {
            let (db, workspace, root, path) =
                (db.clone(), workspace.clone(), root.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                local_manifest(&db, &workspace, &root, &path, hash, size)
            })
            .await??
        }
    };
    let (tx, rx) = mpsc::channel::<pb::UploadMessage>(8);
    let closed = || SyncError::Retry(anyhow::anyhow!("upload stream closed"));
    tx.send(pb::UploadMessage {
        msg: Some(pb::upload_message::Msg::Start(pb::UploadStart {
            workspace: workspace.to_string(),
            hash: hash.as_bytes().to_vec(),
            size,
            chunk_count: manifest.chunks.len() as u32,
        })),
    })
    .await
    .map_err(|_| closed())?;
    let mut replies = client
        .upload(ReceiverStream::new(rx))
        .await
        .map_err(|s| SyncError::from_status(s, &format!("upload {path}")))?
        .into_inner();
    for part in manifest.chunks.chunks(gm_proto::MANIFEST_PART) {
        tx.send(pb::UploadMessage {
            msg: Some(pb::upload_message::Msg::Manifest(pb::ManifestPart {
                chunks: gm_proto::chunks_to_wire(part),
            })),
        })
        .await
        .map_err(|_| closed())?;
    }
    let mut need: Vec<u32> = Vec::new();
    loop {
        let reply = replies
            .message()
            .await
            .map_err(|s| SyncError::from_status(s, &format!("upload {path}")))?
            .ok_or_else(closed)?;
        need.extend(reply.need);
        if reply.need_done {
            break;
        }
    }
    if need.iter().any(|&i| i as usize >= manifest.chunks.len()) {
        return Err(SyncError::Retry(anyhow::anyhow!(
            "the hub asked for a chunk outside the file"
        )));
    }
    let stats = UploadStats {
        chunks: manifest.chunks.len(),
        sent_chunks: need.len(),
        sent_bytes: need
            .iter()
            .map(|&i| u64::from(manifest.chunks[i as usize].len))
            .sum(),
    };
    let (root, reader_path) = (root.clone(), path.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let _permit = io.acquire();
        let (file, _) = root.open_read(&reader_path)?;
        let offsets = manifest.offsets();
        for index in need {
            let chunk = &manifest.chunks[index as usize];
            let data = root.read_range(&file, &reader_path, offsets[index as usize], chunk.len)?;
            io.throttle(data.len());
            // Not hashed here: the hub checks the assembled file's hash and
            // refuses the upload ("does not match", a retry) when the file
            // changed since it was scanned.
            let (data, zstd) = gm_chunk::encode(data, compress);
            let message = pb::UploadMessage {
                msg: Some(pb::upload_message::Msg::Chunk(pb::ChunkData {
                    index,
                    data,
                    zstd,
                })),
            };
            if tx.blocking_send(message).is_err() {
                return Ok(());
            }
        }
        Ok(())
    });
    reader.await??;
    loop {
        match replies.message().await {
            Ok(Some(reply)) if reply.stored => return Ok(stats),
            Ok(Some(_)) => continue,
            Ok(None) => return Err(closed()),
            Err(status) => return Err(SyncError::from_status(status, &format!("upload {path}"))),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct UploadStats {
    pub chunks: usize,
    pub sent_chunks: usize,
    pub sent_bytes: u64,
}

/// Fetches one large file: its chunk list from the hub, then only the
/// chunks no local file holds, assembled and verified in staging and landed
/// by `StagedFile::commit`. Returns the stat and the chunk list to cache.
pub async fn download_chunked(
    client: &mut Client,
    db: &Arc<NodeDb>,
    workspace: &WorkspaceId,
    root: &Arc<Root>,
    item: &DownloadItem,
    size: u64,
    compress: bool,
) -> Result<Result<(Stat, Manifest), DownloadFailure>, SyncError> {
    let request = pb::ManifestRequest {
        workspace: workspace.to_string(),
        path: item.path.to_string(),
        hash: item.hash.as_bytes().to_vec(),
    };
    let mut parts = match client.get_manifest(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            return Ok(Err(DownloadFailure::Unavailable(
                status.message().to_string(),
            )));
        }
        Err(status) => return Err(SyncError::from_status(status, "manifest")),
    };
    let mut chunks = Vec::new();
    loop {
        match parts.message().await {
            Ok(Some(part)) => match gm_proto::chunks(&part.chunks) {
                Ok(more) if chunks.len() + more.len() <= gm_chunk::MAX_CHUNKS_PER_FILE => {
                    chunks.extend(more)
                }
                Ok(_) => {
                    return Ok(Err(DownloadFailure::Unavailable(
                        "chunk list too long".into(),
                    )));
                }
                Err(err) => return Ok(Err(DownloadFailure::Unavailable(err.to_string()))),
            },
            Ok(None) => break,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                return Ok(Err(DownloadFailure::Unavailable(
                    status.message().to_string(),
                )));
            }
            Err(status) => return Err(SyncError::from_status(status, "manifest")),
        }
    }
    let manifest = Manifest { chunks };
    if let Err(err) = manifest.check(size) {
        return Ok(Err(DownloadFailure::Unavailable(err.to_string())));
    }
    // A local source the index names may no longer hold those bytes (the
    // index lags the disk until the next scan of that path): the assembly
    // is then planned again without it, fetching what it held.
    let mut excluded: Vec<RelPath> = Vec::new();
    loop {
        let pieces = download_pieces(
            client, db, workspace, root, item, &manifest, &excluded, compress,
        );
        match pieces.await? {
            Err(Stale::Source(path)) if excluded.len() < 4 => {
                tracing::debug!(workspace = %workspace, path = %item.path, source = %path, "a local chunk source changed; planning without it");
                excluded.push(path);
            }
            Err(Stale::Source(path)) => {
                return Ok(Err(DownloadFailure::Unavailable(format!(
                    "{path}: changed since it was planned as a chunk source"
                ))));
            }
            Err(Stale::Failed(failure)) => return Ok(Err(failure)),
            Ok(stat) => return Ok(Ok((stat, manifest))),
        }
    }
}

/// Why one assembly attempt did not land.
enum Stale {
    /// This local source no longer holds the planned bytes.
    Source(RelPath),
    Failed(DownloadFailure),
}

/// One attempt at `download_chunked`: plans which chunks come from local
/// files (none from `excluded`), fetches the others, assembles, lands.
#[allow(clippy::too_many_arguments)]
async fn download_pieces(
    client: &mut Client,
    db: &Arc<NodeDb>,
    workspace: &WorkspaceId,
    root: &Arc<Root>,
    item: &DownloadItem,
    manifest: &Manifest,
    excluded: &[RelPath],
    compress: bool,
) -> Result<Result<Stat, Stale>, SyncError> {
    let located = {
        let (db, workspace) = (db.clone(), workspace.clone());
        let hashes: Vec<ContentHash> = manifest.chunks.iter().map(|c| c.hash).collect();
        tokio::task::spawn_blocking(move || db.locate_chunks(&workspace, &hashes)).await??
    };
    let locate: HashMap<ContentHash, (RelPath, u64)> = located
        .into_iter()
        .filter(|(_, l)| !excluded.contains(&l.path))
        .map(|(h, l)| (h, (l.path, l.offset)))
        .collect();
    let pieces = plan_pieces(manifest, &locate);
    let offsets = manifest.offsets();
    let ranges: Vec<pb::ChunkRange> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Piece::Fetch)
        .map(|(i, _)| pb::ChunkRange {
            offset: offsets[i],
            len: manifest.chunks[i].len,
        })
        .collect();
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Result<pb::ChunkData, String>>(8);
    let forwarder = if ranges.is_empty() {
        None
    } else {
        let request = pb::ReadChunksRequest {
            workspace: workspace.to_string(),
            path: item.path.to_string(),
            hash: item.hash.as_bytes().to_vec(),
            ranges,
            compress,
        };
        let mut stream = client
            .read_chunks(request)
            .await
            .map_err(|s| SyncError::from_status(s, "read chunks"))?
            .into_inner();
        Some(tokio::spawn(async move {
            loop {
                let next = match stream.message().await {
                    Ok(Some(data)) => Ok(data),
                    Ok(None) => return,
                    Err(status) => Err(status.message().to_string()),
                };
                let failed = next.is_err();
                if chunk_tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        }))
    };
    let (root, target, expect, hash, mode, manifest) = (
        root.clone(),
        item.path.clone(),
        item.expect,
        item.hash,
        item.mode,
        manifest.clone(),
    );
    let landed = tokio::task::spawn_blocking(move || -> Result<Stat, Stale> {
        let failed = Stale::Failed;
        let mut staged = root
            .stage_file()
            .map_err(|e| failed(DownloadFailure::Local(e)))?;
        let lens: Vec<u32> = manifest.chunks.iter().map(|c| c.len).collect();
        let mut position = 0u32;
        let result = assemble(&root, &mut staged, &manifest, &pieces, hash, |index| {
            let message = chunk_rx
                .blocking_recv()
                .ok_or("the hub ended the chunk stream early")??;
            if message.index != position {
                return Err(format!("expected chunk {position}, got {}", message.index));
            }
            position += 1;
            gm_chunk::decode(message.data, message.zstd, lens[index] as usize)
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(_) => {}
            Err(AssembleError::Chunk(_) | AssembleError::Mismatch { .. }) => {
                return Err(failed(DownloadFailure::Corrupt));
            }
            Err(AssembleError::Fs(err)) => return Err(failed(DownloadFailure::Local(err))),
            Err(AssembleError::SourceChanged { path }) => return Err(Stale::Source(path)),
            Err(other) => {
                return Err(failed(DownloadFailure::Unavailable(other.to_string())));
            }
        }
        match staged.commit(&root, &target, hash, mode, expect) {
            Ok(stat) => Ok(stat),
            Err(FsError::HashMismatch { .. }) => Err(failed(DownloadFailure::Corrupt)),
            Err(err) => Err(failed(DownloadFailure::Local(err))),
        }
    })
    .await?;
    if let Some(forwarder) = forwarder {
        forwarder.abort();
    }
    Ok(landed)
}
