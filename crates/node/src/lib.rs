//! The ghostmirror node: binds workspace ids to local directories and keeps
//! each in sync with its mirror on the hub, both ways.
//!
//! Entry point: `run(config, shutdown)`. Modules:
//! - `client`: the gRPC channel, token, and which errors are worth a retry;
//! - `session`: one workspace's life: attach, catch up, reconcile, then live
//!   (watcher + subscription), reconnecting with backoff;
//! - `reconcile`: the three-tree step (synced / local / remote) for a set of
//!   paths: scan, plan with `gm_core::NodeTrees` (which calls
//!   `gm_core::decide_node`), then apply and propose;
//! - `transfer`: downloads into staging and uploads of large files.

mod client;
mod reconcile;
mod session;
mod transfer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gm_core::{NodeId, WorkspaceId};
use gm_fs::{DirLock, ScanConfig};
use gm_store::NodeDb;
use tokio_util::sync::CancellationToken;

pub use client::{Compression, SyncError, with_tls};

use std::sync::atomic::{AtomicU64, Ordering};

/// Work planned and done, for a progress display (`--once`). Counts every
/// path a round decided to write, delete or propose; bytes count file
/// content.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
}

fn file_bytes(entry: Option<&gm_core::Entry>) -> u64 {
    match entry {
        Some(gm_core::Entry::File { size, .. }) => *size,
        _ => 0,
    }
}

impl Progress {
    pub fn plan<'a>(&self, entries: impl Iterator<Item = Option<&'a gm_core::Entry>>) {
        for entry in entries {
            self.files_total.fetch_add(1, Ordering::Relaxed);
            self.bytes_total
                .fetch_add(file_bytes(entry), Ordering::Relaxed);
        }
    }

    pub fn advance(&self, entry: Option<&gm_core::Entry>) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done
            .fetch_add(file_bytes(entry), Ordering::Relaxed);
    }

    /// (files done, files total, bytes done, bytes total)
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.files_done.load(Ordering::Relaxed),
            self.files_total.load(Ordering::Relaxed),
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub hub_url: String,
    pub token: String,
    pub node_id: NodeId,
    pub state_dir: PathBuf,
    pub workspaces: Vec<(WorkspaceId, PathBuf)>,
    /// Reconcile both ways once and return.
    pub once: bool,
    pub scan: ScanConfig,
    pub debounce: Duration,
    pub debounce_max: Duration,
    pub rescan_interval: Duration,
    /// The full round's interval while the watcher is missing or past the
    /// inotify watch limit (when shorter than `rescan_interval`).
    pub unwatched_rescan_interval: Duration,
    /// Files up to this size travel inline in commit batches.
    pub inline_max: u64,
    /// Byte budget of one commit batch's inline content.
    pub batch_bytes: u64,
    /// A full round over more entries goes in slices of top-level subtrees.
    pub slice_entries: u64,
    /// With `once`: how long to keep retrying an unreachable hub.
    pub once_timeout: Duration,
    /// TLS to the hub (required for an `https://` hub URL).
    pub tls: Option<ClientTls>,
    /// Local deletions are proposed once no new deletion has been seen for
    /// this long, so an emptying root is caught whole by the safety brake.
    pub delete_delay: Duration,
    /// What travels zstd-compressed to and from the hub.
    pub compression: Compression,
    /// Debug builds only: `watch:fail` starts without a watcher, and
    /// `watch:limit=N` stops at N watches (for tests).
    pub test_fault: Option<String>,
}

/// How a client checks the hub's certificate (PEM CA) and, for mutual TLS,
/// the client identity it presents (PEM certificate and key).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Runs every bound workspace until `shutdown` (or, with `once`, until each
/// has reconciled). Errors name the workspace and what went wrong.
pub async fn run(
    config: NodeConfig,
    shutdown: CancellationToken,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    if config.workspaces.is_empty() {
        anyhow::bail!("no workspace bound: pass --workspace ID=PATH (or GM_WORKSPACES)");
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state dir {}", config.state_dir.display()))?;
    let _lock = DirLock::acquire(&config.state_dir, "node.lock")
        .map_err(|e| anyhow::anyhow!("{e}; one node per state dir"))?;
    let db = Arc::new(NodeDb::open(&config.state_dir.join("node.db"))?);
    let client = client::connect(&config)?;
    tracing::info!(
        node = %config.node_id,
        hub = %config.hub_url,
        hash_workers = config.scan.hash_workers,
        walk_threads = config.scan.walk_threads,
        io_concurrency = config.scan.io.concurrency(),
        read_rate_limit = config.scan.io.rate().unwrap_or(0),
        compression = config.compression.as_str(),
        "node settings"
    );
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    for (id, path) in config.workspaces.clone() {
        let session = session::WorkspaceTask::new(
            id.clone(),
            path,
            config.clone(),
            db.clone(),
            client.clone(),
            shutdown.clone(),
            progress.clone(),
        );
        tasks.spawn(async move { (id, session.run().await) });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((id, Err(err))) => {
                if !config.once {
                    // A fatal error (refused token) stops the whole node.
                    shutdown.cancel();
                }
                failures.push(format!("workspace {id}: {err:#}"));
            }
            Err(err) => failures.push(format!("workspace task failed: {err}")),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", failures.join("\n"))
    }
}
