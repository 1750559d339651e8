//! `wallet`: the sample service that writes events through the outbox. Configuration:
//! `DATABASE_URL`, `WALLET_ADDR`, `WALLET_OUTBOX_TABLE` (see `sample_service::wallet::Config`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sample_service::{telemetry, wallet};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let _telemetry = telemetry::init("wallet");
    let shutdown = CancellationToken::new();
    tokio::spawn(sample_service::telemetry::stop_on_signal(shutdown.clone()));
    let result = match wallet::Config::from_env() {
        Ok(config) => wallet::run(config, shutdown).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wallet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
