-- Registry schema, version 3 (SQLite): the global skill registry.
-- migrations/postgres/0003_skills.sql is the same history for PostgreSQL.
--
-- A row is the name's reservation: it is inserted (state 'reserved', with
-- the content hash the skill will have) before any file is copied, so a
-- name is taken in the database, not by what a filesystem shows. The hub
-- then copies the content into DATA_DIR/skills/<name>/ and marks the row
-- 'active'; a crash in between is finished or rolled back at the next
-- start by the hub named in hub_id. A removed skill keeps its row ('removed')
-- and its name may be registered again (version + 1).
CREATE TABLE registry_skills (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'active', 'removed')),
    origin TEXT NOT NULL CHECK (origin IN ('system', 'promoted')),
    -- Promoted skills: the workspace and the node the directory came from
    -- ('hub' when a hub-side tool wrote it). NULL for system skills.
    origin_workspace TEXT,
    origin_node TEXT,
    version INTEGER NOT NULL CHECK (version >= 1),
    -- Hex BLAKE3 of the skill tree (gm_core::SkillTree::hash).
    content_hash TEXT NOT NULL,
    -- The hub whose data dir holds (or is copying) the content.
    hub_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    CHECK ((origin = 'system') = (origin_workspace IS NULL))
);
-- `skill list` by state, and the reservations a starting hub recovers.
CREATE INDEX registry_skills_by_state ON registry_skills (state, name);
