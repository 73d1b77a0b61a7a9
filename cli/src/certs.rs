//! `weftctl certs`: make the mesh's CA files for operators.
//!
//! The layout matches what the control plane loads: a root kept by the
//! operator (`root-cert.pem`, `root-key.pem`) and per cluster the four files
//! of the `cacerts` secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use weft_certs::{CaParams, CertificateAuthority, Identity, PluginFiles, issue_workload};

pub const ROOT_KEY: &str = "root-key.pem";

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a self-signed root CA: root-cert.pem and root-key.pem.
    Root(RootArgs),
    /// Create a cluster's intermediate CA under the root, in the `cacerts` layout.
    Intermediate(IntermediateArgs),
    /// Issue a workload certificate (for testing and for workloads outside Kubernetes).
    Workload(WorkloadArgs),
}

#[derive(Args)]
pub struct RootArgs {
    /// Where to write root-cert.pem and root-key.pem.
    #[arg(long, default_value = "certs")]
    out_dir: PathBuf,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Root lifetime, e.g. 3650d.
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    ttl: Duration,
    #[arg(long, default_value = "weft root CA")]
    common_name: String,
    /// Replace existing files instead of refusing.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct IntermediateArgs {
    /// The cluster ID this CA serves.
    #[arg(long)]
    cluster: String,
    /// Directory holding root-cert.pem and root-key.pem.
    #[arg(long, default_value = "certs")]
    root_dir: PathBuf,
    /// Where to write the cacerts files [default: <root-dir>/<cluster>].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Intermediate lifetime, e.g. 365d. Must end before the root's.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    ttl: Duration,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct WorkloadArgs {
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
    #[arg(long)]
    identity: String,
    /// Directory of the issuing CA in the cacerts layout.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Where to write cert-chain.pem, key.pem and root-cert.pem.
    #[arg(long, default_value = "workload-certs")]
    out_dir: PathBuf,
    /// Certificate lifetime, e.g. 24h. The CA caps it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
    #[arg(long)]
    force: bool,
}

pub fn run(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Root(args) => root(args),
        CertsCommand::Intermediate(args) => intermediate(args),
        CertsCommand::Workload(args) => workload(args),
    }
}

fn root(args: RootArgs) -> Result<()> {
    refuse_overwrite(
        &args.out_dir,
        &[PluginFiles::ROOT_CERT, ROOT_KEY],
        args.force,
    )?;
    let ca = CertificateAuthority::generate_root(
        &args.trust_domain,
        &CaParams::valid_for(args.common_name, args.ttl),
    )?;
    let files = ca.plugin_files();
    create_dir(&args.out_dir)?;
    write(
        &args.out_dir,
        PluginFiles::ROOT_CERT,
        &files.root_cert,
        false,
    )?;
    write(&args.out_dir, ROOT_KEY, &files.ca_key, true)?;
    println!(
        "wrote root CA for trust domain {} to {} ({} and {}); keep {} offline",
        args.trust_domain,
        args.out_dir.display(),
        PluginFiles::ROOT_CERT,
        ROOT_KEY,
        ROOT_KEY
    );
    Ok(())
}

fn intermediate(args: IntermediateArgs) -> Result<()> {
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| args.root_dir.join(&args.cluster));
    refuse_overwrite(
        &out_dir,
        &[
            PluginFiles::CA_CERT,
            PluginFiles::CA_KEY,
            PluginFiles::ROOT_CERT,
            PluginFiles::CERT_CHAIN,
        ],
        args.force,
    )?;
    let root = load_root(&args.root_dir, &args.trust_domain)?;
    let ca = root.generate_intermediate(
        &args.cluster,
        &CaParams::valid_for(format!("weft intermediate CA {}", args.cluster), args.ttl),
    )?;
    ca.plugin_files().write_dir(&out_dir)?;
    println!(
        "wrote intermediate CA for cluster {} to {}\n\
         install it with:\n  kubectl create secret generic cacerts -n weft-system \\\n    \
         --from-file={d}/ca-cert.pem --from-file={d}/ca-key.pem \\\n    \
         --from-file={d}/root-cert.pem --from-file={d}/cert-chain.pem",
        args.cluster,
        out_dir.display(),
        d = out_dir.display()
    );
    Ok(())
}

fn workload(args: WorkloadArgs) -> Result<()> {
    let identity: Identity = args.identity.parse()?;
    refuse_overwrite(
        &args.out_dir,
        &["cert-chain.pem", "key.pem", PluginFiles::ROOT_CERT],
        args.force,
    )?;
    let files = PluginFiles::read_dir(&args.ca_dir)?;
    let ca = CertificateAuthority::from_plugin(&files, &identity.trust_domain)
        .with_context(|| format!("loading the CA from {}", args.ca_dir.display()))?;
    let cert = issue_workload(&ca, &identity, Some(args.ttl))?;
    create_dir(&args.out_dir)?;
    write(&args.out_dir, "cert-chain.pem", &cert.chain_pem(), false)?;
    write(&args.out_dir, "key.pem", &cert.key_pem(), true)?;
    write(
        &args.out_dir,
        PluginFiles::ROOT_CERT,
        &ca.roots_pem(),
        false,
    )?;
    println!(
        "wrote certificate for {identity} to {} (expires {})",
        args.out_dir.display(),
        rfc3339(cert.not_after())
    );
    Ok(())
}

fn load_root(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (create a root first with `weftctl certs root --out-dir {}`)",
                path.display(),
                dir.display()
            )
        })
    };
    let cert = read(PluginFiles::ROOT_CERT)?;
    let key = read(ROOT_KEY)?;
    // Checked here so that errors name the files the operator has, not the
    // cacerts names they are loaded under.
    weft_certs::pem::certificates(PluginFiles::ROOT_CERT, &cert)?;
    weft_certs::pem::private_key(ROOT_KEY, &key)?;
    let files = PluginFiles {
        ca_cert: cert.clone(),
        ca_key: key,
        root_cert: cert,
        cert_chain: String::new(),
    };
    // The first certificate is the signing root; any further roots in the
    // file stay trusted (a root rotation in progress).
    CertificateAuthority::from_plugin(&files, trust_domain)
        .with_context(|| format!("loading the root CA from {}", dir.display()))
}

fn refuse_overwrite(dir: &Path, names: &[&str], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    for name in names {
        let path = dir.join(name);
        if path.exists() {
            bail!(
                "{} already exists; pass --force to replace it",
                path.display()
            );
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<()> {
    Ok(weft_certs::write_file(&dir.join(name), contents, secret)?)
}

/// Parses "90s", "15m", "24h", "365d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: add a unit (s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number before the unit"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?}: too long"))
}

fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("365d"), Ok(Duration::from_secs(365 * 86400)));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
