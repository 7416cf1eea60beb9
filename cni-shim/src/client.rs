//! Talking to the agent: the gRPC request built from what the runtime
//! passed, the call over the unix socket, and the reply turned back into
//! CNI terms. An unreachable or timing-out agent is CNI code 11 ("try again
//! later"): the runtime retries.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use margay_proto::cni::{self, cni_client::CniClient};
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

use crate::spec::{CniError, CniResult, Command, Env, Interface, Ip, NetConf, code};

/// The request for ADD / DEL / CHECK.
pub fn request(env: &Env, conf: &NetConf) -> cni::CniRequest {
    let pod = match (
        env.args.get("K8S_POD_NAMESPACE"),
        env.args.get("K8S_POD_NAME"),
    ) {
        (Some(ns), Some(name)) => Some(cni::PodRef {
            namespace: ns.clone(),
            name: name.clone(),
            uid: env.args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        }),
        _ => None,
    };
    cni::CniRequest {
        cni_version: conf.version.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        args: env.args.clone().into_iter().collect(),
        pod,
        network: conf.name.clone(),
        mtu: conf.mtu,
        prev_result: conf
            .prev_result
            .as_ref()
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_default(),
    }
}

/// Converts the agent's result.
pub fn result(r: cni::CniResult) -> CniResult {
    CniResult {
        interfaces: r
            .interfaces
            .into_iter()
            .map(|i| Interface {
                name: i.name,
                mac: i.mac,
                sandbox: i.sandbox,
                mtu: i.mtu,
            })
            .collect(),
        ips: r
            .ips
            .into_iter()
            .map(|ip| Ip {
                address: ip.address,
                gateway: ip.gateway,
                interface: usize::try_from(ip.interface).ok(),
            })
            .collect(),
        routes: r.routes.into_iter().map(|rt| (rt.dst, rt.gw)).collect(),
    }
}

/// The error and its causes, outermost first ("transport error" alone
/// tells an operator nothing).
fn chain(e: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut parts = vec![e.to_string()];
    let mut denied = false;
    let mut cur = e.source();
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            denied |= io.kind() == std::io::ErrorKind::PermissionDenied;
        }
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    (parts.join(": "), denied)
}

fn unreachable(socket: &str, e: &(dyn std::error::Error + 'static)) -> CniError {
    let (text, denied) = chain(e);
    let hint = if denied {
        "the agent's socket is root-only: run the plugin as root, as container runtimes do"
    } else {
        "is the margay-agent pod running on this node? (it also refuses callers that are not root)"
    };
    CniError {
        code: code::TRY_AGAIN,
        msg: format!("cannot reach margay-agent at {socket}"),
        details: format!("{text}; {hint}"),
    }
}

/// Calls the agent for `command`; `Ok(Some(result))` for ADD.
pub async fn call(env: &Env, conf: &NetConf) -> Result<Option<CniResult>, CniError> {
    let socket = conf.socket.clone();
    let path = socket.clone();
    let channel = Endpoint::try_from("http://margay-agent")
        .map_err(|e| unreachable(&socket, &e))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(conf.timeout_seconds))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| unreachable(&socket, &e))
        .map_err(|e| match env.command {
            // STATUS has its own answer for "cannot serve ADDs" (spec 1.1).
            Command::Status => CniError {
                code: code::NOT_AVAILABLE,
                ..e
            },
            _ => e,
        })?;
    let mut client = CniClient::new(channel);
    let reply = match env.command {
        Command::Add => client.add(request(env, conf)).await,
        Command::Del => client.del(request(env, conf)).await,
        Command::Check => client.check(request(env, conf)).await,
        Command::Status => {
            client
                .status(cni::StatusRequest {
                    cni_version: conf.version.clone(),
                })
                .await
        }
        Command::Gc => {
            client
                .gc(cni::GcRequest {
                    cni_version: conf.version.clone(),
                    network: conf.name.clone(),
                    valid: conf
                        .valid_attachments
                        .iter()
                        .flatten()
                        .map(|(c, i)| cni::Attachment {
                            container_id: c.clone(),
                            ifname: i.clone(),
                        })
                        .collect(),
                    valid_given: conf.valid_attachments.is_some(),
                })
                .await
        }
        Command::Version => unreachable!("VERSION is answered locally"),
    };
    let reply = reply
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => CniError {
                code: code::INVALID_CONFIG,
                msg: format!("margay-agent refused the request: {}", s.message()),
                details: String::new(),
            },
            _ => {
                let (text, _) = chain(&s);
                CniError {
                    code: code::TRY_AGAIN,
                    msg: format!("margay-agent did not answer: {}", s.message()),
                    details: format!(
                        "gRPC status {:?}: {text} (the agent refuses callers that are not root)",
                        s.code()
                    ),
                }
            }
        })?
        .into_inner();
    if let Some(e) = reply.error {
        return Err(CniError {
            code: e.code,
            msg: e.msg,
            details: e.details,
        });
    }
    Ok(reply.result.map(result))
}
