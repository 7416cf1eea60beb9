//! Tasks the speaker owns: a handle that aborts its task when dropped, so
//! nothing the speaker starts (a timer, a helper) outlives what it belongs
//! to (holo's task handles are the model).

use std::future::Future;

/// A spawned task, aborted when this handle is dropped.
#[derive(Debug)]
pub struct Owned(tokio::task::JoinHandle<()>);

impl Owned {
    /// Spawns `f` on the current runtime.
    pub fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(f))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}
