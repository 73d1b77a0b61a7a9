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

fn in_ns(ns: &str, program: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn rules_install_idempotently_and_clean_up_in_a_namespace() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !have("ip", "-V") || !have("iptables", "--version") {
        eprintln!(
            "SKIPPED: needs root, iproute2 and iptables (CI runs as root and installs iptables)"
        );
        return;
    }
    let name = format!("weft-test-ipt-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "delete", &name]).output();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    let ns = Netns(name);
    let proxy = env!("CARGO_BIN_EXE_weft-proxy");
    let args = [
        "iptables",
        "--exclude-inbound-ports",
        "8080",
        "--exclude-outbound-ports",
        "5432",
    ];

    for _ in 0..2 {
        let out = in_ns(&ns.0, proxy, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let saved =
        String::from_utf8_lossy(&in_ns(&ns.0, "iptables-save", &["-t", "nat"]).stdout).into_owned();
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

    for _ in 0..2 {
        let out = in_ns(&ns.0, proxy, &["iptables", "--cleanup"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let saved =
        String::from_utf8_lossy(&in_ns(&ns.0, "iptables-save", &["-t", "nat"]).stdout).into_owned();
    assert!(!saved.contains("WEFT"), "{saved}");

    // Bad input is refused before anything is touched.
    let out = in_ns(
        &ns.0,
        proxy,
        &["iptables", "--exclude-outbound-ports", "http"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a port number"));
}
