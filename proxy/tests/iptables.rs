//! `weft-proxy iptables` for real, inside a network namespace this test
//! makes and removes: the rules go in, a second run does not stack them,
//! and cleanup leaves nothing. Needs root, `ip` and `iptables`; skips and
//! says why otherwise.

use std::process::Command;

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

/// A fresh network namespace for this test, or `None` (with the reason
/// printed) where the test cannot run. Deleted when dropped.
fn namespace(name: &str) -> Option<Netns> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !have("ip", "-V") || !have("iptables", "--version") {
        eprintln!(
            "SKIPPED: needs root, iproute2 and iptables (CI runs as root and installs iptables)"
        );
        return None;
    }
    let _ = Command::new("ip").args(["netns", "delete", name]).output();
    assert!(
        Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success()
    );
    Some(Netns(name.to_string()))
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap()
}

/// Runs `program` in `ns`, failing the test with what it said if it fails.
fn in_ns_ok(ns: &str, program: &str, args: &[&str]) {
    let out = in_ns(ns, program, args);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?}: {said}");
}

/// The nat table as `save` (iptables-save or ip6tables-save) prints it.
fn nat_rules(ns: &str, save: &str) -> String {
    String::from_utf8_lossy(&in_ns(ns, save, &["-t", "nat"]).stdout).into_owned()
}

/// The capture rules for the service range only.
const CAPTURE_SERVICES: [&str; 5] = [
    "iptables",
    "--proxy-uid",
    "4242",
    "--include-outbound-cidrs",
    "10.96.0.0/16",
];

#[test]
fn rules_install_idempotently_and_clean_up_in_a_namespace() {
    let Some(ns) = namespace(&format!("weft-test-ipt-{}", std::process::id())) else {
        return;
    };
    let proxy = env!("CARGO_BIN_EXE_weft-proxy");
    let args = [
        "iptables",
        "--exclude-inbound-ports",
        "8080",
        "--exclude-outbound-ports",
        "5432",
    ];

    for _ in 0..2 {
        in_ns_ok(&ns.0, proxy, &args);
    }
    let saved = nat_rules(&ns.0, "iptables-save");
    assert!(
        saved.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{saved}"
    );
    assert!(saved.contains("--uid-owner 1337"), "{saved}");
    assert!(saved.contains("--dport 8080 -j RETURN"), "{saved}");
    assert_eq!(
        saved.matches("-A OUTPUT -p tcp -j WEFT_OUTPUT").count(),
        1,
        "a second run must not stack rules:\n{saved}"
    );

    let saved6 = nat_rules(&ns.0, "ip6tables-save");
    assert!(
        saved6.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "IPv6 is captured too:\n{saved6}"
    );
    assert!(saved6.contains("-d ::1/128 -j RETURN"), "{saved6}");
    assert_eq!(saved6.matches("-A OUTPUT -p tcp -j WEFT_OUTPUT").count(), 1);

    for _ in 0..2 {
        in_ns_ok(&ns.0, proxy, &["iptables", "--cleanup"]);
    }
    let saved = nat_rules(&ns.0, "iptables-save");
    assert!(!saved.contains("WEFT"), "{saved}");
    let saved6 = nat_rules(&ns.0, "ip6tables-save");
    assert!(!saved6.contains("WEFT"), "{saved6}");

    // Bad input is refused before anything is touched.
    let out = in_ns(
        &ns.0,
        proxy,
        &["iptables", "--exclude-outbound-ports", "http"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a port number"));
}

/// Transparent capture for real: inside a namespace, the rules from
/// `weft-proxy iptables` redirect an app's connection to a service VIP to
/// the transparent listener, which reads SO_ORIGINAL_DST, resolves the
/// service and reaches its endpoint. Traffic outside the captured range is
/// not touched, and a direct connection to the capture port is refused
/// rather than looped.
#[test]
fn a_connection_to_a_vip_is_captured_and_delivered() {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_proxy::outbound::{Outbound, serve_transparent};
    use weft_proxy::state::Snapshot;
    use weft_proxy::xds::XdsState;
    use weft_xds_proto::mesh;

    let Some(ns) = namespace(&format!("weft-test-cap-{}", std::process::id())) else {
        return;
    };
    // Loopback up, and a route for the service range so that connecting to
    // a VIP reaches the nat OUTPUT hook.
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec![
            "ip",
            "route",
            "add",
            "10.96.0.0/16",
            "dev",
            "lo",
            "src",
            "127.0.0.1",
        ],
    ] {
        in_ns_ok(&ns.0, args[0], &args[1..]);
    }
    // The proxy's UID is not used here: only the service range is
    // captured, and the proxy dials pod addresses outside it.
    in_ns_ok(&ns.0, env!("CARGO_BIN_EXE_weft-proxy"), &CAPTURE_SERVICES);

    let path = format!("/var/run/netns/{}", ns.0);
    let result = std::thread::spawn(move || -> Result<String, String> {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        // SAFETY: setns only changes this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let app = tokio::net::TcpListener::bind("127.0.0.1:8080")
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = app.accept().await {
                    tokio::spawn(async move {
                        let _ = conn.write_all(b"app:").await;
                        let mut buf = [0u8; 64];
                        while let Ok(n) = conn.read(&mut buf).await {
                            if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            let web = tokio::net::TcpListener::bind("127.0.0.1:8081")
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = web.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nweb")
                        .await;
                }
            });
            let xds = Arc::new(XdsState::default());
            use weft_xds_proto::testing;
            let ports = vec![
                testing::port(80, "tcp", mesh::AppProtocol::Tcp, 8080),
                // Undeclared: the sidecar sniffs HTTP and routes it.
                testing::port(81, "web", mesh::AppProtocol::Unspecified, 8081),
            ];
            let service = testing::service("demo", "echo", [10, 96, 0, 10], ports);
            let binding = testing::binding(
                "demo",
                "echo.demo.svc.cluster.local",
                &[(80, 8080), (81, 8081)],
            );
            let workload = mesh::Workload {
                // No sidecar: reached directly.
                tunnel_protocol: mesh::TunnelProtocol::None as i32,
                identity: None,
                ..testing::workload("c1/demo/echo", vec![127, 0, 0, 1], "echo", vec![binding])
            };
            xds.snapshot.store(Arc::new(
                Snapshot::from_messages(&[service], &[workload]).map_err(|e| e.to_string())?,
            ));
            let ca = weft_certs::CertificateAuthority::generate_root(
                "cluster.local",
                &weft_certs::CaParams::valid_for("r", std::time::Duration::from_secs(3600)),
            )
            .map_err(|e| e.to_string())?;
            let me = weft_certs::Identity::new("cluster.local", "demo", "client")
                .map_err(|e| e.to_string())?;
            let certs = weft_certs::tls::CertStore::new(
                &weft_certs::issue_workload(&ca, &me, None).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            let bundle = weft_certs::tls::TrustBundle::from_pem(&ca.roots_pem())
                .map_err(|e| e.to_string())?;
            let pool =
                weft_proxy::pool::Pool::new(certs, bundle, weft_proxy::pool::CONNECT_TIMEOUT);
            let outbound = Arc::new(Outbound::new(
                Default::default(),
                xds,
                pool,
                Arc::default(),
                Default::default(),
            ));
            let capture = tokio::net::TcpListener::bind("0.0.0.0:15001")
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(serve_transparent(capture, outbound));

            let step = std::time::Duration::from_secs(5);
            // The app dials the VIP; the rules send it to the sidecar.
            let mut conn =
                tokio::time::timeout(step, tokio::net::TcpStream::connect("10.96.0.10:80"))
                    .await
                    .map_err(|_| "connect to the VIP timed out".to_string())?
                    .map_err(|e| format!("connect to the VIP: {e}"))?;
            conn.write_all(b"hello").await.map_err(|e| e.to_string())?;
            let mut got = [0u8; 9];
            tokio::time::timeout(step, conn.read_exact(&mut got))
                .await
                .map_err(|_| "no answer through the capture".to_string())?
                .map_err(|e| e.to_string())?;
            // HTTP to the VIP's undeclared port: sniffed, routed per request.
            let mut web =
                tokio::time::timeout(step, tokio::net::TcpStream::connect("10.96.0.10:81"))
                    .await
                    .map_err(|_| "connect to the VIP timed out".to_string())?
                    .map_err(|e| format!("connect to the VIP: {e}"))?;
            web.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            tokio::time::timeout(step, web.read_to_end(&mut answer))
                .await
                .map_err(|_| "no HTTP answer through the capture".to_string())?
                .map_err(|e| e.to_string())?;
            let answer = String::from_utf8_lossy(&answer);
            if !(answer.starts_with("HTTP/1.1 200") && answer.ends_with("web")) {
                return Err(format!("HTTP through the capture: {answer:?}"));
            }
            // Outside the captured range: straight to the app.
            let mut direct = tokio::net::TcpStream::connect("127.0.0.1:8080")
                .await
                .map_err(|e| e.to_string())?;
            let mut hello = [0u8; 4];
            direct
                .read_exact(&mut hello)
                .await
                .map_err(|e| e.to_string())?;
            // Straight to the capture port: refused, not looped.
            let mut own = tokio::net::TcpStream::connect("127.0.0.1:15001")
                .await
                .map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(step, own.read_to_end(&mut rest))
                .await
                .is_ok();
            Ok(format!(
                "{}|{}|{closed}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&hello)
            ))
        })
    })
    .join()
    .unwrap();
    assert_eq!(result.unwrap(), "app:hello|app:|true");
    drop(ns);
}

/// Runs `f` on a thread inside network namespace `ns`.
fn on_thread_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        // SAFETY: setns only changes this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
}

/// Inbound capture across two namespaces joined by a veth pair: a client
/// in one dials the app's address in the other; the rules there redirect
/// it to 15006, which forwards it in PERMISSIVE mode and refuses it in
/// STRICT mode.
#[test]
fn inbound_plaintext_is_forwarded_when_permissive_and_refused_when_strict() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_proxy::inbound_passthrough::{self as inbound, Counters, Mode};

    let tag = std::process::id() % 100_000;
    let (client_ns, pod_ns) = (format!("weft-test-c-{tag}"), format!("weft-test-p-{tag}"));
    let (Some(_client_guard), Some(_pod_guard)) = (namespace(&client_ns), namespace(&pod_ns))
    else {
        return;
    };
    let (veth_c, veth_p) = (format!("wc{tag}"), format!("wp{tag}"));
    let setup: Vec<Vec<String>> = vec![vec![
        "ip", "link", "add", &veth_c, "netns", &client_ns, "type", "veth", "peer", "name", &veth_p,
        "netns", &pod_ns,
    ]]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in &setup {
        let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An address on the pod's link that is not the pod's: 15006 must not
    // relay to it.
    in_ns_ok(
        &pod_ns,
        "ip",
        &["addr", "add", "10.250.0.3/24", "dev", &veth_p],
    );
    // Dual-stack: IPv6 must be captured as IPv4 is.
    for (ns, dev, addr, addr6) in [
        (&client_ns, &veth_c, "10.250.0.1/24", "fd00:250::1/64"),
        (&pod_ns, &veth_p, "10.250.0.2/24", "fd00:250::2/64"),
    ] {
        for args in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", addr, "dev", dev],
            vec!["ip", "-6", "addr", "add", addr6, "dev", dev, "nodad"],
            vec!["ip", "link", "set", dev, "up"],
        ] {
            in_ns_ok(ns, args[0], &args[1..]);
        }
    }
    in_ns_ok(&pod_ns, env!("CARGO_BIN_EXE_weft-proxy"), &CAPTURE_SERVICES);

    for mode in [Mode::Permissive, Mode::Strict] {
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let pod_counters = counters.clone();
        let pod = on_thread_in(&pod_ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = tokio::net::TcpListener::bind("10.250.0.2:8080")
                    .await
                    .unwrap();
                tokio::spawn(async move {
                    while let Ok((mut conn, _)) = app.accept().await {
                        let _ = conn.write_all(b"app:").await;
                    }
                });
                // An HTTP app that says whether a caller identity reached it.
                let web = tokio::net::TcpListener::bind("[::]:8081").await.unwrap();
                tokio::spawn(async move {
                    while let Ok((mut conn, _)) = web.accept().await {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf).await {
                                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                                _ => break,
                            }
                        }
                        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                        let verdict = if text.contains("x-weft-peer-identity") {
                            "forged"
                        } else {
                            "clean"
                        };
                        if text.contains("upgrade: websocket") {
                            // Switch, say the verdict, then echo.
                            let _ = conn
                                .write_all(
                                    format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n{verdict}:").as_bytes(),
                                )
                                .await;
                            while let Ok(n) = conn.read(&mut buf).await {
                                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                        let _ = conn
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{verdict}",
                                    verdict.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                    }
                });
                let capture = tokio::net::TcpListener::bind("[::]:15006").await.unwrap();
                tokio::spawn(inbound::serve(
                    capture,
                    mode,
                    pod_counters,
                    std::sync::Arc::new(weft_proxy::local_app::LocalApp::at(vec![
                        "10.250.0.2".parse().unwrap(),
                        "fd00:250::2".parse().unwrap(),
                    ])),
                ));
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
            });
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("pod side ready");
        let client = on_thread_in(&client_ns, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let step = std::time::Duration::from_secs(5);
                let mut conn =
                    tokio::time::timeout(step, tokio::net::TcpStream::connect("10.250.0.2:8080"))
                        .await
                        .map_err(|_| "connect timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                let mut got = Vec::new();
                let _ = tokio::time::timeout(step, conn.read_to_end(&mut got)).await;
                // Plain HTTP with a forged caller identity.
                let mut web =
                    tokio::time::timeout(step, tokio::net::TcpStream::connect("10.250.0.2:8081"))
                        .await
                        .map_err(|_| "connect timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                let _ = web
                    .write_all(
                        b"GET / HTTP/1.1\r\nhost: web\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(step, web.read_to_end(&mut answer)).await;
                let answer = String::from_utf8_lossy(&answer);
                let verdict = answer.rsplit("\r\n\r\n").next().unwrap_or("");
                // A WebSocket-style upgrade, forged identity included: the
                // app switches, never sees the identity, and echoes.
                let mut switched = String::new();
                if let Ok(Ok(mut up)) =
                    tokio::time::timeout(step, tokio::net::TcpStream::connect("10.250.0.2:8081"))
                        .await
                {
                    let _ = up
                        .write_all(
                            b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: websocket\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\n\r\n",
                        )
                        .await;
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    let mut pinged = false;
                    while !String::from_utf8_lossy(&seen).ends_with(":ping") {
                        match tokio::time::timeout(step, up.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                        if !pinged && String::from_utf8_lossy(&seen).ends_with(':') {
                            pinged = true;
                            let _ = up.write_all(b"ping").await;
                        }
                    }
                    let seen = String::from_utf8_lossy(&seen);
                    if let Some((head, rest)) = seen.split_once("\r\n\r\n") {
                        let status = head.split(' ').nth(1).unwrap_or("?");
                        switched = format!("{status} {rest}");
                    }
                }
                // An unusual method, a caller silent for a while first, and
                // an h2c upgrade: each still gets HTTP's treatment, so none
                // carries the forged identity to the app.
                let mut odd = Vec::new();
                for (to, pause, request) in [
                    ("10.250.0.2:8081", 0, &b"PROPFIND / HTTP/1.1\r\nhost: web\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\nconnection: close\r\n\r\n"[..]),
                    ("10.250.0.2:8081", 300, b"GET / HTTP/1.1\r\nhost: web\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\nconnection: close\r\n\r\n"),
                    ("10.250.0.2:8081", 0, b"GET / HTTP/1.1\r\nhost: web\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\n\r\n"),
                    ("[fd00:250::2]:8081", 0, b"GET / HTTP/1.1\r\nhost: web\r\nx-weft-peer-identity: spiffe://cluster.local/ns/x/sa/admin\r\nconnection: close\r\n\r\n"),
                    ("10.250.0.3:8081", 0, b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"),
                ] {
                    let Ok(Ok(mut conn)) =
                        tokio::time::timeout(step, tokio::net::TcpStream::connect(to)).await
                    else {
                        odd.push(String::new());
                        continue;
                    };
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    let _ = conn.write_all(request).await;
                    let mut answer = Vec::new();
                    let _ = tokio::time::timeout(step, conn.read_to_end(&mut answer)).await;
                    let answer = String::from_utf8_lossy(&answer);
                    odd.push(answer.rsplit("\r\n\r\n").next().unwrap_or("").to_string());
                }
                Ok::<String, String>(format!(
                    "{}|{verdict}|{switched}|{}",
                    String::from_utf8_lossy(&got),
                    odd.join(",")
                ))
            })
        });
        let received = client.join().unwrap().unwrap().unwrap();
        let _ = stop_tx.send(());
        pod.join().unwrap().unwrap();
        match mode {
            Mode::Permissive => {
                // The server-first app answered once the sniffing gave up;
                // the HTTP app never saw the forged identity.
                assert_eq!(
                    received,
                    "app:|clean|101 clean:ping|clean,clean,clean,clean,"
                );
                assert_eq!(counters.forwarded.load(Ordering::Relaxed), 7);
                assert_eq!(counters.refused_not_local.load(Ordering::Relaxed), 1);
            }
            Mode::Strict => {
                assert_eq!(
                    received, "|||,,,,",
                    "STRICT must not let plaintext reach the app"
                );
                assert_eq!(counters.refused_plaintext.load(Ordering::Relaxed), 7);
                assert_eq!(counters.refused_not_local.load(Ordering::Relaxed), 1);
            }
        }
    }
}
