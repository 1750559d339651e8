//! `billing`: the sample consumer that charges purchased plans exactly once. Configuration:
//! `BILLING_*` env (see `sample_service::billing::Config`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sample_service::{billing, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let _telemetry = telemetry::init("billing");
    let shutdown = CancellationToken::new();
    tokio::spawn(sample_service::telemetry::stop_on_signal(shutdown.clone()));
    let result = match billing::Config::from_env() {
        Ok(config) => billing::run(config, shutdown).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("billing: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
