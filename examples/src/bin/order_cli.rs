//! `order-cli`: create, get and watch orders of the order service.
//!
//! Run: `cargo run -p saga-examples --bin order-cli -- create --user alice --item apple:2:10.25`

use std::process::ExitCode;

use clap::Parser;
use saga_examples::cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("order-cli: {error}");
            ExitCode::FAILURE
        }
    }
}
