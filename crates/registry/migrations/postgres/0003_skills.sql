-- Registry schema, version 3 (PostgreSQL): the global skill registry.
-- migrations/sqlite/0003_skills.sql is the same history for SQLite, with
-- the comments that explain the columns.
CREATE TABLE registry_skills (
    name TEXT COLLATE "C" PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'active', 'removed')),
    origin TEXT NOT NULL CHECK (origin IN ('system', 'promoted')),
    origin_workspace TEXT COLLATE "C",
    origin_node TEXT COLLATE "C",
    version BIGINT NOT NULL CHECK (version >= 1),
    content_hash TEXT NOT NULL,
    hub_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    CHECK ((origin = 'system') = (origin_workspace IS NULL))
);
CREATE INDEX registry_skills_by_state ON registry_skills (state, name);
