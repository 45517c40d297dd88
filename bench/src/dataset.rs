//! Deterministic datasets: every byte and name comes from a seeded
//! splitmix64 stream per file, so two machines (or two runs) given the same
//! seed and sizes get the same trees. A dataset is generated into
//! `DIR.tmp`, renamed into place, and described by `DIR.meta.json`; it is
//! regenerated only when that description is missing or differs.
//!
//! This module only writes trees; it does not time anything.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

/// splitmix64: tiny, fast, and good enough for test data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A stream for one item, independent of generation order.
    pub fn for_item(seed: u64, salt: &str, index: u64) -> Rng {
        let mut mix = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
        for byte in salt.bytes() {
            mix.0 ^= u64::from(byte);
            mix.next_u64();
        }
        mix.0 ^= index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        mix.next_u64();
        mix
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform between `min` and `max`, skewed towards `max` when
    /// `skew` < 1 (the exponent applied to the uniform draw).
    pub fn size(&mut self, min: u64, max: u64, skew: f64) -> u64 {
        let ratio = max as f64 / min as f64;
        let size = min as f64 * ratio.powf(self.unit().powf(skew));
        (size as u64).clamp(min, max)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// Source-like text: printable characters and newlines.
    pub fn text(&mut self, len: usize) -> Vec<u8> {
        const CHARS: &[u8; 64] =
            b"abcdefghijklmnopqrstuvwxyz_ ABCDEFGHIJ(){};=.,0123456789 \t\"'<>:+";
        let mut out = Vec::with_capacity(len);
        let mut line = 0usize;
        while out.len() < len {
            let mut bits = self.next_u64();
            for _ in 0..10 {
                if out.len() == len {
                    break;
                }
                if line > 30 && bits & 0x3f < 3 {
                    out.push(b'\n');
                    line = 0;
                } else {
                    out.push(CHARS[(bits & 0x3f) as usize]);
                    line += 1;
                }
                bits >>= 6;
            }
        }
        out
    }
}

/// What a dataset holds. Sizes in bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Text files in nested directories (`p000/m0/s0/f000000.rs`), sizes
    /// log-uniform in `min..=max` with `skew`.
    Tree {
        files: u64,
        per_dir: u64,
        min: u64,
        max: u64,
        skew: f64,
    },
    /// `count` files of random bytes, `size` each.
    Large { count: u64, size: u64 },
    /// Text tree, random binary assets of varied size, a few big blobs,
    /// symlinks and some executable files.
    Mixed {
        small: u64,
        medium: u64,
        medium_max: u64,
        blobs: u64,
        blob_size: u64,
        links: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub seed: u64,
    pub shape: Shape,
}

/// Counts of a generated dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

impl Summary {
    pub fn to_json(self) -> serde_json::Value {
        json!({"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks, "bytes": self.bytes})
    }
}

impl Spec {
    fn fingerprint(&self) -> String {
        format!("v1 {} seed={} {:?}", self.name, self.seed, self.shape)
    }
}

const EXTENSIONS: [&str; 6] = ["rs", "c", "h", "py", "md", "json"];

fn tree_path(index: u64, per_dir: u64) -> String {
    let leaf = index / per_dir.max(1);
    let ext = EXTENSIONS[(index % EXTENSIONS.len() as u64) as usize];
    format!(
        "p{:03}/m{}/s{}/f{index:06}.{ext}",
        leaf / 100,
        (leaf / 10) % 10,
        leaf % 10
    )
}

/// Returns the dataset directory, generating it if missing or stale.
pub fn ensure(data_dir: &Path, spec: &Spec) -> anyhow::Result<(PathBuf, Summary)> {
    let dir = data_dir.join(spec.name);
    let meta_path = data_dir.join(format!("{}.meta.json", spec.name));
    if let Ok(text) = std::fs::read_to_string(&meta_path)
        && let Ok(meta) = serde_json::from_str::<serde_json::Value>(&text)
        && meta["fingerprint"] == spec.fingerprint()
        && dir.is_dir()
    {
        let get = |k: &str| meta["summary"][k].as_u64().unwrap_or(0);
        let summary = Summary {
            files: get("files"),
            dirs: get("dirs"),
            symlinks: get("symlinks"),
            bytes: get("bytes"),
        };
        return Ok((dir, summary));
    }
    crate::note(format_args!(
        "generating dataset {} ({:?})",
        spec.name, spec.shape
    ));
    let started = std::time::Instant::now();
    let _ = std::fs::remove_file(&meta_path);
    remove_tree(&dir)?;
    let tmp = data_dir.join(format!("{}.tmp", spec.name));
    remove_tree(&tmp)?;
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let summary = generate(&tmp, spec)?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("rename into {}", dir.display()))?;
    let meta = json!({"fingerprint": spec.fingerprint(), "summary": summary.to_json()});
    std::fs::write(&meta_path, meta.to_string())
        .with_context(|| format!("write {}", meta_path.display()))?;
    crate::note(format_args!(
        "dataset {} ready: {} files, {} bytes in {:.1} s",
        spec.name,
        summary.files,
        summary.bytes,
        started.elapsed().as_secs_f64()
    ));
    Ok((dir, summary))
}

pub fn remove_tree(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("remove {}", path.display())),
    }
}

fn write_file(path: &Path, data: &[u8], summary: &mut Summary) -> anyhow::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.is_dir()
    {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        summary.dirs += 1;
    }
    std::fs::write(path, data).with_context(|| format!("write {}", path.display()))?;
    summary.files += 1;
    summary.bytes += data.len() as u64;
    Ok(())
}

/// Writes `size` random bytes in 4 MiB pieces.
pub fn write_random(path: &Path, rng: &mut Rng, size: u64) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes a text tree of `files` files under `root/prefix`.
pub fn write_tree(
    root: &Path,
    seed: u64,
    salt: &str,
    files: u64,
    per_dir: u64,
    (min, max, skew): (u64, u64, f64),
    summary: &mut Summary,
) -> anyhow::Result<Vec<String>> {
    let mut paths = Vec::with_capacity(files as usize);
    for index in 0..files {
        let mut rng = Rng::for_item(seed, salt, index);
        let size = rng.size(min, max, skew);
        let rel = tree_path(index, per_dir);
        write_file(&root.join(&rel), &rng.text(size as usize), summary)?;
        paths.push(rel);
    }
    Ok(paths)
}

fn generate(root: &Path, spec: &Spec) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    match spec.shape {
        Shape::Tree {
            files,
            per_dir,
            min,
            max,
            skew,
        } => {
            write_tree(
                root,
                spec.seed,
                spec.name,
                files,
                per_dir,
                (min, max, skew),
                &mut summary,
            )?;
        }
        Shape::Large { count, size } => {
            for index in 0..count {
                let mut rng = Rng::for_item(spec.seed, spec.name, index);
                write_random(&root.join(format!("f{index}.bin")), &mut rng, size)?;
                summary.files += 1;
                summary.bytes += size;
            }
        }
        Shape::Mixed {
            small,
            medium,
            medium_max,
            blobs,
            blob_size,
            links,
        } => {
            let src = root.join("src");
            let paths = write_tree(
                &src,
                spec.seed,
                "mixed-src",
                small,
                40,
                (200, 64 << 10, 0.8),
                &mut summary,
            )?;
            summary.dirs += 1;
            // Every 20th source file is executable (scripts).
            for rel in paths.iter().step_by(20) {
                let path = src.join(rel);
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod {}", path.display()))?;
            }
            let assets = root.join("assets");
            std::fs::create_dir_all(&assets)?;
            summary.dirs += 1;
            for index in 0..medium {
                let mut rng = Rng::for_item(spec.seed, "mixed-assets", index);
                let size = rng.size(64 << 10, medium_max, 1.0);
                let sub = assets.join(format!("a{}", index % 8));
                if !sub.is_dir() {
                    std::fs::create_dir_all(&sub)?;
                    summary.dirs += 1;
                }
                write_random(&sub.join(format!("asset{index:04}.bin")), &mut rng, size)?;
                summary.files += 1;
                summary.bytes += size;
            }
            let blob_dir = root.join("blobs");
            std::fs::create_dir_all(&blob_dir)?;
            summary.dirs += 1;
            for index in 0..blobs {
                let mut rng = Rng::for_item(spec.seed, "mixed-blobs", index);
                write_random(
                    &blob_dir.join(format!("blob{index}.bin")),
                    &mut rng,
                    blob_size,
                )?;
                summary.files += 1;
                summary.bytes += blob_size;
            }
            let link_dir = root.join("links");
            std::fs::create_dir_all(&link_dir)?;
            summary.dirs += 1;
            for index in 0..links {
                let Some(target) = paths.get((index * 7) as usize % paths.len().max(1)) else {
                    break;
                };
                std::os::unix::fs::symlink(
                    format!("../src/{target}"),
                    link_dir.join(format!("l{index:03}")),
                )?;
                summary.symlinks += 1;
            }
        }
    }
    Ok(summary)
}

/// Counts regular files and symlinks under `root`, skipping `.ghostmirror`.
pub fn count_entries(root: &Path) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if entry.file_name() != ".ghostmirror" {
                    stack.push(entry.path());
                }
            } else {
                count += 1;
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::for_item(7, "src", 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::for_item(7, "src", 3).next_u64(),
            Rng::for_item(7, "src", 4).next_u64()
        );
        assert_ne!(
            Rng::for_item(7, "src", 3).next_u64(),
            Rng::for_item(7, "large", 3).next_u64()
        );
    }

    #[test]
    fn sizes_stay_in_range_and_text_is_exact() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let size = rng.size(200, 65536, 0.8);
            assert!((200..=65536).contains(&size));
        }
        assert_eq!(rng.text(1234).len(), 1234);
        let mut buf = [0u8; 13];
        rng.fill(&mut buf);
    }

    #[test]
    fn tree_paths_nest_three_levels() {
        assert_eq!(tree_path(0, 30), "p000/m0/s0/f000000.rs");
        assert_eq!(tree_path(29_999, 30), "p009/m9/s9/f029999.json");
    }

    #[test]
    fn ensure_generates_once() {
        let dir = std::env::temp_dir().join(format!("gm-bench-test-{}", std::process::id()));
        let spec = Spec {
            name: "t",
            seed: 3,
            shape: Shape::Tree {
                files: 20,
                per_dir: 5,
                min: 10,
                max: 100,
                skew: 1.0,
            },
        };
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (path, first) = ensure(&dir, &spec).expect("generate");
        assert_eq!(first.files, 20);
        assert_eq!(count_entries(&path).expect("count"), 20);
        let (_, second) = ensure(&dir, &spec).expect("reuse");
        assert_eq!(first.bytes, second.bytes);
        remove_tree(&dir).expect("cleanup");
    }
}
