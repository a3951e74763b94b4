//! `chipgate`: the command line for chipgate clusters.
//!
//! `chipgate dev` runs the whole cluster in one process; the other commands talk to a running cluster
//! as an operator or a buyer would.

mod dev;
mod out;

use clap::{Parser, Subcommand};

/// chipgate decides which buyer's order may take which export-controlled AI chip, while approval
/// waves, licence conditions, customs embargoes and scarce stock all change at once.
#[derive(Parser, Debug)]
#[command(name = "chipgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run licensing, inventory and orders in one process on fixed ports, on the embedded state backend
    /// (or Redis with --redis-url), and print how to reach them.
    Dev(dev::DevArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    chipgate_runtime::telemetry::init(chipgate_runtime::telemetry::LogFormat::Pretty);
    let result = match cli.command {
        Command::Dev(args) => dev::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chipgate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
