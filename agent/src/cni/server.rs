//! The CNI service on the agent's unix socket: gRPC (`margay.cni.v1.Cni`)
//! over a socket of mode 0600 whose server also checks each caller's
//! credentials (root only), with each request's latency and outcome
//! recorded in the agent's metrics.

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

#[tonic::async_trait]
impl<S: Store, D: Dataplane> cni_server::Cni for CniService<S, D> {
    async fn add(&self, req: Request<cni::CniRequest>) -> Result<Response<cni::CniReply>, Status> {
        let r = timed(CniOp::Add, CniService::add(self, req.get_ref())).await;
        Ok(reply(r.map(Some)))
    }

    async fn del(&self, req: Request<cni::CniRequest>) -> Result<Response<cni::CniReply>, Status> {
        let r = timed(CniOp::Del, CniService::del(self, req.get_ref())).await;
        Ok(reply(r.map(|()| None)))
    }

    async fn check(
        &self,
        req: Request<cni::CniRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        let r = timed(CniOp::Check, CniService::check(self, req.get_ref())).await;
        Ok(reply(r.map(|()| None)))
    }

    async fn status(
        &self,
        _req: Request<cni::StatusRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        Ok(reply(CniService::status(self).await.map(|()| None)))
    }

    async fn gc(&self, req: Request<cni::GcRequest>) -> Result<Response<cni::CniReply>, Status> {
        Ok(reply(
            CniService::gc(self, req.get_ref()).await.map(|_| None),
        ))
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
        .add_service(cni_server::CniServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    res.map_err(Into::into)
}
