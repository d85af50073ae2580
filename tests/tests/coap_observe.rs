//! Observe (RFC 7641) downlink with independent clients: libcoap (`-s`) and aiocoap (its
//! library, `tests/py/coap_obs.py`) observe `/ps/cmd/<dev>` through the real binary while paho-mqtt publishes
//! QoS 0 and QoS 1 to `cmd/<dev>` on mosquitto, or pika publishes to RabbitMQ's `amq.topic`
//! (the gateway's AMQP downlink queue): every payload shows in the client's output. When
//! libcoap's observation ends (its Observe=1 GET) the observer is gone from `/clients`; a
//! plain GET of the topic afterwards answers 2.05 with the last retained value.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;
use std::time::Duration;

use sensorgate_tests::coap::{libcoap, libcoap_client, libcoap_pdus};
use sensorgate_tests::{
    RabbitMq, Rig, Script, UpMsg, free_tcp_port, poll_until, publish_upstream, send_signal,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(200);

fn url(rig: &Rig, target: &str) -> String {
    format!("coap://{}/{target}", rig.gateway.coap_addr())
}

/// libcoap observing `target` for `secs` seconds, printing every PDU (`-v 7`).
fn libcoap_observer(rig: &Rig, target: &str, secs: u32) -> Script {
    let mut cmd = Command::new(libcoap_client());
    cmd.args(["-v", "7", "-m", "get", "-s"])
        .arg(secs.to_string())
        .arg("-B")
        .arg((secs + 2).to_string())
        .arg(url(rig, target));
    Script::spawn("coap-client-notls", &mut cmd).unwrap()
}

/// Waits for libcoap's printed PDU with code `code` and payload `payload`.
fn expect_pdu(s: &Script, code: &str, payload: Option<&str>) -> String {
    let what = format!("a {code} PDU with payload {payload:?}");
    s.expect_line(&what, WAIT, |l| {
        libcoap_pdus(l).iter().any(|p| {
            p.code == code && payload.is_none_or(|want| p.line.contains(&format!(":: '{want}'")))
        })
    })
    .unwrap()
}

/// The filters `client_id`'s CoAP observations hold, per `/clients`.
fn observed(rig: &Rig, client_id: &str) -> Option<Vec<String>> {
    let (code, body) = rig
        .gateway
        .admin_get(&format!("/clients?prefix={client_id}"))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let c = page["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == client_id && c["protocol"] == "coap")?
        .clone();
    Some(
        c["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["filter"].as_str().unwrap().to_owned())
            .collect(),
    )
}

#[test]
fn libcoap_observer_gets_mqtt_downlink_then_get_returns_the_retained_value() {
    let rig = Rig::start_with(|c| {
        c.with_coap()?;
        c.admin = Some(free_tcp_port()?);
        Ok(())
    })
    .unwrap();
    let mut obs = libcoap_observer(&rig, "ps/cmd/dev1?id=obs1", 12);
    // The registration is answered 2.05 (piggy-backed on the ACK).
    expect_pdu(&obs, "2.05", None);
    assert_eq!(
        observed(&rig, "obs1"),
        Some(vec!["cmd/dev1".to_owned()]),
        "the observation is listed"
    );

    publish_upstream(
        rig.broker.port(),
        &[
            UpMsg::new("cmd/dev1", b"n-q0", 0),
            UpMsg::new("cmd/dev1", b"n-q1", 1),
            UpMsg::retained("cmd/dev1", b"last", 1),
        ],
    )
    .unwrap();
    expect_pdu(&obs, "2.05", Some("n-q0"));
    expect_pdu(&obs, "2.05", Some("n-q1"));
    expect_pdu(&obs, "2.05", Some("last"));

    // At the end of `-s` libcoap cancels (GET with Observe=1) and exits.
    obs.wait_exit(WAIT).unwrap();
    poll_until("the observation gone", WAIT, EVERY, || {
        Ok(observed(&rig, "obs1")
            .unwrap_or_default()
            .is_empty()
            .then_some(()))
    })
    .unwrap();

    // A plain GET answers with the retained value.
    let out = libcoap(&["-m", "get", "-B", "5", &url(&rig, "ps/cmd/dev1")]).unwrap();
    let pdus = libcoap_pdus(&out);
    assert!(
        pdus.iter()
            .any(|p| p.code == "2.05" && p.line.contains(":: 'last'")),
        "{out}"
    );
}

#[test]
fn aiocoap_observer_gets_mqtt_downlink_qos0_and_qos1() {
    let rig = Rig::start_with(|c| {
        c.with_coap()?;
        Ok(())
    })
    .unwrap();
    // A retained value first: the observer shows it at registration (in the 2.05 or as the
    // first notification).
    publish_upstream(rig.broker.port(), &[UpMsg::retained("cmd/dev2", b"r0", 1)]).unwrap();
    // aiocoap's library (tests/py/coap_obs.py): aiocoap-client 0.4.17 prints no notification
    // after the first response (chrysn/aiocoap#395).
    let mut obs = Script::python(
        "coap_obs.py",
        &[
            "--url".to_owned(),
            url(&rig, "ps/cmd/dev2"),
            "--timeout".to_owned(),
            "60".to_owned(),
        ],
    )
    .unwrap();
    let registered = obs
        .expect_line("REGISTERED 2.05", WAIT, |l| {
            l.starts_with("REGISTERED 2.05")
        })
        .unwrap();
    // The broker hands the new subscription its retained value: in the answer already, or as
    // the first notification.
    if !registered.ends_with(" r0") {
        obs.expect_line("r0", WAIT, |l| l == "NOTIFY 2.05 Content r0")
            .unwrap();
    }
    publish_upstream(
        rig.broker.port(),
        &[
            UpMsg::new("cmd/dev2", b"a-q0", 0),
            UpMsg::new("cmd/dev2", b"a-q1", 1),
        ],
    )
    .unwrap();
    obs.expect_line("a-q0", WAIT, |l| l == "NOTIFY 2.05 Content a-q0")
        .unwrap();
    obs.expect_line("a-q1", WAIT, |l| l == "NOTIFY 2.05 Content a-q1")
        .unwrap();
    // SIGINT cancels the observation and ends the script.
    send_signal(obs.pid().unwrap(), "INT").unwrap();
    obs.expect_line("DONE", WAIT, |l| l == "DONE").unwrap();
    obs.wait_exit(WAIT).unwrap();
}

/// Whether `queue` is bound with `key` (on any exchange).
fn bound(rabbit: &RabbitMq, queue: &str, key: &str) -> bool {
    let out = rabbit
        .ctl(&[
            "list_bindings",
            "--no-table-headers",
            "destination_name",
            "routing_key",
        ])
        .unwrap();
    out.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.as_slice() == [queue, key]
    })
}

#[test]
fn a_rabbitmq_downlink_reaches_a_coap_observer() {
    let rabbit = RabbitMq::start().unwrap();
    let rig = Rig::start_with(|c| {
        c.with_coap()?;
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
             exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\ndownlink_queue = \"sg-coap\"\n",
            rabbit.url()
        ));
        Ok(())
    })
    .unwrap();
    let obs = libcoap_observer(&rig, "ps/cmd/dev3", 25);
    expect_pdu(&obs, "2.05", None);
    // The observation became a binding of the gateway's queue.
    poll_until("binding cmd.dev3", WAIT, EVERY, || {
        Ok(bound(&rabbit, "sg-coap", "cmd.dev3").then_some(()))
    })
    .unwrap();
    let pika = Script::python(
        "amqp_obs.py",
        &[
            "publish".to_owned(),
            "--port".to_owned(),
            rabbit.port().to_string(),
            "--routing-key".to_owned(),
            "cmd.dev3".to_owned(),
            "--body".to_owned(),
            "from-rabbit".to_owned(),
        ],
    )
    .unwrap();
    pika.expect_line("PUBLISHED", WAIT, |l| l == "PUBLISHED")
        .unwrap();
    expect_pdu(&obs, "2.05", Some("from-rabbit"));
}
