//! The agent's HTTP endpoints: `/healthz` (liveness: the routing loop is
//! turning), `/readyz` (serving CNI, the datastore answered, and BGP has
//! at least one session up when it has any to have), `/metrics`
//! (Prometheus text) and `/status` (JSON for `margayctl`). A deliberately
//! small HTTP/1.x responder: GET only, one request per connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use margay_bgp::speaker::Speaker;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the routing loop last found (see [`crate::bgp`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoutingStatus {
    /// This node's BGP address.
    pub address: Option<String>,
    /// Its AS.
    pub asn: u32,
    /// Everything that keeps routing from being complete.
    pub problems: Vec<String>,
    /// The last read of the cluster's objects succeeded.
    pub datastore_ok: bool,
    /// Every configured peer has sent its full table.
    pub bgp_synced: bool,
    /// Neighbors configured.
    pub neighbors: usize,
    /// Prefixes this node advertises.
    pub advertised: Vec<String>,
    /// Routes to remote blocks programmed.
    pub remote_routes: usize,
    /// When the loop last finished a pass.
    #[serde(skip)]
    pub last_pass: Option<Instant>,
}

/// State shared by the agent's tasks and read by the endpoints.
#[derive(Debug)]
pub struct AgentState {
    /// Node name.
    pub node: String,
    /// The CNI socket is being served.
    pub cni_serving: AtomicBool,
    /// The routing loop's findings.
    pub routing: Mutex<RoutingStatus>,
    /// The running speaker.
    pub speaker: Mutex<Option<Arc<Speaker>>>,
    /// The IPAM allocator (for its counters).
    pub alloc: margay_ipam::Allocator,
    /// Liveness: the routing loop must finish a pass within this.
    pub stall_after: Duration,
}

impl AgentState {
    /// Fresh state for `node`.
    pub fn new(node: &str, alloc: margay_ipam::Allocator, stall_after: Duration) -> Self {
        Self {
            node: node.to_string(),
            cni_serving: AtomicBool::new(false),
            routing: Mutex::new(RoutingStatus::default()),
            speaker: Mutex::new(None),
            alloc,
            stall_after,
        }
    }

    fn speaker(&self) -> Option<Arc<Speaker>> {
        self.speaker.lock().expect("speaker").clone()
    }

    fn routing(&self) -> RoutingStatus {
        self.routing.lock().expect("routing").clone()
    }

    /// The BGP sessions as JSON (empty when no speaker runs).
    pub async fn peers(&self) -> serde_json::Value {
        match self.speaker() {
            Some(s) => s.show("neighbors").await.unwrap_or_default(),
            None => serde_json::Value::Array(vec![]),
        }
    }

    /// `None` when alive, else why not.
    pub fn not_alive(&self) -> Option<String> {
        match self.routing().last_pass {
            Some(t) if t.elapsed() > self.stall_after => Some(format!(
                "the routing loop has not finished a pass for {}s",
                t.elapsed().as_secs()
            )),
            _ => None,
        }
    }

    /// Reasons not to be ready (empty: ready).
    pub async fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.cni_serving.load(Ordering::Relaxed) {
            why.push("the CNI socket is not served yet".to_string());
        }
        let r = self.routing();
        if r.last_pass.is_none() {
            why.push("routing has not been set up yet".to_string());
        } else if !r.datastore_ok {
            why.push("the Kubernetes API did not answer".to_string());
        }
        let peers = self.peers().await;
        let peers = peers.as_array().cloned().unwrap_or_default();
        let configured: Vec<_> = peers.iter().filter(|p| p["dynamic"] != true).collect();
        if !configured.is_empty() && !configured.iter().any(|p| p["state"] == "Established") {
            why.push(format!(
                "none of the {} BGP sessions is established",
                configured.len()
            ));
        }
        why
    }

    /// `/status`.
    pub async fn status_json(&self) -> serde_json::Value {
        let routes = match self.speaker() {
            Some(s) => s.show("routes").await.unwrap_or_default(),
            None => serde_json::Value::Array(vec![]),
        };
        let not_ready = self.not_ready().await;
        serde_json::json!({
            "node": self.node,
            "ready": not_ready.is_empty(),
            "not_ready": not_ready,
            "routing": self.routing(),
            "peers": self.peers().await,
            "routes": routes,
        })
    }

    /// `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let mut o = String::new();
        crate::metrics::CNI.render(&mut o);
        crate::metrics::render_ipam(&mut o, &self.alloc.stats());
        if let Some(s) = self.speaker()
            && let Ok(serde_json::Value::String(t)) = s.show("metrics").await
        {
            o.push_str(&t);
        }
        let ready = self.not_ready().await.is_empty();
        o.push_str(&format!(
            "# HELP margay_agent_ready 1 when the agent is ready.\n# TYPE margay_agent_ready gauge\nmargay_agent_ready {}\n",
            u8::from(ready)
        ));
        o
    }
}

/// Serves the endpoints on `listen` until the process ends.
pub async fn serve(listen: SocketAddr, state: Arc<AgentState>) -> std::io::Result<()> {
    let l = TcpListener::bind(listen).await?;
    tracing::info!(%listen, "health and metrics endpoints");
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), one(s, &state)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("health endpoint accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn one(mut s: TcpStream, state: &AgentState) -> std::io::Result<()> {
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
        route(path, state).await
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

async fn route(path: &str, state: &AgentState) -> (u16, &'static str, String) {
    match path {
        "/healthz" | "/livez" => match state.not_alive() {
            None => (200, "text/plain", "ok\n".into()),
            Some(why) => (503, "text/plain", format!("{why}\n")),
        },
        "/readyz" => {
            let why = state.not_ready().await;
            if why.is_empty() {
                (200, "text/plain", "ok\n".into())
            } else {
                (503, "text/plain", format!("{}\n", why.join("\n")))
            }
        }
        "/metrics" => (200, "text/plain; version=0.0.4", state.metrics_text().await),
        "/status" => (
            200,
            "application/json",
            format!("{}\n", state.status_json().await),
        ),
        _ => (
            404,
            "text/plain",
            "try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}
