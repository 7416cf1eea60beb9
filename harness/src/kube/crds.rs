//! Margay's CRDs installed on a test or lab apiserver (in clusters the
//! manifest does it): created or replaced, then waited for until the
//! apiserver serves them.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use crate::{Error, Result};

/// Creates or updates every CRD of `margay_api::crds::all` through
/// `client` and waits (at most 30 s) until each is established.
pub async fn install(client: &kube::Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in margay_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await? {
            None => {
                api.create(&PostParams::default(), &crd).await?;
            }
            Some(cur) => {
                let mut new = crd.clone();
                new.metadata.resource_version = cur.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &new).await?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, crd) in margay_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let cur = api.get(&name).await?;
            let established = cur
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("CRD {name} to be established"),
                    secs: 30.0,
                    detail: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
