//! The subscription table of one upstream: which filters the gateway wants, which ones the
//! current connection has been asked for, and the difference still to send.
//!
//! Plain data, no I/O: the handle edits the wanted side ([`SubscriptionTable::set`],
//! [`SubscriptionTable::remove`]); the link task takes the difference in bounded batches
//! ([`SubscriptionTable::next_batch`]), hands each batch to the MQTT client and then either
//! commits it (queued) or requeues it (request queue full, retried later). After every
//! (re)connect [`SubscriptionTable::reset_link`] marks everything wanted as still to send:
//! sessions are clean, so a new connection starts with no subscription on the broker.
//!
//! ```text
//!  wanted   filter -> QoS   what the gateway asked for (at most `capacity` filters)
//!  applied  filter -> QoS   what the current connection was asked to subscribe
//!  dirty    {filter}        keys where wanted and applied may differ; always a subset of
//!                           wanted ∪ applied, so at most 2 * capacity entries
//! ```
//!
//! "Applied" means queued in the client, not acknowledged by the broker: SUBSCRIBE and
//! UNSUBSCRIBE requests of one connection go out in queue order. A filter the broker refuses
//! (SUBACK failure) stays wanted and is made unapplied again
//! ([`SubscriptionTable::unapply`]), so it is asked for again (after a delay, see the link
//! task) and after every reconnect.
//!
//! Every wanted filter also has a subscription identifier (MQTT 5), unique among the wanted
//! filters and kept while the filter is wanted, so a message the broker delivers tells which of
//! the gateway's filters it was sent for ([`SubscriptionTable::filter_for`]). Identifiers are
//! taken from a counter over the whole MQTT 5 range, so one is not reused for a different
//! filter until some 268 million subscriptions later (a copy still in flight for a removed
//! filter finds no filter and reaches nobody).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::message::Qos;
use crate::topic;

/// Most filters the gateway may have subscribed on one upstream at a time.
pub const MAX_SUBSCRIPTIONS: usize = 65_536;

/// The largest MQTT 5 subscription identifier (a variable byte integer).
const MAX_SUBSCRIPTION_ID: usize = 268_435_455;

/// The table holds `capacity` filters and this one is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull;

/// Changes to send in one SUBSCRIBE and one UNSUBSCRIBE packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Filters to subscribe (new, or with a changed QoS), with their QoS.
    pub(crate) subscribe: Vec<(String, Qos)>,
    /// Filters to unsubscribe.
    pub(crate) unsubscribe: Vec<String>,
}

impl Batch {
    /// Whether there is nothing to send.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

/// Wanted and applied subscriptions of one upstream; see the module docs.
#[derive(Debug)]
pub(crate) struct SubscriptionTable {
    /// What the gateway asked for.
    wanted: BTreeMap<String, Qos>,
    /// What the current connection was asked for.
    applied: BTreeMap<String, Qos>,
    /// Keys that may differ between `wanted` and `applied`.
    dirty: BTreeSet<String>,
    /// Bound on `wanted`.
    capacity: usize,
    /// Subscription identifier of every wanted filter.
    ids: HashMap<String, usize>,
    /// The inverse of `ids`.
    filters: HashMap<usize, Arc<str>>,
    /// The identifier tried next.
    next_id: usize,
}

impl SubscriptionTable {
    /// An empty table holding at most `capacity` wanted filters.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            wanted: BTreeMap::new(),
            applied: BTreeMap::new(),
            dirty: BTreeSet::new(),
            capacity,
            ids: HashMap::new(),
            filters: HashMap::new(),
            next_id: 1,
        }
    }

    /// Wants `filter` at `qos`. Returns whether something is now to send.
    ///
    /// # Errors
    ///
    /// [`TableFull`] if `filter` is new and the table already holds `capacity` filters.
    pub(crate) fn set(&mut self, filter: &str, qos: Qos) -> Result<bool, TableFull> {
        let full = self.wanted.len() >= self.capacity;
        match self.wanted.get_mut(filter) {
            Some(wanted) => *wanted = qos,
            None if full => return Err(TableFull),
            None => {
                self.wanted.insert(filter.to_owned(), qos);
                let id = self.allocate_id();
                self.ids.insert(filter.to_owned(), id);
                self.filters.insert(id, Arc::from(filter));
            }
        }
        Ok(self.mark(filter))
    }

    /// A new bound on wanted filters (a reconfigure): a lower one refuses new filters until
    /// the table holds fewer; none already wanted is dropped.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// No longer wants `filter`. Returns whether something is now to send.
    pub(crate) fn remove(&mut self, filter: &str) -> bool {
        if self.wanted.remove(filter).is_some()
            && let Some(id) = self.ids.remove(filter)
        {
            self.filters.remove(&id);
        }
        self.mark(filter)
    }

    /// The next identifier not in use. At most `capacity` are in use, far fewer than the
    /// range, so the search ends quickly.
    fn allocate_id(&mut self) -> usize {
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_SUBSCRIPTION_ID { 1 } else { id + 1 };
            if !self.filters.contains_key(&id) {
                return id;
            }
        }
    }

    /// The subscription identifier of a wanted filter.
    pub(crate) fn id(&self, filter: &str) -> Option<usize> {
        self.ids.get(filter).copied()
    }

    /// The wanted filter subscribed with identifier `id`, if it is still wanted.
    pub(crate) fn filter_for(&self, id: usize) -> Option<Arc<str>> {
        self.filters.get(&id).cloned()
    }

    /// Re-evaluates whether `filter` differs; returns whether it does.
    fn mark(&mut self, filter: &str) -> bool {
        if self.wanted.get(filter) == self.applied.get(filter) {
            self.dirty.remove(filter);
            false
        } else {
            if !self.dirty.contains(filter) {
                self.dirty.insert(filter.to_owned());
            }
            true
        }
    }

    /// Whether changes are waiting to be sent.
    pub(crate) fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Number of wanted filters.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.wanted.len()
    }

    /// Whether some wanted filter matches `topic` (the sensors' topic, without the remote
    /// prefix): a publish to it comes back from the broker. One lookup, then one match per
    /// wanted filter with wildcards.
    pub(crate) fn wants(&self, topic: &str) -> bool {
        self.wanted.contains_key(topic)
            || self
                .wanted
                .keys()
                .any(|filter| topic::has_wildcards(filter) && topic::matches(filter, topic))
    }

    /// A new connection has no subscriptions: everything wanted is to be sent again.
    pub(crate) fn reset_link(&mut self) {
        self.applied.clear();
        self.dirty = self.wanted.keys().cloned().collect();
    }

    /// Takes up to `max_filters` changes whose encoded filters (`prefix_len` + filter + 3 bytes
    /// each) fit in `max_bytes`; always at least one change if any is waiting. The taken keys
    /// leave the dirty set: [`Self::commit`] or [`Self::requeue`] them.
    pub(crate) fn next_batch(
        &mut self,
        max_filters: usize,
        max_bytes: usize,
        prefix_len: usize,
    ) -> Batch {
        let mut batch = Batch::default();
        let mut bytes = 0usize;
        let mut taken = 0usize;
        while taken < max_filters.max(1) {
            let Some(filter) = self.dirty.first() else {
                break;
            };
            let cost = prefix_len.saturating_add(filter.len()).saturating_add(3);
            if taken > 0 && bytes.saturating_add(cost) > max_bytes {
                break;
            }
            let Some(filter) = self.dirty.pop_first() else {
                break;
            };
            match (self.wanted.get(&filter), self.applied.get(&filter)) {
                (Some(&wanted), applied) if applied != Some(&wanted) => {
                    batch.subscribe.push((filter, wanted));
                }
                (None, Some(_)) => batch.unsubscribe.push(filter),
                // Already in sync (changed back before it was sent): nothing to do.
                _ => continue,
            }
            bytes = bytes.saturating_add(cost);
            taken += 1;
        }
        batch
    }

    /// The client queued the SUBSCRIBE of `subscribe`: record it as applied.
    pub(crate) fn commit_subscribe(&mut self, subscribe: &[(String, Qos)]) {
        for (filter, qos) in subscribe {
            self.applied.insert(filter.clone(), *qos);
            self.mark(filter);
        }
    }

    /// The client queued the UNSUBSCRIBE of `unsubscribe`: record it as applied.
    pub(crate) fn commit_unsubscribe(&mut self, unsubscribe: &[String]) {
        for filter in unsubscribe {
            self.applied.remove(filter);
            self.mark(filter);
        }
    }

    /// The broker refused the subscription of `filter` (SUBACK failure): it is not applied
    /// after all, so the next batch asks for it again if it is still wanted. Returns whether
    /// something is now to send.
    pub(crate) fn unapply(&mut self, filter: &str) -> bool {
        self.applied.remove(filter);
        self.mark(filter)
    }

    /// The client could not queue these changes: send them later.
    pub(crate) fn requeue<'a>(&mut self, filters: impl IntoIterator<Item = &'a str>) {
        for filter in filters {
            self.mark(filter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(batch: &Batch) -> Vec<(&str, Qos)> {
        batch
            .subscribe
            .iter()
            .map(|(f, q)| (f.as_str(), *q))
            .collect()
    }

    fn unsubs(batch: &Batch) -> Vec<&str> {
        batch.unsubscribe.iter().map(String::as_str).collect()
    }

    /// Takes everything and commits it, like a link task with room in its queue.
    fn flush(table: &mut SubscriptionTable) -> Batch {
        let batch = table.next_batch(usize::MAX, usize::MAX, 0);
        table.commit_subscribe(&batch.subscribe);
        table.commit_unsubscribe(&batch.unsubscribe);
        batch
    }

    #[test]
    fn wants_tells_whether_a_wanted_filter_matches_a_topic() {
        let mut table = SubscriptionTable::new(10);
        assert!(!table.wants("room/1/temp"));
        table.set("room/+/temp", Qos::AtLeastOnce).unwrap();
        table.set("door", Qos::AtMostOnce).unwrap();
        assert!(table.wants("room/1/temp"));
        assert!(table.wants("door"));
        assert!(!table.wants("room/1/hum"));
        assert!(!table.wants("door/bell"));
        let _ = table.remove("room/+/temp");
        assert!(!table.wants("room/1/temp"));
    }

    #[test]
    fn new_filters_are_sent_once() {
        let mut table = SubscriptionTable::new(10);
        assert_eq!(table.set("a/#", Qos::AtLeastOnce), Ok(true));
        assert_eq!(table.set("b", Qos::AtMostOnce), Ok(true));
        let batch = flush(&mut table);
        assert_eq!(
            subs(&batch),
            [("a/#", Qos::AtLeastOnce), ("b", Qos::AtMostOnce)]
        );
        assert!(batch.unsubscribe.is_empty());
        assert!(!table.has_changes());
        assert_eq!(table.set("a/#", Qos::AtLeastOnce), Ok(false), "unchanged");
        assert!(flush(&mut table).is_empty());
    }

    #[test]
    fn a_qos_change_resubscribes() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtMostOnce).unwrap();
        flush(&mut table);
        assert_eq!(table.set("a", Qos::ExactlyOnce), Ok(true));
        assert_eq!(subs(&flush(&mut table)), [("a", Qos::ExactlyOnce)]);
    }

    #[test]
    fn removing_an_applied_filter_unsubscribes_it() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        flush(&mut table);
        assert!(table.remove("a"));
        let batch = flush(&mut table);
        assert_eq!(unsubs(&batch), ["a"]);
        assert!(batch.subscribe.is_empty());
        assert_eq!(table.len(), 0);
        assert!(!table.remove("a"), "removing twice sends nothing");
    }

    #[test]
    fn a_filter_added_and_removed_before_sending_sends_nothing() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        assert!(!table.remove("a"));
        assert!(!table.has_changes());
        assert!(flush(&mut table).is_empty());
    }

    #[test]
    fn a_refused_filter_is_asked_for_again_while_wanted() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        table.set("b", Qos::AtMostOnce).unwrap();
        flush(&mut table);
        assert!(table.unapply("a"));
        assert_eq!(subs(&flush(&mut table)), [("a", Qos::AtLeastOnce)]);
        // No longer wanted: nothing to ask for, nothing to unsubscribe.
        table.remove("b");
        flush(&mut table);
        assert!(!table.unapply("b"));
        assert!(flush(&mut table).is_empty());
    }

    #[test]
    fn the_capacity_bounds_wanted_filters_but_not_updates() {
        let mut table = SubscriptionTable::new(2);
        table.set("a", Qos::AtMostOnce).unwrap();
        table.set("b", Qos::AtMostOnce).unwrap();
        assert_eq!(table.set("c", Qos::AtMostOnce), Err(TableFull));
        assert_eq!(table.set("a", Qos::AtLeastOnce), Ok(true), "update fits");
        table.remove("b");
        assert_eq!(table.set("c", Qos::AtMostOnce), Ok(true));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn churn_while_disconnected_stays_bounded() {
        let mut table = SubscriptionTable::new(4);
        table.set("kept", Qos::AtMostOnce).unwrap();
        flush(&mut table);
        for i in 0..10_000 {
            let filter = format!("f/{i}");
            table.set(&filter, Qos::AtLeastOnce).unwrap();
            table.remove(&filter);
        }
        assert!(table.dirty.len() <= 2 * table.capacity);
        assert!(flush(&mut table).is_empty());
    }

    #[test]
    fn reset_link_sends_everything_wanted_again() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        table.set("b", Qos::AtMostOnce).unwrap();
        flush(&mut table);
        // Removed while the link was down: the new connection never had it.
        table.remove("b");
        table.reset_link();
        let batch = flush(&mut table);
        assert_eq!(subs(&batch), [("a", Qos::AtLeastOnce)]);
        assert!(batch.unsubscribe.is_empty());
    }

    #[test]
    fn identifiers_are_unique_stable_and_not_reused_at_once() {
        let mut table = SubscriptionTable::new(10);
        table.set("a/#", Qos::AtMostOnce).unwrap();
        table.set("a/t", Qos::AtMostOnce).unwrap();
        let (a, t) = (table.id("a/#").unwrap(), table.id("a/t").unwrap());
        assert_ne!(a, t);
        assert_eq!(table.filter_for(a).as_deref(), Some("a/#"));
        table.set("a/#", Qos::ExactlyOnce).unwrap();
        assert_eq!(
            table.id("a/#"),
            Some(a),
            "a QoS change keeps the identifier"
        );
        table.remove("a/t");
        assert_eq!((table.id("a/t"), table.filter_for(t)), (None, None));
        table.set("a/t", Qos::AtMostOnce).unwrap();
        let again = table.id("a/t").unwrap();
        assert!(again != t && again != a, "{again}");
    }

    #[test]
    fn identifiers_wrap_around_skipping_those_in_use() {
        let mut table = SubscriptionTable::new(10);
        table.set("low", Qos::AtMostOnce).unwrap();
        table.next_id = MAX_SUBSCRIPTION_ID;
        table.set("top", Qos::AtMostOnce).unwrap();
        table.set("wrapped", Qos::AtMostOnce).unwrap();
        assert_eq!(table.id("low"), Some(1));
        assert_eq!(table.id("top"), Some(MAX_SUBSCRIPTION_ID));
        assert_eq!(table.id("wrapped"), Some(2), "1 is in use");
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut table = SubscriptionTable::new(100);
        for i in 0..10 {
            table.set(&format!("t/{i}"), Qos::AtMostOnce).unwrap();
        }
        assert_eq!(table.next_batch(4, usize::MAX, 0).subscribe.len(), 4);
        // Each costs prefix 5 + 3 + 3 = 11 bytes: two fit in 25.
        assert_eq!(table.next_batch(100, 25, 5).subscribe.len(), 2);
        // One change is always taken, however large.
        assert_eq!(table.next_batch(100, 1, 5).subscribe.len(), 1);
    }

    #[test]
    fn requeued_changes_are_sent_later() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        let batch = table.next_batch(10, usize::MAX, 0);
        assert!(!table.has_changes());
        table.requeue(batch.subscribe.iter().map(|(f, _)| f.as_str()));
        assert!(table.has_changes());
        assert_eq!(subs(&flush(&mut table)), [("a", Qos::AtLeastOnce)]);
    }

    #[test]
    fn a_removal_between_taking_and_committing_is_not_lost() {
        let mut table = SubscriptionTable::new(10);
        table.set("a", Qos::AtLeastOnce).unwrap();
        let batch = table.next_batch(10, usize::MAX, 0);
        table.remove("a");
        table.commit_subscribe(&batch.subscribe);
        // The broker was asked for `a`, which nobody wants any more.
        assert_eq!(unsubs(&flush(&mut table)), ["a"]);
    }
}
