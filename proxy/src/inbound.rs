//! Inbound capture (15006): plaintext connections the capture rules
//! redirected on their way to the app. In PERMISSIVE mode (the default, so
//! that clients outside the mesh keep working while it is rolled out) they
//! are forwarded to the address they were sent to; in STRICT mode they are
//! refused, with a log line and a counter, and only mTLS on 15008 gets in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};

use crate::outbound::original_destination;

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
}

async fn handle(mut client: TcpStream, mode: Mode, counters: &Counters) -> Result<()> {
    let original = original_destination(&client).context("reading SO_ORIGINAL_DST")?;
    if original == client.local_addr()? {
        bail!("connection to the capture port itself; refusing to loop");
    }
    if mode == Mode::Strict {
        counters.refused_plaintext.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: inbound mode is STRICT (mTLS on 15008 only)");
        return Ok(());
    }
    let mut app = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(original))
        .await
        .context("connecting to the app timed out")??;
    app.set_nodelay(true)?;
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    tokio::io::copy_bidirectional(&mut client, &mut app).await?;
    Ok(())
}

pub async fn serve(listener: TcpListener, mode: Mode, counters: Arc<Counters>) {
    loop {
        let Ok((client, addr)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let counters = counters.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(client, mode, &counters).await {
                tracing::debug!(%addr, "inbound capture: {err:#}");
            }
        });
    }
}
