//! Command-line flags, each also read from a `GM_*` environment variable,
//! validated once into the libraries' typed configs.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gm_core::{NodeId, WorkspaceId};
use gm_fs::ScanConfig;

#[derive(Parser)]
#[command(
    name = "ghostmirror",
    version,
    about = "Live two-way mirror of agent workspaces between nodes and a hub"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "GM_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `gm_node=debug`.
    #[arg(long, env = "GM_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::{Quiet, parse_bytes, parse_quiet};
    use std::time::Duration;

    #[test]
    fn quiet_periods() {
        assert_eq!(parse_quiet("off"), Ok(Quiet(None)));
        assert_eq!(parse_quiet("30s"), Ok(Quiet(Some(Duration::from_secs(30)))));
        assert_eq!(parse_quiet("12"), Ok(Quiet(Some(Duration::from_secs(12)))));
        assert_eq!(
            parse_quiet("250ms"),
            Ok(Quiet(Some(Duration::from_millis(250))))
        );
        assert_eq!(parse_quiet("2m"), Ok(Quiet(Some(Duration::from_secs(120)))));
        assert!(parse_quiet("soon").unwrap_err().contains("soon"));
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("50M"), Ok(50 << 20));
        assert_eq!(parse_bytes("512k"), Ok(512 << 10));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("fast").unwrap_err().contains("fast"));
        assert!(parse_bytes("99999999999999G").is_err());
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the hub: mirrors, journal, gRPC for nodes, admin HTTP.
    Hub(HubArgs),
    /// Run a node: sync local workspace directories with the hub.
    Node(NodeArgs),
    /// Show what the hub holds: workspaces, conflicts, counters.
    Status(StatusArgs),
    /// Purge mirrors whose session is not active (to the trash first), and
    /// empty the trash of entries past their retention.
    Purge(PurgeArgs),
    /// Confirm that an emptied or replaced workspace root is deliberate, so
    /// its deletions may propagate (the safety brake halted it).
    ConfirmEmpty(ConfirmArgs),
    /// Registry: sessions (workspaces), active or archived.
    Session(crate::registry_cmd::SessionArgs),
    /// Registry: agent templates.
    Template(crate::registry_cmd::TemplateArgs),
    /// Registry: agent instances, by node, session, template and status.
    Instance(crate::registry_cmd::InstanceArgs),
    /// Registry: the nodes that have attached to the hub.
    Nodes(crate::registry_cmd::NodesArgs),
    /// Per-node tokens: create (shown once), revoke, list. Needs the admin token.
    Token(crate::registry_cmd::TokenCmdArgs),
    /// Skills: the global skill registry every workspace sees under `.skills/`.
    Skill(crate::skill_cmd::SkillArgs),
}

/// Settings shared by hub and node scanning.
#[derive(Args, Clone)]
pub struct ScanArgs {
    /// Threads that hash file content (default: number of cores).
    #[arg(long, env = "GM_HASH_WORKERS")]
    pub hash_workers: Option<usize>,
    /// Threads that read directories and stat entries during a scan
    /// (default: twice the cores, at least 4; stats on a cold cache wait
    /// on the disk).
    #[arg(long, env = "GM_WALK_THREADS")]
    pub walk_threads: Option<usize>,
    /// Most file reads outstanding at once, over hashing and transfers
    /// (default: number of cores). Tune down on NFS.
    #[arg(long, env = "GM_IO_CONCURRENCY")]
    pub io_concurrency: Option<usize>,
    /// Most bytes read per second over hashing and transfers, e.g. `50M`
    /// (K, M, G are powers of 1024; 0 or unset: no limit).
    #[arg(long, env = "GM_READ_RATE_LIMIT", value_parser = parse_bytes)]
    pub read_rate_limit: Option<u64>,
    /// Cache records taken less than this long after a file's last change
    /// are verified again later (racily clean).
    #[arg(long, env = "GM_RACY_WINDOW_MS", default_value_t = 2000)]
    pub racy_window_ms: u64,
    /// Probe each root's filesystem at startup; where every write after a
    /// stat moves the ctime (Linux 6.13+ multigrain timestamps) no record
    /// is racy and the window does not apply. `false`: always the window.
    #[arg(long, env = "GM_RACY_PROBE", default_value_t = true, action = clap::ArgAction::Set)]
    pub racy_probe: bool,
    /// Quiet time after the last file event before changes are synced.
    #[arg(long, env = "GM_DEBOUNCE_MS", default_value_t = 30)]
    pub debounce_ms: u64,
    /// Longest a burst of file events may delay a sync.
    #[arg(long, env = "GM_DEBOUNCE_MAX_MS", default_value_t = 1000)]
    pub debounce_max_ms: u64,
    /// Full stat walk as a safety net under the watcher, in seconds.
    #[arg(long, env = "GM_RESCAN_INTERVAL", default_value_t = 600)]
    pub rescan_interval: u64,
    /// The full stat walk's interval, in seconds, while the watcher could
    /// not start or is past the inotify watch limit
    /// (`fs.inotify.max_user_watches`): changes in unwatched directories
    /// are seen this late.
    #[arg(long, env = "GM_UNWATCHED_RESCAN_INTERVAL", default_value_t = 30)]
    pub unwatched_rescan_interval: u64,
}

/// Parses a byte count with an optional K/M/G suffix (powers of 1024).
pub fn parse_bytes(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let (digits, factor) = match raw.chars().last() {
        Some('k' | 'K') => (&raw[..raw.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&raw[..raw.len() - 1], 1 << 20),
        Some('g' | 'G') => (&raw[..raw.len() - 1], 1 << 30),
        _ => (raw, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{raw:?} is not a byte count (e.g. 1048576, 512K, 50M, 2G)"))
}

impl ScanArgs {
    fn scan_config(&self) -> anyhow::Result<ScanConfig> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let workers = match self.hash_workers {
            Some(0) => bail!("GM_HASH_WORKERS / --hash-workers must be at least 1"),
            Some(n) => n,
            None => cores,
        };
        let walk_threads = match self.walk_threads {
            Some(0) => bail!("GM_WALK_THREADS / --walk-threads must be at least 1"),
            Some(n) => n,
            None => gm_fs::default_walk_threads(),
        };
        let io = match self.io_concurrency {
            Some(0) => bail!("GM_IO_CONCURRENCY / --io-concurrency must be at least 1"),
            Some(n) => n,
            None => cores,
        };
        Ok(ScanConfig {
            racy_window_ns: (self.racy_window_ms as i64).saturating_mul(1_000_000),
            racy_probe: self.racy_probe,
            hash_workers: workers,
            walk_threads,
            io: std::sync::Arc::new(gm_fs::IoGate::new(io, self.read_rate_limit)),
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.rescan_interval == 0 {
            bail!("GM_RESCAN_INTERVAL / --rescan-interval must be at least 1 second");
        }
        if self.unwatched_rescan_interval == 0 {
            bail!(
                "GM_UNWATCHED_RESCAN_INTERVAL / --unwatched-rescan-interval must be at least 1 second"
            );
        }
        if self.debounce_max_ms < self.debounce_ms {
            bail!("GM_DEBOUNCE_MAX_MS must not be below GM_DEBOUNCE_MS");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct HubArgs {
    /// Address for nodes (gRPC).
    #[arg(long, env = "GM_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address for /healthz and /metrics.
    #[arg(long, env = "GM_ADMIN_LISTEN", default_value = "127.0.0.1:7071")]
    pub admin_listen: SocketAddr,
    /// Where mirrors and state live (default: $XDG_DATA_HOME/ghostmirror or ~/.local/share/ghostmirror).
    #[arg(long, env = "GM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Token nodes must present; without it one is generated on first start
    /// and kept in DATA_DIR/token (mode 0600).
    #[arg(long, env = "GM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest file accepted from a node, in bytes (K, M, G suffixes).
    #[arg(long, env = "GM_MAX_FILE_SIZE", default_value = "64G", value_parser = parse_bytes)]
    pub max_file_size: u64,
    /// Staging entries older than this many seconds that no live transfer
    /// owns are removed (entries of earlier hubs go at start).
    #[arg(long, env = "GM_STAGING_TTL", default_value_t = 3600)]
    pub staging_ttl: u64,
    /// Ownership of what the hub writes: `on` gives each file the owner of
    /// its directory, `auto` does so until the first permission refusal
    /// (rootless containers), `off` never changes ownership.
    #[arg(long, env = "GM_CHOWN", default_value = "auto")]
    pub chown: gm_fs::ChownPolicy,
    /// The hub's TLS certificate chain (PEM); with --tls-key, nodes connect
    /// with https://.
    #[arg(long, env = "GM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "GM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "GM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address (a warning is logged).
    /// Without TLS the hub otherwise listens on loopback only.
    #[arg(long, env = "GM_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Seconds between orphan purge passes (mirrors whose session is not active).
    #[arg(long, env = "GM_PURGE_INTERVAL", default_value_t = 3600)]
    pub purge_interval: u64,
    /// Seconds a mirror must stay untouched before the purge may take it.
    #[arg(long, env = "GM_PURGE_GRACE", default_value_t = 86_400)]
    pub purge_grace: u64,
    /// Seconds purged mirrors stay in DATA_DIR/trash before they are deleted.
    #[arg(long, env = "GM_TRASH_RETENTION", default_value_t = 7 * 86_400)]
    pub trash_retention: u64,
    /// On SIGTERM/SIGINT, how many seconds in-flight transfers and commits
    /// get to finish before they are aborted.
    #[arg(long, env = "GM_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Keep the registry in PostgreSQL (postgres://user:password@host:port/db),
    /// e.g. for several hubs on one database; default: SQLite in DATA_DIR/state.db.
    #[arg(long, env = "GM_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A new directory under `.skills/` with a SKILL.md, unchanged this
    /// long, is promoted into the skill registry: `30s`, `500ms`, `2m`, a
    /// number of seconds, or `off` (only `ghostmirror skill promote`).
    #[arg(long, env = "GM_SKILL_PROMOTE_QUIET", default_value = "30s", value_parser = parse_quiet)]
    pub skill_promote_quiet: Quiet,
    /// Test builds only: abort at a named step (e.g. `promote:after-copy`),
    /// pause 3 s after the startup scan (`startup:pause-after-scan`), start
    /// without a watcher (`watch:fail`) or stop at N watches as if at the
    /// inotify limit (`watch:limit=N`). Release builds ignore it.
    #[arg(long, env = "GM_TEST_FAULT", hide = true)]
    pub test_fault: Option<String>,
    #[command(flatten)]
    pub scan: ScanArgs,
}

/// `GM_SKILL_PROMOTE_QUIET`: a duration, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quiet(pub Option<Duration>);

/// Parses `off`, `500ms`, `30s`, `2m` or a number of seconds.
pub fn parse_quiet(raw: &str) -> Result<Quiet, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("off") {
        return Ok(Quiet(None));
    }
    let bad = || format!("{raw:?} is not a duration (e.g. 500ms, 30s, 2m, or off)");
    let (digits, unit_ms) = if let Some(ms) = raw.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = raw.strip_suffix('s') {
        (s, 1000)
    } else if let Some(m) = raw.strip_suffix('m') {
        (m, 60_000)
    } else {
        (raw, 1000)
    };
    let value: u64 = digits.trim().parse().map_err(|_| bad())?;
    let ms = value.checked_mul(unit_ms).ok_or_else(bad)?;
    Ok(Quiet(Some(Duration::from_millis(ms))))
}

fn default_dir(xdg: &str, fallback: &str, name: &str) -> PathBuf {
    if let Some(base) = std::env::var_os(xdg).filter(|v| !v.is_empty()) {
        return PathBuf::from(base).join(name);
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(fallback).join(name),
        None => PathBuf::from(name),
    }
}

impl HubArgs {
    pub fn into_config(self) -> anyhow::Result<(gm_hub::HubConfig, SocketAddr, SocketAddr)> {
        self.scan.check()?;
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| default_dir("XDG_DATA_HOME", ".local/share", "ghostmirror"));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("create data dir {}", data_dir.display()))?;
        let token = match self.token.clone() {
            Some(token) if token.trim().is_empty() => bail!("GM_TOKEN / --token is empty"),
            Some(token) => token,
            None => load_or_create_token(&data_dir)?,
        };
        if self.max_file_size == 0 {
            bail!("GM_MAX_FILE_SIZE / --max-file-size must be above 0");
        }
        let database_url = match self.database_url.clone() {
            None => None,
            Some(url) if url.trim().is_empty() => None,
            Some(url) if gm_registry::Registry::is_postgres_url(&url) => Some(url),
            Some(url) => bail!(
                "GM_DATABASE_URL / --database-url {:?}: expected postgres://… (leave it unset for SQLite in the data dir)",
                gm_registry::redact_url(&url)
            ),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(gm_hub::ServerTls {
                cert_pem: read_pem(cert, "--tls-cert / GM_TLS_CERT")?,
                key_pem: read_pem(key, "--tls-key / GM_TLS_KEY")?,
                client_ca_pem: self
                    .tls_client_ca
                    .as_ref()
                    .map(|ca| read_pem(ca, "--tls-client-ca / GM_TLS_CLIENT_CA"))
                    .transpose()?,
            }),
            _ => None,
        };
        if tls.is_none() && !self.listen.ip().is_loopback() {
            if !self.allow_plaintext {
                bail!(
                    "refusing to serve plaintext on {} (not loopback): give --tls-cert/--tls-key (GM_TLS_CERT/GM_TLS_KEY), or --allow-plaintext (GM_ALLOW_PLAINTEXT) to accept the risk",
                    self.listen
                );
            }
            tracing::warn!(listen = %self.listen, "serving plaintext gRPC on a non-loopback address: tokens and content cross the network unencrypted");
        }
        let config = gm_hub::HubConfig {
            data_dir,
            token,
            scan: self.scan.scan_config()?,
            debounce: Duration::from_millis(self.scan.debounce_ms),
            debounce_max: Duration::from_millis(self.scan.debounce_max_ms),
            rescan_interval: Duration::from_secs(self.scan.rescan_interval),
            unwatched_rescan_interval: Duration::from_secs(self.scan.unwatched_rescan_interval),
            max_file_size: self.max_file_size,
            staging_ttl: Duration::from_secs(self.staging_ttl.max(1)),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            ownership: std::sync::Arc::new(gm_fs::Ownership::new(self.chown)),
            tls,
            purge_interval: Duration::from_secs(self.purge_interval.max(1)),
            purge_grace: Duration::from_secs(self.purge_grace),
            trash_retention: Duration::from_secs(self.trash_retention),
            database_url,
            skill_promote_quiet: self.skill_promote_quiet.0,
            test_fault: self.test_fault.clone().filter(|_| {
                if !cfg!(debug_assertions) {
                    tracing::warn!("GM_TEST_FAULT is ignored by release builds");
                }
                cfg!(debug_assertions)
            }),
        };
        Ok((config, self.listen, self.admin_listen))
    }
}

/// Reads a PEM file named by `what` (the flag and its variable).
pub fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{what}: read {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("{what}: {} is not PEM", path.display());
    }
    Ok(pem)
}

/// TLS settings of a client of the hub (node, status, admin commands).
#[derive(Args, Clone, Default)]
pub struct TlsClientArgs {
    /// CA certificate (PEM) that signed the hub's certificate; needed for an https:// hub.
    #[arg(long, env = "GM_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a hub that requires mutual TLS.
    #[arg(long, env = "GM_TLS_CLIENT_CERT", global = true)]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of --tls-client-cert (PEM).
    #[arg(long, env = "GM_TLS_CLIENT_KEY", global = true)]
    pub tls_client_key: Option<PathBuf>,
}

impl TlsClientArgs {
    pub fn load(&self) -> anyhow::Result<Option<gm_node::ClientTls>> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "--tls-client-cert / GM_TLS_CLIENT_CERT")?,
                read_pem(key, "--tls-client-key / GM_TLS_CLIENT_KEY")?,
            )),
            (None, None) => None,
            _ => bail!("--tls-client-cert and --tls-client-key go together"),
        };
        match &self.tls_ca {
            Some(ca) => Ok(Some(gm_node::ClientTls {
                ca_pem: read_pem(ca, "--tls-ca / GM_TLS_CA")?,
                identity,
            })),
            None if identity.is_some() => bail!("--tls-client-cert needs --tls-ca (the hub's CA)"),
            None => Ok(None),
        }
    }
}

/// Reads DATA_DIR/token, or creates it (mode 0600) with a random token.
fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => {
            tracing::info!(path = %path.display(), "using the token stored in the data dir");
            return Ok(token.trim().to_string());
        }
        Ok(_) => bail!(
            "token file {} is empty; delete it to generate a new token",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("read token file {}", path.display())),
    }
    let token = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create token file {}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write token file {}", path.display()))?;
    tracing::warn!(path = %path.display(), "no --token given: generated one; nodes need it (--token-file {})", path.display());
    Ok(token)
}

/// Token for a client command: `--token`, else the contents of `--token-file`.
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// Token the hub expects.
    #[arg(long, env = "GM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (e.g. the hub's DATA_DIR/token).
    #[arg(long, env = "GM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    pub fn resolve(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            if token.trim().is_empty() {
                bail!("GM_TOKEN / --token is empty");
            }
            return Ok(token.clone());
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("read token file {}", path.display()))?;
            if token.trim().is_empty() {
                bail!("token file {} is empty", path.display());
            }
            return Ok(token.trim().to_string());
        }
        bail!("no token: pass --token (GM_TOKEN) or --token-file (GM_TOKEN_FILE)")
    }
}

#[derive(Args)]
pub struct NodeArgs {
    /// Hub URL.
    #[arg(long, env = "GM_HUB", default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// This node's name (appears in conflict-copy names; default: host name).
    #[arg(long, env = "GM_NODE_ID")]
    pub node_id: Option<String>,
    /// Where the node keeps node.db (default: $XDG_STATE_HOME/ghostmirror-node or ~/.local/state/ghostmirror-node).
    #[arg(long, env = "GM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A workspace to sync: ID=PATH. Repeat for several (GM_WORKSPACES: comma-separated).
    #[arg(
        long = "workspace",
        env = "GM_WORKSPACES",
        value_delimiter = ',',
        required = true
    )]
    pub workspaces: Vec<String>,
    /// Reconcile both ways once, then exit: 0 when every workspace equals its mirror.
    #[arg(long, env = "GM_ONCE")]
    pub once: bool,
    /// With --once: how long to keep retrying an unreachable hub, in seconds.
    #[arg(long, env = "GM_ONCE_TIMEOUT", default_value_t = 120)]
    pub once_timeout: u64,
    /// Files up to this many bytes travel inline in commit batches (K, M, G
    /// suffixes as for --read-rate-limit).
    #[arg(long, env = "GM_INLINE_MAX", default_value_t = 1 << 20, value_parser = parse_bytes)]
    pub inline_max: u64,
    /// Inline bytes per commit batch.
    #[arg(long, env = "GM_BATCH_BYTES", default_value_t = 8 << 20, value_parser = parse_bytes)]
    pub batch_bytes: u64,
    /// A full round over more entries than this goes in slices of whole
    /// top-level directories, each scanned, planned and sent before the
    /// next: memory follows the slice, not the workspace.
    #[arg(long, env = "GM_SLICE_ENTRIES", default_value_t = 32_768)]
    pub slice_entries: u64,
    /// Local deletions are sent once no new deletion has been seen for this
    /// long (ms), so a root being emptied is caught whole by the safety brake.
    #[arg(long, env = "GM_DELETE_DELAY_MS", default_value_t = 1000)]
    pub delete_delay_ms: u64,
    /// What travels zstd-compressed: `metadata` (paths, hashes, journal
    /// events), `always` (file content too, where a sample says it pays:
    /// for slow links) or `never`.
    #[arg(long, env = "GM_COMPRESSION", value_enum, default_value_t = CompressionArg::Metadata)]
    pub compression: CompressionArg,
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Test builds only: start without a watcher (`watch:fail`), or stop at
    /// N watches as if at the inotify limit (`watch:limit=N`). Release
    /// builds ignore it.
    #[arg(long, env = "GM_TEST_FAULT", hide = true)]
    pub test_fault: Option<String>,
}

/// `GM_COMPRESSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    Never,
    Metadata,
    Always,
}

impl From<CompressionArg> for gm_node::Compression {
    fn from(arg: CompressionArg) -> Self {
        match arg {
            CompressionArg::Never => gm_node::Compression::Never,
            CompressionArg::Metadata => gm_node::Compression::Metadata,
            CompressionArg::Always => gm_node::Compression::Always,
        }
    }
}

fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "node".to_string()
    } else {
        cleaned
    }
}

impl NodeArgs {
    pub fn into_config(self) -> anyhow::Result<gm_node::NodeConfig> {
        self.scan.check()?;
        let node_id = self.node_id.clone().unwrap_or_else(host_name);
        let node_id =
            NodeId::new(&node_id).map_err(|e| anyhow::anyhow!("GM_NODE_ID / --node-id: {e}"))?;
        let mut workspaces = Vec::new();
        for spec in &self.workspaces {
            let Some((id, path)) = spec.split_once('=') else {
                bail!("--workspace {spec:?}: expected ID=PATH");
            };
            let id =
                WorkspaceId::new(id).map_err(|e| anyhow::anyhow!("--workspace {spec:?}: {e}"))?;
            if path.is_empty() {
                bail!("--workspace {spec:?}: the path is empty");
            }
            let path = PathBuf::from(path);
            if workspaces
                .iter()
                .any(|(other, _): &(WorkspaceId, PathBuf)| other == &id)
            {
                bail!("--workspace {id} is given twice");
            }
            workspaces.push((id, path));
        }
        if self.inline_max > 16 << 20 {
            bail!("GM_INLINE_MAX / --inline-max must be at most 16 MiB");
        }
        if self.batch_bytes == 0 || self.batch_bytes > 24 << 20 {
            bail!("GM_BATCH_BYTES / --batch-bytes must be between 1 and 24 MiB");
        }
        if self.slice_entries == 0 {
            bail!("GM_SLICE_ENTRIES / --slice-entries must be at least 1");
        }
        Ok(gm_node::NodeConfig {
            hub_url: self.hub.clone(),
            token: self.token.resolve()?,
            node_id,
            state_dir: self.state_dir.clone().unwrap_or_else(|| {
                default_dir("XDG_STATE_HOME", ".local/state", "ghostmirror-node")
            }),
            workspaces,
            once: self.once,
            scan: self.scan.scan_config()?,
            debounce: Duration::from_millis(self.scan.debounce_ms),
            debounce_max: Duration::from_millis(self.scan.debounce_max_ms),
            rescan_interval: Duration::from_secs(self.scan.rescan_interval),
            unwatched_rescan_interval: Duration::from_secs(self.scan.unwatched_rescan_interval),
            inline_max: self.inline_max,
            batch_bytes: self.batch_bytes,
            slice_entries: self.slice_entries,
            once_timeout: Duration::from_secs(self.once_timeout),
            delete_delay: Duration::from_millis(self.delete_delay_ms),
            compression: self.compression.into(),
            tls: self.tls.load()?,
            test_fault: self.test_fault.clone().filter(|_| {
                if !cfg!(debug_assertions) {
                    tracing::warn!("GM_TEST_FAULT is ignored by release builds");
                }
                cfg!(debug_assertions)
            }),
        })
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// Hub URL.
    #[arg(long, env = "GM_HUB", default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// Print JSON instead of a table.
    #[arg(long, env = "GM_JSON")]
    pub json: bool,
}

#[derive(Args)]
pub struct PurgeArgs {
    /// Hub URL.
    #[arg(long, env = "GM_HUB", default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// Say what would be purged, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of lines.
    #[arg(long, env = "GM_JSON")]
    pub json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["state_dir", "data_dir"])))]
pub struct ConfirmArgs {
    /// The workspace whose emptying (or replaced root) is deliberate.
    pub workspace: String,
    /// A node's state dir (the node's copy of the workspace was emptied).
    #[arg(long, env = "GM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The hub's data dir (the mirror was emptied).
    #[arg(long, env = "GM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ConfirmArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let id = WorkspaceId::new(&self.workspace)?;
        let found = match (&self.state_dir, &self.data_dir) {
            (Some(dir), _) => {
                let path = dir.join("node.db");
                if !path.exists() {
                    bail!(
                        "{} does not exist: is {} a node's state dir?",
                        path.display(),
                        dir.display()
                    );
                }
                gm_store::NodeDb::open(&path)?.request_confirm_empty(&id)?
            }
            (None, Some(dir)) => {
                let path = dir.join("state.db");
                if !path.exists() {
                    bail!(
                        "{} does not exist: is {} a hub's data dir?",
                        path.display(),
                        dir.display()
                    );
                }
                gm_store::HubDb::open(&path)?.request_confirm_empty(&id)?
            }
            (None, None) => bail!("pass --state-dir (node) or --data-dir (hub)"),
        };
        if !found {
            bail!("workspace {id} is not known there");
        }
        println!(
            "confirmed: the next sync of {id} propagates its current (empty or replaced) root"
        );
        Ok(())
    }
}
