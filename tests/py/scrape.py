#!/usr/bin/env python3
"""Scrapes a sensorgate /metrics endpoint and parses it with the Prometheus project's own
Python parser (prometheus_client), for the sensorgate end-to-end tests: an independent check
that the exposition is valid, in both formats.

    scrape.py --url http://127.0.0.1:PORT/metrics [--token T] [--format openmetrics|text]

stdout: one JSON object mapping each sample, written `name{label="value",...}` with labels
sorted by name (no braces without labels), to its value; the metric families' types under
the key "__types__". Exit status 1 with the reason on stderr when the fetch or the parse fails.
"""

import argparse
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token")
    parser.add_argument("--format", choices=["openmetrics", "text"], default="openmetrics")
    args = parser.parse_args()
    accept = (
        "application/openmetrics-text; version=1.0.0"
        if args.format == "openmetrics"
        else "text/plain; version=0.0.4"
    )
    request = urllib.request.Request(args.url, headers={"Accept": accept})
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            content_type = response.headers.get("Content-Type", "")
            body = response.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - the reason is the test's message
        print(f"fetch failed: {e}", file=sys.stderr)
        return 1
    want = "application/openmetrics-text" if args.format == "openmetrics" else "text/plain"
    if not content_type.startswith(want):
        print(f"content type {content_type!r}, expected {want}", file=sys.stderr)
        return 1
    parse = parse_openmetrics if args.format == "openmetrics" else parse_text
    out = {"__types__": {}}
    try:
        for family in parse(body):
            out["__types__"][family.name] = family.type
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                key = f"{sample.name}{{{labels}}}" if labels else sample.name
                out[key] = sample.value
    except Exception as e:  # noqa: BLE001
        print(f"parse failed: {e}\n{body}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
