//! The one error type the supervisor looks at: transient errors restart the session with
//! backoff, the rest stop the process with a message that says what to fix.

use crate::mapping::{MissingColumn, UnmappableRow};
use crate::sink::SinkError;
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Unmappable(#[from] UnmappableRow),
    #[error(transparent)]
    Schema(#[from] MissingColumn),
}

impl Error {
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Source(e) => e.is_transient(),
            Error::Sink(e) => e.is_transient(),
            Error::Unmappable(_) | Error::Schema(_) => false,
        }
    }
}
