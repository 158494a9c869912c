#!/bin/sh
# bench/run.sh — side-by-side load benchmark of moongate against nginx.
#
# One upstream (nginx answering a fixed ~100-byte JSON body) serves two
# reverse proxies with one worker each: nginx (the yardstick) and moongate.
# wrk (h2load for HTTP/2) drives them in interleaved rounds (nginx, moongate, nginx, moongate...),
# so slow drifts of the machine hit both alike. The proxies are pinned to
# core 0, the upstream and wrk to core 1. For every measurement we record
# wrk's req/s, p50/p99 latency and error counts, and the proxy's own CPU time
# (utime+stime of all its processes, from /proc) divided by the requests
# served: on a 2-core box the load side can be the bottleneck, and then
# req/s alone hides how much work the proxy spends per request.
#
# This script only orchestrates; bench/benchtool.py parses and computes.
# It is not a test: it exits non-zero only when a run is invalid (wrk saw
# socket errors or non-2xx answers, a server did not start), unless
# BENCH_STRICT=1 also asks for the issue-2 targets to be met.
#
# Scenarios: `scenario NAME [ROUTE_LUA [TOP_LUA [WRK_HEADER [WRK_PATH]]]]` runs a
# moongate config variant against the same nginx baseline; see scenarios()
# at the bottom and bench/README.md.
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [3]  BENCH_DURATION [10] s  BENCH_WARMUP [2] s per measurement
#   BENCH_CONNECTIONS [64]   BENCH_SCENARIOS [all] space-separated names
#   BENCH_H2_CONNECTIONS [16]  BENCH_H2_STREAMS [10]: h2load's clients and
#   concurrent streams per client in scenario h2
#   BENCH_MOONGATE [build/moongate]   BENCH_STANDIN=nginx: a second nginx
#   plays moongate's part (dry run of the harness without the binary)
#   BENCH_NGINX_FWD [1]: nginx sets X-Forwarded-* and X-Request-Id like
#   moongate does (0: bare proxy_pass)   BENCH_PROFILE=1: perf-record the
#   moongate worker during one extra run per scenario and print hot spots
#   BENCH_PROXY_CPU [0]  BENCH_LOAD_CPU [1]  BENCH_KEEP=1: keep the temp dir
#   BENCH_STRICT=1: also exit 1 when a target ratio is missed
#   BENCH_NICE [0]: nice value of every process started (e.g. -10 on a
#   shared machine, at the expense of the other jobs)
set -eu
set +m  # children stay in our process group until setsid moves them

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
TOOL="$PY $ROOT/bench/benchtool.py"
NGINX=${BENCH_NGINX:-/usr/sbin/nginx}

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNECTIONS:-64}
H2_CONNS=${BENCH_H2_CONNECTIONS:-16}
H2_STREAMS=${BENCH_H2_STREAMS:-10}
SCENARIOS=${BENCH_SCENARIOS:-all}
MOONGATE=${BENCH_MOONGATE:-$ROOT/build/moongate}
STANDIN=${BENCH_STANDIN:-}
NGINX_FWD=${BENCH_NGINX_FWD:-1}
PROFILE=${BENCH_PROFILE:-0}
PROXY_CPU=${BENCH_PROXY_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
NICE=${BENCH_NICE:-0}
KEEP=${BENCH_KEEP:-0}
STRICT=${BENCH_STRICT:-0}

# What the upstream answers; the proxies must pass it through unchanged.
BODY='{"id":12345,"name":"moongate bench","tags":["gateway","proxy","bench"],"ok":true,"n":42}'
# The upstream also serves a 10 KB JSON document at /json10k (written to
# DIR/upstream/json10k.json at start), for the compression scenarios.
JSON10K_PATH=/json10k

WRK_HEADER=""
WRK_PATH=/
# https scenario: SCHEME=https and PROXY_TLS=DIR (cert.pem, key.pem in it)
# make start_nginx_proxy and start_moongate terminate TLS.
SCHEME=http
PROXY_TLS=""
# h2 scenario: PROXY_H2=1 adds http2 to nginx's TLS listener (moongate
# offers h2 by ALPN on every TLS listener) and LOAD_TOOL=h2load measures.
PROXY_H2=""
LOAD_TOOL=wrk
STARTED=""   # session ids of every server and load process still running
DIR=""

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------- processes

# spawn CPU LOG CMD...: run CMD pinned to CPU, in a new session, output to
# LOG. setsid does not fork here (a background child of a non-interactive
# shell is never a group leader), so $SPAWNED, the pid, is also the session
# and process-group id of CMD and of everything it forks.
spawn() {
    sp_cpu=$1 sp_log=$2
    shift 2
    setsid nice -n "$NICE" taskset -c "$sp_cpu" "$@" \
        >"$sp_log" 2>&1 </dev/null &
    SPAWNED=$!
    STARTED="$STARTED $SPAWNED"
}

# forget PID: drop PID from the list cleanup() stops.
forget() {
    fg_new=""
    for fg_p in $STARTED; do
        [ "$fg_p" = "$1" ] || fg_new="$fg_new $fg_p"
    done
    STARTED=$fg_new
}

# stop SID: TERM the session's process group, wait up to 5 s for every
# process in the session to exit, then KILL what remains; reap the leader.
stop() {
    kill -s TERM -- "-$1" 2>/dev/null || true
    st_i=0
    while [ "$($TOOL alive "$1")" -gt 0 ]; do
        st_i=$((st_i + 1))
        if [ "$st_i" -eq 50 ]; then
            log "process group $1 ignored SIGTERM for 5 s; killing it"
            for st_p in $($TOOL members "$1"); do
                kill -KILL "$st_p" 2>/dev/null || true
            done
        elif [ "$st_i" -gt 80 ]; then
            log "process group $1 survives SIGKILL"; break
        fi
        sleep 0.1
    done
    wait "$1" 2>/dev/null || true
    forget "$1"
}

cleanup() {
    cl_rc=$?
    trap - EXIT INT TERM
    for cl_p in $STARTED; do stop "$cl_p"; done
    if [ -n "$DIR" ]; then
        if [ "$KEEP" = 1 ] || [ "$cl_rc" -ne 0 ]; then
            log "files kept in $DIR"
        else
            rm -rf "$DIR"
        fi
    fi
    exit "$cl_rc"
}

# wait_ready SID URL DIR: wait up to 10 s for URL to answer 200; on failure
# show the server's logs (DIR/*.log).
wait_ready() {
    wr_i=0
    while :; do
        wr_code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 \
            ${WRK_HEADER:+-H "$WRK_HEADER"} "$2" || true)
        [ "$wr_code" = 200 ] && return 0
        if [ "$($TOOL alive "$1")" -eq 0 ]; then
            tail -n 20 "$3"/*.log >&2 2>/dev/null || true
            die "server for $2 exited during start-up"
        fi
        wr_i=$((wr_i + 1))
        if [ "$wr_i" -ge 100 ]; then
            tail -n 20 "$3"/*.log >&2 2>/dev/null || true
            die "$2 not ready after 10 s"
        fi
        sleep 0.1
    done
}

# check_body URL: the proxy must return the upstream's body verbatim
# (decoded, when it compressed it: curl --compressed).
check_body() {
    cb_want=$BODY
    case $1 in *"$JSON10K_PATH") cb_want=$(cat "$DIR/upstream/json10k.json") ;; esac
    cb_got=$(curl -sk --compressed --max-time 2 ${WRK_HEADER:+-H "$WRK_HEADER"} "$1") \
        || die "GET $1 failed"
    [ "$cb_got" = "$cb_want" ] \
        || die "GET $1 returned '$(printf %.200s "$cb_got")', not the upstream body"
}

# --------------------------------------------------------------- servers

# nginx_common DIR: the directives every nginx instance shares. All paths
# inside DIR, one worker, no access log, effectively endless keep-alive.
nginx_common() {
    # As root, workers would switch to nobody and lose access to DIR.
    [ "$(id -u)" = 0 ] && echo "user root;"
    cat <<EOF
worker_processes 1;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() {
    cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
EOF
}

# start_nginx DIR CPU: start nginx with DIR/nginx.conf; sets $SPAWNED.
start_nginx() {
    spawn "$2" "$1/stdout.log" \
        "$NGINX" -p "$1" -c "$1/nginx.conf" -g 'daemon off;'
}

# start_upstream: the shared origin, on the load core; sets UP_PORT.
start_upstream() {
    su_d=$DIR/upstream
    mkdir -p "$su_d"
    UP_PORT=$($TOOL port)
    # 10 KB of API-like JSON: user records up to 10240 bytes.
    $PY -c '
import json
def user(i):
    return {"id": i, "name": "user %d" % i, "email": "user%d@example.com" % i,
            "roles": ["reader", "writer"] if i % 3 else ["reader"],
            "active": i % 5 != 0, "score": i * 37 % 101,
            "address": {"city": "city %d" % (i % 7), "zip": "%05d" % (i * 911 % 99999)}}
users = []
while True:
    doc = json.dumps({"users": users + [user(len(users) + 1)], "page": 1}, separators=(",", ":"))
    if len(doc) > 10240:
        break
    users.append(user(len(users) + 1))
print(json.dumps({"users": users, "page": 1}, separators=(",", ":")), end="")
' >"$su_d/json10k.json"
    {
        nginx_common "$su_d"
        echo "http {"
        nginx_http_common "$su_d"
        cat <<EOF
    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            default_type application/json;
            return 200 '$BODY\n';
        }
        location = $JSON10K_PATH {
            default_type application/json;
            alias $su_d/json10k.json;
        }
    }
}
EOF
    } >"$su_d/nginx.conf"
    start_nginx "$su_d" "$LOAD_CPU"
    UP_SID=$SPAWNED
    wait_ready "$UP_SID" "http://127.0.0.1:$UP_PORT/" "$su_d"
    check_body "http://127.0.0.1:$UP_PORT/"
}

# start_nginx_proxy NAME: nginx as a pooling reverse proxy to the upstream,
# on the proxy core, in DIR/NAME; sets PROXY_SID and PROXY_PORT.
start_nginx_proxy() {
    np_d=$DIR/$1
    mkdir -p "$np_d"
    PROXY_PORT=$($TOOL port)
    np_fwd=""
    if [ "$NGINX_FWD" = 1 ]; then
        # The headers moongate adds on every proxied request (issue 2), so
        # both proxies do the same work.
        np_fwd='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $request_id;'
    fi
    np_ssl="" np_certs=""
    if [ -n "$PROXY_TLS" ]; then
        np_ssl=" ssl"
        [ -n "$PROXY_H2" ] && np_ssl="$np_ssl http2"
        np_certs="ssl_certificate $PROXY_TLS/cert.pem;
        ssl_certificate_key $PROXY_TLS/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;"
    fi
    {
        nginx_common "$np_d"
        echo "http {"
        nginx_http_common "$np_d"
        cat <<EOF
    upstream bench {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT$np_ssl;
        $np_certs
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $np_fwd
        }
    }
}
EOF
    } >"$np_d/nginx.conf"
    start_nginx "$np_d" "$PROXY_CPU"
    PROXY_SID=$SPAWNED
    wait_ready "$PROXY_SID" "$SCHEME://127.0.0.1:$PROXY_PORT/" "$np_d"
    check_body "$SCHEME://127.0.0.1:$PROXY_PORT/"
}

# start_moongate NAME ROUTE_LUA TOP_LUA: moongate with one worker on the
# proxy core, in DIR/NAME; ROUTE_LUA is spliced into the catch-all route's
# table, TOP_LUA into the top-level table. Sets PROXY_SID and PROXY_PORT.
start_moongate() {
    mg_d=$DIR/$1
    mkdir -p "$mg_d"
    PROXY_PORT=$($TOOL port)
    mg_listen="\"127.0.0.1:$PROXY_PORT\""
    if [ -n "$PROXY_TLS" ]; then
        mg_listen="{ $mg_listen, tls = { cert = \"$PROXY_TLS/cert.pem\", key = \"$PROXY_TLS/key.pem\" } }"
    fi
    cat >"$mg_d/moongate.lua" <<EOF
return {
    listen = { $mg_listen },
    workers = 1,
    pid_file = "$mg_d/moongate.pid",
    error_log = "$mg_d/error.log",
    log_level = "warn",
    upstreams = {
        bench = {
            targets = { "127.0.0.1:$UP_PORT" },
            keepalive = { max_idle = 64, idle_timeout = 60 },
        },
    },
    routes = {
        { path = "/*", upstream = "bench", $2 },
    },
    $3
}
EOF
    spawn "$PROXY_CPU" "$mg_d/stdout.log" "$MOONGATE" -c "$mg_d/moongate.lua"
    PROXY_SID=$SPAWNED
    wait_ready "$PROXY_SID" "$SCHEME://127.0.0.1:$PROXY_PORT$WRK_PATH" "$mg_d"
    check_body "$SCHEME://127.0.0.1:$PROXY_PORT$WRK_PATH"
}

# ----------------------------------------------------------- measurement

# run_wrk SECONDS PORT OUTPUT: one wrk run on the load core, bounded by
# timeout(1); the optional $WRK_HEADER is sent with every request. With
# LOAD_TOOL=h2load, run_h2load instead.
run_wrk() {
    if [ "$LOAD_TOOL" = h2load ]; then
        run_h2load "$@"
        return
    fi
    set -- "$1" "$2" "$3" -t1 "-c$CONNS" "-d$1s" --latency
    [ -n "$WRK_HEADER" ] && set -- "$@" -H "$WRK_HEADER"
    rw_url=$SCHEME://127.0.0.1:$2$WRK_PATH rw_out=$3
    shift 3
    spawn "$LOAD_CPU" "$rw_out" timeout -k 2 "$((DURATION + WARMUP + 30))" \
        wrk "$@" "$rw_url"
    rw_wrk=$SPAWNED
    rw_rc=0
    wait "$rw_wrk" || rw_rc=$?
    forget "$rw_wrk"
    [ "$rw_rc" -eq 0 ] || { cat "$rw_out" >&2; die "wrk exited with $rw_rc"; }
}

# run_h2load SECONDS PORT OUTPUT: the same with h2load (HTTP/2 over TLS,
# ALPN h2): one thread, H2_CONNS connections with H2_STREAMS concurrent
# streams each, for SECONDS (-D); every request is logged to OUTPUT.log,
# from which benchtool takes p50/p99 (h2load's summary has no percentiles).
run_h2load() {
    rh_out=$3 rh_port=$2
    set -- -t1 "-c$H2_CONNS" "-m$H2_STREAMS" "-D$1" "--log-file=$rh_out.log"
    [ -n "$WRK_HEADER" ] && set -- "$@" -H "$WRK_HEADER"
    rh_url=$SCHEME://127.0.0.1:$rh_port$WRK_PATH
    spawn "$LOAD_CPU" "$rh_out" timeout -k 2 "$((DURATION + WARMUP + 30))" \
        h2load "$@" "$rh_url"
    rh_pid=$SPAWNED
    rh_rc=0
    wait "$rh_pid" || rh_rc=$?
    forget "$rh_pid"
    [ "$rh_rc" -eq 0 ] || { cat "$rh_out" >&2; die "h2load exited with $rh_rc"; }
    grep -q '^Application protocol: h2$' "$rh_out" \
        || { cat "$rh_out" >&2; die "h2load did not negotiate h2 with port $rh_port"; }
}

# measure SCENARIO LABEL SID PORT ROUND: warm up, then one measured wrk
# run with the proxy's CPU time read before and after; appends a line to
# the results file and prints a progress line.
measure() {
    me_out=$DIR/wrk-$1-$2-$5.txt
    [ "$WARMUP" -gt 0 ] && run_wrk "$WARMUP" "$4" "$DIR/warmup.txt"
    me_before=$($TOOL snapshot "$3" "$PROXY_CPU" "$LOAD_CPU")
    run_wrk "$DURATION" "$4" "$me_out"
    me_after=$($TOOL snapshot "$3" "$PROXY_CPU" "$LOAD_CPU")
    me_rec=$($TOOL record "$1" "$2" "$5" "$me_out" "$me_before" "$me_after") \
        || { cat "$me_out" >&2; die "cannot parse wrk output $me_out"; }
    printf '%s\n' "$me_rec" >>"$RESULTS"
    # Progress: scenario, proxy, round, req/s, p50, p99, CPU/req, the
    # proxy's and other processes' share of the proxy core, errors.
    printf '%s\n' "$me_rec" | awk -F '\t' '{
        printf "  %-8s %-9s round %s: %7.0f req/s  p50 %6.3f ms", $1, $2, $3,
            $4, $5 / 1000
        printf "  p99 %6.3f ms  %6.2f us/req  core %3.0f%% (other %2.0f%%)",
            $6 / 1000, $10 / ($7 ? $7 : 1), $11, $12
        printf "  err %d\n", $8 + $9
    }' >&2
}

# profile SID PORT NAME: perf-record the proxy's worker(s) during one extra
# wrk run and print the hottest symbols. Not part of the figures.
profile() {
    if ! command -v perf >/dev/null 2>&1; then
        log "perf not found; no profile"
        return 0
    fi
    pr_workers=$($TOOL members "$1" | cut -d' ' -f2- | tr ' ' ',')
    [ -n "$pr_workers" ] || pr_workers=$1
    pr_data=$DIR/perf-$3.data
    spawn "$LOAD_CPU" "$DIR/perf-$3.log" \
        perf record -F 1999 -p "$pr_workers" -o "$pr_data" \
        -- sleep "$DURATION"
    pr_perf=$SPAWNED
    run_wrk "$DURATION" "$2" "$DIR/wrk-profile-$3.txt"
    wait "$pr_perf" || true
    forget "$pr_perf"
    echo
    echo "profile $3: pid(s) $pr_workers, share of samples by object"
    perf report -i "$pr_data" --stdio --no-children --sort dso \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$'
    echo "profile $3: hottest symbols"
    perf report -i "$pr_data" --stdio --no-children --sort dso,sym \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' \
        | head -50
}

selected() {
    [ "$SCENARIOS" = all ] && return 0
    for se_s in $SCENARIOS; do [ "$se_s" = "$1" ] && return 0; done
    return 1
}

# scenario NAME [ROUTE_LUA [TOP_LUA [WRK_HEADER [WRK_PATH]]]]: start
# moongate with the config variant (see start_moongate), then ROUNDS
# interleaved rounds of nginx baseline then moongate; stop moongate.
# WRK_HEADER (one "Name: value") is sent to both proxies; WRK_PATH (default
# /) is the path wrk requests from both.
scenario() {
    selected "$1" || return 0
    WRK_HEADER=${4:-}
    WRK_PATH=${5:-/}
    log "scenario $1"
    if [ "$STANDIN" = nginx ]; then
        start_nginx_proxy "standin-$1"
        sc_label=nginx-b
    else
        start_moongate "moongate-$1" "${2:-}" "${3:-}"
        sc_label=moongate
    fi
    sc_cand_sid=$PROXY_SID sc_cand_port=$PROXY_PORT
    sc_r=1
    while [ "$sc_r" -le "$ROUNDS" ]; do
        measure "$1" nginx "$NGINX_SID" "$NGINX_PORT" "$sc_r"
        measure "$1" "$sc_label" "$sc_cand_sid" "$sc_cand_port" "$sc_r"
        sc_r=$((sc_r + 1))
    done
    if [ "$PROFILE" = 1 ]; then
        profile "$sc_cand_sid" "$sc_cand_port" "$1" >>"$DIR/profiles.txt"
    fi
    if [ "$1" = json10k_gzip ]; then
        bytes_saved "$sc_cand_port" >>"$DIR/extra.txt"
    fi
    stop "$sc_cand_sid"
    WRK_PATH=/
}

# bytes_saved PORT: the 10 KB document's size on the wire from moongate
# with and without gzip, as a machine-readable line.
bytes_saved() {
    bs_url=http://127.0.0.1:$1$JSON10K_PATH
    bs_plain=$(curl -s -o /dev/null -w '%{size_download}' --max-time 2 "$bs_url")
    bs_gz=$(curl -s -o /dev/null -w '%{size_download}' --max-time 2 \
        -H 'Accept-Encoding: gzip' "$bs_url")
    awk -v p="$bs_plain" -v g="$bs_gz" 'BEGIN {
        printf "bytes json10k_gzip plain %d gzip %d saved_pct %.1f\n", p, g, 100 * (p - g) / p }'
}

# compare_gzip REPORT: moongate's req/s with gzip over without, on the
# 10 KB document, when both scenarios ran.
compare_gzip() {
    awk '$1 == "median" && $3 == "moongate" && $4 == "req_per_s" { r[$2] = $5 }
        END { if (r["json10k"] && r["json10k_gzip"])
            printf "compare json10k_gzip json10k req_per_s %.3f\n", r["json10k_gzip"] / r["json10k"] }' "$1"
}

# rs256_scenario: jwt_rs256, with an RSA key made here and a token signed
# by openssl (Python's standard library cannot sign RS256).
rs256_scenario() {
    selected jwt_rs256 || return 0
    command -v openssl >/dev/null 2>&1 || { log "openssl not found; no jwt_rs256"; return 0; }
    rs_d=$DIR/rs256
    mkdir -p "$rs_d"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
        -out "$rs_d/key.pem" 2>/dev/null
    openssl pkey -in "$rs_d/key.pem" -pubout -out "$rs_d/pub.pem"
    rs_input=$($PY -c '
import base64, json, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
h = b(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "bench", "roles": ["user"], "exp": int(time.time()) + 86400}).encode())
print(h + "." + p)')
    rs_sig=$(printf '%s' "$rs_input" | openssl dgst -sha256 -sign "$rs_d/key.pem" -binary \
        | $PY -c 'import base64, sys; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())')
    scenario jwt_rs256 \
        "plugins = { [\"jwt-auth\"] = { key = { public_key = [[$(cat "$rs_d/pub.pem")]], algorithms = { \"RS256\" } } }, acl = { allow = { \"user\" } } }" \
        "" "Authorization: Bearer $rs_input.$rs_sig"
}

# redis_scenario: ratelimit_redis, with a redis-server started (and
# stopped) here.
redis_scenario() {
    selected ratelimit_redis || return 0
    rs_port=$($TOOL port)
    spawn "$LOAD_CPU" "$DIR/redis.log" redis-server --port "$rs_port" \
        --bind 127.0.0.1 --save "" --appendonly no
    rs_sid=$SPAWNED
    rs_i=0
    until redis-cli -p "$rs_port" ping 2>/dev/null | grep -q PONG; do
        rs_i=$((rs_i + 1))
        [ "$rs_i" -lt 100 ] || die "redis-server not ready after 10 s"
        sleep 0.1
    done
    scenario ratelimit_redis \
        'plugins = { ["rate-limit"] = { limit = 1000000000, window = 3600, storage = "redis" } }' \
        "redis = { url = \"redis://127.0.0.1:$rs_port\" },"
    stop "$rs_sid"
}

# aggregate_scenario: issue 7's BFF figure. Not against nginx: one
# moongate answers the same 3-part JSON two ways -- the aggregate plugin's
# parallel parts (Host agg.bench) and a handler making the 3 gw.http calls
# one after the other (Host seq.bench) -- in interleaved rounds, so the
# table's ratio agg3/seq3 is the speedup. The parts go to
# tests/e2e/upstream.py on the load core, which answers after
# BENCH_AGG_DELAY seconds: with an instant upstream there are no round
# trips to overlap and the two would cost about the same. wrk uses
# BENCH_AGG_CONNECTIONS connections, few enough that the Python upstream
# (3 calls per request) is never the bottleneck.
aggregate_scenario() {
    selected aggregate3 || return 0
    log "scenario aggregate3"
    ag_d=$DIR/moongate-aggregate3
    mkdir -p "$ag_d"
    ag_delay=${BENCH_AGG_DELAY:-0.02}
    ag_up=$($TOOL port)
    spawn "$LOAD_CPU" "$ag_d/upstream.log" \
        "$PY" "$ROOT/tests/e2e/upstream.py" --port "$ag_up" --name slow
    ag_up_sid=$SPAWNED
    wait_ready "$ag_up_sid" "http://127.0.0.1:$ag_up/__stats" "$ag_d"
    PROXY_PORT=$($TOOL port)
    cat >"$ag_d/moongate.lua" <<EOF
local gw = require("moongate.gw")
local J = require("moongate.json_ops")
local Q = { delay = "$ag_delay" }
local function sequential(ctx)
    local out = {}
    for _, name in ipairs({ "a", "b", "c" }) do
        local res, err = gw.http.request({ upstream = "slow", path = "/" .. name,
                                           query = Q, timeout = 5 })
        if not res or res.status ~= 200 then return 502, { error = tostring(err) } end
        out[name] = J.decode(res.body)
    end
    return 200, J.encode(out), { ["Content-Type"] = "application/json" }
end
local function part(name)
    return { upstream = "slow", path = "/" .. name, query = Q }
end
return {
    listen = { "127.0.0.1:$PROXY_PORT" },
    workers = 1,
    pid_file = "$ag_d/moongate.pid",
    error_log = "$ag_d/error.log",
    log_level = "warn",
    upstreams = {
        bench = { targets = { "127.0.0.1:$UP_PORT" } },
        slow = { targets = { "127.0.0.1:$ag_up" },
                 keepalive = { max_idle = 256, idle_timeout = 60 } },
    },
    routes = {
        { path = "/*", upstream = "bench" },
        { path = "/*", hosts = { "agg.bench" }, upstream = "bench",
          plugins = { aggregate = { parts = { a = part("a"), b = part("b"), c = part("c") } } } },
        { path = "/*", hosts = { "seq.bench" }, handler = sequential },
    },
}
EOF
    spawn "$PROXY_CPU" "$ag_d/stdout.log" "$MOONGATE" -c "$ag_d/moongate.lua"
    ag_sid=$SPAWNED
    for ag_host in agg.bench seq.bench; do
        WRK_HEADER="Host: $ag_host"
        wait_ready "$ag_sid" "http://127.0.0.1:$PROXY_PORT/" "$ag_d"
        ag_got=$(curl -s --max-time 5 -H "$WRK_HEADER" "http://127.0.0.1:$PROXY_PORT/")
        case $ag_got in
            *'"a":{'*'"service":"slow"'*) ;;
            *) die "$ag_host answered '$ag_got', not the 3 parts" ;;
        esac
    done
    ag_conns=$CONNS
    CONNS=${BENCH_AGG_CONNECTIONS:-8}
    ag_r=1
    while [ "$ag_r" -le "$ROUNDS" ]; do
        WRK_HEADER="Host: seq.bench"
        measure aggregate3 seq3 "$ag_sid" "$PROXY_PORT" "$ag_r"
        WRK_HEADER="Host: agg.bench"
        measure aggregate3 agg3 "$ag_sid" "$PROXY_PORT" "$ag_r"
        ag_r=$((ag_r + 1))
    done
    CONNS=$ag_conns
    WRK_HEADER=""
    stop "$ag_sid"
    stop "$ag_up_sid"
}

# make_cert: a self-signed P-256 certificate for localhost in DIR/tls (made
# once per run); sets PROXY_TLS to that directory.
make_cert() {
    PROXY_TLS=$DIR/tls
    [ -f "$PROXY_TLS/cert.pem" ] && return 0
    mkdir -p "$PROXY_TLS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -nodes -keyout "$PROXY_TLS/key.pem" -out "$PROXY_TLS/cert.pem" \
        -days 2 -subj /CN=localhost >"$PROXY_TLS/openssl.log" 2>&1 \
        || die "openssl could not make a certificate"
}

# tls_pair NAME: nginx and the candidate (moongate, or a second nginx with
# BENCH_STANDIN=nginx), both terminating TLS with make_cert's certificate
# in front of the same plain upstream, then ROUNDS interleaved rounds;
# both stopped at the end. What is spoken over TLS is the caller's
# business (PROXY_H2, LOAD_TOOL).
tls_pair() {
    log "scenario $1"
    make_cert
    SCHEME=https
    start_nginx_proxy "nginx-$1"
    tp_n_sid=$PROXY_SID tp_n_port=$PROXY_PORT
    if [ "$STANDIN" = nginx ]; then
        start_nginx_proxy "standin-$1"
        tp_label=nginx-b
    else
        start_moongate "moongate-$1" "" ""
        tp_label=moongate
    fi
    tp_m_sid=$PROXY_SID tp_m_port=$PROXY_PORT
    if [ -n "$PROXY_H2" ]; then
        for tp_port in "$tp_n_port" "$tp_m_port"; do
            tp_v=$(curl -sk --http2 -o /dev/null -w '%{http_version}' --max-time 2 \
                "https://127.0.0.1:$tp_port/") || true
            [ "$tp_v" = 2 ] || die "port $tp_port answers HTTP/$tp_v, not HTTP/2, over TLS"
        done
    fi
    tp_r=1
    while [ "$tp_r" -le "$ROUNDS" ]; do
        measure "$1" nginx "$tp_n_sid" "$tp_n_port" "$tp_r"
        measure "$1" "$tp_label" "$tp_m_sid" "$tp_m_port" "$tp_r"
        tp_r=$((tp_r + 1))
    done
    stop "$tp_m_sid"
    stop "$tp_n_sid"
    SCHEME=http PROXY_TLS=""
}

# tls_scenario: HTTPS/1.1 keep-alive, nginx and moongate both terminating
# TLS (TLS 1.2/1.3 defaults of each, a self-signed P-256 certificate made
# here) in front of the same plain upstream; interleaved rounds as usual.
# wrk offers no ALPN, so both speak HTTP/1.1.
tls_scenario() {
    selected https || return 0
    tls_pair https
}

# h2_scenario: issue 10's HTTP/2 figure: the same two TLS proxies, nginx
# with `listen ... ssl http2`, moongate with its default (ALPN h2 on every
# TLS listener), measured with h2load (BENCH_H2_CONNECTIONS connections x
# BENCH_H2_STREAMS concurrent streams, one thread) instead of wrk. Both
# are checked to answer curl over HTTP/2 first, and h2load must report
# ALPN h2 on every run, so HTTP/1.1 can never be measured by mistake.
h2_scenario() {
    selected h2 || return 0
    PROXY_H2=1 LOAD_TOOL=h2load
    tls_pair h2
    PROXY_H2="" LOAD_TOOL=wrk
}

# scenario_self NAME LABEL_A TOP_LUA_A LABEL_B TOP_LUA_B: moongate against
# moongate — two instances of the bare proxy config on the proxy core, A
# the baseline, B the candidate (TOP_LUA_* spliced into the top-level
# table) — in interleaved rounds; the nginx baseline is not involved. For
# the cost of a feature that has no nginx counterpart in the bare proxy.
scenario_self() {
    selected "$1" || return 0
    WRK_HEADER=""
    log "scenario $1 ($2 vs $4)"
    start_moongate "moongate-$1-$2" "" "$3"
    ss_a_sid=$PROXY_SID ss_a_port=$PROXY_PORT
    start_moongate "moongate-$1-$4" "" "$5"
    ss_b_sid=$PROXY_SID ss_b_port=$PROXY_PORT
    ss_r=1
    while [ "$ss_r" -le "$ROUNDS" ]; do
        measure "$1" "$2" "$ss_a_sid" "$ss_a_port" "$ss_r"
        measure "$1" "$4" "$ss_b_sid" "$ss_b_port" "$ss_r"
        ss_r=$((ss_r + 1))
    done
    stop "$ss_a_sid"
    stop "$ss_b_sid"
}

# scenario_pair NAME BASE_ROUTE_LUA CAND_ROUTE_LUA [TOP_LUA]: moongate
# against moongate, no nginx: the catch-all route with two config variants
# (labelled mg-base and moongate, both on the proxy core), ROUNDS
# interleaved rounds; the ratios are moongate/mg-base. For the cost of one
# option, e.g. the span exporter on against off.
scenario_pair() {
    selected "$1" || return 0
    if [ "$STANDIN" = nginx ]; then
        log "scenario $1 compares two moongate configs: skipped with BENCH_STANDIN=nginx"
        return 0
    fi
    WRK_HEADER=""
    log "scenario $1 (moongate against moongate)"
    start_moongate "moongate-$1-base" "$2" "${4:-}"
    sp_base_sid=$PROXY_SID sp_base_port=$PROXY_PORT
    start_moongate "moongate-$1" "$3" "${4:-}"
    sp_cand_sid=$PROXY_SID sp_cand_port=$PROXY_PORT
    sp_r=1
    while [ "$sp_r" -le "$ROUNDS" ]; do
        measure "$1" mg-base "$sp_base_sid" "$sp_base_port" "$sp_r"
        measure "$1" moongate "$sp_cand_sid" "$sp_cand_port" "$sp_r"
        sp_r=$((sp_r + 1))
    done
    if [ "$PROFILE" = 1 ]; then
        profile "$sp_cand_sid" "$sp_cand_port" "$1" >>"$DIR/profiles.txt"
    fi
    stop "$sp_cand_sid"
    stop "$sp_base_sid"
}

# The scenarios, in order. Each adds (2 x (WARMUP + DURATION)) x ROUNDS
# seconds. Later issues add theirs here (see bench/README.md).
scenarios() {
    # The bare reverse proxy: one catch-all route, one pooled upstream.
    scenario proxy
    # The same route with five no-op plugins in every phase (rewrite,
    # access, header_filter, log): the cost of the Lua plugin runner.
    scenario plugins5 \
        'plugins = { ["noop-a"] = {}, ["noop-b"] = {}, ["noop-c"] = {}, ["noop-d"] = {}, ["noop-e"] = {} }' \
        "plugin_paths = { \"$ROOT/bench/plugins\" },"
    # Issue 4: HS256 jwt-auth + acl (a token valid for a day, signed here).
    sc_token=$($PY -c '
import base64, hashlib, hmac, json, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "bench", "roles": ["user"], "exp": int(time.time()) + 86400}).encode())
s = b(hmac.new(b"bench-secret-of-32-bytes-at-least!", (h + "." + p).encode(), hashlib.sha256).digest())
print(h + "." + p + "." + s)')
    scenario jwt_acl \
        'plugins = { ["jwt-auth"] = { key = { secret = "bench-secret-of-32-bytes-at-least!", algorithms = { "HS256" } } }, acl = { allow = { "user" } } }' \
        "" "Authorization: Bearer $sc_token"
    # Issue 4: RS256 jwt-auth + acl; the signature is checked once and the
    # verified-token cache answers after that.
    rs256_scenario
    # Issue 5: a local (shared-dict) rate limit that never trips.
    scenario ratelimit_local \
        'plugins = { ["rate-limit"] = { limit = 1000000000, window = 3600 } }' \
        'shared = { limits = "16m" },'
    # Issue 5: the same limit kept in Redis (one EVALSHA per request), in a
    # redis-server of the bench's own on the load core.
    redis_scenario
    # Issue 7: aggregate's 3 parallel parts vs 3 sequential gw.http calls
    # (ratio agg3/seq3 = the speedup; see aggregate_scenario).
    aggregate_scenario
    # Issue 9: metrics (recorded when an admin listener is configured) and
    # the JSON access log, against the same bare proxy with both off. The
    # target: req/s of "obs" at least 0.9x "off".
    sc_admin=$($TOOL port)
    scenario_self observability off "" obs \
        "admin = { listen = \"127.0.0.1:$sc_admin\" }, access_log = \"$DIR/access-obs.log\","
    # Issue 6: one route with the cache plugin, measured twice: every
    # request a hit (cache_hit), then every request proxied past the cache
    # (cache_pass: the client's Cache-Control: no-store, honoured here, is
    # a BYPASS). The report adds the cache_hit/cache_pass req/s ratio.
    sc_cache='plugins = { cache = { ttl = 3600, honor_client_no_cache = true } }'
    scenario cache_hit "$sc_cache" 'shared = { cache = "16m" },'
    scenario cache_pass "$sc_cache" 'shared = { cache = "16m" },' \
        "Cache-Control: no-store"
    # Issue 7: a 10 KB JSON response proxied as it is, then gzip-compressed
    # at level 1 (the client asks for gzip); nginx proxies it uncompressed in
    # both. `compare json10k_gzip json10k` and `bytes json10k_gzip` lines say
    # what gzip costs in req/s and saves on the wire.
    scenario json10k "" "" "" "$JSON10K_PATH"
    scenario json10k_gzip \
        'plugins = { compression = { encodings = { "gzip" }, gzip_level = 1 } }' \
        "" "Accept-Encoding: gzip" "$JSON10K_PATH"
    # Issue 13: request-id with its span exporter on and the collector down
    # (nothing listens on the port), against request-id without an
    # exporter: what a dead collector costs requests (target: req/s >= 0.95x).
    sc_dead=$($TOOL port)
    scenario_pair tracing_dead \
        'plugins = { ["request-id"] = {} }' \
        "plugins = { [\"request-id\"] = { exporter = { url = \"http://127.0.0.1:$sc_dead/v1/traces\" } } }"
    # The same with a live collector: the upstream nginx answers the
    # exports (200), so every span is built, encoded and sent.
    scenario_pair tracing_live \
        'plugins = { ["request-id"] = {} }' \
        "plugins = { [\"request-id\"] = { exporter = { url = \"http://127.0.0.1:$UP_PORT/v1/traces\" } } }"
    # Issue 10: HTTPS/1.1 keep-alive, both proxies terminating TLS.
    tls_scenario
    # Issue 10: HTTP/2 over TLS (h2load), both proxies terminating TLS.
    h2_scenario
}

# ------------------------------------------------------------------ main

main() {
    for ma_bin in "$NGINX" wrk taskset setsid timeout curl "$PY"; do
        command -v "$ma_bin" >/dev/null 2>&1 \
            || die "$ma_bin not found (run: sh scripts/install-deps.sh)"
    done
    if selected h2; then
        command -v h2load >/dev/null 2>&1 \
            || die "h2load not found (run: sh scripts/install-deps.sh)"
    fi
    [ "$(nproc)" -ge 2 ] || log "WARNING: fewer than 2 cores; pinning overlaps"
    if [ "$STANDIN" != nginx ] && [ ! -x "$MOONGATE" ]; then
        die "$MOONGATE not built (make all), or set BENCH_STANDIN=nginx"
    fi

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/moongate-bench.XXXXXX")
    RESULTS=$DIR/results.tsv
    : >"$RESULTS"

    log "rounds=$ROUNDS duration=${DURATION}s warmup=${WARMUP}s" \
        "connections=$CONNS proxy cpu=$PROXY_CPU load cpu=$LOAD_CPU" \
        "nginx forwarding headers=$NGINX_FWD nice=$NICE"
    ma_busy=$($TOOL busy 1)
    if [ "$ma_busy" -gt 10 ]; then
        log "NOTE: the machine was ${ma_busy}% busy before the start;" \
            "expect noisy figures"
    fi
    start_upstream
    start_nginx_proxy nginx
    NGINX_SID=$PROXY_SID NGINX_PORT=$PROXY_PORT
    scenarios
    stop "$NGINX_SID"
    stop "$UP_SID"

    [ -s "$RESULTS" ] || die "no scenario matched BENCH_SCENARIOS=$SCENARIOS"
    # Profiles first: the machine-readable lines must be the last ones.
    [ -f "$DIR/profiles.txt" ] && cat "$DIR/profiles.txt"
    ma_rc=0
    $TOOL report "$RESULTS" >"$DIR/report.txt" || ma_rc=$?
    # The compression figures go just before the last line (valid yes|no).
    compare_gzip "$DIR/report.txt" >>"$DIR/extra.txt"
    sed '$d' "$DIR/report.txt"
    [ -f "$DIR/extra.txt" ] && cat "$DIR/extra.txt"
    tail -n 1 "$DIR/report.txt"
    if [ "$ma_rc" -ne 0 ]; then
        echo "WARNING: wrk saw socket errors or non-2xx answers;" \
            "these figures are not valid" >&2
        exit "$ma_rc"
    fi
    if [ "$STRICT" = 1 ]; then
        check_targets || exit 1
    fi
}

# check_targets: issue 2's targets for the bare proxy scenario: req/s at
# least nginx's, CPU per request and p99 no more than nginx's.
check_targets() {
    awk '$1 != "ratio" || $2 != "proxy" { next }
        ($3 == "req_per_s" && $4 < 1) ||
        (($3 == "cpu_us_per_req" || $3 == "p99_ms") && $4 > 1) {
            bad = 1; print "target missed: " $3 " ratio " $4
        }
        END { exit bad }' "$DIR/report.txt" >&2
}

main "$@"
