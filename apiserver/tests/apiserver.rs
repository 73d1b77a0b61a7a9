//! The lab API server as real clients see it: the `kube` crate (CRUD, patch
//! flavours, paging, watchers and reflectors through updates, a forced 410 and
//! a restart), raw HTTP for error codes, and kubectl where it is installed.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use serde_json::json;
use weft_apiserver::testing::eventually;
use weft_apiserver::{ApiServer, ApiServerConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn client_for(server: &ApiServer) -> Client {
    server.client().await.unwrap()
}

async fn start() -> (ApiServer, Client) {
    let server = ApiServer::start(ApiServerConfig::default()).await.unwrap();
    let client = client_for(&server).await;
    (server, client)
}

async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
    )
    .await
    .unwrap();
}

fn service(name: &str, labels: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "selector": {"app": name}},
    }))
    .unwrap()
}

fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn crud_with_the_kube_client() {
    let (_server, client) = start().await;
    namespace(&client, "demo").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");

    let created = services
        .create(
            &PostParams::default(),
            &service("echo", json!({"app": "echo"})),
        )
        .await
        .unwrap();
    let ip = created.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    assert!(
        ip.starts_with("10.96."),
        "ClusterIP allocated from the range: {ip}"
    );
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    let rv1 = created.metadata.resource_version.clone().unwrap();

    let (code, reason) = api_error(
        services
            .create(&PostParams::default(), &service("echo", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // Replace with the current version succeeds and bumps generation.
    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
    let replaced = services
        .replace("echo", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_ne!(
        replaced.metadata.resource_version.as_deref(),
        Some(rv1.as_str())
    );
    assert_eq!(
        replaced.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some(ip.as_str())
    );
    // Replace with the stale version is a conflict.
    let (code, reason) = api_error(
        services
            .replace("echo", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    // Every patch flavour.
    let pp = PatchParams::default();
    let merged = services
        .patch(
            "echo",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"version": "v1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.metadata.labels.unwrap()["version"], "v1");
    let json_patched = services
        .patch(
            "echo",
            &pp,
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(json_patched.metadata.annotations.unwrap()["a"], "b");
    let strategic = services
        .patch(
            "echo",
            &pp,
            &Patch::Strategic(json!({"spec": {"ports": [{"port": 9090, "name": "metrics"}]}})),
        )
        .await
        .unwrap();
    let ports = strategic.spec.unwrap().ports.unwrap();
    assert_eq!(
        ports.len(),
        2,
        "strategic merge keeps the other port: {ports:?}"
    );
    let applied = services
        .patch(
            "applied",
            &PatchParams::apply("weft-test"),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "applied"},
                "spec": {"ports": [{"port": 80}]},
            })),
        )
        .await
        .unwrap();
    assert!(applied.spec.unwrap().cluster_ip.is_some(), "apply creates");

    // Status subresource: the main endpoint ignores status, /status takes only status.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "echo"}]},
        "status": {"phase": "Running"},
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let pod = pods
        .patch_status("p", &pp, &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.1.0.5"}, "spec": {"nodeName": "ignored"}})))
        .await
        .unwrap();
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(pod.spec.as_ref().unwrap().node_name, None);
    let pod = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));

    // A pod bound to a node is deleted as Kubernetes does: first a deletion
    // timestamp and grace period (its kubelet stops it), then for good with
    // a grace of 0. An unbound pod goes at once.
    let bound: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bound"},
        "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 7, "containers": [{"name": "app", "image": "echo"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &bound).await.unwrap();
    pods.delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = pods.get("bound").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(7));
    pods.delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        pods.get_opt("bound").await.unwrap().is_some(),
        "a second delete waits too"
    );
    pods.delete("bound", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("bound").await.unwrap().is_none());
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(
        pods.get_opt("p").await.unwrap().is_none(),
        "an unbound pod goes at once"
    );

    // Delete, then 404.
    services
        .delete("echo", &DeleteParams::default())
        .await
        .unwrap();
    let (code, _) = api_error(services.get("echo").await.unwrap_err());
    assert_eq!(code, 404);
    // The released ClusterIP can be asked for explicitly again.
    let mut again = service("again", json!({}));
    again.spec.as_mut().unwrap().cluster_ip = Some(ip.clone());
    services
        .create(&PostParams::default(), &again)
        .await
        .unwrap();

    // A namespaced object in a namespace that does not exist.
    let nowhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let (code, _) = api_error(
        nowhere
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn list_selectors_paging_and_generate_name() {
    let (_server, client) = start().await;
    namespace(&client, "demo").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    for i in 0..7 {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": format!("cm-{i}"), "labels": {"parity": if i % 2 == 0 { "even" } else { "odd" }, "i": i.to_string()}},
        }))
        .unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let even = maps
        .list(&ListParams::default().labels("parity=even"))
        .await
        .unwrap();
    assert_eq!(names(even), ["cm-0", "cm-2", "cm-4", "cm-6"]);
    let some = maps
        .list(&ListParams::default().labels("i in (1,3),parity!=even"))
        .await
        .unwrap();
    assert_eq!(names(some), ["cm-1", "cm-3"]);
    let named = maps
        .list(&ListParams::default().fields("metadata.name=cm-5"))
        .await
        .unwrap();
    assert_eq!(names(named), ["cm-5"]);

    // Pages of three, stitched by the continue token.
    let mut seen = Vec::new();
    let mut params = ListParams::default().limit(3);
    loop {
        let page = maps.list(&params).await.unwrap();
        let token = page.metadata.continue_.clone();
        seen.extend(names(page));
        match token {
            Some(t) if !t.is_empty() => params = params.continue_token(&t),
            _ => break,
        }
    }
    assert_eq!(seen.len(), 7);

    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap();
    let made = maps
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    // Cluster-wide list across namespaces.
    let all: Api<ConfigMap> = Api::all(client.clone());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        8
    );

    // deletecollection by label.
    maps.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("parity=odd"),
    )
    .await
    .unwrap();
    assert_eq!(
        maps.list(&ListParams::default()).await.unwrap().items.len(),
        5
    );
}

/// A reflector over one resource, driven in the background.
fn reflect<K>(api: Api<K>) -> reflector::Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });
    reader
}

fn names<K>(store: &reflector::Store<K>) -> Vec<String>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut names: Vec<String> = store
        .state()
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn reflectors_stay_in_sync_through_changes_and_a_forced_410() {
    let (server, client) = start().await;
    namespace(&client, "demo").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "demo");

    services
        .create(&PostParams::default(), &service("before", json!({})))
        .await
        .unwrap();

    let svc_store = reflect(services.clone());
    let slice_store = reflect(slices.clone());
    let pod_store = reflect(pods.clone());
    // Secrets through a label selector, as weft's remote-secret controller does.
    let (reader, writer) = reflector::store::<Secret>();
    let secret_stream = reflector(
        writer,
        watcher(
            secrets.clone(),
            watcher::Config::default().labels("weft.io/multicluster=true"),
        ),
    )
    .default_backoff()
    .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(secret_stream);
        while secret_stream.next().await.is_some() {}
    });
    let secret_store = reader;
    tokio::time::timeout(WAIT, svc_store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&svc_store), ["before"]);

    // Creates, updates, deletes.
    services
        .create(&PostParams::default(), &service("echo", json!({})))
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "echo-abc", "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "echo-1"},
        "spec": {"containers": [{"name": "app", "image": "echo"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let secret = |name: &str, multicluster: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"weft.io/multicluster": multicluster}},
            "stringData": {"c2": "kubeconfig"},
        }))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("remote-c2", "true"))
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret("unrelated", "false"))
        .await
        .unwrap();
    services
        .delete("before", &DeleteParams::default())
        .await
        .unwrap();
    slices
        .patch(
            "echo-abc",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"endpoints": [{"addresses": ["10.1.0.6"], "conditions": {"ready": true}}]}),
            ),
        )
        .await
        .unwrap();
    pods.patch_status(
        "echo-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();

    eventually("services in sync", || async {
        names(&svc_store) == ["echo"]
    })
    .await;
    eventually("slice updated", || async {
        slice_store
            .state()
            .first()
            .is_some_and(|s| s.endpoints[0].addresses == ["10.1.0.6"])
    })
    .await;
    eventually("pod status seen", || async {
        pod_store
            .state()
            .first()
            .and_then(|p| p.status.clone())
            .and_then(|s| s.phase)
            .as_deref()
            == Some("Running")
    })
    .await;
    eventually("only labelled secrets", || async {
        names(&secret_store) == ["remote-c2"]
    })
    .await;

    // Relabelling a secret out of the selector is a DELETED for that watch.
    secrets
        .patch(
            "remote-c2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"weft.io/multicluster": "false"}}})),
        )
        .await
        .unwrap();
    secrets
        .patch(
            "unrelated",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"weft.io/multicluster": "true"}}})),
        )
        .await
        .unwrap();
    eventually("secret selector transitions", || async {
        names(&secret_store) == ["unrelated"]
    })
    .await;

    // Forced 410: the watches are away while changes happen and history is
    // compacted; on return their version is too old, and they must relist.
    server.pause_watches();
    services
        .create(&PostParams::default(), &service("during-gap", json!({})))
        .await
        .unwrap();
    services
        .delete("echo", &DeleteParams::default())
        .await
        .unwrap();
    pods.delete("echo-1", &DeleteParams::default())
        .await
        .unwrap();
    server.compact();
    server.resume_watches();
    eventually("services relisted after 410", || async {
        names(&svc_store) == ["during-gap"]
    })
    .await;
    eventually("pods relisted after 410", || async {
        names(&pod_store).is_empty()
    })
    .await;

    // And life goes on after the relist.
    services
        .create(&PostParams::default(), &service("after", json!({})))
        .await
        .unwrap();
    eventually("watch resumed", || async {
        names(&svc_store) == ["after", "during-gap"]
    })
    .await;
}

#[tokio::test]
async fn a_too_old_version_gets_410_inside_a_200_stream() {
    let (server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();
    server.compact();
    let request = http::Request::get(
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1&timeoutSeconds=5",
    )
    .body(Vec::new())
    .unwrap();
    let text = client.request_text(request).await.unwrap();
    let event: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for name in ["a", "b"] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(maps.clone(), watcher::Config::default().streaming_lists()),
    )
    .default_backoff()
    .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&reader), ["a", "b"]);
    maps.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("streamed watch continues", || async {
        names(&reader) == ["b"]
    })
    .await;
}

#[tokio::test]
async fn a_restart_on_the_same_address_keeps_objects_and_watchers_resync() {
    let dir = tempfile::tempdir().unwrap();
    let config = ApiServerConfig {
        dir: Some(dir.path().to_path_buf()),
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config.clone()).await.unwrap();
    let addr = server.addr();
    let client = client_for(&server).await;
    namespace(&client, "demo").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    services
        .create(&PostParams::default(), &service("kept", json!({})))
        .await
        .unwrap();
    let store = reflect(services.clone());
    tokio::time::timeout(WAIT, store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let rv_before = server.current_resource_version();
    server.stop().await;

    let server = ApiServer::start(ApiServerConfig { addr, ..config })
        .await
        .unwrap();
    assert!(
        server.current_resource_version() >= rv_before,
        "versions never go back"
    );
    // The same client (same token, same CA) keeps working.
    services
        .create(&PostParams::default(), &service("new", json!({})))
        .await
        .unwrap();
    let kept = services.get("kept").await.unwrap();
    assert!(kept.spec.unwrap().cluster_ip.is_some());
    eventually("watcher reconnected and caught up", || async {
        names(&store) == ["kept", "new"]
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn service_account_tokens_and_token_review() {
    let (server, client) = start().await;
    namespace(&client, "weft-system").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "weft-system");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "weft-control"}})).unwrap();
    accounts.create(&PostParams::default(), &sa).await.unwrap();
    // A new namespace gets its default service account, as on a real cluster.
    accounts.get("default").await.unwrap();

    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["weft".into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let issued = accounts
        .create_token_request("weft-control", &PostParams::default(), &request)
        .await
        .unwrap();
    let token = issued.status.unwrap().token;

    let reviews: Api<TokenReview> = Api::all(client.clone());
    // What the server says of `token` for `audience`.
    let review = |token: String, audience: &str| {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let reviews = reviews.clone();
        async move {
            let answer = reviews.create(&PostParams::default(), &review).await;
            answer.unwrap().status.unwrap()
        }
    };
    let answer = review(token.clone(), "weft").await;
    assert_eq!(answer.authenticated, Some(true));
    assert_eq!(
        answer.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:weft-system:weft-control")
    );
    let wrong_audience = review(token.clone(), "other").await;
    assert_eq!(wrong_audience.authenticated, Some(false));

    // Deleting the account invalidates its tokens.
    accounts
        .delete("weft-control", &DeleteParams::default())
        .await
        .unwrap();
    let gone = review(token, "weft").await;
    assert_eq!(gone.authenticated, Some(false));
    assert!(gone.error.unwrap().contains("deleted"));

    // A legacy token Secret is filled in, and its token works as a bearer token.
    accounts.create(&PostParams::default(), &sa).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "weft-system");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "reader-token", "annotations": {"kubernetes.io/service-account.name": "weft-control"}},
        "type": "kubernetes.io/service-account-token",
    }))
    .unwrap();
    let secret = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let token = String::from_utf8(data["token"].0.clone()).unwrap();
    assert!(String::from_utf8_lossy(&data["ca.crt"].0).contains("BEGIN CERTIFICATE"));
    let kubeconfig = server.kubeconfig().replace(server.admin_token(), &token);
    let sa_client = weft_apiserver::client_for(&kubeconfig).await.unwrap();
    let listed: Api<Service> = Api::all(sa_client);
    listed.list(&ListParams::default()).await.unwrap();
}

/// A request the server must refuse: (what, method, path, content type,
/// body, code, reason).
type Refusal<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a [u8],
    u16,
    Option<&'a str>,
);

/// Raw HTTP, for status codes the typed client hides.
async fn raw(
    server: &ApiServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut sender =
        weft_apiserver::testing::http1_over_tls(server.addr(), server.ca_pem(), "localhost").await;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", content_type);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(
            builder
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let code = response.status().as_u16();
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        code,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn errors_are_kubernetes_status_objects_with_the_right_codes() {
    let (server, _client) = start().await;
    let token = server.admin_token().to_string();
    let json = "application/json";

    let (code, status) = raw(&server, "GET", "/api/v1/services", None, json, vec![]).await;
    assert_eq!(code, 401);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Unauthorized");
    let (code, _) = raw(
        &server,
        "GET",
        "/api/v1/services",
        Some("wrong"),
        json,
        vec![],
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = raw(&server, "GET", "/healthz", None, json, vec![]).await;
    assert_eq!(code, 200);

    // Each refusal: (what, method, path, content type, body, code, reason).
    let (p, nope, j) = (
        "/api/v1/namespaces/default/configmaps",
        "/api/v1/namespaces/default/configmaps/nope",
        json,
    );
    let mistyped = br#"{"metadata": {"name": "x", "labels": {"a": 1}}}"#;
    let invalid = br#"{"metadata": {"name": "Not_Valid"}}"#;
    let secret = br#"{"kind": "Secret", "metadata": {"name": "x"}}"#;
    let large = vec![b' '; 4 * 1024 * 1024];
    let bad_selector = "/api/v1/configmaps?labelSelector=a%20in%20(b";
    let protobuf = "application/vnd.kubernetes.protobuf";
    let cases: [Refusal; 10] = [
        (
            "not JSON",
            "POST",
            p,
            j,
            b"{not json",
            400,
            Some("BadRequest"),
        ),
        ("mistyped field", "POST", p, j, mistyped, 400, None),
        ("invalid name", "POST", p, j, invalid, 422, Some("Invalid")),
        ("too large", "POST", p, j, &large, 413, None),
        ("no such object", "GET", nope, j, b"", 404, Some("NotFound")),
        (
            "no such group",
            "GET",
            "/apis/example.com/v1/widgets",
            j,
            b"",
            404,
            None,
        ),
        (
            "wrong kind for the endpoint",
            "POST",
            p,
            j,
            secret,
            400,
            None,
        ),
        ("bad selector", "GET", bad_selector, j, b"", 400, None),
        (
            "not a patch type",
            "PATCH",
            nope,
            "text/plain",
            b"x",
            415,
            None,
        ),
        ("protobuf", "POST", p, protobuf, b"k8s\0", 415, None),
    ];
    for (what, method, path, content_type, body, code, reason) in cases {
        let (got, status) = raw(
            &server,
            method,
            path,
            Some(&token),
            content_type,
            body.to_vec(),
        )
        .await;
        assert_eq!(got, code, "{what}: {status}");
        if let Some(reason) = reason {
            assert_eq!(status["reason"], reason, "{what}");
        }
        let message = status["message"].as_str().unwrap_or_default();
        match what {
            "invalid name" => assert_eq!(status["details"]["causes"][0]["field"], "metadata.name"),
            "protobuf" => assert!(message.contains("JSON only"), "{status}"),
            _ => {}
        }
    }

    // Discovery answers for kubectl.
    let (code, groups) = raw(&server, "GET", "/apis", Some(&token), json, vec![]).await;
    assert_eq!(code, 200);
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "discovery.k8s.io")
    );
    let (code, version) = raw(&server, "GET", "/version", None, json, vec![]).await;
    assert_eq!((code, version["major"].as_str()), (200, Some("1")));
}

#[tokio::test]
async fn custom_resources_are_served_once_their_crd_exists() {
    let (_server, client) = start().await;
    let crds: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(&()),
    );
    let crd: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object"}}},
                {"name": "v1beta1", "served": true, "storage": false, "schema": {"openAPIV3Schema": {"type": "object"}}},
            ],
        },
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let resource = kube::api::ApiResource {
        group: "example.com".into(),
        version: "v1".into(),
        api_version: "example.com/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &resource);
    let widget: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3},
    }))
    .unwrap();
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    assert_eq!(widgets.get("w1").await.unwrap().data["spec"]["size"], 3);
    // Written through one version, patched through another: the object is
    // taken at the version of the request, as a real API server converts.
    let beta = kube::api::ApiResource {
        version: "v1beta1".into(),
        api_version: "example.com/v1beta1".into(),
        ..resource.clone()
    };
    let old_widgets: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &beta);
    let old_widget: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1beta1", "kind": "Widget",
        "metadata": {"name": "w2"}, "spec": {"size": 1},
    }))
    .unwrap();
    old_widgets
        .create(&PostParams::default(), &old_widget)
        .await
        .unwrap();
    let patched = widgets
        .patch(
            "w2",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["size"], 2);
    assert_eq!(
        patched.types.map(|t| t.api_version).as_deref(),
        Some("example.com/v1")
    );
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let (code, _) = api_error(widgets.get("w1").await.unwrap_err());
    assert_eq!(code, 404);
}

fn kubectl_available() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_watch_and_delete() {
    if !kubectl_available() {
        eprintln!("SKIPPED kubectl_apply_get_watch_and_delete: kubectl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::start(ApiServerConfig {
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let manifest = dir.path().join("demo.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  labels:\n    app: echo\n\
         spec:\n  selector:\n    app: echo\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: demo\ndata:\n  mode: fast\n",
    )
    .unwrap();

    let kc = kubeconfig.clone();
    let m = manifest.clone();
    let applied = tokio::task::spawn_blocking(move || {
        ok(kubectl(&kc, &["apply", "-f", m.to_str().unwrap()]))
    })
    .await
    .unwrap();
    assert!(applied.contains("service/echo created"), "{applied}");
    assert!(applied.contains("configmap/settings created"), "{applied}");

    // Applying again with a change goes through the patch path.
    std::fs::write(
        &manifest,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace("mode: fast", "mode: safe"),
    )
    .unwrap();
    let kc = kubeconfig.clone();
    let m = manifest.clone();
    let reapplied = tokio::task::spawn_blocking(move || {
        ok(kubectl(&kc, &["apply", "-f", m.to_str().unwrap()]))
    })
    .await
    .unwrap();
    assert!(
        reapplied.contains("configmap/settings configured"),
        "{reapplied}"
    );

    let kc = kubeconfig.clone();
    let yaml = tokio::task::spawn_blocking(move || {
        ok(kubectl(
            &kc,
            &["get", "-n", "demo", "service", "echo", "-o", "yaml"],
        ))
    })
    .await
    .unwrap();
    assert!(yaml.contains("clusterIP: 10.96."), "{yaml}");
    let kc = kubeconfig.clone();
    let data = tokio::task::spawn_blocking(move || {
        ok(kubectl(
            &kc,
            &[
                "get",
                "-n",
                "demo",
                "configmap",
                "settings",
                "-o",
                "jsonpath={.data.mode}",
            ],
        ))
    })
    .await
    .unwrap();
    assert_eq!(data, "safe");

    // `get -w` sees an event made after it started.
    let mut watch = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "get",
            "configmaps",
            "-n",
            "demo",
            "-w",
            "--output-watch-events",
            "-o",
            "name",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("configmap/settings"), "{first}");
    let client = client_for(&server).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "demo");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "late"}})).unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();
    let mut saw = String::new();
    while !saw.contains("configmap/late") {
        saw = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    watch.kill().await.unwrap();

    let kc = kubeconfig.clone();
    let deleted = tokio::task::spawn_blocking(move || {
        ok(kubectl(&kc, &["delete", "-n", "demo", "service", "echo"]))
    })
    .await
    .unwrap();
    assert!(deleted.contains("deleted"), "{deleted}");
    let kc = kubeconfig.clone();
    let gone = tokio::task::spawn_blocking(move || {
        kubectl(&kc, &["get", "-n", "demo", "service", "echo"])
    })
    .await
    .unwrap();
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    server.stop().await;
}

/// A webhook that cannot be reached fails the request under
/// `failurePolicy: Fail` and is skipped under `Ignore`; selectors decide
/// whether it is called at all.
#[tokio::test]
async fn mutating_webhook_failure_policy_and_selectors() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let (_server, client) = start().await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let webhook = |name: &str, policy: &str, label: &str| {
        json!({
            "name": name,
            // Nothing listens on port 1.
            "clientConfig": {"url": "https://127.0.0.1:1/inject", "caBundle": "AAAA"},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "objectSelector": {"matchLabels": {label: "true"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": policy,
            "timeoutSeconds": 2,
        })
    };
    let config = serde_json::from_value(json!({
        "metadata": {"name": "broken"},
        "webhooks": [webhook("fail.example.com", "Fail", "strict"), webhook("ignore.example.com", "Ignore", "lenient")],
    }))
    .unwrap();
    configs
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let map = |name: &str, label: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {label: "true"}}}))
            .unwrap()
    };
    let (code, _) = api_error(
        maps.create(&PostParams::default(), &map("a", "strict"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 500, "failurePolicy Fail");
    maps.create(&PostParams::default(), &map("b", "lenient"))
        .await
        .unwrap();
    maps.create(&PostParams::default(), &map("c", "unselected"))
        .await
        .unwrap();
}

/// The traffic kinds weft reads (Istio's and the Gateway API's) are served
/// once their CRDs are applied, and kubectl applies and lists them by
/// their short names, as users do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_istio_and_gateway_api_routes() {
    if !kubectl_available() {
        eprintln!("SKIPPED kubectl_applies_istio_and_gateway_api_routes: kubectl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _server = ApiServer::start(ApiServerConfig {
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let crds = dir.path().join("crds.yaml");
    std::fs::write(&crds, include_str!("../../lab/crds/traffic.yaml")).unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n\
         apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\n\
         spec:\n  hosts: [echo]\n  http: [{route: [{destination: {host: echo, subset: v1}}]}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\n\
         spec:\n  host: echo\n  subsets: [{name: v1, labels: {version: v1}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: echo, namespace: demo}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules: [{backendRefs: [{name: echo, port: 80}]}]\n",
    )
    .unwrap();
    let kc = kubeconfig.clone();
    let out = tokio::task::spawn_blocking(move || {
        ok(kubectl(&kc, &["apply", "-f", crds.to_str().unwrap()]));
        let applied = ok(kubectl(&kc, &["apply", "-f", routes.to_str().unwrap()]));
        let listed = ok(kubectl(
            &kc,
            &["get", "vs,dr,httproutes", "-n", "demo", "-o", "name"],
        ));
        (applied, listed)
    })
    .await
    .unwrap();
    let (applied, listed) = out;
    assert!(
        applied.contains("virtualservice.networking.istio.io/echo created"),
        "{applied}"
    );
    assert!(
        applied.contains("httproute.gateway.networking.k8s.io/echo created"),
        "{applied}"
    );
    for name in [
        "virtualservice.networking.istio.io/echo",
        "destinationrule.networking.istio.io/echo",
        "httproute.gateway.networking.k8s.io/echo",
    ] {
        assert!(listed.contains(name), "{name} not in {listed}");
    }
}
