#!/usr/bin/python3
"""Helpers for bench/run.sh: ports, process CPU time, wrk and h2load parsing, the report.

run.sh does the orchestration (processes, pinning, rounds); this file does
what is awkward in POSIX sh: binding a socket, summing /proc counters over a
process group, parsing wrk's text output and the statistics of the final
table. Standard library only. It is not a load generator and starts nothing.

run.sh starts every server with setsid, so a server's first pid is also its
session id, and every process it forks (master, workers) stays in that
session: "SID" below is that pid.

Subcommands:
  port                    print a free TCP port on 127.0.0.1
  busy SECONDS            print how busy the machine is (% of all cores)
  alive SID               print how many live (non-zombie) processes the
                          session has; 0 once the server has fully exited
  members SID             print the session's live pids, leader first
  snapshot SID PCORE LCORE
                          print one token: the session's CPU ticks and the
                          /proc/stat ticks of the proxy and load cores
  record SCENARIO PROXY ROUND WRK_OUTPUT SNAP_BEFORE SNAP_AFTER
                          print one tab-separated results line (COLUMNS);
                          exit 2 if WRK_OUTPUT cannot be parsed. WRK_OUTPUT
                          may also be h2load's output, with its request log
                          (--log-file) next to it in WRK_OUTPUT.log
  report RESULTS          print the table and the machine-readable lines;
                          exit 1 if any measurement had errors
"""

import os
import time
import re
import socket
import statistics
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------- processes


def read_procs():
    """Map pid -> (sid, state, ticks) for every process visible in /proc.

    ticks is utime+stime+cutime+cstime: the process's own CPU time (all its
    threads) plus that of children it has already reaped, so a worker that
    died and was reaped by its master still counts.
    """
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue  # exited while we were scanning
        # comm (field 2) may contain spaces and parentheses: split after
        # the last ')'. Fields from there on: state(3) ppid(4) pgrp(5)
        # session(6) ... utime(14) stime(15) cutime(16) cstime(17), so the
        # index is field - 3.
        rest = stat[stat.rindex(")") + 2:].split()
        ticks = sum(int(rest[i]) for i in (11, 12, 13, 14))
        procs[int(name)] = (int(rest[3]), rest[0], ticks)
    return procs


def session(sid, procs):
    """Pids of the session's processes, leader first."""
    return sorted((p for p, (s, _, _) in procs.items() if s == sid),
                  key=lambda p: (p != sid, p))


def core_ticks():
    """{core: (task, irq, total)} ticks per core from /proc/stat.

    task is user+nice+system, irq is irq+softirq. Softirq work done in a
    process's context (much of the loopback TCP stack) is booked as irq
    here yet also shows in that process's own times, so only task+irq is
    meaningful, as the core's busy time.
    """
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()[:8]]
                out[int(m.group(1))] = (v[0] + v[1] + v[2], v[5] + v[6],
                                        sum(v))
    return out


def cmd_busy(seconds):
    """Print how busy the whole machine is over SECONDS, in % of all cores."""
    before = core_ticks()
    time.sleep(float(seconds))
    after = core_ticks()
    busy = sum(a[0] + a[1] - b[0] - b[1]
               for a, b in zip(after.values(), before.values()))
    total = sum(a[2] - b[2] for a, b in zip(after.values(), before.values()))
    print("%.0f" % (100.0 * busy / total if total else 0.0))


def cmd_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_alive(sid):
    procs = read_procs()
    print(sum(1 for p in session(sid, procs) if procs[p][1] != "Z"))


def cmd_members(sid):
    procs = read_procs()
    print(" ".join(str(p) for p in session(sid, procs)
                   if procs[p][1] != "Z"))


def cmd_snapshot(sid, proxy_core, load_core):
    procs = read_procs()
    ticks = sum(procs[p][2] for p in session(sid, procs))
    cores = core_ticks()
    print(",".join([str(ticks)] + ["%d:%d:%d" % cores[c]
                                   for c in (proxy_core, load_core)]))


# ---------------------------------------------------------------------- wrk

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def to_us(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError("bad wrk time %r" % text)
    return float(m.group(1)) * UNITS_US[m.group(2)]


def parse_wrk(text):
    """Fields of one wrk --latency run; raises ValueError if any is missing.

    wrk prints "Socket errors:" and "Non-2xx or 3xx responses:" only when
    they are non-zero, so their absence means zero.
    """
    def need(pattern):
        m = re.search(pattern, text, re.M)
        if not m:
            raise ValueError("wrk output lacks %r" % pattern)
        return m
    rps = float(need(r"^Requests/sec:\s+([0-9.]+)").group(1))
    p50 = to_us(need(r"^\s+50%\s+(\S+)").group(1))
    p99 = to_us(need(r"^\s+99%\s+(\S+)").group(1))
    done = need(r"^\s+(\d+) requests in ([0-9.]+\w+),")
    requests, seconds = int(done.group(1)), to_us(done.group(2)) / 1e6
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), "
                     r"write (\d+), timeout (\d+)", text)
    socket_errors = sum(int(g) for g in sock.groups()) if sock else 0
    non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non2xx = int(non2.group(1)) if non2 else 0
    return rps, p50, p99, requests, seconds, socket_errors, non2xx


# ------------------------------------------------------------------- h2load


def percentile(sorted_values, p):
    """Nearest-rank percentile of a sorted list."""
    i = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values))) - 1))
    return sorted_values[i]


def parse_h2load(text, log_path):
    """The same fields as parse_wrk from one h2load run: req/s, requests and
    errors from its summary, p50/p99 from its --log-file (one line per
    request: start time, status, microseconds to the end of the response;
    status -1 for a failed stream). Raises ValueError if anything is
    missing.

    Errors: h2load's "failed" (streams that did not succeed, errored ones
    included) plus "timeout"; non-2xx: its 3xx, 4xx and 5xx counts."""
    def need(pattern):
        m = re.search(pattern, text, re.M)
        if not m:
            raise ValueError("h2load output lacks %r" % pattern)
        return m
    fin = need(r"^finished in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+) req/s")
    seconds = to_us(fin.group(1) + fin.group(2)) / 1e6
    rps = float(fin.group(3))
    req = need(r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
               r"(\d+) failed, (\d+) errored, (\d+) timeout")
    done, failed, timeouts = int(req.group(2)), int(req.group(4)), int(req.group(6))
    codes = need(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    non2xx = sum(int(codes.group(i)) for i in (2, 3, 4))
    durations = []
    with open(log_path) as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] != "-1":
                durations.append(int(cols[2]))
    if not durations:
        raise ValueError("h2load log %s has no completed request" % log_path)
    durations.sort()
    return (rps, float(percentile(durations, 50)), float(percentile(durations, 99)), done,
            seconds, failed + timeouts, non2xx)


def parse_load(path):
    """wrk's or h2load's output in `path` (h2load's request log: path.log)."""
    with open(path) as f:
        text = f.read()
    if re.search(r"^finished in .* req/s", text, re.M):
        return parse_h2load(text, path + ".log")
    return parse_wrk(text)


def cmd_record(scenario, proxy, rnd, wrk_output, before, after):
    try:
        rps, p50, p99, requests, secs, sock, non2 = parse_load(wrk_output)
    except (ValueError, OSError) as e:
        print("benchtool: %s: %s" % (wrk_output, e), file=sys.stderr)
        return 2
    b, a = before.split(","), after.split(",")
    ticks = int(a[0]) - int(b[0])
    cpu_us = ticks * 1e6 / CLK_TCK
    pc = [y - x for x, y in zip(map(int, b[1].split(":")),
                                 map(int, a[1].split(":")))]
    lc = [y - x for x, y in zip(map(int, b[2].split(":")),
                                 map(int, a[2].split(":")))]

    def pct(n, total):
        return "%.1f" % (100.0 * n / total if total > 0 else 0.0)
    # On the proxy's core: the proxy's share, and everything else that kept
    # the core busy (other processes; the proxy is the only one pinned
    # there, so this is noise). The process times of /proc/<pid>/stat
    # already include most of the softirq work done in the proxy's context,
    # which /proc/stat books as irq, so "other" is busy minus proxy, not
    # task time minus proxy. On the load core: its busy share.
    print("\t".join([scenario, proxy, rnd, "%.2f" % rps, "%.1f" % p50,
                     "%.1f" % p99, str(requests), str(sock), str(non2),
                     "%.0f" % cpu_us, pct(ticks, pc[2]),
                     pct(max(0, pc[0] + pc[1] - ticks), pc[2]),
                     pct(pc[1], pc[2]), pct(lc[0] + lc[1], lc[2])]))
    return 0


# ------------------------------------------------------------------- report

# Columns of the results file, one line per measurement (see cmd_record).
COLUMNS = ("scenario", "proxy", "round", "rps", "p50_us", "p99_us",
           "requests", "socket_errors", "non2xx", "cpu_us", "proxy_pct",
           "other_pct", "irq_pct", "load_busy_pct")

# (key in the machine-readable lines, table heading)
METRICS = (("req_per_s", "req/s"),
           ("p50_ms", "p50 ms"),
           ("p99_ms", "p99 ms"),
           ("cpu_us_per_req", "CPU us/req"))

# Per-core columns shown after the metrics (medians, percent of a core).
CORE_COLUMNS = ("proxy_pct", "other_pct", "load_busy_pct")

# A measurement where other processes took more than this share of the
# proxy's core is flagged: something else ran on the machine.
NOISY_PCT = 10.0

# Ratios candidate/baseline printed per scenario: (metric, which is better).
RATIOS = (("req_per_s", "higher"),
          ("cpu_us_per_req", "lower"),
          ("p99_ms", "lower"),
          ("p50_ms", "lower"))


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = dict(zip(COLUMNS, line.rstrip("\n").split("\t")))
            req = int(rec["requests"])
            rows.append({
                "scenario": rec["scenario"], "proxy": rec["proxy"],
                "round": rec["round"],
                "req_per_s": float(rec["rps"]),
                "p50_ms": float(rec["p50_us"]) / 1e3,
                "p99_ms": float(rec["p99_us"]) / 1e3,
                "cpu_us_per_req": (float(rec["cpu_us"]) / req if req
                                   else float("nan")),
                "socket_errors": int(rec["socket_errors"]),
                "non2xx": int(rec["non2xx"]),
                "proxy_pct": float(rec["proxy_pct"]),
                "other_pct": float(rec["other_pct"]),
                "irq_pct": float(rec["irq_pct"]),
                "load_busy_pct": float(rec["load_busy_pct"]),
            })
    return rows


def fmt(value):
    if value != value:  # NaN
        return "nan"
    if value >= 1000:
        return "%.0f" % value
    if value >= 100:
        return "%.1f" % value
    if value >= 1:
        return "%.2f" % value
    return "%.3f" % value


def spread(vals):
    """'median [min .. max]' of a list of numbers."""
    return "%s [%s..%s]" % (fmt(statistics.median(vals)), fmt(min(vals)),
                            fmt(max(vals)))


def report_scenario(sc, rows, machine, bad, noisy):
    names = []
    for r in rows:
        if r["proxy"] not in names:
            names.append(r["proxy"])
    rounds = len({r["round"] for r in rows})
    print("\nscenario %s: %d round(s); median [min..max] over rounds"
          % (sc, rounds))
    head = "  %-9s" % "proxy" + "".join("%24s" % h for _, h in METRICS)
    print(head + "%22s%6s" % ("proxy/other/load %", "err"))
    medians = {}
    for proxy in names:
        runs = [r for r in rows if r["proxy"] == proxy]
        line = "  %-9s" % proxy
        for key, _ in METRICS:
            vals = [r[key] for r in runs]
            medians[(proxy, key)] = statistics.median(vals)
            line += "%24s" % spread(vals)
            machine.append("median %s %s %s %s"
                           % (sc, proxy, key, fmt(medians[(proxy, key)])))
        busy = "/".join("%.0f" % statistics.median(r[k] for r in runs)
                        for k in CORE_COLUMNS)
        errors = sum(r["socket_errors"] + r["non2xx"] for r in runs)
        print(line + "%22s%6d" % (busy, errors))
        for r in runs:
            if r["other_pct"] > NOISY_PCT:
                noisy.append("%s/%s round %s: other processes took %.0f%% "
                             "of the proxy's core" % (sc, proxy, r["round"],
                                                      r["other_pct"]))
            if r["socket_errors"] or r["non2xx"]:
                bad.append("%s/%s round %s: %d socket errors, %d non-2xx"
                           % (sc, proxy, r["round"], r["socket_errors"],
                              r["non2xx"]))
    if len(names) != 2:
        return
    base, cand = names
    print("  ratio %s/%s:" % (cand, base))
    for key, better in RATIOS:
        b, c = medians[(base, key)], medians[(cand, key)]
        ratio = c / b if b else float("nan")
        label = dict(METRICS)[key]
        print("    %-11s %6.3f   (%s is better)" % (label, ratio, better))
        machine.append("ratio %s %s %.3f" % (sc, key, ratio))


def report_vs_proxy(rows, scenarios, machine):
    """Each scenario's moongate against moongate's bare proxy run: what the
    plugins cost. "direct" divides the medians; "via nginx" divides the two
    scenarios' moongate/nginx ratios, which cancels drifts of the machine
    between scenarios (nginx does the same work in both)."""
    def med(sc, proxy, key):
        vals = [r[key] for r in rows if r["scenario"] == sc and r["proxy"] == proxy]
        return statistics.median(vals) if vals else None
    if med("proxy", "moongate", "req_per_s") is None:
        return
    lines = []
    for sc in scenarios:
        if sc == "proxy" or med(sc, "moongate", "req_per_s") is None:
            continue
        out = []
        for key in ("req_per_s", "cpu_us_per_req"):
            direct = med(sc, "moongate", key) / med("proxy", "moongate", key)
            via = None
            if med(sc, "nginx", key) and med("proxy", "nginx", key):
                via = (med(sc, "moongate", key) / med(sc, "nginx", key)) / \
                    (med("proxy", "moongate", key) / med("proxy", "nginx", key))
            out.append((key, direct, via))
            machine.append("vs_proxy %s %s %.3f%s" % (sc, key, direct,
                           "" if via is None else " via_nginx %.3f" % via))
        lines.append("  %-16s" % sc + "".join(
            "  %s %.3f%s" % ("req/s" if k == "req_per_s" else "CPU us/req", d,
                             "" if v is None else " (via nginx %.3f)" % v)
            for k, d, v in out))
    if lines:
        print("\nmoongate in each scenario / moongate in scenario proxy:")
        for line in lines:
            print(line)


def cache_ratio(rows, machine):
    """Issue 6: moongate's req/s serving cache hits over its req/s proxying
    the same route past the cache (scenarios cache_hit and cache_pass)."""
    med = {}
    for sc in ("cache_hit", "cache_pass"):
        vals = [r["req_per_s"] for r in rows
                if r["scenario"] == sc and r["proxy"] != "nginx"]
        if not vals:
            return
        med[sc] = statistics.median(vals)
    ratio = med["cache_hit"] / med["cache_pass"] if med["cache_pass"] else float("nan")
    print("\ncache: hits %.0f req/s, proxied past the cache %.0f req/s: "
          "ratio %.3f (target >= 1.5)" % (med["cache_hit"], med["cache_pass"], ratio))
    machine.append("ratio cache_hit/cache_pass rps %.3f" % ratio)


def cmd_report(path):
    rows = load(path)
    scenarios = []
    for r in rows:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    machine, bad, noisy = [], [], []
    for sc in scenarios:
        report_scenario(sc, [r for r in rows if r["scenario"] == sc],
                        machine, bad, noisy)
    report_vs_proxy(rows, scenarios, machine)
    cache_ratio(rows, machine)
    print("\n(proxy/other/load %: the proxy's CPU and other work on the "
          "proxy's core, and\n how busy the load core (upstream + wrk) was, "
          "in % of one core)")
    if noisy:
        print()
        for line in noisy:
            print("NOTE: noisy: " + line)
    print()
    for line in machine:
        print(line)
    if bad:
        print()
        for line in bad:
            print("WARNING: invalid run: " + line)
        print("valid no")
        return 1
    print("valid yes")
    return 0


def main(argv):
    commands = {
        "port": (cmd_port, 0), "busy": (cmd_busy, 1), "alive": (cmd_alive, 1),
        "members": (cmd_members, 1), "snapshot": (cmd_snapshot, 3),
        "record": (cmd_record, 6), "report": (cmd_report, 1),
    }
    if len(argv) < 2 or argv[1] not in commands:
        sys.exit(__doc__)
    func, nargs = commands[argv[1]]
    args = argv[2:]
    if len(args) != nargs:
        sys.exit("benchtool: %s takes %d argument(s)\n%s"
                 % (argv[1], nargs, __doc__))
    if argv[1] in ("alive", "members", "snapshot"):
        args = [int(a) for a in args]
    return func(*args) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
