//! This node's attachments as the engine keeps them: added (or found at
//! start-up), found unattributed, deleted; each linked to its Pod.

use std::net::IpAddr;

use margay_policy::PodKey;

use super::{Endpoint, Engine};

impl Engine {
    /// An ADD wired `ep` (or start-up found it wired). A retried ADD of
    /// the same attachment replaces it.
    pub fn endpoint_added(&mut self, ep: Endpoint) {
        let host_if = ep.host_if.clone();
        let d = self.compiler.set_workload(&host_if, Some(ep.ips.clone()));
        self.push(d);
        let old = self.endpoints.insert(host_if.clone(), ep.clone());
        let old_pod = old
            .and_then(|o| o.pod)
            .filter(|k| Some(k) != ep.pod.as_ref());
        if let Some(k) = &old_pod {
            self.unlink(k, &host_if);
        }
        match &ep.pod {
            Some(k) => {
                self.by_pod
                    .entry(k.clone())
                    .or_default()
                    .insert(host_if.clone());
                self.sync_pod(k);
            }
            None => {
                if self.compiler.endpoints().contains_key(&host_if) {
                    let d = self.compiler.set_endpoint(&host_if, None);
                    self.push(d);
                }
            }
        }
        if let Some(k) = old_pod {
            self.sync_pod(&k);
        }
    }

    /// Interface `host_if` no longer belongs to pod `key`.
    pub(super) fn unlink(&mut self, key: &PodKey, host_if: &str) {
        if let Some(ifs) = self.by_pod.get_mut(key) {
            ifs.remove(host_if);
            if ifs.is_empty() {
                self.by_pod.remove(key);
            }
        }
        if self.compiler.endpoints().contains_key(host_if) {
            let d = self.compiler.set_endpoint(host_if, None);
            self.push(d);
        }
    }

    /// Start-up found `host_if` wired, but neither its alias nor IPAM
    /// says whose it is: it is quarantined (nothing in or out but
    /// replies) until its DEL.
    pub fn endpoint_unattributed(&mut self, host_if: &str, ips: Vec<IpAddr>) {
        self.endpoint_added(Endpoint {
            host_if: host_if.to_string(),
            pod: None,
            ips,
        });
        let d = self.compiler.set_quarantine(host_if, true);
        self.push(d);
    }

    /// The attachment on `host_if` was deleted: its interface is no longer
    /// a workload (nothing it sends passes, nothing reaches it).
    pub fn endpoint_deleted(&mut self, host_if: &str) {
        if let Some(ep) = self.endpoints.remove(host_if) {
            if let Some(k) = &ep.pod {
                self.unlink(k, host_if);
                self.sync_pod(k);
            }
            if self.compiler.endpoints().contains_key(host_if) {
                let d = self.compiler.set_endpoint(host_if, None);
                self.push(d);
            }
        }
        if self.compiler.workloads().contains_key(host_if) {
            let d = self.compiler.set_workload(host_if, None);
            self.push(d);
        }
        if self.compiler.is_quarantined(host_if) {
            let d = self.compiler.set_quarantine(host_if, false);
            self.push(d);
        }
    }
}
