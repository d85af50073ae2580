//! Session store tests: the log format with a known-answer CRC, torn tails and corruption,
//! compaction and the size bound, acknowledgements only after durability, and a model test.

use std::fs;
use std::sync::mpsc as std_mpsc;

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use sensorgate_bridges::durable::memfs::{Faults, MemFs};

use super::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn upsert(id: &str, bytes: &[u8]) -> Pending {
    Pending::from([(Arc::from(id), Some(bytes.to_vec()))])
}

fn remove(id: &str) -> Pending {
    Pending::from([(Arc::from(id), None)])
}

/// The loaded sessions as a sorted map.
fn loaded(sessions: Vec<StoredSession>) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = sessions
        .into_iter()
        .map(|s| (s.client_id.to_string(), s.bytes))
        .collect();
    v.sort();
    v
}

fn reopen(dir: &Path, max: u64) -> (SessionStore, Vec<(String, Vec<u8>)>, OpenReport) {
    let (store, sessions, report) = SessionStore::open(dir, max).unwrap();
    (store, loaded(sessions), report)
}

const MAX: u64 = 1 << 20;

/// An acknowledgement that reports into a channel.
struct TestAck(u32, std_mpsc::Sender<u32>);

impl Acknowledge for TestAck {
    fn acknowledge(self) {
        let _ = self.1.send(self.0);
    }
}

#[test]
fn known_answer_crc_and_record_layout() {
    // The IEEE CRC-32 check value.
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    let mut frame = Vec::new();
    push_frame(&mut frame, 1, OP_UPSERT, "ab", &[0x09]).unwrap();
    let payload = [OP_UPSERT, 2, 0, b'a', b'b', 0x09];
    // The shared framing: sync | len | seq | header CRC | payload CRC | payload.
    let mut expected = vec![0xD3, 0x5A, 0x9C, 0xE7, 6, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let hcrc = crc32fast::hash(&expected);
    expected.extend_from_slice(&hcrc.to_le_bytes());
    expected.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    expected.extend_from_slice(&payload);
    assert_eq!(frame, expected);

    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    store.commit(&upsert("ab", &[0x09])).unwrap();
    let file = fs::read(dir.path().join(LOG_FILE)).unwrap();
    assert_eq!(&file[..8], b"SGSL\x02\x00\x00\x00");
    assert_eq!(&file[8..], &expected[..]);
    // The next record is number 2.
    store.commit(&upsert("cd", &[])).unwrap();
    let file = fs::read(dir.path().join(LOG_FILE)).unwrap();
    assert_eq!(&file[8 + expected.len() + 8..][..8], &2u64.to_le_bytes());
}

#[test]
fn the_latest_record_per_client_wins_across_reopens() {
    let dir = tempdir();
    let (mut store, sessions, report) = reopen(dir.path(), MAX);
    assert!(sessions.is_empty());
    assert_eq!(report.records, 0);
    store.commit(&upsert("a", b"a1")).unwrap();
    store.commit(&upsert("b", b"b1")).unwrap();
    store.commit(&upsert("a", b"a2")).unwrap();
    store.commit(&remove("b")).unwrap();
    store.commit(&upsert("c", b"c1")).unwrap();
    drop(store);
    let (_, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!(
        sessions,
        vec![("a".into(), b"a2".to_vec()), ("c".into(), b"c1".to_vec())]
    );
    assert_eq!((report.records, report.corrupt), (5, 0));
}

#[test]
fn removing_an_unknown_session_writes_nothing() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    let before = store.log_bytes();
    store.commit(&remove("never")).unwrap();
    assert_eq!(store.log_bytes(), before);
}

#[test]
fn a_torn_tail_is_truncated_and_later_records_follow_valid_ones() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    store.commit(&upsert("a", b"one")).unwrap();
    let good = store.log_bytes();
    drop(store);
    // A crash in the middle of an append: a frame header promising more than was written.
    let mut torn = 100u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xAA; 4 + 10]);
    let path = dir.path().join(LOG_FILE);
    let mut file = fs::read(&path).unwrap();
    file.extend_from_slice(&torn);
    fs::write(&path, &file).unwrap();

    let (mut store, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!(report.truncated_bytes, torn.len() as u64);
    assert_eq!(report.corrupt, 0);
    assert_eq!(sessions, vec![("a".into(), b"one".to_vec())]);
    assert_eq!(fs::metadata(&path).unwrap().len(), good);
    store.commit(&upsert("b", b"two")).unwrap();
    drop(store);
    let (_, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(sessions.len(), 2);
}

#[test]
fn a_zero_filled_tail_is_a_torn_tail() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    store.commit(&upsert("a", b"one")).unwrap();
    drop(store);
    let path = dir.path().join(LOG_FILE);
    let mut file = fs::read(&path).unwrap();
    file.extend_from_slice(&[0; 64]);
    fs::write(&path, &file).unwrap();
    let (_, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!((report.truncated_bytes, report.corrupt), (64, 0));
    assert_eq!(sessions.len(), 1);
}

#[test]
fn a_record_with_a_bad_crc_is_skipped_and_counted_and_the_earlier_one_stands() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    store.commit(&upsert("a", b"old")).unwrap();
    let second = store.log_bytes();
    store.commit(&upsert("a", b"new")).unwrap();
    store.commit(&upsert("b", b"fine")).unwrap();
    drop(store);
    let path = dir.path().join(LOG_FILE);
    let mut file = fs::read(&path).unwrap();
    // Flip a byte of the second record's payload (after its 24-byte frame header).
    file[second as usize + 25] ^= 0xFF;
    fs::write(&path, &file).unwrap();
    let (_, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!((report.records, report.corrupt), (2, 1));
    assert_eq!(
        sessions,
        vec![
            ("a".into(), b"old".to_vec()),
            ("b".into(), b"fine".to_vec())
        ]
    );
}

#[test]
fn a_foreign_file_or_version_is_refused_and_a_stale_compaction_is_removed() {
    let dir = tempdir();
    fs::write(dir.path().join(LOG_FILE), b"not a session log").unwrap();
    assert!(matches!(
        SessionStore::open(dir.path(), MAX),
        Err(StoreError::NotALog { .. })
    ));
    fs::write(dir.path().join(LOG_FILE), b"SGSL\x03\x00\x00\x00").unwrap();
    assert!(matches!(
        SessionStore::open(dir.path(), MAX),
        Err(StoreError::Version(3))
    ));
    // A header cut short by a crash while creating the log: started afresh.
    fs::write(dir.path().join(LOG_FILE), b"SGS").unwrap();
    fs::write(dir.path().join(TMP_FILE), b"half a compaction").unwrap();
    let (_, sessions, _) = reopen(dir.path(), MAX);
    assert!(sessions.is_empty());
    assert!(!dir.path().join(TMP_FILE).exists());
}

#[test]
fn a_log_over_twice_its_live_size_is_compacted_at_open() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    for i in 0..50u8 {
        store.commit(&upsert("a", &[i; 20])).unwrap();
    }
    store.commit(&upsert("b", b"b")).unwrap();
    let before = store.log_bytes();
    drop(store);
    let (store, sessions, report) = reopen(dir.path(), MAX);
    assert!(report.compacted);
    assert!(
        store.log_bytes() < before / 10,
        "{} of {before}",
        store.log_bytes()
    );
    assert_eq!(store.log_bytes(), store.live);
    assert_eq!(
        sessions,
        vec![("a".into(), vec![49; 20]), ("b".into(), b"b".to_vec())]
    );
    drop(store);
    let (_, again, report) = reopen(dir.path(), MAX);
    assert!(!report.compacted, "already compact");
    assert_eq!(again, sessions);
}

#[test]
fn the_log_stays_within_its_bound_and_a_live_set_over_it_is_refused() {
    let dir = tempdir();
    let bound = 4096;
    let (mut store, _, _) = reopen(dir.path(), bound);
    for i in 0..500u32 {
        let id = format!("c{}", i % 7);
        store
            .commit(&upsert(&id, &i.to_le_bytes().repeat(20)))
            .unwrap();
        assert!(store.log_bytes() <= bound, "{} bytes", store.log_bytes());
    }
    let huge = vec![0u8; bound as usize];
    assert!(matches!(
        store.commit(&upsert("huge", &huge)),
        Err(StoreError::Full { .. })
    ));
    // Still usable, and what was refused is not there.
    store.commit(&remove("c0")).unwrap();
    drop(store);
    let (_, sessions, _) = reopen(dir.path(), bound);
    assert_eq!(sessions.len(), 6);
    assert!(sessions.iter().all(|(id, _)| id != "huge" && id != "c0"));
}

#[test]
fn under_a_lowered_bound_the_stored_sessions_may_shrink_but_not_grow() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    for i in 0..10u8 {
        store.commit(&upsert(&format!("c{i}"), &[i; 200])).unwrap();
    }
    drop(store);
    let small = 1024;
    let (mut store, sessions, _) = reopen(dir.path(), small);
    assert_eq!(sessions.len(), 10, "nothing stored is dropped");
    assert!(matches!(
        store.commit(&upsert("c0", &[0; 300])),
        Err(StoreError::Full { .. })
    ));
    store.commit(&remove("c1")).unwrap();
    store.commit(&upsert("c2", b"smaller")).unwrap();
    drop(store);
    let (_, sessions, _) = reopen(dir.path(), small);
    assert_eq!(sessions.len(), 9);
    assert!(sessions.contains(&("c2".into(), b"smaller".to_vec())));
}

#[test]
fn acknowledgements_wait_for_a_successful_commit_and_failures_keep_everything() {
    let dir = tempdir();
    let (mut store, _, _) = reopen(dir.path(), MAX);
    let (tx, rx) = std_mpsc::channel();
    let mut pending = upsert("a", b"queued");
    let mut acks = vec![TestAck(1, tx.clone())];
    let mut failing = None;

    store.fail_commits = 1;
    commit_round(&mut store, &mut pending, &mut acks, &mut failing);
    assert!(rx.try_recv().is_err(), "no ack after a failed commit");
    assert_eq!((pending.len(), acks.len()), (1, 1), "kept for the retry");
    assert!(failing.is_some());
    assert_eq!(
        reopen(dir.path(), MAX).1,
        Vec::new(),
        "nothing reached the log"
    );

    pending.insert(Arc::from("b"), Some(b"later".to_vec()));
    acks.push(TestAck(2, tx));
    commit_round(&mut store, &mut pending, &mut acks, &mut failing);
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![1, 2]);
    assert!(pending.is_empty() && acks.is_empty() && failing.is_none());
    assert_eq!(reopen(dir.path(), MAX).1.len(), 2);
}

#[test]
fn the_thread_acknowledges_once_the_batch_is_on_disk_and_drains_its_queue_at_shutdown() {
    let dir = tempdir();
    let (store, _, _) = reopen(dir.path(), MAX);
    let (mut link, thread) = spawn::<TestAck, _>(store).unwrap();
    let (tx, rx) = std_mpsc::channel();
    for i in 0..3u32 {
        link.next.changes.push(PersistChange::Upsert {
            client_id: Arc::from(format!("c{i}")),
            bytes: vec![i as u8],
        });
        link.hold_ack(TestAck(i, tx.clone()));
        link.try_send();
    }
    // Each ack arrives only after its record is durable: the log already holds it.
    for _ in 0..3 {
        let i = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let on_disk = fs::read(dir.path().join(LOG_FILE)).unwrap();
        let id = format!("c{i}");
        assert!(
            on_disk.windows(id.len()).any(|w| w == id.as_bytes()),
            "ack {i} before its record"
        );
    }
    link.next.changes.push(PersistChange::Remove {
        client_id: Arc::from("c0"),
    });
    link.try_send();
    drop(link);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(thread.finished());
    let (_, sessions, _) = reopen(dir.path(), MAX);
    assert_eq!(
        sessions,
        vec![("c1".into(), vec![1]), ("c2".into(), vec![2])]
    );
}

#[test]
fn a_batch_waiting_for_room_keeps_the_last_change_per_client() {
    let change = |id: &str, b: u8| PersistChange::Upsert {
        client_id: Arc::from(id),
        bytes: vec![b],
    };
    let mut batch: Batch<TestAck> = Batch {
        changes: vec![
            change("a", 1),
            change("b", 1),
            PersistChange::Remove {
                client_id: Arc::from("a"),
            },
            change("b", 2),
            change("c", 1),
        ],
        acks: Vec::new(),
    };
    batch.coalesce();
    assert_eq!(
        batch.changes,
        vec![
            PersistChange::Remove {
                client_id: Arc::from("a")
            },
            change("b", 2),
            change("c", 1),
        ]
    );
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(u8, Vec<u8>),
    Remove(u8),
    Reopen,
    TearTail(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, proptest::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(id, b)| Op::Upsert(id, b)),
        2 => (0u8..6).prop_map(Op::Remove),
        1 => Just(Op::Reopen),
        1 => (1u8..20).prop_map(Op::TearTail),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The store against a map: whatever the sequence of commits, reopens and torn appends,
    /// the loaded sessions are the map, and the log stays within its bound.
    #[test]
    fn the_store_behaves_like_a_map(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempdir();
        let bound = 2048;
        let mut model: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let (mut store, _, _) = reopen(dir.path(), bound);
        for op in ops {
            match op {
                Op::Upsert(id, bytes) => {
                    let id = format!("client-{id}");
                    store.commit(&upsert(&id, &bytes)).unwrap();
                    model.insert(id, bytes);
                }
                Op::Remove(id) => {
                    let id = format!("client-{id}");
                    store.commit(&remove(&id)).unwrap();
                    model.remove(&id);
                }
                Op::Reopen => {
                    drop(store);
                    let (s, sessions, report) = reopen(dir.path(), bound);
                    prop_assert_eq!(report.corrupt, 0);
                    prop_assert_eq!(sessions, model.clone().into_iter().collect::<Vec<_>>());
                    store = s;
                }
                Op::TearTail(n) => {
                    // A crash mid-append: garbage after the committed log, cut at reopen.
                    drop(store);
                    let path = dir.path().join(LOG_FILE);
                    let mut file = fs::read(&path).unwrap();
                    file.extend(std::iter::repeat_n(0xEE, usize::from(n)));
                    fs::write(&path, &file).unwrap();
                    let (s, sessions, _) = reopen(dir.path(), bound);
                    prop_assert_eq!(sessions, model.clone().into_iter().collect::<Vec<_>>());
                    store = s;
                }
            }
            prop_assert!(store.log_bytes() <= bound);
        }
        drop(store);
        let (_, sessions, _) = reopen(dir.path(), bound);
        prop_assert_eq!(sessions, model.into_iter().collect::<Vec<_>>());
    }
}

/// The sessions in the version 1 fixture (see `fixtures/README.md`).
fn fixture_sessions() -> Vec<(String, Vec<u8>)> {
    vec![
        ("capteur-\u{e9}t\u{e9}".into(), vec![0, 1, 2, 0xFF]),
        ("empty".into(), Vec::new()),
        ("sensor-a".into(), b"a-second".to_vec()),
        ("sensor-b".into(), b"b-only".to_vec()),
    ]
}

const V1_FIXTURE: &[u8] = include_bytes!("fixtures/sessions-v1.log");

#[test]
fn a_version_1_log_is_read_and_rewritten_in_version_2() {
    let dir = tempdir();
    let path = dir.path().join(LOG_FILE);
    fs::write(&path, V1_FIXTURE).unwrap();
    let (mut store, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!(sessions, fixture_sessions());
    assert_eq!((report.version, report.records, report.corrupt), (1, 7, 0));
    assert!(report.compacted, "rewritten at open");
    let file = fs::read(&path).unwrap();
    assert_eq!(&file[..8], b"SGSL\x02\x00\x00\x00");
    // Appends follow in version 2 and everything reads back.
    store.commit(&upsert("sensor-c", b"c")).unwrap();
    store.commit(&remove("empty")).unwrap();
    drop(store);
    let (_, sessions, report) = reopen(dir.path(), MAX);
    assert_eq!(
        (report.version, report.corrupt, report.compacted),
        (2, 0, false)
    );
    let mut want = fixture_sessions();
    want.retain(|(id, _)| id != "empty");
    want.push(("sensor-c".into(), b"c".to_vec()));
    want.sort();
    assert_eq!(sessions, want);
}

type Opened<F> = (SessionStore<F>, Vec<(String, Vec<u8>)>, OpenReport);

fn mem_open(fs: &MemFs, max: u64) -> Opened<MemFs> {
    let (store, sessions, report) =
        SessionStore::open_with(fs.clone(), Path::new("/state/sessions"), max).unwrap();
    (store, loaded(sessions), report)
}

#[test]
fn a_version_1_log_that_cannot_be_rewritten_at_open_is_never_appended_to() {
    let fs = MemFs::new();
    let path = Path::new("/state/sessions").join(LOG_FILE);
    fs.open(&path, true)
        .unwrap()
        .write_all_at(V1_FIXTURE, 0)
        .unwrap();
    fs.set_faults(Faults {
        enospc: true,
        ..fs.faults()
    });
    let (mut store, sessions, report) = mem_open(&fs, MAX);
    assert_eq!(
        sessions,
        fixture_sessions(),
        "a full disk does not stop the start"
    );
    assert!(!report.compacted);
    assert!(store.commit(&upsert("new", b"n")).is_err());
    assert_eq!(
        fs.contents(&path),
        V1_FIXTURE,
        "the version 1 log is untouched"
    );
    fs.set_faults(Faults {
        enospc: false,
        ..fs.faults()
    });
    store.commit(&upsert("new", b"n")).unwrap();
    assert_eq!(&fs.contents(&path)[..8], b"SGSL\x02\x00\x00\x00");
    drop(store);
    let (_, sessions, report) = mem_open(&fs, MAX);
    assert_eq!(report.corrupt, 0);
    let mut want = fixture_sessions();
    want.push(("new".into(), b"n".to_vec()));
    want.sort();
    assert_eq!(sessions, want);
}

#[test]
fn damage_in_the_middle_costs_only_the_record_it_touches() {
    // Unlike version 1, a damaged length does not end the log.
    let fs = MemFs::new();
    let (mut store, _, _) = mem_open(&fs, MAX);
    let mut starts = Vec::new();
    for i in 0..5u8 {
        starts.push(store.log_bytes());
        store.commit(&upsert(&format!("c{i}"), &[i; 10])).unwrap();
    }
    drop(store);
    let path = Path::new("/state/sessions").join(LOG_FILE);
    // The length field of the third record.
    fs.corrupt(&path, starts[2] as usize + 5);
    let (_, sessions, report) = mem_open(&fs, MAX);
    assert_eq!(
        (report.records, report.corrupt, report.truncated_bytes),
        (4, 1, 0)
    );
    let ids: Vec<_> = sessions.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["c0", "c1", "c3", "c4"]);
}

#[test]
fn enospc_or_a_failed_write_leaves_the_committed_log_and_the_next_commit_succeeds() {
    for faults in [
        Faults {
            enospc: true,
            available: u64::MAX,
            ..Faults::default()
        },
        Faults {
            eio_writes: true,
            available: u64::MAX,
            ..Faults::default()
        },
    ] {
        let fs = MemFs::new();
        let (mut store, _, _) = mem_open(&fs, MAX);
        store.commit(&upsert("a", b"one")).unwrap();
        fs.set_faults(faults.clone());
        assert!(store.commit(&upsert("b", &[7; 100])).is_err(), "{faults:?}");
        // What the failed write left is not part of the log.
        let (_, sessions, report) = mem_open(&fs, MAX);
        assert_eq!(sessions, vec![("a".into(), b"one".to_vec())], "{faults:?}");
        assert_eq!(report.corrupt, 0);
        fs.set_faults(Faults {
            available: u64::MAX,
            ..Faults::default()
        });
        store.commit(&upsert("b", b"two")).unwrap();
        drop(store);
        let (_, sessions, report) = mem_open(&fs, MAX);
        assert_eq!(report.corrupt, 0);
        assert_eq!(
            sessions,
            vec![("a".into(), b"one".to_vec()), ("b".into(), b"two".to_vec())]
        );
    }
}

/// Crashes (power loss) after commits, some of them under a failing fsync: every commit
/// that succeeded survives with its value; a failed one may or may not have reached the
/// disk (its acknowledgements were withheld), but never damages what was there.
#[test]
fn a_crash_keeps_every_successful_commit_and_a_failed_fsync_loses_nothing_committed() {
    for seed in 0..200u64 {
        let fs = MemFs::new();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut model: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let mut maybe: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let (mut store, _, _) = mem_open(&fs, 4096);
        for step in 0..12u8 {
            let id = format!("c{}", rand::Rng::random_range(&mut rng, 0..4u8));
            let value = vec![step; usize::from(rand::Rng::random_range(&mut rng, 0..60u8))];
            let fail_sync = rand::Rng::random_bool(&mut rng, 0.3);
            fs.set_faults(Faults {
                fail_sync,
                available: u64::MAX,
                ..Faults::default()
            });
            let change = if rand::Rng::random_bool(&mut rng, 0.2) {
                remove(&id)
            } else {
                upsert(&id, &value)
            };
            match store.commit(&change) {
                Ok(()) => {
                    maybe.retain(|(m, _)| *m != id);
                    match &change[id.as_str()] {
                        Some(v) => model.insert(id, v.clone()),
                        None => model.remove(&id),
                    };
                }
                Err(_) => {
                    let v = change[id.as_str()].clone();
                    maybe.push((id, v));
                }
            }
        }
        drop(store);
        fs.set_faults(Faults {
            available: u64::MAX,
            ..Faults::default()
        });
        fs.crash(&mut rng);
        let (_, sessions, _) = mem_open(&fs, 4096);
        let got: std::collections::BTreeMap<_, _> = sessions.into_iter().collect();
        let ids: HashSet<&String> = got.keys().chain(model.keys()).collect();
        for id in ids {
            let ok = got.get(id) == model.get(id)
                || maybe
                    .iter()
                    .any(|(m, v)| m == id && got.get(id) == v.as_ref());
            assert!(
                ok,
                "seed {seed}: {id}: got {:?}, committed {:?}",
                got.get(id),
                model.get(id)
            );
        }
    }
}
