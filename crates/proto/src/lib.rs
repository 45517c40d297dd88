//! The wire: generated gRPC code for `proto/ghostmirror.proto` (sync,
//! `pb`), `proto/registry.proto` (registry admin, `registry_pb`) and
//! `proto/skills.proto` (skill registry admin, `skills_pb`), and the
//! conversions between sync messages and `gm_core` types. Registry wire
//! values are checked by gm-registry's constructors (in gm-hub), so that
//! this crate, which nodes link, does not depend on the registry.
//!
//! Guarantee: a wire value becomes a core type only through a checked
//! conversion here (`path`, `entry`, `path_state`), whose error names the
//! field and the value that is wrong. Nothing outside this crate touches
//! prost types' internals for validation.

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("ghostmirror.v1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod registry_pb {
    tonic::include_proto!("ghostmirror.registry.v1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod skills_pb {
    tonic::include_proto!("ghostmirror.skills.v1");
}

use gm_core::{ContentHash, Entry, RelPath, Seq, Versioned};

/// Largest message either side accepts; inline batches stay well under it.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// HTTP/2 flow control: how much one stream may have in flight before the
/// receiver acknowledges it. The h2 default (64 KiB) caps a single upload on
/// loopback at a few tens of MiB/s; this keeps a whole batch of chunks in
/// flight while still bounding what one stream can make the receiver buffer.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow control for the whole connection (all streams of one node).
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame the hub accepts (a 256 KiB chunk is one frame, not 16).
pub const MAX_FRAME: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad path: {0}")]
    Path(#[from] gm_core::PathError),
    #[error("bad hash for {path:?}: {source}")]
    Hash {
        path: String,
        source: gm_core::hash::HashLengthError,
    },
    #[error("entry for {0:?} has no kind")]
    NoKind(String),
    #[error("bad symlink {path:?}: {reason}")]
    Symlink { path: String, reason: String },
}

/// Validates a path from the wire.
pub fn path(raw: &str) -> Result<RelPath, WireError> {
    Ok(RelPath::new(raw)?)
}

/// Converts a wire entry; `path` only names the entry in errors.
pub fn entry(path: &str, wire: &pb::Entry) -> Result<Entry, WireError> {
    match &wire.kind {
        Some(pb::entry::Kind::File(file)) => Ok(Entry::File {
            hash: ContentHash::from_slice(&file.hash).map_err(|source| WireError::Hash {
                path: path.to_string(),
                source,
            })?,
            size: file.size,
            executable: file.executable,
        }),
        Some(pb::entry::Kind::Dir(_)) => Ok(Entry::Dir),
        Some(pb::entry::Kind::Symlink(link)) => {
            gm_core::entry::check_symlink_target(&link.target).map_err(|reason| {
                WireError::Symlink {
                    path: path.to_string(),
                    reason,
                }
            })?;
            Ok(Entry::Symlink {
                target: link.target.clone(),
            })
        }
        None => Err(WireError::NoKind(path.to_string())),
    }
}

pub fn entry_to_wire(entry: &Entry) -> pb::Entry {
    let kind = match entry {
        Entry::File {
            hash,
            size,
            executable,
        } => pb::entry::Kind::File(pb::FileEntry {
            hash: hash.as_bytes().to_vec(),
            size: *size,
            executable: *executable,
        }),
        Entry::Dir => pb::entry::Kind::Dir(pb::DirEntry {}),
        Entry::Symlink { target } => pb::entry::Kind::Symlink(pb::SymlinkEntry {
            target: target.clone(),
        }),
    };
    pb::Entry { kind: Some(kind) }
}

/// Converts a wire path state.
pub fn path_state(wire: &pb::PathState) -> Result<(RelPath, Versioned), WireError> {
    let rel = path(&wire.path)?;
    let entry = match &wire.entry {
        Some(e) => Some(entry(&wire.path, e)?),
        None => None,
    };
    Ok((
        rel,
        Versioned {
            entry,
            seq: Seq(wire.seq),
        },
    ))
}

pub fn path_state_to_wire(path: &RelPath, state: &Versioned) -> pb::PathState {
    pb::PathState {
        path: path.as_str().to_string(),
        seq: state.seq.0,
        entry: state.entry.as_ref().map(entry_to_wire),
        read_only: false,
    }
}

/// Converts a wire chunk list; errors name the chunk.
pub fn chunks(wire: &[pb::ChunkRef]) -> Result<Vec<gm_chunk::ChunkRef>, WireError> {
    wire.iter()
        .enumerate()
        .map(|(index, c)| {
            Ok(gm_chunk::ChunkRef {
                len: c.len,
                hash: ContentHash::from_slice(&c.hash).map_err(|source| WireError::Hash {
                    path: format!("chunk {index}"),
                    source,
                })?,
            })
        })
        .collect()
}

pub fn chunks_to_wire(chunks: &[gm_chunk::ChunkRef]) -> Vec<pb::ChunkRef> {
    chunks
        .iter()
        .map(|c| pb::ChunkRef {
            hash: c.hash.as_bytes().to_vec(),
            len: c.len,
        })
        .collect()
}

/// Chunks per manifest message (36 bytes each on the wire).
pub const MANIFEST_PART: usize = 16 * 1024;

/// The metadata key that carries the token.
pub const AUTH_HEADER: &str = "authorization";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        for e in [
            Entry::Dir,
            Entry::Symlink {
                target: "../x".into(),
            },
            Entry::File {
                hash: ContentHash::of(b"x"),
                size: 1,
                executable: true,
            },
        ] {
            assert_eq!(entry("p", &entry_to_wire(&e)).unwrap(), e);
        }
    }

    #[test]
    fn bad_wire_values_name_what_is_wrong() {
        let bad_hash = pb::Entry {
            kind: Some(pb::entry::Kind::File(pb::FileEntry {
                hash: vec![1, 2, 3],
                size: 3,
                executable: false,
            })),
        };
        let err = entry("a/b", &bad_hash).unwrap_err().to_string();
        assert!(err.contains("a/b") && err.contains("32 bytes"), "{err}");
        let err = path_state(&pb::PathState {
            path: "../etc".into(),
            seq: 1,
            entry: None,
            read_only: false,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("../etc"), "{err}");
        assert!(entry("x", &pb::Entry { kind: None }).is_err());
    }
}
