//! Owned tasks: a handle that aborts its task when dropped, so nothing a
//! value starts outlives it (holo's task handles are the model).
//!
//! This is the one place that calls `tokio::spawn`: `clippy.toml` forbids
//! it everywhere else, so a task is either an [`Owned`] kept by what it
//! works for (an allocator handle, a reserve, a netlink handle) or in a
//! `JoinSet` its owner holds and joins (the agent's tasks, a server's
//! connections). A task that must notice its owner's end needs nothing
//! more: it is aborted at its next await.

use std::future::Future;

pub mod crash;

/// A spawned task, aborted when this handle is dropped.
#[derive(Debug)]
pub struct Owned(tokio::task::JoinHandle<()>);

impl Owned {
    /// Spawns `f` on the current runtime (panics outside one, as
    /// `tokio::spawn` does).
    pub fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Self {
        #[allow(clippy::disallowed_methods)] // the owner type itself
        Self(tokio::spawn(f))
    }

    /// Whether the task has ended: returned, panicked or aborted.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_handle_ends_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = Owned::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        drop(task);
        // The task's sender is dropped with it.
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn a_task_that_ends_is_seen_as_finished() {
        let task = Owned::spawn(async {});
        while !task.is_finished() {
            tokio::task::yield_now().await;
        }
    }
}
