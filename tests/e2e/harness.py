"""Helpers for moongate's end-to-end tests (standard library only).

What is here:
  free_port()              a free TCP port on 127.0.0.1
  Upstream(...)            context manager: tests/e2e/upstream.py on free
                           port(s), ready when it printed "ready"
  Gateway(config)          context manager: writes moongate.lua in a temp
                           dir, starts MOONGATE_BIN -c FILE, waits until it
                           answers; .reload(), .stop(), .log_text(), workers
  lua(value)               Python value -> Lua table constructor text
  Client(port)             a raw-socket HTTP/1.1 client: send any bytes,
                           parse responses (Content-Length, chunked,
                           close-delimited, pipelined, 1xx interim)
  request(port, ...)       one request on a fresh connection
  children(pid), rss_kb()  /proc readers (worker pids, VmRSS/VmHWM)
  run_wrk(...)             wrk bounded in time, output parsed

Every process started here is registered; the runner (run.py) kills and
reports whatever a test left running, and fails a test whose gateway wrote a
sanitizer report (AddressSanitizer, LeakSanitizer, UBSan "runtime error:").
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(HERE))
from upstream import PATTERN_UNIT, pattern_chunks, pattern_piece  # noqa: E402,F401


def moongate_bin():
    b = os.environ.get("MOONGATE_BIN", "build/moongate")
    p = Path(b)
    if not p.is_absolute():
        p = ROOT / p
    return str(p)


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:", "AddressSanitizer:DEADLYSIGNAL",
                   "ERROR: UndefinedBehaviorSanitizer")

# ------------------------------------------------------------ bookkeeping
# The runner calls begin_test()/end_test() around each test.

_lock = threading.Lock()
_procs = []          # [(Popen, description)] started during the current test
_gateways = []       # Gateway objects started during the current test
PROBLEMS = []        # findings that fail the test even if it swallowed them


def begin_test():
    with _lock:
        del _procs[:]
        del _gateways[:]
        del PROBLEMS[:]


def end_test():
    """Kills what the test left running. Returns (leftovers, problems)."""
    leftovers = []
    with _lock:
        procs = list(_procs)
    for p, desc in procs:
        if p.poll() is None:
            leftovers.append("%s (pid %d)" % (desc, p.pid))
        _kill_group(p)
    with _lock:
        problems = list(PROBLEMS)
    return leftovers, problems


def gateways_of_test():
    with _lock:
        return list(_gateways)


def _register(p, desc):
    with _lock:
        _procs.append((p, desc))


def _kill_group(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for f in ("stdout", "stderr", "stdin"):
        s = getattr(p, f, None)
        if s:
            try:
                s.close()
            except OSError:
                pass


def _group_alive(pgid):
    """Live (non-zombie) processes of a process group."""
    alive = []
    for st in _proc_stats():
        if st["pgrp"] == pgid and st["state"] != "Z":
            alive.append(st["pid"])
    return alive


def spawn(argv, desc=None, **kw):
    """Popen in a new session (so its whole group can be killed), registered."""
    kw.setdefault("start_new_session", True)
    p = subprocess.Popen(argv, **kw)
    _register(p, desc or " ".join(map(str, argv))[:80])
    return p


# ------------------------------------------------------------ ports, /proc


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _proc_stats():
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        out.append({"pid": int(name), "state": rest[0], "ppid": int(rest[1]),
                    "pgrp": int(rest[2])})
    return out


def children(pid):
    """Live (non-zombie) child pids of `pid`, sorted."""
    return sorted(st["pid"] for st in _proc_stats()
                  if st["ppid"] == pid and st["state"] != "Z")


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def proc_status_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_kb(pid):
    return proc_status_kb(pid, "VmRSS")


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Polls pred() until true; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# ------------------------------------------------------------ Lua config


class Raw:
    """Lua text inserted verbatim by lua()."""

    def __init__(self, text):
        self.text = text


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LUA_KEYWORDS = {"and", "break", "do", "else", "elseif", "end", "false", "for",
                 "function", "goto", "if", "in", "local", "nil", "not", "or",
                 "repeat", "return", "then", "true", "until", "while"}


def lua_str(s):
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif o < 32 or o == 127:
            out.append("\\%03d" % o)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def lua(v, indent=0):
    """Python value -> Lua constructor text (dict -> table, list -> array)."""
    pad = "  " * (indent + 1)
    if isinstance(v, Raw):
        return v.text
    if v is None:
        return "nil"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return lua_str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return "{}"
        return "{\n" + "".join(pad + lua(x, indent + 1) + ",\n" for x in v) + "  " * indent + "}"
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = []
        for k, x in v.items():
            key = k if (_IDENT.match(k) and k not in _LUA_KEYWORDS) else "[%s]" % lua_str(k)
            items.append(pad + key + " = " + lua(x, indent + 1) + ",\n")
        return "{\n" + "".join(items) + "  " * indent + "}"
    raise TypeError("cannot express %r in Lua" % (v,))


def route(path, upstream="up", **kw):
    d = {"path": path, "upstream": upstream}
    d.update(kw)
    return d


def upstream_conf(*addrs, **kw):
    d = {"targets": list(addrs)}
    d.update(kw)
    return d


# ------------------------------------------------------------ upstream


class Upstream:
    """tests/e2e/upstream.py as a subprocess.

    Upstream() listens on one free port; Upstream(ports=3) on three (one
    process, shared counters; each JSON answer says which port served it).
    """

    def __init__(self, ports=1, name="", fixed_ports=None):
        self.nports = ports
        self.name = name
        self.fixed_ports = fixed_ports or []
        self.proc = None
        self.ports = []

    def __enter__(self):
        argv = [PYTHON, str(HERE / "upstream.py"), "--name", self.name or "up"]
        for p in self.fixed_ports:
            argv += ["--port", str(p)]
        extra = self.nports - len(self.fixed_ports)
        if extra > 0:
            argv += ["--ports", str(extra)]
        self.proc = spawn(argv, "upstream", stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = _readline_timeout(self.proc.stdout, 10)
        if not line.startswith(b"ready "):
            self.kill()
            raise AssertionError("upstream did not start: %r" % line)
        self.ports = [int(x) for x in line.split()[1:]]
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    @property
    def port(self):
        return self.ports[0]

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.ports[0]

    def addrs(self):
        return ["127.0.0.1:%d" % p for p in self.ports]

    def kill(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            _kill_group(self.proc)

    def pause(self):
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stats(self):
        r = request(self.port, "GET", "/__stats", timeout=10)
        assert r.status == 200, r
        return r.json()

    def reset(self):
        r = request(self.port, "POST", "/__reset", timeout=10)
        assert r.status == 200, r


def _readline_timeout(f, timeout):
    result = []

    def rd():
        try:
            result.append(f.readline())
        except Exception as e:  # noqa: BLE001
            result.append(repr(e).encode())

    t = threading.Thread(target=rd, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else b""


# ------------------------------------------------------------ gateway

GEN_RE = re.compile(r"\] ([^:]+): .*\bgeneration (\d+)\b.*\bactive\b")


class Gateway:
    """The real moongate binary on a temp config.

    `config` is a dict (see lua()) or Lua text. Missing listen/workers/
    pid_file/error_log are filled in. In Lua text, @LISTEN@, @PORT@,
    @PID_FILE@, @ERROR_LOG@ and @DIR@ are substituted.
    """

    def __init__(self, config, workers=None, ready_timeout=10, env=None):
        self.dir = tempfile.mkdtemp(prefix="mg-e2e-")
        self.port = free_port()
        self.conf_path = os.path.join(self.dir, "moongate.lua")
        self.pid_file = os.path.join(self.dir, "moongate.pid")
        self.error_log = os.path.join(self.dir, "error.log")
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.stdout_path = os.path.join(self.dir, "stdout.log")
        self.workers = workers
        self.ready_timeout = ready_timeout
        self.env = env
        self.proc = None
        self.pid = None
        self.exit_code = None
        self.final_log = None
        self.write_config(config)

    # -- config

    def render(self, config):
        if isinstance(config, str):
            text = config
            for k, v in (("@LISTEN@", "127.0.0.1:%d" % self.port), ("@PORT@", str(self.port)),
                         ("@PID_FILE@", self.pid_file), ("@ERROR_LOG@", self.error_log),
                         ("@DIR@", self.dir)):
                text = text.replace(k, v)
            if self.workers is None:
                m = re.search(r"\bworkers\s*=\s*(\d+)", text)
                self.workers = int(m.group(1)) if m else 1
            return text
        cfg = {"listen": ["127.0.0.1:%d" % self.port],
               "workers": self.workers or 1,
               "pid_file": self.pid_file,
               "error_log": self.error_log,
               "log_level": "info"}
        cfg.update(config)
        if self.workers is None:
            self.workers = cfg["workers"] if isinstance(cfg["workers"], int) else 1
        # @DIR@ in a string value: the gateway's temp dir (e.g. a log path).
        return "return " + lua(cfg).replace("@DIR@", self.dir) + "\n"

    def write_config(self, config):
        """(Re)writes moongate.lua atomically; does not signal anything."""
        text = self.render(config)
        tmp = self.conf_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, self.conf_path)
        self.config_text = text

    # -- life cycle

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            # __exit__ is not called when __enter__ raises: clean up here.
            self.__exit__(*sys.exc_info())
            raise
        return self

    def start(self):
        with _lock:
            _gateways.append(self)
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = spawn([moongate_bin(), "-c", self.conf_path], "moongate",
                          stdout=self._stdout, stderr=self._stderr,
                          stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        self.pid = self.proc.pid
        self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + self.ready_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("moongate exited with %s during start-up\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            try:
                c = Client(self.port, timeout=2)
                try:
                    c.send(b"GET /__never__ HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n\r\n")
                    c.read_response()
                    # Ready when every worker has its first generation (a
                    # worker builds its Lua VM after the fork: the first
                    # one can answer while another is still starting).
                    if (len(children(self.pid)) >= self.workers
                            and len(self.generations()) >= self.workers):
                        return
                finally:
                    c.close()
            except (OSError, ProtocolError) as e:
                last = e
            time.sleep(0.02)
        raise AssertionError("moongate not answering on port %d after %ss (%r)\n%s"
                             % (self.port, self.ready_timeout, last, self.log_tail()))

    def worker_pids(self):
        return children(self.pid)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        os.kill(self.pid, sig)

    def stop(self, timeout=10, expect_code=0):
        """SIGTERM, wait for a clean exit (all workers gone) within timeout."""
        if not self.running():
            self.exit_code = self.proc.returncode
            return self.exit_code
        self.signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            raise AssertionError("moongate did not exit within %ss of SIGTERM\n%s"
                                 % (timeout, self.log_tail()))
        try:
            wait_until(lambda: not _group_alive(self.pid), 2, what="workers to exit")
        except AssertionError:
            left = _group_alive(self.pid)
            _kill_group(self.proc)
            raise AssertionError("processes %s still running after the master exited" % left)
        if expect_code is not None and self.exit_code != expect_code:
            raise AssertionError("moongate exited with %s after SIGTERM (expected %s)\n%s"
                                 % (self.exit_code, expect_code, self.log_tail()))
        return self.exit_code

    def __exit__(self, etype, exc, tb):
        problems = []
        try:
            if self.running():
                try:
                    self.stop(timeout=10 if etype is None else 3)
                except AssertionError as e:
                    problems.append(str(e))
        finally:
            if self.proc:
                _kill_group(self.proc)
            for f in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
                if f:
                    f.close()
            text = self.log_text()
            for mark in SANITIZER_MARKS:
                if mark in text:
                    problems.append("sanitizer report in the gateway's output (%r):\n%s"
                                    % (mark, _excerpt(text, mark)))
                    break
            self.final_log = text
            shutil.rmtree(self.dir, ignore_errors=True)
        if problems:
            with _lock:
                PROBLEMS.extend(problems)
            if etype is None:
                raise AssertionError("\n".join(problems))
        return False

    # -- logs

    def log_text(self):
        if self.final_log is not None:
            return self.final_log
        parts = []
        for path in (self.error_log, self.stderr_path, self.stdout_path):
            try:
                with open(path, "rb") as f:
                    data = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            if data:
                parts.append(data)
        return "".join(parts)

    def error_log_text(self):
        try:
            with open(self.error_log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_size(self):
        try:
            return os.path.getsize(self.error_log)
        except OSError:
            return 0

    def log_since(self, offset):
        return self.error_log_text()[offset:] if offset else self.error_log_text()

    def log_tail(self, n=30):
        lines = self.log_text().splitlines()
        return "\n".join("    | " + l for l in lines[-n:]) or "    | (empty log)"

    def wait_log(self, pattern, since=0, timeout=10):
        """Waits for a regex in the error log after byte offset `since`."""
        rx = re.compile(pattern)

        def found():
            text = self.error_log_text()[since:]
            m = rx.search(text)
            return m or None

        try:
            return wait_until(found, timeout, interval=0.05, what="log line /%s/" % pattern)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))

    # -- reload

    def generations(self, text=None):
        """{who: highest generation logged as active}."""
        gens = {}
        for line in (text if text is not None else self.error_log_text()).splitlines():
            m = GEN_RE.search(line)
            if m:
                who, g = m.group(1), int(m.group(2))
                gens[who] = max(gens.get(who, 0), g)
        return gens

    def reload(self, config=None, timeout=10):
        """Rewrites the config (if given), sends SIGHUP, waits until every
        worker logged a generation higher than any before. Returns it."""
        if config is not None:
            self.write_config(config)
        before = max(self.generations().values() or [0])
        since = self.log_size()
        self.signal(signal.SIGHUP)
        return self.wait_generation(before, since, timeout)

    def wait_generation(self, before, since, timeout=10):
        def done():
            gens = self.generations(self.error_log_text()[since:])
            newer = [g for g in gens.values() if g > before]
            return max(newer) if len(newer) >= self.workers else None

        try:
            return wait_until(done, timeout, interval=0.02,
                              what="every worker to log a generation above %d active" % before)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))


def _excerpt(text, mark, before=2, after=25):
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if mark in l:
            return "\n".join("    | " + x for x in lines[max(0, i - before):i + after])
    return ""


# ------------------------------------------------------------ HTTP client


class ProtocolError(Exception):
    pass


class Response:
    def __init__(self, version, status, reason, headers, body=b"", chunked=False,
                 trailers=None, framing=None):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers            # [(name, value)] as received
        self.body = body
        self.chunked = chunked
        self.trailers = trailers or []
        self.framing = framing            # "length", "chunked", "close", "none"

    def header(self, name, default=None):
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def has_header(self, name):
        return bool(self.header_all(name))

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise AssertionError("body is not JSON: %r" % self.body[:300])

    def __repr__(self):
        return "<HTTP %s %s %s headers=%r body=%r>" % (
            self.version, self.status, self.reason, self.headers, self.body[:300])


def _lower_tokens(value):
    return {t.strip().lower() for t in value.split(",") if t.strip()}


class Client:
    """A raw HTTP/1.1 client connection that sends exactly the bytes given."""

    def __init__(self, port, timeout=5, host="127.0.0.1"):
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.interim = []   # 1xx responses skipped by read_response

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def _fill(self, timeout=None):
        """Reads more bytes; returns False at EOF/reset."""
        if self.eof:
            return False
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise ProtocolError("timed out waiting for data (%d bytes buffered: %r)"
                                % (len(self.buf), bytes(self.buf[:200])))
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if not self._fill():
                raise ProtocolError("connection closed in the middle of a line (%r)"
                                    % bytes(self.buf[:200]))

    def _read_n(self, n, sink=None):
        out = bytearray() if sink is None else None
        while n > 0:
            if not self.buf and not self._fill():
                raise ProtocolError("connection closed with %d body bytes missing" % n)
            take = min(n, len(self.buf))
            if sink is None:
                out += self.buf[:take]
            else:
                sink(bytes(self.buf[:take]))
            del self.buf[:take]
            n -= take
        return bytes(out) if out is not None else b""

    def read_head(self):
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if not self._fill():
                if not self.buf:
                    raise ProtocolError("connection %s before any response"
                                        % ("reset" if self.reset else "closed"))
                raise ProtocolError("connection closed inside a response head: %r"
                                    % bytes(self.buf[:300]))
        head = bytes(self.buf[:i]).decode("latin-1")
        del self.buf[:i + 4]
        lines = head.split("\r\n")
        m = re.match(r"^(HTTP/\d\.\d) (\d{3})(?: (.*))?$", lines[0])
        if not m:
            raise ProtocolError("bad status line: %r" % lines[0])
        headers = []
        for l in lines[1:]:
            n, sep, v = l.partition(":")
            if not sep:
                raise ProtocolError("bad response header line: %r" % l)
            headers.append((n, v.strip(" \t")))
        return m.group(1), int(m.group(2)), m.group(3) or "", headers

    def read_response(self, head=False, interim=False, sink=None):
        """Reads one response. `head`: it answers a HEAD (no body).
        1xx responses are skipped (kept in .interim) unless `interim`.
        With `sink`, body bytes are passed to it instead of kept."""
        while True:
            version, status, reason, headers = self.read_head()
            r = Response(version, status, reason, headers)
            if 100 <= status < 200:
                if interim:
                    r.framing = "none"
                    return r
                self.interim.append(r)
                continue
            break
        te = ",".join(r.header_all("transfer-encoding"))
        cls = r.header_all("content-length")
        body = bytearray()
        put = sink if sink is not None else body.extend
        if head or status in (204, 304):
            r.framing = "none"
        elif te:
            if te.strip().lower() != "chunked":
                raise ProtocolError("response Transfer-Encoding %r" % te)
            if cls:
                raise ProtocolError("response has both Transfer-Encoding and Content-Length")
            r.framing = "chunked"
            r.chunked = True
            while True:
                line = self._read_line()
                size_txt = line.split(b";", 1)[0].strip()
                if not re.match(rb"^[0-9A-Fa-f]+$", size_txt):
                    raise ProtocolError("bad chunk size line %r" % line)
                size = int(size_txt, 16)
                if size == 0:
                    break
                self._read_n(size, put)
                if self._read_line() != b"":
                    raise ProtocolError("chunk not followed by CRLF")
            while True:
                t = self._read_line()
                if t == b"":
                    break
                r.trailers.append(t.decode("latin-1"))
        elif cls:
            if len(set(cls)) != 1 or not cls[0].isdigit():
                raise ProtocolError("bad response Content-Length %r" % cls)
            r.framing = "length"
            self._read_n(int(cls[0]), put)
        else:
            r.framing = "close"
            while True:
                if self.buf:
                    put(bytes(self.buf))
                    self.buf.clear()
                if not self._fill():
                    break
        r.body = bytes(body)
        return r

    def request(self, method="GET", path="/", headers=None, body=None, version="1.1",
                host="localhost", read=True):
        self.send(build_request(method, path, headers, body, version, host))
        if read:
            return self.read_response(head=(method == "HEAD"))

    def wait_closed(self, timeout=3):
        """True when the peer closes (FIN or RST) within `timeout`, reading
        and discarding what comes before; False if still open then. The bytes
        read are kept in .after_close."""
        deadline = time.monotonic() + timeout
        got = bytearray(self.buf)
        self.buf.clear()
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                self.after_close = bytes(got)
                return False
            try:
                if not self._fill(timeout=left):
                    break
            except ProtocolError:
                self.after_close = bytes(got)
                return False
            got += self.buf
            self.buf.clear()
        self.after_close = bytes(got)
        return True

    def is_open(self, timeout=0.1):
        """False when the peer has closed (FIN or RST seen within `timeout`);
        True otherwise (data waiting to be read counts as open)."""
        if self.eof:
            return False
        if self.buf:
            return True
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16, socket.MSG_PEEK)
        except socket.timeout:
            return True
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return False
        return True

    def has_input(self, timeout=0.1):
        """True when the peer sent something or closed within `timeout`."""
        if self.eof or self.buf:
            return True
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            self.eof = self.reset = True
            return True
        finally:
            self.sock.settimeout(self.timeout)


def build_request(method="GET", path="/", headers=None, body=None, version="1.1",
                  host="localhost"):
    """Request bytes. `headers`: list of (name, value) or dict. A Host header
    is added unless host is None or headers name one; Content-Length is added
    for a body unless headers set Content-Length or Transfer-Encoding."""
    if isinstance(headers, dict):
        headers = list(headers.items())
    headers = list(headers or [])
    names = {n.lower() for n, _ in headers}
    if host is not None and "host" not in names:
        headers.insert(0, ("Host", host))
    if isinstance(body, str):
        body = body.encode("latin-1")
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        headers.append(("Content-Length", str(len(body))))
    lines = ["%s %s HTTP/%s" % (method, path, version)]
    lines += ["%s: %s" % (n, v) for n, v in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data + (body or b"")


def request(port, method="GET", path="/", headers=None, body=None, version="1.1",
            host="localhost", timeout=5):
    """One request on a fresh connection; returns the Response."""
    with Client(port, timeout=timeout) as c:
        return c.request(method, path, headers, body, version, host)


def chunked(*pieces, ext=None, trailers=None):
    """Chunked encoding of pieces (bytes/str); optional chunk extension text
    and trailer lines."""
    out = bytearray()
    for p in pieces:
        if isinstance(p, str):
            p = p.encode("latin-1")
        if not p:
            continue
        out += b"%x" % len(p)
        if ext:
            out += b";" + ext.encode()
        out += b"\r\n" + p + b"\r\n"
    out += b"0\r\n"
    for t in trailers or []:
        out += t.encode("latin-1") + b"\r\n"
    out += b"\r\n"
    return bytes(out)


def pattern_bytes(n):
    return b"".join(pattern_chunks(n))


def pattern_sha256(n, _cache={}):
    if n not in _cache:
        h = hashlib.sha256()
        for piece in pattern_chunks(n):
            h.update(piece)
        _cache[n] = h.hexdigest()
    return _cache[n]


def upstream_saw(resp):
    """The JSON description the upstream sent back (asserts 200)."""
    assert resp.status == 200, "expected 200 from the upstream, got %r" % resp
    return resp.json()


def hdr_values(desc, name):
    """Values of header `name` (case-insensitive) in an upstream description."""
    name = name.lower()
    return [v for n, v in desc["headers"] if n.lower() == name]


def assert_gateway_error(resp, status):
    """A gateway-generated error: the status, JSON {"error": "..."}."""
    assert resp.status == status, "expected %d, got %r" % (status, resp)
    ctype = resp.header("content-type", "")
    assert ctype.startswith("application/json"), \
        "error response Content-Type %r (want application/json): %r" % (ctype, resp)
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], \
        "error body should be {\"error\": \"<reason>\"}: %r" % resp.body


# ------------------------------------------------------------ wrk


class WrkResult:
    def __init__(self, text, code):
        self.text = text
        self.code = code
        m = re.search(r"(\d+) requests in", text)
        self.requests = int(m.group(1)) if m else None
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        self.non2xx = int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        self.socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                                      map(int, m.groups()))) if m else {}
        self.values = dict(re.findall(r"^MG (\w+) (\d+)$", text, re.M))


def run_wrk(url, threads=2, conns=64, duration=10, script=None, timeout_s=5, extra=()):
    """Runs wrk (bounded: killed after duration + 20 s)."""
    argv = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration,
            "--timeout", "%ds" % timeout_s]
    if script:
        argv += ["-s", script]
    argv += list(extra) + [url]
    p = spawn(argv, "wrk", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              stdin=subprocess.DEVNULL)
    try:
        out, _ = p.communicate(timeout=duration + 20)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        raise AssertionError("wrk did not finish within %ds" % (duration + 20))
    res = WrkResult(out.decode("utf-8", "replace"), p.returncode)
    if res.requests is None:
        raise AssertionError("could not parse wrk's output:\n" + res.text)
    return res


# A wrk script counting responses that are not 2xx and responses that carry
# "Connection: close" (a keep-alive connection the gateway gave up), printed
# as "MG <name> <count>" lines at the end.
WRK_COUNT_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0; closes = 0 end
function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  for k, v in pairs(headers) do
    if string.lower(k) == "connection" and string.find(string.lower(v), "close") then
      closes = closes + 1
    end
  end
end
function done(summary, latency, requests)
  local n, c = 0, 0
  for _, t in ipairs(threads) do n = n + t:get("non2xx"); c = c + t:get("closes") end
  io.write(string.format("MG non2xx %d\nMG closes %d\n", n, c))
end
"""


def write_file(dir_, name, text):
    path = os.path.join(dir_, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# ------------------------------------------------------------ common setup


@contextlib.contextmanager
def proxied(routes=None, ports=1, workers=None, upstream_opts=None, **cfg):
    """An Upstream (with `ports` ports) and a Gateway in front of it.

    Upstreams in the config: "up" (the first port) and "u0", "u1", ... (one
    per port), each with `upstream_opts` merged in. `routes` defaults to
    everything ("/*") to "up". Other keyword arguments go into the config.
    Yields (gateway, upstream)."""
    with Upstream(ports=ports) as up:
        opts = upstream_opts or {}
        ups = {"up": upstream_conf(up.addrs()[0], **opts)}
        if ports > 1:
            for i, a in enumerate(up.addrs()):
                ups["u%d" % i] = upstream_conf(a, **opts)
        conf = {"upstreams": ups, "routes": routes or [route("/*")]}
        conf.update(cfg)
        with Gateway(conf, workers=workers) as gw:
            up.reset()  # the readiness probe may have reached the upstream
            yield gw, up
            # Reached only when the test body passed: whatever the gateway
            # forwarded must have been well-formed HTTP/1.1 for the strict
            # upstream (CRLF lines, one framing, valid chunks).
            if up.proc.poll() is None:
                st = up.stats()
                assert st["errors"] == 0, \
                    "the upstream received malformed requests: %r" % st["error_list"]
