#!/bin/sh
# Runs the libFuzzer harnesses built by `make fuzz` (see README.md):
#
#   sh tests/fuzz/run.sh SECONDS NAME...
#
# Each build/fuzz/fuzz_NAME runs SECONDS (-max_total_time) starting from the
# committed seeds in tests/fuzz/corpus/NAME (read only). Inputs that reach
# new coverage go to build/fuzz/corpus/NAME; crashes, leaks, timeouts and
# out-of-memory inputs to build/fuzz/findings/NAME/. The log of each run is
# build/fuzz/NAME.log. Prints one line per harness; exits non-zero when any
# harness found something. POSIX sh.

cd "$(dirname "$0")/../.." || exit 2
secs=${1:-30}
shift
status=0
for name in "$@"; do
    bin=build/fuzz/fuzz_$name
    seeds=tests/fuzz/corpus/$name
    work=build/fuzz/corpus/$name
    found=build/fuzz/findings/$name
    log=build/fuzz/$name.log
    mkdir -p "$work" "$found" "$seeds"
    dict=
    [ -f "tests/fuzz/$name.dict" ] && dict="-dict=tests/fuzz/$name.dict"
    # Extra libFuzzer flags of one harness, one line (README.md).
    opts=
    [ -f "tests/fuzz/$name.options" ] && opts=$(cat "tests/fuzz/$name.options")
    echo "== fuzz_$name: $secs s"
    "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$found/" $dict $opts \
        "$work" "$seeds" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*ft: \([0-9]*\).*corp: \([0-9/a-zA-Z]*\).*/cov \1, ft \2, corpus \3/p')
    arts=$(ls "$found" 2>/dev/null)
    if [ "$rc" -ne 0 ] || [ -n "$arts" ]; then
        status=1
        echo "FAIL fuzz_$name (exit $rc; ${execs:-?} runs; $cov)"
        grep -E 'ERROR:|invariant broken|runtime error|SUMMARY' "$log" | head -5
        for a in $arts; do
            echo "  finding: $found/$a"
        done
        echo "  log: $log"
    else
        echo "PASS fuzz_$name (${execs:-?} runs; $cov)"
    fi
done
exit $status
