//! Errors of the filesystem layer. Each names the path and the operation.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: a component is not a directory (or is a symlink, which is never followed)")]
    NotADirectory { path: String },
    #[error("{path}: content hash {actual} does not match the expected {expected}")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: changed on disk since it was planned; not overwritten")]
    TargetChanged { path: String },
    #[error("{path} exists already; it is never overwritten")]
    Exists { path: String },
    #[error("{path}: directory is not empty")]
    NotEmpty { path: String },
    #[error("{path}: {what}")]
    Unsupported { path: String, what: String },
    #[error("{path} is in use by another ghostmirror process{}", holder.as_ref().map(|h| format!(" (pid {h})")).unwrap_or_default())]
    Locked {
        path: String,
        holder: Option<String>,
    },
}

impl FsError {
    pub fn io(
        op: &'static str,
        path: impl std::fmt::Display,
        source: impl Into<io::Error>,
    ) -> Self {
        FsError::Io {
            op,
            path: path.to_string(),
            source: source.into(),
        }
    }

    /// True for errors that a fresh plan can get past (the disk moved under
    /// us), as opposed to errors a person must look at.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FsError::TargetChanged { .. } | FsError::HashMismatch { .. } | FsError::NotEmpty { .. }
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}
