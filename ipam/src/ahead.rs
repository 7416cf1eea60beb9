//! What the allocator knows ahead of the watch that keeps its view.
//!
//! With a [`crate::store::BlockFeed`] the allocator's view follows a watch
//! of the blocks, which lags: a block the allocator has just written, or
//! read back, can still come by in older versions. Taking those would put
//! an older state in the view: its own allocations would go missing (an
//! ADD retried with the same handle would be planned another address in
//! another block), blocks it claimed would look free. So for each block
//! whose state the allocator learnt from the store directly, [`Ahead`]
//! keeps the version the view holds until the watch shows that same
//! version; the watch's changes to that block before then are older, and
//! are not applied.
//!
//! Versions (resourceVersions) are compared for equality only: they are
//! opaque. A watch shows every version of an object, in order, so the
//! one awaited comes by, unless the watch starts over with a list; then
//! the list says what the watch shows from there on and the blocks still
//! ahead of it are read again ([`Ahead::relisted`]), whose answer the
//! watch shows later (it was read after the list) or already shows.
//!
//! None of this is needed for safety (every write is a compare-and-swap
//! on the version it was planned from: a stale view costs a conflict and
//! a re-read), only for answers: a view never goes back on what this
//! allocator was told by the store.

use std::collections::HashMap;

/// A block's version; `None`: no such block.
pub(crate) type Version = Option<String>;

/// The blocks the allocator's view is ahead of its watch on.
#[derive(Debug, Default)]
pub(crate) struct Ahead {
    blocks: HashMap<String, Lag>,
}

#[derive(Debug)]
struct Lag {
    /// What the view holds (from the store).
    mine: Version,
    /// The last the watch showed.
    shown: Version,
}

impl Ahead {
    /// The store answered `now` for block `name` (a write's result, a
    /// read) and the view takes it; `viewed` is what the view held, which
    /// is what the watch showed last unless the block is ahead already.
    pub(crate) fn ours(&mut self, name: &str, now: Version, viewed: Version) {
        match self.blocks.get_mut(name) {
            Some(l) if l.shown == now => {
                self.blocks.remove(name);
            }
            Some(l) => l.mine = now,
            None if viewed == now => {}
            None => {
                self.blocks.insert(
                    name.to_string(),
                    Lag {
                        mine: now,
                        shown: viewed,
                    },
                );
            }
        }
    }

    /// The watch shows `now` for block `name`: whether the view takes it.
    pub(crate) fn shown(&mut self, name: &str, now: Version) -> bool {
        let Some(l) = self.blocks.get_mut(name) else {
            return true;
        };
        if l.mine == now {
            self.blocks.remove(name);
            true
        } else {
            l.shown = now;
            false
        }
    }

    /// The watch started over with a list, which holds `listed(name)` of
    /// each block: the blocks still ahead of it (their copy in the view is
    /// kept; read them again).
    pub(crate) fn relisted(&mut self, listed: impl Fn(&str) -> Version) -> Vec<String> {
        self.blocks.retain(|name, l| {
            l.shown = listed(name);
            l.shown != l.mine
        });
        let mut out: Vec<String> = self.blocks.keys().cloned().collect();
        out.sort();
        out
    }

    /// Whether the view is ahead of the watch on block `name`.
    pub(crate) fn on(&self, name: &str) -> bool {
        self.blocks.contains_key(name)
    }

    /// How many blocks the view is ahead on.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Some(s.to_string())
    }

    #[test]
    fn the_watchs_older_versions_of_a_block_written_are_skipped_until_it_shows_the_write() {
        let mut a = Ahead::default();
        // The view has b at 3 (from the watch); the allocator writes 5.
        a.ours("b", v("5"), v("3"));
        assert!(a.on("b"));
        // Someone else's write at 4 comes by first: older, skipped.
        assert!(!a.shown("b", v("4")));
        // The write itself: taken, in step again.
        assert!(a.shown("b", v("5")));
        assert!(!a.on("b"));
        // Later versions are taken as they come.
        assert!(a.shown("b", v("6")));
    }

    #[test]
    fn an_answer_the_watch_already_showed_is_not_ahead() {
        let mut a = Ahead::default();
        a.ours("b", v("3"), v("3"));
        assert_eq!(a.len(), 0);
        // Ahead at 5; the watch starts over with a list holding 7 (another
        // writer's); read again, the store answers 7 too: in step.
        a.ours("b", v("5"), v("3"));
        assert_eq!(a.relisted(|_| v("7")), vec!["b".to_string()]);
        a.ours("b", v("7"), v("5"));
        assert!(!a.on("b"));
    }

    #[test]
    fn deletions_and_blocks_made_again() {
        let mut a = Ahead::default();
        // The allocator deleted b (the view had 3).
        a.ours("b", None, v("3"));
        assert!(!a.shown("b", v("3")));
        assert!(a.shown("b", None));
        // Someone deleted c, the allocator claimed it again at 9 before
        // the watch showed the deletion.
        a.ours("c", v("9"), v("2"));
        assert!(!a.shown("c", None));
        assert!(a.shown("c", v("9")));
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn a_new_list_settles_what_it_shows_and_names_the_blocks_to_read_again() {
        let mut a = Ahead::default();
        a.ours("b", v("5"), v("3"));
        a.ours("c", v("7"), v("6"));
        a.ours("d", None, v("1"));
        // The list was read after b's write, before c's; d is gone in it.
        let again = a.relisted(|n| match n {
            "b" => v("5"),
            "c" => v("6"),
            _ => None,
        });
        assert_eq!(again, vec!["c".to_string()]);
        // Read again: 8 (newer than the list): ahead until the watch shows it.
        a.ours("c", v("8"), v("7"));
        assert!(!a.shown("c", v("7")));
        assert!(a.shown("c", v("8")));
        assert_eq!(a.len(), 0);
    }
}
