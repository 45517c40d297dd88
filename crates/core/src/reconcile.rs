//! The node's per-path decision between its three trees: the synced tree
//! (the merge base, last version both sides agreed on), the local tree
//! (disk) and the remote tree (the hub's journal).
//!
//! Guarantee: a local change is never overwritten by a plan. When both
//! sides changed, the node proposes its version with the old base and the
//! hub's conflict rule (`conflict::decide_commit`) settles it, so there is
//! one place where conflicts are decided.

use crate::entry::Entry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// Nothing changed on either side.
    Nothing,
    /// Disk already holds the remote version: record it as synced.
    AdoptRemote,
    /// Only the hub changed: write the remote version to disk.
    ApplyRemote,
    /// The node changed (and maybe the hub too): propose the local version
    /// to the hub with the synced seq as base.
    Propose,
}

/// `remote` is `None` when the hub has no newer version than the synced
/// one, `Some(entry)` (where `entry == None` is a deletion) otherwise.
pub fn decide_node(
    base: Option<&Entry>,
    local: Option<&Entry>,
    remote: Option<Option<&Entry>>,
) -> NodeAction {
    let local_changed = local != base;
    match remote {
        None if local_changed => NodeAction::Propose,
        None => NodeAction::Nothing,
        Some(remote) if local == remote => NodeAction::AdoptRemote,
        Some(_) if !local_changed => NodeAction::ApplyRemote,
        Some(_) => NodeAction::Propose,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use proptest::prelude::*;

    fn entry_strategy() -> impl Strategy<Value = Option<Entry>> {
        prop_oneof![
            Just(None),
            Just(Some(Entry::Dir)),
            (0u8..3, any::<bool>()).prop_map(|(c, x)| Some(Entry::File {
                hash: ContentHash::of(&[c]),
                size: 1,
                executable: x
            })),
        ]
    }

    #[test]
    fn table() {
        let a = Entry::Dir;
        let b = Entry::Symlink { target: "t".into() };
        use NodeAction::*;
        assert_eq!(decide_node(Some(&a), Some(&a), None), Nothing);
        assert_eq!(decide_node(Some(&a), Some(&b), None), Propose);
        assert_eq!(decide_node(Some(&a), None, None), Propose);
        assert_eq!(decide_node(Some(&a), Some(&a), Some(Some(&b))), ApplyRemote);
        assert_eq!(decide_node(Some(&a), Some(&a), Some(None)), ApplyRemote);
        assert_eq!(decide_node(Some(&a), Some(&b), Some(Some(&b))), AdoptRemote);
        assert_eq!(decide_node(Some(&a), None, Some(None)), AdoptRemote);
        assert_eq!(decide_node(None, Some(&b), Some(Some(&a))), Propose);
        assert_eq!(decide_node(None, None, None), Nothing);
    }

    proptest! {
        /// A local change is never overwritten.
        #[test]
        fn local_changes_are_never_overwritten(base in entry_strategy(), local in entry_strategy(), remote in proptest::option::of(entry_strategy())) {
            let action = decide_node(base.as_ref(), local.as_ref(), remote.as_ref().map(|r| r.as_ref()));
            if local != base {
                prop_assert_ne!(action, NodeAction::ApplyRemote);
            }
            if action == NodeAction::AdoptRemote {
                prop_assert_eq!(Some(&local), remote.as_ref());
            }
        }
    }
}
