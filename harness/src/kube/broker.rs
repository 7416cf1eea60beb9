//! Control planes for VMs: a kube-apiserver under full emulation (the VMs
//! of `scripts/in-vm.sh` run under TCG) takes minutes to start, so the VM's
//! host runs them instead. `scripts/in-vm.sh` starts a broker on the host's
//! loopback ([`serve`], `margay-lab apiserver-broker`) and tells the VM
//! where it is ([`ENV`], the host's loopback as QEMU's user network shows
//! it: `10.0.2.2:<port>`). Inside the VM, [`crate::kube::ApiServer::start`]
//! asks it for one ([`request`]): the broker starts a fresh etcd +
//! kube-apiserver for that connection, answers its port, and stops them
//! when the connection closes (the VM's ApiServer dropped, or the VM gone).
//!
//! The protocol is one JSON line each way: a [`Request`] (`{"tokens":
//! [[token, user, groups], ...]}`), then a [`Reply`] (`{"port": N}` or
//! `{"error": "..."}`).

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::kube::ApiServer;
use crate::{Error, Result};

/// Where a VM finds its host's broker (`host:port`).
pub const ENV: &str = "MARGAY_APISERVER_BROKER";

/// What a VM asks for: an apiserver that also knows these tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// `[token, user, groups]` each, as the apiserver's token file has them.
    #[serde(default)]
    pub tokens: Vec<[String; 3]>,
}

/// The broker's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The apiserver is up, on this port of the broker's host.
    Port {
        /// Its port.
        port: u16,
    },
    /// It did not start.
    Error {
        /// Why.
        error: String,
    },
}

/// One JSON line.
fn line<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b
}

/// Serves apiservers on `listener` until the process ends (or this future
/// is dropped: its connections, and their apiservers, go with it).
pub async fn serve(listener: tokio::net::TcpListener) -> Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => {
                let (sock, peer) = a?;
                conns.spawn(async move {
                    if let Err(e) = one(sock).await {
                        tracing::warn!(%peer, "apiserver for a VM: {e}");
                    }
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn one(sock: tokio::net::TcpStream) -> Result<()> {
    let (r, mut w) = sock.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    let Some(req) = lines.next_line().await? else {
        // A probe: the VM checking that its network reaches us.
        return Ok(());
    };
    let req: Request =
        serde_json::from_str(&req).map_err(|e| Error::Other(format!("request: {e}")))?;
    let extra: Vec<(&str, &str, &str)> = req
        .tokens
        .iter()
        .map(|[a, b, c]| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    match ApiServer::start_local(&extra).await {
        Ok(api) => {
            let port = api.port();
            tracing::info!(port, "apiserver up for a VM");
            w.write_all(&line(&Reply::Port { port })).await?;
            // Until the VM closes the connection (or goes away).
            while let Ok(Some(_)) = lines.next_line().await {}
            tracing::info!(port, "apiserver for a VM stopped");
            drop(api);
        }
        Err(e) => {
            let reply = Reply::Error {
                error: e.to_string(),
            };
            w.write_all(&line(&reply)).await?;
        }
    }
    Ok(())
}

/// Asks the broker at `broker` for an apiserver with the extra tokens
/// `extra`; returns the connection (closing it stops the apiserver) and the
/// port it listens on, on the broker's host.
pub fn request(broker: &str, extra: &[(&str, &str, &str)]) -> Result<(std::net::TcpStream, u16)> {
    // The VM's network may still be settling (its DHCP client redoes it).
    let start = std::time::Instant::now();
    let mut conn = loop {
        match std::net::TcpStream::connect(broker) {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                tracing::debug!("the apiserver broker at {broker}: {e}; trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(Error::Other(format!(
                    "the apiserver broker at {broker}: {e}"
                )));
            }
        }
    };
    let req = Request {
        tokens: extra
            .iter()
            .map(|(a, b, c)| [a.to_string(), b.to_string(), c.to_string()])
            .collect(),
    };
    conn.write_all(&line(&req))?;
    // Its start takes seconds on the host; allow for a loaded machine.
    conn.set_read_timeout(Some(Duration::from_secs(180)))?;
    let mut answer = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut answer)?;
    conn.set_read_timeout(None)?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| Error::Other(format!("the apiserver broker's answer {answer:?}: {e}")))?;
    match reply {
        Reply::Port { port } => Ok((conn, port)),
        Reply::Error { error } => Err(Error::Other(format!(
            "the apiserver broker at {broker}: {error}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn the_wire_json_is_what_it_was() {
        // What the untyped broker wrote and read, byte for byte.
        let req = Request {
            tokens: vec![[
                "tok".to_string(),
                "user".to_string(),
                "system:masters".to_string(),
            ]],
        };
        let old = format!(
            "{}\n",
            serde_json::json!({"tokens": [["tok", "user", "system:masters"]]})
        );
        assert_eq!(line(&req), old.as_bytes());
        assert_eq!(serde_json::from_str::<Request>(&old).unwrap(), req);
        let none = format!(
            "{}\n",
            serde_json::json!({ "tokens": Vec::<[&str; 3]>::new() })
        );
        assert_eq!(line(&Request::default()), none.as_bytes());
        let port = format!("{}\n", serde_json::json!({"port": 6443}));
        assert_eq!(line(&Reply::Port { port: 6443 }), port.as_bytes());
        assert_eq!(
            serde_json::from_str::<Reply>(&port).unwrap(),
            Reply::Port { port: 6443 }
        );
        let error = format!("{}\n", serde_json::json!({"error": "etcd: no"}));
        let typed = Reply::Error {
            error: "etcd: no".into(),
        };
        assert_eq!(line(&typed), error.as_bytes());
        assert_eq!(serde_json::from_str::<Reply>(&error).unwrap(), typed);
        // Literal strings, in case json! and the derive ever agree on
        // something else.
        assert_eq!(
            line(&req),
            b"{\"tokens\":[[\"tok\",\"user\",\"system:masters\"]]}\n"
        );
        assert_eq!(line(&Reply::Port { port: 1 }), b"{\"port\":1}\n");
    }

    #[tokio::test]
    async fn dropping_the_broker_closes_its_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let broker = margay_task::Owned::spawn(async move {
            let _ = serve(listener).await;
        });
        // A VM connected, its request not sent yet: its connection is open.
        let mut vm = tokio::net::TcpStream::connect(at).await.unwrap();
        let mut buf = [0u8; 1];
        let open = tokio::time::timeout(Duration::from_millis(100), vm.read(&mut buf)).await;
        assert!(open.is_err(), "closed early: {open:?}");
        drop(broker);
        let closed = tokio::time::timeout(Duration::from_secs(5), vm.read(&mut buf))
            .await
            .expect("the connection outlived its broker");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
}
