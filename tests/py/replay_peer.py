#!/usr/bin/env python3
"""A backend asking a sensorgate for a replay, one line per event on stdout, flushed.

    replay_peer.py mqtt|amqp --port P --gateway-id G --data N --request JSON [--request ...]
        [--burst] [--timeout S]

Subscribes to the sensor data (MQTT `sensors/#`, paho MQTT 5 QoS 1; AMQP: an exclusive queue
bound to amq.topic with `sensors.#`, pika) and to the replay answers
(`sensorgate/G/replay/result`, AMQP key `sensorgate.G.replay.result`); prints READY. Once N
data messages have arrived it publishes the requests on `sensorgate/G/replay` (AMQP: to
amq.topic with key `sensorgate.G.replay`): one at a time, each after the previous answer, or
all at once with --burst. Every message is one JSON line:
    {"kind": "data", "topic": ..., "payload": ..., "seq": ...}   seq: "sg-seq" / message_id
    {"kind": "result", ...the answer's JSON...}
Then DONE once every request was answered, or TIMEOUT after --timeout seconds (a request the
gateway did not answer, e.g. beyond its answer budget, ends there).
"""

import argparse
import json
import sys
import threading


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Peer:
    def __init__(self, args):
        self.args = args
        self.data = 0
        self.answers = 0
        self.sent = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    # Called with the lock held, from the client's thread.
    def on_data(self, topic, payload, seq):
        emit(json.dumps({"kind": "data", "topic": topic, "payload": payload.decode(errors="replace"), "seq": seq}))
        self.data += 1
        if self.data == self.args.data and self.sent == 0:
            self.send_next()

    def on_result(self, payload):
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = {"unparsed": payload.decode(errors="replace")}
        answer["kind"] = "result"
        emit(json.dumps(answer))
        self.answers += 1
        if self.answers >= len(self.args.request):
            self.done.set()
        elif not self.args.burst:
            self.send_next()

    def send_next(self):
        if self.args.burst:
            while self.sent < len(self.args.request):
                self.publish(self.args.request[self.sent])
                self.sent += 1
        elif self.sent < len(self.args.request):
            self.publish(self.args.request[self.sent])
            self.sent += 1


def run_mqtt(args) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.subscribeoptions import SubscribeOptions

    gid = args.gateway_id
    result_topic = f"sensorgate/{gid}/replay/result"
    peer = Peer(args)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    peer.publish = lambda body: client.publish(f"sensorgate/{gid}/replay", body.encode(), qos=1)

    def on_connect(c, _u, _f, rc, _p):
        if rc.is_failure:
            emit(f"ERROR connect refused: {rc}")
            peer.done.set()
            return
        c.subscribe([("sensors/#", SubscribeOptions(qos=1)), (result_topic, SubscribeOptions(qos=1))])

    def on_subscribe(_c, _u, _m, _rcs, _p):
        emit("READY")
        with peer.lock:
            if args.data == 0 and peer.sent == 0:
                peer.send_next()

    def on_message(_c, _u, msg):
        with peer.lock:
            if msg.topic == result_topic:
                peer.on_result(msg.payload)
                return
            seq = None
            props = getattr(msg, "properties", None)
            for k, v in getattr(props, "UserProperty", None) or []:
                if k == "sg-seq":
                    seq = v
            peer.on_data(msg.topic, msg.payload, seq)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    finished = peer.done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    emit("DONE" if finished else "TIMEOUT")
    return 0


def run_amqp(args) -> int:
    import pika

    gid = args.gateway_id
    result_key = f"sensorgate.{gid}.replay.result"
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=args.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=30,
        retry_delay=0.5,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    queue = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(queue=queue, exchange="amq.topic", routing_key="sensors.#")
    ch.queue_bind(queue=queue, exchange="amq.topic", routing_key=result_key)
    peer = Peer(args)
    peer.publish = lambda body: ch.basic_publish(
        exchange="amq.topic", routing_key=f"sensorgate.{gid}.replay", body=body.encode()
    )

    def on_message(c, method, props, body):
        c.basic_ack(method.delivery_tag)
        if method.routing_key == result_key:
            peer.on_result(body)
        else:
            peer.on_data(method.routing_key, body, props.message_id)
        if peer.done.is_set():
            c.stop_consuming()

    ch.basic_consume(queue=queue, on_message_callback=on_message)
    emit("READY")
    if args.data == 0:
        peer.send_next()
    conn.call_later(args.timeout, ch.stop_consuming)
    ch.start_consuming()
    conn.close()
    emit("DONE" if peer.done.is_set() else "TIMEOUT")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["mqtt", "amqp"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gateway-id", type=int, default=7)
    parser.add_argument("--data", type=int, default=0)
    parser.add_argument("--request", action="append", default=[])
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    return {"mqtt": run_mqtt, "amqp": run_amqp}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
