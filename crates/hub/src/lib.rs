//! The ghostmirror hub: keeps a ghost mirror of every workspace as plain
//! files under `DATA_DIR/mirrors/<id>/`, serializes every change through a
//! per-workspace journal, and serves nodes over gRPC.
//!
//! Entry point: `run(config, grpc_listener, admin_listener, shutdown)`.
//! The caller binds the listeners (tests bind port 0) and decides when to
//! stop. Modules:
//! - `state`: the hub and its workspaces, counters;
//! - `observe`: disk -> journal (hub-side writes, startup scan, brake,
//!   racily-clean settling);
//! - `commit`: node proposals -> disk + journal (the conflict rule);
//! - `service`: the gRPC surface and token check;
//! - `registry_service`: the registry's gRPC admin API (gm-registry);
//! - `skills`: the global skill registry (`DATA_DIR/skills/`), its links
//!   into every mirror, registration, promotion and recovery;
//! - `skills_service`: the skills' gRPC admin API;
//! - `admin`: `/healthz` and `/metrics` over HTTP;
//! - `maintenance`: the watcher, debouncing and periodic work.

mod admin;
mod auth;
mod commit;
mod maintenance;
mod observe;
mod purge;
mod registry_service;
mod service;
mod skills;
mod skills_service;
mod state;
mod transfer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gm_fs::ScanConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::Counters;

/// Everything the hub is told at start; built and validated by the CLI.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// The shared token every call must carry.
    pub token: String,
    pub scan: ScanConfig,
    /// Quiet time after the last watcher event before a mirror change is journaled.
    pub debounce: Duration,
    /// Longest a burst of events may delay journaling.
    pub debounce_max: Duration,
    /// Full stat walk of every mirror, as a safety net under the watcher.
    pub rescan_interval: Duration,
    /// The full stat walk's interval while the watcher is missing or past
    /// the inotify watch limit (when shorter than `rescan_interval`).
    pub unwatched_rescan_interval: Duration,
    /// Largest file accepted from a node.
    pub max_file_size: u64,
    /// Staging entries older than this that no live transfer owns are removed.
    pub staging_ttl: Duration,
    /// How long a stop waits for in-flight transfers and commits.
    pub shutdown_timeout: Duration,
    /// Who owns what the hub writes into mirrors (`GM_CHOWN`).
    pub ownership: Arc<gm_fs::Ownership>,
    /// TLS for the gRPC port; `None` serves plaintext (the CLI allows that on
    /// loopback, or anywhere with `--allow-plaintext` and a warning).
    pub tls: Option<ServerTls>,
    /// How often the orphan purge runs.
    pub purge_interval: Duration,
    /// Mirrors changed more recently than this are never purged.
    pub purge_grace: Duration,
    /// How long purged mirrors stay in `DATA_DIR/trash/`.
    pub trash_retention: Duration,
    /// `postgres://…`: the registry lives in PostgreSQL (several hubs may
    /// share it). `None`: in SQLite, in `DATA_DIR/state.db`. The hash
    /// cache and journal stay in `state.db` either way.
    pub database_url: Option<String>,
    /// A new directory under `.skills/` with a SKILL.md, unchanged this
    /// long, is promoted into the skill registry (`GM_SKILL_PROMOTE_QUIET`).
    /// `None`: only `ghostmirror skill promote` promotes.
    pub skill_promote_quiet: Option<Duration>,
    /// Debug builds only: abort the process at a named step
    /// (`GM_TEST_FAULT=promote:after-copy`), for crash tests. Ignored by
    /// release builds.
    pub test_fault: Option<String>,
}

/// The hub's TLS identity (PEM), and the CA whose client certificates it
/// requires (mutual TLS) when set.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// Opens a gate when dropped, also when the thread that holds it panics.
struct OpenOnDrop<'a>(&'a state::Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(
    config: HubConfig,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grpc_addr = grpc.local_addr().context("read gRPC listener address")?;
    let admin_addr = admin.local_addr().context("read admin listener address")?;
    let hub = Arc::new(state::Hub::open(config).await?);

    // Admin first so /healthz can say "not yet" during the startup scan.
    let admin_task = tokio::spawn(admin::serve(hub.clone(), admin, shutdown.clone()));

    let started = std::time::Instant::now();
    // Watch first, then walk: whatever changes in a mirror from here on is
    // queued for the maintenance task, so nothing falls between a walk and
    // the watch (the node does the same before its first scan). The scan
    // loads its cache and journal meanwhile and walks once `watching` opens.
    let watch_started = {
        let hub = hub.clone();
        tokio::task::spawn_blocking(move || {
            let _open = OpenOnDrop(&hub.watching);
            maintenance::watch(&hub)
        })
    };
    hub.startup_scan()
        .await
        .context("startup scan of the mirrors")?;
    // Test builds: a window after the startup scan in which a test changes
    // a mirror (before the watch came first, such a change went unseen
    // until the periodic rescan).
    if cfg!(debug_assertions)
        && hub.config.test_fault.as_deref() == Some("startup:pause-after-scan")
    {
        tracing::warn!("GM_TEST_FAULT: pausing 3 s after the startup scan");
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
    let watching = watch_started.await.context("start the mirrors' watcher")?;
    let counters = hub.counters.snapshot();
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        files_hashed = counters.files_hashed,
        cache_hits = counters.hash_cache_hits,
        "startup scan done"
    );

    let background = CancellationToken::new();
    let maintenance = tokio::spawn(maintenance::run(hub.clone(), watching, background.clone()));
    hub.write_endpoints(grpc_addr, admin_addr)?;
    hub.set_ready(true);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, data_dir = %hub.config.data_dir.display(), "hub accepting nodes");

    let stop_serving = CancellationToken::new();
    let mut served = tokio::spawn(service::serve(hub.clone(), grpc, stop_serving.clone()));
    let early = tokio::select! {
        result = &mut served => Some(result),
        () = shutdown.cancelled() => None,
    };
    // Drain: readiness goes false, new work is refused, in-flight work gets
    // GM_SHUTDOWN_TIMEOUT to finish.
    hub.set_draining();
    hub.set_ready(false);
    let deadline = tokio::time::Instant::now() + hub.config.shutdown_timeout;
    tracing::info!(
        timeout_secs = hub.config.shutdown_timeout.as_secs(),
        "draining: refusing new transfers, finishing in-flight ones"
    );
    stop_serving.cancel();
    let result = match early {
        Some(result) => result.map_err(anyhow::Error::from).and_then(|r| r),
        None => match tokio::time::timeout_at(deadline, &mut served).await {
            Ok(result) => result.map_err(anyhow::Error::from).and_then(|r| r),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish in time; aborting them");
                served.abort();
                Ok(())
            }
        },
    };
    // Commits run under each workspace's lock: holding every lock means none
    // is half done.
    for ws in hub.all_workspaces() {
        if tokio::time::timeout_at(deadline, ws.seq.clone().lock_owned())
            .await
            .is_err()
        {
            tracing::warn!(workspace = %ws.id, "a commit did not finish before the shutdown timeout");
        }
    }
    // Uploads waiting for their commit take their staging files with them.
    hub.uploads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    background.cancel();
    let _ = maintenance.await;
    shutdown.cancel();
    let _ = admin_task.await;
    hub.remove_endpoints();
    hub.registry.close().await;
    tracing::info!("hub stopped");
    result
}
