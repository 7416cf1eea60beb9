//! The agent's HTTP endpoints: `/healthz` (liveness: the routing loop is
//! turning), `/readyz` (serving CNI, the datastore answered, and BGP has
//! at least one session up when it has any to have), `/metrics`
//! (OpenMetrics text) and `/status` (JSON: `margay_api::status::AgentStatus`,
//! what `margayctl` reads). A deliberately small HTTP/1.x responder: GET
//! only, one request per connection, each answered within 10 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::AgentState;

/// What the endpoints read.
#[derive(Debug)]
pub struct Endpoints {
    state: Arc<AgentState>,
    registry: Registry,
}

impl Endpoints {
    /// The endpoints of `state`, with the agent's registry.
    pub fn new(state: Arc<AgentState>) -> Self {
        let registry = super::metrics::registry(Arc::downgrade(&state));
        Self { state, registry }
    }
}

/// Binds the endpoints' listener (an error names the address).
pub async fn bind(listen: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::io(format!("--http-listen {listen}"), e))
}

/// Serves the endpoints until the process ends (it returns only if the
/// listener fails).
pub async fn serve(l: TcpListener, ep: Endpoints) -> crate::Result<()> {
    let ep = Arc::new(ep);
    if let Ok(a) = l.local_addr() {
        tracing::info!(listen = %a, "health and metrics endpoints");
    }
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = l.accept() => match a {
                Ok((s, _)) => {
                    let ep = ep.clone();
                    conns.spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), one(s, &ep)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("health endpoint accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn one(mut s: TcpStream, ep: &Endpoints) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, ctype, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        route(path, ep).await
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    if method == "GET" {
        s.write_all(body.as_bytes()).await?;
    }
    s.shutdown().await
}

async fn route(path: &str, ep: &Endpoints) -> (u16, &'static str, String) {
    let state = &ep.state;
    match path {
        "/healthz" | "/livez" => match state.not_alive() {
            None => (200, "text/plain", "ok\n".into()),
            Some(why) => (503, "text/plain", format!("{why}\n")),
        },
        "/readyz" => {
            let why = state.not_ready();
            if why.is_empty() {
                (200, "text/plain", "ok\n".into())
            } else {
                (503, "text/plain", format!("{}\n", why.join("\n")))
            }
        }
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            super::metrics::render(&ep.registry),
        ),
        "/status" => (
            200,
            "application/json",
            format!(
                "{}\n",
                serde_json::to_string(&state.status().await).unwrap_or_default()
            ),
        ),
        _ => (
            404,
            "text/plain",
            "try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}
