//! The registry's gRPC surface (`ghostmirror.registry.v1.Registry`): checks
//! every wire value through gm-registry's constructors (errors name the
//! field and the value), calls the registry, and maps its errors to gRPC
//! statuses. Served beside the sync service, behind the same token check.

use std::sync::Arc;

use gm_core::{NodeId, WorkspaceId};
use gm_proto::registry_pb as pb;
use gm_registry::{
    Instance, InstanceFilter, InstanceId, InstanceStatus, JsonObject, NewInstance, NewTemplate,
    Page, Registry, RegistryError, Session, SessionState, Template, TemplateName,
};
use tonic::{Request, Response, Status};

pub struct RegistryService {
    pub registry: Arc<Registry>,
    /// Refreshed right after a token change, so it takes effect at once here.
    pub access: Arc<crate::auth::Access>,
}

/// The status a registry error becomes; database failures are logged here,
/// where they are handled.
pub fn status(err: RegistryError) -> Status {
    let message = err.to_string();
    match err {
        RegistryError::Invalid { .. } => Status::invalid_argument(message),
        RegistryError::NotFound { .. } => Status::not_found(message),
        RegistryError::AlreadyExists { .. } => Status::already_exists(message),
        RegistryError::Refused(_) => Status::failed_precondition(message),
        err if err.is_retryable() => {
            tracing::warn!(error = %message, "registry database unavailable");
            Status::unavailable(message)
        }
        _ => {
            tracing::error!(error = %message, "registry request failed");
            Status::internal(message)
        }
    }
}

fn page(wire: Option<pb::Page>) -> Result<Page, Status> {
    let wire = wire.unwrap_or_default();
    Page::new(wire.limit, &wire.after).map_err(status)
}

fn session_id(field: &str, raw: &str) -> Result<WorkspaceId, Status> {
    WorkspaceId::new(raw).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn node_id(field: &str, raw: &str) -> Result<NodeId, Status> {
    NodeId::new(raw).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// An optional filter: empty means unset.
fn optional<T>(
    raw: &str,
    parse: impl FnOnce(&str) -> Result<T, Status>,
) -> Result<Option<T>, Status> {
    if raw.is_empty() {
        Ok(None)
    } else {
        parse(raw).map(Some)
    }
}

fn session_to_wire(session: Session) -> pb::Session {
    pb::Session {
        id: session.id.to_string(),
        state: session.state.as_str().to_string(),
        created_unix_ms: session.created_ms,
        last_activity_unix_ms: session.last_activity_ms,
        archived_unix_ms: session.archived_ms,
        nodes: session
            .nodes
            .into_iter()
            .map(|b| pb::BoundNode {
                node_id: b.node.to_string(),
                first_seen_unix_ms: b.first_seen_ms,
                last_seen_unix_ms: b.last_seen_ms,
            })
            .collect(),
    }
}

fn template_to_wire(template: Template) -> pb::Template {
    pb::Template {
        id: template.id,
        name: template.name.to_string(),
        description: template.description,
        config_json: template.config.to_json(),
        created_unix_ms: template.created_ms,
        updated_unix_ms: template.updated_ms,
    }
}

fn instance_to_wire(instance: Instance) -> pb::Instance {
    pb::Instance {
        id: instance.id.0,
        template_id: instance.template_id,
        template: instance.template.to_string(),
        node_id: instance.node.to_string(),
        session_id: instance.session.to_string(),
        status: instance.status.as_str().to_string(),
        config_json: instance.config.to_json(),
        created_unix_ms: instance.created_ms,
        updated_unix_ms: instance.updated_ms,
    }
}

fn cursor(next: Option<String>) -> String {
    next.unwrap_or_default()
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let page = page(request.into_inner().page)?;
        let got = self.registry.list_nodes(&page).await.map_err(status)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: got
                .items
                .into_iter()
                .map(|n| pb::Node {
                    id: n.id.to_string(),
                    name: n.name,
                    created_unix_ms: n.created_ms,
                    last_seen_unix_ms: n.last_seen_ms,
                })
                .collect(),
            next_cursor: cursor(got.next_cursor),
        }))
    }

    async fn create_session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = session_id("id", &request.into_inner().id)?;
        let session = self.registry.create_session(&id).await.map_err(status)?;
        Ok(Response::new(session_to_wire(session)))
    }

    async fn get_session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = session_id("id", &request.into_inner().id)?;
        match self.registry.session(&id).await.map_err(status)? {
            Some(session) => Ok(Response::new(session_to_wire(session))),
            None => Err(Status::not_found(format!(
                "unknown session {:?}",
                id.as_str()
            ))),
        }
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let req = request.into_inner();
        let state = optional(&req.state, |raw| SessionState::parse(raw).map_err(status))?;
        let page = page(req.page)?;
        let got = self
            .registry
            .list_sessions(state, &page)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: got.items.into_iter().map(session_to_wire).collect(),
            next_cursor: cursor(got.next_cursor),
        }))
    }

    async fn archive_session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = session_id("id", &request.into_inner().id)?;
        let session = self.registry.archive_session(&id).await.map_err(status)?;
        Ok(Response::new(session_to_wire(session)))
    }

    async fn create_template(
        &self,
        request: Request<pb::CreateTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let req = request.into_inner();
        let name = TemplateName::new(&req.name).map_err(status)?;
        let config = req
            .config_json
            .as_deref()
            .map(|raw| JsonObject::parse("config", raw))
            .transpose()
            .map_err(status)?;
        let new = NewTemplate::new(name, &req.description, config).map_err(status)?;
        let template = self.registry.create_template(&new).await.map_err(status)?;
        Ok(Response::new(template_to_wire(template)))
    }

    async fn get_template(
        &self,
        request: Request<pb::TemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let name = TemplateName::new(&request.into_inner().name).map_err(status)?;
        match self.registry.template(&name).await.map_err(status)? {
            Some(template) => Ok(Response::new(template_to_wire(template))),
            None => Err(Status::not_found(format!(
                "unknown template {:?}",
                name.as_str()
            ))),
        }
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let page = page(request.into_inner().page)?;
        let got = self.registry.list_templates(&page).await.map_err(status)?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: got.items.into_iter().map(template_to_wire).collect(),
            next_cursor: cursor(got.next_cursor),
        }))
    }

    async fn delete_template(
        &self,
        request: Request<pb::TemplateRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let name = TemplateName::new(&request.into_inner().name).map_err(status)?;
        self.registry.delete_template(&name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_instance(
        &self,
        request: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let req = request.into_inner();
        let new = NewInstance {
            template: TemplateName::new(&req.template).map_err(status)?,
            node: node_id("node_id", &req.node_id)?,
            session: session_id("session_id", &req.session_id)?,
            status: if req.status.is_empty() {
                InstanceStatus::Pending
            } else {
                InstanceStatus::parse(&req.status).map_err(status)?
            },
            config: req
                .config_json
                .as_deref()
                .map(|raw| JsonObject::parse("config", raw))
                .transpose()
                .map_err(status)?,
        };
        let instance = self.registry.create_instance(&new).await.map_err(status)?;
        Ok(Response::new(instance_to_wire(instance)))
    }

    async fn get_instance(
        &self,
        request: Request<pb::InstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let id = InstanceId::from_wire(request.into_inner().id).map_err(status)?;
        match self.registry.instance(id).await.map_err(status)? {
            Some(instance) => Ok(Response::new(instance_to_wire(instance))),
            None => Err(Status::not_found(format!("unknown instance {id}"))),
        }
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let req = request.into_inner();
        let filter = InstanceFilter {
            node: optional(&req.node_id, |raw| node_id("node_id", raw))?,
            session: optional(&req.session_id, |raw| session_id("session_id", raw))?,
            template: optional(&req.template, |raw| TemplateName::new(raw).map_err(status))?,
            status: optional(&req.status, |raw| {
                InstanceStatus::parse(raw).map_err(status)
            })?,
        };
        let page = page(req.page)?;
        let got = self
            .registry
            .list_instances(&filter, &page)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: got.items.into_iter().map(instance_to_wire).collect(),
            next_cursor: cursor(got.next_cursor),
        }))
    }

    async fn set_instance_status(
        &self,
        request: Request<pb::SetInstanceStatusRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let req = request.into_inner();
        let id = InstanceId::from_wire(req.id).map_err(status)?;
        let new_status = InstanceStatus::parse(&req.status).map_err(status)?;
        let instance = self
            .registry
            .set_instance_status(id, new_status)
            .await
            .map_err(status)?;
        Ok(Response::new(instance_to_wire(instance)))
    }

    async fn set_instance_config(
        &self,
        request: Request<pb::SetInstanceConfigRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let req = request.into_inner();
        let id = InstanceId::from_wire(req.id).map_err(status)?;
        let config = JsonObject::parse("config", &req.config_json).map_err(status)?;
        let instance = self
            .registry
            .set_instance_config(id, &config)
            .await
            .map_err(status)?;
        Ok(Response::new(instance_to_wire(instance)))
    }

    async fn delete_instance(
        &self,
        request: Request<pb::InstanceRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = InstanceId::from_wire(request.into_inner().id).map_err(status)?;
        self.registry.delete_instance(id).await.map_err(status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_node_token(
        &self,
        request: Request<pb::CreateNodeTokenRequest>,
    ) -> Result<Response<pb::NodeToken>, Status> {
        let req = request.into_inner();
        let node = node_id("node", &req.node)?;
        if req.workspaces.is_empty() {
            return Err(Status::invalid_argument(
                "a node token needs at least one workspace (--workspace)",
            ));
        }
        let workspaces = req
            .workspaces
            .iter()
            .map(|w| session_id("workspaces", w))
            .collect::<Result<Vec<_>, _>>()?;
        let made = self
            .registry
            .create_node_token(&node, &workspaces)
            .await
            .map_err(status)?;
        self.access.refresh(&self.registry).await.map_err(status)?;
        Ok(Response::new(pb::NodeToken {
            node: made.node.to_string(),
            token: made.token,
            workspaces: made.workspaces.iter().map(|w| w.to_string()).collect(),
        }))
    }

    async fn revoke_node_token(
        &self,
        request: Request<pb::RevokeNodeTokenRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let node = node_id("node", &request.into_inner().node)?;
        self.registry
            .revoke_node_token(&node)
            .await
            .map_err(status)?;
        self.access.refresh(&self.registry).await.map_err(status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list_node_tokens(
        &self,
        _request: Request<pb::ListNodeTokensRequest>,
    ) -> Result<Response<pb::ListNodeTokensResponse>, Status> {
        let records = self.registry.node_access().await.map_err(status)?;
        Ok(Response::new(pb::ListNodeTokensResponse {
            tokens: records
                .into_iter()
                .map(|a| pb::NodeTokenInfo {
                    node: a.node.to_string(),
                    revoked: a.revoked,
                    workspaces: a.workspaces.iter().map(|w| w.to_string()).collect(),
                })
                .collect(),
        }))
    }
}
