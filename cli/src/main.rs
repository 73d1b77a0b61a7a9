//! `weftctl`, the operator CLI: certificates, remote secrets, injection,
//! proxy status and the local lab.

use clap::Parser;

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Operate a weft multi-cluster mesh")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
