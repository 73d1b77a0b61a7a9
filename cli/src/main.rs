//! `weftctl`, the operator CLI: certificates, remote secrets, injection,
//! proxy status and the local lab.

mod analyze;
mod authz;
mod certs;
mod cluster;
mod inject;
mod lab;
mod proxy;
mod remote;

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
    /// Give other clusters' control planes read access to a cluster: prints a Secret to apply in them.
    CreateRemoteSecret(remote::CreateRemoteSecretArgs),
    /// List the clusters a running control plane watches, with sync state and staleness.
    RemoteClusters(remote::RemoteClustersArgs),
    /// Every proxy connected to a control plane, and whether it holds what the control plane has.
    ProxyStatus(proxy::ProxyStatusArgs),
    /// What one sidecar was told: workloads, services, routes, certs or policies.
    ProxyConfig(proxy::ProxyConfigArgs),
    /// Drain a cluster (traffic moves away, nothing is deleted), or undrain it.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Add weft sidecars to the workloads of a manifest, offline (prints the result).
    KubeInject(inject::KubeInjectArgs),
    /// Security policy: which policies a workload is under, and what they decide for a caller.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
    /// Traffic policy: fields weft refuses or ignores, references that resolve to nothing, routes not in force.
    Analyze(analyze::AnalyzeArgs),
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()?.block_on(future)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Lab(command) => lab::run(command),
        Command::CreateRemoteSecret(args) => {
            block_on(remote::create_remote_secret(args)).map(|out| print!("{out}"))
        }
        Command::KubeInject(args) => inject::run(args).map(|out| print!("{out}")),
        Command::Authz(command) => block_on(authz::run(command)).map(|out| print!("{out}")),
        Command::Analyze(args) => block_on(analyze::run(args)),
        Command::Cluster(command) => cluster::run(command),
        Command::RemoteClusters(args) => {
            block_on(remote::remote_clusters(args)).map(|out| print!("{out}"))
        }
        Command::ProxyStatus(args) => {
            block_on(proxy::proxy_status(args)).map(|out| print!("{out}"))
        }
        Command::ProxyConfig(args) => {
            block_on(proxy::proxy_config(args)).map(|out| print!("{out}"))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
