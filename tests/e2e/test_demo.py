"""The demo (`make run`) cannot rot: conf/moongate.lua is started through
scripts/run-demo.sh on a free loopback port (MOONGATE_DEMO_LISTEN) and
answered by curl: the proxied public routes, the Lua demo services behind
them, the inline and global plugins."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile

from harness import ROOT, SANITIZER_MARKS, _group_alive, free_port, moongate_bin, spawn, \
    wait_until

DEMO_CONF = ROOT / "conf" / "moongate.lua"
DEMO_SCRIPT = ROOT / "scripts" / "run-demo.sh"


def curl(url):
    p = subprocess.run(["curl", "-s", "-m", "5", "-w", "\n%{http_code}", url],
                       capture_output=True, timeout=15)
    out = p.stdout.decode("utf-8", "replace")
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def port_open(port):
    s = socket.socket()
    try:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def test_demo_config_and_script_serve_users_orders_and_products():
    assert DEMO_CONF.exists(), "conf/moongate.lua is missing"
    gw_port = free_port()
    d = tempfile.mkdtemp(prefix="mg-demo-")
    out_path = os.path.join(d, "demo.out")
    try:
        env = dict(os.environ, MOONGATE_BIN=moongate_bin(), MOONGATE_CONF=str(DEMO_CONF),
                   MOONGATE_DEMO_LISTEN="127.0.0.1:%d" % gw_port,
                   MOONGATE_DEMO_PID=os.path.join(d, "moongate.pid"))
        with open(out_path, "wb") as out:
            p = spawn(["sh", str(DEMO_SCRIPT)], "run-demo.sh", stdout=out,
                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            def ready():
                if p.poll() is not None:
                    raise AssertionError("run-demo.sh exited with %s:\n%s" % (
                        p.returncode, open(out_path).read()))
                try:
                    return curl("http://127.0.0.1:%d/users/1" % gw_port)[0] == 200
                except subprocess.TimeoutExpired:
                    return False
            wait_until(ready, 15, interval=0.1, what="the demo to answer /users/1")
            base = "http://127.0.0.1:%d" % gw_port
            code, body = curl(base + "/users/1")
            assert code == 200 and json.loads(body)["userName"] == "Ada Lovelace", (code, body)
            code, body = curl(base + "/users/")
            assert code == 200 and len(json.loads(body)) == 2, (code, body)
            code, body = curl(base + "/orders/42?expand=items")
            assert code == 200 and json.loads(body)["query"] == "expand=items", (code, body)
            code, body = curl(base + "/products/7")
            assert code == 200 and json.loads(body)["name"] == "desk lamp", (code, body)
            code, body = curl(base + "/products/99")
            assert code == 404 and json.loads(body)["error"] == "product not found", (code, body)
            # The inline per-route plugin's header reaches the client.
            h = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", base + "/users/2"],
                               capture_output=True, timeout=15).stdout.decode()
            assert "X-Demo-Route: /users/*" in h, h
            code, body = curl(base + "/nowhere")
            assert code == 404, (code, body)
            code, body = curl(base + "/users/%2e%2e/x")
            assert code == 404, (code, body)
            # The global plugin counted in shared memory: both the public
            # requests and the proxied ones to the demo services.
            code, body = curl(base + "/stats")
            assert code == 200 and json.loads(body)["requests"] >= 10, (code, body)
            printed = open(out_path).read()
            assert "curl" in printed, "run-demo.sh printed no curl lines:\n" + printed
            # SIGTERM to the script alone: its trap must stop everything.
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError("run-demo.sh did not exit within 15 s of SIGTERM")
            wait_until(lambda: not _group_alive(p.pid), 5,
                       what="the demo's gateway to exit")
            assert not port_open(gw_port), "port %d still open after the demo stopped" % gw_port
            output = open(out_path).read()
            for mark in SANITIZER_MARKS:
                assert mark not in output, "sanitizer report in the demo output:\n" + output
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
    finally:
        shutil.rmtree(d, ignore_errors=True)


test_demo_config_and_script_serve_users_orders_and_products.timeout = 60


def test_demo_config_passes_moongate_check():
    from test_process import run_cli
    code, out, err = run_cli("check", "-c", str(DEMO_CONF))
    assert code == 0, (code, out, err)
