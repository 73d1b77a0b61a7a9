//! Kubeconfigs from remote-cluster Secrets are untrusted input: whoever can
//! write a Secret in the control plane's namespace must not be able to make
//! it run a program (`exec`), read its files (`certificate-authority`,
//! `tokenFile`, …) or talk to a server without verifying it. Only inline
//! credentials are accepted: a bearer token, a client certificate and key,
//! CA data and a TLS server name.

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KubeconfigError {
    #[error("not a valid kubeconfig: {0}")]
    Malformed(String),
    #[error("the kubeconfig has no usable context: {0}")]
    NoContext(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// Parses and checks a kubeconfig, returning a client configuration for its
/// current (or only) context.
pub async fn client_config(text: &str) -> Result<kube::Config, KubeconfigError> {
    let kubeconfig = parse_untrusted(text)?;
    let options = KubeConfigOptions::default();
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| KubeconfigError::NoContext(e.to_string()))
}

/// The checks, separate from building a client, so they can be tested alone.
pub fn parse_untrusted(text: &str) -> Result<Kubeconfig, KubeconfigError> {
    if text.trim().is_empty() {
        return Err(KubeconfigError::Malformed("empty".into()));
    }
    // Checked on the raw document first: fields the kube crate does not
    // model would otherwise slip through unseen.
    let raw: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| KubeconfigError::Malformed(e.to_string()))?;
    for user in raw["users"].as_array().into_iter().flatten() {
        let name = user["name"].as_str().unwrap_or("?");
        let auth = &user["user"];
        if auth.get("exec").is_some_and(|v| !v.is_null()) {
            return Err(refused(name, "exec credential plugins run programs"));
        }
        if auth.get("auth-provider").is_some_and(|v| !v.is_null()) {
            return Err(refused(
                name,
                "auth-provider plugins are not allowed; use an inline token",
            ));
        }
        for field in ["tokenFile", "client-certificate", "client-key"] {
            if auth.get(field).is_some_and(|v| !v.is_null()) {
                return Err(refused(
                    name,
                    &format!("{field} reads a local file; give the data inline"),
                ));
            }
        }
        for field in [
            "username",
            "password",
            "as",
            "as-groups",
            "impersonate",
            "impersonate-groups",
        ] {
            if auth.get(field).is_some_and(|v| !v.is_null()) {
                return Err(refused(name, &format!("{field} is not allowed")));
            }
        }
    }
    for cluster in raw["clusters"].as_array().into_iter().flatten() {
        let name = cluster["name"].as_str().unwrap_or("?");
        let c = &cluster["cluster"];
        if c.get("certificate-authority").is_some_and(|v| !v.is_null()) {
            return Err(refused(
                name,
                "certificate-authority reads a local file; use certificate-authority-data",
            ));
        }
        if c["insecure-skip-tls-verify"].as_bool() == Some(true) {
            return Err(refused(
                name,
                "insecure-skip-tls-verify would trust any server",
            ));
        }
        if c.get("proxy-url").is_some_and(|v| !v.is_null()) {
            return Err(refused(name, "proxy-url is not allowed"));
        }
        match c["server"].as_str() {
            Some(server) if server.starts_with("https://") => {}
            Some(server) => return Err(refused(name, &format!("server {server:?} must be https"))),
            None => {
                return Err(KubeconfigError::Malformed(format!(
                    "cluster {name} has no server"
                )));
            }
        }
    }
    if raw["clusters"].as_array().is_none_or(Vec::is_empty) {
        return Err(KubeconfigError::Malformed("no clusters".into()));
    }
    Kubeconfig::from_yaml(text).map_err(|e| KubeconfigError::Malformed(e.to_string()))
}

fn refused(name: &str, why: &str) -> KubeconfigError {
    KubeconfigError::Refused(format!("{name}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(user: &str, cluster_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c2\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: AAAA\n{cluster_extra}users:\n- name: u\n  user:\n{user}contexts:\n- name: c2\n  context:\n    cluster: c2\n    user: u\ncurrent-context: c2\n"
        )
    }

    #[test]
    fn inline_token_is_accepted() {
        assert!(parse_untrusted(&kubeconfig("    token: abc\n", "")).is_ok());
        assert!(
            parse_untrusted(&kubeconfig(
                "    token: abc\n",
                "    tls-server-name: kubernetes\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn dangerous_fields_are_refused() {
        for (user, cluster) in [
            (
                "    exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1\n",
                "",
            ),
            ("    auth-provider:\n      name: gcp\n", ""),
            ("    tokenFile: /var/run/secrets/token\n", ""),
            (
                "    client-certificate: /etc/cert.pem\n    client-key: /etc/key.pem\n",
                "",
            ),
            ("    username: admin\n    password: x\n", ""),
            (
                "    token: abc\n",
                "    certificate-authority: /etc/ca.pem\n",
            ),
            ("    token: abc\n", "    insecure-skip-tls-verify: true\n"),
            ("    token: abc\n", "    proxy-url: http://evil:3128\n"),
        ] {
            let err = parse_untrusted(&kubeconfig(user, cluster)).unwrap_err();
            assert!(
                matches!(err, KubeconfigError::Refused(_)),
                "{user}{cluster}: {err}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            "",
            "::: not yaml [",
            "apiVersion: v1\nkind: Config\nclusters: []\n",
            "- a\n- b\n",
        ] {
            assert!(
                matches!(parse_untrusted(bad), Err(KubeconfigError::Malformed(_))),
                "{bad:?}"
            );
        }
        let plain_http = kubeconfig("    token: abc\n", "").replace("https://", "http://");
        assert!(matches!(
            parse_untrusted(&plain_http),
            Err(KubeconfigError::Refused(_))
        ));
    }
}
