//! The connection every admin command opens to the hub: one channel, the
//! token on every call, and errors a user can act on.

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::args::{TlsClientArgs, TokenArgs};

/// Puts the token on every call.
#[derive(Clone)]
pub struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(gm_proto::AUTH_HEADER, self.0.clone());
        Ok(request)
    }
}

pub type AuthedChannel = InterceptedService<Channel, Auth>;

/// Connects to `hub` with the token from `token`, over TLS when the URL is
/// https://.
pub async fn connect(
    hub: &str,
    token: &TokenArgs,
    tls: &TlsClientArgs,
) -> anyhow::Result<AuthedChannel> {
    let token = token.resolve()?;
    let endpoint = Endpoint::from_shared(hub.to_string())
        .map_err(|e| anyhow::anyhow!("hub address {hub:?} is not a valid URL: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = gm_node::with_tls(endpoint, hub, tls.load()?.as_ref())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("hub unreachable at {hub}: {e}"))?;
    let header = format!("Bearer {token}").parse().map_err(|_| {
        anyhow::anyhow!("the token contains characters that cannot travel in a header")
    })?;
    Ok(InterceptedService::new(channel, Auth(header)))
}

/// A failed call as the user should read it.
pub fn refused(what: &str, status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated => {
            anyhow::anyhow!("the hub refused the token: {}", status.message())
        }
        tonic::Code::Unavailable => {
            anyhow::anyhow!("{what}: hub unavailable: {}", status.message())
        }
        _ => anyhow::anyhow!("{what} failed: {}", status.message()),
    }
}
