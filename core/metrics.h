/*
 * Gateway metrics in shared memory: one anonymous shared mapping made by
 * the master before it forks, so every worker (and every worker that
 * replaces one) adds to the same counters and the master reads them for
 * /metrics without asking anyone. Like zones.c, the mapping is process-wide
 * by nature (inherited through fork), so this module keeps it in a static.
 *
 * Recording is one call per finished request (mg_metrics_record): a few
 * relaxed atomic adds into the caller's shard, no lock, no allocation.
 * Counters are sharded by worker so two workers do not fight over one
 * cache line; the master sums the shards when it renders.
 *
 * Label cardinality is bounded: a request is counted under its route's
 * configured name (never the raw path), its method folded into a fixed
 * set (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, OTHER) and its status
 * class (1xx..5xx). At most MG_METRICS_MAX_ROUTES route names are known at
 * once per gateway life; past that, routes are counted as "(other)".
 * Requests that match no route are counted as "(unmatched)".
 */
#ifndef MG_METRICS_H
#define MG_METRICS_H

#include "common.h"
#include "http.h"
#include "strbuf.h"

#define MG_METRICS_MAX_ROUTES 512
#define MG_METRICS_MAX_PROCS 512 /* workers alive at once, draining too */
#define MG_METRICS_NO_SLOT (-1)

/*
 * Maps the shared area. Master only, before the first fork; idempotent.
 * Returns 0 or a negative errno.
 */
int mg_metrics_init(void);

/* --- master ------------------------------------------------------------ */

/* A gauge slot for a worker about to be forked (MG_METRICS_NO_SLOT when
 * all are taken: that worker's gauges are then not reported). */
int mg_metrics_proc_acquire(void);

/* The worker that held `slot` is gone: its gauges read zero again. */
void mg_metrics_proc_release(int slot);

/* What only the master knows, rendered with the shared counters. */
typedef struct {
    const char *config_hash; /* hex sha256 of the config file */
    uint64_t reloads_ok, reloads_failed;
    uint64_t worker_restarts;
    unsigned workers;              /* configured worker count */
    const struct mg_config_s *cfg; /* its upstream targets are reported
                                      (state from peers.h); may be NULL */
} mg_metrics_master_t;

/* Appends the Prometheus text exposition (format 0.0.4) to out. */
void mg_metrics_render(mg_strbuf_t *out, const mg_metrics_master_t *m);

/* --- workers ----------------------------------------------------------- */

/* Called once in a new worker with the slot the master acquired for it. */
void mg_metrics_attach(int slot);

/* Turns request recording on or off (on when an admin listener is
 * configured: the only way to read the numbers). */
void mg_metrics_enable(int on);

/*
 * The series index for a route name, registered on first use (shared by
 * every worker, stable for the gateway's life). Generation build time
 * only: it may wait for another process registering the same slot.
 */
unsigned mg_metrics_route_series(const char *name);

/*
 * Records a finished request (status as sent, or 499 when the client left
 * first): counts, durations, bytes. The hot path: atomics only.
 */
void mg_metrics_record(const mg_req_t *r, int status);

/* HTTP/2 (http2.c): a GOAWAY frame sent with nghttp2 error `code`, a
 * stream begun, a connection that became HTTP/2. Atomics only. */
void mg_metrics_h2_goaway(uint32_t code);
void mg_metrics_h2_stream(void);
void mg_metrics_h2_connection(void);

/* The lower-case RFC 9113 name of an HTTP/2 error code ("no_error",
 * "enhance_your_calm", ...; "unknown" past the known ones). */
const char *mg_metrics_h2_code_name(uint32_t code);

/* Gauges of this worker. */
void mg_metrics_set_connections(unsigned n);
void mg_metrics_add_generations(int delta);

#endif
