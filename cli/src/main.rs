//! `weftctl`, the operator CLI: certificates, remote secrets, injection,
//! proxy status and the local lab.

mod certs;
mod lab;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Operate a weft multi-cluster mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the mesh's root CA, per-cluster intermediates, and workload certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// The local multi-cluster lab.
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Lab(command) => lab::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
