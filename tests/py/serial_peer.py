#!/usr/bin/env python3
"""A scripted MQTT-SN sensor (or a radio-modem forwarder carrying many nodes) on the far end of
a serial line (pyserial), for the sensorgate serial end-to-end tests. Independent of the
gateway's code: its own framers and packet codec, written from the MQTT-SN 1.2 spec and
RFC 1055.

    serial_peer.py --device PATH [--framing length|slip] [--crc crc16|crc32|none]
                   [--forwarder] [--node HEX] [--garbage] [--garbage-gap SECS]
                   [--script FILE]

Reads steps as JSON lines from FILE or, without --script, from stdin as they come (so a test
can wait for a result before sending the next step). Prints JSON lines on stdout, flushed:
    {"event": "recv", "node": HEX|null, "type": "PUBLISH", ...}  every packet received
    {"event": "result", "op": OP, "ok": true, ...}                every step done
    {"event": "error", "op": OP, "error": TEXT}                    then exit status 2
    {"event": "done"}                                              at the end of the script

Steps ({"op": ..., "node": HEX (forwarder mode; default --node), "timeout": SECS (10)}):
    connect     client_id, keep_alive (60), clean (true), will {topic, msg, qos, retain}
                -> CONNECT, WILLTOPICREQ/WILLTOPIC, WILLMSGREQ/WILLMSG, CONNACK; result rc
    register    topic -> REGISTER / REGACK; result topic_id, rc
    publish     topic (registered name) | topic_id + topic_id_type (normal|predefined|short)
                | short ("ab"); qos (-1|0|1|2), payload | payload_hex, retain
                -> PUBLISH (QoS 1: PUBACK; QoS 2: PUBREC, PUBREL, PUBCOMP); result rc
    burst       count, topic_id, payload_prefix: that many QoS 0 PUBLISH in one write, back
                to back (what mqtt-sn-tools' serial bridge writes)
    subscribe   topic, qos (0) -> SUBSCRIBE (topic name) / SUBACK; result topic_id, rc
    expect_publish  count (1), optional (false): waits for that many PUBLISH (answered
                already, see below) within timeout; result publishes [{topic, topic_id,
                payload, qos, retain}]; optional: fewer (or none) is not an error
    ping        -> PINGREQ / PINGRESP
    disconnect  duration (optional) -> DISCONNECT / DISCONNECT
    raw         hex, framed (true): bytes sent as a frame of the line's framing, or as is
    garbage     bytes (16), seed (0), truncated (true): noise and a cut-short frame, then a
                pause of --garbage-gap so the gateway's frame timeout ends them
    pause       secs: keeps the line silent
    close       closes the port (a lost link: nothing is sent)
    reopen      opens the device again, waiting up to timeout for it to reappear

Received packets are answered at once whatever step runs: PUBLISH QoS 1 -> PUBACK, QoS 2 ->
PUBREC (and PUBREL -> PUBCOMP), REGISTER -> REGACK, PINGREQ -> PINGRESP.

--forwarder wraps every message in the 0xFE encapsulation (Ctrl radius 1) with the step's node
id, and files received encapsulations by node id. --garbage runs a `garbage` step before
every step.
"""

import argparse
import binascii
import json
import random
import sys
import time

import serial

# MsgType codes (spec Table 3).
ADVERTISE, SEARCHGW, GWINFO = 0x00, 0x01, 0x02
CONNECT, CONNACK = 0x04, 0x05
WILLTOPICREQ, WILLTOPIC, WILLMSGREQ, WILLMSG = 0x06, 0x07, 0x08, 0x09
REGISTER, REGACK, PUBLISH, PUBACK = 0x0A, 0x0B, 0x0C, 0x0D
PUBCOMP, PUBREC, PUBREL = 0x0E, 0x0F, 0x10
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 0x12, 0x13, 0x14, 0x15
PINGREQ, PINGRESP, DISCONNECT = 0x16, 0x17, 0x18
WILLTOPICUPD, WILLTOPICRESP, WILLMSGUPD, WILLMSGRESP = 0x1A, 0x1B, 0x1C, 0x1D
ENCAPSULATED = 0xFE

NAMES = {
    ADVERTISE: "ADVERTISE",
    SEARCHGW: "SEARCHGW",
    GWINFO: "GWINFO",
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    WILLTOPICREQ: "WILLTOPICREQ",
    WILLTOPIC: "WILLTOPIC",
    WILLMSGREQ: "WILLMSGREQ",
    WILLMSG: "WILLMSG",
    REGISTER: "REGISTER",
    REGACK: "REGACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBCOMP: "PUBCOMP",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    WILLTOPICUPD: "WILLTOPICUPD",
    WILLTOPICRESP: "WILLTOPICRESP",
    WILLMSGUPD: "WILLMSGUPD",
    WILLMSGRESP: "WILLMSGRESP",
}
KNOWN = set(NAMES) | {ENCAPSULATED}

FLAG_DUP, FLAG_RETAIN, FLAG_WILL, FLAG_CLEAN = 0x80, 0x10, 0x08, 0x04
TOPIC_TYPES = {"normal": 0, "predefined": 1, "short": 2}
QOS_BITS = {0: 0x00, 1: 0x20, 2: 0x40, -1: 0x60}

END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD


class PeerError(Exception):
    pass


# ---------------------------------------------------------------- CRCs and framing


def crc16_x25(data: bytes) -> int:
    """CRC-16/X-25 (RFC 1662 FCS-16): reflected 0x1021, init and xorout 0xFFFF."""
    crc = 0xFFFF
    for octet in data:
        crc ^= octet
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC."""
    return binascii.crc32(data) & 0xFFFFFFFF


def trailer(crc: str, message: bytes) -> bytes:
    if crc == "crc16":
        return crc16_x25(message).to_bytes(2, "little")
    if crc == "crc32":
        return crc32(message).to_bytes(4, "little")
    return b""


def slip_escape(data: bytes) -> bytes:
    return data.replace(bytes([ESC]), bytes([ESC, ESC_ESC])).replace(
        bytes([END]), bytes([ESC, ESC_END])
    )


def encode_frame(framing: str, crc: str, message: bytes) -> bytes:
    if framing == "length":
        return message
    return bytes([END]) + slip_escape(message + trailer(crc, message)) + bytes([END])


def length_header(buf: bytes):
    """(total, header octets, msg type), None if more octets are needed, or "garbage"."""
    if not buf:
        return None
    if buf[0] == 0x01:
        if len(buf) < 4:
            return None
        total, hlen = int.from_bytes(buf[1:3], "big"), 3
        if total < 4:
            return "garbage"
    else:
        if buf[0] < 2:
            return "garbage"
        if len(buf) < 2:
            return None
        total, hlen = buf[0], 1
    if buf[hlen] not in KNOWN:
        return "garbage"
    return total, hlen, buf[hlen]


class Deframer:
    """Cuts received octets into messages (Length or SLIP); drops what does not check."""

    def __init__(self, framing: str, crc: str):
        self.framing, self.crc = framing, crc
        self.buf = bytearray()
        self.escaped = False

    def feed(self, data: bytes) -> list:
        if self.framing == "length":
            self.buf += data
            return self._length()
        out = []
        for octet in data:
            if octet == END:
                if self.buf and not self.escaped:
                    out.extend(self._slip_frame(bytes(self.buf)))
                self.buf.clear()
                self.escaped = False
            elif self.escaped:
                self.escaped = False
                self.buf.append({ESC_END: END, ESC_ESC: ESC}.get(octet, octet))
            elif octet == ESC:
                self.escaped = True
            else:
                self.buf.append(octet)
        return out

    def _slip_frame(self, frame: bytes) -> list:
        n = {"crc16": 2, "crc32": 4}.get(self.crc, 0)
        if len(frame) <= n:
            return []
        message, tail = frame[: len(frame) - n], frame[len(frame) - n :]
        return [message] if trailer(self.crc, message) == tail else []

    def _length(self) -> list:
        out = []
        while True:
            head = length_header(self.buf)
            if head is None:
                return out
            if head == "garbage":
                del self.buf[0]
                continue
            total, _, mtype = head
            if mtype == ENCAPSULATED:
                inner = length_header(self.buf[total:])
                if inner is None:
                    return out
                if inner == "garbage":
                    del self.buf[0]
                    continue
                total += inner[0]
            if len(self.buf) < total:
                return out
            out.append(bytes(self.buf[:total]))
            del self.buf[:total]


# ---------------------------------------------------------------- MQTT-SN packets


def packet(mtype: int, body: bytes = b"") -> bytes:
    n = len(body) + 2
    if n < 256:
        return bytes([n, mtype]) + body
    return bytes([0x01]) + (n + 2).to_bytes(2, "big") + bytes([mtype]) + body


def encapsulate(node_id: bytes, message: bytes, radius: int = 1) -> bytes:
    return bytes([3 + len(node_id), ENCAPSULATED, radius & 0x03]) + node_id + message


def u16(value: int) -> bytes:
    return (value & 0xFFFF).to_bytes(2, "big")


def be16(body: bytes, at: int) -> int:
    return int.from_bytes(body[at : at + 2], "big")


def qos_of(flags: int) -> int:
    return {0: 0, 1: 1, 2: 2, 3: -1}[(flags >> 5) & 0x03]


def parse(message: bytes) -> dict:
    """One plain MQTT-SN message as a dict (raises PeerError if malformed)."""
    head = length_header(message)
    if head is None or head == "garbage" or head[0] != len(message):
        raise PeerError(f"malformed message {message.hex()}")
    _, hlen, mtype = head
    body = message[hlen + 1 :]
    p = {"type": NAMES.get(mtype, hex(mtype))}
    if mtype in (CONNACK, WILLTOPICRESP, WILLMSGRESP):
        p["rc"] = body[0]
    elif mtype in (REGACK, PUBACK):
        p.update(topic_id=be16(body, 0), msg_id=be16(body, 2), rc=body[4])
    elif mtype == REGISTER:
        p.update(topic_id=be16(body, 0), msg_id=be16(body, 2), topic=body[4:].decode())
    elif mtype == PUBLISH:
        flags = body[0]
        p.update(
            qos=qos_of(flags),
            retain=bool(flags & FLAG_RETAIN),
            dup=bool(flags & FLAG_DUP),
            topic_id_type=flags & 0x03,
            topic_id=be16(body, 1),
            msg_id=be16(body, 3),
            payload_hex=body[5:].hex(),
        )
        try:
            p["payload"] = body[5:].decode()
        except UnicodeDecodeError:
            pass
    elif mtype in (PUBREC, PUBREL, PUBCOMP, UNSUBACK):
        p["msg_id"] = be16(body, 0)
    elif mtype == SUBACK:
        p.update(qos=qos_of(body[0]), topic_id=be16(body, 1), msg_id=be16(body, 3), rc=body[5])
    elif mtype == DISCONNECT and len(body) == 2:
        p["duration"] = int.from_bytes(body, "big")
    elif mtype == ADVERTISE:
        p["gw_id"] = body[0]
    return p


def unwrap(message: bytes):
    """(node id or None, inner message)."""
    head = length_header(message)
    if head not in (None, "garbage") and head[2] == ENCAPSULATED:
        total, hlen, _ = head
        return message[hlen + 2 : total], message[total:]
    return None, message


# ---------------------------------------------------------------- the peer


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Node:
    """One sensor's state: its inbox, message ids and topic ids."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.inbox = []
        self.next_msg_id = 1
        self.topic_ids = {}  # name -> id
        self.topic_names = {}  # id -> name

    def msg_id(self) -> int:
        value = self.next_msg_id
        self.next_msg_id = value % 0xFFFF + 1
        return value


class SerialPeer:
    def __init__(
        self, device, framing="length", crc="crc16", forwarder=False, node=None, baud=115200
    ):
        self.device, self.baud = device, baud
        self.framing, self.crc, self.forwarder = framing, crc, forwarder
        self.default_node = bytes.fromhex(node) if node else (b"\x01" if forwarder else None)
        self.nodes = {}
        # Packets to answer once a garbage pause is over (None: answer at once).
        self.held = None
        self.deframer = Deframer(framing, crc)
        self.port = None
        self.open()

    # -- the line

    def open(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.port = serial.Serial(self.device, self.baud, timeout=0.05)
                break
            except (serial.SerialException, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self.deframer = Deframer(self.framing, self.crc)

    def close(self) -> None:
        if self.port is not None:
            self.port.close()
            self.port = None

    def write_raw(self, data: bytes) -> None:
        if self.port is None:
            raise PeerError("the port is closed")
        self.port.write(data)
        self.port.flush()

    def node(self, node_id) -> Node:
        if node_id not in self.nodes:
            self.nodes[node_id] = Node(node_id)
        return self.nodes[node_id]

    def send(self, node: Node, message: bytes) -> None:
        if node.node_id is not None:
            message = encapsulate(node.node_id, message)
        self.write_raw(encode_frame(self.framing, self.crc, message))

    def poll(self) -> None:
        """Reads what arrived (up to the port timeout), files and answers it."""
        if self.port is None:
            time.sleep(0.05)
            return
        data = self.port.read(4096)
        for message in self.deframer.feed(data):
            node_id, inner = unwrap(message) if self.forwarder else (None, message)
            try:
                p = parse(inner)
            except (PeerError, IndexError, UnicodeDecodeError):
                emit({"event": "bad", "hex": message.hex()})
                continue
            node = self.node(node_id)
            if p["type"] == "PUBLISH":
                p["topic"] = node.topic_names.get(p["topic_id"])
            emit({"event": "recv", "node": node_id.hex() if node_id is not None else None, **p})
            self.answer(node, p)
            node.inbox.append(p)

    def answer(self, node: Node, p: dict) -> None:
        if self.held is not None:
            # The line must stay silent until the gateway's frame timeout ended the garbage.
            self.held.append((node, p))
            return
        kind = p["type"]
        if kind == "PUBLISH" and p["qos"] == 1:
            self.send(node, packet(PUBACK, u16(p["topic_id"]) + u16(p["msg_id"]) + b"\x00"))
        elif kind == "PUBLISH" and p["qos"] == 2:
            self.send(node, packet(PUBREC, u16(p["msg_id"])))
        elif kind == "PUBREL":
            self.send(node, packet(PUBCOMP, u16(p["msg_id"])))
        elif kind == "REGISTER":
            node.topic_names[p["topic_id"]] = p["topic"]
            self.send(node, packet(REGACK, u16(p["topic_id"]) + u16(p["msg_id"]) + b"\x00"))
        elif kind == "PINGREQ":
            self.send(node, packet(PINGRESP))

    def expect(self, node: Node, kinds, timeout: float, msg_id=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(node.inbox):
                if p["type"] in kinds and (msg_id is None or p.get("msg_id") == msg_id):
                    return node.inbox.pop(i)
            if time.monotonic() >= deadline:
                raise PeerError(f"no {'/'.join(kinds)} within {timeout}s")
            self.poll()

    # -- steps

    def step(self, s: dict) -> dict:
        op = s["op"]
        timeout = float(s.get("timeout", 10))
        node_id = bytes.fromhex(s["node"]) if s.get("node") is not None else self.default_node
        node = self.node(node_id if self.forwarder else None)
        fn = getattr(self, "op_" + op, None)
        if fn is None:
            raise PeerError(f"unknown op {op}")
        return fn(node, s, timeout) or {}

    def op_connect(self, node, s, timeout):
        flags = (FLAG_CLEAN if s.get("clean", True) else 0) | (FLAG_WILL if s.get("will") else 0)
        body = bytes([flags, 0x01]) + u16(int(s.get("keep_alive", 60))) + s["client_id"].encode()
        self.send(node, packet(CONNECT, body))
        will = s.get("will")
        if will:
            self.expect(node, ["WILLTOPICREQ"], timeout)
            wflags = QOS_BITS[int(will.get("qos", 0))] | (FLAG_RETAIN if will.get("retain") else 0)
            self.send(node, packet(WILLTOPIC, bytes([wflags]) + will["topic"].encode()))
            self.expect(node, ["WILLMSGREQ"], timeout)
            self.send(node, packet(WILLMSG, will["msg"].encode()))
        ack = self.expect(node, ["CONNACK"], timeout)
        return {"rc": ack["rc"]}

    def op_register(self, node, s, timeout):
        msg_id = node.msg_id()
        self.send(node, packet(REGISTER, u16(0) + u16(msg_id) + s["topic"].encode()))
        ack = self.expect(node, ["REGACK"], timeout, msg_id)
        if ack["rc"] == 0:
            node.topic_ids[s["topic"]] = ack["topic_id"]
            node.topic_names[ack["topic_id"]] = s["topic"]
        return {"topic_id": ack["topic_id"], "rc": ack["rc"]}

    def publish_packet(self, node, s, msg_id) -> bytes:
        qos = int(s.get("qos", 0))
        if "short" in s:
            short = s["short"].encode()[:2].ljust(2, b"\0")
            tid_type, tid = TOPIC_TYPES["short"], int.from_bytes(short, "big")
        elif "topic" in s:
            if s["topic"] not in node.topic_ids:
                raise PeerError(f"topic {s['topic']} not registered")
            tid_type, tid = TOPIC_TYPES["normal"], node.topic_ids[s["topic"]]
        else:
            tid_type, tid = TOPIC_TYPES[s.get("topic_id_type", "normal")], int(s["topic_id"])
        if "payload_hex" in s:
            payload = bytes.fromhex(s["payload_hex"])
        else:
            payload = s.get("payload", "").encode()
        flags = QOS_BITS[qos] | (FLAG_RETAIN if s.get("retain") else 0) | tid_type
        return packet(PUBLISH, bytes([flags]) + u16(tid) + u16(msg_id if qos > 0 else 0) + payload)

    def op_publish(self, node, s, timeout):
        qos = int(s.get("qos", 0))
        msg_id = node.msg_id() if qos > 0 else 0
        self.send(node, self.publish_packet(node, s, msg_id))
        if qos == 1:
            return {"rc": self.expect(node, ["PUBACK"], timeout, msg_id)["rc"]}
        if qos == 2:
            got = self.expect(node, ["PUBREC", "PUBACK"], timeout, msg_id)
            if got["type"] == "PUBACK":
                return {"rc": got["rc"]}
            self.send(node, packet(PUBREL, u16(msg_id)))
            self.expect(node, ["PUBCOMP"], timeout, msg_id)
            return {"rc": 0}
        return {}

    def op_burst(self, node, s, timeout):
        prefix = s.get("payload_prefix", "")
        data = b"".join(
            encode_frame(
                self.framing,
                self.crc,
                self.publish_packet(node, {**s, "qos": 0, "payload": f"{prefix}{i}"}, 0),
            )
            for i in range(int(s["count"]))
        )
        self.write_raw(data)
        return {"octets": len(data)}

    def op_subscribe(self, node, s, timeout):
        msg_id = node.msg_id()
        flags = QOS_BITS[int(s.get("qos", 0))] | TOPIC_TYPES["normal"]
        self.send(node, packet(SUBSCRIBE, bytes([flags]) + u16(msg_id) + s["topic"].encode()))
        ack = self.expect(node, ["SUBACK"], timeout, msg_id)
        if ack["rc"] == 0 and ack["topic_id"] != 0:
            node.topic_names[ack["topic_id"]] = s["topic"]
        return {"topic_id": ack["topic_id"], "rc": ack["rc"], "qos": ack["qos"]}

    def op_expect_publish(self, node, s, timeout):
        got = []
        deadline = time.monotonic() + timeout
        for _ in range(int(s.get("count", 1))):
            left = max(0.0, deadline - time.monotonic())
            try:
                p = self.expect(node, ["PUBLISH"], left)
            except PeerError:
                if s.get("optional"):
                    break
                raise
            p["topic"] = p.get("topic") or node.topic_names.get(p["topic_id"])
            keys = ("topic", "topic_id", "payload", "payload_hex", "qos", "retain")
            got.append({k: p.get(k) for k in keys})
        return {"publishes": got}

    def op_ping(self, node, s, timeout):
        self.send(node, packet(PINGREQ))
        self.expect(node, ["PINGRESP"], timeout)

    def op_disconnect(self, node, s, timeout):
        body = u16(int(s["duration"])) if "duration" in s else b""
        self.send(node, packet(DISCONNECT, body))
        self.expect(node, ["DISCONNECT"], timeout)

    def op_raw(self, node, s, timeout):
        data = bytes.fromhex(s["hex"])
        if s.get("framed", True):
            self.send(node, data)
        else:
            self.write_raw(data)

    def op_garbage(self, node, s, timeout):
        self.inject_garbage(
            int(s.get("bytes", 16)),
            int(s.get("seed", 0)),
            s.get("truncated", True),
            float(s.get("gap", self.garbage_gap)),
        )

    garbage_gap = 0.3

    def inject_garbage(self, count: int, seed: int, truncated: bool, gap: float) -> None:
        rng = random.Random(seed)
        noise = bytes(rng.randrange(256) for _ in range(count))
        cut = packet(PUBLISH, b"\x20\x00\x01\x00\x07" + b"cut short")
        frame = encode_frame(self.framing, self.crc, cut)
        # Noise first, then a frame cut in half; then silence for the frame timeout (answers to
        # what arrives meanwhile wait: in Length framing they would extend the cut frame).
        self.write_raw(noise + (frame[: len(frame) // 2] if truncated else b""))
        self.held = []
        try:
            self.pause(gap)
        finally:
            held, self.held = self.held, None
        for node, p in held:
            self.answer(node, p)

    def pause(self, secs: float) -> None:
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            self.poll()

    def op_pause(self, node, s, timeout):
        self.pause(float(s["secs"]))

    def op_close(self, node, s, timeout):
        self.close()

    def op_reopen(self, node, s, timeout):
        self.close()
        self.open(timeout)


def steps_from(source):
    for line in source:
        line = line.strip()
        if line and not line.startswith("#"):
            yield json.loads(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--framing", choices=["length", "slip"], default="length")
    parser.add_argument("--crc", choices=["crc16", "crc32", "none"], default="crc16")
    parser.add_argument("--forwarder", action="store_true")
    parser.add_argument("--node", help="default Wireless Node Id (hex) in forwarder mode")
    parser.add_argument("--garbage", action="store_true", help="inject garbage before every step")
    parser.add_argument("--garbage-gap", type=float, default=0.3)
    parser.add_argument("--script", help="JSON-lines steps (default: stdin)")
    args = parser.parse_args()

    op = "open"
    try:
        peer = SerialPeer(
            args.device, args.framing, args.crc, args.forwarder, args.node, args.baud
        )
        peer.garbage_gap = args.garbage_gap
        source = open(args.script, encoding="utf-8") if args.script else sys.stdin
        for n, s in enumerate(steps_from(source)):
            op = s.get("op", "?")
            if args.garbage and op not in ("close", "reopen", "pause") and peer.port is not None:
                peer.inject_garbage(16, n, True, args.garbage_gap)
            result = peer.step(s)
            emit({"event": "result", "op": op, "ok": True, **result})
        emit({"event": "done"})
        return 0
    except (PeerError, serial.SerialException, OSError, KeyError, ValueError) as error:
        emit({"event": "error", "op": op, "error": f"{type(error).__name__}: {error}"})
        return 2


if __name__ == "__main__":
    sys.exit(main())
