//! The `outbox-relay` binary: parse, set up logging, run, map the outcome to an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use outbox_relay::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    outbox_relay::telemetry::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    cli::exit_code(runtime.block_on(cli::execute(cli)))
}
