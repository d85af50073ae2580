//! The driver with a serial line (`UdpDriver::with_serial`), no device: the test is the line,
//! writing frames into the shared inbound channel and reading the line's write queue. Frames
//! reach the core as `Peer::serial(line)`, answers go to that line's queue, and a flood meeting
//! a full spool queue is held and spooled in order without dropping anything: the channel is
//! not read while publishes are held.

use bytes::Bytes;

use super::*;
use crate::serial::line::{LineHandle, SerialLinks};

/// A rig whose driver serves one serial line: the frames' way in and the line's write queue.
async fn serial_rig() -> (Rig, mpsc::Sender<(u16, Bytes)>, mpsc::Receiver<Bytes>) {
    // Room for every frame a test sends: the test never waits on the channel.
    let (inbound_tx, inbound) = mpsc::channel(4096);
    let (line, queue) = LineHandle::detached(256);
    let links = SerialLinks {
        lines: vec![line],
        inbound,
    };
    let rig = Rig::start_with(16, move |driver| driver.with_serial(links)).await;
    (rig, inbound_tx, queue)
}

fn frame(packet: Packet<'_>) -> Bytes {
    let mut buf = Vec::new();
    packet.encode(&mut buf).unwrap();
    Bytes::from(buf)
}

/// The next frame the driver queued for the line, decoded by `f`.
async fn next<T>(queue: &mut mpsc::Receiver<Bytes>, f: impl FnOnce(Packet<'_>) -> T) -> T {
    let bytes = tokio::time::timeout(BOUND, queue.recv())
        .await
        .expect("a frame for the line")
        .expect("the driver runs");
    match codec::decode(&bytes, &DecodeLimits::default()).unwrap() {
        Frame::Plain(p) | Frame::Encapsulated { packet: p, .. } => f(p),
    }
}

#[tokio::test]
async fn a_serial_flood_meeting_a_full_spool_queue_is_held_and_spooled_in_order() {
    tokio::task::LocalSet::new()
        .run_until(serial_flood_is_held_and_spooled_in_order())
        .await;
}

async fn serial_flood_is_held_and_spooled_in_order() {
    // Five times what the driver may hold with one socket and the serial channel.
    const N: u32 = 5 * (HELD_ROUNDS * RECV_BATCH * 2) as u32;
    let (rig, tx, mut queue) = serial_rig().await;
    let send = |p: Packet<'_>| tx.try_send((0, frame(p))).unwrap();
    send(Packet::Connect {
        will: false,
        clean_session: true,
        duration: 600,
        client_id: "on-serial",
    });
    let connack = next(&mut queue, |p| {
        p == Packet::ConnAck {
            rc: ReturnCode::Accepted,
        }
    });
    assert!(connack.await, "CONNACK on the line");
    send(Packet::Register {
        topic_id: 0,
        msg_id: 1,
        topic_name: TOPIC,
    });
    let topic_id = next(&mut queue, |p| match p {
        Packet::RegAck {
            topic_id,
            rc: ReturnCode::Accepted,
            ..
        } => topic_id,
        other => panic!("expected REGACK, got {other:?}"),
    })
    .await;
    let stall = Stall::start(&rig.shared);
    for i in 0..N {
        send(Packet::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicRef::Normal(topic_id),
            msg_id: 0,
            data: &i.to_be_bytes(),
        });
    }
    rig.wait_for("refusal for a full queue", |r| r.shared.queue_full() > 0)
        .await;
    stall.release();
    rig.wait_for("every publish spooled", |r| {
        assert_eq!(r.stats.queue_dropped(), 0, "publishes dropped");
        r.shared.stats().appended >= u64::from(N)
    })
    .await;
    assert_eq!(numbers(&rig.records()), (0..N).collect::<Vec<_>>());
    assert_eq!(rig.stats.queue_dropped(), 0, "nothing given up");
    rig.stop().await;
}
