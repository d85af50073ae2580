#!/usr/bin/env python3
"""MQTT-SN subscriber built on the PyPI mqtt-sn-12 client (MqttSnClient), for the sensorgate
end-to-end tests.

Connects, subscribes with the library's own SUBSCRIBE / SUBACK handling, then receives with
the library's packet classes: REGISTER is answered by the library (process_register ->
REGACK), a QoS 1 PUBLISH gets PUBACK. After --count messages it unsubscribes every
subscription (send_unsubscribe / send_unsubscribe_predefined) and disconnects.

Subscriptions (--sub, repeatable) are QOS:KIND:VALUE with KIND "name" (a topic name or filter;
two characters make it a short topic, as the library does) or "predefined" (a topic id).

stdout, one line each, flushed:

    SUBSCRIBED <topic id from SUBACK> ...   after every SUBACK
    {"topic_id": n, "topic_type": n, "name": str|null, "qos": n, "retain": b, "dup": b,
     "payload_hex": str}                    per PUBLISH
    UNSUBSCRIBED                            after every UNSUBACK
    ERROR <text>                            on failure (exit status 2)
"""

import argparse
import json
import sys
import time

from mqttsn12.MqttSnConstants import MqttSnConstants
from mqttsn12.client.MqttSnClient import MqttSnClient, MqttSnListener
from mqttsn12.client.MqttSnClientException import MqttSnClientException
from mqttsn12.packets import PublishPacket


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--keep-alive", type=int, default=60)
    parser.add_argument("--sub", action="append", required=True, help="QOS:KIND:VALUE")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    c = MqttSnClient()
    c.set_client_id(args.client_id)
    c.set_keep_alive(args.keep_alive)
    c.set_timeout(5)
    listener = MqttSnListener()
    try:
        c.open("127.0.0.1", args.port)
        c.send_connect()
        ids = []
        subs = []
        for spec in args.sub:
            qos, kind, value = spec.split(":", 2)
            if kind == "predefined":
                c.send_subscribe_predefined(int(value), int(qos), listener)
                ids.append(int(value))
            else:
                # send_subscribe does not return the SUBACK's topic id; the library keeps it.
                c.send_subscribe(value, int(qos), listener)
                ids.append(c.search_topic_id(value))
            subs.append((kind, value))
        print("SUBSCRIBED " + " ".join(str(i) for i in ids), flush=True)

        received = 0
        deadline = time.monotonic() + args.timeout
        while received < args.count:
            if time.monotonic() > deadline:
                print(f"ERROR only {received} of {args.count} messages", flush=True)
                return 2
            try:
                c.datagram_socket.settimeout(1.0)
                buf, _addr = c.datagram_socket.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            msg_type = buf[3] if buf[0] == 1 else buf[1]
            if msg_type == MqttSnConstants.TYPE_REGISTER:
                c.process_register(buf)
            elif msg_type == MqttSnConstants.TYPE_PUBLISH:
                p = PublishPacket()
                p.decode(buf)
                if p.get_qos() == 1:
                    c.send_puback(p, MqttSnConstants.ACCEPTED)
                name = None
                if p.get_topic_type_id() == MqttSnConstants.TOPIC_TYPE_NORMAL:
                    name = c.topic_map.get(p.get_topic_id())
                print(
                    json.dumps(
                        {
                            "topic_id": p.get_topic_id(),
                            "topic_type": p.get_topic_type_id(),
                            "name": name,
                            "qos": p.get_qos(),
                            "retain": p.get_retain(),
                            "dup": p.get_dup(),
                            "payload_hex": p.get_data().hex(),
                        }
                    ),
                    flush=True,
                )
                received += 1
            else:
                print(f"ERROR unexpected packet {buf.hex()}", flush=True)
                return 2

        for kind, value in subs:
            if kind == "predefined":
                c.send_unsubscribe_predefined(int(value))
            else:
                c.send_unsubscribe(value)
            print("UNSUBSCRIBED", flush=True)
        c.send_disconnect()
    except MqttSnClientException as e:
        print(f"ERROR {e}", flush=True)
        return 2
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
