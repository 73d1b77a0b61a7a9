//! Inbound capture (15006): plaintext connections the capture rules
//! redirected on their way to the app. In PERMISSIVE mode (the default, so
//! that clients outside the mesh keep working while it is rolled out) they
//! are delivered to the address they were sent to, if it is this pod's; in
//! STRICT mode they are refused, with a log line and a counter, and only
//! mTLS on 15008 gets in. The mode is the PeerAuthentication's for the
//! port when one applies (resolved by the control plane), else the pod's
//! own (`sidecar.weft.io/inboundMode`).
//!
//! Delivery is `local_app`'s, as for mesh tunnels, with no proven caller:
//! HTTP is served request by request with any `x-weft-peer-identity`
//! removed, so the application can trust the header whenever it is
//! present, and a caller cannot slip HTTP past that by staying silent or
//! using an unusual method.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use tokio::net::{TcpListener, TcpStream};

use weft_xds_proto::mesh::MtlsMode;

use crate::authorize::Caller;
use crate::local_app::LocalApp;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Permissive,
    Strict,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PERMISSIVE" => Ok(Mode::Permissive),
            "STRICT" => Ok(Mode::Strict),
            other => Err(format!("{other:?}: expected PERMISSIVE or STRICT")),
        }
    }
}

/// The mode for one port: a PeerAuthentication's when one applies, else
/// the sidecar's own setting. DISABLE takes plaintext as PERMISSIVE does;
/// callers with sidecars still use mTLS, which a server always accepts.
pub fn effective(own: Mode, policy: MtlsMode) -> Mode {
    match policy {
        MtlsMode::Strict => Mode::Strict,
        MtlsMode::Permissive | MtlsMode::Disable => Mode::Permissive,
        MtlsMode::MtlsUnset => own,
    }
}

#[derive(Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub refused_plaintext: AtomicU64,
    /// Connections redirected here for an address that is not this pod's.
    pub refused_not_local: AtomicU64,
}

async fn handle(
    client: TcpStream,
    mode: Mode,
    counters: &Counters,
    app: Arc<LocalApp>,
) -> Result<()> {
    let Some(original) = crate::socket::redirected(&client)? else {
        bail!("connection to the capture port itself; refusing to loop");
    };
    // Only the app behind this sidecar: the capture port must not relay
    // to other hosts.
    if !app.is_local(original.ip()) {
        counters.refused_not_local.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: not this pod's address");
        return Ok(());
    }
    if effective(mode, app.mtls_mode(original)) == Mode::Strict {
        counters.refused_plaintext.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: inbound mode is STRICT (mTLS on 15008 only)");
        return Ok(());
    }
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let caller = Caller::unproven(client.peer_addr()?.ip());
    let Ok(connected) = app.connect(original, &caller).await else {
        bail!("the app at {original} did not answer");
    };
    app.carry(caller, original, client, connected).await;
    Ok(())
}

/// Serves 15006 until draining starts.
pub async fn serve(listener: TcpListener, mode: Mode, counters: Arc<Counters>, app: Arc<LocalApp>) {
    let drain = app.drain().clone();
    crate::serve::accept(listener, drain, move |client, addr| {
        let (counters, app) = (counters.clone(), app.clone());
        async move {
            if let Err(err) = handle(client, mode, &counters, app).await {
                tracing::debug!(%addr, "inbound capture: {err:#}");
            }
        }
    })
    .await
}
