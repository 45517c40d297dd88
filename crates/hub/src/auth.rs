//! Who is calling, checked on every gRPC call.
//!
//! - The admin: the hub's shared token (`--token`); may do everything.
//! - A node: its own token (`gmn.<node>.<secret>`, made by `ghostmirror token
//!   create`); may only act as that node and only on the workspaces granted
//!   to it; never on status, purge or the registry.
//!
//! Node tokens are checked against an in-memory copy of the registry's token
//! records (salted hashes, grants, revocations), refreshed every few
//! seconds and right after a token change through this hub, so a check never
//! waits for the database. Comparisons are constant-time.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use gm_core::{NodeId, WorkspaceId};
use gm_registry::{NodeAccess, Registry, RegistryError, parse_node_token};
use tonic::{Request, Status};

/// The caller of one request, put in the request's extensions.
#[derive(Debug, Clone)]
pub enum Principal {
    Admin,
    Node {
        node: NodeId,
        workspaces: Arc<BTreeSet<WorkspaceId>>,
    },
}

impl Principal {
    /// May this caller act as `node` (when the request names one) on `ws`?
    pub fn may_reach(&self, ws: &WorkspaceId, node: Option<&NodeId>) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Node {
                node: me,
                workspaces,
            } => {
                if let Some(claimed) = node
                    && claimed != me
                {
                    return Err(Status::permission_denied(format!(
                        "the token is node {me}'s; it cannot act as node {claimed}"
                    )));
                }
                if workspaces.contains(ws) {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "node {me} may not reach workspace {ws}: it is not granted to this node's token"
                    )))
                }
            }
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Node { node, .. } => Err(Status::permission_denied(format!(
                "{what} needs the admin token; node {node}'s token is not enough"
            ))),
        }
    }
}

/// The caller of `request`, as the interceptor recorded it.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no caller identity on this request"))
}

/// Compares in constant time, so a token cannot be guessed byte by byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct Access {
    admin_token: String,
    nodes: RwLock<HashMap<NodeId, NodeAccess>>,
}

impl Access {
    pub fn new(admin_token: String) -> Access {
        Access {
            admin_token,
            nodes: RwLock::new(HashMap::new()),
        }
    }

    /// Reloads node tokens from the registry.
    pub async fn refresh(&self, registry: &Registry) -> Result<(), RegistryError> {
        let records = registry.node_access().await?;
        let map = records.into_iter().map(|a| (a.node.clone(), a)).collect();
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Identifies the caller from its `authorization: Bearer <token>`.
    pub fn check<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let Some(value) = request.metadata().get(gm_proto::AUTH_HEADER) else {
            return Err(Status::unauthenticated(
                "no token: send `authorization: Bearer <token>`",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes()) {
            return Ok(Principal::Admin);
        }
        if let Some((node, secret)) = parse_node_token(presented) {
            let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
            if let Some(access) = nodes.get(&node) {
                if access.revoked {
                    return Err(Status::unauthenticated(format!(
                        "the hub refused the token: node {node}'s token was revoked"
                    )));
                }
                if access.verify(secret) {
                    return Ok(Principal::Node {
                        node,
                        workspaces: Arc::new(access.workspaces.clone()),
                    });
                }
            }
        }
        Err(Status::unauthenticated("the hub refused the token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_and_refusals() {
        let access = Access::new("s3cret".into());
        let mut request = Request::new(());
        assert_eq!(
            access.check(&request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        request
            .metadata_mut()
            .insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(
            access
                .check(&request)
                .unwrap_err()
                .message()
                .contains("refused the token")
        );
        request
            .metadata_mut()
            .insert("authorization", "Bearer gmn.laptop.abc".parse().unwrap());
        assert!(access.check(&request).is_err(), "unknown node token");
        request
            .metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(matches!(access.check(&request), Ok(Principal::Admin)));
    }

    #[test]
    fn node_principals_reach_only_their_workspaces() {
        let ws = |id: &str| WorkspaceId::new(id).unwrap();
        let me = NodeId::new("laptop").unwrap();
        let principal = Principal::Node {
            node: me.clone(),
            workspaces: Arc::new([ws("w1")].into_iter().collect()),
        };
        assert!(principal.may_reach(&ws("w1"), Some(&me)).is_ok());
        assert_eq!(
            principal
                .may_reach(&ws("w2"), Some(&me))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        let other = NodeId::new("desktop").unwrap();
        assert!(principal.may_reach(&ws("w1"), Some(&other)).is_err());
        assert!(principal.require_admin("status").is_err());
        assert!(Principal::Admin.may_reach(&ws("w2"), None).is_ok());
    }
}
