//! The command line: `outbox-relay run | migrate | status | replay | purge | dead-letters`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use std::sync::Arc;

use crate::config::Config;
use crate::engine;
use crate::error::Error;
use crate::http::{self, Health};
use crate::ops;
use crate::outbox;
use crate::pg::PgConn;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a Postgres transactional outbox to Kafka or RabbitMQ, at least once, in order per aggregate"
)]
pub struct Cli {
    /// TOML configuration file; every setting can also come from the environment.
    #[arg(long, short, global = true, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay daemon (SIGTERM/SIGINT: stop reading, wait for confirmations, exit 0).
    Run,
    /// Create or upgrade the outbox schema (table, bookkeeping columns, dead letters, NOTIFY
    /// trigger). Idempotent.
    Migrate,
    #[command(flatten)]
    Ops(ops::OpsCommand),
}

/// Runs a parsed command; the error is what the user reads.
pub async fn execute(cli: Cli) -> Result<(), Error> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => run(config).await,
        Command::Migrate => {
            let mut conn = PgConn::connect(&config.database_url).await?;
            let applied = outbox::migrate(&mut conn.client, &config).await?;
            info!(outbox = %config.outbox.table, migrations = ?applied, "outbox schema is up to date");
            println!(
                "outbox schema for `{}` is up to date ({} migrations applied)",
                config.outbox.table,
                applied.len()
            );
            Ok(())
        }
        Command::Ops(command) => ops::execute(&config, command).await,
    }
}

async fn run(config: Config) -> Result<(), Error> {
    crate::telemetry::init_tracing().map_err(Error::Config)?;
    let metrics = crate::metrics::install()?;
    crate::metrics::spawn_upkeep(&metrics);
    let shutdown = CancellationToken::new();
    let shutdown_timeout = config.delivery.shutdown_timeout;
    let health = Arc::new(Health::default());
    if let Some(addr) = config.http.enabled_addr() {
        http::serve(addr, metrics, health.clone(), shutdown.clone()).await?;
    }
    tokio::spawn(http::observe(
        config.clone(),
        health.clone(),
        Duration::from_secs(2),
        shutdown.clone(),
    ));
    tokio::spawn(watch_signals(shutdown.clone()));
    let mut daemon = tokio::spawn(engine::run(config, shutdown.clone(), health));
    let outcome = tokio::select! {
        joined = &mut daemon => joined,
        _ = deadline_after(&shutdown, shutdown_timeout) => {
            warn!(timeout = ?shutdown_timeout, "shutdown timed out waiting for confirmations; unconfirmed events will be sent again by the next relay");
            daemon.abort();
            crate::telemetry::shutdown_tracing();
            return Ok(());
        }
    };
    crate::telemetry::shutdown_tracing();
    match outcome {
        Ok(result) => {
            if result.is_ok() {
                info!("relay stopped");
            }
            result
        }
        Err(e) => Err(Error::Setup(format!("the relay task failed: {e}"))),
    }
}

async fn deadline_after(shutdown: &CancellationToken, timeout: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(timeout).await;
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping after in-flight confirmations"),
        _ = int.recv() => info!("SIGINT: stopping after in-flight confirmations"),
    }
    shutdown.cancel();
}

/// Maps the outcome to the process exit code: 0 on success, 1 on any error (printed once).
pub fn exit_code(result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: error: {e}");
            ExitCode::FAILURE
        }
    }
}
