//! `weftctl lab demo`: two clusters, echo v1 in c1 and v2 in c2, a client
//! in c1, all injected by the webhook; traffic stays in c1 while it can,
//! fails over to c2 when c1's echo goes away, and comes back when it
//! returns. On the way, an AuthorizationPolicy refuses and then admits
//! the client and a canary sends a tenth to v2; at the end c1 is drained
//! and undrained under traffic. With `--network multi` each cluster is on a network of its
//! own: the failover crosses c2's east-west gateway, and that gateway dies
//! and comes back. Every step checks what it shows; the exit code says
//! whether all behaved.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use weft_lab::lab::{Lab, LabOptions};
use weft_lab::netns;
use weft_lab::runner::Network;
use weft_lab::traffic::{Answer, PodClient};

use super::{DemoArgs, NetworkKind, choose_network, ensure_binaries, find_pod};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

pub fn run(args: DemoArgs) -> Result<()> {
    let binaries = ensure_binaries()?;
    let (network, reason) = choose_network(args.loopback);
    match &reason {
        None => println!(
            "network: a namespace per pod on per-cluster bridges, capture rules applied for real"
        ),
        Some(reason) => println!(
            "network: loopback addresses, apps use their sidecar as an explicit proxy ({reason})"
        ),
    }
    let multi = args.network == NetworkKind::Multi;
    if multi && let Some(reason) = &reason {
        bail!("--network multi needs a network namespace per pod, and {reason}");
    }
    if network == Network::Namespaces {
        if netns::exists(netns::ROUTER) {
            bail!("a lab is already running on this machine (weftctl lab down --dir <its dir>)");
        }
        netns::create_router(2)?;
        netns::enter(netns::ROUTER)?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let result = tokio::runtime::Runtime::new()?.block_on(async {
        let started = Instant::now();
        let mut lab = Lab::up(LabOptions {
            multi_network: multi,
            ..LabOptions::two_clusters(network, dir.clone(), binaries)
        })
        .await?;
        println!(
            "✓ lab up: clusters c1 and c2 with weft-control each, in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if multi {
            for (from, of) in [("c1", "c2"), ("c2", "c1")] {
                lab.wait_gateway(from, of, "healthy", Duration::from_secs(60))
                    .await?;
            }
            println!(
                "✓ networks: c1 on n1, c2 on n2, no route between their pods; each reached through its east-west gateway ({}:15008 and {}:15008), probed healthy by the other's control plane",
                weft_lab::load_balancer::address(1, 1),
                weft_lab::load_balancer::address(2, 1)
            );
        }
        let outcome = story(&mut lab, &dir).await;
        if args.keep && outcome.is_ok() {
            println!(
                "the lab keeps running (Ctrl-C to stop); logs and kubeconfigs in {}",
                dir.display()
            );
            let _ = tokio::signal::ctrl_c().await;
        }
        lab.down().await;
        outcome
    });
    if network == Network::Namespaces {
        netns::sweep();
    }
    match &result {
        Ok(()) => println!(
            "✓ lab down: every process and namespace removed\n\nthe demo behaved at every step"
        ),
        Err(err) => println!("✗ {err:#}\n(logs: {})", dir.display()),
    }
    result
}

async fn story(lab: &mut Lab, dir: &std::path::Path) -> Result<()> {
    let common = include_str!("../../../examples/lab/demo-common.yaml");
    for (cluster, extra) in [
        (
            "c1",
            vec![
                include_str!("../../../examples/lab/echo-c1.yaml"),
                include_str!("../../../examples/lab/client.yaml"),
            ],
        ),
        (
            "c2",
            vec![include_str!("../../../examples/lab/echo-c2.yaml")],
        ),
    ] {
        let client = &lab.cluster(cluster)?.client;
        weft_lab::apply::apply_all(client, common).await?;
        for doc in extra {
            weft_lab::apply::apply_all(client, doc).await?;
        }
    }
    println!(
        "✓ deployed: echo v1 in c1, echo v2 in c2, a client in c1 (sidecars injected by each cluster's webhook)"
    );
    let injected = Api::<Pod>::namespaced(lab.cluster("c1")?.client.clone(), "demo")
        .get("client")
        .await?
        .spec
        .map(|s| s.containers.iter().any(|c| c.name == "weft-proxy"))
        .unwrap_or(false);
    if !injected {
        bail!("the client pod has no weft-proxy container: injection did not happen");
    }
    for (cluster, pods) in [("c1", vec!["echo-v1", "client"]), ("c2", vec!["echo-v2"])] {
        wait_ready(
            &lab.cluster(cluster)?.client,
            &pods,
            Duration::from_secs(120),
        )
        .await?;
    }
    println!("✓ pods ready in both clusters");
    if lab.network == Network::Namespaces {
        outsider_cannot_forge_an_identity(lab, dir).await?;
    }

    let pod = find_pod(dir, Some("c1"), "demo", "client")?;
    if lab.network == Network::Namespaces {
        names(&pod).await?;
        clusterset(lab, &pod).await?;
    }
    let caller = PodClient::new(&lab.cluster("c1")?.client, &pod, "demo", "echo").await?;
    // The client's sidecar learns of c2's endpoint through c1's control
    // plane watching c2: wait until the first answer comes back.
    caller.until(Duration::from_secs(60), |r| r.is_ok()).await?;
    let answers = caller.batch(20).await;
    report("traffic (local first)", &answers);
    check_all(&answers, "c1")?;
    println!("✓ 20 of 20 answered by c1 (same cluster and zone first), peer identity {CLIENT_ID}");
    observed(lab, &pod).await?;

    let c1 = lab.cluster("c1")?.client.clone();
    authorization(&c1, &caller).await?;
    canary(&c1, &caller).await?;
    Api::<Pod>::namespaced(c1.clone(), "demo")
        .delete("echo-v1", &DeleteParams::default())
        .await?;
    let failover = caller.until_stable("c2", Duration::from_secs(60)).await?;
    println!(
        "✓ echo-v1 deleted in c1 (gracefully, as the kubelet does): traffic failed over to c2{} in {:.2} s with {} failed requests",
        if lab.multi_network {
            " through c2's east-west gateway"
        } else {
            ""
        },
        failover.after.as_secs_f64(),
        failover.errors
    );
    if failover.errors > 0 {
        bail!(
            "{} requests failed while echo-v1 was deleted",
            failover.errors
        );
    }
    let answers = caller.batch(10).await;
    report("traffic (c1's echo gone)", &answers);
    check_all(&answers, "c2")?;
    if lab.multi_network {
        gateway_outage(lab, &caller).await?;
    }

    weft_lab::apply::apply_all(&c1, include_str!("../../../examples/lab/echo-c1.yaml")).await?;
    wait_ready(&c1, &["echo-v1"], Duration::from_secs(120)).await?;
    let back = caller.until_stable("c1", Duration::from_secs(60)).await?;
    println!(
        "✓ echo-v1 restored: traffic back in c1 {:.2} s after it was ready, {} failed requests",
        back.after.as_secs_f64(),
        back.errors
    );
    let answers = caller.batch(10).await;
    report("traffic (restored)", &answers);
    check_all(&answers, "c1")?;
    drain(lab, &caller).await?;
    Ok(())
}

/// What an operator sees of that traffic: the client's sidecar in
/// `weftctl proxy-status` (c1's control plane) and one of its access-log
/// lines (examples/lab/client.yaml turns them on).
async fn observed(lab: &Lab, client: &std::path::Path) -> Result<()> {
    // A change the model made a moment ago (the demo's own steps make
    // them) is STALE until the sidecar has it: looked at again, within a
    // bound, as an operator would.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (proxy, synced) = loop {
        let view = lab.control_debug("c1", "/debug/proxies").await;
        let proxy = view["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["identity"] == CLIENT_ID)
            .cloned()
            .unwrap_or_default();
        let synced = proxy["types"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, t)| t["state"] == "SYNCED")
            .count();
        if synced == 6 || Instant::now() > deadline {
            break (proxy, synced);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(line) = weft_lab::traffic::access_log_lines(client).pop() {
            break line;
        }
        if Instant::now() > deadline {
            bail!("the client's sidecar wrote no access-log line");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "✓ weftctl proxy-status: the client's sidecar is SYNCED in {synced} of 6 resource types; its access log: {} {}{} → {} from {} in {} ms, trace {}",
        line["method"].as_str().unwrap_or("?"),
        line["authority"].as_str().unwrap_or("?"),
        line["path"].as_str().unwrap_or("?"),
        line["response_code"],
        line["upstream_workload"].as_str().unwrap_or("?"),
        line["duration"],
        line["trace_id"].as_str().unwrap_or("?"),
    );
    if synced != 6 {
        bail!("the client's sidecar is not SYNCED in every type: {proxy}");
    }
    Ok(())
}

/// An AuthorizationPolicy on echo: first it admits only another
/// identity, and the client is refused; then the client's, and it is
/// answered again. Each takes effect within a second, without restarts.
async fn authorization(c1: &kube::Client, caller: &PodClient) -> Result<()> {
    let policy = include_str!("../../../examples/lab/authz.yaml");
    let others_only = policy.replace("sa/client", "sa/admin");
    let started = Instant::now();
    weft_lab::apply::apply_all(c1, &others_only).await?;
    caller
        .until(
            Duration::from_secs(5),
            |a| matches!(a, Err(head) if head.contains(" 403")),
        )
        .await?;
    println!(
        "✓ AuthorizationPolicy demo/echo-callers admits only sa/admin: the client gets 403 (RBAC: access denied) {:.0} ms after it was applied",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let started = Instant::now();
    weft_lab::apply::apply_all(c1, policy).await?;
    caller.until(Duration::from_secs(5), |a| a.is_ok()).await?;
    println!(
        "✓ ...then admits the client's identity for GET: answered again {:.0} ms later (examples/lab/authz.yaml; weftctl authz check shows why)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    weft_lab::apply::delete_all(c1, policy).await?;
    caller.until(Duration::from_secs(5), |a| a.is_ok()).await?;
    Ok(())
}

/// `weftctl cluster drain c1` under the client's traffic: it moves to c2
/// with nothing failing, and comes back on `undrain`.
async fn drain(lab: &Lab, caller: &PodClient) -> Result<()> {
    lab.drain("c1", true).await?;
    let moved = caller.until_stable("c2", Duration::from_secs(30)).await?;
    lab.drain("c1", false).await?;
    let back = caller.until_stable("c1", Duration::from_secs(30)).await?;
    println!(
        "✓ cluster c1 drained (weftctl cluster drain c1): traffic on c2 in {:.2} s, {} failed; undrained: back on c1 in {:.2} s, {} failed",
        moved.after.as_secs_f64(),
        moved.errors,
        back.after.as_secs_f64(),
        back.errors
    );
    if moved.errors + back.errors > 0 {
        bail!("requests failed while c1 was drained or undrained");
    }
    Ok(())
}

/// A VirtualService canary: 10% of echo's traffic to v2 in c2, and the
/// requests that ask for it by header.
async fn canary(c1: &kube::Client, caller: &PodClient) -> Result<()> {
    let routes = include_str!("../../../examples/lab/traffic.yaml");
    let started = Instant::now();
    weft_lab::apply::apply_all(c1, routes).await?;
    let is_v2 =
        |a: &Answer| matches!(a, Ok(f) if f.get("version").map(String::as_str) == Some("v2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_v2(&caller.get("/", &[("x-canary", "yes")]).await) {
        if Instant::now() > deadline {
            bail!("the VirtualService did not take effect");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let answers = caller.batch(200).await;
    let v2 = answers.iter().filter(|a| is_v2(a)).count();
    let failed = answers.iter().filter(|a| a.is_err()).count();
    if failed > 0 {
        bail!("{failed} of 200 requests failed under the canary");
    }
    println!(
        "✓ VirtualService canary 90/10 (examples/lab/traffic.yaml), in force {:.0} ms after it was applied: {v2} of 200 requests to v2 in c2, the rest to v1 in c1",
        took.as_secs_f64() * 1000.0
    );
    let pinned = caller.get("/", &[("x-canary", "yes")]).await;
    if !is_v2(&pinned) {
        bail!("x-canary: yes did not reach v2: {pinned:?}");
    }
    println!("✓ a request with x-canary: yes goes to v2 (header match)");
    weft_lab::apply::delete_all(c1, routes).await?;
    caller.until_stable("c1", Duration::from_secs(10)).await?;
    Ok(())
}

/// The client's names are answered by its sidecar: echo's is its VIP, a
/// name outside the mesh comes from the lab's resolver.
async fn names(client: &std::path::Path) -> Result<()> {
    // Any address on port 53: the capture rules send it to the sidecar.
    let server: std::net::SocketAddr = "10.96.0.53:53".parse()?;
    let echo = weft_lab::dns::resolve_from_pod(client, server, "echo.demo.svc.cluster.local")
        .await
        .map_err(anyhow::Error::msg)?;
    // Asked again on failure, as resolvers do (resolv.conf's attempts):
    // one forward lost while the lab settles is no failure of the mesh.
    let outside = vec![
        weft_lab::dns::resolve_until(client, server, "www.example.lab", Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?,
    ];
    if echo.is_empty() || outside != [weft_lab::dns::ZONE_ADDRESS] {
        bail!("names did not resolve: echo {echo:?}, www.example.lab {outside:?}");
    }
    println!(
        "✓ names in the client pod: echo.demo.svc.cluster.local is {} (answered by its sidecar's DNS), www.example.lab {} (forwarded to the lab's resolver)",
        echo[0], outside[0]
    );
    Ok(())
}

/// The MCS API: c2 exports echo (examples/lab/service-export.yaml), and
/// the client in c1 reaches c2's echo by its clusterset name, at the
/// clusterset VIP c1 keeps in its ServiceImport. The export is removed
/// again.
async fn clusterset(lab: &Lab, client: &std::path::Path) -> Result<()> {
    let export = include_str!("../../../examples/lab/service-export.yaml");
    let c2 = &lab.cluster("c2")?.client;
    weft_lab::apply::apply_all(c2, export).await?;
    let name = "echo.demo.svc.clusterset.local";
    let vip = weft_lab::dns::resolve_until(
        client,
        "10.96.0.53:53".parse()?,
        name,
        Duration::from_secs(30),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let answer = weft_lab::traffic::get_from_pod_until_ok(
        client,
        std::net::SocketAddr::from((vip, 80)),
        name,
        Duration::from_secs(10),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if !answer.contains("cluster=c2") {
        bail!("{name} did not reach c2, its one exporter: {answer}");
    }
    let imports = Api::<kube::api::DynamicObject>::namespaced_with(
        lab.cluster("c1")?.client.clone(),
        "demo",
        &weft_control::mcs::service_imports(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let import = imports.get_opt("echo").await?;
        if import
            .as_ref()
            .is_some_and(|i| i.data["spec"]["ips"][0] == vip.to_string())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("c1's ServiceImport demo/echo does not hold {vip}: {import:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "✓ ServiceExport echo in c2 (MCS): the client in c1 reaches c2's echo as {name}, the clusterset VIP {vip} of c1's ServiceImport demo/echo"
    );
    weft_lab::apply::delete_all(c2, export).await?;
    Ok(())
}

/// A pod of n1 without a sidecar cannot reach a pod of n2: only the
/// gateway's load balancer is reachable across networks.
async fn networks_are_apart(dir: &std::path::Path) -> Result<()> {
    let outsider = find_pod(dir, Some("c1"), "demo", "outsider")?;
    let echo_v2: std::net::IpAddr =
        std::fs::read_to_string(find_pod(dir, Some("c2"), "demo", "echo-v2")?.join("ip"))?
            .trim()
            .parse()?;
    let direct = std::net::SocketAddr::new(echo_v2, 8080);
    if weft_lab::traffic::Held::from_pod(&outsider, direct)
        .await
        .is_ok()
    {
        bail!("a pod of n1 reached {direct} in n2 directly");
    }
    let gateway = std::net::SocketAddr::from((weft_lab::load_balancer::address(2, 1), 15008));
    if let Err(err) = weft_lab::traffic::Held::from_pod(&outsider, gateway).await {
        bail!("c2's gateway {gateway} is not reachable from n1: {err}");
    }
    println!(
        "✓ from n1, echo-v2's pod {direct} cannot be reached at all; c2's gateway {gateway} can (and takes only mTLS from mesh identities)"
    );
    Ok(())
}

/// With echo only in c2, c2's gateway dies: c1's control plane takes it
/// out, requests fail (nothing else serves echo), and it comes back.
async fn gateway_outage(lab: &Lab, caller: &PodClient) -> Result<()> {
    let gateways = Api::<Pod>::namespaced(lab.cluster("c2")?.client.clone(), "weft-system");
    gateways
        .delete(
            "weft-eastwest-gateway",
            &DeleteParams::default().grace_period(0),
        )
        .await?;
    let out = lab
        .wait_gateway("c1", "c2", "unhealthy", Duration::from_secs(10))
        .await?;
    // Its push reaches the client's sidecar a debounce later; tunnels the
    // dying gateway still carried end with its drain.
    caller
        .until(Duration::from_secs(10), |a| a.is_err())
        .await?;
    let answers = caller.batch(5).await;
    let failed = answers.iter().filter(|a| a.is_err()).count();
    println!(
        "✓ c2's east-west gateway killed: c1's control plane took it out {:.2} s later (probe every 1 s, 2 failures); with echo only in c2, {failed} of 5 requests fail, as they must",
        out.as_secs_f64()
    );
    if failed != 5 {
        bail!("requests reached c2 without its gateway: {answers:?}");
    }
    let restored = Instant::now();
    lab.deploy_gateway("c2").await?;
    let back = caller.until_stable("c2", Duration::from_secs(60)).await?;
    println!(
        "✓ c2's gateway redeployed: traffic back through it {:.2} s later, {} requests failed meanwhile",
        restored.elapsed().as_secs_f64(),
        back.errors
    );
    Ok(())
}

/// A pod without a sidecar sends echo-v1 plaintext claiming to be an
/// admin: the serving port is captured (its probe goes to the sidecar), so
/// the claim is dropped and echo sees no identity.
async fn outsider_cannot_forge_an_identity(lab: &Lab, dir: &std::path::Path) -> Result<()> {
    let c1 = lab.cluster("c1")?.client.clone();
    weft_lab::apply::apply_all(&c1, include_str!("../../../examples/lab/outsider.yaml")).await?;
    wait_ready(&c1, &["outsider"], Duration::from_secs(60)).await?;
    if lab.multi_network {
        networks_are_apart(dir).await?;
    }
    let echo_ip: std::net::IpAddr =
        std::fs::read_to_string(find_pod(dir, Some("c1"), "demo", "echo-v1")?.join("ip"))?
            .trim()
            .parse()?;
    let outsider = find_pod(dir, Some("c1"), "demo", "outsider")?;
    let seen = weft_lab::traffic::identity_seen_by_echo(
        &outsider,
        std::net::SocketAddr::new(echo_ip, 8080),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if seen != "-" {
        bail!(
            "a pod without a sidecar claimed {} and echo saw {seen:?}",
            weft_lab::traffic::FORGED_IDENTITY
        );
    }
    println!(
        "✓ a pod without a sidecar claims {} in plaintext to echo-v1:8080: echo sees no identity (probes go to the sidecar on 15020, so the port stays captured)",
        weft_lab::traffic::FORGED_IDENTITY
    );
    Api::<Pod>::namespaced(c1, "demo")
        .delete("outsider", &DeleteParams::default())
        .await?;
    Ok(())
}

async fn wait_ready(client: &kube::Client, names: &[&str], timeout: Duration) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), "demo");
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for name in names {
            let ready = pods
                .get_opt(name)
                .await?
                .and_then(|p| p.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready {
                waiting.push(*name);
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pods not ready after {timeout:?}: {waiting:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report(title: &str, answers: &[Answer]) {
    let mut by_cluster: BTreeMap<String, usize> = BTreeMap::new();
    let mut peers: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = 0;
    for answer in answers {
        match answer {
            Ok(fields) => {
                let who = format!(
                    "{} ({} {})",
                    fields.get("cluster").cloned().unwrap_or_default(),
                    fields.get("pod").cloned().unwrap_or_default(),
                    fields.get("version").cloned().unwrap_or_default()
                );
                *by_cluster.entry(who).or_default() += 1;
                *peers
                    .entry(fields.get("peer").cloned().unwrap_or_default())
                    .or_default() += 1;
            }
            Err(_) => errors += 1,
        }
    }
    println!(
        "  {title}: answered by {by_cluster:?}; peer identities seen by echo {peers:?}; errors {errors}"
    );
}

fn check_all(answers: &[Answer], cluster: &str) -> Result<()> {
    for answer in answers {
        match answer {
            Ok(fields) if fields.get("cluster").map(String::as_str) == Some(cluster) => {
                if fields.get("peer").map(String::as_str) != Some(CLIENT_ID) {
                    bail!(
                        "echo saw peer {:?}, expected {CLIENT_ID}",
                        fields.get("peer")
                    );
                }
            }
            Ok(fields) => bail!(
                "answered by {:?}, expected {cluster}",
                fields.get("cluster")
            ),
            Err(err) => bail!("a request failed: {err}"),
        }
    }
    Ok(())
}
