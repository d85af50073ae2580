#!/usr/bin/env python3
"""Broker observer for the sensorgate end-to-end tests.

Subscribes (QoS 2 unless --qos says otherwise) to one or more topic filters on an MQTT broker with paho-mqtt v2 and writes
to stdout, one line each, flushed:

    READY                      once every subscription is acknowledged (SUBACK)
    {"topic": ..., "payload_hex": ..., "qos": n, "retain": bool}   per message
    DONE                       when --count messages arrived or --timeout passed
    ERROR <text>               on a connect or subscribe failure (exit status 2)

With MQTT 5 the subscription asks for retain-as-published, so the retain flag the publisher set
is visible on live messages too.
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", action="append", required=True, help="filter; repeatable")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    parser.add_argument("--qos", type=int, choices=[0, 1, 2], default=2, help="subscription QoS")
    parser.add_argument("--count", type=int, default=0, help="exit after N messages; 0: never")
    parser.add_argument("--timeout", type=float, default=300.0, help="exit after this many s")
    parser.add_argument(
        "--session",
        help="client id of a persistent session (clean session off, no expiry): the broker "
        "keeps the subscription and queues messages while this subscriber is disconnected; "
        "after a lost connection it reconnects by itself",
    )
    args = parser.parse_args()

    v5 = args.protocol == "5"
    if args.session and not v5:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=args.session,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=args.session or "",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
    client.reconnect_delay_set(min_delay=0.1, max_delay=1)
    done = threading.Event()
    failed = []
    received = [0]
    out_lock = threading.Lock()

    def emit(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_connect(c, _userdata, flags, reason_code, _properties):
        if reason_code.is_failure:
            failed.append(f"connect refused: {reason_code}")
            done.set()
            return
        if args.session and flags.session_present:
            return  # The broker kept the subscription (and queued messages meanwhile).
        if v5:
            opts = SubscribeOptions(qos=args.qos, retainAsPublished=True)
            c.subscribe([(t, opts) for t in args.topic])
        else:
            c.subscribe([(t, args.qos) for t in args.topic])

    def on_subscribe(_c, _userdata, _mid, reason_codes, _properties):
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            failed.append(f"subscribe refused: {bad}")
            done.set()
            return
        emit("READY")

    def on_message(_c, _userdata, msg):
        emit(
            json.dumps(
                {
                    "topic": msg.topic,
                    "payload_hex": msg.payload.hex(),
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                }
            )
        )
        received[0] += 1
        if args.count and received[0] >= args.count:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        if args.session and v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0xFFFFFFFF
            client.connect(args.host, args.port, keepalive=30, clean_start=False, properties=props)
        else:
            client.connect(args.host, args.port, keepalive=30)
    except OSError as e:
        emit(f"ERROR cannot connect to {args.host}:{args.port}: {e}")
        return 2
    client.loop_start()
    done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    if failed:
        emit("ERROR " + "; ".join(failed))
        return 2
    emit("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
