//! A whole lab: N clusters sharing one mesh root, registered with each
//! other, each with its pod runner, EndpointSlice controller and load
//! balancers; on one flat network, or (`multi_network`) each on its own,
//! joined by east-west gateways. `weftctl lab` and the end-to-end tests drive it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::sync::watch;

use crate::mesh::{Binaries, Cluster, ClusterOptions, MeshRoot};
use crate::netns;
use crate::runner::{self, Network, RunnerConfig};

/// The lab's world-traversable runtime directory, derived from its
/// directory so that `lab down` finds it again after a crash.
pub fn run_dir(dir: &std::path::Path) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::PermissionsExt;
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut hasher = std::hash::DefaultHasher::new();
    canonical.hash(&mut hasher);
    let path = std::env::temp_dir().join(format!("weft-lab-run-{:016x}", hasher.finish()));
    std::fs::create_dir_all(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub clusters: u8,
    pub network: Network,
    pub dir: PathBuf,
    pub binaries: Binaries,
    /// `RUST_LOG` for the control planes.
    pub log: String,
    /// Each cluster on a network of its own (`n1`, `n2`, ...), with no
    /// route between pod networks, joined by east-west gateways.
    pub multi_network: bool,
}

impl LabOptions {
    /// The demo's lab: two clusters, control planes logging at info with
    /// their clients' chatter left out.
    pub fn two_clusters(network: Network, dir: PathBuf, binaries: Binaries) -> Self {
        LabOptions {
            clusters: 2,
            network,
            dir,
            binaries,
            log: "info,kube=warn,tower=warn,hyper=warn".into(),
            multi_network: false,
        }
    }
}

pub struct Lab {
    pub root: MeshRoot,
    /// Binaries and volumes for containers that run as other users.
    pub run_dir: PathBuf,
    pub clusters: Vec<Cluster>,
    pub network: Network,
    pub multi_network: bool,
    pub dir: PathBuf,
    runners: Vec<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    controllers: Vec<tokio::task::JoinHandle<()>>,
}

impl Lab {
    /// Brings the lab up. With `Network::Namespaces` the caller must already
    /// be inside the router namespace (`netns::create_router`, then
    /// `netns::enter` before any thread starts).
    pub async fn up(options: LabOptions) -> Result<Lab> {
        if options.clusters == 0 || options.clusters > 9 {
            bail!("--clusters must be between 1 and 9");
        }
        if options.multi_network && options.network != Network::Namespaces {
            bail!(
                "a multi-network lab needs a network namespace per pod (root and iptables): loopback addresses cannot be kept apart"
            );
        }
        if options.multi_network {
            netns::isolate(options.clusters).context("isolating the clusters' pod networks")?;
        }
        std::fs::create_dir_all(&options.dir)?;
        let run_dir = run_dir(&options.dir)?;
        // Containers run as the user their securityContext names (the
        // sidecar as 1337): they get copies of the binaries where any user
        // can reach them, wherever this checkout lives.
        let mut staged = options.binaries.clone();
        let bin = run_dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        for (from, to) in [
            (&options.binaries.proxy, &mut staged.proxy),
            (&options.binaries.echo, &mut staged.echo),
        ] {
            let target = bin.join(from.file_name().context("a binary without a name")?);
            std::fs::copy(from, &target)
                .with_context(|| format!("copying {} to {}", from.display(), target.display()))?;
            *to = target;
        }
        let root = MeshRoot::generate("cluster.local")?;
        let mut clusters = Vec::new();
        for c in 1..=options.clusters {
            let name = format!("c{c}");
            let host = match options.network {
                Network::Namespaces => std::net::IpAddr::V4(netns::gateway(c)),
                Network::Loopback => std::net::IpAddr::from([127, 0, 0, 1]),
            };
            let cluster_options = ClusterOptions {
                network: if options.multi_network {
                    format!("n{c}")
                } else {
                    "lab".into()
                },
                host,
                region: "lab".into(),
                zone: format!("{name}-a"),
                service_cidr: format!("10.{}.0.0/16", 95 + c),
                log: options.log.clone(),
                ..ClusterOptions::new(&name, &options.dir)
            };
            let cluster = Cluster::start(cluster_options, &root, &options.binaries)
                .await
                .with_context(|| format!("starting cluster {name}"))?;
            if let Some(pid) = cluster.control_pid() {
                runner::record_pid(&options.dir, pid);
            }
            clusters.push(cluster);
        }
        for a in &clusters {
            for b in &clusters {
                if a.name() != b.name() {
                    a.add_remote(b).await?;
                }
            }
        }
        let mut runners = Vec::new();
        let mut controllers = Vec::new();
        // The lab's resolver, for names outside the mesh: on each cluster's
        // router address (port 53, as root), or on loopback.
        let mut upstreams = Vec::new();
        for c in 1..=options.clusters {
            let addr = match options.network {
                Network::Namespaces => std::net::SocketAddr::from((netns::gateway(c), 53)),
                Network::Loopback => "127.0.0.1:0".parse()?,
            };
            let socket = tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the lab resolver {addr}"))?;
            upstreams.push(socket.local_addr()?);
            controllers.push(tokio::spawn(crate::dns::serve_upstream(socket)));
        }
        for (i, cluster) in clusters.iter().enumerate() {
            let (stop, stopped) = watch::channel(false);
            let config = RunnerConfig {
                cluster_index: (i + 1) as u8,
                cluster: cluster.name().to_string(),
                node: cluster.node_name(),
                client: cluster.client.clone(),
                binaries: staged.clone(),
                dir: options.dir.clone(),
                run_dir: run_dir.clone(),
                network: options.network,
                control_plane: cluster.xds_addr,
                dns_upstream: upstreams.get(i).copied(),
            };
            runners.push((stop, tokio::spawn(runner::run(config, stopped))));
            controllers.push(tokio::spawn(crate::endpoints::run(cluster.client.clone())));
            if options.network == Network::Namespaces {
                controllers.push(tokio::spawn(crate::load_balancer::run(
                    cluster.client.clone(),
                    (i + 1) as u8,
                )));
            }
        }
        let lab = Lab {
            root,
            run_dir,
            clusters,
            network: options.network,
            multi_network: options.multi_network,
            dir: options.dir,
            runners,
            controllers,
        };
        if lab.multi_network {
            for cluster in &lab.clusters {
                lab.deploy_gateway(cluster.name()).await?;
            }
        }
        Ok(lab)
    }

    pub fn cluster(&self, name: &str) -> Result<&Cluster> {
        self.clusters
            .iter()
            .find(|c| c.name() == name)
            .with_context(|| format!("no cluster {name} in this lab"))
    }

    pub fn cluster_mut(&mut self, name: &str) -> Result<&mut Cluster> {
        self.clusters
            .iter_mut()
            .find(|c| c.name() == name)
            .with_context(|| format!("no cluster {name} in this lab"))
    }

    /// A debug view of cluster `of`'s control plane (`/debug/clusters`,
    /// `/debug/gateways`); null while it does not answer.
    pub async fn control_debug(&self, of: &str, path: &str) -> serde_json::Value {
        let Ok(cluster) = self.cluster(of) else {
            return serde_json::Value::Null;
        };
        match crate::mesh::http_get(cluster.monitoring_addr, path).await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    /// Marks cluster `id` draining (or not) in every lab cluster, as
    /// `weftctl cluster drain|undrain` does.
    pub async fn drain(&self, id: &str, drain: bool) -> Result<()> {
        for cluster in &self.clusters {
            weft_control::drain::mark(&cluster.client, "weft-system", id, drain).await?;
        }
        Ok(())
    }

    /// What `from`'s control plane says of the gateway of cluster `of`:
    /// `healthy`, `unhealthy`, `unknown`, or empty while it knows none.
    pub async fn gateway_health(&self, from: &str, of: &str) -> String {
        let name = format!("{of}/weft-system/weft-eastwest-gateway");
        let parsed = self.control_debug(from, "/debug/gateways").await;
        parsed["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["name"] == name.as_str())
            .and_then(|g| g["health"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until `from`'s control plane finds `of`'s gateway `health`.
    pub async fn wait_gateway(
        &self,
        from: &str,
        of: &str,
        health: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = std::time::Instant::now();
        while self.gateway_health(from, of).await != health {
            if started.elapsed() > timeout {
                bail!("{from} did not find {of}'s east-west gateway {health} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(started.elapsed())
    }

    /// Deploys cluster `name`'s east-west gateway (again).
    pub async fn deploy_gateway(&self, name: &str) -> Result<()> {
        let cluster = self.cluster(name)?;
        let manifest = include_str!("../../examples/lab/eastwest-gateway.yaml")
            .replace("{{cluster}}", cluster.name())
            .replace("{{network}}", &cluster.options.network);
        crate::apply::apply_all(&cluster.client, &manifest)
            .await
            .with_context(|| format!("deploying {name}'s east-west gateway"))?;
        Ok(())
    }

    /// What `lab status` and `lab down` read back.
    pub fn state(&self) -> serde_json::Value {
        json!({
            "pid": std::process::id(),
            "network": match self.network { Network::Namespaces => "namespaces", Network::Loopback => "loopback" },
            "router": if self.network == Network::Namespaces { netns::ROUTER } else { "" },
            "networks": if self.multi_network { "multi" } else { "flat" },
            "clusters": self.clusters.iter().map(|c| json!({
                "name": c.name(),
                "kubeconfig": c.kubeconfig,
                "api": c.api.addr(),
                "xds": c.xds_addr,
                "monitoring": c.monitoring_addr,
                "control_pid": c.control_pid(),
                "network": c.options.network,
            })).collect::<Vec<_>>(),
        })
    }

    /// Stops every pod, runner, controller, control plane and API server.
    pub async fn down(self) {
        for (stop, _) in &self.runners {
            let _ = stop.send(true);
        }
        for (_, task) in self.runners {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        for task in self.controllers {
            task.abort();
        }
        for cluster in self.clusters {
            cluster.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
