//! The commands a user runs: `run`, `backfill`, `verify`, `setup`, `status`, `demo`. This is the outermost layer: it
//! parses the command line ([`cli`]) and wires the source, pipeline, sink and HTTP endpoint
//! together. Nothing below it knows about flags.

pub mod backfill;
pub mod cli;
pub mod demo;
mod failover;
pub mod run;
pub mod setup;
pub mod status;
pub mod verify;

use tokio::sync::watch;

pub use cli::{Cli, Command, ConfigError, Invocation, LogFormat, parse_cli};

/// What a command failed with; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error(transparent)]
    Backfill(#[from] backfill::BackfillError),
    #[error(transparent)]
    Admin(#[from] setup::AdminError),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

impl CommandError {
    /// A flag or value found wrong before anything was connected: the process exits 2 for it,
    /// as for the usage errors the command line's parser finds, and 1 for everything else.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CommandError::Run(run::RunError::Config(_))
                | CommandError::Backfill(backfill::BackfillError::Config(_))
                | CommandError::Admin(setup::AdminError::Config(_))
                | CommandError::Verify(verify::VerifyError::Config(_))
        )
    }
}

/// Runs `command` until it is done, fails, or `shutdown` turns true.
pub async fn execute(
    command: Command,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CommandError> {
    match command {
        Command::Run(args) => run::execute(*args, shutdown).await?,
        Command::Backfill(args) => backfill::execute(*args).await?,
        Command::Setup(args) => setup::setup(args).await?,
        Command::Status(args) => status::status(args).await?,
        Command::Demo(args) => demo::run(args, shutdown).await?,
        Command::Verify(args) => verify::execute(*args).await?,
    }
    Ok(())
}
