//! The trust bundle follows its file. The root certificate is a mounted
//! ConfigMap (`weft-root-cert`), which the kubelet updates in place when
//! the control plane publishes a new root; re-reading it lets a root
//! rotation (old and new roots together, then the new alone) reach
//! running sidecars without restarting a pod. Handshakes after a change
//! use the new roots; open connections keep what they verified.

use std::path::PathBuf;
use std::time::Duration;

use weft_certs::tls::TrustBundle;

/// Re-reads `path` every `every` and replaces `bundle`'s roots when the
/// text changed. A file that is unreadable or holds no valid root is
/// logged and skipped: the roots in use stay until a good file appears.
pub async fn follow(path: PathBuf, bundle: TrustBundle, every: Duration) {
    let mut current = std::fs::read_to_string(&path).unwrap_or_default();
    loop {
        tokio::time::sleep(every).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot re-read the trust bundle; keeping the roots in use");
                continue;
            }
        };
        if text == current {
            continue;
        }
        match bundle.replace(&text) {
            Ok(()) => tracing::info!(
                roots = bundle.len(),
                "trust bundle changed; new handshakes use it"
            ),
            Err(err) => {
                tracing::warn!(%err, "the new trust bundle is not valid; keeping the roots in use")
            }
        }
        // A bad file is not retried until it changes again.
        current = text;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weft_certs::tls::{self, CertStore};
    use weft_certs::{CaParams, CertificateAuthority, Identity};

    use super::*;

    fn root(name: &str) -> CertificateAuthority {
        CertificateAuthority::generate_root(
            "cluster.local",
            &CaParams::valid_for(name, Duration::from_secs(3600)),
        )
        .unwrap()
    }

    /// One mTLS handshake in memory: does a client trusting `bundle`
    /// accept the server's certificate?
    async fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> bool {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .is_ok()
        });
        let client = tokio_rustls::TlsConnector::from(client)
            .connect(tls::mesh_server_name("127.0.0.1".parse().unwrap()), a)
            .await
            .is_ok();
        let _ = server.await;
        client
    }

    #[tokio::test]
    async fn a_proxy_trusts_a_new_root_once_it_is_rolled_out() {
        let (old, new) = (root("old root"), root("new root"));
        let me = Identity::new("cluster.local", "demo", "client").unwrap();
        let peer = Identity::new("cluster.local", "demo", "server").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        std::fs::write(&path, old.roots_pem()).unwrap();
        let bundle = TrustBundle::from_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mine = CertStore::new(&weft_certs::issue_workload(&old, &me, None).unwrap()).unwrap();
        let client = tls::client_config(&mine, &bundle, vec![peer.clone()]).unwrap();
        // A peer already moved to the new root; it trusts both.
        let both = format!("{}{}", old.roots_pem(), new.roots_pem());
        let theirs =
            CertStore::new(&weft_certs::issue_workload(&new, &peer, None).unwrap()).unwrap();
        let server = tls::server_config(&theirs, &TrustBundle::from_pem(&both).unwrap()).unwrap();
        tokio::spawn(follow(
            path.clone(),
            bundle.clone(),
            Duration::from_millis(20),
        ));

        assert!(
            !handshake(client.clone(), server.clone()).await,
            "the new root is not trusted yet"
        );
        // Garbage in the file keeps the roots in use.
        std::fs::write(&path, "not a certificate").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(bundle.len(), 1);
        std::fs::write(&path, &both).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while bundle.len() != 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            handshake(client, server).await,
            "the rolled-out root is trusted without a restart"
        );
    }
}
