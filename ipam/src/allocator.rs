//! The per-node allocator: one task owns the node's view of the blocks and
//! serves assign/release requests in batches.
//!
//! Group commit: every request waiting when the task is free is planned
//! together, so a burst of N pod starts on a node costs about one write per
//! block touched instead of N. The view changes only after a write
//! succeeded (or after re-reading the store); a conflict re-reads the one
//! block and plans the affected requests again, at most
//! [`Options::max_rounds`] times, then answers `Busy`.
//!
//! The view: with a store that follows its blocks by a watch
//! ([`Store::block_feed`]: the Kubernetes store of a node), the view is
//! the watch's first list kept current by its changes, with the writes and
//! reads of this allocator the watch has not shown yet kept over it
//! ([`crate::ahead`]). Nothing is listed again: not after a failure, not
//! before answering `Exhausted` (the watch's pending changes are taken in
//! first); only when the watch is broken (stale) is everything listed
//! before saying no, as without a watch. A stale view only ever picks
//! candidates: every address and block it offers is taken by a
//! compare-and-swap on the version it was read at. Without a watch the
//! view is listed at start, before answering `Exhausted`, and after a
//! failure left it unknown.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use margay_task::Owned;
use tokio::sync::{mpsc, oneshot};

use crate::ahead::{Ahead, Version};
use crate::crd::{AllowedUse, IPAMConfigurationSpec};
use crate::model::{Block, Family, Pool, validate_pools};
use crate::plan::{Claim, Context, Op, Outcome, View, plan};
use crate::store::{BlockChange, BlockFeed, Store};
use crate::{Assign, Error, Result, now_rfc3339};

/// How long the first use of the view waits for a watch's first list (an
/// agent just started) before listing the blocks itself.
const FEED_FIRST_LIST: Duration = Duration::from_secs(5);

/// Tuning of the allocator task.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most requests planned together.
    pub max_batch: usize,
    /// Most planning rounds for one batch before answering `Busy`.
    pub max_rounds: usize,
    /// How often empty blocks are looked at.
    pub maintenance_every: Duration,
    /// Requests that may wait in the queue.
    pub queue: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_batch: 512,
            max_rounds: 64,
            maintenance_every: Duration::from_secs(10),
            queue: 4096,
        }
    }
}

enum Job {
    Op(Op, oneshot::Sender<Result<Outcome>>),
    Maintain(oneshot::Sender<Result<Vec<String>>>),
    Blocks(oneshot::Sender<Result<Vec<Block>>>),
    Holding(String, oneshot::Sender<Result<Vec<IpNetwork>>>),
    Usable(
        Vec<Vec<IpNetwork>>,
        AllowedUse,
        oneshot::Sender<Result<Vec<bool>>>,
    ),
}

/// Counters of an allocator's work (for metrics and tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches served.
    pub batches: AtomicU64,
    /// Operations served.
    pub ops: AtomicU64,
    /// Block writes that succeeded (claims included).
    pub writes: AtomicU64,
    /// Compare-and-swap writes or claims that lost to another writer.
    pub conflicts: AtomicU64,
    /// Requests answered `Busy` after the retry bound.
    pub busy: AtomicU64,
    /// Notified when this node claims or adopts a block.
    pub claimed: tokio::sync::Notify,
}

/// A copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Batches served.
    pub batches: u64,
    /// Operations served.
    pub ops: u64,
    /// Block writes that succeeded.
    pub writes: u64,
    /// Writes that lost to another writer.
    pub conflicts: u64,
    /// Requests answered `Busy`.
    pub busy: u64,
}

/// Handle to a node's allocator task (cheap to clone). The task is owned
/// by the handles: it is aborted when the last one is dropped (a write in
/// flight then may or may not have happened, as after a crash; the store's
/// compare-and-swap and the next start's reads settle it). A task that has
/// ended (a panic) answers every request [`Error::Stopped`], never a hang.
#[derive(Clone, Debug)]
pub struct Allocator {
    tx: mpsc::Sender<Job>,
    stats: Arc<Stats>,
    seen: Seen,
    read: ReadInputs,
    _task: Arc<Owned>,
}

/// The pools, configuration and node labels read last (`None`: none read
/// yet), shared so that a question about them needs no turn of the actor
/// (which may be waiting on a write).
type Seen = Arc<std::sync::Mutex<Option<Arc<Inputs>>>>;

/// Reads the inputs from the store, beside the actor (a store that
/// follows them by watches answers from memory).
#[derive(Clone)]
struct ReadInputs(
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<Inputs>>> + Send + Sync>,
);

impl std::fmt::Debug for ReadInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadInputs")
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Op(op, _) => write!(f, "Op({op:?})"),
            Job::Maintain(_) => write!(f, "Maintain"),
            Job::Blocks(_) => write!(f, "Blocks"),
            Job::Holding(h, _) => write!(f, "Holding({h})"),
            Job::Usable(a, _, _) => write!(f, "Usable({a:?})"),
        }
    }
}

impl Allocator {
    /// Sends the actor `job` (made with the channel of its answer) and
    /// waits for the answer; [`Error::Stopped`] when the actor is gone.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(job(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Starts the allocator task for `node` on the current runtime.
    pub fn start<S: Store>(store: Arc<S>, node: &str, opts: Options) -> Self {
        let (tx, rx) = mpsc::channel(opts.queue);
        let stats = Arc::new(Stats::default());
        let seen = Seen::default();
        let read: ReadInputs = {
            // Weak: the store is the task's (it ends with the task).
            let (store, node, seen) = (Arc::downgrade(&store), node.to_string(), seen.clone());
            ReadInputs(Arc::new(move || {
                let (store, node, seen) = (store.upgrade(), node.clone(), seen.clone());
                Box::pin(async move {
                    let store = store.ok_or(Error::Stopped)?;
                    read_inputs(&*store, &node, &seen).await
                })
            }))
        };
        let actor = Actor {
            stats: stats.clone(),
            seen: seen.clone(),
            feed: store.block_feed(),
            ahead: Ahead::default(),
            store,
            node: node.to_string(),
            view: None,
            empty_since: HashMap::new(),
            opts,
            jitter: 0x9e37_79b9_7f4a_7c15 ^ node.len() as u64,
        };
        Self {
            tx,
            stats,
            seen,
            read,
            _task: Arc::new(Owned::spawn(actor.run(rx))),
        }
    }

    /// Returns once this node has claimed or adopted a block since the
    /// last call returned (one waiter: the node's block routes).
    pub async fn block_claimed(&self) {
        self.stats.claimed.notified().await;
    }

    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            batches: g(&self.stats.batches),
            ops: g(&self.stats.ops),
            writes: g(&self.stats.writes),
            conflicts: g(&self.stats.conflicts),
            busy: g(&self.stats.busy),
        }
    }

    async fn call(&self, op: Op) -> Result<Outcome> {
        self.ask(|tx| Job::Op(op, tx)).await
    }

    /// Addresses for a handle: one per family with a usable pool. Asking
    /// again with the same handle returns the same addresses.
    pub async fn assign(&self, req: Assign) -> Result<Vec<IpNetwork>> {
        match self.call(Op::Assign(req)).await? {
            Outcome::Assigned(v) => Ok(v),
            o => unreachable!("assign answered {o:?}"),
        }
    }

    /// Releases a handle's addresses; releasing what is not held succeeds.
    pub async fn release(&self, handle: &str) -> Result<Vec<IpAddr>> {
        match self
            .call(Op::Release {
                handle: handle.to_string(),
            })
            .await?
        {
            Outcome::Released(v) => Ok(v),
            o => unreachable!("release answered {o:?}"),
        }
    }

    /// Moves addresses `addrs` from handle `from` to handle `to` (with the
    /// pod): attributes a pre-assigned address. Retrying a rename that
    /// already happened succeeds.
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        addrs: Vec<IpAddr>,
        pod: Option<crate::crd::PodRef>,
    ) -> Result<Vec<IpAddr>> {
        match self
            .call(Op::Rename {
                from: from.to_string(),
                to: to.to_string(),
                addrs,
                pod,
            })
            .await?
        {
            Outcome::Renamed(v) => Ok(v),
            o => unreachable!("rename answered {o:?}"),
        }
    }

    /// For each set of addresses handed out earlier, whether it could be
    /// handed out now for `use_`: one per family that has a usable pool,
    /// each inside a pool that is enabled and selects this node.
    pub async fn usable(&self, addrs: Vec<Vec<IpNetwork>>, use_: AllowedUse) -> Result<Vec<bool>> {
        self.ask(|tx| Job::Usable(addrs, use_, tx)).await
    }

    /// [`Allocator::usable`] for one set of addresses, without a turn of
    /// the allocator's task (which may be waiting on a write the API
    /// server is slow to answer): the pools are read from the store
    /// beside it (from memory when the store follows them by watches),
    /// for at most `within`; past that, or when the store cannot say, the
    /// pools read last answer (`None`: none were ever read). The
    /// pod-start fast path asks this.
    pub async fn usable_now(
        &self,
        addrs: &[IpNetwork],
        use_: AllowedUse,
        within: Duration,
    ) -> Option<bool> {
        let inputs = match tokio::time::timeout(within, (self.read.0)()).await {
            Ok(Ok(i)) => i,
            _ => self.seen.lock().expect("seen inputs").clone()?,
        };
        Some(usable_for(&inputs, addrs, use_))
    }

    /// What the allocator's view says `handle` holds (no store access).
    pub async fn holding(&self, handle: &str) -> Result<Vec<IpNetwork>> {
        self.ask(|tx| Job::Holding(handle.to_string(), tx)).await
    }

    /// Runs block maintenance now; returns the blocks released.
    pub async fn release_empty_blocks(&self) -> Result<Vec<String>> {
        self.ask(Job::Maintain).await
    }

    /// The allocator's current view of every block. An error when the
    /// view cannot be had (never an empty list standing in for one:
    /// callers derive kernel routes and BGP advertisements from it).
    pub async fn blocks(&self) -> Result<Vec<Block>> {
        self.ask(Job::Blocks).await
    }
}

struct Actor<S> {
    stats: Arc<Stats>,
    seen: Seen,
    store: Arc<S>,
    node: String,
    view: Option<View>,
    /// The watch that keeps the view, when the store has one.
    feed: Option<BlockFeed>,
    /// What the view holds from the store itself, ahead of the watch.
    ahead: Ahead,
    empty_since: HashMap<String, Instant>,
    opts: Options,
    jitter: u64,
}

/// The next change of `feed`, or never without one.
async fn next_change(feed: &mut Option<BlockFeed>) -> Option<BlockChange> {
    match feed {
        Some(f) => f.next().await,
        None => std::future::pending().await,
    }
}

/// A block's version as the view compares them.
fn version_of(b: &Block) -> String {
    b.version.clone().unwrap_or_default()
}

#[derive(Debug)]
struct Inputs {
    pools: Vec<Pool>,
    config: IPAMConfigurationSpec,
    labels: BTreeMap<String, String>,
}

/// The pools, configuration and node labels now, kept in `seen` for
/// [`Allocator::usable_now`].
async fn read_inputs<S: Store>(store: &S, node: &str, seen: &Seen) -> Result<Arc<Inputs>> {
    let (pools, problems) = validate_pools(&store.pools().await?);
    for p in problems {
        tracing::debug!(pool = %p.pool, reason = p.reason, "pool not used: {}", p.message);
    }
    let inputs = Arc::new(Inputs {
        pools,
        config: store.config().await?,
        labels: store.node_labels(node).await?,
    });
    *seen.lock().expect("seen inputs") = Some(inputs.clone());
    Ok(inputs)
}

/// See [`Allocator::usable`].
fn usable_for(inputs: &Inputs, addrs: &[IpNetwork], use_: AllowedUse) -> bool {
    let ok = |p: &&Pool| p.usable(&inputs.labels, use_);
    let families: BTreeSet<Family> = inputs.pools.iter().filter(ok).map(Pool::family).collect();
    let have: BTreeSet<Family> = addrs.iter().map(Family::of).collect();
    families == have
        && addrs.len() == have.len()
        && addrs.iter().all(|a| {
            inputs
                .pools
                .iter()
                .filter(ok)
                .any(|p| p.cidr.contains(a.ip()))
        })
}

impl<S: Store> Actor<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        // The first maintenance is one period in (the inputs are still
        // being listed at start).
        let every = self.opts.maintenance_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                job = rx.recv() => {
                    let Some(first) = job else { break };
                    let mut batch = vec![first];
                    while batch.len() < self.opts.max_batch {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    self.serve(batch).await;
                }
                change = next_change(&mut self.feed) => self.follow(change).await,
                _ = tick.tick() => {
                    if let Err(e) = self.maintain().await {
                        tracing::warn!(node = %self.node, "block maintenance: {e}");
                    }
                }
            }
        }
    }

    /// Takes a change of the watch into the view (the watch ended for
    /// good: the view is listed as without one from now on).
    async fn follow(&mut self, change: Option<BlockChange>) {
        let Some(change) = change else {
            tracing::warn!(node = %self.node, "the blocks' watch ended; listing them from now on");
            self.feed = None;
            return;
        };
        let Some(view) = self.view.as_mut() else {
            // Not loaded yet: only a whole list makes a view.
            if let BlockChange::Listed(blocks) = change {
                self.view = Some(View::new(blocks));
            }
            return;
        };
        match change {
            BlockChange::Listed(blocks) => {
                let listed: HashMap<String, String> = blocks
                    .iter()
                    .map(|b| (b.name.clone(), version_of(b)))
                    .collect();
                let again = self.ahead.relisted(|n| listed.get(n).cloned());
                let mut new = View::new(blocks);
                for name in &again {
                    match view.get(name) {
                        Some(b) => new.insert(b.clone()),
                        None => {
                            new.remove(name);
                        }
                    }
                }
                *view = new;
                tracing::debug!(node = %self.node, blocks = view.len(), ahead = again.len(), "blocks listed by the watch");
                for name in again {
                    if let Err(e) = self.refresh(&name).await {
                        tracing::debug!("refresh {name}: {e}");
                    }
                }
            }
            BlockChange::Put(b) => {
                if self.ahead.shown(&b.name, Some(version_of(&b))) {
                    view.insert(b);
                }
            }
            BlockChange::Gone(name) => {
                if self.ahead.shown(&name, None) {
                    view.remove(&name);
                }
            }
        }
    }

    /// Takes in every change the watch has handed on already.
    async fn catch_up(&mut self) {
        while let Some(c) = self.feed.as_mut().and_then(BlockFeed::try_next) {
            self.follow(Some(c)).await;
        }
    }

    /// The view may be older than the store: make it as current as can be
    /// before a "no". With a current watch, its pending changes are taken
    /// in; without one, or while it is broken, every block is listed.
    async fn reload(&mut self) -> Result<()> {
        match self.feed.as_ref().map(BlockFeed::stale) {
            Some(None) => {
                self.catch_up().await;
                Ok(())
            }
            None => {
                self.view = None;
                Ok(())
            }
            Some(Some(why)) => {
                tracing::debug!(node = %self.node, "the blocks' watch is stale ({why}): listing them");
                let blocks = self.store.list_blocks().await?;
                let Some(view) = self.view.as_mut() else {
                    self.view = Some(View::new(blocks));
                    return Ok(());
                };
                // The list is newer than the watch: every block it shows
                // otherwise is ahead of the watch now.
                let new = View::new(blocks);
                let names: HashSet<String> = view
                    .blocks()
                    .chain(new.blocks())
                    .map(|b| b.name.clone())
                    .collect();
                for name in names {
                    let now = new.get(&name).map(version_of);
                    let viewed = view.get(&name).map(version_of);
                    if self.ahead.on(&name) || now != viewed {
                        self.ahead.ours(&name, now, viewed);
                    }
                }
                *view = new;
                Ok(())
            }
        }
    }

    /// After a failure that leaves a block's state unknown: without a
    /// watch the whole view is listed again; a watch keeps it (its
    /// compare-and-swap writes tell a stale copy).
    fn unsure(&mut self) {
        if self.feed.is_none() {
            self.view = None;
        }
    }

    async fn serve(&mut self, batch: Vec<Job>) {
        self.catch_up().await;
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        let mut other = Vec::new();
        for job in batch {
            match job {
                Job::Op(op, tx) => {
                    ops.push(op);
                    replies.push(tx);
                }
                j => other.push(j),
            }
        }
        if !ops.is_empty() {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .ops
                .fetch_add(ops.len() as u64, Ordering::Relaxed);
            let t0 = Instant::now();
            let writes0 = self.stats.writes.load(Ordering::Relaxed);
            let results = self.execute(&ops).await;
            tracing::debug!(
                node = %self.node,
                ops = ops.len(),
                writes = self.stats.writes.load(Ordering::Relaxed) - writes0,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "batch served"
            );
            for (tx, r) in replies.into_iter().zip(results) {
                let _ = tx.send(r);
            }
        }
        for job in other {
            match job {
                Job::Maintain(tx) => {
                    let _ = tx.send(self.maintain().await);
                }
                Job::Blocks(tx) => {
                    let blocks = self.view().await.map(|v| v.blocks().cloned().collect());
                    let _ = tx.send(blocks);
                }
                Job::Holding(handle, tx) => {
                    let held = self.view().await.map(|v| {
                        let mut out: Vec<IpNetwork> = v
                            .holding(&handle)
                            .iter()
                            .map(|(_, ip)| {
                                IpNetwork::new(*ip, Family::of_addr(ip).host_prefix())
                                    .expect("host prefix")
                            })
                            .collect();
                        out.sort();
                        out
                    });
                    let _ = tx.send(held);
                }
                Job::Usable(addrs, use_, tx) => {
                    let _ = tx.send(
                        self.inputs()
                            .await
                            .map(|i| addrs.iter().map(|a| usable_for(&i, a, use_)).collect()),
                    );
                }
                Job::Op(..) => unreachable!("ops were taken out"),
            }
        }
    }

    async fn view(&mut self) -> Result<&mut View> {
        if self.view.is_none()
            && let Some(feed) = self.feed.as_mut()
        {
            // The watch's first list (the agent just started).
            let first = tokio::time::timeout(FEED_FIRST_LIST, async {
                loop {
                    match feed.next().await {
                        Some(BlockChange::Listed(blocks)) => return Some(blocks),
                        Some(_) => {}
                        None => return None,
                    }
                }
            });
            match first.await {
                Ok(Some(blocks)) => self.view = Some(View::new(blocks)),
                Ok(None) => self.feed = None,
                Err(_) => tracing::debug!(node = %self.node, "no list from the blocks' watch yet"),
            }
        }
        if self.view.is_none() {
            let blocks = self.store.list_blocks().await?;
            self.view = Some(View::new(blocks));
        }
        Ok(self.view.as_mut().expect("just loaded"))
    }

    async fn inputs(&self) -> Result<Arc<Inputs>> {
        read_inputs(&*self.store, &self.node, &self.seen).await
    }

    /// Puts what the store said about block `name` into the view (if the
    /// view is loaded; otherwise the next round lists everything anyway),
    /// ahead of the watch until it shows the same.
    fn put(&mut self, block: Option<Block>, name: &str) {
        if let Some(view) = self.view.as_mut() {
            if self.feed.is_some() {
                let now: Version = block.as_ref().map(version_of);
                self.ahead.ours(name, now, view.get(name).map(version_of));
            }
            match block {
                Some(b) => view.insert(b),
                None => {
                    view.remove(name);
                }
            }
        }
    }

    /// Re-reads one block into the view.
    async fn refresh(&mut self, name: &str) -> Result<()> {
        let fresh = self.store.get_block(name).await?;
        self.put(fresh, name);
        Ok(())
    }

    async fn backoff(&mut self, round: usize) {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let cap = 1u64 << round.min(6);
        let ms = self.jitter % (cap + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn execute(&mut self, ops: &[Op]) -> Vec<Result<Outcome>> {
        let mut results: Vec<Option<Result<Outcome>>> = vec![None; ops.len()];
        let mut pending: Vec<usize> = (0..ops.len()).collect();
        let mut full_reload_done = false;
        let mut round = 0;
        // Blocks that lost a compare-and-swap: re-read right before the
        // next plan (after the back-off, not before it, or the copy would
        // be stale again by the time it is written).
        let mut stale: Vec<String> = Vec::new();
        while !pending.is_empty() && round < self.opts.max_rounds {
            round += 1;
            for name in std::mem::take(&mut stale) {
                if self.refresh(&name).await.is_err() {
                    self.unsure();
                }
            }
            let inputs = match self.inputs().await {
                Ok(i) => i,
                Err(e) => {
                    for i in pending.drain(..) {
                        results[i] = Some(Err(e.clone()));
                    }
                    break;
                }
            };
            if let Err(e) = self.view().await {
                self.view = None;
                for i in pending.drain(..) {
                    results[i] = Some(Err(e.clone()));
                }
                break;
            }
            if round == 1 {
                // An assign for a handle the view says already has
                // addresses: confirm against the store before answering
                // (a collector may have released them since).
                let mut holding: HashSet<String> = HashSet::new();
                let view = self.view.as_ref().expect("loaded");
                for &i in &pending {
                    if let Op::Assign(a) = &ops[i] {
                        holding.extend(view.holding(&a.handle).iter().map(|(b, _)| b.clone()));
                    }
                }
                for name in holding {
                    if let Err(e) = self.refresh(&name).await {
                        tracing::debug!("refresh {name}: {e}");
                    }
                }
            }
            let now = now_rfc3339();
            let ctx = Context {
                node: &self.node,
                labels: &inputs.labels,
                pools: &inputs.pools,
                config: &inputs.config,
                now: &now,
            };
            let refs: Vec<(usize, &Op)> = pending.iter().map(|&i| (i, &ops[i])).collect();
            let view = self.view.as_ref().expect("loaded");
            let p = plan(ctx, view, &refs);
            let mut next: Vec<usize> = p.waiting.clone();
            let mut contended = false;

            if let Some(claim) = &p.claim
                && self.claim(claim).await.is_err()
            {
                contended = true;
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                stale.push(claim.block().name.clone());
            }

            // All block writes of the round go out together.
            let writes = p.writes.values().map(|b| self.store.update_block(b));
            let answers = futures::future::join_all(writes).await;
            let mut written: HashSet<String> = HashSet::new();
            let mut broken: HashMap<String, Error> = HashMap::new();
            for (b, answer) in p.writes.values().zip(answers) {
                match answer {
                    Ok(nb) => {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                        written.insert(nb.name.clone());
                        self.put(Some(nb), &b.name);
                    }
                    Err(Error::Conflict(_) | Error::NotFound(_)) => {
                        contended = true;
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        stale.push(b.name.clone());
                    }
                    Err(e @ Error::Unavailable(_)) => {
                        // Did it apply? Read back and compare.
                        match self.store.get_block(&b.name).await {
                            Ok(Some(cur))
                                if cur.allocations == b.allocations && cur.node == b.node =>
                            {
                                written.insert(cur.name.clone());
                                self.put(Some(cur), &b.name);
                            }
                            Ok(cur) => {
                                self.put(cur, &b.name);
                                contended = true;
                            }
                            Err(_) => {
                                self.unsure();
                                broken.insert(b.name.clone(), e);
                            }
                        }
                    }
                    Err(e) => {
                        broken.insert(b.name.clone(), e);
                    }
                }
            }

            let mut reload = false;
            for (i, outcome) in p.done {
                match outcome {
                    // The view may be stale (other nodes freed or deleted
                    // blocks): read everything again before saying no.
                    Err(Error::Exhausted { .. }) if !full_reload_done => {
                        next.push(i);
                        reload = true;
                    }
                    Err(e) => results[i] = Some(Err(e)),
                    Ok(o) => {
                        let deps = p.depends.get(&i).map(Vec::as_slice).unwrap_or(&[]);
                        if let Some(e) = deps.iter().find_map(|d| broken.get(d)) {
                            results[i] = Some(Err(e.clone()));
                        } else if deps.iter().all(|d| written.contains(d)) {
                            results[i] = Some(Ok(o));
                        } else {
                            next.push(i);
                        }
                    }
                }
            }
            if reload {
                full_reload_done = true;
                if let Err(e) = self.reload().await {
                    for i in next.drain(..) {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
            next.sort_unstable();
            next.dedup();
            pending = next;
            if contended && !pending.is_empty() {
                self.backoff(round).await;
            }
        }
        let n = pending.len();
        self.stats.busy.fetch_add(n as u64, Ordering::Relaxed);
        for i in pending {
            results[i] = Some(Err(Error::Busy(format!(
                "{n} request(s) still conflicting after {} rounds",
                self.opts.max_rounds
            ))));
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    /// Claims a block; on failure (someone else got there first) the
    /// store's error: the block is to be re-read.
    async fn claim(&mut self, claim: &Claim) -> Result<()> {
        let res = match claim {
            Claim::Create(b) => self.store.create_block(b).await,
            Claim::Adopt(b) => self.store.update_block(b).await,
        };
        let name = &claim.block().name;
        match res {
            Ok(b) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats.claimed.notify_one();
                tracing::info!(node = %self.node, block = %b.cidr, "claimed block");
                self.put(Some(b.clone()), &b.name);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(node = %self.node, block = %name, "claim failed: {e}");
                Err(e)
            }
        }
    }

    /// Releases this node's blocks that have been empty for the grace
    /// period, keeping at least one per family in a usable pool.
    async fn maintain(&mut self) -> Result<Vec<String>> {
        let inputs = self.inputs().await?;
        let node = self.node.clone();
        let grace = Duration::from_secs(inputs.config.empty_block_grace_seconds);
        let now = Instant::now();
        let view = self.view().await?;
        let own: Vec<Block> = view
            .blocks()
            .filter(|b| b.node.as_deref() == Some(node.as_str()))
            .cloned()
            .collect();
        let live: HashSet<&str> = own.iter().map(|b| b.name.as_str()).collect();
        self.empty_since.retain(|k, _| live.contains(k.as_str()));
        let usable = |b: &Block| {
            inputs
                .pools
                .iter()
                .any(|p| p.owns(b) && p.usable(&inputs.labels, crate::crd::AllowedUse::Workload))
        };
        let mut kept: HashMap<Family, usize> = HashMap::new();
        for b in own.iter().filter(|b| usable(b)) {
            *kept.entry(b.family()).or_default() += 1;
        }
        let mut released = Vec::new();
        for b in &own {
            if !b.is_empty() {
                self.empty_since.remove(&b.name);
                continue;
            }
            let since = *self.empty_since.entry(b.name.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                continue;
            }
            let in_use_pool = usable(b);
            if in_use_pool && kept.get(&b.family()).copied().unwrap_or(0) <= 1 {
                continue;
            }
            let version = b.version.clone().unwrap_or_default();
            match self.store.delete_block(&b.name, &version).await {
                Ok(()) => {
                    tracing::info!(node = %self.node, block = %b.cidr, "released empty block");
                    if in_use_pool {
                        *kept.get_mut(&b.family()).expect("counted") -= 1;
                    }
                    self.put(None, &b.name);
                    self.empty_since.remove(&b.name);
                    released.push(b.name.clone());
                }
                Err(Error::Conflict(_) | Error::NotFound(_) | Error::Unavailable(_)) => {
                    self.refresh(&b.name).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }
}
