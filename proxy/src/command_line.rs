//! `weft-proxy`'s command line: `proxy sidecar` (configured from the
//! environment the injector sets) and `iptables` (the init container).
//!
//! Parsed by hand: clap's code, resident in every sidecar, cost a quarter of
//! a megabyte for two commands and nine flags.

use anyhow::{Context, Result, bail};

use crate::iptables::{self, Capture};

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Sidecar,
    /// An east-west gateway (`proxy gateway`).
    Gateway,
    Iptables(Iptables),
    /// Print this text and exit successfully (`--help`, `--version`).
    Print(String),
}

/// `weft-proxy iptables`.
#[derive(Debug, PartialEq, Eq)]
pub struct Iptables {
    pub capture: Capture,
    /// Print the rules instead of installing them.
    pub dry_run: bool,
    /// Remove weft's rules instead (idempotent).
    pub cleanup: bool,
}

pub const USAGE: &str = "\
weft's sidecar proxy

Usage:
  weft-proxy proxy sidecar      run the sidecar, configured from WEFT_* and
                                the Downward API environment (docs/proxy.md)
  weft-proxy proxy gateway      run an east-west gateway, configured the same
                                way (docs/multi-network.md)
  weft-proxy iptables [FLAGS]   install the traffic capture rules in this
                                network namespace (the init container)
  weft-proxy --version

iptables flags (a value as `--flag value` or `--flag=value`):
  --proxy-uid <uid>                 connections from this UID (the proxy's)
                                    are never captured [1337]
  --inbound-capture-port <port>     [15006]
  --outbound-capture-port <port>    [15001]
  --exclude-inbound-ports <ports>   comma-separated, left out of inbound capture
  --exclude-outbound-ports <ports>  comma-separated, left out of outbound capture
  --include-outbound-cidrs <cidrs>  comma-separated IPv4 CIDRs to capture
                                    outbound (default: all)
  --exclude-outbound-cidrs <cidrs>  comma-separated IPv4 CIDRs never captured
  --dns-capture-port <port>         the app's DNS goes here; 0: left alone [15053]
  --dry-run                         print the rules instead of installing them
  --cleanup                         remove weft's rules instead (idempotent)
";

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command> {
    let mut args = args.into_iter();
    let Some(first) = args.next() else {
        bail!("no command given\n\n{USAGE}");
    };
    match first.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Print(USAGE.to_string())),
        "-V" | "--version" => Ok(Command::Print(format!(
            "weft-proxy {}\n",
            env!("CARGO_PKG_VERSION")
        ))),
        "proxy" => match args.next().as_deref() {
            Some(mode @ ("sidecar" | "gateway")) => match args.next() {
                None if mode == "sidecar" => Ok(Command::Sidecar),
                None => Ok(Command::Gateway),
                Some(extra) => bail!(
                    "`proxy {mode}` takes no arguments (it reads its environment), got {extra:?}"
                ),
            },
            Some("-h" | "--help") => Ok(Command::Print(USAGE.to_string())),
            other => {
                bail!("unknown proxy mode {other:?}: the mode is `sidecar` or `gateway`\n\n{USAGE}")
            }
        },
        "iptables" => iptables_flags(args),
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn iptables_flags(mut args: impl Iterator<Item = String>) -> Result<Command> {
    let mut out = Iptables {
        capture: Capture::default(),
        dry_run: false,
        cleanup: false,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(value) => Ok(value),
                None => args.next().with_context(|| format!("{flag} needs a value")),
            }
        };
        let capture = &mut out.capture;
        match flag.as_str() {
            "--proxy-uid" => capture.proxy_uid = number(&flag, &value()?)?,
            "--inbound-capture-port" => capture.inbound_capture_port = number(&flag, &value()?)?,
            "--outbound-capture-port" => capture.outbound_capture_port = number(&flag, &value()?)?,
            "--exclude-inbound-ports" => {
                capture.exclude_inbound_ports = iptables::parse_ports(&value()?)?
            }
            "--exclude-outbound-ports" => {
                capture.exclude_outbound_ports = iptables::parse_ports(&value()?)?
            }
            "--include-outbound-cidrs" => {
                capture.include_outbound_cidrs = iptables::parse_cidrs(&value()?)?
            }
            "--exclude-outbound-cidrs" => {
                capture.exclude_outbound_cidrs = iptables::parse_cidrs(&value()?)?
            }
            "--dns-capture-port" => capture.dns_capture_port = number(&flag, &value()?)?,
            "--dry-run" | "--cleanup" if inline.is_some() => {
                bail!("{flag} takes no value")
            }
            "--dry-run" => out.dry_run = true,
            "--cleanup" => out.cleanup = true,
            "-h" | "--help" => return Ok(Command::Print(USAGE.to_string())),
            other => bail!("unknown iptables flag {other:?}\n\n{USAGE}"),
        }
    }
    Ok(Command::Iptables(out))
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T> {
    text.parse()
        .ok()
        .with_context(|| format!("{flag} {text:?}: not a number in range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(line: &str) -> Result<Command> {
        parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn the_sidecar_and_the_defaults() {
        assert_eq!(parse_words("proxy sidecar").unwrap(), Command::Sidecar);
        assert_eq!(parse_words("proxy gateway").unwrap(), Command::Gateway);
        assert_eq!(
            parse_words("iptables").unwrap(),
            Command::Iptables(Iptables {
                capture: Capture::default(),
                dry_run: false,
                cleanup: false
            })
        );
    }

    #[test]
    fn flags_with_separate_and_inline_values() {
        let Command::Iptables(got) = parse_words(
            "iptables --proxy-uid 1000 --inbound-capture-port=16006 --outbound-capture-port 16001 \
             --exclude-inbound-ports=22,8080 --exclude-outbound-ports 53 \
             --include-outbound-cidrs 10.0.0.0/8 --exclude-outbound-cidrs=10.1.0.0/16 --dry-run",
        )
        .unwrap() else {
            panic!("not iptables");
        };
        assert_eq!(got.capture.proxy_uid, 1000);
        assert_eq!(got.capture.inbound_capture_port, 16006);
        assert_eq!(got.capture.outbound_capture_port, 16001);
        assert_eq!(got.capture.exclude_inbound_ports, vec![22, 8080]);
        assert_eq!(got.capture.exclude_outbound_ports, vec![53]);
        assert_eq!(got.capture.include_outbound_cidrs, vec!["10.0.0.0/8"]);
        assert_eq!(got.capture.exclude_outbound_cidrs, vec!["10.1.0.0/16"]);
        assert!(got.dry_run && !got.cleanup);
        let Command::Iptables(got) = parse_words("iptables --cleanup").unwrap() else {
            panic!("not iptables");
        };
        assert!(got.cleanup);
    }

    #[test]
    fn help_and_version_print() {
        for line in ["--help", "iptables --help", "proxy --help"] {
            assert!(
                matches!(parse_words(line).unwrap(), Command::Print(text) if text.contains("--proxy-uid")),
                "{line}"
            );
        }
        assert!(
            matches!(parse_words("--version").unwrap(), Command::Print(text) if text.starts_with("weft-proxy "))
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (line, says) in [
            ("", "no command"),
            ("proxy", "unknown proxy mode"),
            ("proxy sidecar --flag", "takes no arguments"),
            ("serve", "unknown command"),
            ("iptables --proxy-uid", "needs a value"),
            ("iptables --proxy-uid=-1", "not a number"),
            ("iptables --inbound-capture-port 70000", "not a number"),
            ("iptables --exclude-outbound-ports http", "http"),
            ("iptables --dry-run=yes", "takes no value"),
            ("iptables --verbose", "unknown iptables flag"),
        ] {
            let err = format!("{:#}", parse_words(line).unwrap_err());
            assert!(err.contains(says), "{line:?}: {err}");
        }
    }
}
