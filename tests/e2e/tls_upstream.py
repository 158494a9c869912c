#!/usr/bin/python3
"""An HTTPS/1.1 upstream process for the TLS health-check tests (standard
library only).

Answers every request 200 with JSON {"path", "port"} (`port` is the
server's own, so a test can tell targets apart) and counts the requests
per path; GET /__count (over TLS too) returns {"paths": {path: n}}.

  --client-ca CA  require a client certificate signed by CA (mTLS)
  --silent  accept TCP connections and never answer: no byte of a TLS
            handshake is ever sent (a stuck TLS terminator). What the
            client sends is read and dropped; when a client closes, a line
            "closed SECONDS" (how long it was held) goes to stdout.

Usage: tls_upstream.py --cert C --key K [--client-ca CA] [--port P] [--silent]; prints
"ready PORT" on stdout once listening on 127.0.0.1.
"""

import argparse
import json
import select
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
PATHS = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/__count":
            with LOCK:
                body = json.dumps({"paths": dict(PATHS)}).encode()
        else:
            with LOCK:
                PATHS[self.path] = PATHS.get(self.path, 0) + 1
            body = json.dumps({"path": self.path,
                               "port": self.server.server_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def silent(port):
    """Accepts and holds connections without a byte back."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)
    print("ready %d" % ls.getsockname()[1], flush=True)
    held = {}  # socket -> accepted at (monotonic)
    while True:
        ready, _, _ = select.select([ls] + list(held), [], [], 1.0)
        for s in ready:
            if s is ls:
                c, _ = ls.accept()
                held[c] = time.monotonic()
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                print("closed %.3f" % (time.monotonic() - held.pop(s)), flush=True)
                s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--client-ca")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args()
    if args.silent:
        silent(args.port)
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    if args.client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.client_ca)
    httpd = Server(("127.0.0.1", args.port), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("ready %d" % httpd.server_address[1], flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
