//! The devices seen by the HTTP ingress, for `/clients` and per-device counters: a table
//! bounded by `max_devices_tracked`, the least recently seen device forgotten first (LRU).
//! Pure: `now` is passed in.
//!
//! A device is a configured identity (`[[http.device]] id`) or, anonymous,
//! `anonymous@<peer ip>`. Per-topic counters would be unbounded, so a device keeps its last
//! topic only (every request's topic is in its debug log line).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::observe::model::{
    ClientCounters, ClientInfo, ClientQuery, ClientsPage, SessionState, SubscriptionInfo,
};

/// What is known about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Device {
    /// Its position in the LRU order.
    seq: u64,
    /// Where its last request came from, and whether over TLS.
    pub last_peer: SocketAddr,
    pub tls: bool,
    pub last_seen: Instant,
    /// Requests answered (every status).
    pub requests: u64,
    /// Messages accepted (a batch's items one each).
    pub messages: u64,
    /// The topic of its last publish.
    pub last_topic: Option<Box<str>>,
    /// The status of its last request.
    pub last_status: u16,
    /// Requests answered with an error status.
    pub refused: u64,
}

/// One request, as [`Devices::record`] takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen<'a> {
    pub peer: SocketAddr,
    pub tls: bool,
    pub topic: Option<&'a str>,
    pub status: u16,
    pub messages: u64,
}

/// The table (see the module doc).
#[derive(Debug)]
pub(crate) struct Devices {
    cap: usize,
    entries: HashMap<Arc<str>, Device>,
    /// `seq` -> device id, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    next_seq: u64,
}

impl Devices {
    /// An empty table of at most `cap` (>= 1) devices.
    pub(crate) fn new(cap: usize) -> Self {
        Devices {
            cap: cap.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// A new bound (a reload): a lower one forgets the least recently seen devices at the
    /// next new one.
    pub(crate) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
    }

    /// Counts a request of `id`, making it the most recently seen; forgets the least recently
    /// seen device when the table is full.
    pub(crate) fn record(&mut self, now: Instant, id: &Arc<str>, seen: Seen<'_>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(device) = self.entries.get_mut(id) {
            self.order.remove(&device.seq);
            device.seq = seq;
            self.order.insert(seq, Arc::clone(id));
            device.last_peer = seen.peer;
            device.tls = seen.tls;
            device.last_seen = now;
            device.requests += 1;
            device.messages += seen.messages;
            if let Some(topic) = seen.topic
                && device.last_topic.as_deref() != Some(topic)
            {
                device.last_topic = Some(topic.into());
            }
            device.last_status = seen.status;
            device.refused += u64::from(seen.status >= 400);
            return;
        }
        while self.entries.len() >= self.cap {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.order.insert(seq, Arc::clone(id));
        self.entries.insert(
            Arc::clone(id),
            Device {
                seq,
                last_peer: seen.peer,
                tls: seen.tls,
                last_seen: now,
                requests: 1,
                messages: seen.messages,
                last_topic: seen.topic.map(Into::into),
                last_status: seen.status,
                refused: u64::from(seen.status >= 400),
            },
        );
    }

    /// The device `id`, if tracked.
    #[cfg(test)]
    pub(crate) fn get(&self, id: &str) -> Option<&Device> {
        self.entries.get(id)
    }

    /// Devices tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// A page of `/clients`: every tracked device and every device with an open stream
    /// (`streams`: device, its filters, events queued), ordered by id, `active`.
    pub(crate) fn clients<'s>(
        &self,
        now: Instant,
        query: &ClientQuery,
        streams: impl Iterator<Item = (&'s Arc<str>, &'s [Arc<str>], usize)>,
    ) -> ClientsPage {
        if query.state.is_some_and(|s| s != SessionState::Active) {
            return ClientsPage::default();
        }
        let wanted = |id: &str| {
            query.prefix.as_deref().is_none_or(|p| id.starts_with(p))
                && query.after.as_deref().is_none_or(|a| id > a)
        };
        // id -> (filters, queued)
        let mut open: BTreeMap<&str, (BTreeSet<&str>, u64)> = BTreeMap::new();
        for (device, filters, queued) in streams {
            if !wanted(device) {
                continue;
            }
            let entry = open.entry(device).or_default();
            entry.0.extend(filters.iter().map(|f| &**f));
            entry.1 += queued as u64;
        }
        let ids: BTreeSet<&str> = self
            .entries
            .keys()
            .map(|id| &**id)
            .filter(|id| wanted(id))
            .chain(open.keys().copied())
            .collect();
        let mut clients = Vec::new();
        let mut more = false;
        for id in ids {
            if clients.len() >= query.limit {
                more = true;
                break;
            }
            let device = self.entries.get(id);
            let (filters, queued) = open.remove(id).unwrap_or_default();
            clients.push(ClientInfo {
                client_id: id.to_owned(),
                protocol: super::PROTOCOL,
                address: device
                    .map(|d| format!("{}:{}", if d.tls { "tls" } else { "tcp" }, d.last_peer)),
                state: SessionState::Active,
                keep_alive_secs: 0,
                last_seen_ms_ago: device.map_or(0, |d| {
                    u64::try_from(now.saturating_duration_since(d.last_seen).as_millis())
                        .unwrap_or(u64::MAX)
                }),
                subscriptions: filters
                    .into_iter()
                    .map(|f| SubscriptionInfo {
                        filter: f.to_owned(),
                        qos: 0,
                    })
                    .collect(),
                queued_downlink: queued,
                counters: device.map(|d| ClientCounters {
                    requests: d.requests,
                    messages: d.messages,
                    refused: d.refused,
                    last_topic: d.last_topic.as_deref().map(str::to_owned),
                    last_status: d.last_status,
                }),
            });
        }
        ClientsPage { clients, more }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn seen(topic: Option<&str>, status: u16) -> Seen<'_> {
        Seen {
            peer: "127.0.0.1:4000".parse().unwrap(),
            tls: false,
            topic,
            status,
            messages: 1,
        }
    }

    #[allow(clippy::disallowed_methods)] // A start for the virtual times below.
    fn now() -> Instant {
        Instant::now()
    }

    fn query(limit: usize) -> ClientQuery {
        ClientQuery {
            limit,
            ..ClientQuery::default()
        }
    }

    #[test]
    fn the_least_recently_seen_device_is_forgotten_at_the_cap() {
        let t0 = now();
        let mut devices = Devices::new(2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        devices.record(t0, &a, seen(Some("x"), 200));
        devices.record(t0, &b, seen(None, 401));
        devices.record(t0, &a, seen(Some("y"), 202));
        devices.record(t0, &c, seen(None, 200));
        assert_eq!(devices.len(), 2);
        assert!(devices.get("b").is_none(), "b was the least recently seen");
        let a = devices.get("a").unwrap();
        assert_eq!((a.requests, a.messages, a.last_status), (2, 2, 202));
        assert_eq!(a.last_topic.as_deref(), Some("y"));
    }

    #[test]
    fn clients_pages_by_id_with_stream_filters() {
        let t0 = now();
        let mut devices = Devices::new(10);
        for id in ["dev2", "dev1", "other"] {
            devices.record(t0, &Arc::from(id), seen(Some("t"), 200));
        }
        let dev1: Arc<str> = "dev1".into();
        devices.record(t0, &dev1, seen(Some("t/2"), 403));
        let dev3: Arc<str> = "dev3".into();
        let filters: Vec<Arc<str>> = vec!["cmd/dev1/#".into()];
        let streams = vec![(&dev1, &filters[..], 3), (&dev3, &filters[..], 0)];
        let later = t0 + Duration::from_millis(1500);
        let q = ClientQuery {
            prefix: Some("dev".into()),
            ..query(2)
        };
        let page = devices.clients(later, &q, streams.clone().into_iter());
        let ids: Vec<_> = page.clients.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(ids, ["dev1", "dev2"]);
        assert!(page.more);
        let dev1_info = &page.clients[0];
        assert_eq!(dev1_info.address.as_deref(), Some("tcp:127.0.0.1:4000"));
        assert_eq!(dev1_info.last_seen_ms_ago, 1500);
        assert_eq!(dev1_info.queued_downlink, 3);
        assert_eq!(dev1_info.subscriptions[0].filter, "cmd/dev1/#");
        assert_eq!(
            dev1_info.counters,
            Some(ClientCounters {
                requests: 2,
                messages: 2,
                refused: 1,
                last_topic: Some("t/2".into()),
                last_status: 403,
            })
        );
        let q = ClientQuery {
            prefix: Some("dev".into()),
            after: Some("dev2".into()),
            ..query(10)
        };
        let page = devices.clients(later, &q, streams.clone().into_iter());
        assert_eq!(
            page.clients.len(),
            1,
            "dev3 has a stream but no request tracked"
        );
        assert_eq!(page.clients[0].client_id, "dev3");
        assert_eq!(page.clients[0].address, None);
        assert_eq!(page.clients[0].counters, None);
        assert!(!page.more);
        let q = ClientQuery {
            state: Some(SessionState::Asleep),
            ..query(10)
        };
        assert!(
            devices
                .clients(later, &q, streams.into_iter())
                .clients
                .is_empty()
        );
    }
}
