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
    h2-early --base URL --path P --length N [--declare] [--token T] [--then Q]
            [--cacert C]
        The `h2` library by hand over one HTTP/2 connection (h2c by prior knowledge, or TLS
        with ALPN h2 when --cacert): a POST to P announcing N body bytes (a content-length
        header with --declare, else none), sending DATA as fast as flow control allows until
        the response is complete (or the stream is reset); prints {"status", "body_b64",
        "sent", "reset", "reset_after_end", "version"}. Then, with --then, a POST of "after"
        to Q on the same connection: {"then_status"}. Then DONE.
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


class H2Client:
    """One HTTP/2 connection driven frame by frame with the `h2` library (h2c by prior
    knowledge, or TLS with ALPN h2 when --cacert)."""

    def __init__(self, args):
        import socket
        import ssl
        from urllib.parse import urlsplit

        import h2.config
        import h2.connection

        url = urlsplit(args.base)
        self.host, self.port = url.hostname, url.port
        sock = socket.create_connection((self.host, self.port), timeout=args.timeout)
        self.scheme = "http"
        if args.cacert:
            ctx = ssl.create_default_context(cafile=args.cacert)
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=self.host)
            if sock.selected_alpn_protocol() != "h2":
                raise RuntimeError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
            self.scheme = "https"
        sock.settimeout(None)
        self.sock = sock
        self.auth = [("authorization", f"Bearer {args.token}")] if args.token else []
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True)
        )
        self.conn.initiate_connection()
        self.flush()
        self.eof = False
        self.goaway = None
        self.goaway_last_stream = None
        self.streams = {}

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def open(self, path, length):
        """Sends the headers of a POST to `path` (with a content-length when `length` is not
        None); returns its stream id."""
        sid = self.conn.get_next_available_stream_id()
        h = [(":method", "POST"), (":path", path), (":scheme", self.scheme),
             (":authority", f"{self.host}:{self.port}")] + self.auth
        if length is not None:
            h.append(("content-length", str(length)))
        self.streams[sid] = {"status": None, "headers": {}, "body": b"", "ended": False,
                             "reset": None, "reset_after_end": None}
        self.conn.send_headers(sid, h)
        self.flush()
        return sid

    def done(self, sid):
        st = self.streams[sid]
        return self.eof or st["reset"] is not None or (st["ended"] and st["status"] is not None)

    def pump(self, block):
        """Reads what has arrived (waiting up to `block` seconds) and handles its events."""
        import select

        import h2.events

        ready, _, _ = select.select([self.sock], [], [], block)
        if not ready:
            return
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return
        for ev in self.conn.receive_data(data):
            st = self.streams.get(getattr(ev, "stream_id", None))
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                for k, v in ev.headers:
                    k = k.decode() if isinstance(k, bytes) else k
                    v = v.decode() if isinstance(v, bytes) else v
                    st["headers"][k] = v
                st["status"] = int(st["headers"].get(":status", "0"))
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if st is not None:
                    st["body"] += ev.data
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                st["ended"] = True
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                st["reset"] = int(ev.error_code)
                st["reset_after_end"] = st["ended"]
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = int(ev.error_code)
                self.goaway_last_stream = ev.last_stream_id
        self.flush()

    def result(self, sid, **extra):
        st = self.streams[sid]
        out = {
            "status": st["status"],
            "headers": {k: v for k, v in st["headers"].items() if not k.startswith(":")},
            "body_b64": base64.b64encode(st["body"]).decode(),
            "ended": st["ended"],
            "reset": st["reset"],
            "reset_after_end": st["reset_after_end"],
            "goaway": self.goaway,
            "goaway_last_stream": self.goaway_last_stream,
        }
        out.update(extra)
        return out

    def close(self):
        try:
            self.conn.close_connection()
            self.flush()
        except Exception:  # noqa: BLE001 - the server may have closed it already
            pass
        self.sock.close()


def h2_early(args) -> int:
    """See the module doc: an oversized body over HTTP/2, answered before it is all sent."""
    import h2.exceptions

    c = H2Client(args)
    deadline = time.monotonic() + args.timeout
    sid = c.open(args.path, args.length if args.declare else None)
    sent = 0
    chunk = b"x" * 16384
    while time.monotonic() < deadline and not c.done(sid):
        window = 0
        if sent < args.length:
            try:
                window = min(c.conn.local_flow_control_window(sid),
                             c.conn.max_outbound_frame_size, args.length - sent)
            except h2.exceptions.StreamClosedError:
                window = 0
        if window > 0:
            try:
                c.conn.send_data(sid, chunk[:window], end_stream=(sent + window == args.length))
                sent += window
                c.flush()
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            c.pump(0)
        else:
            # Flow control (or the whole body) holds the sender: wait for the server.
            c.pump(0.5)
    # A reset may follow the end of the response: read it if it comes with the next frames.
    if c.streams[sid]["reset"] is None and not c.eof:
        c.pump(0.5)
    emit(json.dumps(c.result(sid, sent=sent, version="HTTP/2")))
    if args.then:
        sid2 = c.open(args.then, 5)
        c.conn.send_data(sid2, b"after", end_stream=True)
        c.flush()
        while time.monotonic() < deadline and not c.done(sid2):
            c.pump(0.5)
        st = c.streams[sid2]
        emit(json.dumps({"then_status": st["status"], "then_reset": st["reset"]}))
    c.close()
    emit("DONE")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["send", "streams", "outage", "sse", "h2-early"])
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
    parser.add_argument("--length", type=int, default=0)
    parser.add_argument("--declare", action="store_true")
    parser.add_argument("--then")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    try:
        return {
            "send": send,
            "streams": streams,
            "outage": outage,
            "sse": sse,
            "h2-early": h2_early,
        }[args.mode](args)
    except Exception as e:  # noqa: BLE001 - reported to the Rust side, which fails the test
        emit(f"ERROR {type(e).__name__}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
