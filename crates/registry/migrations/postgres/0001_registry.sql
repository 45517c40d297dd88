-- Registry schema, version 1 (PostgreSQL). migrations/sqlite/0001_registry.sql
-- is the same history for SQLite; a test checks that both lists match.
--
-- Key columns are COLLATE "C" so that keyset pages order ids byte-wise, as
-- SQLite does, whatever the database's default collation.

CREATE TABLE registry_nodes (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    token_hash TEXT
);

CREATE TABLE registry_sessions (
    id TEXT COLLATE "C" PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('active', 'archived')),
    created_ms BIGINT NOT NULL,
    last_activity_ms BIGINT NOT NULL,
    archived_ms BIGINT
);
CREATE INDEX registry_sessions_by_state ON registry_sessions (state, id);

CREATE TABLE registry_session_nodes (
    session_id TEXT COLLATE "C" NOT NULL REFERENCES registry_sessions (id) ON DELETE CASCADE,
    node_id TEXT COLLATE "C" NOT NULL REFERENCES registry_nodes (id),
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    PRIMARY KEY (session_id, node_id)
);
CREATE INDEX registry_session_nodes_by_node ON registry_session_nodes (node_id);

CREATE TABLE registry_templates (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    -- A literal default: every row gets its own '{}'.
    config JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE registry_instances (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    template_id BIGINT NOT NULL REFERENCES registry_templates (id) ON DELETE RESTRICT,
    node_id TEXT COLLATE "C" NOT NULL REFERENCES registry_nodes (id),
    session_id TEXT COLLATE "C" NOT NULL REFERENCES registry_sessions (id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'stopped', 'failed')),
    config JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX registry_instances_by_node ON registry_instances (node_id, id);
CREATE INDEX registry_instances_by_session ON registry_instances (session_id, id);
CREATE INDEX registry_instances_by_template ON registry_instances (template_id, id);
CREATE INDEX registry_instances_by_status ON registry_instances (status, id);
