//! BGP passwords from Secrets in the agent's namespace. Each Secret a
//! BGPPeer names is watched by name (a field selector on `metadata.name`,
//! so the agent caches only the Secrets it needs, and RBAC can grant
//! `list`/`watch` on just those names with `resourceNames`, as Calico
//! asks). Where RBAC allows only `get`, that Secret is read by name once
//! per resync period instead. Each (Secret, key) is then found, known to
//! be absent, last known while the API is down, or not known at all (the
//! peering that needs it keeps what it had).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::watcher;
use margay_task::Owned;
use tokio::sync::Notify;

use super::{Known, Watched, Why, why_of};

/// (Secret name, key).
pub type SecretKey = (String, String);

/// How one Secret is read.
enum Source {
    /// Watched by name (the task keeps the watch).
    Watch { seen: Watched<Secret>, _task: Owned },
    /// Read by name (RBAC forbids watching it): the last read and when.
    Get(Option<(Instant, Known<Option<Box<Secret>>>)>),
}

/// One watch per referenced Secret; watches of Secrets no longer named
/// stop.
pub struct SecretWatches {
    api: Api<Secret>,
    namespace: String,
    poke: Arc<Notify>,
    every: Duration,
    sources: BTreeMap<String, Source>,
}

impl std::fmt::Debug for SecretWatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretWatches")
            .field("namespace", &self.namespace)
            .field("secrets", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretWatches {
    /// Watches in `namespace`; every change pokes `poke`; a Secret that
    /// may only be read by name is read again after `every`.
    pub fn new(client: kube::Client, namespace: &str, poke: Arc<Notify>, every: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            poke,
            every,
            sources: BTreeMap::new(),
        }
    }

    fn watch(&self, name: &str) -> Source {
        let (w, task) = super::watch_with(
            self.api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
            "a BGP password Secret",
            self.poke.clone(),
        );
        Source::Watch {
            seen: w,
            _task: Owned::spawn(task),
        }
    }

    /// What each of `refs` holds, starting and stopping watches so that
    /// exactly the named Secrets are watched.
    pub async fn passwords(
        &mut self,
        refs: &BTreeSet<SecretKey>,
    ) -> BTreeMap<SecretKey, Known<Option<String>>> {
        let names: BTreeSet<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
        self.sources.retain(|n, _| names.contains(n.as_str()));
        let mut read: BTreeMap<String, Known<Option<Box<Secret>>>> = BTreeMap::new();
        for name in names {
            if !self.sources.contains_key(name) {
                let w = self.watch(name);
                self.sources.insert(name.to_string(), w);
            }
            let src = self.sources.get_mut(name).expect("just inserted");
            let k = match src {
                Source::Watch { seen: w, .. } => {
                    let k = w
                        .read()
                        .map(|all| all.first().map(|s| Box::new((**s).clone())));
                    if matches!(k.why().map(Why::cause), Some(Why::Forbidden { .. })) {
                        tracing::warn!(
                            "RBAC forbids watching Secret {}/{name}: reading it by name every {}s instead (grant list and watch on it with resourceNames)",
                            self.namespace,
                            self.every.as_secs()
                        );
                        *src = Source::Get(None);
                    }
                    k
                }
                Source::Get(_) => Known::Unknown(Why::NotRead(None)),
            };
            let k = match src {
                Source::Watch { .. } => k,
                Source::Get(last) => {
                    if last
                        .as_ref()
                        .is_none_or(|(at, _)| at.elapsed() >= self.every)
                    {
                        let prev = last.take().map(|(_, k)| k);
                        let get = tokio::time::timeout(super::DEADLINE, self.api.get_opt(name));
                        let now = match get.await {
                            Ok(Ok(s)) => Known::Fresh(s.map(Box::new)),
                            Ok(Err(e)) => prev
                                .unwrap_or(Known::Unknown(Why::NotRead(None)))
                                .failed(match why_of(None, &e) {
                                    Why::Forbidden { error, .. } => Why::SecretForbidden {
                                        namespace: self.namespace.clone(),
                                        name: name.to_string(),
                                        error,
                                    },
                                    why => why,
                                }),
                            Err(_) => prev
                                .unwrap_or(Known::Unknown(Why::NotRead(None)))
                                .failed(Why::NoAnswer),
                        };
                        *last = Some((Instant::now(), now));
                    }
                    last.as_ref().map(|(_, k)| k.clone()).expect("just read")
                }
            };
            read.insert(name.to_string(), k);
        }
        refs.iter()
            .map(|(name, key)| {
                let k = read
                    .get(name)
                    .cloned()
                    .unwrap_or(Known::Unknown(Why::NotRead(None)))
                    .map(|s| password(s.as_deref(), key));
                let k = match k {
                    Known::Unknown(why) => Known::Unknown(Why::Secret {
                        namespace: self.namespace.clone(),
                        name: name.clone(),
                        cause: Box::new(why),
                    }),
                    k => k,
                };
                ((name.clone(), key.clone()), k)
            })
            .collect()
    }
}

/// The password under `key` of `secret` (a trailing newline, as `echo`
/// leaves it, is not part of it).
fn password(secret: Option<&Secret>, key: &str) -> Option<String> {
    secret
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(key).cloned())
        .and_then(|v| String::from_utf8(v.0).ok())
        .map(|pw| pw.trim_end_matches('\n').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn the_key_of_the_secret_without_its_newline() {
        let s = Secret {
            data: Some([("pw".to_string(), ByteString(b"s3cret\n".to_vec()))].into()),
            ..Default::default()
        };
        assert_eq!(password(Some(&s), "pw").as_deref(), Some("s3cret"));
        assert_eq!(password(Some(&s), "other"), None);
        assert_eq!(password(None, "pw"), None);
    }
}
