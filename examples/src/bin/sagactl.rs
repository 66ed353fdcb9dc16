//! `sagactl`: inspect and repair sagas, replay dead letters, through the
//! admin API of a saga service (the order service started with `ADMIN_TOKEN`).
//!
//! Run: `ADMIN_TOKEN=… cargo run -p saga-examples --bin sagactl -- list --stuck-for 5m`

use std::process::ExitCode;

use clap::Parser;
use saga_examples::sagactl::{Sagactl, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Sagactl::parse();
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sagactl: {error}");
            ExitCode::FAILURE
        }
    }
}
