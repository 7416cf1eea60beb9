//! Tasks the speaker owns: [`Owned`] (from `margay-task`), a handle that
//! aborts its task when dropped, so nothing the speaker starts (a timer, a
//! helper, the kernel connection) outlives what it belongs to.

pub use margay_task::Owned;
