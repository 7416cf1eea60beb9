//! The CNI service on the agent's unix socket: gRPC (`margay.cni.v1.Cni`)
//! over a socket of mode 0600 whose server also checks each caller's
//! credentials (root only), with each request's latency and outcome
//! recorded in the agent's metrics.
//!
//! An ADD runs in its own task, so a caller that goes away (the plugin
//! killed, its connection closed) does not stop it halfway: it finishes,
//! and when nobody is left to hear its answer it is undone as a DEL would
//! (interface, routes, addresses back), so a cancelled ADD leaves nothing.
//! The server owns these tasks: it waits for them when it shuts down, and
//! they are aborted with it when its future is dropped.

use std::sync::Arc;
use std::time::Instant;

use margay_ipam::Store;
use margay_proto::cni::{self, cni_server};
use tokio::task::JoinSet;
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

/// The answer of a verb without a CNI result (DEL, CHECK, STATUS, GC):
/// success, or its error.
fn no_result<T>(r: Result<T, cni::CniError>) -> Result<Response<cni::CniReply>, Status> {
    Ok(reply(r.map(|_| None)))
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

/// The ADDs running, owned by the server: [`serve`] waits for them before
/// it returns, and dropping them (the server's future dropped) aborts them.
#[derive(Debug, Default)]
struct Adds(std::sync::Mutex<JoinSet<()>>);

impl Adds {
    /// Starts `f`, first taking in the ADDs that have ended.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.0.lock().expect("the ADD tasks");
        while set.try_join_next().is_some() {}
        set.spawn(f);
    }

    /// Waits for every ADD running (each finishes, or is undone when its
    /// caller is gone).
    async fn finish(&self) {
        let mut set = std::mem::take(&mut *self.0.lock().expect("the ADD tasks"));
        while set.join_next().await.is_some() {}
    }
}

/// The service as the gRPC server holds it, and the ADDs it runs.
struct Shared<S, D> {
    svc: Arc<CniService<S, D>>,
    adds: Arc<Adds>,
}

/// Runs an ADD to its end whatever happens to its caller (in a task of
/// `adds`): the answer goes back through a channel, and when the caller is
/// gone by then (the request's future dropped) a successful ADD is undone.
async fn add_detached<S: Store, D: Dataplane>(
    svc: Arc<CniService<S, D>>,
    adds: &Adds,
    req: cni::CniRequest,
) -> Result<cni::CniResult, cni::CniError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    adds.spawn(async move {
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
        let r = add_detached(self.svc.clone(), &self.adds, req.into_inner()).await;
        Ok(reply(r.map(Some)))
    }

    async fn del(&self, req: Request<cni::CniRequest>) -> Result<Response<cni::CniReply>, Status> {
        no_result(timed(CniOp::Del, self.svc.del(req.get_ref())).await)
    }

    async fn check(
        &self,
        req: Request<cni::CniRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        no_result(timed(CniOp::Check, self.svc.check(req.get_ref())).await)
    }

    async fn status(
        &self,
        _req: Request<cni::StatusRequest>,
    ) -> Result<Response<cni::CniReply>, Status> {
        no_result(self.svc.status().await)
    }

    async fn gc(&self, req: Request<cni::GcRequest>) -> Result<Response<cni::CniReply>, Status> {
        no_result(self.svc.gc(req.get_ref()).await)
    }
}

/// Serves the service on a unix socket at `path` (mode 0600; connections
/// from other users than root are closed at once) until `shutdown`
/// resolves, then waits for the ADDs still running; the socket file is
/// removed afterwards.
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
    let adds = Arc::new(Adds::default());
    let shared = Shared {
        svc: Arc::new(service),
        adds: adds.clone(),
    };
    let res = tonic::transport::Server::builder()
        .add_service(cni_server::CniServer::new(shared))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    adds.finish().await;
    let _ = std::fs::remove_file(path);
    res.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_server_waits_for_its_adds_and_dropping_it_aborts_them() {
        // Shutting down: an ADD still running is finished.
        let adds = Adds::default();
        let done = Arc::new(AtomicBool::new(false));
        adds.spawn({
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                done.store(true, Ordering::SeqCst);
            }
        });
        adds.finish().await;
        assert!(done.load(Ordering::SeqCst));
        // The server's future dropped: its ADDs go with it.
        let adds = Adds::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        adds.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(adds);
        assert!(rx.await.is_err(), "the ADD's task outlived its server");
    }

    #[tokio::test]
    async fn ended_adds_are_not_kept() {
        let adds = Adds::default();
        for _ in 0..100 {
            adds.spawn(async {});
            tokio::task::yield_now().await;
        }
        assert!(adds.0.lock().unwrap().len() < 100);
    }
}
