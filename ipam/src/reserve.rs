//! Pre-assigned addresses: the pod-start fast path.
//!
//! A compare-and-swap write to the datastore is a round trip to the
//! apiserver (and etcd), several milliseconds on an idle control plane and
//! tens on a busy one. Calico pays it inside every ADD. Margay does not:
//! each node keeps a few addresses already assigned, in the datastore, to
//! its own *spare* handles (`spare.<node>.<id>`, no pod). An ADD takes a
//! spare without waiting for any write; the caller records the attribution
//! durably on the node (the dataplane writes the handle on the pod's host
//! interface, in the kernel) and then [`Reserve::commit`]s it, which moves
//! the addresses from the spare handle to the pod's handle in the
//! background (write-behind, batched with the refill of spares by the
//! allocator's group commit). DEL's release is written behind as well.
//!
//! Invariants (see `ipam/DESIGN.md`):
//! - a spare's addresses are in the datastore under this node's spare
//!   handle before they are handed out, so no other node or handle can get
//!   them: handing one out needs no write to be exclusive;
//! - an attribution is durable on the node before the ADD answers; a lost
//!   write-behind (agent crash) is redone from the kernel by the agent's
//!   start-up reconciliation, before spares are adopted again;
//! - operations on one handle are written in the order they were made;
//! - spares are re-checked against the pools every few seconds: a disabled
//!   pool (or one that no longer selects the node) stops handing out
//!   within that time plus the pool cache's, as on the slow path.
//!
//! How many spares: as many as the node's recent bursts of pod starts
//! call for ([`crate::demand`]), between `depth` and `max_depth`;
//! refilled as each is taken, the surplus given back once demand has
//! fallen. With no spare left (a burst larger than the spares, or the
//! fast path disabled with depth 0) ADD falls back to a direct assign,
//! which the allocator group-commits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use margay_task::Owned;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::crd::{AllowedUse, PodRef};
use crate::demand::Demand;
use crate::{Allocator, Assign, Error, Result};

/// The prefix of a node's spare handles.
pub fn spare_prefix(node: &str) -> String {
    format!("spare.{node}.")
}

/// Whether an allocation is one of its node's pre-assigned spares (a spare
/// handle of that node, attributed to no pod).
pub fn is_spare(a: &margay_api::ipam::AllocationRecord) -> bool {
    a.pod.is_none() && a.handle.starts_with(&spare_prefix(&a.node))
}

/// Addresses handed to a handle by [`Reserve::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The handle.
    pub handle: String,
    /// Its addresses (host prefixes).
    pub addrs: Vec<IpNetwork>,
    /// The spare they came from; `None` when they were assigned directly
    /// (or the handle had them already).
    pub spare: Option<String>,
}

/// How long taking a spare waits for the store to say whether the pools
/// still allow it (from memory with watches; the pools read last answer
/// past it).
const SPARE_CHECK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
struct Spare {
    handle: String,
    addrs: Vec<IpNetwork>,
}

#[derive(Debug)]
enum Write {
    Rename {
        from: String,
        to: String,
        addrs: Vec<IpAddr>,
        pod: Option<PodRef>,
    },
    Release(String),
    Flush(oneshot::Sender<()>),
}

impl Write {
    fn handle(&self) -> Option<&str> {
        match self {
            Write::Rename { to, .. } => Some(to),
            Write::Release(h) => Some(h),
            Write::Flush(_) => None,
        }
    }
}

#[derive(Debug)]
struct State {
    spares: VecDeque<Spare>,
    /// Handles of this node's pods and their addresses, as far as this
    /// reserve made or saw them.
    index: HashMap<String, Vec<IpNetwork>>,
    /// Handles whose rename is not written yet (their addresses are still
    /// under a spare handle in the datastore).
    pending: HashSet<String>,
    next_id: u64,
    /// The node's recent pod starts: how many spares to keep.
    demand: Demand,
}

/// Counters (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReserveStats {
    /// Spares ready now.
    pub spares: usize,
    /// Spares wanted now (the recent demand, between the options' depth
    /// and max depth).
    pub target: usize,
    /// Attributions not written yet.
    pub pending: usize,
}

/// The fast path over an [`Allocator`] (cheap to clone). Its three tasks
/// (the writer behind, the refill, the recheck) are owned by the handles:
/// dropping the last one stops them, and writes still queued are dropped
/// as [`Reserve::halt`] drops them ([`Reserve::flush`] first to keep them).
#[derive(Clone, Debug)]
pub struct Reserve {
    alloc: Allocator,
    node: String,
    opts: ReserveOptions,
    state: Arc<Mutex<State>>,
    refill: Arc<Notify>,
    writes: mpsc::UnboundedSender<Write>,
    halted: Arc<std::sync::atomic::AtomicBool>,
    /// The tasks, in the handles given out; `None` in the tasks' own
    /// copies, so that they do not keep themselves running.
    _tasks: Option<Arc<[Owned; 3]>>,
}

/// Tuning of a [`Reserve`].
#[derive(Debug, Clone)]
pub struct ReserveOptions {
    /// Spares kept ready at least (0: no fast path, every ADD assigns
    /// directly).
    pub depth: usize,
    /// Spares kept ready at most, when bursts of pod starts call for more
    /// than `depth` (never below `depth`).
    pub max_depth: usize,
    /// How often spares are re-checked against the pools.
    pub recheck: Duration,
    /// How long a burst of pod starts keeps the spares up before its
    /// peak is halved ([`crate::demand::HOLD`]).
    pub hold: Duration,
    /// How long the write-behind and the refill gather what comes after
    /// their first write, so that the pod starts of that window cost one
    /// write per block (the refill does not wait when half or more of
    /// the spares are gone).
    pub coalesce: Duration,
}

impl Default for ReserveOptions {
    fn default() -> Self {
        Self {
            depth: 8,
            max_depth: 32,
            recheck: Duration::from_secs(3),
            hold: crate::demand::HOLD,
            coalesce: Duration::from_millis(200),
        }
    }
}

impl Reserve {
    /// Starts the reserve for `node`: adopts the spares and pod handles the
    /// datastore already holds for it (run the agent's reconciliation
    /// first), then keeps `depth` spares ready.
    pub async fn start(alloc: Allocator, node: &str, opts: ReserveOptions) -> Result<Self> {
        let prefix = spare_prefix(node);
        let mut held: HashMap<String, Vec<IpNetwork>> = HashMap::new();
        for b in alloc.blocks().await? {
            for (ip, a) in &b.allocations {
                if a.node == node && a.use_ == AllowedUse::Workload {
                    let net = IpNetwork::new(*ip, crate::Family::of_addr(ip).host_prefix())
                        .expect("host prefix");
                    held.entry(a.handle.clone()).or_default().push(net);
                }
            }
        }
        let mut st = State {
            spares: VecDeque::new(),
            index: HashMap::new(),
            pending: HashSet::new(),
            next_id: 0,
            demand: Demand::new(opts.depth, opts.max_depth, opts.hold),
        };
        for (handle, mut addrs) in held {
            addrs.sort();
            if let Some(id) = handle.strip_prefix(&prefix) {
                if let Ok(n) = u64::from_str_radix(id, 16) {
                    st.next_id = st.next_id.max(n + 1);
                }
                st.spares.push_back(Spare { handle, addrs });
            } else {
                st.index.insert(handle, addrs);
            }
        }
        let keep = st.demand.ceiling();
        if st.spares.len() > keep {
            // Fewer wanted now: give the surplus back.
            let extra: Vec<Spare> = st.spares.drain(keep..).collect();
            for s in extra {
                if let Err(e) = alloc.release(&s.handle).await {
                    tracing::debug!(handle = %s.handle, "surplus spare: {e}");
                }
            }
        }
        // What the node kept before is what it needed: kept for a while.
        let adopted = st.spares.len();
        st.demand.seed(adopted.div_ceil(2), Instant::now());
        tracing::info!(
            node,
            spares = st.spares.len(),
            pods = st.index.len(),
            "address reserve adopted"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Self {
            alloc,
            node: node.to_string(),
            opts: opts.clone(),
            state: Arc::new(Mutex::new(st)),
            refill: Arc::new(Notify::new()),
            writes: tx,
            halted: Arc::default(),
            _tasks: None,
        };
        let tasks = [
            Owned::spawn(core.clone().writer(rx)),
            Owned::spawn(core.clone().rechecker(opts.recheck)),
            Owned::spawn(core.clone().refiller()),
        ];
        core.refill.notify_one();
        Ok(Self {
            _tasks: Some(Arc::new(tasks)),
            ..core
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("reserve state")
    }

    /// Spares ready and attributions not written yet.
    pub fn stats(&self) -> ReserveStats {
        let mut st = self.state();
        let target = st.demand.target(Instant::now());
        ReserveStats {
            spares: st.spares.len(),
            target,
            pending: st.pending.len(),
        }
    }

    /// What the reserve knows `handle` holds (including attributions not
    /// written yet).
    pub fn holding(&self, handle: &str) -> Option<Vec<IpNetwork>> {
        self.state().index.get(handle).cloned()
    }

    /// Every pod handle the reserve knows this node holds.
    pub fn handles(&self) -> Vec<String> {
        self.state().index.keys().cloned().collect()
    }

    /// Addresses for `a.handle`: the ones it has (an ADD retried), a spare
    /// (no write waited for), or, with none left, a direct assign.
    /// Operations on one handle must not run concurrently (the caller
    /// serialises them).
    pub async fn take(&self, a: &Assign) -> Result<Taken> {
        let (known, spare) = {
            let mut st = self.state();
            match st.index.get(&a.handle) {
                Some(addrs) if st.pending.contains(&a.handle) => {
                    // Taken from a spare moments ago, not written yet: the
                    // spare handle still holds them for this node.
                    return Ok(Taken {
                        handle: a.handle.clone(),
                        addrs: addrs.clone(),
                        spare: None,
                    });
                }
                Some(_) => (true, None),
                None if a.use_ == AllowedUse::Workload => {
                    st.demand.took(Instant::now());
                    (false, st.spares.pop_front())
                }
                None => (false, None),
            }
        };
        match spare {
            Some(s) => self.take_spare(a, s).await,
            None => self.assign(a, known).await,
        }
    }

    /// A spare for `a`, if the pools still allow exactly it (a pool of
    /// another family added since it was reserved means a pod would miss
    /// that family): checked against the pools the allocator read last
    /// (without waiting for it: it may be waiting on a write the API is
    /// slow to answer, and a spare exists so that a pod need not wait for
    /// one), given back and replaced by a direct assign if not.
    async fn take_spare(&self, a: &Assign, s: Spare) -> Result<Taken> {
        // None: no pools read yet; the spare was valid when made, and the
        // rechecker gives it back if it no longer is.
        let ok = self
            .alloc
            .usable_now(&s.addrs, a.use_, SPARE_CHECK)
            .await
            .unwrap_or(true);
        if !ok {
            tracing::info!(node = %self.node, handle = %s.handle, addrs = ?s.addrs,
                "spare no longer allowed by the pools: giving it back");
            self.queue(Write::Release(s.handle));
            self.refill.notify_one();
            return self.assign(a, false).await;
        }
        {
            let mut st = self.state();
            st.index.insert(a.handle.clone(), s.addrs.clone());
            st.pending.insert(a.handle.clone());
        }
        self.refill.notify_one();
        Ok(Taken {
            handle: a.handle.clone(),
            addrs: s.addrs,
            spare: Some(s.handle),
        })
    }

    /// A direct assign (`known`: the handle was in the index already).
    async fn assign(&self, a: &Assign, known: bool) -> Result<Taken> {
        // Known handles are confirmed against the datastore (a collector
        // may have released them); new ones are assigned directly.
        let addrs = self.alloc.assign(a.clone()).await;
        self.refill.notify_one();
        let mut st = self.state();
        match addrs {
            Ok(addrs) => {
                st.index.insert(a.handle.clone(), addrs.clone());
                Ok(Taken {
                    handle: a.handle.clone(),
                    addrs,
                    spare: None,
                })
            }
            Err(e) => {
                if known {
                    st.index.remove(&a.handle);
                }
                Err(e)
            }
        }
    }

    /// The attribution is durable on the node: write it behind.
    pub fn commit(&self, t: &Taken, pod: Option<PodRef>) {
        if let Some(spare) = &t.spare {
            self.queue(Write::Rename {
                from: spare.clone(),
                to: t.handle.clone(),
                addrs: t.addrs.iter().map(IpNetwork::ip).collect(),
                pod,
            });
        }
    }

    /// The ADD failed and its wiring was rolled back: a spare goes back to
    /// the front of the queue, a direct assign is released now.
    pub async fn abort(&self, t: Taken) -> Result<()> {
        match t.spare {
            Some(spare) => {
                let mut st = self.state();
                st.index.remove(&t.handle);
                st.pending.remove(&t.handle);
                st.spares.push_front(Spare {
                    handle: spare,
                    addrs: t.addrs,
                });
                Ok(())
            }
            None => {
                let pending = {
                    let mut st = self.state();
                    st.index.remove(&t.handle);
                    st.pending.contains(&t.handle)
                };
                if pending {
                    // A retry of an ADD whose rename is still queued: the
                    // release must come after it, so it is queued too.
                    self.queue(Write::Release(t.handle.clone()));
                    Ok(())
                } else {
                    self.alloc.release(&t.handle).await.map(|_| ())
                }
            }
        }
    }

    /// Releases a handle's addresses, written behind (after any rename of
    /// the same handle still queued). Returns what the reserve knew it held.
    pub fn release(&self, handle: &str) -> Vec<IpNetwork> {
        let held = self.state().index.remove(handle).unwrap_or_default();
        self.queue(Write::Release(handle.to_string()));
        held
    }

    /// Stops the background work at once, dropping the writes not done:
    /// what a crash does (for tests of the recovery).
    pub fn halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
        self.refill.notify_one();
        let _ = self.writes.send(Write::Release(String::new()));
    }

    /// Queues a write behind. One the writer can no longer take (it has
    /// ended: halted, or failed) is left to the next start's
    /// reconciliation, and said so unless the reserve was halted.
    fn queue(&self, w: Write) {
        if let Err(mpsc::error::SendError(w)) = self.writes.send(w)
            && !self.is_halted()
        {
            tracing::error!(node = %self.node,
                "the reserve's writer has ended: {w:?} is left to the next start's reconciliation");
        }
    }

    fn is_halted(&self) -> bool {
        self.halted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until every write queued before this call is done.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Write::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn writer(self, mut rx: mpsc::UnboundedReceiver<Write>) {
        while let Some(first) = rx.recv().await {
            if self.is_halted() {
                return;
            }
            let mut batch = vec![first];
            // Coalesced: the writes of the pod starts within the window
            // go out as one write per block (with the refill, which waits
            // as long), not one each: on a busy node the API server and
            // etcd do a fraction of the work, and the CPU they would take
            // from the node's next pod starts stays with them. The kernel
            // records every attribution meanwhile; a flush cuts it short.
            if !matches!(batch[0], Write::Flush(_)) && !self.opts.coalesce.is_zero() {
                let until = tokio::time::Instant::now() + self.opts.coalesce;
                while let Ok(Some(w)) = tokio::time::timeout_at(until, rx.recv()).await {
                    let flush = matches!(w, Write::Flush(_));
                    batch.push(w);
                    if flush {
                        break;
                    }
                }
            }
            while let Ok(w) = rx.try_recv() {
                batch.push(w);
            }
            // Waves: the k-th write of every handle goes out together, so
            // one handle's writes stay in order while different handles'
            // are group-committed.
            let mut flushes = Vec::new();
            let mut waves: Vec<Vec<Write>> = Vec::new();
            let mut seen: HashMap<String, usize> = HashMap::new();
            for w in batch {
                let Some(h) = w.handle().map(str::to_string) else {
                    if let Write::Flush(tx) = w {
                        flushes.push(tx);
                    }
                    continue;
                };
                let k = seen.entry(h).or_insert(0);
                if waves.len() <= *k {
                    waves.push(Vec::new());
                }
                waves[*k].push(w);
                *k += 1;
            }
            for wave in waves {
                futures::future::join_all(wave.into_iter().map(|w| self.write(w))).await;
            }
            for tx in flushes {
                let _ = tx.send(());
            }
        }
    }

    /// One write-behind, retried while the datastore says "try again".
    async fn write(&self, w: Write) {
        match &w {
            Write::Rename { .. } => margay_task::crash::point("write.rename"),
            Write::Release(_) => margay_task::crash::point("write.release"),
            Write::Flush(_) => {}
        }
        let mut delay = Duration::from_millis(50);
        loop {
            if self.is_halted() {
                return;
            }
            let r = match &w {
                Write::Rename {
                    from,
                    to,
                    addrs,
                    pod,
                } => self
                    .alloc
                    .rename(from, to, addrs.clone(), pod.clone())
                    .await
                    .map(|_| ()),
                Write::Release(h) => self.alloc.release(h).await.map(|_| ()),
                Write::Flush(_) => return,
            };
            match r {
                Ok(()) => break,
                Err(Error::Stopped) => return,
                Err(e) if e.is_transient() => {
                    tracing::debug!(node = %self.node, "write-behind {w:?}: {e}; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The kernel still records the attribution; the next
                    // start-up reconciliation (or the collector) settles it.
                    tracing::warn!(node = %self.node, "write-behind {w:?} failed: {e}");
                    break;
                }
            }
        }
        if let Write::Rename { to, .. } = &w {
            self.state().pending.remove(to);
        }
    }

    /// Whether half or more of the spares wanted are ready.
    fn plenty(&self) -> bool {
        let mut st = self.state();
        st.spares.len() * 2 >= st.demand.target(Instant::now())
    }

    /// Keeps the spares at the demand's target: refills as they are taken
    /// (woken by each take), gives back the surplus once demand has
    /// fallen (looked at every recheck period).
    async fn refiller(self) {
        let opts = &self.opts;
        let mut failures = 0u32;
        loop {
            let taken = tokio::select! {
                _ = self.refill.notified() => true,
                _ = tokio::time::sleep(opts.recheck) => false,
            };
            if taken && !opts.coalesce.is_zero() {
                // While half or more are left, the takes of the next
                // moments are refilled together (and with their renames),
                // in one write per block; a take that leaves fewer ends
                // the wait.
                let until = tokio::time::Instant::now() + opts.coalesce;
                while self.plenty() {
                    tokio::select! {
                        _ = self.refill.notified() => {}
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
            }
            if self.is_halted() {
                return;
            }
            let (need, ids, surplus) = {
                let mut st = self.state();
                let target = st.demand.target(Instant::now());
                let need = target.saturating_sub(st.spares.len());
                let keep = target.min(st.spares.len());
                let surplus: Vec<Spare> = st.spares.drain(keep..).collect();
                let first = st.next_id;
                st.next_id += need as u64;
                (need, first, surplus)
            };
            if !surplus.is_empty() {
                tracing::info!(node = %self.node, given_back = surplus.len(),
                    "fewer pod starts lately: spare addresses given back");
            }
            for s in surplus {
                self.queue(Write::Release(s.handle));
            }
            if need == 0 {
                continue;
            }
            let prefix = spare_prefix(&self.node);
            let asks = (0..need as u64).map(|i| {
                let handle = format!("{prefix}{:x}", ids + i);
                let alloc = self.alloc.clone();
                async move {
                    let r = alloc
                        .assign(Assign {
                            handle: handle.clone(),
                            pod: None,
                            use_: AllowedUse::Workload,
                        })
                        .await;
                    (handle, r)
                }
            });
            let mut failed = None;
            for (handle, r) in futures::future::join_all(asks).await {
                match r {
                    Ok(addrs) => self.state().spares.push_back(Spare { handle, addrs }),
                    Err(e) => failed = Some(e),
                }
            }
            match failed {
                None => failures = 0,
                Some(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::info!(node = %self.node, "no spare addresses: {e}");
                    }
                    let wait = Duration::from_millis(200 << failures.min(7));
                    tokio::time::sleep(wait).await;
                    self.refill.notify_one();
                }
            }
        }
    }

    /// Gives back spares the pools no longer allow (its own task, so the
    /// refill never waits for it).
    async fn rechecker(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.is_halted() {
                return;
            }
            let spares: Vec<Spare> = self.state().spares.iter().cloned().collect();
            if spares.is_empty() {
                continue;
            }
            let sets = spares.iter().map(|s| s.addrs.clone()).collect();
            let verdicts = match self.alloc.usable(sets, AllowedUse::Workload).await {
                Ok(v) => v,
                Err(Error::Stopped) => return,
                Err(e) => {
                    tracing::debug!("spare recheck: {e}");
                    continue;
                }
            };
            for (s, ok) in spares.into_iter().zip(verdicts) {
                if ok {
                    continue;
                }
                let removed = {
                    let mut st = self.state();
                    let before = st.spares.len();
                    st.spares.retain(|x| x.handle != s.handle);
                    st.spares.len() != before
                };
                if removed {
                    tracing::info!(node = %self.node, handle = %s.handle, addrs = ?s.addrs,
                        "spare no longer allowed by the pools: giving it back");
                    self.queue(Write::Release(s.handle));
                }
            }
        }
    }
}
