//! `coordination.k8s.io` Leases in the Lease namespace
//! ([`margay_api::node::LEASE_NAMESPACE`] by default; not the agent's own
//! `kube-system`, where RBAC would let every agent write the scheduler's
//! and controller-manager's leader Leases too), for two things:
//!
//! - [`elect`]: one agent does the cluster-wide writes (pool status and
//!   finalizers, leak and dead-node collection, the `Valid` condition of
//!   BGP objects): the holder of [`LEADER`]. The others only watch it, so
//!   an agent that is not the leader costs the API no request for them.
//! - [`heartbeat`]: each agent renews its own Lease
//!   ([`margay_api::node::heartbeat_lease`]), which `margayctl` reads to
//!   tell a live agent from a dead one. A Lease is watched by nobody, so a
//!   heartbeat costs one small write and no watch events, where a Node
//!   status heartbeat reached every agent watching Nodes.
//!
//! Expiry is judged as client-go's leader election does: by how long the
//! lease record has been seen unchanged on this agent's own clock, never by
//! comparing the holder's timestamps with ours (clocks may disagree). The
//! holder stops acting as leader [`RENEW_DEADLINE`] after its last
//! successful renewal, before anyone may take over ([`DURATION`] after they
//! last saw it change). Two takers race with a compare-and-swap on the
//! Lease's `resourceVersion`: one wins.
//!
//! Agents before the Lease namespace kept [`LEADER`] in the agent's
//! namespace. During a rolling upgrade both versions run; the new ones
//! read that old Lease (by name, read-only) and neither create nor take
//! theirs while a holder other than themselves keeps renewing it
//! ([`legacy_leads`], judged by the same rule as any holder), so the two
//! versions never lead at once. The new RBAC no longer lets the old
//! agents write it, so its holder stops leading [`RENEW_DEADLINE`] after
//! its last renewal, and the new agents wait [`DURATION`] from when they
//! saw it last change: docs/install.md, "Upgrading".

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use margay_task::Owned;
use tokio::sync::{Notify, watch};

use super::Known;
use crate::Error;

/// The leader Lease's name.
pub const LEADER: &str = "margay-agent-leader";
/// How often the leader renews.
pub const RENEW: Duration = Duration::from_secs(15);
/// The leader stops leading this long after its last successful renewal.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(30);
/// Others may take the lease once it has been seen unchanged this long.
pub const DURATION: Duration = Duration::from_secs(45);

/// What to do about the leader lease now (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it: create it.
    Create,
    /// Ours and due for renewal: renew it.
    Renew,
    /// Someone else's, not renewed for [`DURATION`] as we saw it: take it.
    Take,
    /// Ours and fresh, or someone else's and fresh: nothing.
    Wait,
}

/// The step for `lease` (`None`: it does not exist) seen by `me`, whose
/// record has looked the same for `unchanged`, `renewed` being how long
/// ago our own last successful write was.
pub fn step(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged: Duration,
    renewed: Option<Duration>,
) -> Step {
    let Some(l) = lease else { return Step::Create };
    let holder = l.holder_identity.as_deref().unwrap_or("");
    let duration = l
        .lease_duration_seconds
        .map_or(DURATION, |s| Duration::from_secs(s.max(1) as u64));
    if holder == me {
        // Renew on schedule; also when this agent restarted and finds its
        // own record (same identity: nobody else acted on it meanwhile).
        return match renewed {
            Some(ago) if ago < RENEW => Step::Wait,
            _ => Step::Renew,
        };
    }
    if holder.is_empty() || unchanged >= duration {
        Step::Take
    } else {
        Step::Wait
    }
}

/// Whether an older agent still leads through `legacy`, the [`LEADER`]
/// Lease in the agent's namespace (where agents before the Lease
/// namespace kept it), as seen by `me`, its record unchanged for
/// `unchanged` on our clock. Held by another identity and changed within
/// its duration: it leads. Never read (not listed yet, or refused): as
/// though held, for one [`DURATION`] from when this agent started to
/// look, so a slow first list cannot let it lead beside an old leader and
/// a cluster that does not grant the read only waits once. The holder's
/// own timestamps are never compared with our clock ([`step`]'s rule).
pub fn legacy_leads(legacy: Known<Option<&LeaseSpec>>, me: &str, unchanged: Duration) -> bool {
    let l = match legacy {
        Known::Fresh(l) | Known::Stale(l, _) => l,
        Known::Unknown(_) => return unchanged < DURATION,
    };
    let Some(l) = l else { return false };
    let holder = l.holder_identity.as_deref().unwrap_or("");
    let duration = l
        .lease_duration_seconds
        .map_or(DURATION, |s| Duration::from_secs(s.max(1) as u64));
    // Our own identity: this node's agent before its upgrade, which is
    // gone (one agent per node), as `step` renews a record of its own.
    !holder.is_empty() && holder != me && unchanged < duration
}

/// `step`, held back while an older agent leads ([`legacy_leads`]): it
/// neither creates nor takes the Lease then; renewing its own goes on.
pub fn defer(step: Step, legacy_leads: bool) -> Step {
    match step {
        Step::Create | Step::Take if legacy_leads => Step::Wait,
        s => s,
    }
}

/// The spec `me` writes, keeping `acquired` when it already held it.
fn spec(me: &str, transitions: i32, acquired: Option<MicroTime>, duration: Duration) -> LeaseSpec {
    let now = MicroTime(jiff::Timestamp::now());
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// The Lease to write for `step` over `current` (pure but for the clock).
fn write_for(
    step: Step,
    current: Option<&Lease>,
    name: &str,
    namespace: &str,
    me: &str,
    duration: Duration,
) -> Option<Lease> {
    match (step, current) {
        (Step::Wait, _) => None,
        (Step::Create, _) | (_, None) => Some(Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(spec(me, 0, None, duration)),
        }),
        (Step::Renew | Step::Take, Some(l)) => {
            let mut l = l.clone();
            let s = l.spec.take().unwrap_or_default();
            let ours = s.holder_identity.as_deref() == Some(me);
            let transitions = s.lease_transitions.unwrap_or(0) + i32::from(!ours);
            let acquired = if ours { s.acquire_time } else { None };
            l.spec = Some(spec(me, transitions, acquired, duration));
            Some(l)
        }
    }
}

/// Writes `l` (replace when it has a version, else create), giving up
/// after [`super::DEADLINE`]: a renewal that hangs on a frozen API must not
/// keep this agent believing it still leads. Fails with
/// [`Error::Refused`] (the API answered) or [`Error::Unanswered`].
async fn put(api: &Api<Lease>, l: &Lease) -> crate::Result<Lease> {
    let write = async {
        if l.metadata.resource_version.is_some() {
            let name = l.metadata.name.clone().unwrap_or_default();
            api.replace(&name, &PostParams::default(), l).await
        } else {
            api.create(&PostParams::default(), l).await
        }
    };
    match tokio::time::timeout(super::DEADLINE, write).await {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(kube::Error::Api(s))) if s.code < 500 => Err(Error::Refused {
            code: s.code,
            message: s.message,
        }),
        Ok(Err(e)) => Err(Error::Unanswered(e.to_string())),
        Err(_) => Err(Error::Unanswered(format!(
            "no answer within {}s",
            super::DEADLINE.as_secs()
        ))),
    }
}

/// Where this agent runs for [`LEADER`], and as whom.
#[derive(Debug, Clone)]
pub struct Election {
    /// The Lease namespace: [`LEADER`] is written there.
    pub namespace: String,
    /// The agent's namespace, where agents before the Lease namespace kept
    /// [`LEADER`]: read only ([`legacy_leads`]). `None`: the same
    /// namespace (nothing older to defer to).
    pub legacy_namespace: Option<String>,
    /// This agent's identity (its node's name).
    pub me: String,
}

/// Keeps `leader` true while this agent holds [`LEADER`] in the Lease
/// namespace. Never ends.
pub async fn elect(client: kube::Client, election: Election, leader: watch::Sender<bool>) {
    let Election {
        namespace,
        legacy_namespace,
        me,
    } = election;
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let poke = Arc::new(Notify::new());
    let by_name = || watcher::Config::default().fields(&format!("metadata.name={LEADER}"));
    let (seen, task) = super::watch_with(api.clone(), by_name(), "the leader Lease", poke.clone());
    let _watching = Owned::spawn(task);
    // An older agent's leader Lease, read by name only.
    let legacy = legacy_namespace.as_ref().map(|ns| {
        let (seen, task) = super::watch_with(
            Api::<Lease>::namespaced(client.clone(), ns),
            by_name(),
            "the leader Lease of agents before the Lease namespace",
            poke.clone(),
        );
        (seen, Owned::spawn(task))
    });
    // The record as last seen, and since when (our clock); the same for
    // the older agents' Lease.
    let mut record: Option<(Option<String>, Option<MicroTime>)> = None;
    let mut since = Instant::now();
    let mut legacy_record: Option<(Option<String>, Option<MicroTime>)> = None;
    let mut legacy_since = Instant::now();
    let mut deferring: Option<bool> = None;
    let mut warned: Option<Instant> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        let old = match &legacy {
            None => Known::Fresh(None),
            Some((w, _)) => w.read().map(|all| all.first().and_then(|l| l.spec.clone())),
        };
        if let Some(l) = old.value() {
            let now_record = l
                .as_ref()
                .map(|s| (s.holder_identity.clone(), s.renew_time.clone()));
            if now_record != legacy_record {
                legacy_record = now_record;
                legacy_since = Instant::now();
            }
        }
        let old_leads = legacy_leads(
            old.as_ref().map(Option::as_ref),
            &me,
            legacy_since.elapsed(),
        );
        // Only a current view of the lease is acted on; otherwise only our
        // own renewals count (and run out).
        if let Known::Fresh(all) = seen.read() {
            let current = all.first().map(|l| (**l).clone());
            let spec = current.as_ref().and_then(|l| l.spec.as_ref());
            let now_record = spec.map(|s| (s.holder_identity.clone(), s.renew_time.clone()));
            if now_record != record {
                record = now_record;
                since = Instant::now();
            }
            let wanted = step(spec, &me, since.elapsed(), renewed.map(|t| t.elapsed()));
            let s = defer(wanted, old_leads);
            // Why it defers: the older Lease unread, or an older leader.
            let now_deferring = (s != wanted).then(|| old.value().is_some());
            if now_deferring != deferring {
                let ns = legacy_namespace.as_deref().unwrap_or_default();
                match now_deferring {
                    // Not listed yet (a moment at start-up), or refused (the
                    // watch says so itself).
                    Some(false) => tracing::debug!(
                        "leader: not running for the Lease until {ns}/{LEADER} (older \
                         agents') is read, or for {}s",
                        DURATION.as_secs()
                    ),
                    Some(true) => tracing::info!(
                        "leader: an agent of an older version leads through {ns}/{LEADER}; \
                         waiting until it stops renewing it"
                    ),
                    None => {}
                }
                deferring = now_deferring;
            }
            if spec.is_some_and(|s| s.holder_identity.as_deref() != Some(me.as_str()))
                && s == Step::Wait
            {
                // Someone else holds it.
                renewed = None;
            }
            if let Some(l) = write_for(s, current.as_ref(), LEADER, &namespace, &me, DURATION) {
                match put(&api, &l).await {
                    Ok(_) => {
                        if renewed.is_none() {
                            tracing::info!("leader: this agent now does the cluster-wide writes");
                        }
                        renewed = Some(Instant::now());
                    }
                    // Another agent won the compare-and-swap, or the API did
                    // not answer: the watch shows who holds it next.
                    Err(e) if e.is_conflict() || matches!(e, Error::Unanswered(_)) => {
                        tracing::debug!("leader lease: {e}")
                    }
                    // Refused otherwise (RBAC, no such namespace): nobody
                    // leads until an operator fixes it; say so.
                    Err(e) => {
                        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!(
                                "leader: cannot write the Lease {namespace}/{LEADER}: {e} \
                                 (does the Lease namespace exist, and may this agent write \
                                 Leases there? docs/install.md)"
                            );
                            warned = Some(Instant::now());
                        }
                    }
                }
            }
        }
        let leading = renewed.is_some_and(|t| t.elapsed() < RENEW_DEADLINE);
        if !leading && renewed.take().is_some() {
            tracing::warn!("leader: lease not renewed; no longer doing the cluster-wide writes");
        }
        leader.send_if_modified(|l| std::mem::replace(l, leading) != leading);
        tokio::select! {
            _ = poke.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Renews this agent's heartbeat Lease `name` in `namespace` every
/// [`margay_api::node::HEARTBEAT_RENEW`]. Never ends; failures are retried
/// on the next tick.
pub async fn heartbeat(
    client: kube::Client,
    namespace: String,
    name: String,
    me: String,
    report: impl Fn(crate::Result<()>) + Send,
) {
    use margay_api::node::{HEARTBEAT_DURATION, HEARTBEAT_RENEW};
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut current: Option<Lease> = None;
    let mut warned = false;
    loop {
        if current.is_none() {
            current = tokio::time::timeout(super::DEADLINE, api.get_opt(&name))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
        }
        let s = if current.is_some() {
            Step::Renew
        } else {
            Step::Create
        };
        let l = write_for(
            s,
            current.as_ref(),
            &name,
            &namespace,
            &me,
            HEARTBEAT_DURATION,
        );
        match put(&api, l.as_ref().expect("a write for Renew/Create")).await {
            Ok(l) => {
                current = Some(l);
                if warned {
                    tracing::info!("heartbeat Lease {namespace}/{name} renewed again");
                }
                warned = false;
                report(Ok(()));
            }
            Err(e) => {
                // Read again next time (a conflict means someone else wrote).
                current = None;
                if !warned {
                    tracing::warn!("heartbeat Lease {namespace}/{name}: {e}");
                    warned = true;
                }
                report(Err(e));
            }
        }
        // After a failure, try again soon: the return of the API shows
        // in the status within seconds.
        tokio::time::sleep(if warned {
            HEARTBEAT_RENEW / 6
        } else {
            HEARTBEAT_RENEW
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::{Op, Why};

    fn held(by: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(45),
            ..Default::default()
        }
    }

    #[test]
    fn one_holder_renews_and_others_wait_until_it_stops() {
        let s = Duration::from_secs;
        assert_eq!(step(None, "n1", s(0), None), Step::Create);
        // The holder renews on schedule, also after its own restart.
        assert_eq!(step(Some(&held("n1")), "n1", s(1), Some(s(1))), Step::Wait);
        assert_eq!(
            step(Some(&held("n1")), "n1", s(16), Some(s(16))),
            Step::Renew
        );
        assert_eq!(step(Some(&held("n1")), "n1", s(100), None), Step::Renew);
        // Others wait for the record to sit unchanged a full duration.
        assert_eq!(step(Some(&held("n1")), "n2", s(30), None), Step::Wait);
        assert_eq!(step(Some(&held("n1")), "n2", s(45), None), Step::Take);
        // A released lease (no holder) is free at once.
        assert_eq!(step(Some(&held("")), "n2", s(0), None), Step::Take);
        // The holder gives up before anyone may take over.
        assert!(RENEW < RENEW_DEADLINE && RENEW_DEADLINE < DURATION);
    }

    #[test]
    fn an_older_agents_leader_holds_back_creating_and_taking_only() {
        let s = Duration::from_secs;
        let old = held("n1");
        let seen = |l| Known::Fresh(Some(l));
        // Renewed by another within its duration: it leads.
        assert!(legacy_leads(seen(&old), "n2", s(0)));
        assert!(legacy_leads(seen(&old), "n2", s(44)));
        assert!(!legacy_leads(seen(&old), "n2", s(45)));
        // Last seen before its watch broke: judged the same way.
        assert!(legacy_leads(
            Known::Stale(Some(&old), Why::NoAnswer),
            "n2",
            s(10)
        ));
        // Its holder's own duration counts, as for any holder.
        let short = LeaseSpec {
            lease_duration_seconds: Some(15),
            ..held("n1")
        };
        assert!(!legacy_leads(seen(&short), "n2", s(15)));
        // This node's own agent before its upgrade (gone), no holder, no
        // Lease at all: nobody.
        assert!(!legacy_leads(seen(&old), "n1", s(0)));
        assert!(!legacy_leads(seen(&held("")), "n2", s(0)));
        assert!(!legacy_leads(Known::Fresh(None), "n2", s(0)));
        // Not read yet, or refused: as though held, for one duration.
        assert!(legacy_leads(
            Known::Unknown(Why::NotListed {
                what: "Leases",
                last: None
            }),
            "n2",
            s(44)
        ));
        assert!(!legacy_leads(
            Known::Unknown(Why::Forbidden {
                op: Some(Op::List),
                error: "leases is forbidden".into()
            }),
            "n2",
            s(45)
        ));

        // While it leads: no create, no take; renewing our own goes on.
        assert_eq!(defer(Step::Create, true), Step::Wait);
        assert_eq!(defer(Step::Take, true), Step::Wait);
        assert_eq!(defer(Step::Renew, true), Step::Renew);
        assert_eq!(defer(Step::Wait, true), Step::Wait);
        for st in [Step::Create, Step::Take, Step::Renew, Step::Wait] {
            assert_eq!(defer(st, false), st);
        }
        // The upgrade: the old leader stops leading RENEW_DEADLINE after
        // its last renewal, which a new agent saw at the earliest; the new
        // agent creates its Lease DURATION after that at the earliest.
        assert!(RENEW_DEADLINE < DURATION);
    }

    #[test]
    fn writes_keep_the_acquire_time_and_count_transitions() {
        let mine = Lease {
            metadata: ObjectMeta {
                name: Some(LEADER.into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("n1".into()),
                acquire_time: Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)),
                lease_transitions: Some(2),
                ..Default::default()
            }),
        };
        let renew = write_for(Step::Renew, Some(&mine), LEADER, "ns", "n1", DURATION).unwrap();
        let s = renew.spec.unwrap();
        assert_eq!(renew.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(s.acquire_time, Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)));
        assert_eq!(s.lease_transitions, Some(2));
        let take = write_for(Step::Take, Some(&mine), LEADER, "ns", "n2", DURATION).unwrap();
        let s = take.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("n2"));
        assert_eq!(s.lease_transitions, Some(3));
        assert_ne!(s.acquire_time, Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)));
        let create = write_for(Step::Create, None, LEADER, "ns", "n1", DURATION).unwrap();
        assert!(create.metadata.resource_version.is_none());
        assert_eq!(create.spec.unwrap().lease_duration_seconds, Some(45));
        assert!(write_for(Step::Wait, Some(&mine), LEADER, "ns", "n1", DURATION).is_none());
    }
}
