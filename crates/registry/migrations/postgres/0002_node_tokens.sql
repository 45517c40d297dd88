-- Per-node tokens (PostgreSQL). migrations/sqlite/0002_node_tokens.sql is
-- the same history for SQLite.
--
-- A node's token is shown once, at creation; only a salted BLAKE3 hash is
-- kept. One token per node: creating a new one replaces the old.
CREATE TABLE registry_node_tokens (
    node_id TEXT PRIMARY KEY REFERENCES registry_nodes (id),
    salt TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);

-- The workspaces a node's token may reach.
CREATE TABLE registry_node_grants (
    node_id TEXT NOT NULL REFERENCES registry_nodes (id),
    workspace_id TEXT NOT NULL,
    PRIMARY KEY (node_id, workspace_id)
);
