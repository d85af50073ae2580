//! The binding table of one AMQP upstream: which binding keys the sensors' subscriptions want
//! on the downlink queue, which ones the broker has, and the next change to make.
//!
//! Plain data, no I/O: the handle edits the wanted side ([`BindingTable::set`],
//! [`BindingTable::remove`]); the link task takes one change at a time
//! ([`BindingTable::next_change`]), makes it (`queue.bind` / `queue.unbind`) and records it
//! ([`BindingTable::done`]). After every (re)connect [`BindingTable::reset_link`] says what the
//! new connection's queue holds.
//!
//! ```text
//!  wanted   {key}   binding keys of the subscribed filters (at most `capacity`)
//!  applied  {key}   keys the queue is bound with (as far as this upstream knows)
//!  fixed    {key}   the configured `bindings`: bound on every connection, never unbound, so a
//!                   subscription with the same key leaving does not remove them
//! ```
//!
//! Invariants: `applied` holds at most `capacity` keys beyond `wanted` (those waiting to be
//! unbound), so the table is bounded by `2 * capacity` keys; every key in `wanted` and not in
//! `applied` is bound before any key is unbound (a new subscription is served first).

use std::collections::BTreeSet;

/// The table holds `capacity` keys and this one is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull;

/// One change for the link task to make on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `queue.bind` with this key.
    Bind(String),
    /// `queue.unbind` of this key.
    Unbind(String),
}

/// Wanted and applied bindings; see the module docs.
#[derive(Debug)]
pub(crate) struct BindingTable {
    wanted: BTreeSet<String>,
    applied: BTreeSet<String>,
    fixed: BTreeSet<String>,
    capacity: usize,
}

impl BindingTable {
    /// A new bound on wanted keys (a reconfigure): a lower one refuses new keys until the
    /// table holds fewer; none already wanted is dropped (the table stays within twice the
    /// larger of the two bounds).
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// An empty table holding at most `capacity` wanted keys; `fixed` keys are never unbound.
    pub(crate) fn new(capacity: usize, fixed: impl IntoIterator<Item = String>) -> Self {
        Self {
            wanted: BTreeSet::new(),
            applied: BTreeSet::new(),
            fixed: fixed.into_iter().collect(),
            capacity,
        }
    }

    /// Wants `key`. Returns whether there is now something to do.
    ///
    /// # Errors
    /// [`TableFull`] when `key` is new and `capacity` keys are wanted.
    pub(crate) fn set(&mut self, key: &str) -> Result<bool, TableFull> {
        if self.wanted.contains(key) {
            return Ok(false);
        }
        if self.wanted.len() >= self.capacity {
            return Err(TableFull);
        }
        self.wanted.insert(key.to_owned());
        Ok(!self.applied.contains(key))
    }

    /// No longer wants `key`. Returns whether there is now something to do.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        if !self.wanted.remove(key) {
            return false;
        }
        if self.fixed.contains(key) {
            // Stays bound (the connect step binds it anyway): nothing to do.
            self.applied.remove(key);
            return false;
        }
        self.applied.contains(key)
    }

    /// The next change to make: binds first, then unbinds (a fixed key is never unbound).
    pub(crate) fn next_change(&self) -> Option<Change> {
        if let Some(key) = self.wanted.difference(&self.applied).next() {
            return Some(Change::Bind(key.clone()));
        }
        self.applied
            .difference(&self.wanted)
            .next()
            .map(|key| Change::Unbind(key.clone()))
    }

    /// Records that `change` was made on the broker.
    pub(crate) fn done(&mut self, change: &Change) {
        match change {
            Change::Bind(key) => {
                self.applied.insert(key.clone());
            }
            Change::Unbind(key) => {
                self.applied.remove(key);
            }
        }
    }

    /// A new connection: its queue holds no binding of ours if it is new (`fresh_queue`: a
    /// server-named queue, gone with the old connection); a durable queue kept the bindings
    /// of before. Either way every wanted key is bound again (binding is idempotent), and
    /// keys unwanted while the link was down are unbound from a durable queue. Fixed keys
    /// are bound by the connect step itself.
    pub(crate) fn reset_link(&mut self, fresh_queue: bool) {
        if fresh_queue {
            self.applied.clear();
        } else {
            self.applied.retain(|key| !self.wanted.contains(key));
        }
        let fixed = &self.fixed;
        self.applied.retain(|key| !fixed.contains(key));
    }

    /// Whether `key` is one of the configured bindings.
    #[cfg(test)]
    fn is_fixed(&self, key: &str) -> bool {
        self.fixed.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut BindingTable) -> Vec<Change> {
        let mut out = Vec::new();
        while let Some(c) = t.next_change() {
            t.done(&c);
            out.push(c);
            assert!(out.len() < 100, "changes never end");
        }
        out
    }

    fn bind(k: &str) -> Change {
        Change::Bind(k.into())
    }

    fn unbind(k: &str) -> Change {
        Change::Unbind(k.into())
    }

    #[test]
    fn a_new_key_is_bound_once_and_unbound_when_unwanted() {
        let mut t = BindingTable::new(8, []);
        assert_eq!(t.set("a.*"), Ok(true));
        assert_eq!(t.set("a.*"), Ok(false));
        assert_eq!(drain(&mut t), vec![bind("a.*")]);
        assert!(t.remove("a.*"));
        assert_eq!(drain(&mut t), vec![unbind("a.*")]);
        assert!(!t.remove("a.*"));
        assert_eq!(drain(&mut t), vec![]);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = BindingTable::new(1, []);
        t.set("a").unwrap();
        assert_eq!(t.set("b"), Err(TableFull));
        assert_eq!(t.set("a"), Ok(false));
    }

    #[test]
    fn a_reconnect_binds_everything_again_and_unbinds_what_left_meanwhile_from_a_durable_queue() {
        let mut t = BindingTable::new(8, []);
        t.set("a").unwrap();
        t.set("b").unwrap();
        drain(&mut t);
        // Link down: "b" leaves.
        t.remove("b");
        t.reset_link(false);
        assert_eq!(drain(&mut t), vec![bind("a"), unbind("b")]);
        // A server-named queue is new on every connection: nothing to unbind.
        t.remove("a");
        t.set("c").unwrap();
        t.reset_link(true);
        assert_eq!(drain(&mut t), vec![bind("c")]);
    }

    #[test]
    fn a_configured_binding_is_never_unbound() {
        let mut t = BindingTable::new(8, ["cmd.#".to_owned()]);
        assert!(t.is_fixed("cmd.#"));
        t.set("cmd.#").unwrap();
        assert_eq!(drain(&mut t), vec![bind("cmd.#")]);
        t.remove("cmd.#");
        assert_eq!(drain(&mut t), vec![]);
        t.set("x").unwrap();
        drain(&mut t);
        t.reset_link(false);
        assert_eq!(drain(&mut t), vec![bind("x")]);
    }
}
