"""The admin dashboard (admin/dashboard.html served at / and /dashboard):
opened in real headless Chromium driven over the DevTools protocol
(tests/e2e/cdp.py), against a gateway with plugins, a Lua handler, an
upstream of two real processes under active health checks, an admin token
and live traffic. The page asks for the token, shows routes, plugin chains,
targets and a non-zero request rate, turns a killed target "down", fits a
375 px screen, and makes no request outside the admin listener. The
screenshots in docs/ come from this test."""

import base64
import hashlib
import os
import re
import struct
import threading
import urllib.parse

from cdp import Chromium
from harness import ROOT, Client, Gateway, Upstream, free_port, request

TOKEN = "dash-t0ken"

CONFIG = """
local gw = require("moongate.gw")
return {
    listen = { "@LISTEN@" }, workers = 2, log_level = "info",
    shared = { limits = "1m" },
    pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@",
    admin = { listen = "127.0.0.1:%(aport)d", token = "%(token)s" },
    upstreams = {
        users = { targets = { "%(a)s", "%(b)s" }, timeouts = { read = 5 },
                  health = { path = "/health", interval = 0.2, timeout = 0.5,
                             healthy = 2, unhealthy = 2 } },
        flaky = { targets = { "%(c)s" }, timeouts = { read = 5 },
                  breaker = { failures = 3, failure_ratio = 0, open_for = 300 } },
    },
    routes = {
        { name = "users", path = "/users/*", upstream = "users",
          plugins = { ["request-id"] = {}, ["rate-limit"] = { limit = 100000, window = 60 } } },
        { name = "orders", path = "/orders/*", upstream = "users",
          plugins = { ["request-size-limit"] = { limit = "64k" } } },
        { name = "limited", path = "/limited",
          plugins = { ["rate-limit"] = { limit = 2, window = 60 } },
          handler = function(ctx) return 200, { ok = true } end },
        { name = "flaky", path = "/flaky/*", upstream = "flaky" },
        { name = "boom", path = "/boom",
          handler = function(ctx) return 500, { error = "demo failure" } end },
    },
}
"""


def admin_get(aport, path, token=TOKEN):
    hdrs = [("Authorization", "Bearer " + token)] if token else []
    return request(aport, "GET", path, headers=hdrs, host="127.0.0.1")


class Traffic(threading.Thread):
    """Keeps requests flowing (about 30/s) until stopped."""

    PATHS = ["/users/1", "/orders/7", "/users/2", "/limited", "/boom", "/flaky/x?status=500"]

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop_ev = threading.Event()
        self.sent = 0

    def run(self):
        c = None
        i = 0
        while not self.stop_ev.is_set():
            try:
                if c is None:
                    c = Client(self.port, timeout=5)
                c.request("GET", self.PATHS[i % len(self.PATHS)])
                self.sent += 1
            except Exception:  # noqa: BLE001 - a target was killed: reconnect
                if c:
                    c.close()
                c = None
            i += 1
            self.stop_ev.wait(0.03)
        if c:
            c.close()

    def stop(self):
        self.stop_ev.set()
        self.join(10)


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR", data[:32]
    return struct.unpack("!II", data[16:24])


# Screenshots go to build/screenshots; MG_UPDATE_SCREENSHOTS=1 writes the
# ones docs/dashboard.md shows instead (a test run leaves the tree clean).
SHOTS = ROOT / ("docs" if os.environ.get("MG_UPDATE_SCREENSHOTS") == "1"
                else "build/screenshots")


def screenshot(page, path, full=True):
    params = {"format": "png"}
    if full:
        m = page.call("Page.getLayoutMetrics")
        size = m.get("cssContentSize") or m["contentSize"]
        params.update(captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": size["width"],
                            "height": size["height"], "scale": 1})
    data = base64.b64decode(page.call("Page.captureScreenshot", **params)["data"])
    with open(path, "wb") as f:
        f.write(data)
    return data


# What sticks out past 375 px (for the failure message).
WIDE_JS = ("Array.prototype.slice.call(document.querySelectorAll('body *')).filter(function(e){"
           "return e.getBoundingClientRect().right > 375.5;}).slice(0, 12).map(function(e){"
           "return e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect()"
           ".right);}).join(', ')")


def target_state_js(addr, upstream="users", cell="health"):
    return ("(function(){var r=document.querySelector('table[data-upstream=\"%s\"] "
            "tr[data-target=\"%s\"] td.%s');return r ? r.textContent : '';})()"
            % (upstream, addr, cell))


def test_dashboard_shows_live_state_in_chromium_and_talks_only_to_the_admin_listener():
    aport = free_port()
    a, b, c = Upstream(name="a"), Upstream(name="b"), Upstream(name="c")
    with a, b, c:
        conf = CONFIG % {"aport": aport, "token": TOKEN, "a": a.addr, "b": b.addr,
                         "c": c.addr}
        with Gateway(conf) as gw:
            traffic = Traffic(gw.port)
            traffic.start()
            browser = Chromium(gw.dir, width=1280, height=800)
            page = None
            try:
                page = browser.page()
                for domain in ("Network", "Page", "Runtime", "Log"):
                    page.call(domain + ".enable")
                page.call("Emulation.setDeviceMetricsOverride", width=1280, height=800,
                          deviceScaleFactor=1, mobile=False)
                page.call("Emulation.setScrollbarsHidden", hidden=True)
                origin = "http://127.0.0.1:%d" % aport
                page.call("Page.navigate", url=origin + "/")

                # The token form, focused: typed in from the keyboard. A
                # wrong token is refused on the page, the right one works.
                page.wait_for("!document.getElementById('login').hidden && "
                              "document.activeElement.id === 'token'", what="the token form")

                def type_and_enter(text):
                    page.call("Input.insertText", text=text)
                    for kind in ("keyDown", "keyUp"):
                        page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                                  windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                                  **({"text": "\r"} if kind == "keyDown" else {}))

                type_and_enter("not-the-token")
                page.wait_for("document.getElementById('login-error').textContent"
                              ".indexOf('refused') >= 0", what="the refused-token message")
                page.wait_for("document.activeElement.id === 'token'", what="focus back on token")
                type_and_enter(TOKEN)

                # Live data: routes with their plugin chains, both targets
                # healthy, workers, and a request rate above zero.
                page.wait_for("document.getElementById('login').hidden && "
                              "!document.getElementById('main').hidden", what="the dashboard")
                assert page.evaluate("sessionStorage.getItem('moongate-admin-token')") == TOKEN
                routes = page.wait_for(
                    "(function(){var o={};document.querySelectorAll('#routes tr[data-route]')"
                    ".forEach(function(r){o[r.dataset.route]=r.textContent;});"
                    "return Object.keys(o).length === 5 ? o : null;})()", what="5 routes")
                assert "/users/*" in routes["users"] and "request-id" in routes["users"] \
                    and "rate-limit" in routes["users"], routes
                assert "upstream users" in routes["users"], routes
                assert "request-size-limit" in routes["orders"], routes
                assert "Lua handler" in routes["boom"], routes
                for t in (a.addr, b.addr):
                    page.wait_for(target_state_js(t) + ".indexOf('healthy') >= 0",
                                  what="%s healthy" % t)
                # Upstream "flaky" answers 500: three in a row open its breaker.
                page.wait_for(target_state_js(c.addr, "flaky", "breaker") + ".indexOf('open') >= 0",
                              what="the breaker of %s shown open" % c.addr)
                st = admin_get(aport, "/status").json()
                flaky = [u for u in st["upstreams"] if u["name"] == "flaky"][0]
                assert flaky["breaker"] is True and flaky["targets"][0]["breaker"] in (
                    "open", "half_open"), flaky
                rps = page.wait_for(
                    "(function(){var v=parseFloat(document.getElementById('rps').textContent);"
                    "return v > 0 ? v : 0;})()", what="a non-zero request rate")
                print("dashboard shows %.2f req/s (traffic thread sent %d so far)"
                      % (rps, traffic.sent))
                page.wait_for("parseFloat(document.querySelector('#routes tr[data-route=\"users\"]"
                              " td.rate').textContent) > 0", what="a per-route rate")
                page.wait_for("/ms/.test(document.querySelector('#routes tr[data-route=\"users\"]')"
                              ".textContent)", what="p50/p99 latency of route users")
                page.wait_for("!!document.getElementById('chart').querySelector('polyline.rps')",
                              what="the traffic chart")
                page.wait_for("parseInt(document.getElementById('ratelimit').textContent) > 0",
                              what="rate-limit rejections")
                assert page.evaluate("document.getElementById('cache').textContent") == "n/a"
                workers = page.evaluate("document.querySelectorAll('#workers tr[data-worker]')"
                                        ".length")
                assert workers == 2, workers
                assert "running" in page.evaluate("document.getElementById('workers').textContent")
                assert page.evaluate("document.getElementById('generation').textContent") == "1"
                # Styles applied (their CSP hash matched): the dark header.
                bg = page.evaluate("getComputedStyle(document.querySelector('header.top'))"
                                   ".backgroundColor")
                assert bg == "rgb(13, 17, 23)", bg

                # The token is kept for the tab: a reload does not ask again.
                page.call("Page.reload")
                page.wait_for("document.querySelectorAll('#routes tr[data-route]').length === 5",
                              what="the dashboard after a page reload")
                assert page.evaluate("document.getElementById('login').hidden") is True

                # A target dies: the page says so in text.
                b.kill()
                state = page.wait_for(
                    "(function(){var s=%s;return /down/.test(s) ? s : '';})()"
                    % target_state_js(b.addr), timeout=20, what="%s shown down" % b.addr)
                assert "unhealthy" in state, state
                assert "healthy" in page.evaluate(target_state_js(a.addr))
                assert "1 of 2 down" in page.evaluate(
                    "document.getElementById('upstreams').textContent")

                # A refused reload: the page shows the failure and its reason.
                gw.write_config(conf.replace('upstream = "users"', 'upstream = "nope"', 1))
                r = request(aport, "POST", "/reload", body=b"", host="127.0.0.1",
                            headers=[("Authorization", "Bearer " + TOKEN)])
                assert r.status == 400, r
                page.wait_for("/FAILED/.test(document.getElementById('last-reload').textContent)",
                              what="the refused reload")
                shown = page.evaluate("document.getElementById('reload-error').textContent")
                assert shown == r.json()["error"] and "nope" in shown, (shown, r)
                assert page.evaluate("document.getElementById('reloads').textContent") == "0 / 1"
                page.drain(2.5)  # one more poll, so the chart has moved on

                SHOTS.mkdir(parents=True, exist_ok=True)
                png = screenshot(page, str(SHOTS / "dashboard.png"))
                w, h = png_size(png)
                assert w == 1280 and h >= 800, (w, h)

                # Phone width: nothing wider than the screen.
                page.call("Emulation.setDeviceMetricsOverride", width=375, height=800,
                          deviceScaleFactor=1, mobile=True)
                page.drain(2.5)
                sw = page.evaluate("document.documentElement.scrollWidth")
                assert sw <= 375, "horizontal overflow at 375 px: scrollWidth %d; %s" % (
                    sw, page.evaluate(WIDE_JS))
                png = screenshot(page, str(SHOTS / "dashboard-375.png"), full=False)
                assert png_size(png)[0] == 375

                # Every request the page made went to the admin listener.
                page.drain(0.5)
                urls = [e["params"]["request"]["url"] for e in page.events
                        if e["method"] == "Network.requestWillBeSent"]
                assert len(urls) >= 10, urls
                for u in urls:
                    p = urllib.parse.urlsplit(u)
                    assert (p.scheme, p.hostname, p.port) == ("http", "127.0.0.1", aport), u
                paths = {urllib.parse.urlsplit(u).path for u in urls}
                assert {"/", "/status", "/metrics"} <= paths, paths
                # The page itself came with the strict policy, and no script
                # error or policy violation was reported.
                docs = [e["params"]["response"] for e in page.events
                        if e["method"] == "Network.responseReceived"
                        and e["params"]["response"]["url"] == origin + "/"]
                assert docs, "no response event for the page"
                csp = {k.lower(): v for k, v in docs[0]["headers"].items()}
                csp = csp["content-security-policy"]
                assert "default-src 'none'" in csp and "connect-src 'self'" in csp, csp
                assert "'unsafe-inline'" not in csp, csp
                errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"
                          or (e["method"] == "Log.entryAdded"
                              and e["params"]["entry"]["source"] in ("security", "javascript",
                                                                     "violation"))]
                assert not errors, errors
                # And the policy does stop a request elsewhere (here: to the
                # live upstream, which must not see it).
                probe = page.evaluate(
                    "fetch('http://%s/csp-probe').then(function(){return 'sent';},"
                    "function(e){return 'blocked: ' + e;})" % a.addr)
                assert probe.startswith("blocked"), probe
                assert "/csp-probe" not in a.stats()["paths"]
            finally:
                traffic.stop()
                if page:
                    page.close()
                browser.close()


test_dashboard_shows_live_state_in_chromium_and_talks_only_to_the_admin_listener.timeout = 150


def test_page_is_served_without_the_token_and_a_missing_file_is_a_clear_404():
    aport = free_port()
    conf = ("return { listen = { \"@LISTEN@\" }, workers = 1, pid_file = \"@PID_FILE@\", "
            "error_log = \"@ERROR_LOG@\", admin = { listen = \"127.0.0.1:%d\", token = \"%s\" }, "
            "routes = { { path = \"/x\", handler = function() return 200, {} end } } }"
            % (aport, TOKEN))
    with Gateway(conf) as gw:
        for path in ("/", "/dashboard"):
            r = admin_get(aport, path, token=None)
            assert r.status == 200, (path, r)
            assert r.header("content-type") == "text/html; charset=utf-8", r
            csp = r.header("content-security-policy")
            assert csp.startswith("default-src 'none'; script-src 'sha256-"), csp
            assert "style-src 'sha256-" in csp and "frame-ancestors 'none'" in csp, csp
            assert r.body.startswith(b"<!doctype html>"), r.body[:40]
            with open(ROOT / "admin" / "dashboard.html", "rb") as f:
                assert r.body == f.read()
            # The hashes are those of the page's own style and script text.
            for tag, directive in ((b"script", "script-src"), (b"style", "style-src")):
                text = r.body.split(b"<%s>" % tag, 1)[1].split(b"</%s>" % tag, 1)[0]
                digest = base64.b64encode(hashlib.sha256(text).digest()).decode()
                assert "%s 'sha256-%s';" % (directive, digest) in csp, (directive, csp)
        # Only the page is open: the data still needs the token.
        assert admin_get(aport, "/status", token=None).status == 401
        r = request(aport, "POST", "/", body=b"", host="127.0.0.1")
        assert r.status == 405 and r.header("allow") == "GET", r
        assert r.json() == {"error": "the dashboard takes GET only"}, r

    # MOONGATE_HOME without admin/: / is a 404 naming the file, so is the log.
    home = os.path.join(gw.dir, "home")
    os.makedirs(home)
    for d in ("lua", "plugins"):
        os.symlink(str(ROOT / d), os.path.join(home, d))
    with Gateway(conf, env={"MOONGATE_HOME": home}) as gw2:
        want = os.path.join(home, "admin", "dashboard.html")
        r = admin_get(aport, "/", token=None)
        assert r.status == 404, r
        err = r.json()["error"]
        assert err.startswith("dashboard not installed: cannot read " + want), err
        assert "MOONGATE_HOME" in err, err
        gw2.wait_log("dashboard not installed: cannot read " + re.escape(want), timeout=5)
        assert admin_get(aport, "/status").status == 200
