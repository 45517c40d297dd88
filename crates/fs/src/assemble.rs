//! Assembling a file from its chunks: each chunk comes from a file the
//! receiver already holds (read and checked against the chunk hash), from
//! an earlier position of the same file (checked too), or from the sender
//! (its length checked). The whole-file hash, checked at commit, covers
//! every byte written: a sender's wrong chunk refuses the file there, and
//! is not hashed twice on the way.

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

/// Writes every chunk of `manifest` into `staged`, in order. `fetch(index)`
/// returns the (decoded) bytes of a `Fetch` chunk; it is called in
/// increasing index order.
pub fn assemble(
    root: &Root,
    staged: &mut StagedFile,
    manifest: &Manifest,
    pieces: &[Piece],
    mut fetch: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<Assembled, AssembleError> {
    let offsets = manifest.offsets();
    let mut open: HashMap<RelPath, File> = HashMap::new();
    let mut done = Assembled::default();
    for (index, (chunk, piece)) in manifest.chunks.iter().zip(pieces).enumerate() {
        let verified = match piece {
            Piece::Fetch => {
                let data = fetch(index).map_err(|reason| AssembleError::Fetch { index, reason })?;
                done.fetched_bytes += data.len() as u64;
                VerifiedChunk::from_sender(index, data, chunk)?
            }
            Piece::Earlier(earlier) => {
                let data = staged.read_at(offsets[*earlier], chunk.len)?;
                VerifiedChunk::verify(index, data, chunk)?
            }
            Piece::Local { path, offset } => {
                if !open.contains_key(path) {
                    if open.len() >= 64 {
                        open.clear();
                    }
                    let (file, _) = root
                        .open_read(path)
                        .map_err(|_| AssembleError::SourceChanged { path: path.clone() })?;
                    open.insert(path.clone(), file);
                }
                let data = match open.get(path) {
                    Some(file) => root.read_range(file, path, *offset, chunk.len),
                    None => Err(FsError::TargetChanged {
                        path: path.to_string(),
                    }),
                }
                .map_err(|_| AssembleError::SourceChanged { path: path.clone() })?;
                done.copied_bytes += data.len() as u64;
                VerifiedChunk::verify(index, data, chunk)
                    .map_err(|_| AssembleError::SourceChanged { path: path.clone() })?
            }
        };
        staged.write_all(verified.bytes())?;
    }
    Ok(done)
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
        let done = assemble(&root, &mut staged, &manifest, &pieces, |i| {
            let start = offsets[i] as usize;
            Ok(new[start..start + manifest.chunks[i].len as usize].to_vec())
        })
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
        let pieces = vec![Piece::Fetch; manifest.chunks.len()];
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, |_| {
            Ok(vec![2u8; 16])
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::Chunk(_)), "{err}");
        // Chunks of the right lengths and the wrong bytes: the whole-file
        // hash refuses the file, and nothing lands.
        let mut staged = root.stage_file().unwrap();
        assemble(&root, &mut staged, &manifest, &pieces, |index| {
            Ok(vec![2u8; manifest.chunks[index].len as usize])
        })
        .unwrap();
        let whole = ContentHash::of(&data);
        assert_ne!(staged.hash(), whole);
        let err = staged
            .commit(
                &root,
                &RelPath::new("lied").unwrap(),
                whole,
                false,
                crate::Expect::Absent,
            )
            .unwrap_err();
        assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
        assert!(!dir.path().join("lied").exists());
        std::fs::write(dir.path().join("src"), vec![9u8; 2 << 20]).unwrap();
        let pieces = vec![
            Piece::Local {
                path: RelPath::new("src").unwrap(),
                offset: 0
            };
            manifest.chunks.len()
        ];
        let mut staged = root.stage_file().unwrap();
        let err = assemble(&root, &mut staged, &manifest, &pieces, |_| {
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
        let mut staged = root.stage_file().unwrap();
        let done = assemble(&root, &mut staged, &manifest, &pieces, |_| {
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
        let err = assemble(&root, &mut staged, &manifest, &pieces, |_| {
            Err("nothing to fetch".into())
        })
        .unwrap_err();
        assert!(matches!(err, AssembleError::SourceChanged { .. }), "{err}");
        // The chunks before the change were written, nothing after it.
        assert!(staged.len() <= 3 << 20, "{}", staged.len());
        assert!(staged.len() >= (3 << 20) - (1 << 20));
    }
}
