//! The library's one error type: why the server could not open its data directory or serve.
//! Failures of single HTTP requests are [`crate::ApiError`]s instead.

use std::fmt;
use std::path::PathBuf;

/// Why [`crate::open`] or [`crate::serve`] failed.
#[derive(Debug)]
pub enum Error {
    /// A file or directory in the data directory could not be created, read or written.
    Io {
        /// The path involved.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A secret file exists but does not hold what the server wrote there.
    InvalidSecretFile {
        /// The file.
        path: PathBuf,
    },
    /// The database exists but a secret it depends on (the master key or the signing key)
    /// is gone: creating a new one would make every stored model key unreadable or every
    /// issued top-up unverifiable.
    MissingSecretFile {
        /// The missing file.
        path: PathBuf,
    },
    /// The database could not be opened or a query at start-up failed.
    Database(sqlx::Error),
    /// The embedded migrations could not be applied (for example the database was written
    /// by a newer server).
    Migration(sqlx::migrate::MigrateError),
    /// The listener failed while serving.
    Serve(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(
                f,
                "cannot use {}: {source}; check that the server's data directory is writable by this user",
                path.display()
            ),
            Error::InvalidSecretFile { path } => write!(
                f,
                "{} is not a file this server wrote; restore it from your backup of the data directory",
                path.display()
            ),
            Error::MissingSecretFile { path } => write!(
                f,
                "{} is missing but the database exists; restore it from your backup of the data directory (a new one would make the stored keys unusable)",
                path.display()
            ),
            Error::Database(e) => write!(
                f,
                "the server database failed ({e}); check the data directory's disk space and permissions"
            ),
            Error::Migration(e) => write!(
                f,
                "the server database could not be migrated ({e}); it may have been written by a newer mlcapsule, upgrade it"
            ),
            Error::Serve(e) => write!(
                f,
                "the HTTP listener failed ({e}); check the address and restart the server"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Database(e) => Some(e),
            Error::Migration(e) => Some(e),
            Error::Serve(e) => Some(e),
            Error::InvalidSecretFile { .. } | Error::MissingSecretFile { .. } => None,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Database(e)
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Error {
        Error::Migration(e)
    }
}
