//! `weftctl` end to end: certificates that load back and chain to the root;
//! a remote secret that another cluster's control plane accepts and syncs.

use std::path::Path;
use std::process::{Command, Output};

use weft_certs::{CertificateAuthority, Identity, PluginFiles, WorkloadCert, tls::TrustBundle};

fn weftctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .output()
        .expect("weftctl runs")
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn root_intermediate_and_workload_files_hang_together() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("root");
    ok(weftctl(&["certs", "root", "--out-dir", path(&root_dir)]));
    let said = ok(weftctl(&intermediate_c1(&root_dir)));
    assert!(
        said.contains("kubectl create secret generic cacerts"),
        "{said}"
    );
    let c1 = root_dir.join("c1");
    let ca =
        CertificateAuthority::from_plugin(&PluginFiles::read_dir(&c1).unwrap(), "cluster.local")
            .expect("the cacerts files load as a CA");

    let out_dir = dir.path().join("w");
    ok(weftctl(&[
        "certs",
        "workload",
        "--identity",
        "spiffe://cluster.local/ns/demo/sa/echo",
        "--ca-dir",
        path(&c1),
        "--out-dir",
        path(&out_dir),
        "--ttl",
        "2h",
    ]));
    let read = |name: &str| std::fs::read_to_string(out_dir.join(name)).unwrap();
    let cert = WorkloadCert::from_pem_files(&read("cert-chain.pem"), &read("key.pem")).unwrap();
    assert_eq!(
        cert.identity(),
        &"spiffe://cluster.local/ns/demo/sa/echo"
            .parse::<Identity>()
            .unwrap()
    );
    assert_eq!(cert.full_chain().len(), 3);
    assert_eq!(read("root-cert.pem"), ca.roots_pem());
    assert_eq!(
        TrustBundle::from_pem(&read("root-cert.pem")).unwrap().len(),
        1
    );
}

#[test]
fn mistakes_get_clear_errors_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("root");

    let intermediate = intermediate_c1(&root_dir);
    let err = fails(&intermediate);
    assert!(err.contains("weftctl certs root"), "{err}");

    ok(weftctl(&["certs", "root", "--out-dir", path(&root_dir)]));
    let before = std::fs::read(root_dir.join("root-key.pem")).unwrap();
    let err = fails(&["certs", "root", "--out-dir", path(&root_dir)]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(root_dir.join("root-key.pem")).unwrap(),
        before
    );

    let not_spiffe = "https://example.com/";
    let err = fails(&[
        "certs",
        "workload",
        "--identity",
        not_spiffe,
        "--ca-dir",
        path(&root_dir),
    ]);
    assert!(err.contains("not a SPIFFE ID"), "{err}");

    std::fs::write(root_dir.join("root-key.pem"), "garbage").unwrap();
    let err = fails(&intermediate);
    assert!(err.contains("root-key.pem"), "{err}");
}

/// `weftctl certs intermediate` for cluster c1 under the root in `root_dir`.
fn intermediate_c1(root_dir: &std::path::Path) -> [&str; 6] {
    let args = ["certs", "intermediate", "--cluster", "c1", "--root-dir"];
    [args[0], args[1], args[2], args[3], args[4], path(root_dir)]
}

/// Runs weftctl expecting it to fail; returns what it said on stderr.
fn fails(args: &[&str]) -> String {
    let out = weftctl(args);
    assert!(!out.status.success(), "weftctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn weftctl_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        weftctl(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secret_round_trip_through_a_control_plane() {
    use kube::api::{Api, ListParams, PostParams};
    use weft_lab::{ApiServer, ApiServerConfig};

    let dir = tempfile::tempdir().unwrap();
    let _remote = ApiServer::start(ApiServerConfig {
        cluster_name: "c2".into(),
        dir: Some(dir.path().join("c2")),
        ..Default::default()
    })
    .await
    .unwrap();
    let remote_kubeconfig = dir.path().join("c2").join("kubeconfig");
    let args = |name: &str| {
        vec![
            "create-remote-secret".to_string(),
            "--kubeconfig".into(),
            remote_kubeconfig.to_str().unwrap().into(),
            "--name".into(),
            name.into(),
        ]
    };
    let first = ok(weftctl_async(args("c2")).await);
    // Idempotent: running it again reuses the account and its token.
    let second = ok(weftctl_async(args("c2")).await);
    assert_eq!(first, second);

    let manifest: serde_json::Value = serde_saphyr::from_str(&first).unwrap();
    assert_eq!(
        manifest["metadata"]["labels"]["weft.io/multicluster"],
        "true"
    );
    let kubeconfig = manifest["stringData"]["c2"].as_str().unwrap();
    // What the other cluster's control plane will accept, and can do with it.
    weft_control::kubeconfig::parse_untrusted(kubeconfig).unwrap();
    let reader = kube::Client::try_from(
        weft_control::kubeconfig::client_config(kubeconfig)
            .await
            .unwrap(),
    )
    .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(reader);
    pods.list(&ListParams::default()).await.unwrap();

    // Apply it in c1, whose control plane then watches c2.
    let local = ApiServer::start(ApiServerConfig {
        cluster_name: "c1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = local.client().await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "weft-system"}}))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut config = weft_control::Config::new("c1");
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    let control = weft_control::ControlPlane::start(config, client.clone())
        .await
        .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "weft-system");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(manifest).unwrap(),
        )
        .await
        .unwrap();
    let monitoring = control.monitoring_addr.unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = ok(weftctl_async(vec![
            "remote-clusters".into(),
            "--monitoring".into(),
            monitoring.clone(),
        ])
        .await);
        let c2 = out.lines().find(|l| l.starts_with("c2 "));
        // CLUSTER LOCAL NETWORK SYNCED ...
        if c2.is_some_and(|l| l.split_whitespace().nth(3) == Some("true")) {
            assert_eq!(
                c2.and_then(|l| l.split_whitespace().nth(2)),
                Some("default"),
                "{out}"
            );
            assert!(out.lines().any(|l| l.starts_with("c1 ")), "{out}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "c2 never synced:\n{out}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // A wrong address is a clear error, not a hang.
    let out = weftctl_async(vec![
        "remote-clusters".into(),
        "--monitoring".into(),
        "127.0.0.1:1".into(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to the control plane"));
}

fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The install manifests, and workloads as kube-inject leaves them, are
/// valid Kubernetes objects: checked by `kubernetes-validate` (PyPI) in
/// strict mode, where it is installed.
#[test]
fn install_manifests_and_injected_workloads_pass_schema_validation() {
    let available = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!(
            "SKIPPED: kubernetes-validate is not installed (pip install kubernetes-validate)"
        );
        return;
    }
    let install = workspace_root().join("examples/install");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&install)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.push(install.join("eastwest-gateway/eastwest-gateway.yaml"));
    files.sort();
    assert!(files.len() >= 5, "{files:?}");

    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  selector:\n    matchLabels: {app: echo}\n  template:\n    metadata:\n      labels: {app: echo}\n    spec:\n      containers:\n      - name: echo\n        image: echo\n        ports: [{name: http, containerPort: 8080}]\n        readinessProbe: {httpGet: {path: /ready, port: http}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec:\n  containers: [{name: app, image: echo}]\n",
    )
    .unwrap();
    let injected = ok(weftctl(&[
        "kube-inject",
        "-f",
        path(&manifest),
        "--cluster-id",
        "c1",
    ]));
    assert!(
        injected.contains("weft-proxy") && injected.contains("weft-init"),
        "{injected}"
    );
    let injected_file = dir.path().join("injected.yaml");
    std::fs::write(&injected_file, &injected).unwrap();
    files.push(injected_file);

    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()
        .unwrap();
    let said = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
    let text = String::from_utf8_lossy(&said);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
    assert!(text.contains("deployment/echo"), "{text}");
}

/// Whether the lab's binaries are built next to weftctl (`cargo test
/// --workspace` builds them); the lab tests skip with the reason if not.
fn lab_binaries() -> bool {
    let dir = Path::new(env!("CARGO_BIN_EXE_weftctl")).parent().unwrap();
    let missing: Vec<&str> = ["weft-control", "weft-proxy", "weft-echo"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        println!(
            "SKIP: {missing:?} not built next to weftctl (cargo test --workspace builds them)"
        );
    }
    missing.is_empty()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn lab_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("weft-lab-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `lab up` in the background, `apply`, `status`, `exec` in a pod's
/// network; the supervisor killed with SIGKILL (a crash); `lab down` still
/// removes every process and namespace, and says so; a second `down` is
/// harmless. Then the README's demo, which must exit 0. One test: a lab
/// owns machine-wide names while it runs.
#[test]
fn lab_up_exec_crash_down_and_the_demo() {
    if !lab_binaries() {
        return;
    }
    if !lab_namespaces().is_empty() {
        println!("SKIP: a lab is already running on this machine");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let d = path(&dir);
    let up = ok(weftctl(&["lab", "up", "--dir", d]));
    assert!(up.contains("lab up: 2 clusters"), "{up}");
    let root = workspace_root();
    for (cluster, file) in [
        ("c1", "examples/lab/demo-common.yaml"),
        ("c1", "examples/lab/client.yaml"),
    ] {
        let out = ok(weftctl(&[
            "lab",
            "apply",
            "--dir",
            d,
            "--cluster",
            cluster,
            "-f",
            path(&root.join(file)),
        ]));
        assert!(out.contains("created"), "{out}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = ok(weftctl(&["lab", "status", "--dir", d]));
        if status.lines().any(|l| {
            l.contains("client") && l.contains("Running") && l.trim_end().ends_with("true")
        }) {
            assert!(status.contains("cluster c2"), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client pod never got ready:\n{status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // What the client's sidecar was told, from both ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        // The control plane may still be starting: asked again until then.
        let out = weftctl(&["proxy-status", "--dir", d, "--cluster", "c1"]);
        let status = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
        let row = status
            .lines()
            .find(|l| l.contains("ns/demo/sa/client"))
            .map(str::to_string);
        if let Some(row) = row.filter(|r| r.matches("SYNCED").count() == 6) {
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client's proxy never SYNCED:\n{status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    println!("proxy-status: {status}");
    let workloads = ok(weftctl(&[
        "proxy-config",
        "client",
        "workloads",
        "-n",
        "demo",
        "--dir",
        d,
    ]));
    assert!(workloads.starts_with("NAME"), "{workloads}");
    assert!(workloads.contains("c1/demo/client"), "{workloads}");
    let certs = ok(weftctl(&[
        "proxy-config",
        "client",
        "certs",
        "-n",
        "demo",
        "--dir",
        d,
    ]));
    assert!(
        certs.contains("spiffe://cluster.local/ns/demo/sa/client"),
        "{certs}"
    );
    let services: serde_json::Value = serde_json::from_str(&ok(weftctl(&[
        "proxy-config",
        "client",
        "services",
        "-n",
        "demo",
        "--dir",
        d,
        "-o",
        "json",
    ])))
    .unwrap();
    assert!(services.as_array().is_some(), "{services}");
    assert!(
        !weftctl(&["proxy-config", "nope", "routes", "-n", "demo", "--dir", d])
            .status
            .success()
    );

    let exec = ok(weftctl(&[
        "lab",
        "exec",
        "--dir",
        d,
        "-n",
        "demo",
        "client",
        "--",
        "sh",
        "-c",
        "echo ip=$POD_IP",
    ]));
    assert!(
        exec.starts_with("ip=10.101.") || exec.starts_with("ip=127.101."),
        "{exec}"
    );
    assert!(
        !weftctl(&[
            "lab", "exec", "--dir", d, "-n", "demo", "nope", "--", "true"
        ])
        .status
        .success()
    );

    // A crash: the supervisor dies without cleaning up.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    let supervisor = state["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the lab supervisor this test started.
    unsafe { libc::kill(supervisor, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let recorded: Vec<i32> = std::fs::read_to_string(dir.join("pids"))
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert!(
        recorded.iter().any(|p| alive(*p)),
        "the crash should leave processes behind"
    );
    let down = ok(weftctl(&["lab", "down", "--dir", d]));
    assert!(down.contains("lab down"), "{down}");
    for pid in &recorded {
        assert!(!alive(*pid), "process {pid} survived lab down");
    }
    assert!(lab_namespaces().is_empty(), "{:?}", lab_namespaces());
    let again = ok(weftctl(&["lab", "down", "--dir", d]));
    assert!(again.contains("0 leftover processes"), "{again}");

    // The README's first command.
    let demo = ok(weftctl(&[
        "lab",
        "demo",
        "--dir",
        path(&tmp.path().join("demo")),
    ]));
    assert!(demo.contains("the demo behaved at every step"), "{demo}");
    assert!(
        demo.contains("the client gets 403 (RBAC: access denied)"),
        "{demo}"
    );
    assert!(demo.contains("cluster c1 drained"), "{demo}");
    assert!(
        demo.contains("the client's sidecar is SYNCED in 6 of 6 resource types"),
        "{demo}"
    );
    if weft_lab::netns::unavailable().is_none() {
        assert!(demo.contains("names in the client pod"), "{demo}");
    }
    assert!(lab_namespaces().is_empty());

    // Its story across networks, which needs a namespace per pod.
    let refused = weftctl(&["lab", "up", "--network", "multi", "--loopback", "--dir", d]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs a network namespace per pod"),
        "{refused:?}"
    );
    if let Some(reason) = weft_lab::netns::unavailable() {
        println!("SKIP lab demo --network multi: {reason}");
        return;
    }
    let demo = ok(weftctl(&[
        "lab",
        "demo",
        "--network",
        "multi",
        "--dir",
        path(&tmp.path().join("demo-multi")),
    ]));
    for step in [
        "the demo behaved at every step",
        "cannot be reached at all",
        "traffic failed over to c2 through c2's east-west gateway",
        "5 of 5 requests fail, as they must",
        "c2's gateway redeployed: traffic back through it",
    ] {
        assert!(demo.contains(step), "{step}:\n{demo}");
    }
    assert!(lab_namespaces().is_empty());
}

/// A lab API server for cluster c1 under `dir` with `manifests`
/// applied; its kubeconfig.
async fn api_server_with(
    dir: &std::path::Path,
    manifests: &[&str],
) -> (weft_lab::ApiServer, std::path::PathBuf) {
    let server = weft_lab::ApiServer::start(weft_lab::ApiServerConfig {
        cluster_name: "c1".into(),
        dir: Some(dir.join("c1")),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().await.unwrap();
    for manifest in manifests {
        weft_lab::apply::apply_all(&client, manifest).await.unwrap();
    }
    (server, dir.join("c1").join("kubeconfig"))
}

/// `weftctl authz check` lists what applies to a pod, in evaluation
/// order, with refused policies named, and decides for a described caller
/// with the sidecar's evaluator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_check_shows_the_policies_of_a_pod_and_the_rule_that_decides() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = [
        include_str!("../../examples/install/05-security-crds.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec: {containers: [{name: echo, image: echo}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: demo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-only, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"#,
    ];
    let (server, kubeconfig) = api_server_with(dir.path(), &manifests).await;
    let check = |extra: &[&str]| {
        let mut args: Vec<String> = ["authz", "check", "echo", "-n", "demo", "--kubeconfig"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(kubeconfig.to_str().unwrap().into());
        args.extend(extra.iter().map(|s| s.to_string()));
        weftctl_async(args)
    };
    let listing = ok(check(&[]).await);
    assert!(listing.contains("mTLS: STRICT"), "{listing}");
    let deny = listing.find("demo/deny-admin").expect(&listing);
    let allow = listing.find("demo/allow-client").expect(&listing);
    assert!(
        deny < allow,
        "DENY is listed (and evaluated) first:\n{listing}"
    );
    assert!(
        !listing.contains("jwt-only"),
        "a policy for other pods is not shown"
    );

    let client_get = [
        "--from",
        "cluster.local/ns/demo/sa/client",
        "--port",
        "8080",
    ];
    let allowed = ok(check(&client_get).await);
    assert!(
        allowed.contains("ALLOWED by demo/allow-client, rule 0"),
        "{allowed}"
    );
    let admin = ok(check(&[&client_get[..], &["--path", "/a/../admin"]].concat()).await);
    assert!(
        admin.contains("DENIED by demo/deny-admin, rule 0"),
        "{admin}"
    );
    let post = ok(check(&[&client_get[..], &["--method", "POST"]].concat()).await);
    assert!(
        post.contains("DENIED: ALLOW policies apply and none matches"),
        "{post}"
    );
    let plaintext = ok(check(&["--port", "8080"]).await);
    assert!(plaintext.contains("DENIED"), "{plaintext}");
    // On TCP, the DENY's HTTP-only `paths` is ignored, so it matches
    // every connection (Istio: a DENY is never weaker on TCP)...
    let tcp = ok(check(&[&client_get[..], &["--tcp"]].concat()).await);
    assert!(tcp.contains("DENIED by demo/deny-admin"), "{tcp}");
    // ...and without it, the ALLOW rule that needs a method never matches.
    let client = server.client().await.unwrap();
    weft_lab::apply::delete_all(&client, manifests[1].split("---").nth(4).unwrap())
        .await
        .unwrap();
    let tcp = ok(check(&[&client_get[..], &["--tcp"]].concat()).await);
    assert!(
        tcp.contains("DENIED: ALLOW policies apply and none matches"),
        "{tcp}"
    );
}

#[tokio::test]
async fn analyze_names_refused_fields_dangling_references_and_routes_not_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = [
        include_str!("../../lab/crds/traffic.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: scoped
  namespace: demo
  annotations: {weft.io/global: "yes", weft.io/affinity: nearest, weft.io/shared: "false"}
spec: {selector: {app: scoped}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo, subset: v9}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-too, namespace: demo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: delegating, namespace: demo}
spec:
  hosts: [other]
  http: [{delegate: {name: x}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-nowhere, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: nope, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: demo}
spec:
  parentRefs: [{kind: Gateway, name: public}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
"#,
    ];
    let (_server, kubeconfig) = api_server_with(dir.path(), &manifests).await;
    let out = weftctl_async(vec![
        "analyze".into(),
        "--kubeconfig".into(),
        kubeconfig.to_str().unwrap().into(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "errors fail the command:\n{text}");
    for expected in [
        "VirtualService demo/delegating",
        "spec.http[0].delegate: not supported by weft (the object is not applied)",
        "no DestinationRule defines subset \"v9\" of echo.demo.svc.cluster.local",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: ignored",
        "HTTPRoute demo/to-nowhere",
        "no Service nope.demo.svc.cluster.local",
        "HTTPRoute demo/ingress",
        "for gateways only",
        // The HTTPRoute for echo takes precedence over both VirtualServices.
        "not in force for echo.demo.svc.cluster.local: routed by HTTPRoute demo/to-nowhere",
        "Service demo/scoped",
        "weft.io/global: \"yes\" is neither \"true\" nor \"false\": ignored",
        "weft.io/affinity: \"nearest\" is not local, remote or none: ignored",
        "6 traffic objects, 2 Services: 4 errors, 5 warnings",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// `kubectl kustomize dir` as documents; `None`, said, without kubectl.
fn kustomize(dir: &Path) -> Option<Vec<serde_json::Value>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(err) => {
            eprintln!("SKIPPED: kubectl is not installed ({err}); .ci/run installs it");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap())
}

/// Every leaf of the objects, as "Kind/namespace/name path" → value; the
/// items of lists that have names are keyed by them, so that a list's
/// order or length elsewhere does not count as a difference.
fn leaves(docs: &[serde_json::Value]) -> std::collections::BTreeMap<String, String> {
    fn walk(
        at: String,
        value: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    walk(format!("{at}.{key}"), inner, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, inner) in items.iter().enumerate() {
                    let key = inner["name"].as_str().map_or(i.to_string(), str::to_string);
                    walk(format!("{at}[{key}]"), inner, out);
                }
            }
            leaf => {
                out.insert(at, leaf.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for doc in docs {
        let object = format!(
            "{}/{}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["namespace"].as_str().unwrap_or_default(),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        walk(object, doc, &mut out);
    }
    out
}

/// Where the example clusters' installs may differ: what cluster-settings
/// writes, the cluster's ConfigMap, and which remote secrets it expects.
fn differs_where_it_should(leaf: &str) -> bool {
    let env = |deployment: &str, container: &str| {
        ["WEFT_CLUSTER_ID", "WEFT_NETWORK"].iter().any(|var| {
            leaf == format!("Deployment/weft-system/{deployment}.spec.template.spec.containers[{container}].env[{var}].value")
        })
    };
    leaf.starts_with("ConfigMap/weft-system/weft-cluster.data.")
        || leaf.starts_with("ExternalSecret/weft-system/weft-remote-")
        || leaf == "ExternalSecret/weft-system/cacerts.spec.dataFrom[0].extract.key"
        || env("weft-control", "weft-control")
        || env("weft-eastwest-gateway", "gateway")
        || leaf
            == "Deployment/weft-system/weft-control.spec.template.metadata.labels.topology.kubernetes.io/region"
        || leaf == "Namespace//weft-system.metadata.labels.topology.weft.io/network"
        || leaf == "Namespace//weft-system.metadata.labels.topology.kubernetes.io/region"
        || leaf
            == "Service/weft-system/weft-eastwest-gateway.metadata.labels.topology.weft.io/network"
}

/// The GitOps layout: each example cluster's overlay renders with
/// kubectl kustomize, is valid against the Kubernetes 1.33 schemas (where
/// kubernetes-validate is installed), says its own cluster id, network and
/// region where weft reads them and expects the other clusters' remote
/// secrets, and differs from the others nowhere else.
#[test]
fn gitops_overlays_render_validate_and_differ_only_where_they_should() {
    let gitops = workspace_root().join("examples/gitops/clusters");
    let mut clusters: Vec<String> = std::fs::read_dir(&gitops)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    clusters.sort();
    assert_eq!(clusters, ["c1", "c2", "c3"]);
    let validate = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !validate {
        eprintln!("SKIPPED (schemas only): kubernetes-validate is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = Vec::new();
    for cluster in &clusters {
        let Some(docs) = kustomize(&gitops.join(cluster)) else {
            return;
        };
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{cluster}: no {kind} {name}"))
                .clone()
        };
        let settings = find("ConfigMap", "weft-cluster")["data"].clone();
        assert_eq!(settings["clusterId"], cluster.as_str());
        let network = settings["network"].as_str().unwrap();
        let env = |deployment: &str, var: &str| {
            find("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == var)
                .map(|e| e["value"].clone())
                .unwrap()
        };
        for deployment in ["weft-control", "weft-eastwest-gateway"] {
            assert_eq!(env(deployment, "WEFT_CLUSTER_ID"), cluster.as_str());
            assert_eq!(env(deployment, "WEFT_NETWORK"), network);
        }
        let namespace = find("Namespace", "weft-system");
        assert_eq!(
            namespace["metadata"]["labels"]["topology.weft.io/network"],
            network
        );
        assert_eq!(
            namespace["metadata"]["labels"]["topology.kubernetes.io/region"],
            settings["region"]
        );
        assert_eq!(
            find("Service", "weft-eastwest-gateway")["metadata"]["labels"]["topology.weft.io/network"],
            network
        );
        assert_eq!(
            find("ExternalSecret", "cacerts")["spec"]["dataFrom"][0]["extract"]["key"],
            format!("weft/{cluster}/cacerts")
        );
        for other in clusters.iter().filter(|c| *c != cluster) {
            let remote = find("ExternalSecret", &format!("weft-remote-{other}"));
            assert_eq!(
                remote["spec"]["target"]["template"]["metadata"]["labels"]["weft.io/multicluster"],
                "true"
            );
            assert_eq!(remote["spec"]["data"][0]["secretKey"], other.as_str());
        }
        if validate {
            let file = dir.path().join(format!("{cluster}.yaml"));
            let text: Vec<String> = docs
                .iter()
                .map(|d| serde_json::to_string(d).unwrap())
                .collect();
            std::fs::write(&file, text.join("\n---\n")).unwrap();
            let out = Command::new("kubernetes-validate")
                .args(["--strict", "-k", "1.33.0"])
                .arg(&file)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
            assert!(
                out.status.success() && !said.contains("ERROR"),
                "{cluster}: {said}"
            );
        }
        rendered.push(leaves(&docs));
    }
    let first = &rendered[0];
    for (cluster, other) in clusters.iter().zip(&rendered).skip(1) {
        let differing: Vec<&String> = first
            .keys()
            .chain(other.keys())
            .filter(|k| first.get(*k) != other.get(*k))
            .collect();
        let unexpected: Vec<&&String> = differing
            .iter()
            .filter(|k| !differs_where_it_should(k))
            .collect();
        assert!(
            unexpected.is_empty(),
            "c1 and {cluster} differ where they should not: {unexpected:?}"
        );
        assert!(differing.len() >= 6, "{differing:?}");
    }
}

/// The release is one setting: changing the registry and tag in
/// examples/gitops/release moves weft-control's image, the gateway's and
/// the sidecar image weft-control injects.
#[test]
fn one_release_setting_moves_every_image() {
    let root = workspace_root();
    let copy = tempfile::tempdir().unwrap();
    let copied = |from: &str| {
        let out = Command::new("cp")
            .arg("-r")
            .arg(root.join("examples").join(from))
            .arg(copy.path().join(from))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    copied("install");
    copied("gitops");
    let release = copy.path().join("gitops/release/kustomization.yaml");
    let text = std::fs::read_to_string(&release)
        .unwrap()
        .replace(
            "newName: ghcr.io/weft-mesh/",
            "newName: registry.example.com/team/",
        )
        .replace("newTag: 0.1.0", "newTag: 9.9.9");
    std::fs::write(&release, text).unwrap();
    let Some(docs) = kustomize(&copy.path().join("gitops/clusters/c2")) else {
        return;
    };
    let text = serde_json::to_string(&docs).unwrap();
    for image in ["weft-control", "weft-proxy"] {
        assert!(
            text.contains(&format!("registry.example.com/team/{image}:9.9.9")),
            "{image} did not follow"
        );
    }
    assert!(!text.contains("ghcr.io"), "an image kept the old registry");
    assert!(
        text.contains(
            r#""name":"WEFT_PROXY_IMAGE","value":"registry.example.com/team/weft-proxy:9.9.9""#
        ),
        "the injected sidecar image did not follow"
    );
}

/// Every path the ApplicationSet's template can produce is an overlay:
/// the cluster generator's selector lists the cluster ids it takes.
#[test]
fn the_applicationset_points_only_at_overlays_that_exist() {
    let root = workspace_root();
    let set: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root.join("examples/gitops/applicationset.yaml")).unwrap(),
    )
    .unwrap();
    let expression = &set["spec"]["generators"][0]["clusters"]["selector"]["matchExpressions"][0];
    assert_eq!(expression["operator"], "In");
    let label = expression["key"].as_str().unwrap();
    let path = set["spec"]["template"]["spec"]["source"]["path"]
        .as_str()
        .unwrap();
    let placeholder = format!(r#"{{{{ index .metadata.labels "{label}" }}}}"#);
    assert!(path.contains(&placeholder), "{path}");
    assert_eq!(path.matches("{{").count(), 1, "{path}: one placeholder");
    let ids: Vec<&str> = expression["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!ids.is_empty());
    for id in &ids {
        let overlay = root.join(path.replace(&placeholder, id));
        assert!(
            overlay.join("kustomization.yaml").is_file(),
            "{} does not exist",
            overlay.display()
        );
    }
    let overlays = std::fs::read_dir(root.join("examples/gitops/clusters"))
        .unwrap()
        .count();
    assert_eq!(overlays, ids.len(), "an overlay no Application points at");
}

/// images/build makes the proxy's OCI image without a daemon; unpacked,
/// its binary runs (`--version`), as do the init container's
/// iptables-restore and ip6tables-restore (in a chroot of the image's root,
/// so from the image's own files); it runs as 1337 with weft-proxy as its
/// entrypoint, and is small. Needs root, buildah and umoci (.ci/run
/// installs them).
#[test]
fn the_proxy_image_builds_unpacks_and_runs() {
    let missing: Vec<&str> = ["buildah", "umoci"]
        .into_iter()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !missing.is_empty() || !root {
        eprintln!("SKIPPED: building images needs root and {missing:?} (.ci/run installs them)");
        return;
    }
    let workspace = workspace_root();
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let built = Command::new(workspace.join("images/build"))
        .arg("weft-proxy")
        .env("OUT", out.path())
        .env("WEFT_TAG", "test")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&[built.stdout, built.stderr].concat()).into_owned();
    assert!(built.status.success(), "{said}");
    println!("{said}built in {:.0} s", started.elapsed().as_secs_f64());
    let bundle = out.path().join("bundle");
    let unpacked = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", out.path().join("weft-proxy").display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(unpacked.status.success(), "{unpacked:?}");
    let rootfs = bundle.join("rootfs");
    let version = ok(Command::new(rootfs.join("usr/local/bin/weft-proxy"))
        .arg("--version")
        .output()
        .unwrap());
    assert_eq!(
        version.trim(),
        format!("weft-proxy {}", env!("CARGO_PKG_VERSION"))
    );
    for tool in ["/usr/sbin/iptables-restore", "/usr/sbin/ip6tables-restore"] {
        let out = Command::new("chroot")
            .arg(&rootfs)
            .arg(tool)
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} in the image: {out:?}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["process"]["user"]["uid"], 1337);
    assert_eq!(config["process"]["user"]["gid"], 1337);
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/usr/local/bin/weft-proxy"])
    );
    let size = |dir: &Path| {
        let out = Command::new("du").arg("-sk").arg(dir).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap()
    };
    let (layout, unpacked) = (size(&out.path().join("weft-proxy")), size(&rootfs));
    println!(
        "weft-proxy image: {layout} KiB as an OCI layout (compressed), {unpacked} KiB unpacked"
    );
    assert!(layout < 20 * 1024, "the image grew to {layout} KiB");
}
