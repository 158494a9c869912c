#!/bin/sh
# `make run`: starts the three demo upstreams that conf/moongate.lua routes
# to (users, orders and products: tests/e2e/upstream.py, which answers with a
# JSON description of each request), then runs moongate on the demo config
# in the foreground. Ctrl-C (or SIGTERM to this script) stops the gateway
# gracefully and the upstreams with it.
#
# Overridable for tests (tests/e2e/test_demo.py starts the demo on free
# ports through this script so the demo config cannot rot):
#   MOONGATE_BIN   the binary              (build/moongate)
#   MOONGATE_CONF  the config              (conf/moongate.lua)
#   DEMO_PORTS     the upstreams' ports    ("9101 9102 9103")
#   DEMO_NAMES     their service names     ("users orders products")
#   DEMO_URL       printed in the hints    (http://localhost:8080)
cd "$(dirname "$0")/.." || exit 2

BIN=${MOONGATE_BIN:-build/moongate}
CONF=${MOONGATE_CONF:-conf/moongate.lua}
PORTS=${DEMO_PORTS:-"9101 9102 9103"}
NAMES=${DEMO_NAMES:-"users orders products"}
URL=${DEMO_URL:-http://localhost:8080}
PY=/usr/bin/python3

if [ ! -x "$BIN" ]; then
    echo "run-demo: $BIN not built (run make)" >&2
    exit 1
fi

pids=""
gw=""
cleanup() {
    trap - EXIT INT TERM
    if [ -n "$gw" ] && kill -0 "$gw" 2>/dev/null; then
        kill -TERM "$gw" 2>/dev/null
        wait "$gw" 2>/dev/null
    fi
    for p in $pids; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in $pids; do
        wait "$p" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set -- $NAMES
for port in $PORTS; do
    name=${1:-demo}
    [ $# -gt 0 ] && shift
    "$PY" tests/e2e/upstream.py --port "$port" --name "$name" >/dev/null &
    pids="$pids $!"
done

# Wait (at most 5 s) until every upstream answers.
for port in $PORTS; do
    i=0
    until curl -s -o /dev/null "http://127.0.0.1:$port/__stats"; do
        i=$((i + 1))
        if [ "$i" -ge 100 ]; then
            echo "run-demo: the demo upstream on port $port did not start" >&2
            exit 1
        fi
        sleep 0.05
    done
done

cat <<EOF
moongate demo: upstreams on 127.0.0.1 ports $PORTS
Try, in another terminal:
  curl -i $URL/users/1
  curl -s $URL/orders/42?expand=items
  curl -s -X POST -d '{"name":"lamp"}' $URL/products
  curl -i $URL/nowhere            # 404 from the gateway
Ctrl-C stops everything.
EOF

# In the background and waited for, so that INT/TERM reach our trap at once.
"$BIN" -c "$CONF" &
gw=$!
wait "$gw"
rc=$?
gw=""
exit "$rc"
