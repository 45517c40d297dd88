//! One process per data directory (hub) or state directory (node): an
//! exclusive `flock` on a lock file, released when the process exits,
//! however it exits.

use std::io::{Read, Seek, Write};
use std::path::Path;

use rustix::fs::{FlockOperation, flock};

use crate::error::FsError;

/// Holds the lock until dropped.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock on `dir/name` or says who holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<DirLock, FsError> {
        let path = dir.join(name);
        let shown = path.display().to_string();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FsError::io("open lock file", &shown, e))?;
        if let Err(err) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if err == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_string();
                return Err(FsError::Locked {
                    path: dir.display().to_string(),
                    holder: (!holder.is_empty()).then_some(holder),
                });
            }
            return Err(FsError::io("lock", &shown, err));
        }
        file.set_len(0)
            .map_err(|e| FsError::io("truncate lock file", &shown, e))?;
        file.rewind()
            .map_err(|e| FsError::io("rewind lock file", &shown, e))?;
        write!(file, "{}", std::process::id())
            .map_err(|e| FsError::io("write lock file", &shown, e))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "lock").unwrap();
        let err = DirLock::acquire(dir.path(), "lock").err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("in use") && text.contains(&std::process::id().to_string()),
            "{text}"
        );
        drop(first);
        DirLock::acquire(dir.path(), "lock").unwrap();
    }
}
