#!/usr/bin/env python3
"""CoAP observer for the sensorgate end-to-end tests, with aiocoap's library (RFC 7641).

aiocoap-client 0.4.17 prints the registration's response but no later notification
(chrysn/aiocoap#395, open), so the tests observe through the library instead. One line per
event on stdout, flushed:

    REGISTERED <code> <payload>     the response to GET Observe=0 (e.g. "2.05 Content")
    NOTIFY <code> <payload>         each notification
    OVER <reason>                   the server ended the observation
    DONE                            after --timeout seconds or SIGINT/SIGTERM (the observation
                                    is cancelled first)
    ERROR <text>                    the request failed (exit status 2)

Payloads are printed as UTF-8 (invalid bytes replaced).
"""

import argparse
import asyncio
import signal
import sys

import aiocoap


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def text(msg) -> str:
    return msg.payload.decode("utf-8", "replace")


async def observe(args) -> int:
    ctx = await aiocoap.Context.create_client_context()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.timeout, stop.set)
    tuning = {"transport_tuning": aiocoap.Unreliable} if args.non else {}
    request = aiocoap.Message(code=aiocoap.GET, uri=args.url, observe=0, **tuning)
    requester = ctx.request(request)
    try:
        first = await asyncio.wait_for(requester.response, args.timeout)
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        emit(f"ERROR {e!r}")
        await ctx.shutdown()
        return 2
    emit(f"REGISTERED {first.code} {text(first)}")

    async def notifications():
        try:
            async for n in requester.observation:
                emit(f"NOTIFY {n.code} {text(n)}")
            emit("OVER end")
        except Exception as e:  # noqa: BLE001
            emit(f"OVER {e!r}")

    task = asyncio.create_task(notifications())
    await stop.wait()
    if not requester.observation.cancelled:
        requester.observation.cancel()
    task.cancel()
    await ctx.shutdown()
    emit("DONE")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--non", action="store_true", help="register with a NON request")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    return asyncio.run(observe(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
