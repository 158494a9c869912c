#!/usr/bin/python3
"""Runs moongate's end-to-end tests: tests/e2e/test_*.py, every function
named test_*, in file order, one at a time.

  /usr/bin/python3 tests/e2e/run.py [-l] [FILTER...]

A FILTER keeps the tests whose "module.test" name contains it. -l lists
the tests without running them. The binary under test is $MOONGATE_BIN
(default build/moongate).

Each test gets a hang guard (60 s, or the function's `timeout` attribute):
SIGALRM raises inside the test, so its try/finally blocks and context
managers still stop what it started. After each test, anything it left
running is killed and the test fails; a sanitizer report in a gateway's
output fails it too. Prints "PASS module.test" or "FAIL module.test" with
the traceback and the tail of the gateway's log, and at the end
"e2e: N passed, N failed". Exit status 1 when any test failed.
"""

import importlib
import inspect
import os
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.chdir(HERE.parent.parent)

import harness  # noqa: E402

DEFAULT_TIMEOUT = 60


class HangGuard(BaseException):
    """Raised by SIGALRM inside a test that ran past its time."""


class Terminated(BaseException):
    pass


def on_alarm(signum, frame):
    raise HangGuard()


def on_term(signum, frame):
    raise Terminated()


def discover(filters):
    tests = []
    for path in sorted(HERE.glob("test_*.py")):
        modname = path.stem
        try:
            mod = importlib.import_module(modname)
        except Exception:  # noqa: BLE001
            tests.append((modname + ".<import>", None, traceback.format_exc()))
            continue
        fns = [(n, f) for n, f in vars(mod).items()
               if n.startswith("test_") and inspect.isfunction(f) and f.__module__ == modname]
        fns.sort(key=lambda nf: nf[1].__code__.co_firstlineno)
        for n, f in fns:
            tests.append(("%s.%s" % (modname, n), f, None))
    if filters:
        tests = [t for t in tests if any(s in t[0] for s in filters)]
    return tests


def indent(text, prefix="    "):
    return "\n".join(prefix + l for l in text.rstrip("\n").splitlines())


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    listing = "-l" in argv
    filters = [a for a in argv if not a.startswith("-")]
    tests = discover(filters)
    if listing:
        for name, _, _ in tests:
            print(name)
        return 0
    if not tests:
        print("e2e: no test matches %s" % filters)
        print("e2e: 0 passed, 1 failed")
        return 1
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    bin_path = harness.moongate_bin()
    print("e2e: %d tests against %s" % (len(tests), bin_path), flush=True)
    passed = failed = 0
    failures = []
    t_all = time.monotonic()
    for name, fn, import_error in tests:
        t0 = time.monotonic()
        err = import_error
        harness.begin_test()
        if fn is not None:
            timeout = getattr(fn, "timeout", DEFAULT_TIMEOUT)
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                    fn()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except HangGuard:
                err = "hang guard: the test ran longer than %ss\n%s" % (
                    timeout, traceback.format_exc())
            except Terminated:
                harness.end_test()
                print("FAIL %s (runner terminated)" % name, flush=True)
                print("e2e: %d passed, %d failed" % (passed, failed + 1), flush=True)
                return 1
            except KeyboardInterrupt:
                harness.end_test()
                raise
            except BaseException:  # noqa: BLE001
                err = traceback.format_exc()
        leftovers, problems = harness.end_test()
        if leftovers:
            err = (err or "") + "the test left processes running (killed now): %s\n" % (
                ", ".join(leftovers))
        for p in problems:
            if not err or p not in err:
                err = (err or "") + p + "\n"
        dt = time.monotonic() - t0
        if err is None:
            passed += 1
            print("PASS %s (%.1fs)" % (name, dt), flush=True)
        else:
            failed += 1
            failures.append(name)
            print("FAIL %s (%.1fs)" % (name, dt), flush=True)
            print(indent(err), flush=True)
            for i, gw in enumerate(harness.gateways_of_test()):
                print("    --- gateway log%s (last lines) ---"
                      % (" #%d" % (i + 1) if i else ""), flush=True)
                print(gw.log_tail(40), flush=True)
    print("e2e: %.0fs" % (time.monotonic() - t_all))
    if failures:
        print("e2e: failed: " + " ".join(failures))
    print("e2e: %d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
