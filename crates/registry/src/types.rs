//! The registry's values: checked constructors for everything that comes
//! from a user or the wire (names, statuses, JSON configs, pages, cursors)
//! and the records the registry returns. No I/O.

use std::fmt;

use gm_core::{NodeId, WorkspaceId};

use crate::RegistryError;

/// Rows per page when the caller does not say.
pub const DEFAULT_PAGE: u32 = 100;
/// Most rows one page may hold.
pub const MAX_PAGE: u32 = 1000;
/// Largest JSON config, in bytes of its compact form.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Longest template description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4096;

/// What an agent instance is doing. A fixed set, checked on input and on
/// every row read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    Pending,
    Running,
    Stopped,
    Failed,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 4] = [
        InstanceStatus::Pending,
        InstanceStatus::Running,
        InstanceStatus::Stopped,
        InstanceStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Pending => "pending",
            InstanceStatus::Running => "running",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Failed => "failed",
        }
    }

    /// Parses a status; the error lists the allowed ones.
    pub fn parse(raw: &str) -> Result<Self, RegistryError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                let allowed: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
                RegistryError::invalid(
                    "status",
                    raw,
                    format!("unknown status; allowed: {}", allowed.join(", ")),
                )
            })
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a session's mirror is still wanted. An archived session is
/// eligible for the orphan purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    Active,
    Archived,
}

impl SessionState {
    pub const ALL: [SessionState; 2] = [SessionState::Active, SessionState::Archived];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Archived => "archived",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, RegistryError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                RegistryError::invalid("state", raw, "unknown state; allowed: active, archived")
            })
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A template's unique name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with
/// a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateName(String);

impl TemplateName {
    pub fn new(raw: &str) -> Result<Self, RegistryError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if raw.is_empty() || raw.len() > 64 {
            return Err(RegistryError::invalid(
                "template",
                raw,
                "a template name has 1 to 64 characters",
            ));
        }
        if !raw.chars().all(ok_char) || !raw.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(RegistryError::invalid(
                "template",
                raw,
                "a template name is made of A-Z a-z 0-9 . _ - and starts with a letter or digit",
            ));
        }
        Ok(TemplateName(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A template or instance config: always a JSON object. Each value owns
/// its map; there is no shared default (`JsonObject::empty()` makes a new
/// one, and a row inserted without a config gets the column's literal
/// default `'{}'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonObject(serde_json::Map<String, serde_json::Value>);

impl JsonObject {
    pub fn empty() -> Self {
        JsonObject(serde_json::Map::new())
    }

    /// Parses user or wire text; `field` names it in errors.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, RegistryError> {
        if raw.len() > MAX_CONFIG_BYTES {
            return Err(RegistryError::invalid(
                field,
                raw,
                format!("a config is at most {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| RegistryError::invalid(field, raw, format!("malformed JSON: {e}")))?;
        match value {
            serde_json::Value::Object(map) => Ok(JsonObject(map)),
            other => Err(RegistryError::invalid(
                field,
                raw,
                format!("must be a JSON object, not {}", json_kind(&other)),
            )),
        }
    }

    pub fn map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.0.clone())
    }

    /// Compact JSON text, keys sorted, so both backends render it alike.
    pub fn to_json(&self) -> String {
        serde_json::Value::Object(self.0.clone()).to_string()
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An agent instance's id (assigned by the database, never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub i64);

impl InstanceId {
    pub fn parse(raw: &str) -> Result<Self, RegistryError> {
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(InstanceId(id)),
            _ => Err(RegistryError::invalid(
                "id",
                raw,
                "an instance id is a positive integer",
            )),
        }
    }

    pub fn from_wire(raw: i64) -> Result<Self, RegistryError> {
        if raw > 0 {
            Ok(InstanceId(raw))
        } else {
            Err(RegistryError::invalid(
                "id",
                &raw.to_string(),
                "an instance id is a positive integer",
            ))
        }
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a cursor points into; a cursor from one list is refused by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CursorKind {
    Nodes,
    Sessions,
    Templates,
    Instances,
}

impl CursorKind {
    fn tag(self) -> &'static str {
        match self {
            CursorKind::Nodes => "n",
            CursorKind::Sessions => "s",
            CursorKind::Templates => "t",
            CursorKind::Instances => "i",
        }
    }
}

/// One page request: how many rows, and after which cursor. The cursor is
/// opaque to users (hex of `kind:last key`); its key is the last row's sort
/// key, so a page is one index range however deep it is (keyset paging).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    limit: u32,
    after: Option<String>,
}

impl Page {
    /// `limit` 0 means the default (100); above `MAX_PAGE` is refused. An
    /// empty `after` means the first page.
    pub fn new(limit: u32, after: &str) -> Result<Page, RegistryError> {
        if limit > MAX_PAGE {
            return Err(RegistryError::invalid(
                "limit",
                &limit.to_string(),
                format!("a page holds 1 to {MAX_PAGE} rows"),
            ));
        }
        let limit = if limit == 0 { DEFAULT_PAGE } else { limit };
        let after = if after.is_empty() {
            None
        } else {
            Some(after.to_string())
        };
        Ok(Page { limit, after })
    }

    pub fn first(limit: u32) -> Result<Page, RegistryError> {
        Page::new(limit, "")
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The key after which this page starts, checked against its list.
    pub(crate) fn after_key(&self, kind: CursorKind) -> Result<Option<String>, RegistryError> {
        let Some(raw) = &self.after else {
            return Ok(None);
        };
        let refuse =
            || RegistryError::invalid("after", raw, "not a cursor from a page of this list");
        if raw.len() % 2 != 0 || raw.len() > 1024 {
            return Err(refuse());
        }
        let bytes: Option<Vec<u8>> = (0..raw.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(raw.get(i..i + 2)?, 16).ok())
            .collect();
        let text = bytes
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(refuse)?;
        match text.split_once(':') {
            Some((tag, key)) if tag == kind.tag() && !key.is_empty() => Ok(Some(key.to_string())),
            _ => Err(refuse()),
        }
    }

    pub(crate) fn after_id(&self, kind: CursorKind) -> Result<i64, RegistryError> {
        match self.after_key(kind)? {
            None => Ok(0),
            Some(key) => key.parse::<i64>().map_err(|_| {
                RegistryError::invalid(
                    "after",
                    self.after.as_deref().unwrap_or_default(),
                    "not a cursor from a page of this list",
                )
            }),
        }
    }
}

pub(crate) fn encode_cursor(kind: CursorKind, key: &str) -> String {
    format!("{}:{key}", kind.tag())
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cursor that starts a page of instances just after `id` (for tests
/// and benchmarks that start in the middle of a list).
pub fn cursor_for_instance(id: InstanceId) -> String {
    encode_cursor(CursorKind::Instances, &id.0.to_string())
}

/// One page of results; `next_cursor` is set when more rows follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundNode {
    pub node: NodeId,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: WorkspaceId,
    pub state: SessionState,
    pub created_ms: i64,
    pub last_activity_ms: i64,
    pub archived_ms: Option<i64>,
    /// The nodes that attached this session; filled by `Registry::session`,
    /// empty in list pages.
    pub nodes: Vec<BoundNode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub id: i64,
    pub name: TemplateName,
    pub description: String,
    pub config: JsonObject,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: InstanceId,
    pub template_id: i64,
    pub template: TemplateName,
    pub node: NodeId,
    pub session: WorkspaceId,
    pub status: InstanceStatus,
    pub config: JsonObject,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A template to create. `config: None` leaves the column to its default,
/// a fresh `{}`.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    pub name: TemplateName,
    pub description: String,
    pub config: Option<JsonObject>,
}

impl NewTemplate {
    /// Checks the description (the name and config are checked types).
    pub fn new(
        name: TemplateName,
        description: &str,
        config: Option<JsonObject>,
    ) -> Result<NewTemplate, RegistryError> {
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(RegistryError::invalid(
                "description",
                description,
                format!("a description has at most {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }
        if description
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(RegistryError::invalid(
                "description",
                description,
                "control characters other than newline and tab are not allowed",
            ));
        }
        Ok(NewTemplate {
            name,
            description: description.to_string(),
            config,
        })
    }
}

/// An instance to create. `config: None` leaves the column to its default,
/// a fresh `{}`.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub template: TemplateName,
    pub node: NodeId,
    pub session: WorkspaceId,
    pub status: InstanceStatus,
    pub config: Option<JsonObject>,
}

/// Filters of `list_instances`; each one set narrows the list, and each is
/// served by its own index.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub node: Option<NodeId>,
    pub session: Option<WorkspaceId>,
    pub template: Option<TemplateName>,
    pub status: Option<InstanceStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(err: RegistryError) -> String {
        err.to_string()
    }

    #[test]
    fn status_errors_list_the_allowed_ones() {
        assert_eq!(
            InstanceStatus::parse("running").ok(),
            Some(InstanceStatus::Running)
        );
        let err = message(InstanceStatus::parse("runing").unwrap_err());
        assert!(err.contains("\"runing\""), "{err}");
        assert!(err.contains("pending, running, stopped, failed"), "{err}");
        for status in InstanceStatus::ALL {
            assert_eq!(InstanceStatus::parse(status.as_str()).ok(), Some(status));
        }
    }

    #[test]
    fn configs_must_be_json_objects() {
        let check = |raw: &str, accepted: bool| {
            assert_eq!(
                JsonObject::parse("config", raw).is_ok(),
                accepted,
                "{raw:?}"
            );
        };
        check("{}", true);
        check(r#"{"a": [1, 2], "b": {"c": null}}"#, true);
        check("[]", false);
        check("1", false);
        check("\"x\"", false);
        check("null", false);
        check("{", false);
        check("", false);
        check("{'a': 1}", false);
        let err = message(JsonObject::parse("config", "{oops").unwrap_err());
        assert!(err.starts_with("config \"{oops\": malformed JSON"), "{err}");
        let err = message(JsonObject::parse("config", "[1]").unwrap_err());
        assert!(err.contains("must be a JSON object, not an array"), "{err}");
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_CONFIG_BYTES));
        let err = message(JsonObject::parse("config", &big).unwrap_err());
        assert!(err.contains("at most") && err.len() < 400, "{err}");
    }

    #[test]
    fn fresh_empty_objects_are_independent() {
        let mut a = JsonObject::empty();
        let b = JsonObject::empty();
        a.0.insert("k".into(), serde_json::Value::Bool(true));
        assert_eq!(b.to_json(), "{}");
        assert_eq!(a.to_json(), r#"{"k":true}"#);
    }

    #[test]
    fn template_names() {
        for ok in ["a", "claude-coder", "v1.2_x", &"x".repeat(64)] {
            assert!(TemplateName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(TemplateName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_other_lists() {
        let cursor = encode_cursor(CursorKind::Instances, "42");
        let page = Page::new(10, &cursor).unwrap();
        assert_eq!(page.after_id(CursorKind::Instances).unwrap(), 42);
        assert!(page.after_key(CursorKind::Sessions).is_err());
        let session = encode_cursor(CursorKind::Sessions, "ws-1");
        assert_eq!(
            Page::new(0, &session)
                .unwrap()
                .after_key(CursorKind::Sessions)
                .unwrap()
                .as_deref(),
            Some("ws-1")
        );
        for bad in ["zz", "1", "00", &encode_cursor(CursorKind::Instances, "x")] {
            let page = Page::new(0, bad).unwrap();
            let err = page
                .after_id(CursorKind::Instances)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("after "), "{err}");
        }
        assert_eq!(Page::first(0).unwrap().limit(), DEFAULT_PAGE);
        assert!(Page::first(MAX_PAGE + 1).is_err());
    }

    #[test]
    fn descriptions() {
        let name = TemplateName::new("t").unwrap();
        assert!(NewTemplate::new(name.clone(), "line\nnext\ttab", None).is_ok());
        assert!(NewTemplate::new(name.clone(), "bell\u{7}", None).is_err());
        assert!(NewTemplate::new(name, &"d".repeat(MAX_DESCRIPTION_CHARS + 1), None).is_err());
    }
}
