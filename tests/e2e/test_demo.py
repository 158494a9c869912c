"""The demo (`make run`) cannot rot: conf/moongate.lua is started through
scripts/run-demo.sh with its three demo upstreams, on free ports (the
config's listen address and upstream ports are rewritten in a temp copy),
and answered by curl."""

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
DEMO_UPSTREAM_PORTS = [9101, 9102, 9103]


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
    text = DEMO_CONF.read_text()
    m = re.search(r"listen\s*=\s*\{\s*\"([^\"]+)\"", text)
    assert m, "no listen address found in conf/moongate.lua"
    listen = m.group(1)
    for p in DEMO_UPSTREAM_PORTS:
        assert "127.0.0.1:%d" % p in text, "conf/moongate.lua no longer targets port %d" % p
    gw_port = free_port()
    ports = [free_port() for _ in DEMO_UPSTREAM_PORTS]
    assert len(set(ports + [gw_port])) == 4
    text = text.replace('"%s"' % listen, '"127.0.0.1:%d"' % gw_port)
    for old, new in zip(DEMO_UPSTREAM_PORTS, ports):
        text = text.replace("127.0.0.1:%d" % old, "127.0.0.1:%d" % new)
    d = tempfile.mkdtemp(prefix="mg-demo-")
    out_path = os.path.join(d, "demo.out")
    try:
        conf = os.path.join(d, "moongate.lua")
        with open(conf, "w") as f:
            f.write(text)
        env = dict(os.environ, MOONGATE_BIN=moongate_bin(), MOONGATE_CONF=conf,
                   DEMO_PORTS=" ".join(map(str, ports)),
                   DEMO_URL="http://127.0.0.1:%d" % gw_port)
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
            for path, service in (("/users/1", "users"), ("/orders/42?expand=items", "orders"),
                                  ("/products/7", "products")):
                code, body = curl("http://127.0.0.1:%d%s" % (gw_port, path))
                assert code == 200, (path, code, body)
                desc = json.loads(body)
                assert desc["service"] == service and desc["path"] == path, desc
            code, body = curl("http://127.0.0.1:%d/nowhere" % gw_port)
            assert code == 404, (code, body)
            printed = open(out_path).read()
            assert "curl" in printed, "run-demo.sh printed no curl lines:\n" + printed
            # SIGTERM to the script alone: its trap must stop everything.
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError("run-demo.sh did not exit within 15 s of SIGTERM")
            wait_until(lambda: not _group_alive(p.pid), 5,
                       what="the demo's gateway and upstreams to exit")
            for port in ports + [gw_port]:
                assert not port_open(port), "port %d still open after the demo stopped" % port
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
