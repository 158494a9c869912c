"""A minimal Chrome DevTools Protocol client over the tests' stdlib
WebSocket client (mgws.py). Enough for CDP's JSON messages.

    browser = Chromium(tmpdir, width=1280, height=800)   # headless, own group
    page = browser.page()                                 # a CDP session
    page.call("Page.navigate", url="http://127.0.0.1:9901/")
    page.evaluate("document.title")
    browser.close()
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request

from harness import _kill_group, free_port, spawn
from mgws import WebSocket


class CDPError(Exception):
    pass


class Session:
    """One CDP target (a page). Events are kept in self.events in order."""

    def __init__(self, ws_url):
        self.ws = WebSocket.connect(ws_url)
        self.next_id = 1
        self.events = []

    def _pump(self, timeout):
        msg = json.loads(self.ws.recv_text(timeout))
        if "method" in msg and "id" not in msg:
            self.events.append(msg)
        return msg

    def call(self, method, timeout=20, **params):
        mid = self.next_id
        self.next_id += 1
        self.ws.send_text(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer to %s in %ss" % (method, timeout))
            msg = self._pump(left)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise CDPError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})

    def drain(self, seconds):
        """Collects events for `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self._pump(left)
            except TimeoutError:
                return

    def evaluate(self, expr, timeout=20):
        """The value of a JS expression (promises awaited); JS errors raise."""
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expr,
                      returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise CDPError("JS error in %r: %s"
                           % (expr[:80], json.dumps(r["exceptionDetails"])[:500]))
        return r["result"].get("value")

    def wait_for(self, expr, timeout=20, what=None):
        """Polls a JS expression until it is truthy; returns its value. A JS
        error (the page not there yet) counts as not yet."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expr)
            except CDPError as e:
                last = e
            if last and not isinstance(last, CDPError):
                return last
            self.drain(0.2)
        raise AssertionError("timed out after %ss waiting for %s (last value %r)"
                             % (timeout, what or expr, last))

    def close(self):
        self.ws.close()


def chromium_bin():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    raise AssertionError("chromium is not installed (sh scripts/install-deps.sh)")


class Chromium:
    """Headless Chromium in its own process group, on a fresh profile."""

    def __init__(self, tmpdir, width=1280, height=800):
        self.port = free_port()
        self.profile = os.path.join(tmpdir, "chromium-profile")
        os.makedirs(self.profile, exist_ok=True)
        self.log_path = os.path.join(tmpdir, "chromium.log")
        self.log = open(self.log_path, "wb")
        argv = [chromium_bin(), "--headless=new", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=%d" % self.port,
                "--user-data-dir=" + self.profile, "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--metrics-recording-only",
                "--window-size=%d,%d" % (width, height), "about:blank"]
        self.proc = spawn(argv, "chromium", stdout=self.log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
        self._json("/json/version", timeout=20)

    def _json(self, path, timeout=5, method="GET"):
        deadline = time.monotonic() + timeout
        while True:
            try:
                req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path),
                                             method=method)
                with urllib.request.urlopen(req, timeout=2) as r:
                    return json.loads(r.read())
            except (OSError, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("chromium's DevTools endpoint did not answer; log:\n"
                                         + self.log_text()[-3000:])
                time.sleep(0.1)

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def page(self):
        """A session on the first page target (about:blank)."""
        targets = self._json("/json/list")
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            pages = [self._json("/json/new?about:blank", method="PUT")]
        return Session(pages[0]["webSocketDebuggerUrl"])

    def close(self):
        _kill_group(self.proc)
        self.log.close()
