//! Per-node tokens and what they may reach.
//!
//! A token is `gmn.<node>.<secret>`: the node id lets the hub find the
//! token's record directly; the secret is 32 random bytes, shown once at
//! creation. Only a salted BLAKE3 hash of the secret is stored, and
//! `NodeAccess::verify` compares in constant time (BLAKE3 hash equality is
//! constant-time). A node's token reaches only the workspaces granted to
//! it; creating a new token for a node replaces the old one; a revoked
//! token is refused.

use std::collections::BTreeSet;

use gm_core::{NodeId, WorkspaceId};

use crate::{Registry, RegistryError, now_ms, on_pool};

/// A token just created: the only time its secret exists in clear.
#[derive(Debug, Clone)]
pub struct NewNodeToken {
    pub node: NodeId,
    pub token: String,
    pub workspaces: Vec<WorkspaceId>,
}

/// What the hub keeps in memory to check node tokens without a query per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccess {
    pub node: NodeId,
    salt: [u8; 32],
    hash: [u8; 32],
    pub revoked: bool,
    pub workspaces: BTreeSet<WorkspaceId>,
}

const PREFIX: &str = "gmn.";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn digest(salt: &[u8; 32], secret: &str) -> blake3::Hash {
    blake3::keyed_hash(salt, secret.as_bytes())
}

/// Splits a presented token into the node it names and its secret.
pub fn parse_node_token(token: &str) -> Option<(NodeId, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (node, secret) = rest.rsplit_once('.')?;
    Some((NodeId::new(node).ok()?, secret))
}

impl NodeAccess {
    /// True when `secret` is this node's live token secret.
    pub fn verify(&self, secret: &str) -> bool {
        !self.revoked && digest(&self.salt, secret) == blake3::Hash::from(self.hash)
    }
}

impl Registry {
    /// Creates (or replaces) `node`'s token, granting it `workspaces`.
    /// Returns the token; only its hash is stored.
    pub async fn create_node_token(
        &self,
        node: &NodeId,
        workspaces: &[WorkspaceId],
    ) -> Result<NewNodeToken, RegistryError> {
        let salt: [u8; 32] = rand::random();
        let secret = hex(&rand::random::<[u8; 32]>());
        let hash = digest(&salt, &secret);
        let now = now_ms();
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO registry_nodes (id, name, created_ms, last_seen_ms) VALUES ($1, $1, $2, $2) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(node.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO registry_node_tokens (node_id, salt, hash, created_ms, revoked_ms) \
                 VALUES ($1, $2, $3, $4, NULL) \
                 ON CONFLICT (node_id) DO UPDATE SET salt = excluded.salt, hash = excluded.hash, \
                 created_ms = excluded.created_ms, revoked_ms = NULL",
            )
            .bind(node.as_str())
            .bind(hex(&salt))
            .bind(hash.to_hex().to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM registry_node_grants WHERE node_id = $1")
                .bind(node.as_str())
                .execute(&mut *tx)
                .await?;
            for ws in workspaces {
                sqlx::query(
                    "INSERT INTO registry_node_grants (node_id, workspace_id) VALUES ($1, $2) \
                     ON CONFLICT (node_id, workspace_id) DO NOTHING",
                )
                .bind(node.as_str())
                .bind(ws.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.db())?;
        tracing::info!(node = %node, workspaces = workspaces.len(), "node token created");
        Ok(NewNodeToken {
            node: node.clone(),
            token: format!("{PREFIX}{node}.{secret}"),
            workspaces: workspaces.to_vec(),
        })
    }

    /// Revokes `node`'s token. Errors when the node has none.
    pub async fn revoke_node_token(&self, node: &NodeId) -> Result<(), RegistryError> {
        let changed = on_pool!(self, pool => sqlx::query(
            "UPDATE registry_node_tokens SET revoked_ms = $2 WHERE node_id = $1",
        )
        .bind(node.as_str())
        .bind(now_ms())
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(self.db())?;
        if changed == 0 {
            return Err(RegistryError::NotFound {
                what: "node token",
                key: node.to_string(),
            });
        }
        tracing::info!(node = %node, "node token revoked");
        Ok(())
    }

    /// Every node token record with its grants (revoked ones included, so
    /// a hub that cached a token learns of its revocation).
    pub async fn node_access(&self) -> Result<Vec<NodeAccess>, RegistryError> {
        type TokenRow = (String, String, String, Option<i64>);
        let (tokens, grants): (Vec<TokenRow>, Vec<(String, String)>) = on_pool!(self, pool => async {
            let tokens: Vec<TokenRow> = sqlx::query_as(
                "SELECT node_id, salt, hash, revoked_ms FROM registry_node_tokens ORDER BY node_id",
            )
            .fetch_all(pool)
            .await?;
            let grants: Vec<(String, String)> = sqlx::query_as(
                "SELECT node_id, workspace_id FROM registry_node_grants ORDER BY node_id, workspace_id",
            )
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((tokens, grants))
        }.await)
        .map_err(self.db())?;
        let mut out = Vec::with_capacity(tokens.len());
        for (node, salt, hash, revoked) in tokens {
            let node_id =
                NodeId::new(&node).map_err(|e| self.corrupt(format!("node token: {e}")))?;
            let salt = unhex32(&salt)
                .ok_or_else(|| self.corrupt(format!("node token {node}: bad salt")))?;
            let hash = unhex32(&hash)
                .ok_or_else(|| self.corrupt(format!("node token {node}: bad hash")))?;
            let workspaces = grants
                .iter()
                .filter(|(n, _)| *n == node)
                .map(|(_, ws)| {
                    WorkspaceId::new(ws).map_err(|e| self.corrupt(format!("grant: {e}")))
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            out.push(NodeAccess {
                node: node_id,
                salt,
                hash,
                revoked: revoked.is_some(),
                workspaces,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format_and_hex() {
        let (node, secret) = parse_node_token("gmn.laptop-1.abcdef").unwrap();
        assert_eq!((node.as_str(), secret), ("laptop-1", "abcdef"));
        assert!(parse_node_token("gmn.bad node.x").is_none());
        assert!(parse_node_token("admin-token").is_none());
        let bytes = [7u8; 32];
        assert_eq!(unhex32(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex32("zz"), None);
    }
}
