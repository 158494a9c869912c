/*
 * Upstreams at run time: target selection over a generation's targets
 * (balancer.c, skipping targets that are down or whose breaker is open),
 * the bookkeeping of each try (passive health, breaker, in-flight, latency,
 * all in the shared per-target state of peers.c), and the per-target pools
 * of keep-alive connections. A target (an address) and its pool belong to
 * the worker, not to a generation, so reloads keep warm connections. This
 * module opens, pools and closes upstream connections; it does not speak
 * HTTP (proxy.c does).
 */
#ifndef MG_UPSTREAM_H
#define MG_UPSTREAM_H

#include <uv.h>

#include "balancer.h"
#include "breaker.h"
#include "config.h"
#include "peers.h"

typedef struct mg_target_s mg_target_t;
typedef struct mg_upconn_s mg_upconn_t;

/* A generation's view of one configured upstream (one worker's). */
typedef struct {
    const mg_upstream_conf_t *conf;
    mg_target_t **targets; /* worker-owned targets, parallel to conf */
    size_t ntargets;
    unsigned next;     /* fallback round-robin cursor (mg_upstream_pick) */
    unsigned inflight; /* requests using this upstream right now */
    mg_balancer_t *balancer;
    mg_peer_t **peers; /* shared state, parallel to targets */
    uint8_t *usable;   /* scratch for picks, parallel to targets */
    uint32_t *load;
    uint64_t *ewma;
    double retry_tokens; /* retry budget: + budget per request, - 1 per
                            retry (this worker's share) */
} mg_upstream_t;

/* How one try at a target ended (mg_upstream_try_end). */
enum {
    MG_TRY_OK,      /* a response head arrived (any status) */
    MG_TRY_CONNECT, /* connect failed or timed out */
    MG_TRY_TIMEOUT, /* read/send timeout */
    MG_TRY_ERROR,   /* reset, closed or garbage before a response */
};

/* One try's ticket: which target, its breaker ticket, when it began. */
typedef struct {
    int index; /* -1: no try open */
    mg_breaker_ticket_t ticket;
    uint64_t start_ms;
} mg_upstream_try_t;

/*
 * Builds the run-time parts of `u` (u->conf, u->targets and u->ntargets
 * set by the caller): the balancer and the shared per-target slots. Undo
 * with mg_upstream_clear.
 */
void mg_upstream_init(mg_upstream_t *u, uint64_t seed);
void mg_upstream_clear(mg_upstream_t *u);

/* May target i take a request now: not down, breaker not open? Restores
 * a passive mark whose time is up. */
int mg_upstream_usable(mg_upstream_t *u, size_t i, uint64_t now_ms);

/*
 * Chooses a target for a request with the upstream's balancer among the
 * usable targets not marked in `tried` (NULL or ntargets flags). `key` is
 * the hash key (balance = "hash"). Returns the index, or -1 when none is
 * left.
 */
int mg_upstream_choose(mg_upstream_t *u, uint64_t key, const uint8_t *tried,
                       uint64_t now_ms);

/*
 * Opens a try at target `index`: asks its breaker (a half-open breaker may
 * have given its last probe to another worker: returns 0, try again
 * elsewhere), counts it in flight. Returns 1 with *t open.
 */
int mg_upstream_try_begin(mg_upstream_t *u, int index, uint64_t now_ms,
                          mg_upstream_try_t *t);

/*
 * Closes an open try with its outcome (MG_TRY_*) and, for MG_TRY_OK, the
 * response status: feeds the breaker, passive health and the latency
 * average. No-op when *t is not open.
 */
void mg_upstream_try_end(mg_upstream_t *u, mg_upstream_try_t *t, int outcome,
                         int status, uint64_t now_ms);

/* Closes an open try that reached no verdict (client gone). */
void mg_upstream_try_cancel(mg_upstream_t *u, mg_upstream_try_t *t);

/* When nothing is usable: seconds until something may be (Retry-After),
 * at least 1. */
unsigned mg_upstream_retry_after(mg_upstream_t *u, uint64_t now_ms);

/*
 * Per-target state for the admin /status endpoint (and gw.upstream). Fills
 * up to `cap` entries of `out` for the targets of `u` (a generation's
 * upstream: mg_worker_gen(w)->upstreams[i]) and returns how many targets
 * there are. Reads shared memory only: the numbers are the whole
 * gateway's, not one worker's. Strings borrow the config (valid while the
 * generation is referenced). Loop thread only.
 */
typedef struct {
    const char *address; /* "127.0.0.1:9001" as configured */
    unsigned weight;
    int healthy;         /* 0: down (passive or active) */
    const char *breaker; /* "closed", "open", "half_open" */
    unsigned inflight;   /* requests on it now, all workers */
    unsigned failures;   /* consecutive (passive) failures */
    uint64_t requests;   /* tries sent since start */
    uint64_t failed;     /* tries failed since start */
    uint64_t checks;     /* active checks done since start */
    double latency_ms;   /* EWMA of the time to the response head */
} mg_target_status_t;

size_t mg_upstream_status(mg_upstream_t *u, mg_target_status_t *out,
                          size_t cap);

/*
 * The same from a config's upstream, for a process that holds no
 * generation (the master's /status): the shared slots are found by
 * upstream name and target address, as the workers key them. Needs the
 * shared table mapped (mg_peers_init). Strings borrow `c`.
 */
size_t mg_upstream_conf_status(const mg_upstream_conf_t *c,
                               mg_target_status_t *out, size_t cap);

typedef void (*mg_upconn_connect_cb)(mg_upconn_t *uc, int status);

/* Data arrived (rbuf[rlen - nread .. rlen)), or nread < 0: EOF/error. */
typedef void (*mg_upconn_read_cb)(mg_upconn_t *uc, ssize_t nread);

/*
 * One TCP connection to a target. It reads for its whole life, into rbuf
 * after rlen: while pooled (owner == NULL) any byte or EOF closes it; while
 * owned, each read goes to on_read. Reading only stops when the owner says
 * the buffer is full (mg_upconn_read_pause), so a request costs no epoll
 * changes. The owner drives writes and the timer; the layout is public so
 * proxy.c can use the libuv handles directly.
 */
struct mg_upconn_s {
    uv_tcp_t tcp;     /* tcp.data == this */
    uv_timer_t timer; /* owner's timeouts, or the idle timeout */
    uv_connect_t connect_req;
    mg_target_t *target;
    void *owner; /* NULL while pooled */
    mg_upconn_connect_cb on_connect;
    mg_upconn_t *next_idle; /* pool links */
    mg_upconn_t *prev_idle;
    unsigned reused : 1; /* came from the pool */
    unsigned closing : 1;
    void (*on_close)(mg_upconn_t *uc); /* optional, before the free */
    mg_upconn_read_cb on_read;         /* owner's, while owned */
    char *rbuf;                        /* read buffer */
    size_t rcap;                       /* its size */
    size_t rlen;                       /* bytes in it; the owner resets it */
    size_t rmax;                       /* the owner lets rbuf grow up to this */
    unsigned reading : 1;
    mg_tls_conn_t *tls; /* https target: the session, NULL: plain */
    char *tls_in;       /* its ciphertext read buffer */
};

/*
 * Writes to the connection: uv_write's contract (an error return and no
 * callback, or 0 and exactly one callback); over TLS the bytes are
 * encrypted first (the buffers are not borrowed past the call then).
 */
int mg_upconn_write(mg_upconn_t *uc, uv_write_t *req, const uv_buf_t *bufs,
                    unsigned n, uv_write_cb cb);

/*
 * A target for gw.http.request: the balancer's choice among the usable
 * targets (no hash key), or when none is usable the next one in turn (the
 * caller gets the upstream's own error rather than none at all).
 */
mg_target_t *mg_upstream_pick(mg_upstream_t *u);

/* The target's address as configured ("127.0.0.1:9001"), for logs. */
const char *mg_target_name(const mg_target_t *t);

/*
 * Creates a target for `tc` (worker-owned; freed by mg_target_free). An
 * https target (tc->tls) keeps a reference on its TLS context; a target
 * matches a config's only with the same context, so a reload that reads
 * new CA or client certificate files starts a new pool.
 */
mg_target_t *mg_target_new(uv_loop_t *loop, const mg_target_conf_t *tc);
int mg_target_matches(const mg_target_t *t, const mg_target_conf_t *tc);
void mg_target_free(mg_target_t *t);

/*
 * Gets a connection to `t` for `owner`: an idle pooled one (returns 0 and
 * sets *out, with reused = 1), or a new one (returns MG_AGAIN, sets *out and
 * calls cb exactly once when connected or failed; on failure the connection
 * is already being closed). A negative return means the connect could not
 * even start. `connect_ms` bounds the connect.
 */
int mg_upconn_get(mg_target_t *t, void *owner, uint64_t connect_ms,
                  mg_upconn_connect_cb cb, mg_upconn_t **out);

/*
 * Gives a healthy connection back to the pool (owner done, no bytes
 * pending). The pool keeps at most `max_idle` per target for `idle_ms`;
 * beyond that the connection is closed.
 */
void mg_upconn_release(mg_upconn_t *uc, unsigned max_idle, uint64_t idle_ms);

/* Stops reading (the buffer is full) / starts again. */
void mg_upconn_read_pause(mg_upconn_t *uc);
void mg_upconn_read_resume(mg_upconn_t *uc);

/* Half-closes an owned connection that will never go back to the pool
 * (a tunnel): a TLS close_notify, then a FIN once queued writes are out.
 * Reading goes on. */
void mg_upconn_shutdown(mg_upconn_t *uc);

/* Closes a connection (owned or not). Safe to call twice. */
void mg_upconn_close(mg_upconn_t *uc);

#endif
