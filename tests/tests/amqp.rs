//! AMQP upstream end to end: sensors publish QoS 1 through the real binary to one MQTT
//! (mosquitto) and one AMQP (a private RabbitMQ node) upstream at once. Both get every message
//! in order; the AMQP copy is persistent, routed as `sensors.x`, with `message_id` equal to the
//! MQTT copy's `sg-seq`; a RabbitMQ outage delays its copy (the backlog arrives in order after
//! the restart) and never holds up mosquitto's. A message no queue is bound for is returned by
//! the broker, logged, and does not hold up the ones after it.
//!
//!
//! Downlink: a message published to `amq.topic` as `cmd.s1` reaches an MQTT-SN subscriber of
//! `cmd/s1` at QoS 1 through the gateway's binding, and is acknowledged to RabbitMQ only once
//! the gateway took it (while the gateway is stopped it stays unacknowledged); the binding
//! goes when the last subscriber leaves. TLS: `amqps://` with a CA file and a client
//! certificate against a listener that requires one.
//!
//! A RabbitMQ node takes several seconds to boot: the file keeps to few tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sensorgate_tests::sn::{Packet, Qos, SubTopic, TopicType};
use sensorgate_tests::{
    RabbitMq, RabbitTls, Rig, Script, admin_get, free_tcp_port, poll_until, send_signal, temp_dir,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The `[[upstream]]` section of the AMQP upstream for `rabbit`.
fn amqp_section(rabbit: &RabbitMq) -> String {
    format!(
        "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
         exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
         backoff_max = \"1s\"\n",
        rabbit.url()
    )
}

fn obs(args: &[&str]) -> Script {
    Script::python(
        "amqp_obs.py",
        &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap()
}

/// Declares the durable queue bound with `sensors.#` before anything is published.
fn declare_queue(rabbit: &RabbitMq) {
    let s = obs(&["declare", "--port", &rabbit.port().to_string()]);
    s.expect_line("READY", WAIT, |l| l == "READY").unwrap();
}

/// `n` JSON lines from an observer (before its DONE).
fn json_lines(s: &Script, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let l = s
                .expect_line(&format!("message {i} of {n}"), WAIT, |l| l.starts_with('{'))
                .unwrap();
            serde_json::from_str(&l).unwrap()
        })
        .collect()
}

fn payload(v: &Value, key: &str) -> String {
    let hex = v[key].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn get_amqp(rabbit: &RabbitMq, n: usize) -> Vec<Value> {
    let count = n.to_string();
    let port = rabbit.port().to_string();
    let s = obs(&["get", "--port", &port, "--count", &count]);
    json_lines(&s, n)
}

#[test]
fn both_upstreams_get_every_message_in_order_with_the_same_sequence_id() {
    let rabbit = RabbitMq::start().unwrap();
    declare_queue(&rabbit);
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&amqp_section(&rabbit));
        Ok(())
    })
    .unwrap();
    let mqtt = obs(&[
        "mqtt",
        "--port",
        &rig.broker.port().to_string(),
        "--count",
        "20",
    ]);
    mqtt.expect_line("READY", WAIT, |l| l == "READY").unwrap();

    let mut c = rig.connected("amqp-both").unwrap();
    // No queue is bound for `unrouted.x`: RabbitMQ returns it; the upstream counts it as
    // refused (warn) and the drain moves on to the next.
    let unrouted = c.register("unrouted/x").unwrap();
    c.publish_qos1_ok(TopicType::Normal, unrouted, b"nobody")
        .unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..20 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let from_mqtt = json_lines(&mqtt, 20);
    let from_amqp = get_amqp(&rabbit, 20);
    for (i, (m, a)) in from_mqtt.iter().zip(&from_amqp).enumerate() {
        let want = format!("m{i}");
        assert_eq!(payload(m, "payload_hex"), want, "MQTT order");
        assert_eq!(payload(a, "body_hex"), want, "AMQP order");
        assert_eq!(a["routing_key"], "sensors.x");
        assert_eq!(a["delivery_mode"], 2, "persistent");
        assert_eq!(a["headers"]["sg-topic"], "sensors/x");
        assert_eq!(a["headers"]["sg-qos"], 1);
        assert_eq!(a["headers"]["sg-protocol"], "mqttsn", "origin protocol");
        assert_eq!(a["headers"]["sg-client"], "amqp-both", "origin ClientId");
        assert!(m["seq"].is_string(), "sg-seq present: {m}");
        assert_eq!(a["message_id"], m["seq"], "message_id == sg-seq");
    }
    let log = rig.gateway.log();
    assert!(
        log.contains("AMQP broker returned a message as unroutable"),
        "{log}"
    );
}

#[test]
fn a_rabbitmq_outage_delays_only_the_amqp_copy_and_its_backlog_arrives_in_order() {
    let mut rabbit = RabbitMq::start().unwrap();
    declare_queue(&rabbit);
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&amqp_section(&rabbit));
        c.admin = Some(free_tcp_port()?);
        Ok(())
    })
    .unwrap();
    let admin = rig.gateway.admin_addr().unwrap();
    let mqtt = obs(&[
        "mqtt",
        "--port",
        &rig.broker.port().to_string(),
        "--count",
        "30",
    ]);
    mqtt.expect_line("READY", WAIT, |l| l == "READY").unwrap();
    let mut c = rig.connected("amqp-outage").unwrap();
    let id = c.register("sensors/x").unwrap();
    for i in 0..10 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    let before = json_lines(&mqtt, 10);
    // Wait until the AMQP link has delivered the first ten (they sit in the durable queue).
    std::thread::sleep(Duration::from_secs(1));

    rabbit.stop().unwrap();
    for i in 10..30 {
        c.publish_qos1_ok(TopicType::Normal, id, format!("m{i}").as_bytes())
            .unwrap();
    }
    // mosquitto keeps receiving while RabbitMQ is down.
    let during = json_lines(&mqtt, 20);
    let live: Vec<String> = before
        .iter()
        .chain(&during)
        .map(|m| payload(m, "payload_hex"))
        .collect();
    assert_eq!(live, (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The admin listener sees the AMQP upstream down with its backlog, the MQTT one up.
    let upstream = |doc: &Value, name: &str| {
        doc["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .cloned()
            .unwrap()
    };
    let status = || {
        let (code, body) = admin_get(admin, "/status", None)?;
        anyhow::ensure!(code == 200, "{code}: {body}");
        Ok(serde_json::from_str::<Value>(&body)?)
    };
    let down = poll_until(
        "the AMQP link seen down",
        WAIT,
        Duration::from_millis(200),
        || {
            let doc = status()?;
            Ok((upstream(&doc, "cloud")["connected"] == false).then_some(doc))
        },
    )
    .unwrap();
    let cloud = upstream(&down, "cloud");
    assert_eq!(cloud["kind"], "amqp");
    assert!(
        cloud["backlog"]["records"].as_u64().unwrap() >= 20,
        "{cloud}"
    );
    assert!(cloud["last_error"].is_string(), "{cloud}");
    assert_eq!(upstream(&down, "local")["connected"], true);
    assert_eq!(down["health"]["state"], "degraded", "{down}");

    rabbit.restart().unwrap();
    poll_until(
        "the AMQP backlog drained",
        WAIT,
        Duration::from_millis(200),
        || {
            let doc = status()?;
            let cloud = upstream(&doc, "cloud");
            Ok((cloud["connected"] == true && cloud["backlog"]["records"] == 0).then_some(()))
        },
    )
    .unwrap();
    // At least once: a message in flight at the stop may come twice; drop repeats by
    // message_id, then every message is there, in order.
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while seen.len() < 30 && std::time::Instant::now() < deadline {
        let port = rabbit.port().to_string();
        let s = obs(&["get", "--port", &port, "--count", "1", "--timeout", "10"]);
        let l = s
            .expect_line("a message", WAIT, |l| l.starts_with('{') || l == "DONE")
            .unwrap();
        if l == "DONE" {
            continue;
        }
        let v: Value = serde_json::from_str(&l).unwrap();
        if ids.insert(v["message_id"].as_str().unwrap().to_owned()) {
            seen.push(payload(&v, "body_hex"));
        }
    }
    assert_eq!(seen, (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The outage went through the link-loss path and a reconnect, each logged.
    let log = rig.gateway.log();
    assert!(log.contains("AMQP upstream link lost"), "{log}");
    assert!(
        log.matches("AMQP upstream connected.").count() >= 2,
        "{log}"
    );
}

/// Sends SIGCONT to a stopped gateway on drop, so a failing assertion never leaves it stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = send_signal(self.0, "CONT");
    }
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
fn an_amqp_message_reaches_an_mqtt_sn_subscriber_and_is_acknowledged_only_once_the_gateway_took_it()
{
    let rabbit = RabbitMq::start().unwrap();
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&amqp_section(&rabbit));
        c.extra_sections
            .push_str("downlink_queue = \"sg-down\"\nmax_unacked_downlinks = 4\n");
        Ok(())
    })
    .unwrap();
    let mut c = rig.connected("amqp-down").unwrap();
    let topic_id = c.subscribe_ok(Qos::One, SubTopic::Name("cmd/s1")).unwrap();
    assert_ne!(topic_id, 0);
    // The subscription became a binding of the gateway's queue, mapped like the MQTT plugin.
    poll_until("binding cmd.s1", WAIT, Duration::from_millis(200), || {
        Ok(bound(&rabbit, "sg-down", "cmd.s1").then_some(()))
    })
    .unwrap();

    // With the gateway stopped, RabbitMQ hands the message out and it stays unacknowledged.
    let pid = rig.gateway.pid().unwrap();
    send_signal(pid, "STOP").unwrap();
    let resume = Resume(pid);
    let port = rabbit.port().to_string();
    obs(&[
        "publish",
        "--port",
        &port,
        "--routing-key",
        "cmd.s1",
        "--body",
        "go",
    ])
    .expect_line("PUBLISHED", WAIT, |l| l == "PUBLISHED")
    .unwrap();
    poll_until(
        "one unacknowledged",
        WAIT,
        Duration::from_millis(200),
        || Ok((rabbit.queue_counts("sg-down")? == Some((0, 1))).then_some(())),
    )
    .unwrap();
    drop(resume);

    // The sensor gets it at QoS 1 on its subscription's topic id.
    match c.recv(WAIT).unwrap() {
        Some(Packet::Publish {
            flags,
            topic_id: tid,
            msg_id,
            data,
        }) => {
            assert_eq!((flags & 0x60, tid, &data[..]), (0x20, topic_id, &b"go"[..]));
            c.send(&sensorgate_tests::sn::puback(tid, msg_id, 0))
                .unwrap();
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // The gateway queued it for its subscriber, then acknowledged it: nothing left.
    poll_until("queue empty", WAIT, Duration::from_millis(200), || {
        Ok((rabbit.queue_counts("sg-down")? == Some((0, 0))).then_some(()))
    })
    .unwrap();

    // The last subscriber leaving removes the binding.
    c.unsubscribe(SubTopic::Name("cmd/s1")).unwrap();
    poll_until("binding gone", WAIT, Duration::from_millis(200), || {
        Ok((!bound(&rabbit, "sg-down", "cmd.s1")).then_some(()))
    })
    .unwrap();
    let mut rig = rig;
    rig.gateway.stop().unwrap();
    let log = rig.gateway.log();
    assert!(log.contains("AMQP upstream status."), "{log}");
    assert!(log.contains("downlink_delivered=1"), "{log}");
    assert!(log.contains("downlink_acked=1"), "{log}");
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with the openssl
/// CLI, in `dir`.
fn make_certs(dir: &Path) -> RabbitTls {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sensorgate test CA",
    ]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "sensorgate")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
    RabbitTls {
        ca_file: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}

#[test]
fn amqps_with_a_ca_file_and_a_client_certificate_carries_the_uplink() {
    let certs = temp_dir().unwrap();
    let tls = make_certs(certs.path());
    let rabbit = RabbitMq::start_tls(&tls).unwrap();
    declare_queue(&rabbit);
    let tls_port = rabbit.tls_port().unwrap();
    let dir = certs.path().display().to_string();
    let rig = Rig::start_with(|c| {
        c.extra_sections.push_str(&format!(
            "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\n\
             url = \"amqps://guest:guest@127.0.0.1:{tls_port}/%2f\"\n\
             ca_file = \"{dir}/ca.pem\"\nclient_cert = \"{dir}/client.pem\"\n\
             client_key = \"{dir}/client.key\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\n"
        ));
        Ok(())
    })
    .unwrap();
    let mut c = rig.connected("amqps").unwrap();
    let id = c.register("sensors/tls").unwrap();
    c.publish_qos1_ok(TopicType::Normal, id, b"secret").unwrap();
    let got = get_amqp(&rabbit, 1);
    assert_eq!(payload(&got[0], "body_hex"), "secret");
    assert_eq!(got[0]["routing_key"], "sensors.tls");
    let log = rig.gateway.log();
    assert!(log.contains("AMQP upstream connected."), "{log}");
    assert!(log.contains("amqps://guest:***@"), "{log}");
}

/// Routes: sensor data goes to mosquitto unchanged and to RabbitMQ rewritten by a template
/// (`sensors/t1` -> `plants/7/t1`, at most QoS 1); a topic no route takes is refused with
/// PUBACK rc 0x03; a sensor's subscription goes to RabbitMQ through the route's reverse
/// mapping (binding `plants.7.cmd`), and what is published there reaches the sensor under its
/// own topic.
#[test]
fn routes_rewrite_toward_rabbitmq_refuse_the_unrouted_and_map_downlink_back() {
    let rabbit = RabbitMq::start().unwrap();
    let port = rabbit.port().to_string();
    obs(&[
        "declare",
        "--port",
        &port,
        "--queue",
        "plants",
        "--binding",
        "plants.#",
    ])
    .expect_line("READY", WAIT, |l| l == "READY")
    .unwrap();
    let rig = Rig::start_with(|c| {
        c.gateway_id = 7;
        c.extra_sections.push_str(&amqp_section(&rabbit));
        c.extra_sections.push_str(
            "downlink_queue = \"sg-routed\"\n\n\
             [[route]]\nfilter = \"sensors/#\"\nupstreams = [\"cloud\"]\n\
             strip_prefix = \"sensors/\"\ntemplate = \"plants/{gateway_id}/{topic}\"\nqos_max = 1\n\n\
             [[route]]\nfilter = \"sensors/#\"\nupstreams = [\"local\"]\n\n\
             [[route]]\nfilter = \"site/#\"\nupstreams = [\"local\"]\n",
        );
        Ok(())
    })
    .unwrap();
    let mqtt = obs(&[
        "mqtt",
        "--port",
        &rig.broker.port().to_string(),
        "--topic",
        "#",
        "--count",
        "2",
    ]);
    mqtt.expect_line("READY", WAIT, |l| l == "READY").unwrap();

    let mut c = rig.connected("routed-1").unwrap();
    let other = c.register("other/x").unwrap();
    let rc = c
        .publish_qos1(TopicType::Normal, other, false, b"nowhere")
        .unwrap();
    assert_eq!(
        rc,
        sensorgate_tests::sn::RC_NOT_SUPPORTED,
        "a topic no route takes: rc 0x03"
    );
    let site = c.register("site/x").unwrap();
    c.publish_qos1_ok(TopicType::Normal, site, b"local only")
        .unwrap();
    let t1 = c.register("sensors/t1").unwrap();
    c.publish_qos1_ok(TopicType::Normal, t1, b"21.5").unwrap();

    let got = obs(&["get", "--port", &port, "--queue", "plants", "--count", "1"]);
    let to_cloud = json_lines(&got, 1);
    let a = &to_cloud[0];
    assert_eq!(payload(a, "body_hex"), "21.5");
    assert_eq!(a["routing_key"], "plants.7.t1", "rewritten by the template");
    assert_eq!(a["headers"]["sg-topic"], "plants/7/t1");
    assert_eq!(a["headers"]["sg-client"], "routed-1");
    let to_local = json_lines(&mqtt, 2);
    let topics: Vec<&str> = to_local
        .iter()
        .map(|m| m["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        topics,
        ["site/x", "sensors/t1"],
        "local gets both, unchanged"
    );

    // Downlink through the reverse mapping.
    let cmd = c
        .subscribe_ok(Qos::One, SubTopic::Name("sensors/cmd"))
        .unwrap();
    poll_until(
        "binding plants.7.cmd",
        WAIT,
        Duration::from_millis(200),
        || Ok(bound(&rabbit, "sg-routed", "plants.7.cmd").then_some(())),
    )
    .unwrap();
    obs(&[
        "publish",
        "--port",
        &port,
        "--routing-key",
        "plants.7.cmd",
        "--body",
        "open",
    ])
    .expect_line("PUBLISHED", WAIT, |l| l == "PUBLISHED")
    .unwrap();
    match c.recv(WAIT).unwrap() {
        Some(Packet::Publish {
            topic_id,
            msg_id,
            data,
            ..
        }) => {
            assert_eq!((topic_id, &data[..]), (cmd, &b"open"[..]));
            c.send(&sensorgate_tests::sn::puback(topic_id, msg_id, 0))
                .unwrap();
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    let log = rig.gateway.log();
    assert!(
        log.contains("No route matches the topic of a message"),
        "the refusal is logged: {log}"
    );
}
