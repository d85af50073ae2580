"""Drives the field console (`/` of the admin listener) in headless Chromium via chromedriver.

Loads the page, enters the admin token when asked, waits (bounded) until it shows the health,
the upstream as up, at least N sessions and the client's row, checks the rendered values
against `/status` fetched independently (urllib), uses the clients search box, checks a phone
viewport has no horizontal scrolling, and saves a desktop and a phone screenshot.

Prints `screenshot: <path>` per screenshot and `ok` at the end; exits non-zero with a message
on any failure. Every wait is bounded by --timeout.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The console's page size for /clients.
PAGE = 50


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def wait_for(what, timeout, fn, every=0.1):
    """Polls fn until it returns a truthy value; fails naming `what` (and the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
            if last and not isinstance(last, Mismatch):
                return last
        except Exception as e:  # a stale element while the page re-renders: try again
            last = repr(e)
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout}s waiting for {what}; last: {last}")
        time.sleep(every)


class Mismatch(str):
    """A falsy-by-contract description of what still differs."""


def status(base, token):
    req = urllib.request.Request(base + "/status")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def by_id(d, id_):
    els = d.find_elements(By.ID, id_)
    return els[0] if els else None


def text(d, id_):
    e = by_id(d, id_)
    return e.text.strip() if e else None


def value(d, id_):
    e = by_id(d, id_)
    return e.get_attribute("data-value") if e else None


def row_ids(d):
    return [r.get_attribute("data-client-id") for r in d.find_elements(By.CSS_SELECTOR, "#clients-table tr")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--min-sessions", type=int, default=1)
    ap.add_argument("--total-clients", type=int, default=0,
                    help="the number of clients connected; > 50 checks the table's paging")
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            fail(f"{path} not found: apt-get install chromium chromium-driver (scripts/test does)")
    os.makedirs(a.artifacts, exist_ok=True)

    profile = tempfile.TemporaryDirectory(prefix="sensorgate-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--window-size=1280,1100",
                f"--user-data-dir={profile.name}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        run(driver, a)
    finally:
        driver.quit()
        profile.cleanup()


def run(d, a):
    t = a.timeout
    up_state = f"upstream-{a.upstream}-state"
    up_backlog = f"upstream-{a.upstream}-backlog"
    d.get(a.url + "/")

    if a.token:
        # Without a token the page is told 401 and asks for one.
        form = wait_for("the token form", t,
                        lambda: by_id(d, "token-form") if by_id(d, "token-form").is_displayed() else None)
        d.find_element(By.ID, "token-input").send_keys(a.token)
        d.find_element(By.ID, "token-save").click()
        wait_for("the token form to go", t, lambda: not form.is_displayed())
        stored = d.execute_script("return sessionStorage.getItem('sensorgate-admin-token')")
        if stored != a.token:
            fail(f"token not kept in sessionStorage: {stored!r}")

    wait_for("a health verdict", t, lambda: text(d, "health") in ("HEALTHY", "DEGRADED", "UNHEALTHY"))
    wait_for(f"upstream {a.upstream} shown up", t, lambda: text(d, up_state) == "up")
    wait_for(f">= {a.min_sessions} sessions", t,
             lambda: (text(d, "sessions-total") or "").isdigit()
             and int(text(d, "sessions-total")) >= a.min_sessions)
    wait_for(f"client {a.client_id} in the table", t, lambda: a.client_id in row_ids(d))

    # The rendered values against /status, read independently; both move while the page
    # polls, so wait for one moment where they agree.
    def agree():
        doc = status(a.url, a.token)
        up = next((u for u in doc["upstreams"] if u["name"] == a.upstream), None)
        if up is None:
            fail(f"/status has no upstream {a.upstream}: {doc['upstreams']}")
        want = {
            "health": doc["health"]["state"],
            up_state: "up" if up["connected"] else "down",
            up_backlog: str(up["backlog"]["records"]),
            "sessions-total": str(sum(p["sessions_total"] for p in doc["protocols"])),
            "spool-bytes": str(doc["spool"]["bytes"]),
            "spool-max": str(doc["spool"]["max_bytes"]),
            "spool-records": str(doc["spool"]["records"]),
        }
        got = {k: value(d, k) for k in want}
        if got != want:
            return Mismatch(f"page {got} vs /status {want}")
        return want
    agreed = wait_for("the page to agree with /status", t, agree, every=0.5)
    print("agreed: " + json.dumps(agreed), flush=True)
    if text(d, "gateway-name") is None or not text(d, "gateway-name"):
        fail("the gateway's name is not shown")

    # The search box: the client's own id finds it; a prefix nothing has empties the table.
    search = d.find_element(By.ID, "clients-search")
    search.clear()
    search.send_keys(a.client_id)
    wait_for("the search to find the client", t,
             lambda: row_ids(d) and all(r.startswith(a.client_id) for r in row_ids(d))
             and a.client_id in row_ids(d))
    search.send_keys("-no-such-client")
    wait_for("the search to match nothing", t,
             lambda: row_ids(d) == [] and by_id(d, "clients-empty").is_displayed())
    search.clear()
    search.send_keys(" ")  # an input event; the prefix is trimmed
    wait_for("the table to come back", t, lambda: a.client_id in row_ids(d))

    if a.total_clients > PAGE:
        # The first page, then "More" fetches the rest through the `next` cursor.
        wait_for(f"the first page of {PAGE} clients", t,
                 lambda: len(row_ids(d)) == PAGE and by_id(d, "clients-more").is_displayed())
        d.find_element(By.ID, "clients-more").click()
        wait_for(f"all {a.total_clients} clients after More", t,
                 lambda: len(row_ids(d)) == a.total_clients
                 and not by_id(d, "clients-more").is_displayed())
        ids = row_ids(d)
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            fail(f"the pages overlap or are out of order: {ids}")

    # The chart's rates need two samples of /status: wait for them before the screenshot.
    wait_for("the message rates", t,
             lambda: (value(d, "rate-in") or "").replace(".", "", 1).isdigit()
             and (value(d, "rate-out") or "").replace(".", "", 1).isdigit())
    search.send_keys(Keys.TAB)  # leave the box so the page shows from its top
    d.execute_script("window.scrollTo(0, 0)")
    desktop = os.path.join(a.artifacts, "console.png")
    if not d.save_screenshot(desktop):
        fail(f"cannot save {desktop}")
    print(f"screenshot: {desktop}", flush=True)

    d.set_window_size(390, 844)
    wait_for("the phone layout", t, lambda: d.execute_script("return window.innerWidth") <= 400)
    overflow = d.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if overflow > 1:
        fail(f"the page scrolls sideways on a phone by {overflow}px")
    d.execute_script("window.scrollTo(0, 0)")
    phone = os.path.join(a.artifacts, "console-phone.png")
    if not d.save_screenshot(phone):
        fail(f"cannot save {phone}")
    print(f"screenshot: {phone}", flush=True)

    errors = [e for e in d.get_log("browser")
              if e.get("level") == "SEVERE" and "status of 401" not in e.get("message", "")]
    if errors:
        fail(f"the page logged errors: {errors}")
    print("ok", flush=True)


if __name__ == "__main__":
    main()
