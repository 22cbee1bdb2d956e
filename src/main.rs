use std::process::ExitCode;

use outbox_cdc::config::{Command, ConfigError, Invocation, LogFormat, parse_cli};
use outbox_cdc::http::HttpServer;
use outbox_cdc::stats::Stats;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

// The hot path allocates a few small buffers per event (message headers, the NATS client's
// request bookkeeping); mimalloc serves them faster than glibc's malloc (see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args_os()) {
        Ok(Invocation::Command(cli)) => cli,
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
    init_logging(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the pipeline, the replication reader and the NATS connection hand each row to
    // one another, and on one thread that costs no cross-thread wake-ups (1.6× the catch-up rate
    // of the multi-threaded runtime on 2 cores, at less than half the CPU; see README).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let config = args.resolve()?;
            tracing::info!(
                database = %config.source.database,
                nats = %outbox_cdc::sink::redact_nats_url(config.sink.urls.expose()),
                slot = %config.source.slot,
                publication = %config.source.publication,
                "starting outbox-cdc {}",
                env!("CARGO_PKG_VERSION")
            );
            let stats = Arc::new(Stats::default());
            let shutdown = shutdown_signal()?;
            if let Some(addr) = config.http_addr {
                let server = HttpServer::bind(addr).await?;
                if let Some(bound) = server.local_addr() {
                    tracing::info!("serving /healthz, /readyz and /metrics on http://{bound}");
                }
                tokio::spawn(server.serve(stats.clone(), shutdown.clone()));
            }
            outbox_cdc::run::run(config, &stats, shutdown).await?;
            Ok(())
        }
        Command::Setup(args) => Ok(outbox_cdc::admin::setup(args).await?),
        Command::Status(args) => Ok(outbox_cdc::admin::status(args).await?),
        Command::Demo(args) => {
            let shutdown = shutdown_signal()?;
            outbox_cdc::demo::run(args, shutdown).await?;
            Ok(())
        }
    }
}

/// Turns true on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
