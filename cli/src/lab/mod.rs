//! `weftctl lab`: a multi-cluster mesh on this machine. `up` starts a
//! supervisor in the background (API servers, control planes, pod runners)
//! and returns; `status`, `apply` and `exec` work against it; `down` stops
//! it and removes everything it made, also after a crash; `demo` runs the
//! whole story in the foreground and tears it down.

mod apiserver;
mod demo;
mod supervise;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use weft_lab::mesh::Binaries;
use weft_lab::netns;
use weft_lab::runner::Network;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Run a Kubernetes-API-compatible API server (kubectl and the kube crate work against it).
    Apiserver(apiserver::ApiserverArgs),
    /// Bring up N clusters with weft installed, in the background.
    Up(UpArgs),
    /// Stop the lab and remove every process, namespace and link it made (idempotent).
    Down(DirArgs),
    /// Clusters, pods and control-plane sync state.
    Status(DirArgs),
    /// Apply a manifest to one lab cluster (pods are injected through the webhook).
    Apply(ApplyArgs),
    /// Run a command in a pod's network (its sidecar captures the traffic).
    Exec(ExecArgs),
    /// The demo: up, deploy echo v1/v2 and a client, traffic, failover, restore, down.
    Demo(DemoArgs),
    /// (internal) The background process `up` starts.
    #[command(hide = true)]
    Supervise(SuperviseArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkKind {
    /// One network: pods of every cluster reach each other directly.
    Flat,
    /// Isolated networks joined by east-west gateways.
    Multi,
}

#[derive(Args, Clone)]
pub struct DirArgs {
    /// The lab's directory: state, kubeconfigs, logs.
    #[arg(long, default_value = "weft-lab")]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 2)]
    clusters: u8,
    #[arg(long, value_enum, default_value = "flat")]
    network: NetworkKind,
    /// Use loopback addresses and explicit-proxy mode even as root.
    #[arg(long)]
    loopback: bool,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(Args)]
pub struct SuperviseArgs {
    #[arg(long)]
    clusters: u8,
    #[arg(long)]
    loopback: bool,
    #[arg(long)]
    multi_network: bool,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(Args)]
pub struct ApplyArgs {
    #[arg(long, default_value = "c1")]
    cluster: String,
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(Args)]
pub struct ExecArgs {
    pod: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Which cluster's pod (when the name is in several).
    #[arg(long)]
    cluster: Option<String>,
    #[command(flatten)]
    dir: DirArgs,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "weft-lab-demo")]
    dir: PathBuf,
    /// Use loopback addresses and explicit-proxy mode even as root.
    #[arg(long)]
    loopback: bool,
    /// `multi`: each cluster on a network of its own, joined only by
    /// east-west gateways (needs root and iptables).
    #[arg(long, value_enum, default_value = "flat")]
    network: NetworkKind,
    /// Leave the lab running at the end (stop it with Ctrl-C).
    #[arg(long)]
    keep: bool,
}

pub fn run(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Apiserver(args) => apiserver::run(args),
        LabCommand::Up(args) => up(args),
        LabCommand::Down(args) => down(&args.dir),
        LabCommand::Status(args) => status(&args.dir),
        LabCommand::Apply(args) => apply(args),
        LabCommand::Exec(args) => exec(args),
        LabCommand::Demo(args) => demo::run(args),
        LabCommand::Supervise(args) => supervise::run(args),
    }
}

/// The network the lab will use, and why if not namespaces.
pub fn choose_network(loopback: bool) -> (Network, Option<String>) {
    if loopback {
        return (Network::Loopback, Some("--loopback given".into()));
    }
    match netns::unavailable() {
        None => (Network::Namespaces, None),
        Some(reason) => (Network::Loopback, Some(reason)),
    }
}

/// The binaries the lab runs; built with cargo when missing and this
/// weftctl was itself built in a cargo workspace.
pub fn ensure_binaries() -> Result<Binaries> {
    if let Ok(found) = Binaries::locate() {
        return Ok(found);
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().context("weftctl has no directory")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = profile_dir
        .ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join("control").is_dir())
        .context("weft-control, weft-proxy and weft-echo are not next to weftctl, and this is not a weft checkout to build them in")?;
    eprintln!("building weft-control, weft-proxy and weft-echo ...");
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(workspace).args([
        "build",
        "-q",
        "-p",
        "weft-control",
        "-p",
        "weft-proxy",
        "-p",
        "weft-echo",
    ]);
    if release {
        cargo.arg("--release");
    }
    let status = cargo.status().context("running cargo")?;
    if !status.success() {
        bail!("building the lab's binaries failed");
    }
    Binaries::locate()
}

pub fn read_state(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no lab is running from {} (no {})",
            dir.display(),
            path.display()
        )
    })?;
    Ok(serde_json::from_str(&text)?)
}

/// The kubeconfigs of a running lab's clusters, with this process moved
/// into the lab's network (before any thread starts) so they answer.
pub fn lab_kubeconfigs(dir: &Path) -> Result<Vec<PathBuf>> {
    let state = read_state(dir)?;
    enter_lab_network(&state)?;
    Ok(state["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["kubeconfig"].as_str().map(PathBuf::from))
        .collect())
}

/// Enters the lab's router namespace when the lab uses namespaces; must
/// run before any thread starts.
fn enter_lab_network(state: &serde_json::Value) -> Result<()> {
    if state["network"] == "namespaces" {
        netns::enter(netns::ROUTER)?;
    }
    Ok(())
}

async fn client_for(state: &serde_json::Value, cluster: &str) -> Result<kube::Client> {
    let entry = state["clusters"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == cluster))
        .with_context(|| format!("no cluster {cluster} in this lab"))?;
    let path = entry["kubeconfig"].as_str().context("no kubeconfig")?;
    let kubeconfig = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(weft_lab::apiserver::client_for(&kubeconfig).await?)
}

fn up(args: UpArgs) -> Result<()> {
    let dir = &args.dir.dir;
    if dir.join("state.json").exists() {
        bail!(
            "a lab is already running from {} (weftctl lab down --dir {0})",
            dir.display()
        );
    }
    ensure_binaries()?;
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let (network, reason) = choose_network(args.loopback);
    if args.network == NetworkKind::Multi
        && let Some(reason) = &reason
    {
        bail!("--network multi needs a network namespace per pod, and {reason}");
    }
    if let Some(reason) = &reason {
        println!(
            "network: loopback addresses, explicit proxy mode ({reason}); run as root with iptables for per-pod namespaces and transparent capture"
        );
    }
    let log = std::fs::File::create(dir.join("lab.log"))?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args([
            "lab",
            "supervise",
            "--clusters",
            &args.clusters.to_string(),
            "--dir",
        ])
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if network == Network::Loopback {
        command.arg("--loopback");
    }
    if args.network == NetworkKind::Multi {
        command.arg("--multi-network");
    }
    // Its own session: the supervisor outlives this command and the terminal.
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the lab supervisor")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if dir.join("state.json").exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("lab.log")).unwrap_or_default();
            bail!("the lab supervisor exited ({status}):\n{}", tail(&log, 15));
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the lab did not come up in 120 s; see {}",
                dir.join("lab.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("lab up: {} clusters in {}", args.clusters, dir.display());
    status(&dir)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Stops the lab. Safe to run twice, and after a crash: it also stops any
/// process the lab recorded and removes every namespace it made.
pub fn down(dir: &Path) -> Result<()> {
    if let Ok(state) = read_state(dir)
        && let Some(pid) = state["pid"].as_i64()
    {
        let pid = pid as i32;
        if alive(pid) {
            // SAFETY: kill(2) on the supervisor's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let mut stopped = 0;
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if alive(pid) && recorded_process(pid) {
                // SAFETY: a process the lab started (checked by its binary).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                stopped += 1;
            }
        }
    }
    let namespaces = netns::sweep();
    if let Ok(run_dir) = weft_lab::lab::run_dir(dir) {
        let _ = std::fs::remove_dir_all(run_dir);
    }
    let _ = std::fs::remove_file(dir.join("state.json"));
    let _ = std::fs::remove_file(dir.join("pids"));
    let left = netns::list();
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    println!(
        "lab down: {} leftover processes stopped, {} network namespaces removed",
        stopped,
        namespaces.len()
    );
    Ok(())
}

/// Whether `pid` runs one of the lab's binaries (pids are reused).
fn recorded_process(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|exe| {
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("weft-") || name == "sleep"
        })
        .unwrap_or(false)
}

fn status(dir: &Path) -> Result<()> {
    let state = read_state(dir)?;
    enter_lab_network(&state)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        use k8s_openapi::api::core::v1::Pod;
        println!("network: {}", state["network"].as_str().unwrap_or("?"));
        for cluster in state["clusters"].as_array().cloned().unwrap_or_default() {
            let name = cluster["name"].as_str().unwrap_or("?");
            println!(
                "\ncluster {name}: API https://{}  kubeconfig {}",
                cluster["api"].as_str().unwrap_or("?"),
                cluster["kubeconfig"].as_str().unwrap_or("?")
            );
            if let Some(addr) = cluster["monitoring"].as_str().and_then(|a| a.parse().ok())
                && let Ok((200, body)) = weft_lab::mesh::http_get(addr, "/debug/clusters").await
            {
                println!("  control plane: {}", body.trim());
            }
            let client = client_for(&state, name).await?;
            let pods = kube::Api::<Pod>::all(client)
                .list(&Default::default())
                .await?;
            println!(
                "  {:<12} {:<24} {:<10} {:<16} READY",
                "NAMESPACE", "POD", "PHASE", "IP"
            );
            for pod in pods {
                let status = pod.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                println!(
                    "  {:<12} {:<24} {:<10} {:<16} {}",
                    pod.metadata.namespace.unwrap_or_default(),
                    pod.metadata.name.unwrap_or_default(),
                    status.phase.unwrap_or_default(),
                    status.pod_ip.unwrap_or_default(),
                    ready
                );
            }
        }
        anyhow::Ok(())
    })
}

fn apply(args: ApplyArgs) -> Result<()> {
    let state = read_state(&args.dir.dir)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    enter_lab_network(&state)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = client_for(&state, &args.cluster).await?;
        for line in weft_lab::apply::apply_all(&client, &text).await? {
            println!("{line}");
        }
        anyhow::Ok(())
    })
}

/// Finds a pod's directory: `<dir>/pods/<cluster>/<namespace>/<pod>`.
pub fn find_pod(dir: &Path, cluster: Option<&str>, namespace: &str, pod: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if cluster.is_some_and(|c| c != name) {
            continue;
        }
        let candidate = entry.path().join(namespace).join(pod);
        if candidate.join("ip").exists() {
            found.push(candidate);
        }
    }
    match found.len() {
        0 => bail!("no pod {namespace}/{pod} is running in this lab"),
        1 => Ok(found.remove(0)),
        _ => bail!("pod {namespace}/{pod} is in several clusters: choose one with --cluster"),
    }
}

fn exec(args: ExecArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let pod = find_pod(
        &args.dir.dir,
        args.cluster.as_deref(),
        &args.namespace,
        &args.pod,
    )?;
    let netns_name = std::fs::read_to_string(pod.join("netns"))?
        .trim()
        .to_string();
    let ip = std::fs::read_to_string(pod.join("ip"))?.trim().to_string();
    let err = if netns_name.is_empty() {
        // Loopback lab: no capture, so point HTTP clients at the sidecar.
        let proxy = format!("http://{ip}:15001");
        std::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .env("http_proxy", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("POD_IP", &ip)
            .exec()
    } else {
        std::process::Command::new("ip")
            .args(["netns", "exec", &netns_name])
            .args(&args.command)
            .env("POD_IP", &ip)
            .exec()
    };
    Err(anyhow::Error::from(err).context(format!("running {:?}", args.command)))
}
