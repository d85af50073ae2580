#!/usr/bin/env python3
"""Drives the PyPI mqtt-sn-12 client (MqttSnClient) through a CONNECT with a Will and then a
list of operations, for the sensorgate end-to-end tests.

Operations (--op, repeatable, in order):
    topic:<name>      send_will_topic_update(name)   (WILLTOPICUPD -> WILLTOPICRESP rc 0)
    msg:<text>        send_will_message_update(text) (WILLMSGUPD -> WILLMSGRESP rc 0)
    disconnect        send_disconnect()              (clean DISCONNECT -> DISCONNECT)
    sleep:<secs>      send_disconnect(secs)          (asleep -> DISCONNECT)
    ping              send_ping_req()                (PINGREQ -> PINGRESP)
and then the script exits without another word to the gateway.

Prints "CONNECTED" after CONNACK and "OK <op>" after each operation; on a protocol error prints
"ERROR <text>" and exits 2.
"""

import argparse
import sys

from mqttsn12.client.MqttSnClient import MqttSnClient
from mqttsn12.client.MqttSnClientException import MqttSnClientException


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--keep-alive", type=int, default=60)
    parser.add_argument("--will-topic", required=True)
    parser.add_argument("--will-msg", required=True)
    parser.add_argument("--will-qos", type=int, default=0)
    parser.add_argument("--will-retain", action="store_true")
    parser.add_argument("--op", action="append", default=[])
    args = parser.parse_args()

    c = MqttSnClient()
    c.set_client_id(args.client_id)
    c.set_keep_alive(args.keep_alive)
    c.set_timeout(10)
    c.set_will(args.will_topic, args.will_msg, args.will_qos, args.will_retain)
    try:
        c.open("127.0.0.1", args.port)
        c.send_connect()
        print("CONNECTED", flush=True)
        for op in args.op:
            kind, _, value = op.partition(":")
            if kind == "topic":
                c.send_will_topic_update(value)
            elif kind == "msg":
                c.send_will_message_update(value)
            elif kind == "disconnect":
                c.send_disconnect()
            elif kind == "sleep":
                c.send_disconnect(int(value))
            elif kind == "ping":
                c.send_ping_req()
            else:
                print(f"ERROR unknown op {op}", flush=True)
                return 2
            print(f"OK {op}", flush=True)
    except (MqttSnClientException, TypeError, OSError) as e:
        print(f"ERROR {e!r}", flush=True)
        return 2
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
