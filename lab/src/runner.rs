//! The lab's pod runner, one per cluster, standing in for the kubelet: it
//! binds unscheduled pods to the cluster's node, gives each an address
//! (its own network namespace as root, else a loopback address), writes its
//! volumes (projected service-account tokens, ConfigMaps, Secrets,
//! emptyDirs), runs its init containers to completion (the injector's
//! `weft-proxy iptables` for real), starts its containers as processes of
//! the local binaries its images map to, probes readiness and reports it in
//! the pod's status, restarts what exits, and cleans up when the pod goes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::mesh::Binaries;
use crate::netns;

/// How pods get their network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// A network namespace per pod (root), capture rules applied for real.
    Namespaces,
    /// Loopback addresses, no capture: apps use the sidecar as an explicit
    /// proxy (`http_proxy`).
    Loopback,
}

#[derive(Clone)]
pub struct RunnerConfig {
    /// 1-based.
    pub cluster_index: u8,
    pub cluster: String,
    pub node: String,
    pub client: kube::Client,
    pub binaries: Binaries,
    /// Per-pod directories (logs, address, namespace name) go under here.
    pub dir: PathBuf,
    /// Files containers read (volumes) go under here: a directory every
    /// user can traverse, since the sidecar runs as UID 1337 and `dir` may
    /// sit under a private one (a home directory, a `mktemp -d`).
    pub run_dir: PathBuf,
    pub network: Network,
    /// The address pods reach the control plane at, replacing the
    /// in-cluster DNS name the injector writes.
    pub control_plane: SocketAddr,
    /// The resolver sidecars forward names outside the mesh to (the lab's,
    /// `dns`), in place of the machine's.
    pub dns_upstream: Option<SocketAddr>,
}

/// Where a pod's files, logs and network name are kept.
pub fn pod_dir(dir: &Path, cluster: &str, namespace: &str, name: &str) -> PathBuf {
    dir.join("pods").join(cluster).join(namespace).join(name)
}

/// The loopback address of pod `index` of cluster `c`.
pub fn loopback_address(c: u8, index: u32) -> Ipv4Addr {
    // The namespace address, moved into 127/8.
    let [_, cluster, high, low] = netns::pod_address(c, index).octets();
    Ipv4Addr::new(127, cluster, high, low)
}

/// The local binary an image runs as, and fixed arguments before its own.
fn binary_for(binaries: &Binaries, image: &str) -> Option<(PathBuf, Vec<String>)> {
    let name = image.rsplit('/').next().unwrap_or(image);
    let name = name.split([':', '@']).next().unwrap_or(name);
    match name {
        "weft-proxy" => Some((binaries.proxy.clone(), vec![])),
        "weft-echo" | "echo" => Some((binaries.echo.clone(), vec![])),
        // A pod that only exists to run commands in (`lab exec`).
        "sleep" | "busybox" | "weft-lab-sleep" => Some(("sleep".into(), vec!["infinity".into()])),
        _ => None,
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs the runner until the task is dropped or `stop` turns true; then
/// stops every pod it started.
pub async fn run(config: RunnerConfig, mut stop: watch::Receiver<bool>) {
    let config = Arc::new(config);
    let next_index = Arc::new(Mutex::new(0u32));
    let mut pods: HashMap<String, Running> = HashMap::new();
    // Pods being stopped after a graceful delete, by uid.
    let mut terminating: std::collections::HashSet<String> = Default::default();
    let mut events = {
        use kube::runtime::WatchStreamExt;
        watcher(
            Api::<Pod>::all(config.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed()
    };
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(event) = event else { break };
        let (present, gone): (Vec<Pod>, Vec<Pod>) = match event {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                (vec![pod], vec![])
            }
            Ok(watcher::Event::Delete(pod)) => (vec![], vec![pod]),
            Ok(_) => (vec![], vec![]),
            Err(err) => {
                tracing::debug!(cluster = config.cluster, "pod watch: {err}");
                continue;
            }
        };
        for pod in gone {
            if let Some(uid) = pod.metadata.uid.clone()
                && let Some(running) = pods.remove(&uid)
            {
                let _ = running.stop.send(true);
                let _ = running.task.await;
            }
        }
        for pod in present {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            if node.as_deref().is_some_and(|n| n != config.node) {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                // As the kubelet: stop the containers (SIGTERM, then
                // SIGKILL after the grace), then delete the pod for good.
                // A pod this runner never started is deleted at once.
                if !terminating.insert(uid.clone()) {
                    continue;
                }
                let running = pods.remove(&uid);
                let client = config.client.clone();
                tokio::spawn(async move {
                    if let Some(running) = running {
                        let _ = running.stop.send(true);
                        let _ = running.task.await;
                    }
                    let (Some(name), Some(namespace)) = (
                        pod.metadata.name.as_deref(),
                        pod.metadata.namespace.as_deref(),
                    ) else {
                        return;
                    };
                    let _ = Api::<Pod>::namespaced(client, namespace)
                        .delete(name, &kube::api::DeleteParams::default().grace_period(0))
                        .await;
                });
                continue;
            }
            if pods.contains_key(&uid) {
                continue;
            }
            let index = {
                let mut next = next_index.lock().unwrap_or_else(|p| p.into_inner());
                *next += 1;
                *next - 1
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let config = config.clone();
            let task = tokio::spawn(async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                if let Err(err) = run_pod(&config, pod, index, stop_rx).await {
                    tracing::warn!(cluster = config.cluster, pod = name, "pod failed: {err:#}");
                }
            });
            pods.insert(
                uid,
                Running {
                    stop: stop_tx,
                    task,
                },
            );
        }
    }
    for (_, running) in pods {
        let _ = running.stop.send(true);
        let _ = running.task.await;
    }
}

/// What a pod's processes need to know about it.
struct PodContext {
    name: String,
    namespace: String,
    service_account: String,
    ip: Ipv4Addr,
    netns: Option<String>,
    dir: PathBuf,
    /// mountPath → host directory.
    mounts: Vec<(String, PathBuf)>,
}

async fn run_pod(
    config: &RunnerConfig,
    pod: Pod,
    index: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let name = pod.metadata.name.clone().context("a pod without a name")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pods = Api::<Pod>::namespaced(config.client.clone(), &namespace);
    let spec = pod.spec.clone().context("a pod without a spec")?;
    if spec.node_name.is_none() {
        // Scheduling: the lab has one node per cluster.
        pods.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": config.node}})),
        )
        .await
        .context("binding the pod to the node")?;
    }
    let dir = pod_dir(&config.dir, &config.cluster, &namespace, &name);
    std::fs::create_dir_all(&dir)?;
    let (netns, ip) = match config.network {
        Network::Namespaces => {
            let (ns, ip) = netns::create_pod(config.cluster_index, index)?;
            (Some(ns), ip)
        }
        Network::Loopback => (None, loopback_address(config.cluster_index, index)),
    };
    std::fs::write(dir.join("netns"), netns.clone().unwrap_or_default())?;
    std::fs::write(dir.join("ip"), ip.to_string())?;
    let result = run_pod_inner(
        config,
        &pods,
        &spec,
        &name,
        &namespace,
        netns.clone(),
        ip,
        &dir,
        &mut stop,
    )
    .await;
    if let Err(err) = &result {
        let _ = pods
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Failed", "message": format!("{err:#}"), "reason": "LabRunner"}})),
            )
            .await;
        // Keep the pod's network until it is deleted, for `lab exec`.
        let _ = stop.wait_for(|s| *s).await;
    }
    if let Some(ns) = netns {
        netns::delete(&ns);
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_pod_inner(
    config: &RunnerConfig,
    pods: &Api<Pod>,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    name: &str,
    namespace: &str,
    netns: Option<String>,
    ip: Ipv4Addr,
    dir: &Path,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut context = PodContext {
        name: name.into(),
        namespace: namespace.into(),
        service_account,
        ip,
        netns,
        dir: dir.to_path_buf(),
        mounts: Vec::new(),
    };
    let volumes = write_volumes(config, spec, &context).await?;
    let mount_of = |c: &Container| -> Vec<(String, PathBuf)> {
        c.volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| Some((m.mount_path, volumes.get(&m.name)?.clone())))
            .collect()
    };
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Pending", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "hostIP": ip.to_string()}})),
    )
    .await?;
    for init in spec.init_containers.clone().unwrap_or_default() {
        context.mounts = mount_of(&init);
        if config.network == Network::Loopback
            && init
                .args
                .as_ref()
                .and_then(|a| a.first())
                .map(String::as_str)
                == Some("iptables")
        {
            tracing::info!(
                pod = name,
                "loopback network: skipping the capture rules (apps use the sidecar as an explicit proxy)"
            );
            continue;
        }
        let mut child = spawn(config, &context, &init)?;
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .with_context(|| format!("init container {} did not finish in 60 s", init.name))??;
        if !status.success() {
            bail!(
                "init container {} failed ({status}); see {}",
                init.name,
                dir.join(format!("{}.log", init.name)).display()
            );
        }
    }
    let containers = spec.containers.clone();
    let mut children: Vec<Option<Child>> = Vec::new();
    for container in &containers {
        context.mounts = mount_of(container);
        children.push(Some(spawn(config, &context, container)?));
    }
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "startTime": now()}})),
    )
    .await?;
    let mut ready_reported: Option<bool> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        // Restart what exited (restartPolicy Always), as the kubelet would.
        for (i, child) in children.iter_mut().enumerate() {
            let exited = match child {
                Some(c) => c.try_wait().ok().flatten().is_some(),
                None => true,
            };
            if exited {
                tracing::info!(
                    pod = name,
                    container = containers[i].name,
                    "container exited; restarting"
                );
                context.mounts = mount_of(&containers[i]);
                *child = spawn(config, &context, &containers[i]).ok();
            }
        }
        let mut ready = children.iter().all(Option::is_some);
        for container in &containers {
            if !ready {
                break;
            }
            if let Some(probe) = container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
            {
                let port = match &probe.port {
                    IntOrString::Int(p) => *p as u16,
                    IntOrString::String(named) => container
                        .ports
                        .clone()
                        .unwrap_or_default()
                        .iter()
                        .find(|p| p.name.as_deref() == Some(named))
                        .map(|p| p.container_port as u16)
                        .unwrap_or(0),
                };
                let path = probe.path.clone().unwrap_or_else(|| "/".into());
                ready = matches!(
                    crate::mesh::http_get(SocketAddr::new(IpAddr::V4(ip), port), &path).await,
                    Ok((200..=399, _))
                );
            }
        }
        if ready_reported != Some(ready) {
            let condition = if ready { "True" } else { "False" };
            pods.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [
                    {"type": "Ready", "status": condition, "lastTransitionTime": now()},
                    {"type": "ContainersReady", "status": condition, "lastTransitionTime": now()},
                ]}})),
            )
            .await?;
            ready_reported = Some(ready);
        }
    }
    // As the kubelet: every container gets SIGTERM at once, and SIGKILL
    // when the grace (5 s in the lab) is over.
    futures::future::join_all(
        children
            .into_iter()
            .flatten()
            .map(|child| crate::mesh::stop(child, Duration::from_secs(5))),
    )
    .await;
    Ok(())
}

fn now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Writes the pod's volumes; returns volume name → host directory.
async fn write_volumes(
    config: &RunnerConfig,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    pod: &PodContext,
) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for volume in spec.volumes.clone().unwrap_or_default() {
        let path = config
            .run_dir
            .join("pods")
            .join(&config.cluster)
            .join(&pod.namespace)
            .join(&pod.name)
            .join(&volume.name);
        std::fs::create_dir_all(&path)?;
        set_mode(&path, 0o755)?;
        if let Some(projected) = &volume.projected {
            for source in projected.sources.clone().unwrap_or_default() {
                if let Some(token) = source.service_account_token {
                    let request = TokenRequest {
                        spec: TokenRequestSpec {
                            audiences: token.audience.into_iter().collect(),
                            expiration_seconds: token.expiration_seconds,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let accounts =
                        Api::<ServiceAccount>::namespaced(config.client.clone(), &pod.namespace);
                    let created = accounts
                        .create_token_request(
                            &pod.service_account,
                            &PostParams::default(),
                            &request,
                        )
                        .await
                        .with_context(|| {
                            format!(
                                "a token for service account {}/{}",
                                pod.namespace, pod.service_account
                            )
                        })?;
                    let token_text = created
                        .status
                        .context("a token request without status")?
                        .token;
                    write_file(&path.join(&token.path), &token_text)?;
                }
                if let Some(cm) = source.config_map {
                    write_config_map(config, &pod.namespace, &cm.name, &path).await?;
                }
            }
        }
        if let Some(cm) = &volume.config_map {
            write_config_map(config, &pod.namespace, &cm.name, &path).await?;
        }
        if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let found = Api::<Secret>::namespaced(config.client.clone(), &pod.namespace)
                .get(&name)
                .await
                .with_context(|| format!("secret {}/{name}", pod.namespace))?;
            for (key, value) in found.data.unwrap_or_default() {
                write_file(&path.join(key), &String::from_utf8_lossy(&value.0))?;
            }
        }
        out.insert(volume.name.clone(), path);
    }
    Ok(out)
}

async fn write_config_map(
    config: &RunnerConfig,
    namespace: &str,
    name: &str,
    path: &Path,
) -> Result<()> {
    // The control plane publishes weft-root-cert shortly after a namespace
    // appears: wait for it as the kubelet would.
    let api = Api::<ConfigMap>::namespaced(config.client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let found = loop {
        match api.get_opt(name).await? {
            Some(found) => break found,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            None => bail!("configmap {namespace}/{name} does not exist"),
        }
    };
    for (key, value) in found.data.unwrap_or_default() {
        write_file(&path.join(key), &value)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text)?;
    set_mode(path, 0o644)
}

fn field(pod: &PodContext, path: &str) -> String {
    match path {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => pod.namespace.clone(),
        "status.podIP" | "status.podIPs" | "status.hostIP" => pod.ip.to_string(),
        "spec.serviceAccountName" => pod.service_account.clone(),
        _ => String::new(),
    }
}

/// A container's environment, with the lab's translations: mount paths to
/// host directories, the control plane's DNS name to its lab address, and
/// (loopback network) the sidecar's listeners on the pod's address.
fn environment(
    config: &RunnerConfig,
    pod: &PodContext,
    container: &Container,
    is_proxy: bool,
) -> Vec<(String, String)> {
    let rewrite = |value: String| -> String {
        for (mount, host) in &pod.mounts {
            if let Some(rest) = value.strip_prefix(mount.as_str()) {
                return format!("{}{rest}", host.display());
            }
        }
        value
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(value), _) => rewrite(value),
            (None, Some(from)) => from
                .field_ref
                .map(|f| field(pod, &f.field_path))
                .unwrap_or_default(),
            (None, None) => String::new(),
        };
        env.push((var.name, value));
    }
    if is_proxy {
        for (name, value) in env.iter_mut() {
            if name == "WEFT_CONTROL_PLANE" {
                *value = config.control_plane.to_string();
            }
        }
        if let Some(upstream) = config.dns_upstream {
            env.push(("WEFT_DNS_UPSTREAM".into(), upstream.to_string()));
        }
        if config.network == Network::Loopback {
            for (var, port) in crate::mesh::SIDECAR_LISTENERS {
                env.push((
                    var.into(),
                    SocketAddr::new(IpAddr::V4(pod.ip), port).to_string(),
                ));
            }
        }
    } else if config.network == Network::Loopback {
        // No capture: the app reaches the mesh through its sidecar as an
        // explicit HTTP proxy.
        let proxy = format!("http://{}:15001", pod.ip);
        env.push(("http_proxy".into(), proxy.clone()));
        env.push(("HTTP_PROXY".into(), proxy));
    }
    env.push(("POD_IP".into(), pod.ip.to_string()));
    env
}

/// Starts one container as a process in the pod's network, as the user
/// its securityContext names.
fn spawn(config: &RunnerConfig, pod: &PodContext, container: &Container) -> Result<Child> {
    let image = container.image.clone().unwrap_or_default();
    let (program, mut args) = binary_for(&config.binaries, &image).with_context(|| {
        format!(
            "image {image:?} has no local binary in the lab (known: weft-proxy, weft-echo, sleep)"
        )
    })?;
    let is_proxy = program == config.binaries.proxy;
    // `command` replaces the image's entrypoint: its first word names the
    // program (the image's binary here), the rest are arguments.
    if let Some(command) = &container.command {
        args = command.iter().skip(1).cloned().collect();
    }
    args.extend(container.args.clone().unwrap_or_default());
    if config.network == Network::Loopback {
        // Apps that listen on every address would collide on loopback.
        for arg in args.iter_mut() {
            *arg = arg.replace("0.0.0.0", &pod.ip.to_string());
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pod.dir.join(format!("{}.log", container.name)))?;
    let mut command = Command::new(&program);
    command
        .args(&args)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )
        .envs(environment(config, pod, container, is_proxy))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let user = container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user);
    let group = container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_group)
        .or(user);
    let netns_file = match &pod.netns {
        Some(ns) => Some(
            std::fs::File::open(format!("/var/run/netns/{ns}"))
                .with_context(|| format!("opening {ns}"))?,
        ),
        None => None,
    };
    let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe system calls
    // run: setns, then dropping to the container's group and user (after
    // setns, which needs the privileges being dropped).
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::geteuid() == 0 {
                if let Some(gid) = group
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid as libc::gid_t) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(uid) = user
                    && libc::setuid(uid as libc::uid_t) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().with_context(|| {
        format!(
            "starting {} for container {}",
            program.display(),
            container.name
        )
    })?;
    drop(netns_file);
    if let Some(pid) = child.id() {
        record_pid(&config.dir, pid);
    }
    Ok(child)
}

/// Appends a pid to `<dir>/pids`, so that `lab down` can stop what a
/// crashed lab left running.
pub fn record_pid(dir: &Path, pid: u32) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
    {
        let _ = writeln!(file, "{pid}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_local_binaries() {
        let binaries = Binaries {
            control: "/b/weft-control".into(),
            proxy: "/b/weft-proxy".into(),
            echo: "/b/weft-echo".into(),
        };
        assert_eq!(
            binary_for(&binaries, "ghcr.io/weft-mesh/weft-proxy:0.1.0")
                .unwrap()
                .0,
            PathBuf::from("/b/weft-proxy")
        );
        assert_eq!(
            binary_for(&binaries, "weft-echo").unwrap().0,
            PathBuf::from("/b/weft-echo")
        );
        assert_eq!(
            binary_for(&binaries, "busybox:1.36").unwrap().1,
            vec!["infinity".to_string()]
        );
        assert!(binary_for(&binaries, "nginx:1.27").is_none());
        assert_eq!(loopback_address(1, 0), Ipv4Addr::new(127, 101, 1, 1));
    }
}
