#!/usr/bin/env python3
"""Upstream publisher for the sensorgate end-to-end tests (downlink injection).

Publishes the messages of --file (JSON lines, in order) to an MQTT broker with paho-mqtt v2,
over one connection, and waits until every QoS 1/2 message is acknowledged (PUBACK / PUBCOMP):

    {"topic": ..., "payload_hex": ..., "qos": n, "retain": bool}
    {"barrier": true}     waits until everything before it is acknowledged before going on

A barrier matters before a message that must come after the others at the subscriber: the
broker hands an incoming QoS 2 message on only when its PUBREL arrives.

Prints "DONE <n>" and exits 0, or prints "ERROR <text>" and exits 2.
"""

import argparse
import json
import sys
import threading

import paho.mqtt.client as mqtt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    parser.add_argument("--timeout", type=float, default=60.0, help="per wait, seconds")
    args = parser.parse_args()

    with open(args.file, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]

    v5 = args.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    refused = []

    def on_connect(_c, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(args.host, args.port, keepalive=60)
    except OSError as e:
        print(f"ERROR cannot connect to {args.host}:{args.port}: {e}", flush=True)
        return 2
    client.loop_start()
    try:
        if not connected.wait(args.timeout) or refused:
            print(f"ERROR connect: {refused or 'timed out'}", flush=True)
            return 2
        pending = []
        sent = 0

        def wait_all() -> bool:
            for info in pending:
                info.wait_for_publish(args.timeout)
                if not info.is_published():
                    print(f"ERROR message {info.mid} not acknowledged", flush=True)
                    return False
            pending.clear()
            return True

        for line in lines:
            if line.get("barrier"):
                if not wait_all():
                    return 2
                continue
            info = client.publish(
                line["topic"],
                bytes.fromhex(line["payload_hex"]),
                qos=int(line["qos"]),
                retain=bool(line["retain"]),
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                print(f"ERROR publish rc {info.rc}", flush=True)
                return 2
            pending.append(info)
            sent += 1
        if not wait_all():
            return 2
        print(f"DONE {sent}", flush=True)
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
