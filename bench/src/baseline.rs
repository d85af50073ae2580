//! The native MQTT publisher: the same stamped messages straight into the broker, for the
//! baseline of the uplink scenarios and as the upstream source of the downlink scenario.

use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc_v5::{AsyncClient, Event, Incoming, MqttOptions, PublishOptions, QoS};

use sensorgate_bridges::mqtt::SEQ_PROPERTY;

use crate::{elapsed_ns, sn};

/// What the native publisher sends.
#[derive(Debug, Clone)]
pub struct Native {
    /// The broker's port on 127.0.0.1.
    pub port: u16,
    /// Topic to publish to.
    pub topic: String,
    /// Client index written into the stamps.
    pub client: u32,
    /// Number of messages.
    pub messages: u64,
    /// QoS 0 or 1.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// Offered msg/s; `None` for unpaced.
    pub rate: Option<f64>,
    /// Bound on the run.
    pub max: Duration,
    /// QoS 1 messages in flight at most, with the write tuning of the gateway's upstream
    /// client (batched requests, no Nagle): the native equivalent of a gateway upstream with
    /// this `max_inflight`. `None`: the client library's defaults.
    pub window: Option<u16>,
    /// Send each message's index as the MQTT 5 user property the gateway's spool adds
    /// (`sg-seq`), so the broker handles the same bytes as from a draining gateway.
    pub seq_property: bool,
}

/// Requests the client writes per batch with a `window`: as the gateway's upstream client.
const REQUEST_BATCH: usize = 256;

/// Publishes the stamped messages of `n`. Returns how many were handed to the connection and
/// the seconds it took.
///
/// # Errors
/// When the broker is unreachable.
pub async fn publish(n: &Native) -> anyhow::Result<(u64, f64)> {
    let Native {
        port,
        ref topic,
        client,
        messages,
        qos,
        payload,
        rate,
        max,
        window,
        seq_property,
    } = *n;
    let mut opts = MqttOptions::new(format!("sg-bench-native-{client}"), ("127.0.0.1", port));
    opts.set_keep_alive(30);
    if let Some(window) = window {
        opts.set_outgoing_inflight_upper_limit(window);
        opts.set_max_request_batch(REQUEST_BATCH);
        let mut network = opts.network_options();
        network.set_tcp_nodelay(true);
        opts.set_network_options(network);
    }
    let (mqtt, mut eventloop) = AsyncClient::builder(opts).capacity(1024).build();
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let driver = tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => {
                    acked_tx.send_modify(|n| *n += 1);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected_rx)
        .await
        .context("the native publisher got no CONNACK within 10 s")??;
    let options = if qos == 0 {
        PublishOptions::new(QoS::AtMostOnce)
    } else {
        PublishOptions::new(QoS::AtLeastOnce)
    };
    let start = Instant::now();
    let until = start + max;
    let mut sent = 0u64;
    let mut body = Vec::with_capacity(payload);
    while sent < messages && Instant::now() < until {
        if let Some(rate) = rate {
            let at = start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        body.clear();
        sn::stamp_into(&mut body, client, sent, elapsed_ns(), payload);
        let options = if seq_property {
            options.clone().properties(rumqttc_v5::PublishProperties {
                user_properties: vec![(SEQ_PROPERTY.to_owned(), sent.to_string())],
                ..rumqttc_v5::PublishProperties::default()
            })
        } else {
            options.clone()
        };
        if mqtt
            .publish(topic.to_owned(), body.clone(), options)
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    // QoS 1: leave once the broker has every message (a DISCONNECT may overtake the publishes
    // still queued in the client). QoS 0: let the event loop write what is queued, then leave.
    if qos > 0 {
        let all_acked = acked_rx.wait_for(|&n| n >= sent);
        let _ = tokio::time::timeout(Duration::from_secs(10), all_acked).await;
    }
    let _ = mqtt.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    Ok((sent, secs))
}

/// Publishes `payloads` on `topic` at QoS 1 through the broker on `port` as client
/// `client_id`, and returns once the broker acknowledged them all (within 10 s).
///
/// # Errors
/// When the broker is unreachable or does not acknowledge in time.
pub async fn publish_qos1(
    port: u16,
    client_id: &str,
    topic: &str,
    payloads: Vec<Vec<u8>>,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(client_id, ("127.0.0.1", port));
    opts.set_keep_alive(30);
    let (mqtt, mut eventloop) = AsyncClient::builder(opts).capacity(64).build();
    let want = payloads.len();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => acked_tx.send_modify(|n| *n += 1),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for payload in payloads {
        mqtt.publish(
            topic.to_owned(),
            payload,
            PublishOptions::new(QoS::AtLeastOnce),
        )
        .await?;
    }
    let acked = tokio::time::timeout(Duration::from_secs(10), acked_rx.wait_for(|&n| n >= want))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let _ = mqtt.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    anyhow::ensure!(
        acked,
        "the broker did not acknowledge {want} publishes within 10 s"
    );
    Ok(())
}
