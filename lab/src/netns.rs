//! The lab's network (as root): a "router" namespace with one bridge per
//! cluster, each pod in a namespace of its own joined to its cluster's
//! bridge by a veth pair, and forwarding on in the router only, so that
//! pods of all clusters reach each other (a flat network). The lab's own
//! processes (API servers, control planes) live in the router namespace and
//! are reached at each bridge's gateway address. Nothing is added to the
//! host's namespace, and everything is named with `weft-lab-` or `wl` so a
//! sweep can remove it after a crash. See ../shared/notes/lab-network.md.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every namespace the lab makes starts with this.
pub const PREFIX: &str = "weft-lab-";
/// The router namespace.
pub const ROUTER: &str = "weft-lab-router";

/// Why namespaces cannot be used here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The gateway (router) address of cluster `c` (1-based).
pub fn gateway(c: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100 + c, 0, 1)
}

/// The address of pod `index` (0-based) of cluster `c`.
pub fn pod_address(c: u8, index: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        100 + c,
        (1 + index / 250) as u8,
        (1 + index % 250) as u8,
    )
}

pub fn exists(name: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(name).exists()
}

/// Creates the router namespace with a bridge per cluster.
pub fn create_router(clusters: u8) -> Result<()> {
    if !exists(ROUTER) {
        run("ip", &["netns", "add", ROUTER])?;
    }
    run("ip", &["-n", ROUTER, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            ROUTER,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    // The load balancers' range (`load_balancer`): local here, so that a
    // DNAT rule sends a connection on to its pod, and without one (no
    // ready endpoint) the connection is refused at once, from pods and
    // from the lab's own processes alike.
    let _ = run(
        "ip",
        &[
            "-n",
            ROUTER,
            "route",
            "add",
            "local",
            "10.100.0.0/16",
            "dev",
            "lo",
        ],
    );
    for c in 1..=clusters {
        let bridge = format!("wlb{c}");
        let _ = run(
            "ip",
            &["-n", ROUTER, "link", "add", &bridge, "type", "bridge"],
        );
        let _ = run(
            "ip",
            &[
                "-n",
                ROUTER,
                "addr",
                "add",
                &format!("{}/16", gateway(c)),
                "dev",
                &bridge,
            ],
        );
        run("ip", &["-n", ROUTER, "link", "set", &bridge, "up"])?;
    }
    Ok(())
}

/// Makes each cluster's pod network its own (a multi-network lab): the
/// router drops traffic between clusters' bridges, except connections a
/// load balancer's DNAT sent there and their replies. Called in the router
/// namespace; the rules go with it.
pub fn isolate(clusters: u8) -> Result<()> {
    let rule = |args: &[&str]| -> Result<()> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(args);
        run("iptables", &full)
    };
    rule(&["-F", "FORWARD"])?;
    // Replies, and what a load balancer's DNAT sent on.
    for state in ["ESTABLISHED,RELATED", "DNAT"] {
        rule(&[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            state,
            "-j",
            "ACCEPT",
        ])?;
    }
    for a in 1..=clusters {
        for b in (1..=clusters).filter(|b| *b != a) {
            rule(&[
                "-A",
                "FORWARD",
                "-i",
                &format!("wlb{a}"),
                "-o",
                &format!("wlb{b}"),
                "-j",
                "DROP",
            ])?;
        }
    }
    Ok(())
}

/// Moves the calling thread into namespace `name`. Called on the main
/// thread before any other thread starts, it moves the whole process.
pub fn enter(name: &str) -> Result<()> {
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("opening network namespace {name}"))?;
    // SAFETY: setns changes only the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pod's namespace name.
pub fn pod_namespace(c: u8, index: u32) -> String {
    format!("{PREFIX}p{c}x{index}")
}

/// Creates pod `index` of cluster `c`: its namespace, `eth0` on the
/// cluster's bridge, its address and default route.
pub fn create_pod(c: u8, index: u32) -> Result<(String, Ipv4Addr)> {
    let ns = pod_namespace(c, index);
    let address = pod_address(c, index);
    if exists(&ns) {
        delete(&ns);
    }
    run("ip", &["netns", "add", &ns])?;
    let veth = format!("wlv{c}x{index}");
    let _ = run("ip", &["-n", ROUTER, "link", "del", &veth]);
    run(
        "ip",
        &[
            "-n", ROUTER, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            ROUTER,
            "link",
            "set",
            &veth,
            "master",
            &format!("wlb{c}"),
        ],
    )?;
    run("ip", &["-n", ROUTER, "link", "set", &veth, "up"])?;
    run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/16"),
            "dev",
            "eth0",
        ],
    )?;
    run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gateway(c).to_string(),
        ],
    )?;
    Ok((ns, address))
}

/// Two namespaces `<PREFIX><a>` and `<PREFIX><b>` joined by a veth pair,
/// with addresses `ip_a` and `ip_b` (a /30 between them) and `routed`
/// (such as a service address to be captured) routed out of `a`'s link.
/// For benchmarks that need two hosts' worth of network on one machine;
/// `sweep` removes them after a crash like any lab namespace.
pub fn create_pair(
    a: &str,
    ip_a: Ipv4Addr,
    b: &str,
    ip_b: Ipv4Addr,
    routed: &[Ipv4Addr],
) -> Result<(String, String)> {
    let (ns_a, ns_b) = (format!("{PREFIX}{a}"), format!("{PREFIX}{b}"));
    for ns in [&ns_a, &ns_b] {
        if exists(ns) {
            delete(ns);
        }
        run("ip", &["netns", "add", ns])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    }
    let made = (|| {
        run(
            "ip",
            &[
                "-n", &ns_a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                "netns", &ns_b,
            ],
        )?;
        for (ns, ip) in [(&ns_a, ip_a), (&ns_b, ip_b)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", "eth0"],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        }
        for address in routed {
            run(
                "ip",
                &[
                    "-n",
                    &ns_a,
                    "route",
                    "add",
                    &format!("{address}/32"),
                    "dev",
                    "eth0",
                ],
            )?;
        }
        Ok(())
    })();
    if let Err(err) = made {
        delete(&ns_a);
        delete(&ns_b);
        return Err(err);
    }
    Ok((ns_a, ns_b))
}

/// Runs `program` with `args` (split on spaces) in namespace `ns`, or
/// here when `None`.
pub fn exec(ns: Option<&str>, program: &str, args: &str) -> Result<()> {
    let args: Vec<&str> = args.split_whitespace().collect();
    match ns {
        Some(ns) => {
            let mut all = vec!["netns", "exec", ns, program];
            all.extend(args);
            run("ip", &all)
        }
        None => run(program, &args),
    }
}

/// Deletes a namespace (its veth pair goes with it). Quiet if missing.
pub fn delete(name: &str) {
    let _ = run("ip", &["netns", "delete", name]);
}

/// The lab's namespaces that exist now.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every namespace the lab made (pods first, the router last).
/// Idempotent: safe after a crash and when nothing is left.
pub fn sweep() -> Vec<String> {
    let mut names = list();
    names.sort_by_key(|n| n == ROUTER);
    for name in &names {
        delete(name);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_never_collide_with_the_gateway() {
        assert_eq!(gateway(1), Ipv4Addr::new(10, 101, 0, 1));
        assert_eq!(pod_address(1, 0), Ipv4Addr::new(10, 101, 1, 1));
        assert_eq!(pod_address(2, 249), Ipv4Addr::new(10, 102, 1, 250));
        assert_eq!(pod_address(2, 250), Ipv4Addr::new(10, 102, 2, 1));
        assert!(pod_namespace(3, 12).len() <= 40);
        assert!(
            format!("wlv{}x{}", 9, 99_999).len() <= 15,
            "interface names fit IFNAMSIZ"
        );
    }
}
