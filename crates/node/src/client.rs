//! The connection to the hub: one lazily connected channel shared by every
//! workspace, the token on every call, and the split of errors into
//! "retry with backoff" and "stop and tell the user".

use std::time::Duration;

use gm_proto::pb::sync_client::SyncClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::NodeConfig;

#[derive(Clone)]
pub struct TokenInterceptor {
    header: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(gm_proto::AUTH_HEADER, self.header.clone());
        Ok(request)
    }
}

pub type Client = SyncClient<InterceptedService<Channel, TokenInterceptor>>;

/// What travels zstd-compressed between a node and the hub. The node
/// decides for both directions: the hub compresses a response only when the
/// call accepts it, and chunks only when the request asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Nothing.
    Never,
    /// Paths, hashes and journal events; file content travels as it is.
    /// The default: on loopback or a LAN, compressing content costs more
    /// CPU time than it saves on the wire (Syncthing's default too).
    Metadata,
    /// Also file content: inline files, small-file downloads, and chunks
    /// where a sample of them says it pays (for slow links).
    Always,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Never => "never",
            Compression::Metadata => "metadata",
            Compression::Always => "always",
        }
    }

    /// Whether calls that carry only metadata (the journal stream) are
    /// compressed.
    pub fn metadata(self) -> bool {
        self != Compression::Never
    }

    /// Whether file content (chunks, downloads) is compressed.
    pub fn content(self) -> bool {
        self == Compression::Always
    }

    /// Whether a commit batch goes compressed: with `Metadata`, only while
    /// its inline content is smaller than its paths and hashes (estimated
    /// at 64 bytes an op), so a batch of small files is not compressed for
    /// a few paths' sake.
    pub fn commit(self, ops: usize, inline_bytes: u64) -> bool {
        match self {
            Compression::Never => false,
            Compression::Metadata => inline_bytes < ops as u64 * 64,
            Compression::Always => true,
        }
    }
}

/// `client`, sending and accepting zstd when `compress`.
pub fn compressed_if(client: &Client, compress: bool) -> Client {
    if !compress {
        return client.clone();
    }
    client
        .clone()
        .send_compressed(tonic::codec::CompressionEncoding::Zstd)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
}

pub fn connect(config: &NodeConfig) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(config.hub_url.clone())
        .map_err(|e| anyhow::anyhow!("hub address {:?} is not a valid URL: {e}", config.hub_url))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(gm_proto::STREAM_WINDOW)
        .initial_connection_window_size(gm_proto::CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    endpoint = with_tls(endpoint, &config.hub_url, config.tls.as_ref())?;
    let channel = endpoint.connect_lazy();
    let header = format!("Bearer {}", config.token).parse().map_err(|_| {
        anyhow::anyhow!("the token contains characters that cannot travel in a header")
    })?;
    Ok(
        SyncClient::with_interceptor(channel, TokenInterceptor { header })
            .max_decoding_message_size(gm_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(gm_proto::MAX_MESSAGE_BYTES),
    )
}

/// How a failed step ends.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Worth trying again later (hub unreachable, stream cut, disk busy).
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Needs a person (token refused, invalid setup).
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// The safety brake stopped this workspace.
    #[error("{0}")]
    Halted(String),
}

impl SyncError {
    pub fn from_status(status: Status, what: &str) -> SyncError {
        match status.code() {
            Code::Unauthenticated => SyncError::Fatal(anyhow::anyhow!(
                "the hub refused the token ({}); check --token / GM_TOKEN",
                status.message()
            )),
            Code::Unavailable => SyncError::Retry(anyhow::anyhow!(
                "{what}: hub unreachable: {}",
                status.message()
            )),
            Code::PermissionDenied => SyncError::Fatal(anyhow::anyhow!(
                "{what}: the hub refused: {}",
                status.message()
            )),
            Code::InvalidArgument if !status.message().contains("does not match") => {
                SyncError::Fatal(anyhow::anyhow!(
                    "{what}: the hub refused the request: {}",
                    status.message()
                ))
            }
            _ => SyncError::Retry(anyhow::anyhow!(
                "{what}: {} ({:?})",
                status.message(),
                status.code()
            )),
        }
    }
}

impl From<gm_store::StoreError> for SyncError {
    fn from(err: gm_store::StoreError) -> Self {
        SyncError::Fatal(err.into())
    }
}

impl From<gm_fs::FsError> for SyncError {
    fn from(err: gm_fs::FsError) -> Self {
        SyncError::Retry(err.into())
    }
}

impl From<tokio::task::JoinError> for SyncError {
    fn from(err: tokio::task::JoinError) -> Self {
        SyncError::Fatal(err.into())
    }
}

/// Applies TLS to an endpoint: an `https://` hub needs a CA to check it
/// against; plain `http://` takes none.
pub fn with_tls(
    endpoint: Endpoint,
    url: &str,
    tls: Option<&crate::ClientTls>,
) -> anyhow::Result<Endpoint> {
    let https = url.starts_with("https://");
    match (https, tls) {
        (false, None) => Ok(endpoint),
        (false, Some(_)) => {
            anyhow::bail!("TLS settings were given but the hub URL {url} is not https://")
        }
        (true, None) => anyhow::bail!(
            "the hub URL {url} is https://: give the CA that signed its certificate (--tls-ca / GM_TLS_CA)"
        ),
        (true, Some(tls)) => {
            let mut config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint
                .tls_config(config)
                .map_err(|e| anyhow::anyhow!("TLS setup for {url}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Compression;

    #[test]
    fn commit_batches_compress_as_the_setting_says() {
        // Metadata only: 100 ops of paths and hashes, no content.
        assert!(Compression::Metadata.commit(100, 0));
        // A few paths beside a lot of content: content wins, no zstd.
        assert!(!Compression::Metadata.commit(100, 1 << 20));
        assert!(!Compression::Metadata.commit(1, 64));
        assert!(Compression::Metadata.commit(1, 63));
        assert!(Compression::Always.commit(1, 1 << 20));
        assert!(!Compression::Never.commit(100, 0));
        assert!(Compression::Always.content());
        assert!(!Compression::Metadata.content());
        assert!(!Compression::Never.content());
    }
}
