//! `weftctl cluster drain|undrain ID`: move traffic away from a cluster
//! without deleting anything. In every cluster given, the remote secrets
//! that register ID get the annotation `weft.io/draining` (a
//! comma-separated list of ids), which that cluster's control plane reads;
//! in the cluster that has no such secret (ID itself), its system
//! namespace gets `weft.io/draining: ID`, which its own control plane reads
//! and so do the others that watch it. Either way, ID's endpoints are used
//! only when nothing else is healthy. The secrets are written even when ID
//! itself no longer answers: a cluster on its way down can be drained.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Use ID's endpoints only when nothing else is healthy, in every cluster given.
    Drain(DrainArgs),
    /// Use ID's endpoints as before.
    Undrain(DrainArgs),
}

#[derive(Args)]
pub struct DrainArgs {
    /// The cluster's id, as remote secrets name it.
    id: String,
    /// A kubeconfig of each cluster of the mesh (repeatable).
    #[arg(long = "kubeconfig")]
    kubeconfigs: Vec<PathBuf>,
    /// A lab's directory instead: every lab cluster.
    #[arg(long, conflicts_with = "kubeconfigs")]
    dir: Option<PathBuf>,
    /// The control planes' namespace.
    #[arg(long, default_value = "weft-system")]
    namespace: String,
}

pub fn run(command: ClusterCommand) -> Result<()> {
    let (args, drain) = match command {
        ClusterCommand::Drain(args) => (args, true),
        ClusterCommand::Undrain(args) => (args, false),
    };
    // A lab's API servers live in its network: entered before any thread.
    let kubeconfigs = match &args.dir {
        Some(dir) => crate::lab::lab_kubeconfigs(dir)?,
        None => args.kubeconfigs.clone(),
    };
    if kubeconfigs.is_empty() {
        bail!("give the mesh's clusters: --kubeconfig for each, or --dir for a lab");
    }
    let out = tokio::runtime::Runtime::new()?.block_on(async {
        let mut out = String::new();
        for path in &kubeconfigs {
            let client = crate::remote::client(path, None).await?;
            let done = weft_control::drain::mark(&client, &args.namespace, &args.id, drain)
                .await
                .with_context(|| format!("in the cluster of {}", path.display()))?;
            out.push_str(&format!("{}: {done}\n", path.display()));
        }
        anyhow::Ok(out)
    })?;
    print!("{out}");
    println!(
        "{} {}: `weftctl remote-clusters` shows DRAINING once each control plane has read it",
        if drain { "draining" } else { "undrained" },
        args.id
    );
    Ok(())
}
