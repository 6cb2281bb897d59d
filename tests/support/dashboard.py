#!/usr/bin/env python3
"""Drives egret's dashboard in Debian's headless Chromium through chromedriver
(W3C WebDriver over HTTP; Python's standard library only). Runs inside the
test's network namespace, so the browser reaches the API on that namespace's
loopback and nothing else.

usage: dashboard.py URL SCREENSHOT_PNG EXPECT_BEFORE TRIGGER_HOST TRIGGER_PORT [EXPECT_FIRST_SEEN]

1. load URL; wait until the incident feed shows EXPECT_BEFORE (an incident
   made before the page loaded, so it came from /api/v1/events) and the live
   feed is connected;
2. put a marker on `window` (gone if the page reloads);
3. make a new blocked connection from this process to TRIGGER_HOST:TRIGGER_PORT;
4. wait until a row with TRIGGER_PORT appears, pushed (no reload: the marker
   is still there) and the timeline has bars;
5. save a screenshot;
6. with EXPECT_FIRST_SEEN: wait until the first-seen table shows it, then
   filter the feed to `allowed-new` and read the rows left visible;
7. print one JSON line with what was seen.
"""
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Driver:
    def __init__(self):
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="egret-chromium-")
        self.proc = subprocess.Popen(
            ["chromedriver", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                if self.call("GET", "/status")["value"]["ready"]:
                    break
            except (OSError, urllib.error.URLError, KeyError):
                pass
            if time.time() > deadline:
                raise SystemExit("chromedriver did not start")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--window-size=1280,1100",
                            f"--user-data-dir={self.profile}",
                        ],
                    },
                }
            }
        }
        self.session = self.call("POST", "/session", caps)["value"]["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise SystemExit(f"webdriver {method} {path}: {e.code} {e.read()[:500]!r}")

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)["value"]

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, what, script, *args, timeout=30):
        deadline = time.time() + timeout
        while True:
            v = self.js(script, *args)
            if v:
                return v
            if time.time() > deadline:
                body = self.js("return document.body.innerText")
                raise SystemExit(f"timed out waiting for {what}; the page shows:\n{body}")
            time.sleep(0.1)

    def close(self):
        try:
            self.call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


ROW_WITH = """
const want = arguments[0];
return [...document.querySelectorAll('#feed tbody tr')]
  .map(tr => tr.innerText).find(t => t.includes(want)) || null;
"""


def main():
    url, shot, before, host, port = sys.argv[1:6]
    d = Driver()
    try:
        d.s("POST", "/url", {"url": url})
        title = d.js("return document.title")
        first_row = d.wait(f"the stored incident {before}", ROW_WITH, before)
        d.wait("the live feed", "return document.body.dataset.live === 'open'")
        d.js("window.__egretMarker = 42")

        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setblocking(False)
        try:
            s.connect((host, int(port)))
        except BlockingIOError:
            pass
        pushed_row = d.wait(f"a pushed incident to port {port}", ROW_WITH, f":{port}/")
        s.close()
        marker = d.js("return window.__egretMarker || null")
        pushed = d.js("return Number(document.body.dataset.pushed || 0)")
        bars = d.wait(
            "timeline bars",
            "return document.querySelectorAll('#timeline rect.bar').length",
        )
        rules = d.wait(
            "rule counters",
            "return [...document.querySelectorAll('#rules tbody tr')].map(tr => tr.innerText).join('\\n')",
        )
        top = d.wait(
            "top destinations",
            "const t = document.querySelector('#top-destination tbody').innerText; return t.includes(arguments[0]) ? t : null",
            f":{port}/",
        )
        health = d.js("return document.getElementById('health').innerText")
        png = base64.b64decode(d.s("GET", "/screenshot"))
        with open(shot, "wb") as f:
            f.write(png)
        first_seen, filtered = None, None
        if len(sys.argv) > 6:
            first_seen = d.wait(
                "the first-seen table",
                "const t = document.querySelector('#first-seen tbody').innerText; return t.includes(arguments[0]) ? t : null",
                sys.argv[6],
            )
            filtered = d.js(
                """const s = document.getElementById('feed-filter');
                s.value = 'allowed-new';
                s.dispatchEvent(new Event('change'));
                return [...document.querySelectorAll('#feed tbody tr')]
                  .filter(tr => !tr.hidden).map(tr => tr.innerText);"""
            )
        print(
            json.dumps(
                {
                    "title": title,
                    "first_row": first_row,
                    "pushed_row": pushed_row,
                    "marker": marker,
                    "pushed": pushed,
                    "bars": bars,
                    "rules": rules,
                    "top_destinations": top,
                    "health": health,
                    "screenshot_bytes": len(png),
                    "first_seen": first_seen,
                    "filtered": filtered,
                }
            )
        )
    finally:
        d.close()


if __name__ == "__main__":
    main()
