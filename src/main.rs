use std::io::IsTerminal;
use std::process::ExitCode;

use outbox_cdc::commands::{self, ConfigError, Invocation, LogFormat, parse_cli};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

// The hot path allocates a few small buffers per event (message headers, the publish's reply
// subject); mimalloc serves them faster than glibc's malloc (docs/design.md, "One thread").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every error that ends the process is printed the same way, last, on stderr:
/// `error: <message>`. Flag, value and config file errors exit 2 before anything starts (clap's
/// own add the usage); the others exit 1, and with `--log-format json` are also logged as an
/// ERROR record for log pipelines.
fn main() -> ExitCode {
    let (log_format, task) = match parse_cli(std::env::args_os()) {
        Ok(Invocation::Task { log_format, task }) => (log_format, task),
        Ok(Invocation::PrintConfig(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        // --help, --version and usage errors print and exit as clap does.
        Err(ConfigError::Cli(err)) => err.exit(),
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the pipeline, the replication reader and the NATS connection hand each row to
    // one another, and on one thread that costs no cross-thread wake-ups (docs/design.md).
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async {
            let shutdown = shutdown_signal()
                .map_err(|e| (ExitCode::FAILURE, format!("cannot watch for signals: {e}")))?;
            commands::execute(task, shutdown).await.map_err(|e| {
                let code = if e.is_usage() { 2 } else { 1 };
                (ExitCode::from(code), e.to_string())
            })
        }),
        Err(err) => Err((
            ExitCode::FAILURE,
            format!("cannot start the async runtime: {err}"),
        )),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, err)) => {
            if log_format == LogFormat::Json {
                tracing::error!("{err}");
            }
            eprintln!("error: {err}");
            code
        }
    }
}

/// Turns true on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight publishes, then stopping"),
            _ = int.recv() => tracing::info!("SIGINT: finishing in-flight publishes, then stopping"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Our own logs at info; the clients' connection chatter only when it is a warning.
const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn,tokio_postgres=warn";

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colours only for a person at a terminal, not in a log file or a container's log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
