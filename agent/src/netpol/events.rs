//! Kubernetes Events on NetworkPolicies this cluster does not enforce as
//! written (`kubectl describe networkpolicy` shows them): a refused or
//! too large policy by the Lease holder only, once per policy and reason
//! (every agent refuses it alike, so one report is enough); one a node's
//! kernel refused by that node. Again only after the policy was fixed and
//! broke anew. What to write is pure
//! ([`to_report`], [`event`]); [`run`] writes it.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};
use margay_api::status::{PolicyStatus, UnenforcedPolicy, UnenforcedReason};
use tokio::sync::watch;

/// The Event's reason.
pub const REASON: &str = "NotEnforcedAsWritten";

/// What identifies one report: the policy, its UID and why.
type Reported = (String, String, Option<String>, String);

fn id(u: &UnenforcedPolicy) -> Reported {
    (
        u.namespace.clone(),
        u.name.clone(),
        u.uid.clone(),
        u.message.clone(),
    )
}

/// Of the policies `now` reports, those not reported yet; `done` forgets
/// the ones no longer reported (so a policy fixed and broken again is
/// reported again).
pub fn to_report<'a>(
    now: &'a PolicyStatus,
    done: &mut BTreeSet<Reported>,
) -> Vec<&'a UnenforcedPolicy> {
    let current: BTreeSet<Reported> = now.unenforced.iter().map(id).collect();
    done.retain(|r| current.contains(r));
    now.unenforced
        .iter()
        .filter(|u| !done.contains(&id(u)))
        .collect()
}

/// The Event for `u`, from the agent of node `node`.
pub fn event(u: &UnenforcedPolicy, node: &str, now: jiff::Timestamp) -> Event {
    // One per policy and reason; a node's own failure per node too.
    let from = match u.reason {
        UnenforcedReason::LoadFailed => node,
        _ => "",
    };
    let hash = margay_api::stable::fnv1a(
        format!(
            "{}/{}/{}/{from}",
            u.name,
            u.uid.as_deref().unwrap_or(""),
            u.message
        )
        .as_bytes(),
    );
    // Event names are at most 253 characters; the policy's may be as long.
    let mut base: String = u.name.chars().take(200).collect();
    base.push_str(&format!(".margay.{hash:016x}"));
    Event {
        metadata: ObjectMeta {
            name: Some(base),
            namespace: Some(u.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            name: Some(u.name.clone()),
            namespace: Some(u.namespace.clone()),
            uid: u.uid.clone(),
            ..Default::default()
        },
        reason: Some(REASON.into()),
        message: Some(format!(
            "Margay does not enforce this NetworkPolicy as written ({}): the pods it selects are isolated by it with nothing allowed (fail closed)",
            u.message
        )),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("margay-agent".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("margay.dev/agent".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Enforce".into()),
        count: Some(1),
        ..Default::default()
    }
}

/// Writes an Event for every policy `status` reports as not enforced as
/// written, while `leader` says this agent holds the Lease. Never ends.
pub async fn run(
    client: kube::Client,
    node: String,
    mut status: watch::Receiver<PolicyStatus>,
    mut leader: watch::Receiver<bool>,
) {
    let mut done = BTreeSet::new();
    loop {
        let leads = *leader.borrow_and_update();
        let now = status.borrow_and_update().clone();
        {
            let mine = |u: &&UnenforcedPolicy| leads || u.reason == UnenforcedReason::LoadFailed;
            for u in to_report(&now, &mut done).into_iter().filter(mine) {
                let api: Api<Event> = Api::namespaced(client.clone(), &u.namespace);
                let ev = event(u, &node, jiff::Timestamp::now());
                let wrote = tokio::time::timeout(
                    crate::kube::DEADLINE,
                    api.create(&PostParams::default(), &ev),
                )
                .await;
                match wrote {
                    Ok(Ok(_)) => {}
                    // Already there (another leader wrote it): reported.
                    Ok(Err(kube::Error::Api(e))) if e.code == 409 => {}
                    Ok(Err(e)) => {
                        tracing::info!(policy = %format!("{}/{}", u.namespace, u.name), "NetworkPolicy Event not written (retried): {e}");
                        continue;
                    }
                    Err(_) => continue,
                }
                done.insert(id(u));
            }
        }
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            // Retry what could not be written.
            () = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(name: &str, msg: &str) -> UnenforcedPolicy {
        UnenforcedPolicy {
            namespace: "x".into(),
            name: name.into(),
            uid: Some("u1".into()),
            reason: UnenforcedReason::TooLarge,
            message: msg.into(),
        }
    }

    #[test]
    fn each_policy_is_reported_once_until_it_is_fixed() {
        let mut done = BTreeSet::new();
        let mut s = PolicyStatus {
            unenforced: vec![u("a", "too large"), u("b", "refused")],
            ..Default::default()
        };
        let first: Vec<String> = to_report(&s, &mut done)
            .iter()
            .map(|u| u.name.clone())
            .collect();
        assert_eq!(first, ["a", "b"]);
        done.insert(id(&s.unenforced[0]));
        done.insert(id(&s.unenforced[1]));
        assert!(to_report(&s, &mut done).is_empty());
        // b fixed, then broken again: reported again.
        s.unenforced.pop();
        assert!(to_report(&s, &mut done).is_empty());
        s.unenforced.push(u("b", "refused"));
        assert_eq!(to_report(&s, &mut done).len(), 1);
    }

    #[test]
    fn an_event_names_its_policy_and_fits_any_legal_name() {
        let long = "p".repeat(253);
        let e = event(&u(&long, "too large"), "node1", jiff::Timestamp::now());
        assert!(e.metadata.name.as_ref().unwrap().len() <= 253);
        assert_eq!(e.involved_object.name.as_deref(), Some(long.as_str()));
        assert_eq!(e.involved_object.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert!(e.message.unwrap().contains("too large"));
    }
}
