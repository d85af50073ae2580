#!/usr/bin/env python3
"""Observers for the sensorgate AMQP end-to-end tests, one line per event on stdout, flushed.

    declare --port P --queue Q --binding K   durable queue Q bound to amq.topic with K; READY
    get --port P --queue Q --count N         consumes N messages from Q (acks them), one JSON
        line each: {"routing_key", "message_id", "body_hex", "delivery_mode", "headers"};
        then DONE (or after --timeout s)
    publish --port P --routing-key K --body B  publishes B to amq.topic with K (persistent,
        mandatory, publisher confirms); PUBLISHED, or RETURNED when no queue took it
    mqtt --port P --topic F                  MQTT 5 QoS 1 subscriber (paho): READY after
        SUBACK, then one JSON line per message: {"topic", "payload_hex", "seq"} where seq is
        the "sg-seq" user property; DONE after --count messages or --timeout s
"""

import argparse
import json
import sys
import threading


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def amqp_channel(port: int):
    import pika

    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=30,
        retry_delay=0.5,
    )
    conn = pika.BlockingConnection(params)
    return conn, conn.channel()


def declare(args) -> int:
    conn, ch = amqp_channel(args.port)
    ch.queue_declare(queue=args.queue, durable=True)
    ch.queue_bind(queue=args.queue, exchange="amq.topic", routing_key=args.binding)
    conn.close()
    emit("READY")
    return 0


def get(args) -> int:
    conn, ch = amqp_channel(args.port)
    got = [0]

    def on_message(c, method, props, body):
        headers = {}
        for k, v in (props.headers or {}).items():
            headers[k] = v.decode() if isinstance(v, bytes) else v
        emit(
            json.dumps(
                {
                    "routing_key": method.routing_key,
                    "message_id": props.message_id,
                    "body_hex": body.hex(),
                    "delivery_mode": props.delivery_mode,
                    "headers": headers,
                }
            )
        )
        c.basic_ack(method.delivery_tag)
        got[0] += 1
        if got[0] >= args.count:
            c.stop_consuming()

    ch.basic_consume(queue=args.queue, on_message_callback=on_message)
    conn.call_later(args.timeout, ch.stop_consuming)
    ch.start_consuming()
    conn.close()
    emit("DONE")
    return 0


def publish(args) -> int:
    import pika

    conn, ch = amqp_channel(args.port)
    ch.confirm_delivery()
    try:
        ch.basic_publish(
            exchange="amq.topic",
            routing_key=args.routing_key,
            body=args.body.encode(),
            properties=pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
        emit("PUBLISHED")
    except pika.exceptions.UnroutableError:
        emit("RETURNED")
    conn.close()
    return 0


def mqtt(args) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.subscribeoptions import SubscribeOptions

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    done = threading.Event()
    got = [0]

    def on_connect(c, _u, _f, rc, _p):
        if rc.is_failure:
            emit(f"ERROR connect refused: {rc}")
            done.set()
            return
        c.subscribe([(args.topic, SubscribeOptions(qos=1))])

    def on_subscribe(_c, _u, _m, _rcs, _p):
        emit("READY")

    def on_message(_c, _u, msg):
        seq = None
        props = getattr(msg, "properties", None)
        for k, v in getattr(props, "UserProperty", None) or []:
            if k == "sg-seq":
                seq = v
        emit(json.dumps({"topic": msg.topic, "payload_hex": msg.payload.hex(), "seq": seq}))
        got[0] += 1
        if args.count and got[0] >= args.count:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    emit("DONE")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["declare", "get", "publish", "mqtt"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue", default="sg-test")
    parser.add_argument("--binding", default="sensors.#")
    parser.add_argument("--topic", default="sensors/#")
    parser.add_argument("--routing-key", default="")
    parser.add_argument("--body", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    return {"declare": declare, "get": get, "publish": publish, "mqtt": mqtt}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
