//! Assembling a file from its chunks: each chunk comes from a file the
//! receiver already holds, from an earlier position of the same file, or
//! from the sender (its length checked). Every byte is hashed once, by the
//! staged file's whole-content hasher, and `assemble` checks that hash
//! against the file's before it returns: a wrong byte anywhere fails it.
//! Only then are local sources checked chunk by chunk, to say which one
//! changed since it was planned (`SourceChanged`, so the caller plans
//! again without it); when none did, the sender's chunks were wrong
//! (`Mismatch`). Before, every chunk was hashed on its own as well: twice
//! the hashing for the same guarantee.

use std::collections::HashMap;
use std::fs::File;

use gm_chunk::{ChunkError, Manifest, VerifiedChunk};
use gm_core::{ContentHash, RelPath};

use crate::error::FsError;
use crate::root::{Root, StagedFile};

/// Where one chunk comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A file of this root holds it at `offset`.
    Local { path: RelPath, offset: u64 },
    /// The chunk at this earlier index of the same file.
    Earlier(usize),
    /// The sender provides it.
    Fetch,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0}")]
    Chunk(#[from] ChunkError),
    /// A local source no longer holds the expected bytes: plan again.
    #[error("{path}: changed since it was planned as a chunk source")]
    SourceChanged { path: RelPath },
    #[error("fetching chunk {index}: {reason}")]
    Fetch { index: usize, reason: String },
    /// The assembled content is not the file's: the sender's chunks were
    /// wrong (no local source changed).
    #[error("the assembled content hashes to {actual}, not {expected}")]
    Mismatch {
        expected: ContentHash,
        actual: ContentHash,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Assembled {
    pub copied_bytes: u64,
    pub fetched_bytes: u64,
}

/// Plans pieces from located chunks (`locate` maps a chunk hash to a local
/// file and offset), fetching a repeated chunk only once.
pub fn plan_pieces(
    manifest: &Manifest,
    locate: &HashMap<ContentHash, (RelPath, u64)>,
) -> Vec<Piece> {
    gm_chunk::plan(manifest, |hash| locate.get(hash).cloned())
        .into_iter()
        .map(|source| match source {
            gm_chunk::ChunkSource::Local((path, offset)) => Piece::Local { path, offset },
            gm_chunk::ChunkSource::Earlier(index) => Piece::Earlier(index),
            gm_chunk::ChunkSource::Fetch => Piece::Fetch,
        })
        .collect()
}

/// Writes every chunk of `manifest` into `staged`, in order, and checks
/// that the result hashes to `whole`. `fetch(index)` returns the (decoded)
/// bytes of a `Fetch` chunk; it is called in increasing index order.
pub fn assemble(
    root: &Root,
    staged: &mut StagedFile,
    manifest: &Manifest,
    pieces: &[Piece],
    whole: ContentHash,
    mut fetch: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<Assembled, AssembleError> {
    let offsets = manifest.offsets();
    let mut open: HashMap<RelPath, File> = HashMap::new();
    let mut done = Assembled::default();
    for (index, (chunk, piece)) in manifest.chunks.iter().zip(pieces).enumerate() {
        let data = match piece {
            Piece::Fetch => {
                let data = fetch(index).map_err(|reason| AssembleError::Fetch { index, reason })?;
                done.fetched_bytes += data.len() as u64;
                data
            }
            Piece::Earlier(earlier) => staged.read_at(offsets[*earlier], chunk.len)?,
            Piece::Local { path, offset } => {
                let data = read_local(root, &mut open, path, *offset, chunk.len)?;
                done.copied_bytes += data.len() as u64;
                data
            }
        };
        // Lengths are checked here; content by the whole-file hash below.
        let sized = VerifiedChunk::sized(index, data, chunk).map_err(|e| match piece {
            Piece::Local { path, .. } => AssembleError::SourceChanged { path: path.clone() },
            _ => AssembleError::Chunk(e),
        })?;
        staged.write_all(sized.bytes())?;
    }
    let actual = staged.hash();
    if actual == whole {
        return Ok(done);
    }
    // Which local source changed since it was planned, if one did.
    for (index, (chunk, piece)) in manifest.chunks.iter().zip(pieces).enumerate() {
        if let Piece::Local { path, offset } = piece {
            let changed = read_local(root, &mut open, path, *offset, chunk.len)
                .map(|data| VerifiedChunk::verify(index, data, chunk).is_err())
                .unwrap_or(true);
            if changed {
                return Err(AssembleError::SourceChanged { path: path.clone() });
            }
        }
    }
    Err(AssembleError::Mismatch {
        expected: whole,
        actual,
    })
}

/// Reads `len` bytes at `offset` of the local source `path`, keeping up to
/// 64 sources open. Any failure means the source is not what was planned.
fn read_local(
    root: &Root,
    open: &mut HashMap<RelPath, File>,
    path: &RelPath,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, AssembleError> {
    let changed = || AssembleError::SourceChanged { path: path.clone() };
    if !open.contains_key(path) {
        if open.len() >= 64 {
            open.clear();
        }
        let (file, _) = root.open_read(path).map_err(|_| changed())?;
        open.insert(path.clone(), file);
    }
    let file = open.get(path).ok_or_else(changed)?;
    root.read_range(file, path, offset, len)
        .map_err(|_| changed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::Expect;

    #[test]
    fn assembles_from_local_earlier_and_fetched_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        // An old version on disk; the new one changes the middle and repeats a chunk.
        let old: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("old"), &old).unwrap();
        let old_manifest = gm_chunk::chunk_slice(&old);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 4096].fill(7);
        let manifest = gm_chunk::chunk_slice(&new);
        let mut locate = HashMap::new();
        for (chunk, offset) in old_manifest.chunks.iter().zip(old_manifest.offsets()) {
            locate.insert(chunk.hash, (RelPath::new("old").unwrap(), offset));
        }
        let pieces = plan_pieces(&manifest, &locate);
        let fetches = pieces.iter().filter(|p| **p == Piece::Fetch).count();
        assert!(
            (1..=3).contains(&fetches),
            "{fetches} fetched of {}",
            pieces.len()
        );
        let offsets = manifest.offsets();
        let mut staged = root.stage_file().unwrap();
        let done = assemble(
            &root,
            &mut staged,
            &manifest,
            &pieces,
            ContentHash::of(&new),
            |i| {
                let start = offsets[i] as usize;
                Ok(new[start..start + manifest.chunks[i].len as usize].to_vec())
            },
        )
        .unwrap();
        assert_eq!(done.copied_bytes + done.fetched_bytes, new.len() as u64);
        assert!(done.fetched_bytes < 600 * 1024);
        let hash = ContentHash::of(&new);
        staged
            .commit(
                &root,
                &RelPath::new("new").unwrap(),
                hash,
                false,
                Expect::Absent,
            )
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("new")).unwrap(), new);
    }

    #[test]
    fn a_lying_sender_or_a_changed_source_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let data = vec![1u8; 2 << 20];
        let manifest = gm_chunk::chunk_slice(&data);
        let whole = ContentHash::of(&data);
        let pieces = vec![Piece::Fetch; manifest.chunks.len()];
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, whole, |_| {
            Ok(vec![2u8; 16])
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::Chunk(_)), "{err}");
        // Chunks of the right lengths and the wrong bytes: the whole-file
        // hash refuses them.
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, whole, |index| {
            Ok(vec![2u8; manifest.chunks[index].len as usize])
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::Mismatch { .. }), "{err}");
        std::fs::write(dir.path().join("src"), vec![9u8; 2 << 20]).unwrap();
        let pieces = vec![
            Piece::Local {
                path: RelPath::new("src").unwrap(),
                offset: 0
            };
            manifest.chunks.len()
        ];
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, whole, |_| {
            Err("unused".into())
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::SourceChanged { .. }), "{err}");
    }

    #[test]
    fn a_source_changed_after_planning_fails_the_assembly() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "t").unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4u32 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        std::fs::write(dir.path().join("src"), &data).unwrap();
        let manifest = gm_chunk::chunk_slice(&data);
        assert!(manifest.chunks.len() > 32);
        let locate: HashMap<ContentHash, (RelPath, u64)> = manifest
            .chunks
            .iter()
            .zip(manifest.offsets())
            .map(|(c, offset)| (c.hash, (RelPath::new("src").unwrap(), offset)))
            .collect();
        let pieces = plan_pieces(&manifest, &locate);
        // Unchanged: every byte comes from the local file, read ahead.
        let whole = ContentHash::of(&data);
        let mut staged = root.stage_file().unwrap();
        let done = assemble(&root, &mut staged, &manifest, &pieces, whole, |_| {
            Err("nothing to fetch".into())
        })
        .unwrap();
        assert_eq!(done.copied_bytes, data.len() as u64);
        assert_eq!(staged.len(), data.len() as u64);
        // The last megabyte changes after the plan was made.
        let mut changed = data.clone();
        changed[3 << 20..].fill(0);
        std::fs::write(dir.path().join("src"), &changed).unwrap();
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, whole, |_| {
            Err("nothing to fetch".into())
        })
        .unwrap_err();
        match err {
            AssembleError::SourceChanged { path } => assert_eq!(path.as_str(), "src"),
            other => panic!("{other}"),
        }
        // A source shorter than planned is a changed source too.
        std::fs::write(dir.path().join("src"), &data[..1 << 20]).unwrap();
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, whole, |_| {
            Err("nothing to fetch".into())
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::SourceChanged { .. }), "{err}");
    }
}
