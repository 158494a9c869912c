#!/bin/sh
# `make run`: runs moongate on the demo config in the foreground. The demo
# is one process: conf/moongate.lua serves its own demo services with Lua
# handlers behind the proxied public routes. Ctrl-C (or SIGTERM to this
# script) stops the gateway gracefully.
#
# Overridable (tests/e2e/test_demo.py starts the demo through this script on
# a free port so the demo config cannot rot):
#   MOONGATE_BIN          the binary            (build/moongate)
#   MOONGATE_CONF         the config            (conf/moongate.lua)
#   MOONGATE_DEMO_LISTEN  where it listens      (0.0.0.0:8080)
#   MOONGATE_DEMO_PID     its pid file          (conf/moongate.pid)
cd "$(dirname "$0")/.." || exit 2

BIN=${MOONGATE_BIN:-build/moongate}
CONF=${MOONGATE_CONF:-conf/moongate.lua}
PORT=$(printf '%s' "${MOONGATE_DEMO_LISTEN:-0.0.0.0:8080}" | sed 's/.*://')
URL=http://localhost:$PORT

if [ ! -x "$BIN" ]; then
    echo "run-demo: $BIN not built (run make)" >&2
    exit 1
fi

gw=""
cleanup() {
    trap - EXIT INT TERM
    if [ -n "$gw" ] && kill -0 "$gw" 2>/dev/null; then
        kill -TERM "$gw" 2>/dev/null
        wait "$gw" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat <<EOT
moongate demo on $URL (config: $CONF)
Try, in another terminal:
  curl -i $URL/users/1               # proxied to a Lua service, with an inline plugin's header
  curl -s $URL/users/                # the list
  curl -s '$URL/orders/42?expand=items'
  curl -s $URL/products/7
  curl -s $URL/stats                 # requests counted by a global plugin in shared memory
  curl -i $URL/nowhere               # 404 from the gateway
  curl -i $URL/users/%2e%2e/x        # normalized to /x: 404, never the users service
Ctrl-C stops it.
EOT

# In the background and waited for, so that INT/TERM reach our trap at once.
"$BIN" -c "$CONF" &
gw=$!
wait "$gw"
rc=$?
gw=""
exit "$rc"
