/*
 * Active health checks: an HTTP GET to each target of every upstream with
 * `health = { ... }`, on a timer, non-blocking on the caller's libuv loop;
 * consecutive passes and failures move the target's shared `down` flag
 * (peers.c), which every worker's balancer reads.
 *
 * Where it runs: in worker 1 only (worker.c starts it there), so a gateway
 * sends one check per target per interval whatever its worker count. Not in
 * the master: the master is a synchronous signal loop that must stay small
 * and never touch the network (DESIGN.md), and a libuv loop there would be
 * a second process model to reason about. Worker 1 is restarted by the
 * master when it dies, so the checks come back with it; the state they
 * wrote lives in shared memory and survives. While worker 1 drains (it is
 * being replaced) its checks stop and the replacement's start.
 *
 * A check: connect, send "GET <path> HTTP/1.1" with Connection: close, read
 * the status line, close. Healthy when the status is in `statuses`; a
 * connect error, a timeout (`timeout`, the whole check) or another status
 * is a failure. A TLS upstream's target is checked over TLS with the
 * upstream's client context (mg_target_conf_t.tls, referenced for as long
 * as the check exists); a failed handshake or verification is a failure.
 */
#ifndef MG_HEALTH_H
#define MG_HEALTH_H

#include <uv.h>

#include "http.h"

typedef struct mg_health_s mg_health_t;

/* A checker on `loop` (checks nothing until mg_health_apply). */
mg_health_t *mg_health_new(uv_loop_t *loop);

/*
 * Checks the upstreams of generation `g` that configure `health`, in place
 * of whatever was checked before (a check in progress for the old set
 * finishes and is dropped). Copies what it needs: `g` may go away after.
 */
void mg_health_apply(mg_health_t *h, const mg_gen_t *g);

/* Stops every check and frees the checker once its handles are closed.
 * NULL is fine. Loop thread only. */
void mg_health_close(mg_health_t *h);

#endif
