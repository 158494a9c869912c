/*
 * Upstreams at run time: the balancer over a generation's targets, and the
 * per-target pools of keep-alive connections. A target (an address) and its
 * pool belong to the worker, not to a generation, so reloads keep warm
 * connections. This module opens, pools and closes upstream connections; it
 * does not speak HTTP (proxy.c does).
 */
#ifndef MG_UPSTREAM_H
#define MG_UPSTREAM_H

#include <uv.h>

#include "config.h"

typedef struct mg_target_s mg_target_t;
typedef struct mg_upconn_s mg_upconn_t;

/* A generation's view of one configured upstream. */
typedef struct {
    const mg_upstream_conf_t *conf;
    mg_target_t **targets; /* worker-owned targets, parallel to conf */
    size_t ntargets;
    unsigned next;     /* round-robin cursor */
    unsigned inflight; /* requests using this upstream right now */
} mg_upstream_t;

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
};

/* Round robin over the upstream's targets. */
mg_target_t *mg_upstream_pick(mg_upstream_t *u);

/* The target's address as configured ("127.0.0.1:9001"), for logs. */
const char *mg_target_name(const mg_target_t *t);

/*
 * Creates a target for `tc` (worker-owned; freed by mg_target_free).
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

/* Closes a connection (owned or not). Safe to call twice. */
void mg_upconn_close(mg_upconn_t *uc);

#endif
