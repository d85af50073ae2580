#!/usr/bin/env python3
"""Watches RabbitMQ's event exchange (plugin rabbitmq_event_exchange) with pika.

    amqp_events.py --port P [--key connection.closed] [--timeout S]

Binds a server-named queue to `amq.rabbitmq.event` with the routing key, prints READY, then
one JSON line per event: {"routing_key", "headers"} (header values decoded to text), until
--timeout s; then DONE.
"""

import argparse
import json
import sys


def text(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, dict):
        return {k: text(x) for k, x in v.items()}
    if isinstance(v, list):
        return [text(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def main() -> int:
    import pika

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key", default="connection.closed")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=args.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=30,
        retry_delay=0.5,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    q = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(queue=q, exchange="amq.rabbitmq.event", routing_key=args.key)
    print("READY", flush=True)

    def on_message(c, method, props, _body):
        print(
            json.dumps({"routing_key": method.routing_key, "headers": text(props.headers or {})}),
            flush=True,
        )
        c.basic_ack(method.delivery_tag)

    ch.basic_consume(queue=q, on_message_callback=on_message)
    conn.call_later(args.timeout, ch.stop_consuming)
    ch.start_consuming()
    conn.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
