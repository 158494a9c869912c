#!/usr/bin/python3
"""A JWK Set server for the jwt-auth end-to-end tests (standard library only).

Serves the current JWK Set on GET of any path not starting with /__, and
counts those fetches per path, so a test can tell how often the gateway
fetched. The set and the behaviour are changed at run time:

  POST /__set     body: {"keys": [...]} -> served from now on (200)
  POST /__status  body: {"status": N}   -> fetches are answered N with a
                                           short body instead (200 again
                                           to serve the set)
  GET  /__count   {"fetches": {path: n}, "total": n}
  POST /__reset   zeroes the counters

Usage: jwks_server.py [--port P]   (0 or none: a free port); prints
"ready PORT" on stdout once listening on 127.0.0.1.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"set": {"keys": []}, "status": 200, "fetches": {}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        if self.path == "/__count":
            with LOCK:
                f = dict(STATE["fetches"])
            return self.reply(200, {"fetches": f, "total": sum(f.values())})
        with LOCK:
            STATE["fetches"][self.path] = STATE["fetches"].get(self.path, 0) + 1
            status, jwks = STATE["status"], STATE["set"]
        if status != 200:
            return self.reply(status, {"error": "programmed failure"})
        return self.reply(200, jwks)

    def do_POST(self):
        doc = self.body()
        with LOCK:
            if self.path == "/__set":
                STATE["set"] = doc
            elif self.path == "/__status":
                STATE["status"] = int(doc["status"])
            elif self.path == "/__reset":
                STATE["fetches"] = {}
            else:
                return self.reply(404, {"error": "no such control path"})
        return self.reply(200, {"ok": True})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client gone mid-request (the gateway's fetch timed out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = Server(("127.0.0.1", args.port), Handler)
    print("ready %d" % srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
