"""`moongate explain -c FILE METHOD URL [-H header]...`: the route a request
meets (precedence), the normalized path, the plugin chain per phase in run
order with effective configs, the upstream — without starting anything."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

from harness import moongate_bin

CONFIG = """
return {
  listen = "127.0.0.1:%(port)d",
  pid_file = "%(dir)s/moongate.pid",
  identity_headers = { "X-Tenant" },
  upstreams = {
    users = { targets = { "127.0.0.1:9001", { "127.0.0.1:9002", weight = 3 } } },
    admin = { targets = { "127.0.0.1:9100" }, timeouts = { connect = 2 } },
  },
  plugins = { ["request-id"] = true, cors = { origins = { "https://a.example" } } },
  routes = {
    { path = "/users/me", upstream = "users", methods = { "GET" },
      plugins = { ["key-auth"] = { keys = { k1 = { id = "c1" } } } } },
    { path = "/users/{id}", upstream = "users", name = "user-by-id",
      plugins = { ["rate-limit"] = { limit = 5, window = 60 } } },
    { path = "/users/*", upstream = "users", strip_prefix = true },
    { path = "/admin", upstream = "admin", plugins = { ["request-id"] = false, cors = false } },
    { path = "/admin", upstream = "users", hosts = { "internal.example" }, name = "admin-internal" },
    { path = "/ordered", upstream = "users", order = { "rate-limit", "request-id" },
      plugins = { ["rate-limit"] = { limit = 1, window = 1 },
                  cors = { origins = { "https://b.example" }, max_age = 5 } } },
    { path = "/h", handler = function() return 200, "hi" end,
      plugins = { team = { priority = 20000, access = function() end } } },
    { path = "/*", upstream = "users" },
  },
}
"""


class Explained:
    def __init__(self, proc):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.fields = {}
        self.params = {}
        self.targets = []
        self.phases = {}
        phase = None
        for line in self.out.splitlines():
            m = re.match(r"^(\w+):\s+(.*)$", line)
            if m and not line.startswith(" "):
                self.fields[m.group(1)] = m.group(2)
            m = re.match(r"^  param    (\S+) = (.*)$", line)
            if m:
                self.params[m.group(1)] = m.group(2)
            m = re.match(r"^  target   (\S+) weight (\d+)$", line)
            if m:
                self.targets.append((m.group(1), int(m.group(2))))
            m = re.match(r"^  (rewrite|access|header_filter|body_filter|log):( \(none\))?$",
                         line)
            if m:
                phase = m.group(1)
                self.phases[phase] = []
                continue
            m = re.match(r"^    (\d+)\. (\S+) \(priority (-?[\d.]+)\) (.*)$", line)
            if m and phase:
                assert int(m.group(1)) == len(self.phases[phase]) + 1, line
                self.phases[phase].append((m.group(2), float(m.group(3)),
                                           json.loads(m.group(4))))

    def chain(self, phase):
        return [name for name, _, _ in self.phases[phase]]

    def config(self, phase, name):
        return [c for n, _, c in self.phases[phase] if n == name][0]

    def __repr__(self):
        return "exit %s\n%s%s" % (self.code, self.out, self.err)


class Env:
    def __init__(self, text=CONFIG):
        self.dir = tempfile.mkdtemp(prefix="mg-explain-")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.path = os.path.join(self.dir, "moongate.lua")
        with open(self.path, "w") as f:
            f.write(text % {"port": self.port, "dir": self.dir})

    def explain(self, *args):
        p = subprocess.run([moongate_bin(), "explain", "-c", self.path] + list(args),
                           capture_output=True, text=True, timeout=30)
        return Explained(p)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def with_env(fn):
    def run():
        env = Env()
        try:
            fn(env)
        finally:
            env.close()
    run.__name__ = fn.__name__
    return run


def route_of(e):
    m = re.match(r'routes\[(\d+)\] "([^"]*)" \(name "([^"]*)"\)', e.fields.get("route", ""))
    return m and (int(m.group(1)), m.group(2), m.group(3))


@with_env
def test_the_most_specific_route_wins_never_declaration_order(env):
    e = env.explain("GET", "/users/me")
    assert e.code == 0 and route_of(e) == (1, "/users/me", "/users/me"), e
    e = env.explain("GET", "/users/42")
    assert route_of(e) == (2, "/users/{id}", "user-by-id") and e.params == {"id": "42"}, e
    e = env.explain("GET", "/users/42/orders")
    assert route_of(e)[1] == "/users/*" and 'wildcard "/42/orders"' in e.out, e
    assert "strip_prefix /users" in e.out, e
    # A route whose methods refuse the request lets it fall through.
    e = env.explain("POST", "/users/me")
    assert route_of(e)[1] == "/users/{id}" and e.params == {"id": "me"}, e
    # Same pattern: the route with a host condition wins for that host.
    assert route_of(env.explain("GET", "/admin"))[2] == "/admin"
    e = env.explain("GET", "/admin", "-H", "Host: internal.example")
    assert route_of(e)[2] == "admin-internal", e
    e = env.explain("GET", "http://internal.example:8080/admin")
    assert route_of(e)[2] == "admin-internal", e
    assert route_of(env.explain("GET", "/anything/else"))[1] == "/*"


@with_env
def test_the_path_is_normalized_before_routing(env):
    for raw in ("/a/../admin", "/%61dmin", "//admin", "/x/./../admin", "/users/%2e%2e/admin"):
        e = env.explain("GET", raw)
        assert e.code == 0 and route_of(e)[1] == "/admin", (raw, e)
        assert e.fields["path"] == "/admin (normalized)", (raw, e)
    e = env.explain("GET", "/users/%6De?x=%2e")
    assert e.fields["path"] == "/users/me (normalized)" and e.fields["query"] == "x=%2e", e
    assert route_of(e)[1] == "/users/me"
    e = env.explain("GET", "/admin")
    assert e.fields["path"] == "/admin", e
    for bad in ("/%2e%2e/admin", "/..", "/a/%2Fb", "/a%5Cb", "/a%00", "/a%zz"):
        e = env.explain("GET", bad)
        assert e.code == 1 and e.fields["refused"].startswith("400"), (bad, e)
        assert "route" not in e.fields, e


@with_env
def test_plugins_are_listed_per_phase_in_run_order_with_effective_configs(env):
    e = env.explain("GET", "/users/42")
    # Higher priority first: request-id (11000), cors, rate-limit (910).
    assert sorted(e.phases) == sorted(["rewrite", "access", "header_filter", "body_filter",
                                       "log"]), e
    for phase, entries in e.phases.items():
        prios = [p for _, p, _ in entries]
        assert prios == sorted(prios, reverse=True), (phase, e)
    assert "rate-limit" in e.chain("access"), e
    assert e.chain("rewrite")[0] == "request-id", e
    rl = e.config("access", "rate-limit")
    # Defaults filled in by the schema.
    assert rl["limit"] == 5 and rl["window"] == 60 and rl["algorithm"] == "sliding", rl
    assert rl["storage"] == "local" and rl["by"] == "ip", rl
    # The global cors config applies here.
    cors_phases = [p for p in e.phases if "cors" in e.chain(p)]
    assert cors_phases, e
    assert e.config(cors_phases[0], "cors")["origins"] == ["https://a.example"], e


@with_env
def test_a_route_order_overrides_priorities_and_route_configs_override_globals(env):
    e = env.explain("GET", "/ordered")
    for phase in e.phases:
        chain = e.chain(phase)
        if "rate-limit" in chain and "request-id" in chain:
            assert chain.index("rate-limit") < chain.index("request-id"), (phase, e)
    # `order` first, in its order; the rest by priority.
    assert e.chain("header_filter") == ["rate-limit", "request-id", "cors"], e
    assert e.chain("access") == ["rate-limit", "cors"], e
    cors_phase = [p for p in e.phases if "cors" in e.chain(p)][0]
    conf = e.config(cors_phase, "cors")
    assert conf["origins"] == ["https://b.example"] and conf["max_age"] == 5, conf


@with_env
def test_plugins_turned_off_and_inline_plugins_and_handlers(env):
    e = env.explain("GET", "/admin")
    assert all(chain == [] for chain in e.phases.values()), e
    assert e.fields["upstream"] == "admin (balance round_robin)", e
    assert e.targets == [("127.0.0.1:9100", 1)], e
    assert "timeouts connect 2000 ms" in e.out, e
    e = env.explain("GET", "/h")
    assert e.fields["upstream"].startswith("none: the route's Lua handler answers"), e
    assert e.chain("access")[0] == "team", e
    assert e.config("access", "team")["access"] == "<function>", e


@with_env
def test_the_upstream_with_targets_and_balancer(env):
    e = env.explain("GET", "/users/7")
    assert e.fields["upstream"] == "users (balance round_robin)", e
    assert e.targets == [("127.0.0.1:9001", 1), ("127.0.0.1:9002", 3)], e


@with_env
def test_headers_the_gateway_strips_are_named(env):
    e = env.explain("GET", "/users/7", "-H", "X-User-ID: 1", "-H", "X-Tenant: t",
                    "-H", "x_forwarded: y", "-H", "Accept: */*")
    assert "X-User-ID: removed before any plugin runs (identity header)" in e.out, e
    assert "X-Tenant: removed before any plugin runs (identity header)" in e.out, e
    assert "x_forwarded: dropped: header names with '_' are never forwarded" in e.out, e
    assert "Accept: passed to the plugins and the upstream" in e.out, e


@with_env
def test_no_route_bad_method_and_bad_arguments(env):
    text = CONFIG.replace('{ path = "/*", upstream = "users" },', "")
    other = Env(text)
    try:
        e = other.explain("GET", "/nowhere")
        assert e.code == 1 and e.fields["route"] == "none: the gateway answers 404", e
    finally:
        other.close()
    e = env.explain("BREW", "/users/1")
    assert e.code == 1 and e.fields["refused"].startswith("501"), e
    e = env.explain("GET")
    assert e.code == 2 and "usage: moongate explain" in e.err, e
    e = env.explain("GET", "/a", "/b")
    assert e.code == 2 and "unexpected argument '/b'" in e.err, e
    e = env.explain("GET", "/a", "-H", "no colon")
    assert e.code == 2 and "bad header 'no colon'" in e.err, e


def test_an_invalid_config_is_reported_and_nothing_is_started():
    env = Env(CONFIG.replace("limit = 5,", 'limit = "five",'))
    try:
        e = env.explain("GET", "/users/1")
        assert e.code == 2, e
        assert ('%s: routes[2] "/users/{id}": plugins.rate-limit.limit' % env.path) in e.err, e
    finally:
        env.close()
    env = Env()
    try:
        e = env.explain("GET", "/users/1")
        assert e.code == 0, e
        # Nothing was started: no pid file, the configured port is free.
        assert not os.path.exists(os.path.join(env.dir, "moongate.pid"))
        s = socket.socket()
        s.bind(("127.0.0.1", env.port))
        s.close()
    finally:
        env.close()
