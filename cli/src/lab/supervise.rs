//! The background process of `weftctl lab up`: it holds the lab (API
//! servers in-process, control planes and pods as children), writes
//! `state.json` once everything is up, and tears it all down on SIGTERM.

use std::time::Duration;

use anyhow::{Context, Result};
use weft_lab::lab::{Lab, LabOptions};
use weft_lab::mesh::Binaries;
use weft_lab::netns;
use weft_lab::runner::Network;

use super::SuperviseArgs;

pub fn run(args: SuperviseArgs) -> Result<()> {
    let network = if args.loopback {
        Network::Loopback
    } else {
        Network::Namespaces
    };
    let dir = args.dir.dir.clone();
    if network == Network::Namespaces {
        netns::create_router(args.clusters)?;
        // Before any thread exists, so the whole process moves.
        netns::enter(netns::ROUTER)?;
    }
    let result = tokio::runtime::Runtime::new()?.block_on(async {
        let binaries = Binaries::locate()?;
        let lab = Lab::up(LabOptions {
            clusters: args.clusters,
            multi_network: args.multi_network,
            ..LabOptions::two_clusters(network, dir.clone(), binaries)
        })
        .await?;
        let state = serde_json::to_string_pretty(&lab.state())?;
        let temporary = dir.join("state.json.tmp");
        std::fs::write(&temporary, state)?;
        std::fs::rename(&temporary, dir.join("state.json")).context("writing state.json")?;
        println!("lab up");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        println!("stopping the lab");
        tokio::time::timeout(Duration::from_secs(35), lab.down())
            .await
            .context("stopping the lab took too long")?;
        anyhow::Ok(())
    });
    let _ = std::fs::remove_file(dir.join("state.json"));
    if network == Network::Namespaces {
        netns::sweep();
    }
    if let Err(err) = &result {
        eprintln!("error: {err:#}");
    }
    result
}
