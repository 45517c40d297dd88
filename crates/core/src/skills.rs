//! Skills as every workspace sees them: `.skills/<name>/` holds the global
//! registry's skill `<name>`, read-only to nodes. Owns the skill name rule,
//! which paths belong to which skill, where a refused node version of a
//! skill path goes (outside `.skills/`, under `skills-conflicts/`), and the
//! content hash of a skill tree.
//!
//! Does not own: the registry (gm-registry records names, origins and
//! states), the registry's files (gm-hub), or any IO.
//!
//! Invariants kept here:
//! - a `SkillName` is one safe path component (the rule of workspace ids),
//!   so `.skills/<name>` and `DATA_DIR/skills/<name>` never escape;
//! - a conflict copy of a skill path is never under `.skills/`, so it can
//!   never shadow or be mistaken for a skill.

use std::fmt;

use crate::conflict::{MAX_COPY_ATTEMPTS, conflict_copy_name};
use crate::entry::Entry;
use crate::hash::{ContentHash, Hasher};
use crate::path::{NodeId, PathError, RelPath, is_simple_id};

/// The directory at each workspace root that holds the skills.
pub const SKILLS_DIR: &str = ".skills";
/// Where node versions refused under `.skills/` are kept (workspace root).
pub const SKILLS_CONFLICTS_DIR: &str = "skills-conflicts";
/// The file that makes a directory under `.skills/` a skill.
pub const SKILL_MANIFEST: &str = "SKILL.md";
/// Longest skill name, in bytes.
pub const MAX_SKILL_NAME: usize = 64;

/// A skill's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
/// Also its directory name under `.skills/` and in the registry.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SkillName(String);

impl SkillName {
    pub fn new(raw: &str) -> Result<Self, PathError> {
        if is_simple_id(raw, MAX_SKILL_NAME) {
            Ok(SkillName(raw.to_string()))
        } else {
            Err(PathError::BadSkillName(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `.skills/<name>`: where every workspace sees the skill.
    pub fn dir(&self) -> RelPath {
        RelPath::trusted(format!("{SKILLS_DIR}/{}", self.0))
    }

    /// `<name>`: the skill's directory inside the registry.
    pub fn registry_dir(&self) -> RelPath {
        RelPath::trusted(self.0.clone())
    }
}

impl fmt::Debug for SkillName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for SkillName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `.skills` directory itself.
pub fn skills_dir() -> RelPath {
    RelPath::trusted(SKILLS_DIR.to_string())
}

/// For a path at or below `.skills/<component>`: the component (not yet
/// checked as a `SkillName`) and the rest below it, if any. `None` for
/// `.skills` itself and for every path outside it.
pub fn skill_component(path: &RelPath) -> Option<(&str, Option<&str>)> {
    let rest = path.as_str().strip_prefix(SKILLS_DIR)?.strip_prefix('/')?;
    Some(match rest.split_once('/') {
        Some((name, below)) => (name, Some(below)),
        None => (rest, None),
    })
}

/// The skill a path belongs to (`.skills/<name>` or below it), when the
/// component is a valid skill name.
pub fn skill_of(path: &RelPath) -> Option<SkillName> {
    skill_component(path).and_then(|(name, _)| SkillName::new(name).ok())
}

/// Re-roots a path inside a skill (`.skills/<name>/rest`) to the registry
/// (`<name>/rest`); `None` outside a skill.
pub fn registry_path(path: &RelPath) -> Option<RelPath> {
    let rest = path.as_str().strip_prefix(SKILLS_DIR)?.strip_prefix('/')?;
    Some(RelPath::trusted(rest.to_string()))
}

/// The names a node's version of `path` (inside skill `name`) may be kept
/// under, in the order to try: `skills-conflicts/<name>.conflict-<node>-<utc>[-n]`
/// followed by the rest of the path below the skill. Versions refused in
/// one request share the directory of that second.
pub fn skill_copy_candidates<'a>(
    path: &'a RelPath,
    name: &'a SkillName,
    node: &'a NodeId,
    unix_secs: i64,
) -> impl Iterator<Item = Result<RelPath, PathError>> + 'a {
    let below = skill_component(path).and_then(|(_, below)| below);
    let skill = name.registry_dir();
    (0..MAX_COPY_ATTEMPTS).map(move |attempt| {
        let copy = conflict_copy_name(&skill, node, unix_secs, attempt, false)?;
        let mut out = format!("{SKILLS_CONFLICTS_DIR}/{copy}");
        if let Some(below) = below {
            out.push('/');
            out.push_str(below);
        }
        RelPath::new(&out)
    })
}

/// The content of one skill: the entries below `.skills/<name>` (which
/// itself is not listed), as a workspace journals them, in path order.
/// What the registry holds at `DATA_DIR/skills/<name>/` is the same tree
/// re-rooted (`registry_entries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkillTree {
    name: SkillName,
    entries: Vec<(RelPath, Entry)>,
}

impl SkillTree {
    /// Takes the entries strictly below `.skills/<name>` out of a list of
    /// workspace entries.
    pub fn from_workspace<'a>(
        name: &SkillName,
        entries: impl IntoIterator<Item = (&'a RelPath, &'a Entry)>,
    ) -> SkillTree {
        let prefix = format!("{}/", name.dir());
        let mut entries: Vec<(RelPath, Entry)> = entries
            .into_iter()
            .filter(|(path, _)| path.as_str().starts_with(&prefix))
            .map(|(path, entry)| (path.clone(), entry.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        SkillTree {
            name: name.clone(),
            entries,
        }
    }

    /// Builds the tree from registry paths (`<name>/...`, as found below
    /// `DATA_DIR/skills/`); refuses a path that would be too long or too
    /// deep once it sits under `.skills/`.
    pub fn from_registry<'a>(
        name: &SkillName,
        entries: impl IntoIterator<Item = (&'a RelPath, &'a Entry)>,
    ) -> Result<SkillTree, PathError> {
        let prefix = format!("{name}/");
        let mut found = Vec::new();
        for (path, entry) in entries {
            if path.as_str().starts_with(&prefix) {
                found.push((
                    RelPath::new(&format!("{SKILLS_DIR}/{path}"))?,
                    entry.clone(),
                ));
            }
        }
        Ok(SkillTree::from_workspace(
            name,
            found.iter().map(|(p, e)| (p, e)),
        ))
    }

    pub fn name(&self) -> &SkillName {
        &self.name
    }

    /// Entries below `.skills/<name>`, parents first.
    pub fn entries(&self) -> &[(RelPath, Entry)] {
        &self.entries
    }

    /// The same entries at their registry paths (`<name>/...`).
    pub fn registry_entries(&self) -> impl Iterator<Item = (RelPath, &Entry)> {
        self.entries
            .iter()
            .filter_map(|(path, entry)| registry_path(path).map(|registry| (registry, entry)))
    }

    /// The path below the skill's root (`docs/a.md` for `.skills/s/docs/a.md`).
    fn below<'a>(&self, path: &'a RelPath) -> &'a str {
        skill_component(path)
            .and_then(|(_, below)| below)
            .unwrap_or_default()
    }

    /// True when the tree has a regular file `SKILL.md` at its top.
    pub fn has_manifest(&self) -> bool {
        self.entries
            .iter()
            .any(|(path, entry)| self.below(path) == SKILL_MANIFEST && entry.file_hash().is_some())
    }

    /// Total bytes of file content.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|(_, e)| match e {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The tree as a workspace journals it: `.skills/<name>` (a directory)
    /// and every entry below it, parents first.
    pub fn in_workspace(&self) -> Vec<(RelPath, Entry)> {
        let mut out = Vec::with_capacity(self.entries.len() + 1);
        out.push((self.name.dir(), Entry::Dir));
        out.extend(self.entries.iter().cloned());
        out
    }

    /// BLAKE3 over the listing below the skill's root (path, kind, content
    /// hash or link target, executable bit): equal content has an equal
    /// hash whatever the skill's name and the order entries were found in.
    pub fn hash(&self) -> ContentHash {
        let mut hasher = Hasher::new();
        for (path, entry) in &self.entries {
            hasher.update(self.below(path).as_bytes());
            hasher.update(&[0]);
            match entry {
                Entry::File {
                    hash, executable, ..
                } => {
                    hasher.update(b"f");
                    hasher.update(hash.as_bytes());
                    hasher.update(&[u8::from(*executable)]);
                }
                Entry::Dir => hasher.update(b"d"),
                Entry::Symlink { target } => {
                    hasher.update(b"l");
                    hasher.update(target.as_bytes());
                    hasher.update(&[0]);
                }
            }
        }
        hasher.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(raw: &str) -> RelPath {
        RelPath::new(raw).unwrap()
    }

    fn file(content: &str, executable: bool) -> Entry {
        Entry::File {
            hash: ContentHash::of(content.as_bytes()),
            size: content.len() as u64,
            executable,
        }
    }

    #[test]
    fn names_are_one_safe_component() {
        for ok in ["a", "code-review", "v1.2_x", &"x".repeat(64)] {
            assert!(SkillName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".x", "..", "a/b", "a b", "é", &"x".repeat(65), "a\0"] {
            let err = SkillName::new(bad).unwrap_err();
            assert!(err.to_string().contains("skill name"), "{err}");
        }
        let name = SkillName::new("review").unwrap();
        assert_eq!(name.dir().as_str(), ".skills/review");
        assert_eq!(name.registry_dir().as_str(), "review");
    }

    #[test]
    fn paths_map_to_their_skill() {
        assert_eq!(skill_component(&p(".skills")), None);
        assert_eq!(skill_component(&p(".skillsx/a")), None);
        assert_eq!(skill_component(&p("a/.skills/b")), None);
        assert_eq!(skill_component(&p(".skills/a")), Some(("a", None)));
        assert_eq!(
            skill_component(&p(".skills/a/b/c.md")),
            Some(("a", Some("b/c.md")))
        );
        assert_eq!(
            skill_component(&p(".skills/.hidden")),
            Some((".hidden", None))
        );
        assert_eq!(skill_of(&p(".skills/.hidden/x")), None);
        assert_eq!(
            skill_of(&p(".skills/a/SKILL.md")).map(|n| n.to_string()),
            Some("a".into())
        );
        assert_eq!(
            registry_path(&p(".skills/a/b")).map(|r| r.to_string()),
            Some("a/b".into())
        );
        assert_eq!(registry_path(&p("a/b")), None);
    }

    #[test]
    fn copies_go_outside_the_skills_directory() {
        let name = SkillName::new("review").unwrap();
        let node = NodeId::new("node-a").unwrap();
        let path = p(".skills/review/docs/SKILL.md");
        let names: Vec<String> = skill_copy_candidates(&path, &name, &node, 0)
            .take(2)
            .map(|c| c.unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "skills-conflicts/review.conflict-node-a-19700101T000000Z/docs/SKILL.md",
                "skills-conflicts/review.conflict-node-a-19700101T000000Z-1/docs/SKILL.md"
            ]
        );
        let top = skill_copy_candidates(&name.dir(), &name, &node, 0)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            top.as_str(),
            "skills-conflicts/review.conflict-node-a-19700101T000000Z"
        );
    }

    #[test]
    fn trees_re_root_and_hash_by_content() {
        let name = SkillName::new("s").unwrap();
        let registry = [
            (p("s/b/x"), file("x", false)),
            (p("s/SKILL.md"), file("m", false)),
            (p("s/b"), Entry::Dir),
            (p("s/.ghostmirror"), Entry::Dir),
            (p("other/y"), Entry::Dir),
        ];
        let tree = SkillTree::from_registry(&name, registry.iter().map(|(p, e)| (p, e))).unwrap();
        assert!(tree.has_manifest());
        assert_eq!(tree.bytes(), 2);
        let in_ws = tree.in_workspace();
        let names: Vec<&str> = in_ws.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                ".skills/s",
                ".skills/s/.ghostmirror",
                ".skills/s/SKILL.md",
                ".skills/s/b",
                ".skills/s/b/x"
            ]
        );
        let back = SkillTree::from_workspace(&name, in_ws.iter().map(|(p, e)| (p, e)));
        assert_eq!(back, tree);
        let registry_paths: Vec<String> = back
            .registry_entries()
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(
            registry_paths,
            ["s/.ghostmirror", "s/SKILL.md", "s/b", "s/b/x"]
        );
        // Same content under another name: same hash.
        let other = SkillName::new("t").unwrap();
        let renamed: Vec<(RelPath, Entry)> = registry
            .iter()
            .filter_map(|(path, e)| {
                let rest = path.as_str().strip_prefix("s/")?;
                Some((p(&format!("t/{rest}")), e.clone()))
            })
            .collect();
        let renamed =
            SkillTree::from_registry(&other, renamed.iter().map(|(p, e)| (p, e))).unwrap();
        assert_eq!(renamed.hash(), tree.hash());
        let exec = SkillTree::from_registry(
            &name,
            [(p("s/SKILL.md"), file("m", true))]
                .iter()
                .map(|(p, e)| (p, e)),
        )
        .unwrap();
        let plain = SkillTree::from_registry(
            &name,
            [(p("s/SKILL.md"), file("m", false))]
                .iter()
                .map(|(p, e)| (p, e)),
        )
        .unwrap();
        assert_ne!(
            exec.hash(),
            plain.hash(),
            "the executable bit is content here"
        );
        let no_manifest = SkillTree::from_registry(
            &name,
            [(p("s/SKILL.md"), Entry::Dir)].iter().map(|(p, e)| (p, e)),
        )
        .unwrap();
        assert!(!no_manifest.has_manifest());
        let deep = vec!["d"; 255].join("/");
        assert!(
            SkillTree::from_registry(
                &name,
                [(p(&format!("s/{deep}")), Entry::Dir)]
                    .iter()
                    .map(|(p, e)| (p, e))
            )
            .is_err(),
            "too deep once under .skills/"
        );
    }

    proptest! {
        /// A copy name is never inside `.skills/`, and keeps the path below
        /// the skill.
        #[test]
        fn copy_names_stay_outside_skills(name in "[a-z][a-z0-9-]{0,20}", rest in proptest::collection::vec("[a-zA-Z0-9_. -]{1,12}", 0..4), secs in 0i64..4_000_000_000) {
            let name = SkillName::new(&name).unwrap();
            let mut path = name.dir();
            for part in &rest {
                if let Ok(next) = path.join(part) {
                    path = next;
                }
            }
            let node = NodeId::new("n").unwrap();
            for copy in skill_copy_candidates(&path, &name, &node, secs).take(3) {
                let copy = copy.unwrap();
                prop_assert!(copy.as_str().starts_with("skills-conflicts/"));
                prop_assert!(skill_of(&copy).is_none());
                let below = skill_component(&path).and_then(|(_, b)| b);
                if let Some(below) = below {
                    let suffix = format!("/{below}");
                    prop_assert!(copy.as_str().ends_with(&suffix));
                }
            }
        }
    }
}
