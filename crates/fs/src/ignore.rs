//! Ignore rules: a `.gmignore` at the workspace root, in gitignore syntax.
//! Ignored paths are never scanned, hashed, sent or applied; the rules file
//! itself is an ordinary synced file, so every replica ends up with the same
//! rules. A line that does not parse is reported and skipped, never fatal.

use gm_core::RelPath;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::root::Root;

pub const IGNORE_FILE: &str = ".gmignore";
/// Larger rules files are refused (reported) rather than read.
const MAX_RULES_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct IgnoreRules {
    matcher: Option<Gitignore>,
    /// Lines or files that could not be used, with why.
    pub problems: Vec<String>,
}

impl Default for IgnoreRules {
    fn default() -> Self {
        Self::none()
    }
}

impl IgnoreRules {
    /// No rules: nothing is ignored.
    pub fn none() -> IgnoreRules {
        IgnoreRules {
            matcher: None,
            problems: Vec::new(),
        }
    }

    /// Rules from the text of a `.gmignore`.
    pub fn parse(text: &str) -> IgnoreRules {
        let mut builder = GitignoreBuilder::new("");
        let mut problems = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if let Err(err) = builder.add_line(None, line) {
                problems.push(format!("{IGNORE_FILE} line {}: {err}", number + 1));
            }
        }
        match builder.build() {
            Ok(matcher) if matcher.is_empty() => IgnoreRules {
                matcher: None,
                problems,
            },
            Ok(matcher) => IgnoreRules {
                matcher: Some(matcher),
                problems,
            },
            Err(err) => {
                problems.push(format!("{IGNORE_FILE}: {err}"));
                IgnoreRules {
                    matcher: None,
                    problems,
                }
            }
        }
    }

    /// Reads the root's `.gmignore` (no rules when it is absent).
    pub fn load(root: &Root) -> IgnoreRules {
        let Ok(path) = RelPath::new(IGNORE_FILE) else {
            return IgnoreRules::none();
        };
        match root.lstat(&path) {
            Ok(Some(stat)) if stat.size > MAX_RULES_BYTES => IgnoreRules {
                matcher: None,
                problems: vec![format!(
                    "{IGNORE_FILE} is over {MAX_RULES_BYTES} bytes; not used"
                )],
            },
            Ok(Some(_)) => match root.read_whole(&path) {
                Ok((bytes, _, _)) => IgnoreRules::parse(&String::from_utf8_lossy(&bytes)),
                Err(err) => IgnoreRules {
                    matcher: None,
                    problems: vec![format!("{IGNORE_FILE}: {err}")],
                },
            },
            _ => IgnoreRules::none(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// True when `path` (a directory if `is_dir`) or one of its parents is
    /// ignored. The rules file itself is never ignored.
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        let Some(matcher) = &self.matcher else {
            return false;
        };
        if path.as_str() == IGNORE_FILE {
            return false;
        }
        matcher
            .matched_path_or_any_parents(path.as_str(), is_dir)
            .is_ignore()
    }

    /// For a path whose kind is unknown (a deletion): ignored either way.
    pub fn is_ignored_any(&self, path: &RelPath) -> bool {
        self.is_ignored(path, false) || self.is_ignored(path, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rules: &IgnoreRules, path: &str, is_dir: bool, expect: bool) {
        assert_eq!(
            rules.is_ignored(&RelPath::new(path).unwrap(), is_dir),
            expect,
            "{path}"
        );
    }

    #[test]
    fn gitignore_semantics() {
        let rules =
            IgnoreRules::parse("# comment\n*.log\nbuild/\n/top-only\n!keep.log\nnode_modules\n");
        assert!(rules.problems.is_empty());
        check(&rules, "a.log", false, true);
        check(&rules, "deep/dir/b.log", false, true);
        check(&rules, "keep.log", false, false);
        check(&rules, "build", true, true);
        check(&rules, "build", false, false);
        check(&rules, "build/x/y.o", false, true);
        check(&rules, "top-only", false, true);
        check(&rules, "sub/top-only", false, false);
        check(&rules, "a/node_modules/x/y.js", false, true);
        check(&rules, "src/main.rs", false, false);
        check(&rules, ".gmignore", false, false);
    }

    #[test]
    fn bad_lines_are_reported_not_fatal() {
        let rules = IgnoreRules::parse("*.tmp\n{a,b\n");
        assert_eq!(rules.problems.len(), 1, "{:?}", rules.problems);
        assert!(rules.problems[0].contains("line 2"));
        check(&rules, "x.tmp", false, true);
    }
}
