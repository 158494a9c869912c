#!/bin/sh
# The top-level test runner behind `make test`:
#
#   sh tests/run-all.sh [unit] [unit-asan] [lua] [e2e] [e2e-asan] [fuzz]
#
#   unit      every build/tests/test_* binary, each under `timeout 60`; each
#             prints "PASS name" / "FAIL name" lines. A binary that crashes,
#             times out or exits non-zero without a FAIL line counts as one
#             failure named after the binary.
#   unit-asan the same from build/asan/tests/, with leak detection on and
#             sanitizer reports fatal.
#   lua       the busted specs in spec/, run inside the runtime:
#             build/moongate lua /usr/bin/busted -o TAP spec/ (under
#             `timeout 120`); each "ok" / "not ok" line is one test. A run
#             that ends without its "1..N" plan, or with fewer results than
#             planned, or exits non-zero without a failure, counts as one
#             more failure.
#   e2e       tests/e2e/run.py against build/moongate.
#   e2e-asan  tests/e2e/run.py against build/asan/moongate; sanitizer
#             reports are fatal and the harness fails any test whose gateway
#             printed one.
#   fuzz      each libFuzzer harness in build/fuzz (ASan + UBSan, built by
#             make test) for FUZZ_CI_SECONDS (30) from the committed seeds,
#             two at a time; one result per harness.
#
# Without arguments it runs all six; the two asan suites are skipped, with
# a notice, when build/asan/moongate does not exist, and fuzz when build/fuzz
# does not. Each suite's output is
# shown as it comes. The last line printed is "N passed, N failed" summed
# over the suites; the exit status is non-zero when any test failed or a
# suite could not run. POSIX sh.

cd "$(dirname "$0")/.." || exit 2

PY=/usr/bin/python3
ASAN_ENV="ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1:print_summary=1"
UBSAN_ENV="UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
E2E_TIMEOUT=${E2E_TIMEOUT:-900}

total_pass=0
total_fail=0
broken=0
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mg-run-all.XXXXXX") || exit 2
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

count() { # count PATTERN FILE: lines starting with PATTERN
    grep -c "^$1 " "$2" 2>/dev/null || true
}

# run_unit DIR LABEL [ENV...]
run_unit() {
    dir=$1
    label=$2
    shift 2
    echo "== $label: C unit tests from $dir"
    p=0
    f=0
    found=0
    srcs=$(ls tests/unit/test_*.c 2>/dev/null)
    for src in $srcs; do
        name=$(basename "$src" .c)
        if [ ! -x "$dir/$name" ]; then
            echo "FAIL $name (binary $dir/$name was not built)"
            f=$((f + 1))
        fi
    done
    for bin in "$dir"/test_*; do
        [ -f "$bin" ] && [ -x "$bin" ] || continue
        found=1
        name=$(basename "$bin")
        out="$tmp/unit.out"
        env "$@" timeout 60 "$bin" >"$out" 2>&1
        rc=$?
        cat "$out"
        bp=$(count PASS "$out")
        bf=$(count FAIL "$out")
        if [ "$rc" -ne 0 ] && [ "$bf" -eq 0 ]; then
            case $rc in
                124) why="timed out after 60 s" ;;
                *) why="exit status $rc" ;;
            esac
            echo "FAIL $name ($why)"
            bf=1
        fi
        p=$((p + bp))
        f=$((f + bf))
    done
    if [ "$found" -eq 0 ] && [ -z "$srcs" ]; then
        echo "$label: no unit tests (no tests/unit/test_*.c)"
    fi
    echo "$label: $p passed, $f failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

# run_lua BIN: the busted specs through `BIN lua`, TAP output counted.
run_lua() {
    bin=$1
    echo "== lua: busted specs in spec/ inside $bin"
    if [ ! -x "$bin" ]; then
        echo "lua: cannot run: $bin does not exist (build it first)"
        broken=1
        total_fail=$((total_fail + 1))
        return
    fi
    if [ ! -x /usr/bin/busted ]; then
        echo "lua: cannot run: /usr/bin/busted is missing (lua-busted)"
        broken=1
        total_fail=$((total_fail + 1))
        return
    fi
    out="$tmp/lua.out"
    timeout 120 "$bin" lua /usr/bin/busted -o TAP spec/ >"$out" 2>"$tmp/lua.err"
    rc=$?
    cat "$out"
    p=$(grep -c '^ok ' "$out")
    f=$(grep -c '^not ok ' "$out")
    plan=$(sed -n 's/^1\.\.\([0-9][0-9]*\)$/\1/p' "$out" | tail -n 1)
    why=""
    if [ -z "$plan" ]; then
        why="busted ended without its plan line (exit status $rc)"
    elif [ $((p + f)) -ne "$plan" ]; then
        why="busted planned $plan tests but reported $((p + f))"
    elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        why="busted exited with status $rc without a failing test"
    fi
    if [ -n "$why" ]; then
        echo "not ok lua: $why"
        sed 's/^/    /' "$tmp/lua.err"
        f=$((f + 1))
    fi
    echo "lua: $p passed, $f failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

# run_e2e BIN LABEL [ENV...]
run_e2e() {
    bin=$1
    label=$2
    shift 2
    echo "== $label: end-to-end tests against $bin"
    if [ ! -x "$bin" ]; then
        echo "$label: cannot run: $bin does not exist (build it first)"
        broken=1
        total_fail=$((total_fail + 1))
        return
    fi
    out="$tmp/e2e.out"
    { env "$@" MOONGATE_BIN="$bin" timeout "$E2E_TIMEOUT" "$PY" tests/e2e/run.py $E2E_FILTER
      echo $? >"$tmp/e2e.rc"; } 2>&1 | tee "$out"
    rc=$(cat "$tmp/e2e.rc" 2>/dev/null || echo 1)
    line=$(grep -E '^e2e: [0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        echo "$label: the e2e runner ended without its summary (exit status $rc)"
        broken=1
        total_fail=$((total_fail + 1))
        return
    fi
    p=$(echo "$line" | sed -E 's/^e2e: ([0-9]+) passed, ([0-9]+) failed$/\1/')
    f=$(echo "$line" | sed -E 's/^e2e: ([0-9]+) passed, ([0-9]+) failed$/\2/')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "$label: runner exit status $rc"
        f=1
    fi
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

# run_fuzz: every libFuzzer harness built in build/fuzz runs
# FUZZ_CI_SECONDS (30) from the committed seeds, two at a time (one per
# core); each is one test (tests/fuzz/run.sh prints PASS / FAIL lines).
run_fuzz() {
    echo "== fuzz: each harness in build/fuzz for ${FUZZ_CI_SECONDS:-30} s"
    names=""
    for bin in build/fuzz/fuzz_*; do
        [ -x "$bin" ] && names="$names ${bin#build/fuzz/fuzz_}"
    done
    if [ -z "$names" ]; then
        echo "fuzz: cannot run: no harness in build/fuzz (make test builds them)"
        broken=1
        total_fail=$((total_fail + 1))
        return
    fi
    half1="" half2="" i=0
    for n in $names; do
        if [ $((i % 2)) -eq 0 ]; then half1="$half1 $n"; else half2="$half2 $n"; fi
        i=$((i + 1))
    done
    sh tests/fuzz/run.sh "${FUZZ_CI_SECONDS:-30}" $half1 >"$tmp/fuzz1.out" 2>&1 &
    pid1=$!
    if [ -n "$half2" ]; then
        sh tests/fuzz/run.sh "${FUZZ_CI_SECONDS:-30}" $half2 >"$tmp/fuzz2.out" 2>&1
    fi
    wait "$pid1"
    cat "$tmp/fuzz1.out" "$tmp/fuzz2.out" 2>/dev/null >"$tmp/fuzz.out"
    cat "$tmp/fuzz.out"
    p=$(count PASS "$tmp/fuzz.out")
    f=$(count FAIL "$tmp/fuzz.out")
    if [ $((p + f)) -ne "$i" ]; then
        echo "FAIL fuzz: $i harnesses, $((p + f)) results"
        f=$((f + 1))
    fi
    echo "fuzz: $p passed, $f failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

suites="$*"
if [ -z "$suites" ]; then
    suites="unit lua e2e"
    if [ -x build/asan/moongate ]; then
        suites="unit unit-asan lua e2e e2e-asan"
        [ -d build/fuzz ] && suites="$suites fuzz"
    else
        echo "notice: build/asan/moongate does not exist: skipping unit-asan and e2e-asan"
    fi
fi

for s in $suites; do
    case $s in
        unit) run_unit build/tests unit ;;
        unit-asan) run_unit build/asan/tests unit-asan "$ASAN_ENV" "$UBSAN_ENV" ;;
        lua) run_lua build/moongate ;;
        e2e) run_e2e build/moongate e2e ;;
        e2e-asan) run_e2e build/asan/moongate e2e-asan "$ASAN_ENV" "$UBSAN_ENV" ;;
        fuzz) run_fuzz ;;
        *)
            echo "unknown suite: $s (suites: unit unit-asan lua e2e e2e-asan fuzz)"
            broken=1
            total_fail=$((total_fail + 1))
            ;;
    esac
done

echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ] && [ "$broken" -eq 0 ]
