-- Registry schema, version 1 (SQLite). migrations/postgres/0001_registry.sql
-- is the same history for PostgreSQL; a test checks that both lists match.
--
-- Every table is prefixed `registry_`: on SQLite these tables share
-- DATA_DIR/state.db with gm-store's sync tables.

-- Mesh nodes, keyed by the id a node presents (`--node-id`).
CREATE TABLE registry_nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    -- Per-node tokens are a later issue; NULL until then.
    token_hash TEXT
);

-- Sessions (workspaces), keyed by workspace id.
CREATE TABLE registry_sessions (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('active', 'archived')),
    created_ms INTEGER NOT NULL,
    last_activity_ms INTEGER NOT NULL,
    archived_ms INTEGER
);
-- `session list --state` and the active set read by the orphan purge.
CREATE INDEX registry_sessions_by_state ON registry_sessions (state, id);

-- Which nodes have attached a session.
CREATE TABLE registry_session_nodes (
    session_id TEXT NOT NULL REFERENCES registry_sessions (id) ON DELETE CASCADE,
    node_id TEXT NOT NULL REFERENCES registry_nodes (id),
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, node_id)
);
CREATE INDEX registry_session_nodes_by_node ON registry_session_nodes (node_id);

CREATE TABLE registry_templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    -- A literal default: every row gets its own '{}'.
    config TEXT NOT NULL DEFAULT '{}'
        CHECK (json_valid(config) AND json_type(config) = 'object'),
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE registry_instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- RESTRICT: a template that instances use cannot be deleted.
    template_id INTEGER NOT NULL REFERENCES registry_templates (id) ON DELETE RESTRICT,
    node_id TEXT NOT NULL REFERENCES registry_nodes (id),
    session_id TEXT NOT NULL REFERENCES registry_sessions (id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'stopped', 'failed')),
    config TEXT NOT NULL DEFAULT '{}'
        CHECK (json_valid(config) AND json_type(config) = 'object'),
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
-- One index per list filter, each ending in id: a page is
-- `filter = ? AND id > cursor ORDER BY id LIMIT n`, one index range, no sort.
CREATE INDEX registry_instances_by_node ON registry_instances (node_id, id);
CREATE INDEX registry_instances_by_session ON registry_instances (session_id, id);
CREATE INDEX registry_instances_by_template ON registry_instances (template_id, id);
CREATE INDEX registry_instances_by_status ON registry_instances (status, id);
