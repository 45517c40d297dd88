//! The hub's conflict rule, and the names of conflict copies.
//!
//! The hub is the single serialization point: a node proposes
//! `(path, ours, base seq)` and `decide_commit` says what happens, given what
//! the path holds now. The rule keeps every version (nothing is lost) and is
//! a pure function of its inputs, so every replica that sees the same journal
//! ends with the same tree:
//!
//! - ours equals the current entry: nothing to write;
//! - the base is the current seq (compare-and-swap holds): ours is applied,
//!   except that a directory that gained children is never replaced;
//! - otherwise ours and theirs both changed: a deletion never beats a
//!   modification (either way round), and of two different versions the one
//!   already committed keeps the path and ours becomes a conflict copy next
//!   to it. Two versions with the same bytes that differ only in the
//!   executable bit keep the committed one: no content is lost.

use crate::entry::{Entry, Seq, Versioned};
use crate::path::{MAX_NAME_BYTES, NodeId, PathError, RelPath};

/// What the hub does with one proposed change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitDecision {
    /// Write ours at the path and journal it under a new seq.
    Apply,
    /// The path already holds ours (or both are deleted): nothing to write.
    AlreadyCurrent,
    /// The path keeps its current version. When `copy_ours`, ours is stored
    /// as a conflict copy next to it.
    KeepTheirs { copy_ours: bool },
}

/// Decides a proposal. `current` is the path's state on the hub (`seq 0`,
/// no entry, for a path never seen); `current_has_children` says whether a
/// current directory still holds live entries.
pub fn decide_commit(
    base: Seq,
    current: &Versioned,
    current_has_children: bool,
    ours: Option<&Entry>,
) -> CommitDecision {
    let theirs = current.entry.as_ref();
    if ours == theirs {
        return CommitDecision::AlreadyCurrent;
    }
    // A directory with live children is never replaced or deleted: those
    // children are versions the proposer has not seen (it deletes children
    // before their parent).
    if current_has_children && theirs.is_some_and(Entry::is_dir) {
        return CommitDecision::KeepTheirs {
            copy_ours: ours.is_some(),
        };
    }
    if base == current.seq {
        return CommitDecision::Apply;
    }
    match (ours, theirs) {
        // Modify (or create) against delete: the modification wins.
        (Some(_), None) => CommitDecision::Apply,
        // Delete against modify: the modification stays.
        (None, Some(_)) => CommitDecision::KeepTheirs { copy_ours: false },
        (Some(ours), Some(theirs)) => CommitDecision::KeepTheirs {
            copy_ours: !ours.same_content(theirs),
        },
        (None, None) => CommitDecision::AlreadyCurrent,
    }
}

/// True when `decide_commit` needs to know whether the current entry has
/// live children: it is a directory and ours is not (a directory proposed
/// over a directory changes nothing below it).
pub fn children_matter(current: &Versioned, ours: Option<&Entry>) -> bool {
    current.entry.as_ref().is_some_and(Entry::is_dir) && !ours.is_some_and(Entry::is_dir)
}

/// How many conflict-copy names the hub tries for one conflict before it
/// refuses the proposal.
pub const MAX_COPY_ATTEMPTS: u32 = 100;

/// The conflict-copy names for `ours` at `path`, in the order the hub tries
/// them; it takes the first that is free both in the journal and on disk.
/// Directories keep their whole name; files and symlinks keep their
/// extension last.
pub fn conflict_copy_candidates<'a>(
    path: &'a RelPath,
    node: &'a NodeId,
    unix_secs: i64,
    ours: &Entry,
) -> impl Iterator<Item = Result<RelPath, PathError>> + 'a {
    let split_extension = !ours.is_dir();
    (0..MAX_COPY_ATTEMPTS)
        .map(move |attempt| conflict_copy_name(path, node, unix_secs, attempt, split_extension))
}

/// Formats seconds since the Unix epoch as `YYYYMMDDTHHMMSSZ`.
pub fn format_utc(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let day_of_year = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

/// Parses `YYYYMMDDTHHMMSSZ` (as `format_utc` writes it) back into seconds
/// since the Unix epoch.
pub fn parse_utc(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// The name of a conflict copy of `path` made for `node` at `unix_secs`:
/// `NAME.conflict-<node>-<utc>.EXT` (the extension is kept last so the copy
/// still opens with the right program; directories keep their whole name).
/// `attempt > 0` adds `-<attempt>` to tell apart copies made in the same
/// second. Over-long names shorten the stem, never the tag.
pub fn conflict_copy_name(
    path: &RelPath,
    node: &NodeId,
    unix_secs: i64,
    attempt: u32,
    split_extension: bool,
) -> Result<RelPath, PathError> {
    let name = path.file_name();
    let (stem, extension) = match name.rfind('.') {
        Some(cut) if split_extension && cut > 0 && cut + 1 < name.len() => {
            (&name[..cut], Some(&name[cut + 1..]))
        }
        _ => (name, None),
    };
    let mut tag = format!("conflict-{node}-{}", format_utc(unix_secs));
    if attempt > 0 {
        tag.push_str(&format!("-{attempt}"));
    }
    let tail_len = 1 + tag.len() + extension.map_or(0, |ext| ext.len() + 1);
    let mut stem = stem.to_string();
    while stem.len() + tail_len > MAX_NAME_BYTES && !stem.is_empty() {
        stem.pop();
    }
    let copy = match extension {
        Some(ext) if stem.len() + tail_len <= MAX_NAME_BYTES => format!("{stem}.{tag}.{ext}"),
        _ => format!("{stem}.{tag}"),
    };
    path.with_file_name(&copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use proptest::prelude::*;

    fn file(content: &[u8], executable: bool) -> Entry {
        Entry::File {
            hash: ContentHash::of(content),
            size: content.len() as u64,
            executable,
        }
    }

    fn at(entry: Option<Entry>, seq: u64) -> Versioned {
        Versioned {
            entry,
            seq: Seq(seq),
        }
    }

    #[test]
    fn decision_table() {
        use CommitDecision::*;
        let a = file(b"a", false);
        let b = file(b"b", false);
        let cases: Vec<(u64, Versioned, bool, Option<Entry>, CommitDecision)> = vec![
            // new file on an unseen path
            (0, at(None, 0), false, Some(a.clone()), Apply),
            // plain update, base matches
            (3, at(Some(a.clone()), 3), false, Some(b.clone()), Apply),
            // same content already there, whatever the base
            (
                1,
                at(Some(a.clone()), 3),
                false,
                Some(a.clone()),
                AlreadyCurrent,
            ),
            // concurrent edit: theirs keeps the path, ours is copied
            (
                1,
                at(Some(a.clone()), 3),
                false,
                Some(b.clone()),
                KeepTheirs { copy_ours: true },
            ),
            // both created the same new path with different content
            (
                0,
                at(Some(a.clone()), 2),
                false,
                Some(b.clone()),
                KeepTheirs { copy_ours: true },
            ),
            // modify vs delete: the modification wins either way
            (1, at(None, 3), false, Some(b.clone()), Apply),
            (
                1,
                at(Some(a.clone()), 3),
                false,
                None,
                KeepTheirs { copy_ours: false },
            ),
            // both deleted
            (1, at(None, 3), false, None, AlreadyCurrent),
            // plain delete
            (3, at(Some(a.clone()), 3), false, None, Apply),
            // executable bit only, concurrently: content is the same, nothing to copy
            (
                1,
                at(Some(file(b"a", true)), 3),
                false,
                Some(a.clone()),
                KeepTheirs { copy_ours: false },
            ),
            // directory that gained children is neither deleted nor replaced
            (
                3,
                at(Some(Entry::Dir), 3),
                true,
                None,
                KeepTheirs { copy_ours: false },
            ),
            (
                3,
                at(Some(Entry::Dir), 3),
                true,
                Some(a.clone()),
                KeepTheirs { copy_ours: true },
            ),
            (3, at(Some(Entry::Dir), 3), false, None, Apply),
            // dir vs file created concurrently
            (
                0,
                at(Some(a.clone()), 1),
                false,
                Some(Entry::Dir),
                KeepTheirs { copy_ours: true },
            ),
        ];
        for (base, current, children, ours, expect) in cases {
            assert_eq!(
                decide_commit(Seq(base), &current, children, ours.as_ref()),
                expect,
                "base {base} current {current:?} ours {ours:?}"
            );
        }
    }

    #[test]
    fn utc_format() {
        assert_eq!(format_utc(0), "19700101T000000Z");
        assert_eq!(format_utc(1_795_300_000), "20261121T222640Z");
        assert_eq!(format_utc(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn utc_round_trip() {
        for t in [0, 951_782_400, 1_795_300_000, 4_102_444_799] {
            assert_eq!(parse_utc(&format_utc(t)), Some(t));
        }
        for bad in [
            "",
            "20261121T222640",
            "2026112XT222640Z",
            "20261321T222640Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn conflict_names() {
        let node = NodeId::new("node-b").unwrap();
        let t = 1_795_300_000;
        let check = |path: &str, split: bool, attempt: u32, expect: &str| {
            let got =
                conflict_copy_name(&RelPath::new(path).unwrap(), &node, t, attempt, split).unwrap();
            assert_eq!(got.as_str(), expect);
        };
        check(
            "docs/report.txt",
            true,
            0,
            "docs/report.conflict-node-b-20261121T222640Z.txt",
        );
        check(
            "a.tar.gz",
            true,
            0,
            "a.tar.conflict-node-b-20261121T222640Z.gz",
        );
        check(
            "Makefile",
            true,
            0,
            "Makefile.conflict-node-b-20261121T222640Z",
        );
        check(
            ".bashrc",
            true,
            0,
            ".bashrc.conflict-node-b-20261121T222640Z",
        );
        check(
            "trailing.",
            true,
            0,
            "trailing..conflict-node-b-20261121T222640Z",
        );
        check(
            "dir.v2",
            false,
            0,
            "dir.v2.conflict-node-b-20261121T222640Z",
        );
        check("x.txt", true, 2, "x.conflict-node-b-20261121T222640Z-2.txt");
        let long = format!("{}.txt", "n".repeat(250));
        let got = conflict_copy_name(&RelPath::new(&long).unwrap(), &node, t, 0, true).unwrap();
        assert!(got.as_str().len() <= MAX_NAME_BYTES);
        assert!(got.as_str().ends_with("-20261121T222640Z.txt"));
    }

    #[test]
    fn copy_candidates_keep_dir_names_whole_and_count_attempts() {
        let node = NodeId::new("n1").unwrap();
        let path = RelPath::new("d/x.v2").unwrap();
        let names: Vec<String> = conflict_copy_candidates(&path, &node, 0, &Entry::Dir)
            .map(|name| name.unwrap().to_string())
            .collect();
        assert_eq!(names.len(), MAX_COPY_ATTEMPTS as usize);
        assert_eq!(names[0], "d/x.v2.conflict-n1-19700101T000000Z");
        assert_eq!(names[1], "d/x.v2.conflict-n1-19700101T000000Z-1");
        let file = file(b"a", false);
        let first = conflict_copy_candidates(&path, &node, 0, &file)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(first.as_str(), "d/x.conflict-n1-19700101T000000Z.v2");
    }

    #[test]
    fn children_matter_only_when_a_directory_would_go() {
        let dir = at(Some(Entry::Dir), 2);
        let a = file(b"a", false);
        assert!(children_matter(&dir, None));
        assert!(children_matter(&dir, Some(&a)));
        assert!(!children_matter(&dir, Some(&Entry::Dir)));
        assert!(!children_matter(&at(Some(a.clone()), 2), None));
        assert!(!children_matter(&at(None, 2), Some(&a)));
    }

    fn entry_strategy() -> impl Strategy<Value = Option<Entry>> {
        prop_oneof![
            Just(None),
            Just(Some(Entry::Dir)),
            (0u8..4, any::<bool>())
                .prop_map(|(content, executable)| Some(file(&[content], executable))),
            (0u8..2).prop_map(|t| Some(Entry::Symlink {
                target: format!("t{t}")
            })),
        ]
    }

    /// One path on the hub plus its conflict copies.
    #[derive(Clone, Debug)]
    struct Hub {
        current: Versioned,
        copies: Vec<Entry>,
    }

    impl Hub {
        fn propose(&mut self, base: Seq, ours: Option<Entry>) {
            match decide_commit(base, &self.current, false, ours.as_ref()) {
                CommitDecision::Apply => {
                    self.current = Versioned {
                        entry: ours,
                        seq: self.current.seq.next(),
                    }
                }
                CommitDecision::AlreadyCurrent => {}
                CommitDecision::KeepTheirs { copy_ours } => {
                    if copy_ours {
                        self.copies.extend(ours);
                    }
                }
            }
        }

        /// Every distinct content present on the hub (path or copy).
        fn contents(&self) -> Vec<String> {
            let mut out: Vec<String> = self
                .copies
                .iter()
                .chain(self.current.entry.iter())
                .map(|entry| match entry {
                    Entry::File { hash, .. } => format!("file {hash}"),
                    other => format!("{other:?}"),
                })
                .collect();
            out.sort();
            out.dedup();
            out
        }
    }

    proptest! {
        /// Nothing is lost: a proposed version with content either ends up at
        /// the path or as a conflict copy, unless the path already holds the
        /// same bytes.
        #[test]
        fn proposals_never_lose_content(base in 0u64..4, seq in 0u64..4, theirs in entry_strategy(), ours in entry_strategy(), children in any::<bool>()) {
            let current = at(theirs.clone(), seq);
            let decision = decide_commit(Seq(base), &current, children, ours.as_ref());
            if let Some(ours) = &ours {
                let kept_elsewhere = theirs.as_ref().is_some_and(|t| t.same_content(ours));
                prop_assert!(
                    decision == CommitDecision::Apply
                        || decision == CommitDecision::KeepTheirs { copy_ours: true }
                        || kept_elsewhere,
                    "{decision:?}"
                );
            }
            // The current version is only replaced by someone who has seen it,
            // or when it is a deletion.
            if decision == CommitDecision::Apply && theirs.is_some() {
                prop_assert_eq!(base, seq);
            }
        }

        /// Two nodes proposing from the same base end with the same contents
        /// on the hub whichever arrives first. (A node only proposes what
        /// differs from its base.)
        #[test]
        fn order_of_arrival_keeps_the_same_contents(start in entry_strategy(), a in entry_strategy(), b in entry_strategy()) {
            prop_assume!(a != start && b != start);
            let seq = if start.is_some() { 1 } else { 0 };
            let hub = Hub { current: at(start, seq), copies: vec![] };
            let mut ab = hub.clone();
            ab.propose(Seq(seq), a.clone());
            ab.propose(Seq(seq), b.clone());
            let mut ba = hub.clone();
            ba.propose(Seq(seq), b.clone());
            ba.propose(Seq(seq), a.clone());
            prop_assert_eq!(ab.contents(), ba.contents());
        }
    }
}
