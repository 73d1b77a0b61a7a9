//! `weft-proxy iptables`: the capture rules the init container installs in
//! the pod's network namespace.
//!
//! Outbound TCP is redirected to 15001 and inbound TCP to 15006, except the
//! proxy's own traffic (its UID), loopback, the proxy's own ports and the
//! excluded ports and ranges; the app's DNS (UDP and TCP 53) to the
//! sidecar's DNS proxy on 15053. Everything lives in `WEFT_*` chains of the nat
//! table, applied in one `iptables-restore --noflush` transaction so a pod
//! never runs with half the rules; `--cleanup` removes exactly those chains
//! and the jumps to them, and is safe to run twice.
//!
//! IPv6 gets the same rules through `ip6tables` whenever the pod's network
//! has IPv6 at all: an address family left uncaptured would be a way to the
//! app past the sidecar.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The ports of the proxy itself, never captured inbound.
pub const PROXY_PORTS: &[u16] = &[15000, 15001, 15006, 15008, 15020, 15021, 15053, 15090];

/// weft's chains in the nat table.
const CHAINS: [&str; 5] = [
    "WEFT_INBOUND",
    "WEFT_IN_REDIRECT",
    "WEFT_OUTPUT",
    "WEFT_REDIRECT",
    "WEFT_DNS",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub proxy_uid: u32,
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations to capture; empty means all.
    pub include_outbound_cidrs: Vec<String>,
    pub exclude_outbound_cidrs: Vec<String>,
    /// Where the app's DNS (UDP and TCP port 53) is redirected: the
    /// sidecar's DNS proxy; 0 leaves DNS alone.
    pub dns_capture_port: u16,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            proxy_uid: 1337,
            inbound_capture_port: 15006,
            outbound_capture_port: 15001,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            dns_capture_port: 15053,
        }
    }
}

/// Parses "8080,9090" (empty allowed) into ports.
pub fn parse_ports(text: &str) -> Result<Vec<u16>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .with_context(|| format!("{p:?} is not a port number"))
        })
        .collect()
}

/// Checks a CIDR (IPv4 or IPv6) the way iptables will read it, so a typo
/// fails here with a clear message rather than half-way through the rules.
pub fn parse_cidrs(text: &str) -> Result<Vec<String>> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let addr_text = c.split_once('/').map_or(c, |(a, _)| a);
            let addr: std::net::IpAddr = addr_text
                .parse()
                .with_context(|| format!("{c:?} is not an IPv4 or IPv6 CIDR"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = match c.split_once('/') {
                Some((_, p)) => p
                    .parse()
                    .with_context(|| format!("{c:?} has a bad prefix"))?,
                None => max,
            };
            if prefix > max {
                bail!("{c:?} has a prefix over {max}");
            }
            Ok(format!("{addr}/{prefix}"))
        })
        .collect()
}

/// An address family's tools and loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Family::V6)
    }
}

/// Whether this network namespace has IPv6 (then it must be captured too).
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

impl Capture {
    /// The IPv4 rules, as `iptables-restore` input for the nat table.
    pub fn rules(&self) -> String {
        self.rules_for(Family::V4)
    }

    /// The rules for one family; CIDRs of the other family are left out.
    pub fn rules_for(&self, family: Family) -> String {
        let mut r = String::from("*nat\n");
        for chain in CHAINS {
            r.push_str(&format!(":{chain} - [0:0]\n"));
        }
        r.push_str(&format!(
            "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.inbound_capture_port
        ));
        r.push_str(&format!(
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_capture_port
        ));

        // Inbound: everything to the pod, but the proxy's and excluded ports.
        r.push_str("-A PREROUTING -p tcp -j WEFT_INBOUND\n");
        let mut skip_in: Vec<u16> = PROXY_PORTS.to_vec();
        skip_in.extend(&self.exclude_inbound_ports);
        skip_in.sort_unstable();
        skip_in.dedup();
        for port in skip_in {
            r.push_str(&format!(
                "-A WEFT_INBOUND -p tcp --dport {port} -j RETURN\n"
            ));
        }
        r.push_str("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT\n");

        // DNS: the app's queries (to any server, loopback included) go to
        // the sidecar's DNS proxy; the proxy's own go where they were sent.
        if self.dns_capture_port != 0 {
            r.push_str(&format!(
                "-A WEFT_DNS -m owner --uid-owner {} -j RETURN\n",
                self.proxy_uid
            ));
            for protocol in ["udp", "tcp"] {
                r.push_str(&format!("-A OUTPUT -p {protocol} --dport 53 -j WEFT_DNS\n"));
                r.push_str(&format!(
                    "-A WEFT_DNS -p {protocol} -j REDIRECT --to-ports {}\n",
                    self.dns_capture_port
                ));
            }
        }

        // Outbound: the app's connections, never the proxy's own.
        r.push_str("-A OUTPUT -p tcp -j WEFT_OUTPUT\n");
        r.push_str(&format!(
            "-A WEFT_OUTPUT -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        r.push_str(&format!(
            "-A WEFT_OUTPUT -d {} -j RETURN\n",
            family.loopback()
        ));
        for port in &self.exclude_outbound_ports {
            r.push_str(&format!("-A WEFT_OUTPUT -p tcp --dport {port} -j RETURN\n"));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| family.holds(c))
        {
            r.push_str(&format!("-A WEFT_OUTPUT -d {cidr} -j RETURN\n"));
        }
        if self.include_outbound_cidrs.is_empty() {
            r.push_str("-A WEFT_OUTPUT -j WEFT_REDIRECT\n");
        } else {
            // Only the listed ranges are captured; a family with none
            // listed captures nothing outbound.
            for cidr in self
                .include_outbound_cidrs
                .iter()
                .filter(|c| family.holds(c))
            {
                r.push_str(&format!("-A WEFT_OUTPUT -d {cidr} -j WEFT_REDIRECT\n"));
            }
        }
        r.push_str("COMMIT\n");
        r
    }
}

fn restore(family: Family, rules: &str) -> Result<()> {
    let tool = format!("{}-restore", family.tool());
    let mut child = Command::new(&tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (is it installed?)"))?;
    child
        .stdin
        .take()
        .with_context(|| format!("{tool} has no stdin"))?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The families to capture here: IPv4 always, IPv6 when it is on.
fn families() -> Vec<Family> {
    if ipv6_enabled() {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Installs the rules, first removing any earlier weft rules (a restarted
/// init container must not stack a second set).
pub fn apply(capture: &Capture) -> Result<()> {
    cleanup()?;
    for family in families() {
        restore(family, &capture.rules_for(family))?;
    }
    Ok(())
}

/// Removes the jumps to weft's chains and the chains; fine when absent.
pub fn cleanup() -> Result<()> {
    for family in families() {
        cleanup_family(family)?;
    }
    Ok(())
}

fn cleanup_family(family: Family) -> Result<()> {
    let tool = family.tool();
    let run = |args: &[&str]| Command::new(tool).args(args).output();
    let jumps: [(&str, &[&str]); 4] = [
        ("PREROUTING", &["-p", "tcp", "-j", "WEFT_INBOUND"]),
        ("OUTPUT", &["-p", "tcp", "-j", "WEFT_OUTPUT"]),
        ("OUTPUT", &["-p", "udp", "--dport", "53", "-j", "WEFT_DNS"]),
        ("OUTPUT", &["-p", "tcp", "--dport", "53", "-j", "WEFT_DNS"]),
    ];
    for (hook, rule) in jumps {
        // -D removes one jump per call; repeat until there is none.
        for _ in 0..16 {
            let mut args = vec!["-t", "nat", "-D", hook];
            args.extend_from_slice(rule);
            let out = run(&args).with_context(|| format!("running {tool} (is it installed?)"))?;
            if !out.status.success() {
                break;
            }
        }
    }
    for flag in ["-F", "-X"] {
        for chain in CHAINS {
            let _ = run(&["-t", "nat", flag, chain]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_capture_both_ways_with_exclusions() {
        let capture = Capture {
            exclude_inbound_ports: vec![8080],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["169.254.169.254/32".into()],
            ..Capture::default()
        };
        let rules = capture.rules();
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        assert!(rules.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(rules.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(rules.contains("-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(rules.contains("-A WEFT_INBOUND -p tcp --dport 8080 -j RETURN"));
        assert!(rules.contains("-A WEFT_INBOUND -p tcp --dport 15008 -j RETURN"));
        assert!(rules.contains("-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN"));
        assert!(rules.contains("-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN"));
        assert!(rules.contains("-A WEFT_OUTPUT -j WEFT_REDIRECT"));
        // The owner exclusion comes before any redirect.
        assert!(
            rules.find("--uid-owner").unwrap()
                < rules.find("-A WEFT_OUTPUT -j WEFT_REDIRECT").unwrap()
        );

        let only = Capture {
            include_outbound_cidrs: vec!["10.96.0.0/16".into()],
            ..Capture::default()
        };
        let rules = only.rules();
        assert!(rules.contains("-A WEFT_OUTPUT -d 10.96.0.0/16 -j WEFT_REDIRECT"));
        assert!(!rules.contains("-A WEFT_OUTPUT -j WEFT_REDIRECT"));
    }

    #[test]
    fn ipv6_is_captured_like_ipv4() {
        let capture = Capture {
            exclude_outbound_cidrs: vec!["169.254.169.254/32".into(), "fd00:ec2::254/128".into()],
            ..Capture::default()
        };
        let v4 = capture.rules_for(Family::V4);
        let v6 = capture.rules_for(Family::V6);
        for rules in [&v4, &v6] {
            assert!(rules.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
            assert!(rules.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
            assert!(rules.contains("-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        }
        assert!(v6.contains("-A WEFT_OUTPUT -d ::1/128 -j RETURN"));
        assert!(v6.contains("-d fd00:ec2::254/128 -j RETURN") && !v6.contains("169.254"));
        assert!(v4.contains("-d 169.254.169.254/32 -j RETURN") && !v4.contains("fd00"));
    }

    #[test]
    fn bad_ports_and_cidrs_are_refused() {
        assert_eq!(parse_ports("8080, 9090,").unwrap(), vec![8080, 9090]);
        assert!(parse_ports("").unwrap().is_empty());
        assert!(parse_ports("http").is_err());
        assert!(parse_ports("70000").is_err());
        assert_eq!(
            parse_cidrs("10.0.0.0/8,1.2.3.4").unwrap(),
            vec!["10.0.0.0/8", "1.2.3.4/32"]
        );
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert_eq!(
            parse_cidrs("fd00::/8, ::1").unwrap(),
            vec!["fd00::/8", "::1/128"]
        );
        assert!(parse_cidrs("fd00::/129").is_err());
        assert!(parse_cidrs("10.0.0/8").is_err());
        assert!(parse_cidrs("10.0.0.0/8; rm -rf /").is_err());
    }
}
