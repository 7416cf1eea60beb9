//! The CNI service on the agent's unix socket: gRPC (`margay.cni.v1.Cni`)
//! over a socket of mode 0600 whose server also checks each caller's
//! credentials (root only), with each request's latency and outcome
//! recorded in the agent's metrics.
//!
//! An ADD runs in its own task, so a caller that goes away (the plugin
//! killed, its connection closed) does not stop it halfway: it finishes,
//! and when nobody is left to hear its answer it is undone as a DEL would
//! (interface, routes, addresses back), so a cancelled ADD leaves nothing.

use std::sync::Arc;
use std::time::Instant;

use margay_ipam::Store;
use margay_proto::cni::{self, cni_server};
use tonic::{Request, Response, Status};

use super::CniService;
use crate::dataplane::Dataplane;
use crate::obs::metrics::{self, CniOp};

fn reply(r: Result<Option<cni::CniResult>, cni::CniError>) -> Response<cni::CniReply> {
    Response::new(match r {
        Ok(result) => cni::CniReply {
            result,
            error: None,
        },
        Err(e) => cni::CniReply {
            result: None,
            error: Some(e),
        },
    })
}

/// Runs one request, recording its latency and outcome.
async fn timed<T>(
    op: CniOp,
    f: impl std::future::Future<Output = Result<T, cni::CniError>>,
) -> Result<T, cni::CniError> {
    let t = Instant::now();
    let r = f.await;
    metrics::cni().record(op, t.elapsed(), r.is_ok());
    r
}

/// The service as the gRPC server holds it (shared with the ADD tasks).
struct Shared<S, D>(Arc<CniService<S, D>>);

/// Runs an ADD to its end whatever happens to its caller: the answer goes
/// back through a channel, and when the caller is gone by then (the
/// request's future dropped) a successful ADD is undone.
async fn add_detached<S: Store, D: Dataplane>(
    svc: Arc<CniService<S, D>>,
    req: cni::CniRequest,
) -> Result<cni::CniResult, cni::CniError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = timed(CniOp::Add, svc.add(&req)).await;
        let ok = r.is_ok();
        if tx.send(r).is_err() && ok {
            tracing::warn!(
                container = %req.container_id,
                ifname = %req.ifname,
                "the caller of an ADD went away before its answer: undoing it"
            );
            if let Err(e) = svc.del(&req).await {
                tracing::warn!(
                    "undoing a cancelled ADD: {} (the runtime's DEL or GC will)",
                    e.msg
                );
            }
        }
    });
    rx.await.unwrap_or_else(|_| {
        Err(cni::CniError {
            code: super::code::TRY_AGAIN,
            msg: "the ADD's task ended without an answer".into(),
            details: String::new(),
        })
    })
}

#[tonic::async_trait]
impl<S: Store, D: Dataplane> cni_server::Cni for Shared<S, D> {
    async fn add(&self, req: Request<cni::CniRequest>) -> Result<Response<cni::CniReply>, Status> {
        let r = add_detached(self.0.clone(), req.into_inner()).await;
        Ok(reply(r.map(Some)))
    }

    async fn del(&self, req: Request<cni::CniRequest>) -> Result<Response<cni::CniReply>, Status> {
        let r = timed(CniOp::Del, self.0.del(req.get_ref())).await;
        Ok(reply(r.map(|()| None)))
    }

    async fn check(
        &self,
        req: Request<cni::CniRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        let r = timed(CniOp::Check, self.0.check(req.get_ref())).await;
        Ok(reply(r.map(|()| None)))
    }

    async fn status(
        &self,
        _req: Request<cni::StatusRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        Ok(reply(self.0.status().await.map(|()| None)))
    }

    async fn gc(&self, req: Request<cni::GcRequest>) -> Result<Response<cni::CniReply>, Status> {
        Ok(reply(self.0.gc(req.get_ref()).await.map(|_| None)))
    }
}

/// Serves the service on a unix socket at `path` (mode 0600; connections
/// from other users than root are closed at once) until `shutdown`
/// resolves; the socket file is removed afterwards.
pub async fn serve<S: Store, D: Dataplane>(
    service: CniService<S, D>,
    path: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> crate::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::Error::io(format!("creating {}", dir.display()), e))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| crate::Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| crate::Error::io(format!("mode of {}", path.display()), e))?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => match s.peer_cred() {
                    Ok(c) if c.uid() == 0 => return Some((Ok::<_, std::io::Error>(s), l)),
                    Ok(c) => tracing::warn!(uid = c.uid(), "refused a non-root caller"),
                    Err(e) => tracing::warn!("peer credentials: {e}"),
                },
                Err(e) => return Some((Err(e), l)),
            }
        }
    });
    let res = tonic::transport::Server::builder()
        .add_service(cni_server::CniServer::new(Shared(Arc::new(service))))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    res.map_err(Into::into)
}
