//! Ownership of what the engine writes (`GM_CHOWN`).
//!
//! - `on`: every file, directory and symlink it creates gets the owner and
//!   group of the directory it lands in, set while it is still in staging,
//!   so it is never visible at its final path with another owner;
//! - `auto`: as `on` until the first `EPERM` (a rootless container), then
//!   ownership is left alone from there on, with one warning;
//! - `off`: ownership is never changed.
//!
//! Modes are separate: the executable bit is always set on the open staging
//! file before the rename, whatever the policy.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Gid, Uid};
use rustix::io::Errno;

use crate::error::FsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChownPolicy {
    Off,
    On,
    Auto,
}

impl std::str::FromStr for ChownPolicy {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "off" => Ok(ChownPolicy::Off),
            "on" => Ok(ChownPolicy::On),
            "auto" => Ok(ChownPolicy::Auto),
            other => Err(format!(
                "{other:?} is not a chown policy: use auto, on or off"
            )),
        }
    }
}

#[derive(Debug)]
pub struct Ownership {
    policy: ChownPolicy,
    /// Set by `auto` after the first refusal.
    given_up: AtomicBool,
}

impl Ownership {
    pub fn new(policy: ChownPolicy) -> Ownership {
        Ownership {
            policy,
            given_up: AtomicBool::new(false),
        }
    }

    pub fn off() -> Ownership {
        Ownership::new(ChownPolicy::Off)
    }

    /// True while writes should be given their directory's owner.
    pub fn active(&self) -> bool {
        match self.policy {
            ChownPolicy::Off => false,
            ChownPolicy::On => true,
            ChownPolicy::Auto => !self.given_up.load(Ordering::Relaxed),
        }
    }

    /// What is in effect, for status.
    pub fn describe(&self) -> &'static str {
        match self.policy {
            ChownPolicy::Off => "off",
            ChownPolicy::On => "on",
            ChownPolicy::Auto if self.given_up.load(Ordering::Relaxed) => {
                "auto (off: not permitted here)"
            }
            ChownPolicy::Auto => "auto",
        }
    }

    /// Gives the entry `name` in `dir` (or the open file `fd` when `name`
    /// is `None`) the owner of `owner_dir`.
    pub(crate) fn apply(
        &self,
        owner_dir: impl AsFd,
        target: Target<'_>,
        shown: &str,
    ) -> Result<(), FsError> {
        if !self.active() {
            return Ok(());
        }
        let dir = rustix::fs::fstat(owner_dir)
            .map_err(|e| FsError::io("stat parent directory", shown, e))?;
        // Already owned so (the usual case: the engine runs as the owner
        // of the tree): no chown, which would dirty the inode and send the
        // watcher an attribute event for nothing.
        let current = match target {
            Target::Open(fd) => rustix::fs::fstat(fd),
            Target::Entry(dir, name) => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        };
        if let Ok(current) = current
            && (current.st_uid, current.st_gid) == (dir.st_uid, dir.st_gid)
        {
            return Ok(());
        }
        let (uid, gid) = (Uid::from_raw(dir.st_uid), Gid::from_raw(dir.st_gid));
        let result = match target {
            Target::Open(fd) => rustix::fs::fchown(fd, Some(uid), Some(gid)),
            Target::Entry(dir, name) => {
                rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(Errno::PERM) if self.policy == ChownPolicy::Auto => {
                if !self.given_up.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %shown, "cannot change file ownership here (rootless?); GM_CHOWN=auto leaves ownership alone from now on");
                }
                Ok(())
            }
            Err(e) => Err(FsError::io("chown", shown, e)),
        }
    }
}

/// What `Ownership::apply` changes.
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    Open(std::os::fd::BorrowedFd<'a>),
    Entry(std::os::fd::BorrowedFd<'a>, &'a str),
}
