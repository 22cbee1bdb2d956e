//! The commands a user runs: `run`, `backfill`, `verify`, `setup`, `status`, `demo`. This is the
//! outermost layer: it parses the command line ([`cli`]) and wires the source, pipeline, sink and
//! HTTP endpoint together. Nothing below it knows about flags.
//!
//! Imports go one way: [`cli`] owns the clap tree and imports each command's arguments; a command
//! imports the argument groups and value parsers it shares with others from [`args`] and the
//! errors from [`error`], which import no command (`tests/cli.rs` checks there is no cycle).

pub mod args;
pub mod backfill;
pub mod cli;
pub mod demo;
pub mod error;
mod failover;
pub mod run;
pub mod setup;
pub mod status;
pub mod tables;
pub mod verify;

use tokio::sync::watch;

pub use cli::{Cli, Command, Invocation, LogFormat, Task, command, parse_cli};
pub use error::{AdminError, ConfigError};

/// What a command failed with, after its flags were checked; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error(transparent)]
    Backfill(#[from] backfill::BackfillError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

impl CommandError {
    /// A state the flags cannot be honoured in, found at start before anything was published
    /// (`--initial-backfill` with a slot events were published from): exit 2, as for a wrong
    /// flag.
    pub fn is_usage(&self) -> bool {
        matches!(self, CommandError::Run(run::RunError::Pipeline(err)) if err.is_usage())
    }
}

/// Runs `task` until it is done, fails, or `shutdown` turns true.
pub async fn execute(task: Task, shutdown: watch::Receiver<bool>) -> Result<(), CommandError> {
    match task {
        Task::Run(run) => run::execute(*run, shutdown).await?,
        Task::Backfill(backfill) => backfill::execute(*backfill).await?,
        Task::Setup(setup) => setup::setup(*setup).await?,
        Task::Status(status) => status::status(*status).await?,
        Task::Demo(args) => demo::run(args, shutdown).await?,
        Task::Verify(verify) => verify::execute(*verify).await?,
    }
    Ok(())
}
