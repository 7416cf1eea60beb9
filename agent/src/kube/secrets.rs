//! BGP passwords from Secrets in the agent's namespace, read by name: each
//! (Secret, key) is found, known to be absent, or could not be read (the
//! peering that needs it then keeps what it had).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::Known;

/// (Secret name, key).
pub type SecretKey = (String, String);

/// Reads each of `refs` from `namespace`: `Fresh(Some(pw))`, `Fresh(None)`
/// when the Secret or the key does not exist, `Unknown` when the read
/// failed.
pub async fn passwords(
    client: &kube::Client,
    namespace: &str,
    refs: &BTreeSet<SecretKey>,
) -> BTreeMap<SecretKey, Known<Option<String>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = BTreeMap::new();
    let mut secrets: BTreeMap<&str, Result<Option<Secret>, String>> = BTreeMap::new();
    for (name, key) in refs {
        let got = match secrets.get(name.as_str()) {
            Some(s) => s.clone(),
            None => {
                let s = api.get_opt(name).await.map_err(|e| e.to_string());
                secrets.insert(name, s.clone());
                s
            }
        };
        let k = match got {
            Err(e) => Known::Unknown(format!("cannot read Secret {namespace}/{name}: {e}")),
            Ok(s) => Known::Fresh(
                s.and_then(|s| s.data)
                    .and_then(|d| d.get(key).cloned())
                    .and_then(|v| String::from_utf8(v.0).ok())
                    .map(|pw| pw.trim_end_matches('\n').to_string()),
            ),
        };
        out.insert((name.clone(), key.clone()), k);
    }
    out
}
