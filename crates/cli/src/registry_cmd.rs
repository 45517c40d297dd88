//! `ghostmirror session|template|instance|nodes`: the registry's admin
//! commands. Each is one call to the hub's registry service (same token as
//! sync), printed as a table or, with `--json`, as JSON. Lists are pages:
//! `--limit` and `--after <cursor>`, the cursor being the previous page's
//! `next_cursor`. Input is checked by the hub, whose errors name the field
//! and the value.

use clap::{Args, Subcommand};
use gm_proto::registry_pb as pb;
use pb::registry_client::RegistryClient;
use serde_json::{Value, json};

use crate::args::TokenArgs;

/// Where the hub is and how to talk to it; shared by every registry command
/// and accepted before or after the subcommand (`global`).
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Hub URL.
    #[arg(
        long,
        env = "GM_HUB",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub hub: String,
    /// Token the hub expects.
    #[arg(long, env = "GM_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the token (e.g. the hub's DATA_DIR/token).
    #[arg(long, env = "GM_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, env = "GM_JSON", global = true)]
    pub json: bool,
    #[command(flatten)]
    pub tls: crate::args::TlsClientArgs,
}

#[derive(Args, Clone)]
pub struct PageArgs {
    /// Rows per page (1 to 1000).
    #[arg(long, env = "GM_PAGE_LIMIT", default_value_t = 100)]
    pub limit: u32,
    /// Start after this cursor (the `next_cursor` of the previous page).
    #[arg(long, env = "GM_PAGE_AFTER")]
    pub after: Option<String>,
}

impl PageArgs {
    fn to_wire(&self) -> Option<pb::Page> {
        Some(pb::Page {
            limit: self.limit,
            after: self.after.clone().unwrap_or_default(),
        })
    }
}

#[derive(Args)]
pub struct SessionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SessionCommand,
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Register a session (workspace) as active. Attaching a node does this too.
    Create { id: String },
    /// List sessions in id order.
    List {
        /// Only sessions in this state: active or archived.
        #[arg(long, env = "GM_SESSION_STATE")]
        state: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Archive a session: its mirror becomes eligible for the orphan purge.
    Archive { id: String },
    /// Show a session and the nodes bound to it.
    Show { id: String },
}

#[derive(Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Create an agent template with a unique name.
    Create {
        name: String,
        /// Free text.
        #[arg(long, env = "GM_TEMPLATE_DESCRIPTION", default_value = "")]
        description: String,
        /// A JSON object, or @FILE to read one (default: {}).
        #[arg(long, env = "GM_TEMPLATE_CONFIG")]
        config: Option<String>,
    },
    /// List templates in name order.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show a template and its config.
    Show { name: String },
    /// Delete a template; refused while instances use it.
    Delete { name: String },
}

#[derive(Args)]
pub struct InstanceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: InstanceCommand,
}

#[derive(Subcommand)]
pub enum InstanceCommand {
    /// Create an agent instance of a template, on a node, in an active session.
    Create {
        /// Template name.
        #[arg(long, env = "GM_INSTANCE_TEMPLATE")]
        template: String,
        /// Mesh node id (a node that has attached to the hub).
        #[arg(long, env = "GM_INSTANCE_NODE")]
        node: String,
        /// Session (workspace) id.
        #[arg(long, env = "GM_INSTANCE_SESSION")]
        session: String,
        /// pending, running, stopped or failed.
        #[arg(long, env = "GM_INSTANCE_STATUS", default_value = "pending")]
        status: String,
        /// A JSON object, or @FILE to read one (default: {}).
        #[arg(long, env = "GM_INSTANCE_CONFIG")]
        config: Option<String>,
    },
    /// List instances in id order; each filter narrows the list.
    List {
        /// Only instances on this node.
        #[arg(long, env = "GM_FILTER_NODE")]
        node: Option<String>,
        /// Only instances in this session.
        #[arg(long, env = "GM_FILTER_SESSION")]
        session: Option<String>,
        /// Only instances of this template (name).
        #[arg(long, env = "GM_FILTER_TEMPLATE")]
        template: Option<String>,
        /// Only instances with this status.
        #[arg(long, env = "GM_FILTER_STATUS")]
        status: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show an instance and its config.
    Show { id: i64 },
    /// Set an instance's status: pending, running, stopped or failed.
    SetStatus { id: i64, status: String },
    /// Replace an instance's config with a JSON object (or @FILE).
    SetConfig { id: i64, config: String },
    /// Delete an instance.
    Delete { id: i64 },
}

#[derive(Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub page: PageArgs,
}

/// Adds the token to every call.
type Client = RegistryClient<crate::client::AuthedChannel>;

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    Ok(RegistryClient::new(channel(args).await?))
}

/// The authenticated channel to the hub named by `args`.
pub(crate) async fn channel(args: &ClientArgs) -> anyhow::Result<crate::client::AuthedChannel> {
    let token = TokenArgs {
        token: args.token.clone(),
        token_file: args.token_file.clone(),
    };
    crate::client::connect(&args.hub, &token, &args.tls).await
}

/// A failed call as the user should read it.
pub(crate) fn refused(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::InvalidArgument => anyhow::anyhow!("invalid input: {message}"),
        Code::NotFound | Code::AlreadyExists => anyhow::anyhow!("{message}"),
        Code::FailedPrecondition => anyhow::anyhow!("refused: {message}"),
        Code::Unauthenticated => anyhow::anyhow!("the hub refused the token: {message}"),
        Code::Unavailable => anyhow::anyhow!("hub or registry database unavailable: {message}"),
        Code::Aborted => anyhow::anyhow!("interrupted, nothing was changed: {message}"),
        code => anyhow::anyhow!("{code:?}: {message}"),
    }
}

/// `--config` text: inline JSON, or `@FILE`.
fn config_text(raw: &str) -> anyhow::Result<String> {
    match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--config @{path}: cannot read the file: {e}")),
        None => Ok(raw.to_string()),
    }
}

/// A registry time (ms since the epoch) as UTC to the second, for tables;
/// JSON output keeps the milliseconds.
pub(crate) fn time(ms: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The config as a JSON value (the hub sends a JSON object as text).
fn config_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn optional_cursor(cursor: &str) -> Value {
    if cursor.is_empty() {
        Value::Null
    } else {
        json!(cursor)
    }
}

pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_more(cursor: &str) {
    if !cursor.is_empty() {
        println!("more: --after {cursor}");
    }
}

fn session_json(s: &pb::Session) -> Value {
    json!({
        "id": s.id,
        "state": s.state,
        "created_unix_ms": s.created_unix_ms,
        "last_activity_unix_ms": s.last_activity_unix_ms,
        "archived_unix_ms": s.archived_unix_ms,
        "nodes": s.nodes.iter().map(|b| json!({
            "node_id": b.node_id,
            "first_seen_unix_ms": b.first_seen_unix_ms,
            "last_seen_unix_ms": b.last_seen_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

fn template_json(t: &pb::Template) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "description": t.description,
        "config": config_value(&t.config_json),
        "created_unix_ms": t.created_unix_ms,
        "updated_unix_ms": t.updated_unix_ms,
    })
}

fn instance_json(i: &pb::Instance) -> Value {
    json!({
        "id": i.id,
        "template_id": i.template_id,
        "template": i.template,
        "node_id": i.node_id,
        "session_id": i.session_id,
        "status": i.status,
        "config": config_value(&i.config_json),
        "created_unix_ms": i.created_unix_ms,
        "updated_unix_ms": i.updated_unix_ms,
    })
}

fn print_session(s: &pb::Session) {
    println!("session   {}", s.id);
    println!("state     {}", s.state);
    println!("created   {}", time(s.created_unix_ms));
    println!("activity  {}", time(s.last_activity_unix_ms));
    if let Some(ms) = s.archived_unix_ms {
        println!("archived  {}", time(ms));
    }
    if s.nodes.is_empty() {
        println!("nodes     (none)");
    }
    for (i, b) in s.nodes.iter().enumerate() {
        let label = if i == 0 { "nodes" } else { "" };
        println!(
            "{label:<9} {} (first {}, last {})",
            b.node_id,
            time(b.first_seen_unix_ms),
            time(b.last_seen_unix_ms)
        );
    }
}

fn print_template(t: &pb::Template) {
    println!("template     {} (id {})", t.name, t.id);
    println!("description  {}", t.description);
    println!("created      {}", time(t.created_unix_ms));
    println!(
        "config       {}",
        serde_json::to_string_pretty(&config_value(&t.config_json)).unwrap_or_default()
    );
}

fn print_instance(i: &pb::Instance) {
    println!("instance  {}", i.id);
    println!("template  {}", i.template);
    println!("node      {}", i.node_id);
    println!("session   {}", i.session_id);
    println!("status    {}", i.status);
    println!("created   {}", time(i.created_unix_ms));
    println!("updated   {}", time(i.updated_unix_ms));
    println!(
        "config    {}",
        serde_json::to_string_pretty(&config_value(&i.config_json)).unwrap_or_default()
    );
}

pub async fn run_session(args: SessionArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut client = connect(&args.client).await?;
    match args.command {
        SessionCommand::Create { id } => {
            let s = client
                .create_session(pb::SessionRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&session_json(&s))
            } else {
                println!("created session {} ({})", s.id, s.state);
                Ok(())
            }
        }
        SessionCommand::Archive { id } => {
            let s = client
                .archive_session(pb::SessionRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&session_json(&s))
            } else {
                println!("archived session {}", s.id);
                Ok(())
            }
        }
        SessionCommand::Show { id } => {
            let s = client
                .get_session(pb::SessionRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&session_json(&s))
            } else {
                print_session(&s);
                Ok(())
            }
        }
        SessionCommand::List { state, page } => {
            let got = client
                .list_sessions(pb::ListSessionsRequest {
                    state: state.unwrap_or_default(),
                    page: page.to_wire(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&json!({
                    "sessions": got.sessions.iter().map(session_json).collect::<Vec<_>>(),
                    "next_cursor": optional_cursor(&got.next_cursor),
                }));
            }
            println!(
                "{:<32} {:<9} {:<21} LAST ACTIVITY",
                "SESSION", "STATE", "CREATED"
            );
            for s in &got.sessions {
                println!(
                    "{:<32} {:<9} {:<21} {}",
                    s.id,
                    s.state,
                    time(s.created_unix_ms),
                    time(s.last_activity_unix_ms)
                );
            }
            print_more(&got.next_cursor);
            Ok(())
        }
    }
}

pub async fn run_template(args: TemplateArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut client = connect(&args.client).await?;
    match args.command {
        TemplateCommand::Create {
            name,
            description,
            config,
        } => {
            let config_json = config.as_deref().map(config_text).transpose()?;
            let t = client
                .create_template(pb::CreateTemplateRequest {
                    name,
                    description,
                    config_json,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&template_json(&t))
            } else {
                println!("created template {} (id {})", t.name, t.id);
                Ok(())
            }
        }
        TemplateCommand::Show { name } => {
            let t = client
                .get_template(pb::TemplateRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&template_json(&t))
            } else {
                print_template(&t);
                Ok(())
            }
        }
        TemplateCommand::Delete { name } => {
            client
                .delete_template(pb::TemplateRequest { name: name.clone() })
                .await
                .map_err(refused)?;
            if json {
                print_json(&json!({ "deleted": true, "name": name }))
            } else {
                println!("deleted template {name}");
                Ok(())
            }
        }
        TemplateCommand::List { page } => {
            let got = client
                .list_templates(pb::ListTemplatesRequest {
                    page: page.to_wire(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&json!({
                    "templates": got.templates.iter().map(template_json).collect::<Vec<_>>(),
                    "next_cursor": optional_cursor(&got.next_cursor),
                }));
            }
            println!(
                "{:<32} {:>8} {:<21} DESCRIPTION",
                "TEMPLATE", "ID", "CREATED"
            );
            for t in &got.templates {
                let description = t.description.lines().next().unwrap_or_default();
                println!(
                    "{:<32} {:>8} {:<21} {}",
                    t.name,
                    t.id,
                    time(t.created_unix_ms),
                    description
                );
            }
            print_more(&got.next_cursor);
            Ok(())
        }
    }
}

pub async fn run_instance(args: InstanceArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut client = connect(&args.client).await?;
    let one = |i: pb::Instance, verb: &str| -> anyhow::Result<()> {
        if json {
            print_json(&instance_json(&i))
        } else if verb.is_empty() {
            print_instance(&i);
            Ok(())
        } else {
            println!("{verb} instance {} ({}, {})", i.id, i.template, i.status);
            Ok(())
        }
    };
    match args.command {
        InstanceCommand::Create {
            template,
            node,
            session,
            status,
            config,
        } => {
            let config_json = config.as_deref().map(config_text).transpose()?;
            let i = client
                .create_instance(pb::CreateInstanceRequest {
                    template,
                    node_id: node,
                    session_id: session,
                    status,
                    config_json,
                })
                .await
                .map_err(refused)?
                .into_inner();
            one(i, "created")
        }
        InstanceCommand::Show { id } => {
            let i = client
                .get_instance(pb::InstanceRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            one(i, "")
        }
        InstanceCommand::SetStatus { id, status } => {
            let i = client
                .set_instance_status(pb::SetInstanceStatusRequest { id, status })
                .await
                .map_err(refused)?
                .into_inner();
            one(i, "updated")
        }
        InstanceCommand::SetConfig { id, config } => {
            let i = client
                .set_instance_config(pb::SetInstanceConfigRequest {
                    id,
                    config_json: config_text(&config)?,
                })
                .await
                .map_err(refused)?
                .into_inner();
            one(i, "updated")
        }
        InstanceCommand::Delete { id } => {
            client
                .delete_instance(pb::InstanceRequest { id })
                .await
                .map_err(refused)?;
            if json {
                print_json(&json!({ "deleted": true, "id": id }))
            } else {
                println!("deleted instance {id}");
                Ok(())
            }
        }
        InstanceCommand::List {
            node,
            session,
            template,
            status,
            page,
        } => {
            let got = client
                .list_instances(pb::ListInstancesRequest {
                    node_id: node.unwrap_or_default(),
                    session_id: session.unwrap_or_default(),
                    template: template.unwrap_or_default(),
                    status: status.unwrap_or_default(),
                    page: page.to_wire(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&json!({
                    "instances": got.instances.iter().map(instance_json).collect::<Vec<_>>(),
                    "next_cursor": optional_cursor(&got.next_cursor),
                }));
            }
            println!(
                "{:>8} {:<24} {:<20} {:<24} {:<8} UPDATED",
                "ID", "TEMPLATE", "NODE", "SESSION", "STATUS"
            );
            for i in &got.instances {
                println!(
                    "{:>8} {:<24} {:<20} {:<24} {:<8} {}",
                    i.id,
                    i.template,
                    i.node_id,
                    i.session_id,
                    i.status,
                    time(i.updated_unix_ms)
                );
            }
            print_more(&got.next_cursor);
            Ok(())
        }
    }
}

pub async fn run_nodes(args: NodesArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let got = client
        .list_nodes(pb::ListNodesRequest {
            page: args.page.to_wire(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    if args.client.json {
        return print_json(&json!({
            "nodes": got.nodes.iter().map(|n| json!({
                "id": n.id,
                "name": n.name,
                "created_unix_ms": n.created_unix_ms,
                "last_seen_unix_ms": n.last_seen_unix_ms,
            })).collect::<Vec<_>>(),
            "next_cursor": optional_cursor(&got.next_cursor),
        }));
    }
    println!("{:<32} {:<21} LAST SEEN", "NODE", "CREATED");
    for n in &got.nodes {
        println!(
            "{:<32} {:<21} {}",
            n.id,
            time(n.created_unix_ms),
            time(n.last_seen_unix_ms)
        );
    }
    print_more(&got.next_cursor);
    Ok(())
}

#[derive(Args)]
pub struct TokenCmdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create (or replace) a node's token, printed once; the hub keeps only a
    /// salted hash. The node may reach only the workspaces given here.
    Create {
        /// The node the token is for (its --node-id).
        #[arg(long)]
        node: String,
        /// A workspace the node may reach; repeat for several.
        #[arg(long = "workspace", required = true)]
        workspaces: Vec<String>,
    },
    /// Revoke a node's token: every call with it is refused from then on.
    Revoke {
        #[arg(long)]
        node: String,
    },
    /// List node tokens (never the tokens themselves).
    List,
}

/// `ghostmirror token create|revoke|list` (admin token required).
pub async fn run_token(args: TokenCmdArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut client = connect(&args.client).await?;
    match args.command {
        TokenCommand::Create { node, workspaces } => {
            let made = client
                .create_node_token(pb::CreateNodeTokenRequest { node, workspaces })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(
                    &json!({ "node": made.node, "token": made.token, "workspaces": made.workspaces }),
                )
            } else {
                println!("{}", made.token);
                eprintln!(
                    "token for node {} (workspaces: {}); it is shown only now",
                    made.node,
                    made.workspaces.join(", ")
                );
                Ok(())
            }
        }
        TokenCommand::Revoke { node } => {
            client
                .revoke_node_token(pb::RevokeNodeTokenRequest { node: node.clone() })
                .await
                .map_err(refused)?;
            if json {
                print_json(&json!({ "node": node, "revoked": true }))
            } else {
                println!("revoked the token of node {node}");
                Ok(())
            }
        }
        TokenCommand::List => {
            let list = client
                .list_node_tokens(pb::ListNodeTokensRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                print_json(&Value::Array(
                    list.tokens
                        .iter()
                        .map(|t| json!({ "node": t.node, "revoked": t.revoked, "workspaces": t.workspaces }))
                        .collect(),
                ))
            } else {
                println!("{:<24} {:<8} WORKSPACES", "NODE", "STATE");
                for t in &list.tokens {
                    let state = if t.revoked { "revoked" } else { "active" };
                    println!("{:<24} {:<8} {}", t.node, state, t.workspaces.join(","));
                }
                Ok(())
            }
        }
    }
}
