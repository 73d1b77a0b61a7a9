//! `weftctl certs` end to end: the files it writes load back as a working CA
//! and a workload certificate that chains to the root.

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
    let said = ok(weftctl(&[
        "certs",
        "intermediate",
        "--cluster",
        "c1",
        "--root-dir",
        path(&root_dir),
    ]));
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

    let out = weftctl(&[
        "certs",
        "intermediate",
        "--cluster",
        "c1",
        "--root-dir",
        path(&root_dir),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("weftctl certs root"), "{err}");

    ok(weftctl(&["certs", "root", "--out-dir", path(&root_dir)]));
    let before = std::fs::read(root_dir.join("root-key.pem")).unwrap();
    let out = weftctl(&["certs", "root", "--out-dir", path(&root_dir)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(root_dir.join("root-key.pem")).unwrap(),
        before
    );

    let out = weftctl(&[
        "certs",
        "workload",
        "--identity",
        "https://example.com/",
        "--ca-dir",
        path(&root_dir),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SPIFFE ID"));

    std::fs::write(root_dir.join("root-key.pem"), "garbage").unwrap();
    let out = weftctl(&[
        "certs",
        "intermediate",
        "--cluster",
        "c1",
        "--root-dir",
        path(&root_dir),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root-key.pem"), "{err}");
}
