//! Inbound capture (15006): plaintext connections the capture rules
//! redirected on their way to the app. In PERMISSIVE mode (the default, so
//! that clients outside the mesh keep working while it is rolled out) they
//! are delivered to the address they were sent to, if it is this pod's; in
//! STRICT mode they are refused, with a log line and a counter, and only
//! mTLS on 15008 gets in.
//!
//! Delivery is the mesh tunnels' own (`inbound_tunnel::carry`), with no
//! proven caller: HTTP is served request by request with any
//! `x-weft-peer-identity` removed, so the application can trust the header
//! whenever it is present, and a caller cannot slip HTTP past that by
//! staying silent or using an unusual method.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};

use crate::hbone::{CONNECT_TIMEOUT, Inbound};
use crate::outbound::{local_address, original_destination};

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
    inbound: Arc<Inbound>,
) -> Result<()> {
    let original = original_destination(&client).context("reading SO_ORIGINAL_DST")?;
    if original == local_address(&client)? {
        bail!("connection to the capture port itself; refusing to loop");
    }
    // Only the app behind this sidecar: the capture port must not relay
    // to other hosts.
    if !inbound.local_addresses.contains(&original.ip()) {
        counters.refused_not_local.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: not this pod's address");
        return Ok(());
    }
    if mode == Mode::Strict {
        counters.refused_plaintext.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: inbound mode is STRICT (mTLS on 15008 only)");
        return Ok(());
    }
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let app = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(original))
        .await
        .context("connecting to the app timed out")??;
    app.set_nodelay(true)?;
    crate::inbound_tunnel::carry(inbound, None, original, client, app).await;
    Ok(())
}

/// Serves 15006 until draining starts.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    counters: Arc<Counters>,
    inbound: Arc<Inbound>,
) {
    let drain = inbound.drain.clone();
    // The listener closes before the guard says so (locals drop in reverse).
    let _listening = drain.listening();
    let listener = listener;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        let Ok((client, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let (counters, inbound) = (counters.clone(), inbound.clone());
        let active = drain.track();
        crate::task::spawn(async move {
            let _active = active;
            if let Err(err) = handle(client, mode, &counters, inbound).await {
                tracing::debug!(%addr, "inbound capture: {err:#}");
            }
        });
    }
}
