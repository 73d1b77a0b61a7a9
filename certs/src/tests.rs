//! Unit tests for the CA, the plug-in layout, CSR signing and rotation.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};

use crate::x509::check_signed_by;
use crate::*;

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn root() -> CertificateAuthority {
    CertificateAuthority::generate_root(TD, &CaParams::valid_for("weft root", 3650 * DAY)).unwrap()
}

fn intermediate(root: &CertificateAuthority, cluster: &str) -> CertificateAuthority {
    root.generate_intermediate(cluster, &CaParams::valid_for(cluster, 365 * DAY))
        .unwrap()
}

fn echo() -> Identity {
    Identity::new(TD, "demo", "echo").unwrap()
}

fn csr_with_sans(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn certs_of(chain: &[String]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    chain
        .iter()
        .flat_map(|c| pem::certificates("chain", c).unwrap())
        .collect()
}

#[test]
fn root_is_a_self_signed_ca() {
    let root = root();
    let files = root.plugin_files();
    let cert = &pem::certificates("root", &files.ca_cert).unwrap()[0];
    let info = CertInfo::parse("root", cert).unwrap();
    assert!(info.is_ca);
    check_signed_by("root", cert, cert).unwrap();
    assert_eq!(files.ca_cert, files.root_cert);
}

#[test]
fn intermediate_chains_to_its_root_and_round_trips_through_cacerts() {
    let root = root();
    let c1 = intermediate(&root, "c1");
    let files = c1.plugin_files();
    let chain = pem::certificates("chain", &files.cert_chain).unwrap();
    assert_eq!(chain.len(), 2, "cert-chain.pem holds ca-cert then root");
    check_signed_by("chain", &chain[0], &chain[1]).unwrap();
    assert_eq!(files.root_cert, root.roots_pem());

    let dir = tempfile::tempdir().unwrap();
    files.write_dir(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(PluginFiles::CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key must be private");
    }
    let loaded =
        CertificateAuthority::from_plugin(&PluginFiles::read_dir(dir.path()).unwrap(), TD).unwrap();
    let chain = loaded.sign_csr(
        &WorkloadKey::generate().unwrap().csr_pem(&echo()).unwrap(),
        &echo(),
        None,
    );
    assert_eq!(chain.unwrap().len(), 3);
}

#[test]
fn plugin_without_cert_chain_finds_its_root() {
    let root = root();
    let complete = intermediate(&root, "c1").plugin_files();
    let mut files = complete.clone();
    files.cert_chain.clear();
    let ca = CertificateAuthority::from_plugin(&files, TD).unwrap();
    assert_eq!(ca.plugin_files().cert_chain, complete.cert_chain);
}

#[test]
fn plugin_with_the_wrong_key_is_refused() {
    let root = root();
    let mut files = intermediate(&root, "c1").plugin_files();
    files.ca_key = intermediate(&root, "c2").plugin_files().ca_key;
    let err = CertificateAuthority::from_plugin(&files, TD).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
}

#[test]
fn plugin_from_a_foreign_root_is_refused() {
    let mut files = intermediate(&root(), "c1").plugin_files();
    files.root_cert = root().roots_pem();
    files.cert_chain.clear();
    let err = CertificateAuthority::from_plugin(&files, TD).unwrap_err();
    assert!(matches!(err, CertError::BrokenChain { .. }), "{err}");
}

#[test]
fn expired_plugin_ca_is_refused() {
    let files = intermediate(&root(), "c1").plugin_files();
    let later = SystemTime::now() + 400 * DAY;
    let err = CertificateAuthority::from_plugin_at(&files, TD, later).unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
}

#[test]
fn plugin_garbage_is_a_clear_error() {
    let mut files = intermediate(&root(), "c1").plugin_files();
    files.ca_key = "not a key".into();
    let err = CertificateAuthority::from_plugin(&files, TD).unwrap_err();
    assert!(err.to_string().contains("ca-key.pem"), "{err}");

    let mut files = intermediate(&root(), "c1").plugin_files();
    files.ca_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
    let err = CertificateAuthority::from_plugin(&files, TD).unwrap_err();
    assert!(matches!(err, CertError::BadCertificate { .. }), "{err}");
}

#[test]
fn a_workload_certificate_cannot_act_as_a_ca() {
    let root = root();
    let workload = issue_workload(&root, &echo(), None).unwrap();
    let files = PluginFiles {
        ca_cert: pem::encode_certificates(workload.full_chain().first()),
        ca_key: workload.key_pem(),
        root_cert: root.roots_pem(),
        cert_chain: workload.chain_pem(),
    };
    let err = CertificateAuthority::from_plugin(&files, TD).unwrap_err();
    assert!(matches!(err, CertError::NotCa { .. }), "{err}");
}

#[test]
fn signs_a_csr_into_a_spiffe_only_short_lived_certificate() {
    let root = root();
    let c1 = intermediate(&root, "c1");
    let key = WorkloadKey::generate().unwrap();
    let now = SystemTime::now();
    let chain = c1
        .sign_csr_at(&key.csr_pem(&echo()).unwrap(), &echo(), None, now)
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let ders = certs_of(&chain);
    check_signed_by("leaf", &ders[0], &ders[1]).unwrap();
    check_signed_by("intermediate", &ders[1], &ders[2]).unwrap();
    assert_eq!(chain[2], root.roots_pem(), "root last");

    let info = CertInfo::parse("leaf", &ders[0]).unwrap();
    assert!(!info.is_ca);
    assert_eq!(info.uri_sans, vec![echo().uri()]);
    assert_eq!(info.identity(), Some(echo()));
    let lifetime = info.not_after.duration_since(now).unwrap();
    assert!(
        lifetime <= DEFAULT_WORKLOAD_TTL
            && lifetime > DEFAULT_WORKLOAD_TTL - Duration::from_secs(5),
        "default lifetime is 24h, got {lifetime:?}"
    );

    let cert = WorkloadCert::from_pem(&chain, &key).unwrap();
    assert_eq!(cert.identity(), &echo());
    assert_eq!(cert.presented_chain().len(), 2, "the root is not sent");
}

#[test]
fn lifetime_is_configurable_and_capped() {
    let ca = root().with_policy(SigningPolicy {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(2 * 3600),
    });
    let lifetime_of = |ttl| {
        let cert = issue_workload(&ca, &echo(), ttl).unwrap();
        cert.not_after().duration_since(SystemTime::now()).unwrap()
    };
    assert!(lifetime_of(None) <= Duration::from_secs(3600));
    assert!(lifetime_of(None) > Duration::from_secs(3590));
    let capped = lifetime_of(Some(30 * DAY));
    assert!(capped <= Duration::from_secs(2 * 3600) && capped > Duration::from_secs(7190));
    let err = issue_workload(&ca, &echo(), Some(Duration::from_secs(5))).unwrap_err();
    assert!(matches!(err, CertError::BadLifetime { .. }), "{err}");
}

#[test]
fn a_leaf_never_outlives_its_ca() {
    let root = root();
    let short = root
        .generate_intermediate("c1", &CaParams::valid_for("c1", Duration::from_secs(3600)))
        .unwrap();
    let cert = issue_workload(&short, &echo(), None).unwrap();
    assert!(cert.not_after() <= short.not_after());
}

#[test]
fn intermediate_may_not_outlive_its_root() {
    let root = CertificateAuthority::generate_root(TD, &CaParams::valid_for("r", DAY)).unwrap();
    let err = root
        .generate_intermediate("c1", &CaParams::valid_for("c1", 10 * DAY))
        .unwrap_err();
    assert!(matches!(err, CertError::BadLifetime { .. }), "{err}");
}

#[test]
fn expired_ca_refuses_to_sign() {
    let ca = intermediate(&root(), "c1");
    let csr = WorkloadKey::generate().unwrap().csr_pem(&echo()).unwrap();
    let err = ca
        .sign_csr_at(&csr, &echo(), None, SystemTime::now() + 400 * DAY)
        .unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
}

#[test]
fn refuses_a_csr_for_another_identity() {
    let ca = root();
    let other = Identity::new(TD, "demo", "admin").unwrap();
    let csr = WorkloadKey::generate().unwrap().csr_pem(&other).unwrap();
    let err = ca.sign_csr(&csr, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::IdentityMismatch { .. }), "{err}");
    assert!(err.to_string().contains("sa/admin") && err.to_string().contains("sa/echo"));
}

#[test]
fn refuses_a_foreign_trust_domain() {
    let ca = root();
    let foreign = Identity::new("evil.example", "demo", "echo").unwrap();
    let csr = WorkloadKey::generate().unwrap().csr_pem(&foreign).unwrap();
    let err = ca.sign_csr(&csr, &foreign, None).unwrap_err();
    assert!(matches!(err, CertError::ForeignTrustDomain { .. }), "{err}");
}

#[test]
fn refuses_non_spiffe_and_extra_sans() {
    let ca = root();
    let dns = csr_with_sans(vec![SanType::DnsName("echo.demo.svc".try_into().unwrap())]);
    let err = ca.sign_csr(&dns, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::NotSpiffe(_)), "{err}");

    let uri = csr_with_sans(vec![SanType::URI(
        "https://example.com/x".try_into().unwrap(),
    )]);
    let err = ca.sign_csr(&uri, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::NotSpiffe(_)), "{err}");

    let two = csr_with_sans(vec![
        SanType::URI(echo().uri().try_into().unwrap()),
        SanType::DnsName("echo.demo.svc".try_into().unwrap()),
    ]);
    let err = ca.sign_csr(&two, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::CsrSans(_)), "{err}");

    let none = csr_with_sans(vec![]);
    let err = ca.sign_csr(&none, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::CsrSans(_)), "{err}");
}

#[test]
fn refuses_a_csr_with_a_bad_signature() {
    let ca = root();
    let csr = WorkloadKey::generate().unwrap().csr_pem(&echo()).unwrap();
    let mut der = ::pem::parse(&csr).unwrap().into_contents();
    // The signature is the last field of the CSR; flip one of its bits.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = crate::pem::encode("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &echo(), None).unwrap_err();
    assert!(matches!(err, CertError::CsrSignature), "{err}");
}

#[test]
fn refuses_csr_garbage() {
    let ca = root();
    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = ca.sign_csr(garbage, &echo(), None).unwrap_err();
        assert!(matches!(err, CertError::BadCsr(_)), "{garbage:?}: {err}");
    }
}

#[test]
fn workload_cert_with_the_wrong_key_is_refused() {
    let ca = root();
    let key = WorkloadKey::generate().unwrap();
    let chain = ca
        .sign_csr(&key.csr_pem(&echo()).unwrap(), &echo(), None)
        .unwrap();
    let other = WorkloadKey::generate().unwrap();
    let err = WorkloadCert::from_pem(&chain, &other).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
}

#[test]
fn rotation_is_due_at_half_life_minus_a_little_jitter() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let end = start + Duration::from_secs(1000);
    assert_eq!(
        rotation_due(start, end, 0.0),
        start + Duration::from_secs(500)
    );
    assert_eq!(
        rotation_due(start, end, 1.0),
        start + Duration::from_secs(450)
    );
    let jittered = rotation_due(start, end, 0.5);
    assert!(jittered < start + Duration::from_secs(500));
    assert!(jittered > start + Duration::from_secs(450));
    assert_eq!(rotation_due(start, end, 7.0), rotation_due(start, end, 1.0));

    // Counted from when the certificate arrived, not from its backdated
    // not_before: a 60 s certificate is due in about 30 s, not at once.
    for ttl in [60, 3600] {
        let issued = SystemTime::now();
        let cert = issue_workload(&root(), &echo(), Some(Duration::from_secs(ttl))).unwrap();
        let left = cert.not_after().duration_since(issued).unwrap();
        let half = issued + left / 2;
        assert!(cert.not_before() < issued, "backdated for clock skew");
        assert!(!cert.needs_rotation(SystemTime::now()), "ttl {ttl}");
        assert!(!cert.needs_rotation(half - left.mul_f64(0.06)), "ttl {ttl}");
        assert!(
            cert.needs_rotation(half + Duration::from_secs(1)),
            "ttl {ttl}"
        );
    }
}

#[test]
fn serving_certificates_carry_dns_and_ip_names() {
    let ca = intermediate(&root(), "c1");
    let (chain, key) = ca
        .issue_serving(
            &["localhost", "weft-control.weft-system.svc"],
            &["127.0.0.1".parse().unwrap()],
            DAY,
        )
        .unwrap();
    let ders = pem::certificates("serving", &chain).unwrap();
    assert_eq!(ders.len(), 3);
    check_signed_by("serving", &ders[0], &ders[1]).unwrap();
    let info = CertInfo::parse("serving", &ders[0]).unwrap();
    assert!(!info.is_ca);
    assert!(
        info.identity().is_none(),
        "no SPIFFE identity on a serving cert"
    );
    pem::private_key("key", &key).unwrap();
    let err = ca.issue_serving(&["bad name!"], &[], DAY).unwrap_err();
    assert!(err.to_string().contains("bad name!"), "{err}");
}
