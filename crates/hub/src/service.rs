//! The gRPC surface of the hub: token check on every call (sync and
//! registry services alike), request validation, and the glue from RPCs to
//! `observe`/`commit` and the database.
//! Every bad request gets a status that names what is wrong and changes
//! nothing.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use gm_core::{ContentHash, Hasher, NodeId, Seq, WorkspaceId};
use gm_proto::pb::{self, sync_server::Sync};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Principal, principal};
use crate::commit::{commit_locked, prestage};
use crate::observe::{Scope, observe_workspace};
use crate::registry_service::RegistryService;
use crate::state::{Counters, Hub, Workspace};

const DOWNLOAD_CHUNK: usize = 256 * 1024;
const MAX_OPS_PER_COMMIT: usize = 50_000;
const MAX_DOWNLOAD_ITEMS: usize = 50_000;
/// Concurrent calls one connection may have open (a node holds one
/// subscription per bound workspace, plus its transfers).
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let counted = hub.clone();
    let registry = gm_proto::registry_pb::registry_server::RegistryServer::new(RegistryService {
        registry: hub.registry.clone(),
        access: hub.access.clone(),
    });
    let skills = gm_proto::skills_pb::skills_server::SkillsServer::new(
        crate::skills_service::SkillsService { hub: hub.clone() },
    )
    .max_decoding_message_size(gm_proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(gm_proto::MAX_MESSAGE_BYTES);
    let service = pb::sync_server::SyncServer::new(SyncService {
        hub,
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(gm_proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(gm_proto::MAX_MESSAGE_BYTES)
    // zstd on the calls where the node asks for it, as its
    // `GM_COMPRESSION` says (chunk streams are compressed per chunk
    // instead, when the request asks).
    .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
    .send_compressed(tonic::codec::CompressionEncoding::Zstd);
    // A node gets at most this many concurrent streams per connection: a
    // client that opens more waits for one to finish (HTTP/2 flow control).
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .initial_stream_window_size(gm_proto::STREAM_WINDOW)
        .initial_connection_window_size(gm_proto::CONNECTION_WINDOW)
        .max_frame_size(gm_proto::MAX_FRAME);
    if let Some(tls) = &counted.config.tls {
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| anyhow::anyhow!("TLS setup: {e}"))?;
    }
    builder
        .add_service(identify(service, counted.clone(), None))
        .add_service(identify(registry, counted.clone(), Some("the registry")))
        .add_service(identify(skills, counted, Some("the skill registry")))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// Wraps a service so every call is identified (admin or node token) before
/// it runs; the caller goes into the request's extensions. Refusals are
/// counted. `admin_only` refuses node tokens outright (the registry).
fn identify<S>(
    service: S,
    hub: Arc<Hub>,
    admin_only: Option<&'static str>,
) -> tonic::service::interceptor::InterceptedService<S, impl tonic::service::Interceptor + Clone> {
    tonic::service::interceptor::InterceptedService::new(service, move |mut request: Request<()>| {
        let who = hub
            .access
            .check(&request)
            .inspect_err(|_| hub.counters.refuse("token"))?;
        if let Some(what) = admin_only {
            who.require_admin(what)
                .inspect_err(|_| hub.counters.refuse("permission"))?;
        }
        request.extensions_mut().insert(who);
        Ok(request)
    })
}

pub struct SyncService {
    hub: Arc<Hub>,
    /// Ends long-lived subscription streams so a graceful stop can finish.
    shutdown: CancellationToken,
}

fn bad(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(what.to_string())
}

fn internal(err: impl std::fmt::Display) -> Status {
    tracing::error!(error = %err, "request failed");
    Status::internal(err.to_string())
}

fn draining() -> Status {
    Status::unavailable("the hub is shutting down; retry shortly")
}

impl SyncService {
    /// The attached workspace `raw`, if the caller may reach it (as `node`,
    /// when the request names one).
    fn attached(
        &self,
        who: &Principal,
        raw: &str,
        node: Option<&NodeId>,
    ) -> Result<Arc<Workspace>, Status> {
        if self.hub.is_draining() {
            return Err(draining());
        }
        let id = WorkspaceId::new(raw).map_err(bad)?;
        who.may_reach(&id, node)
            .inspect_err(|_| self.hub.counters.refuse("permission"))?;
        self.hub.workspace(&id).ok_or_else(|| {
            Status::not_found(format!("workspace {id} is not attached; call Attach first"))
        })
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Sync for SyncService {
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        if self.hub.is_draining() {
            return Err(draining());
        }
        let who = principal(&request)?;
        let req = request.into_inner();
        let id = WorkspaceId::new(&req.workspace).map_err(bad)?;
        let node = NodeId::new(&req.node_id).map_err(bad)?;
        who.may_reach(&id, Some(&node))
            .inspect_err(|_| self.hub.counters.refuse("permission"))?;
        let hub = self.hub.clone();
        let (ws, created) = tokio::task::spawn_blocking(move || hub.open_workspace(&id))
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("{e:#}")))?;
        if created {
            tracing::info!(workspace = %ws.id, node = %node, "workspace created");
            observe_workspace(&self.hub, &ws, Scope::Full)
                .await
                .map_err(|e| internal(format!("{e:#}")))?;
        }
        // The registry learns of the session before the node may sync it: a
        // workspace a node uses is never missing from the active set.
        let outcome = self
            .hub
            .registry
            .session_attached(&ws.id, &node)
            .await
            .map_err(crate::registry_service::status)?;
        if outcome == gm_registry::AttachOutcome::Reactivated {
            tracing::warn!(workspace = %ws.id, node = %node, "an archived session was attached again; it is active again");
        }
        let seq = *ws.committed.borrow();
        tracing::info!(workspace = %ws.id, node = %node, seq, "node attached");
        Ok(Response::new(pb::AttachResponse {
            epoch: ws.epoch.clone(),
            seq,
            hub_id: self.hub.db.hub_id().to_string(),
        }))
    }

    type SubscribeStream = EventStream<pb::SubscribeEvent>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        let node = NodeId::new(&req.node_id).map_err(bad)?;
        let ws = self.attached(&who, &req.workspace, Some(&node))?;
        let since = if req.epoch == ws.epoch {
            Seq(req.since)
        } else {
            Seq::ZERO
        };
        let (tx, rx) = mpsc::channel(8);
        let hub = self.hub.clone();
        let shutdown = self.shutdown.clone();
        let id = hub.next_subscription_id();
        ws.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, node.to_string());
        tokio::spawn(async move {
            let mut committed = ws.committed.subscribe();
            let mut sent = since;
            let mut caught_up = false;
            loop {
                let db = hub.db.clone();
                let ws_id = ws.id.clone();
                let changes =
                    match tokio::task::spawn_blocking(move || db.changes_since(&ws_id, sent, 2000))
                        .await
                    {
                        Ok(Ok(changes)) => changes,
                        Ok(Err(err)) => {
                            let _ = tx.send(Err(internal(err))).await;
                            break;
                        }
                        Err(err) => {
                            let _ = tx.send(Err(internal(err))).await;
                            break;
                        }
                    };
                if let Some((_, last)) = changes.last() {
                    sent = last.seq;
                    let event = pb::SubscribeEvent {
                        changes: changes
                            .iter()
                            .map(|(p, v)| {
                                let mut wire = gm_proto::path_state_to_wire(p, v);
                                wire.read_only = hub.skills.is_read_only(p);
                                wire
                            })
                            .collect(),
                        caught_up_to: None,
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        break;
                    }
                    continue;
                }
                if !caught_up {
                    caught_up = true;
                    let event = pb::SubscribeEvent {
                        changes: Vec::new(),
                        caught_up_to: Some(sent.0),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    alive = async { committed.wait_for(|latest| *latest > sent.0).await.is_ok() } => {
                        if !alive { break; }
                    }
                    () = tx.closed() => break,
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the hub is shutting down"))).await;
                        break;
                    }
                }
            }
            ws.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tracing::info!(workspace = %ws.id, node = %node, "subscription ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        let node = NodeId::new(&req.node_id).map_err(bad)?;
        let ws = self.attached(&who, &req.workspace, Some(&node))?;
        if req.ops.len() > MAX_OPS_PER_COMMIT {
            return Err(bad(format!(
                "{} operations in one commit; the limit is {MAX_OPS_PER_COMMIT}",
                req.ops.len()
            )));
        }
        if let Some(reason) = ws.halted() {
            return Err(Status::failed_precondition(format!(
                "workspace {} is halted on the hub: {reason}",
                ws.id
            )));
        }
        // Inline files are written and synced before the commit lock is
        // taken: the next request's while this one commits.
        let (hub, staging_ws) = (self.hub.clone(), ws.clone());
        let (ops, prestaged) = tokio::task::spawn_blocking(move || {
            let prestaged = prestage(&hub, &staging_ws, &req.ops);
            (req.ops, prestaged)
        })
        .await
        .map_err(internal)?;
        let prestaged = prestaged.map_err(|e| internal(format!("{e:#}")))?;
        let guard = ws.seq.clone().lock_owned().await;
        let hub = self.hub.clone();
        let results = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            commit_locked(&hub, &ws, &mut guard, &node, ops, prestaged)
        })
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("{e:#}")))?;
        Ok(Response::new(pb::CommitResponse { results }))
    }

    type UploadStream = EventStream<pb::UploadReply>;

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadMessage>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let who = principal(&request)?;
        let stream = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        let lookup = self.hub.clone();
        tokio::spawn(async move {
            let workspace_of = move |raw: &str| -> Result<Arc<Workspace>, Status> {
                let id = WorkspaceId::new(raw).map_err(bad)?;
                who.may_reach(&id, None)
                    .inspect_err(|_| lookup.counters.refuse("permission"))?;
                lookup.workspace(&id).ok_or_else(|| {
                    Status::not_found(format!("workspace {id} is not attached; call Attach first"))
                })
            };
            if let Err(status) =
                crate::transfer::upload(hub, workspace_of, stream, tx.clone()).await
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetManifestStream = EventStream<pb::ManifestPart>;

    async fn get_manifest(
        &self,
        request: Request<pb::ManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        let ws = self.attached(&who, &req.workspace, None)?;
        let path = gm_proto::path(&req.path).map_err(bad)?;
        let hash =
            ContentHash::from_slice(&req.hash).map_err(|e| bad(format!("{}: {e}", req.path)))?;
        let hub = self.hub.clone();
        let manifest =
            tokio::task::spawn_blocking(move || crate::transfer::manifest(&hub, &ws, &path, hash))
                .await
                .map_err(internal)??;
        let parts: Vec<Result<pb::ManifestPart, Status>> = manifest
            .chunks
            .chunks(gm_proto::MANIFEST_PART)
            .map(|part| {
                Ok(pb::ManifestPart {
                    chunks: gm_proto::chunks_to_wire(part),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(parts))))
    }

    type ReadChunksStream = EventStream<pb::ChunkData>;

    async fn read_chunks(
        &self,
        request: Request<pb::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        let ws = self.attached(&who, &req.workspace, None)?;
        let path = gm_proto::path(&req.path).map_err(bad)?;
        if req.ranges.len() > gm_chunk::MAX_CHUNKS_PER_FILE {
            return Err(bad(format!("{} ranges in one request", req.ranges.len())));
        }
        if let Some(bad_range) = req
            .ranges
            .iter()
            .find(|r| r.len > gm_chunk::MAX_CHUNK.max(gm_chunk::CHUNKED_MIN as u32))
        {
            return Err(bad(format!(
                "range of {} bytes is over the chunk limit",
                bad_range.len
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        tokio::task::spawn_blocking(move || {
            crate::transfer::read_chunks(&hub, &ws, &path, req.ranges, req.compress, &tx)
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadStream = EventStream<pb::DownloadMessage>;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        let ws = self.attached(&who, &req.workspace, None)?;
        if req.items.len() > MAX_DOWNLOAD_ITEMS {
            return Err(bad(format!(
                "{} items in one download; the limit is {MAX_DOWNLOAD_ITEMS}",
                req.items.len()
            )));
        }
        let mut items = Vec::with_capacity(req.items.len());
        for item in &req.items {
            let path = gm_proto::path(&item.path).map_err(bad)?;
            let hash = ContentHash::from_slice(&item.hash)
                .map_err(|e| bad(format!("{}: {e}", item.path)))?;
            items.push((path, hash));
        }
        let (tx, rx) = mpsc::channel(4);
        let hub = self.hub.clone();
        tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; DOWNLOAD_CHUNK];
            for (index, (path, expected)) in items.into_iter().enumerate() {
                // A skill's files are read from the registry.
                let (root, path) = hub
                    .skills
                    .resolve(&path)
                    .unwrap_or_else(|| (ws.root(), path));
                let index = index as u32;
                let fail = |error: String| pb::DownloadMessage {
                    index,
                    data: Vec::new(),
                    last: false,
                    error,
                };
                let io = &hub.config.scan.io;
                let _permit = io.acquire();
                let mut file = match root.open_read(&path) {
                    Ok((file, _)) => io.reader(file),
                    Err(err) => {
                        if tx
                            .blocking_send(Ok(fail(format!("{path}: {err}"))))
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                };
                let mut hasher = Hasher::new();
                let mut sent = 0u64;
                let mut failed = None;
                loop {
                    match file.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(read) => {
                            hasher.update(&buffer[..read]);
                            sent += read as u64;
                            let message = pb::DownloadMessage {
                                index,
                                data: buffer[..read].to_vec(),
                                last: false,
                                error: String::new(),
                            };
                            if tx.blocking_send(Ok(message)).is_err() {
                                return;
                            }
                        }
                        Err(err) => {
                            failed = Some(format!("{path}: read: {err}"));
                            break;
                        }
                    }
                }
                let end = match failed {
                    Some(error) => fail(error),
                    None if hasher.finalize() != expected => fail(format!(
                        "{path}: changed on the hub; wait for its journal entry"
                    )),
                    None => {
                        Counters::add(&hub.counters.files_sent, 1);
                        Counters::add(&hub.counters.bytes_sent, sent);
                        pb::DownloadMessage {
                            index,
                            data: Vec::new(),
                            last: true,
                            error: String::new(),
                        }
                    }
                };
                if tx.blocking_send(Ok(end)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        principal(&request)?.require_admin("purge")?;
        let dry_run = request.into_inner().dry_run;
        let report = crate::purge::run(&self.hub, dry_run).await;
        Ok(Response::new(pb::PurgeResponse {
            actions: report
                .actions
                .into_iter()
                .map(|a| pb::PurgeAction {
                    workspace: a.workspace,
                    action: a.action.to_string(),
                    path: a.path.display().to_string(),
                    reason: a.reason,
                })
                .collect(),
            dry_run,
            error: report.refused.unwrap_or_default(),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        principal(&request)?.require_admin("status")?;
        let hub = self.hub.clone();
        let response = tokio::task::spawn_blocking(move || build_status(&hub))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(Response::new(response))
    }
}

fn build_status(hub: &Hub) -> Result<pb::StatusResponse, gm_store::StoreError> {
    let mut workspaces = Vec::new();
    for ws in hub.all_workspaces() {
        let counts = hub.db.counts(&ws.id)?;
        let conflicts = hub
            .db
            .conflicts(&ws.id)?
            .into_iter()
            .map(|c| pb::ConflictRecord {
                path: c.path.to_string(),
                copy_path: c.copy_path.to_string(),
                node_id: c.node,
                at_unix: c.at_unix,
                seq: c.seq.0,
            })
            .collect();
        let subscribers = ws
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        workspaces.push(pb::WorkspaceStatus {
            id: ws.id.to_string(),
            seq: *ws.committed.borrow(),
            files: counts.files,
            dirs: counts.dirs,
            symlinks: counts.symlinks,
            bytes: counts.bytes,
            halted: ws.halted().unwrap_or_default(),
            conflicts,
            subscribers,
            racy_entries: ws.racy_count() as u64,
        });
    }
    let c = hub.counters.snapshot();
    Ok(pb::StatusResponse {
        hub_id: hub.db.hub_id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: hub.config.data_dir.display().to_string(),
        uptime_secs: hub.started.elapsed().as_secs(),
        startup_scan_done: hub.is_ready(),
        workspaces,
        counters: Some(pb::Counters {
            files_hashed: c.files_hashed,
            hash_cache_hits: c.hash_cache_hits,
            files_received: c.files_received,
            bytes_received: c.bytes_received,
            files_sent: c.files_sent,
            bytes_sent: c.bytes_sent,
            conflicts: c.conflicts,
            refused_ops: c.refused_ops,
            hub_side_changes: c.hub_side_changes,
            local_copies: c.local_copies,
            chunk_bytes_reused: c.chunk_bytes_reused,
            staging_reclaimed: c.staging_reclaimed,
            purges: c.purges,
            skill_promotions: c.skill_promotions,
        }),
        settings: Some(pb::Settings {
            hash_workers: hub.config.scan.hash_workers as u64,
            walk_threads: hub.config.scan.walk_threads as u64,
            io_concurrency: hub.config.scan.io.concurrency() as u64,
            read_rate_limit: hub.config.scan.io.rate().unwrap_or(0),
            io_max_observed: hub.config.scan.io.max_observed() as u64,
            racy_window_ms: (hub.config.scan.racy_window_ns / 1_000_000).max(0) as u64,
            racy_probe: hub.config.scan.racy_probe,
            exact_ctime_mirrors: hub
                .all_workspaces()
                .iter()
                .filter(|ws| ws.root().exact_ctime())
                .count() as u64,
            max_file_size: hub.config.max_file_size,
            chown: hub.config.ownership.describe().to_string(),
            rescan_interval_secs: hub.config.rescan_interval.as_secs(),
            unwatched_rescan_interval_secs: hub.config.unwatched_rescan_interval.as_secs(),
            watched_directories: hub.watch_state.get().map_or(0, |w| w.directories()) as u64,
            watch_complete: hub.watch_state.get().is_some_and(|w| w.complete()),
        }),
    })
}
