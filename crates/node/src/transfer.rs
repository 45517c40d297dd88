//! Moving file content between node and hub.
//!
//! Downloads stream into staging files (hashed as written) and land through
//! `StagedFile::commit`, which checks the whole-file hash once and refuses
//! to overwrite a target that changed since the plan. Uploads stream a
//! large file from disk; the hub checks size and hash before it keeps it.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use gm_core::{ContentHash, RelPath, Stat, WorkspaceId};
use gm_fs::{Expect, FsError, Root, StagedFile};
use gm_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, SyncError};

const UPLOAD_CHUNK: usize = 256 * 1024;

pub struct DownloadItem {
    pub path: RelPath,
    pub hash: ContentHash,
    pub executable: bool,
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
            && let Some(file) = staged.remove(&index)
        {
            let root = root.clone();
            let result = tokio::task::block_in_place(|| {
                file.commit(&root, &item.path, item.hash, item.executable, item.expect)
            });
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

/// Streams one file to the hub's staging, to be named by a later commit.
pub async fn upload(
    client: &mut Client,
    workspace: &WorkspaceId,
    root: &Arc<Root>,
    path: &RelPath,
    hash: ContentHash,
    size: u64,
) -> Result<(), SyncError> {
    let (tx, rx) = mpsc::channel::<pb::UploadMessage>(4);
    let start = pb::UploadMessage {
        msg: Some(pb::upload_message::Msg::Start(pb::UploadStart {
            workspace: workspace.to_string(),
            hash: hash.as_bytes().to_vec(),
            size,
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| SyncError::Retry(anyhow::anyhow!("upload channel closed")))?;
    let root = root.clone();
    let reader_path = path.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), FsError> {
        let (mut file, _) = root.open_read(&reader_path)?;
        let mut buffer = vec![0u8; UPLOAD_CHUNK];
        loop {
            let read = file
                .read(&mut buffer)
                .map_err(|e| FsError::io("read", &reader_path, e))?;
            if read == 0 {
                return Ok(());
            }
            let message = pb::UploadMessage {
                msg: Some(pb::upload_message::Msg::Data(buffer[..read].to_vec())),
            };
            if tx.blocking_send(message).is_err() {
                return Ok(());
            }
        }
    });
    let sent = client.upload(ReceiverStream::new(rx)).await;
    reader.await??;
    sent.map_err(|s| SyncError::from_status(s, &format!("upload {path}")))?;
    Ok(())
}
