"""A minimal Chrome DevTools Protocol client over a minimal WebSocket
client (RFC 6455), stdlib only: the HTTP Upgrade handshake, masked client
text frames, server text frames (fragmented or not, any length), ping/pong
and close. Enough for CDP's JSON messages; not a general WebSocket
library (no extensions, no binary messages).

    browser = Chromium(tmpdir, width=1280, height=800)   # headless, own group
    page = browser.page()                                 # a CDP session
    page.call("Page.navigate", url="http://127.0.0.1:9901/")
    page.evaluate("document.title")
    browser.close()
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request

from harness import _kill_group, free_port, spawn

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class CDPError(Exception):
    pass


class WebSocket:
    def __init__(self, url, timeout=10):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws":
            raise ValueError("only ws:// URLs: %r" % url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + ("?" + u.query if u.query else "")
        req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n" % (path, u.hostname, u.port or 80, key))
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CDPError("connection closed during the WebSocket handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise CDPError("WebSocket handshake refused: %s" % lines[0])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if hdrs.get("sec-websocket-accept") != want:
            raise CDPError("bad Sec-WebSocket-Accept %r" % hdrs.get("sec-websocket-accept"))

    def _send_frame(self, opcode, payload):
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def send_text(self, text):
        self._send_frame(0x1, text.encode("utf-8"))

    def _read(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("WebSocket read timed out")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except socket.timeout:
                raise TimeoutError("WebSocket read timed out") from None
            if not chunk:
                raise CDPError("WebSocket closed by the browser")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_text(self, timeout):
        """The next text message (reassembled), answering pings on the way."""
        deadline = time.monotonic() + timeout
        parts = []
        while True:
            b0, b1 = self._read(2, deadline)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if b1 & 0x80:
                raise CDPError("masked frame from the server")
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            payload = self._read(n, deadline)
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise CDPError("WebSocket closed by the browser")
            if opcode not in (0x0, 0x1):
                raise CDPError("unexpected WebSocket opcode %d" % opcode)
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8")

    def close(self):
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


class Session:
    """One CDP target (a page). Events are kept in self.events in order."""

    def __init__(self, ws_url):
        self.ws = WebSocket(ws_url)
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
