//! Paths and identifiers that cross a trust boundary.
//!
//! `RelPath` is the only representation of a path inside a workspace. It is
//! built only by `RelPath::new`, the one path validator of the project, which
//! refuses anything that could leave the workspace root or touch internal
//! state: absolute paths, `.`/`..` components, empty components, NUL,
//! backslashes (an encoded separator on other systems), over-long names and
//! paths, and anything under `.ghostmirror/` at the root.
//! `RelPath`s order by bytes, so a parent always sorts before its children.

use std::fmt;

/// The internal directory at each workspace root; never synced.
pub const INTERNAL_DIR: &str = ".ghostmirror";

/// Longest accepted path, in bytes (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted single name, in bytes (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Deepest accepted nesting.
pub const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; only paths relative to the workspace root are accepted")]
    Absolute(String),
    #[error("path {0:?} has an empty component (a doubled or trailing '/')")]
    EmptyComponent(String),
    #[error("path {0:?} has a '.' or '..' component")]
    DotComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} contains a backslash, which is refused as an encoded separator")]
    Backslash(String),
    #[error("path {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("path of {0} bytes is longer than the limit of {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("path {0:?} has a name longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong(String),
    #[error("path {0:?} is nested deeper than {MAX_DEPTH} levels")]
    TooDeep(String),
    #[error("path {0:?} is inside the internal directory {INTERNAL_DIR}/")]
    Internal(String),
    #[error("workspace id {0:?} is invalid: use 1 to 128 of [A-Za-z0-9._-], not starting with '.'")]
    BadWorkspaceId(String),
    #[error("node id {0:?} is invalid: use 1 to 64 of [A-Za-z0-9._-], not starting with '.'")]
    BadNodeId(String),
    #[error("skill name {0:?} is invalid: use 1 to 64 of [A-Za-z0-9._-], not starting with '.'")]
    BadSkillName(String),
}

/// A validated path relative to a workspace root, '/'-separated.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// A validated copy of `raw`. See the module comment for the rules.
    pub fn new(raw: &str) -> Result<Self, PathError> {
        Self::check(raw)?;
        Ok(RelPath(raw.to_string()))
    }

    /// `new` for a path already in an owned string: no copy.
    pub fn from_string(raw: String) -> Result<Self, PathError> {
        Self::check(&raw)?;
        Ok(RelPath(raw))
    }

    /// The one path validator (`new`, `from_string` and `join` use it).
    fn check(raw: &str) -> Result<(), PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(raw.len()));
        }
        let shown = || raw.to_string();
        if raw.contains('\0') {
            return Err(PathError::Nul(shown()));
        }
        if raw.starts_with('/') {
            return Err(PathError::Absolute(shown()));
        }
        if raw.contains('\\') {
            return Err(PathError::Backslash(shown()));
        }
        let mut depth = 0;
        for (index, component) in raw.split('/').enumerate() {
            depth += 1;
            if component.is_empty() {
                return Err(PathError::EmptyComponent(shown()));
            }
            if component == "." || component == ".." {
                return Err(PathError::DotComponent(shown()));
            }
            if component.len() > MAX_NAME_BYTES {
                return Err(PathError::NameTooLong(shown()));
            }
            if index == 0 && component == INTERNAL_DIR {
                return Err(PathError::Internal(shown()));
            }
        }
        if depth > MAX_DEPTH {
            return Err(PathError::TooDeep(shown()));
        }
        Ok(())
    }

    /// A path built by this crate from parts that are already checked
    /// (a validated name under a fixed directory, a suffix of a valid path).
    pub(crate) fn trusted(raw: String) -> RelPath {
        debug_assert!(RelPath::new(&raw).is_ok(), "{raw:?}");
        RelPath(raw)
    }

    /// Validates raw bytes (a file name from disk or the wire).
    pub fn from_bytes(raw: &[u8]) -> Result<Self, PathError> {
        let text = std::str::from_utf8(raw)
            .map_err(|_| PathError::NotUtf8(String::from_utf8_lossy(raw).into_owned()))?;
        Self::new(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent path, or `None` for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .rfind('/')
            .map(|cut| RelPath(self.0[..cut].to_string()))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(cut) => &self.0[cut + 1..],
            None => &self.0,
        }
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        let mut joined = String::with_capacity(self.0.len() + 1 + name.len());
        joined.push_str(&self.0);
        joined.push('/');
        joined.push_str(name);
        RelPath::from_string(joined)
    }

    /// A sibling of this path with another last component, validated.
    pub fn with_file_name(&self, name: &str) -> Result<RelPath, PathError> {
        match self.parent() {
            Some(parent) => parent.join(name),
            None => RelPath::new(name),
        }
    }

    /// Components from the root down.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// True when `self` is a strict ancestor directory of `other`.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0.as_bytes()[self.0.len()] == b'/'
    }

    /// The strict ancestors, from the top down.
    pub fn ancestors(&self) -> Vec<RelPath> {
        let mut out = Vec::new();
        for (cut, byte) in self.0.bytes().enumerate() {
            if byte == b'/' {
                out.push(RelPath(self.0[..cut].to_string()));
            }
        }
        out
    }

    /// Re-roots `self` from under `from` to under `to` (`from` must be an
    /// ancestor of `self`).
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Result<RelPath, PathError> {
        let rest = &self.0[from.0.len()..];
        RelPath::new(&format!("{}{}", to.0, rest))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Keeps only the topmost of nested paths (for subtree scans).
pub fn minimal_tops(paths: impl IntoIterator<Item = RelPath>) -> Vec<RelPath> {
    // Byte order does not keep a subtree contiguous ("a-b" sorts between
    // "a" and "a/b"), so each path checks all of its ancestors.
    let sorted: std::collections::BTreeSet<RelPath> = paths.into_iter().collect();
    let mut kept: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut tops: Vec<RelPath> = Vec::new();
    for path in &sorted {
        let covered = path
            .as_str()
            .match_indices('/')
            .any(|(cut, _)| kept.contains(&path.as_str()[..cut]));
        if !covered {
            kept.insert(path.as_str());
            tops.push(path.clone());
        }
    }
    tops
}

pub(crate) fn is_simple_id(raw: &str, max: usize) -> bool {
    !raw.is_empty()
        && raw.len() <= max
        && !raw.starts_with('.')
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The id of a workspace (one agent session); also the mirror's directory name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub fn new(raw: &str) -> Result<Self, PathError> {
        if is_simple_id(raw, 128) {
            Ok(WorkspaceId(raw.to_string()))
        } else {
            Err(PathError::BadWorkspaceId(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a node; appears in conflict-copy names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(raw: &str) -> Result<Self, PathError> {
        if is_simple_id(raw, 64) {
            Ok(NodeId(raw.to_string()))
        } else {
            Err(PathError::BadNodeId(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(raw: &str, accepted: bool) {
        assert_eq!(RelPath::new(raw).is_ok(), accepted, "{raw:?}");
    }

    #[test]
    fn accepts_ordinary_paths() {
        for raw in [
            "a",
            "a/b/c.txt",
            ".hidden",
            "..foo",
            "foo..",
            "...",
            "a/.ghostmirror",
            ".ghostmirrorx/a",
            "dir with space/ünïcode",
            ".skills/x/SKILL.md",
        ] {
            check(raw, true);
        }
    }

    #[test]
    fn refuses_escapes_and_internal_paths() {
        for raw in [
            "",
            "/etc/passwd",
            "/",
            "..",
            ".",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
            "a\\..\\b",
            "..\\x",
            ".ghostmirror",
            ".ghostmirror/staging/x",
            "//x",
        ] {
            check(raw, false);
        }
    }

    #[test]
    fn refuses_overlong_names_paths_and_depth() {
        check(&"a".repeat(255), true);
        check(&"a".repeat(256), false);
        check(&vec!["abcdefgh"; 600].join("/"), false);
        check(&vec!["a"; 256].join("/"), true);
        check(&vec!["a"; 257].join("/"), false);
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert!(matches!(
            RelPath::from_bytes(b"a\xffb"),
            Err(PathError::NotUtf8(_))
        ));
    }

    #[test]
    fn error_names_the_path() {
        let err = RelPath::new("a/../b").unwrap_err();
        assert!(err.to_string().contains("a/../b"), "{err}");
    }

    #[test]
    fn parent_name_and_ancestry() {
        let path = RelPath::new("a/b/c").unwrap();
        assert_eq!(path.parent().unwrap().as_str(), "a/b");
        assert_eq!(path.file_name(), "c");
        assert_eq!(RelPath::new("a").unwrap().parent(), None);
        let a = RelPath::new("a").unwrap();
        assert!(a.is_ancestor_of(&path));
        assert!(!RelPath::new("a/b/c").unwrap().is_ancestor_of(&path));
        assert!(RelPath::new("a/b/").is_err());
        assert!(
            !RelPath::new("a/bb")
                .unwrap()
                .is_ancestor_of(&RelPath::new("a/b/c").unwrap())
        );
        let names: Vec<_> = path
            .ancestors()
            .iter()
            .map(|p| p.as_str().to_string())
            .collect();
        assert_eq!(names, ["a", "a/b"]);
        let moved = path.rebase(&a, &RelPath::new("z").unwrap()).unwrap();
        assert_eq!(moved.as_str(), "z/b/c");
    }

    #[test]
    fn minimal_tops_drops_nested_paths() {
        let paths = ["a/b", "a", "c/d", "c/d/e", "a-b", "c/dd"].map(|p| RelPath::new(p).unwrap());
        let tops: Vec<String> = minimal_tops(paths).iter().map(|p| p.to_string()).collect();
        assert_eq!(tops, ["a", "a-b", "c/d", "c/dd"]);
    }

    #[test]
    fn ids() {
        assert!(WorkspaceId::new("ws-1_a.b").is_ok());
        for bad in ["", ".x", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(WorkspaceId::new(bad).is_err(), "{bad:?}");
        }
        assert!(NodeId::new("node-a").is_ok());
        assert!(NodeId::new("node a").is_err());
    }

    proptest! {
        /// Whatever the input, an accepted path can never name something
        /// outside the root or inside the internal directory.
        #[test]
        fn accepted_paths_stay_inside(raw in "[a-z./\\\\\0]{0,24}") {
            if let Ok(path) = RelPath::new(&raw) {
                prop_assert!(!path.as_str().starts_with('/'));
                for component in path.components() {
                    prop_assert!(!component.is_empty());
                    prop_assert!(component != "." && component != "..");
                    prop_assert!(!component.contains('\0') && !component.contains('\\'));
                }
                prop_assert!(path.components().next() != Some(INTERNAL_DIR));
                // Round trip: the accepted text is kept exactly.
                prop_assert_eq!(path.as_str(), raw.as_str());
            }
        }

        /// Joining validated names always gives a valid path whose parent is
        /// the original.
        #[test]
        fn join_and_parent_round_trip(names in proptest::collection::vec("[a-zA-Z0-9_ -]{1,12}", 1..8)) {
            let mut path = RelPath::new(&names[0]).unwrap();
            for name in &names[1..] {
                let child = path.join(name).unwrap();
                prop_assert_eq!(child.parent(), Some(path.clone()));
                prop_assert!(path.is_ancestor_of(&child));
                prop_assert!(path < child);
                path = child;
            }
        }

        /// Every path is covered by exactly one top, and no top covers another.
        #[test]
        fn minimal_tops_cover_each_path_once(raw in proptest::collection::vec("[ab](/[ab-]{1,2}){0,3}", 0..12)) {
            let paths: Vec<RelPath> = raw.iter().filter_map(|p| RelPath::new(p).ok()).collect();
            let tops = minimal_tops(paths.clone());
            for path in &paths {
                let covering = tops.iter().filter(|t| *t == path || t.is_ancestor_of(path)).count();
                prop_assert_eq!(covering, 1, "{} in {:?}", path, tops);
            }
            for top in &tops {
                prop_assert!(!tops.iter().any(|t| t.is_ancestor_of(top)));
            }
        }

        /// Any path with a `..` component is refused, wherever it sits.
        #[test]
        fn dotdot_anywhere_is_refused(before in proptest::collection::vec("[a-z]{1,5}", 0..4), after in proptest::collection::vec("[a-z]{1,5}", 0..4)) {
            let mut parts = before.clone();
            parts.push("..".to_string());
            parts.extend(after);
            prop_assert!(RelPath::new(&parts.join("/")).is_err());
        }
    }
}
