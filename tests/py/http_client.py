#!/usr/bin/env python3
"""HTTP client (httpx, httpx_sse) for the sensorgate HTTP ingress end-to-end tests: an
independent implementation of HTTP/1.1, h2c and HTTP/2 over TLS, driven from the Rust tests.
One line per event on stdout, flushed; "ERROR <text>" and exit status 2 on a failure of the
client itself (an HTTP error status is a result, not a failure).

    send --base URL --file F [--http2] [--h2c] [--cacert C] [--cert P --key K]
        Sends the requests of F (JSON lines {"method", "path", "headers": {..},
        "body_b64"}) in order over one client (keep-alive), printing per request
        {"status", "version", "headers": {lower-case name: value}, "body_b64"}; then DONE.
    streams --base URL --path P --count N [--token T] [--h2c]
        N concurrent POSTs (body "<P>:<i>") as one asyncio gather over one client; prints
        {"status", "version", "i"} per answer, then "CONNECTIONS <n>" (connections the pool
        opened) and DONE.
    outage --base URL --devices N --stop-file S [--batch K] [--pace SECONDS]
        N threads, device i POSTing QoS 1 "dev<i>:<seq>" to /v1/publish/out/dev<i> (or batches
        of K consecutive seqs to /v1/publish), one request at a time over a keep-alive client,
        resending the same seq(s) after any non-2xx answer or connection error; prints
        "ACK <i> <first> <last>" for every 200 and "RETRY <i> <what>" for every retry; stops
        once S exists; then DONE.
    sse --base URL --filter F [--filter ..] [--token T] [--count N]
        httpx_sse stream: "READY <data>" on the ready event, then one JSON line per message
        event {"id", "event", "data"} (dropped notices too); DONE after N message events.
"""

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
import time

import httpx

OUT = threading.Lock()


def emit(line: str) -> None:
    with OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def client_kwargs(args) -> dict:
    kw = {"timeout": httpx.Timeout(args.timeout), "trust_env": False}
    if getattr(args, "h2c", False):
        # HTTP/2 by prior knowledge over plain TCP.
        kw["http1"] = False
        kw["http2"] = True
    elif getattr(args, "http2", False):
        kw["http2"] = True
    cacert = getattr(args, "cacert", None)
    if cacert:
        import ssl

        ctx = ssl.create_default_context(cafile=cacert)
        if getattr(args, "cert", None):
            ctx.load_cert_chain(args.cert, args.key)
        kw["verify"] = ctx
    return kw


def send(args) -> int:
    with open(args.file, encoding="utf-8") as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    with httpx.Client(base_url=args.base, **client_kwargs(args)) as client:
        for r in reqs:
            body = base64.b64decode(r.get("body_b64", ""))
            resp = client.request(
                r.get("method", "POST"),
                r["path"],
                headers=r.get("headers", {}),
                content=body if body or r.get("method", "POST") != "GET" else None,
            )
            emit(
                json.dumps(
                    {
                        "status": resp.status_code,
                        "version": resp.http_version,
                        "headers": {k.lower(): v for k, v in resp.headers.items()},
                        "body_b64": base64.b64encode(resp.content).decode(),
                    }
                )
            )
    emit("DONE")
    return 0


async def streams_async(args) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with httpx.AsyncClient(base_url=args.base, **client_kwargs(args)) as client:

        async def one(i: int):
            resp = await client.post(args.path, content=f"{args.path}:{i}".encode(), headers=headers)
            emit(json.dumps({"status": resp.status_code, "version": resp.http_version, "i": i}))

        await asyncio.gather(*(one(i) for i in range(args.count)))
        # httpcore's pool: every connection it opened is still there (keep-alive).
        pool = getattr(client._transport, "_pool", None)
        conns = getattr(pool, "connections", None)
        emit(f"CONNECTIONS {len(conns) if conns is not None else -1}")
    emit("DONE")
    return 0


def streams(args) -> int:
    return asyncio.run(streams_async(args))


def outage_device(args, i: int, stop) -> None:
    seq = 0
    client = httpx.Client(base_url=args.base, **client_kwargs(args))
    try:
        while not stop.is_set():
            if args.batch:
                last = seq + args.batch - 1
                items = [
                    {"topic": f"out/dev{i}", "payload": f"dev{i}:{s}", "qos": 1}
                    for s in range(seq, last + 1)
                ]
                try:
                    resp = client.post(
                        "/v1/publish", json=items, headers={"Content-Type": "application/json"}
                    )
                    status = resp.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
            else:
                last = seq
                try:
                    resp = client.post(f"/v1/publish/out/dev{i}?qos=1", content=f"dev{i}:{seq}")
                    status = resp.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
            if status == 200:
                emit(f"ACK {i} {seq} {last}")
                seq = last + 1
                time.sleep(args.pace)
            else:
                emit(f"RETRY {i} {status}")
                if not isinstance(status, int):
                    # The connection is gone (a killed gateway): a new one next time.
                    client.close()
                    client = httpx.Client(base_url=args.base, **client_kwargs(args))
                # A client's back-off, not a test's wait: the gateway may be restarting.
                time.sleep(0.2)
    finally:
        client.close()


def outage(args) -> int:
    stop = threading.Event()
    threads = [
        threading.Thread(target=outage_device, args=(args, i, stop), daemon=True)
        for i in range(args.devices)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(args.stop_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(args.timeout)
    emit("DONE")
    return 0


def sse(args) -> int:
    from httpx_sse import connect_sse

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    params = [("filter", f) for f in args.filter]
    got = 0
    with httpx.Client(base_url=args.base, **client_kwargs(args)) as client:
        with connect_sse(client, "GET", "/v1/subscribe", params=params, headers=headers) as src:
            if src.response.status_code != 200:
                emit(f"ERROR status {src.response.status_code}: {src.response.read()!r}")
                return 2
            for ev in src.iter_sse():
                if not ev.data:
                    # httpx_sse dispatches the blank line after a keep-alive comment.
                    continue
                if ev.event == "ready":
                    emit(f"READY {ev.data}")
                    continue
                emit(json.dumps({"id": ev.id, "event": ev.event, "data": ev.data}))
                if ev.event == "message":
                    got += 1
                    if args.count and got >= args.count:
                        break
    emit("DONE")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["send", "streams", "outage", "sse"])
    parser.add_argument("--base", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--file")
    parser.add_argument("--path", default="/v1/publish/h2/x")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--token")
    parser.add_argument("--filter", action="append", default=[])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.05)
    parser.add_argument("--stop-file")
    parser.add_argument("--http2", action="store_true")
    parser.add_argument("--h2c", action="store_true")
    parser.add_argument("--cacert")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    try:
        return {"send": send, "streams": streams, "outage": outage, "sse": sse}[args.mode](args)
    except Exception as e:  # noqa: BLE001 - reported to the Rust side, which fails the test
        emit(f"ERROR {type(e).__name__}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
