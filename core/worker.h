/*
 * A worker process: one libuv loop, the listening sockets inherited from the
 * master, the client connections, the upstream connection pools, and the
 * current config generation. Reload swaps the generation in place; the
 * connections and pools stay.
 */
#ifndef MG_WORKER_H
#define MG_WORKER_H

#include <uv.h>

#include "config.h"
#include "http.h"
#include "lua.h"

typedef struct mg_target_s mg_target_t;

typedef struct {
    int *listen_fds; /* borrowed from the master, one per listener */
    size_t nlisten;
    unsigned slot;                /* 1-based worker number, for logs */
    const char *config_path;      /* re-read on reload */
    const uint8_t *ticket_secret; /* MG_TLS_SECRET_LEN bytes drawn by the
                                     master: TLS session tickets */
} mg_worker_opts_t;

/*
 * Runs a worker until it is told to stop and has drained. Takes ownership
 * of `cfg` (the config the master validated before forking). Returns the
 * process exit status. Never returns in the master.
 */
int mg_worker_run(const mg_worker_opts_t *opts, mg_config_t *cfg);

/* The generation new requests start on (borrowed; take a ref to keep). */
mg_gen_t *mg_worker_gen(mg_worker_t *w);

uv_loop_t *mg_worker_loop(mg_worker_t *w);

/* The worker's access log, or NULL when it is off. */
typedef struct mg_accesslog_s mg_accesslog_t;
mg_accesslog_t *mg_worker_accesslog(mg_worker_t *w);

/*
 * A read buffer for bytes that are copied elsewhere as soon as they are
 * read (TLS ciphertext goes straight into the session): libuv calls a
 * stream's alloc and read callbacks back to back, so one buffer serves
 * every connection of the worker. Valid until the callback returns.
 */
char *mg_worker_scratch(mg_worker_t *w, size_t *len);

/* The worker's Lua VM. */
mg_lua_t *mg_worker_lua(mg_worker_t *w);

/* True once the worker is stopping: responses carry Connection: close. */
int mg_worker_draining(const mg_worker_t *w);

/* Writes a fresh 32-hex-digit request id and a NUL into out. */
void mg_worker_request_id(mg_worker_t *w, char out[33]);

/*
 * A write to a stream. mg_worker_write first tries the write in place
 * (uv_try_write) and falls back to uv_write for what did not fit; libuv
 * 1.44 re-arms epoll after every uv_write, which costs a syscall per
 * response. `cb` runs exactly once, never before mg_worker_write returns
 * (in-place completions are delivered from the loop's check phase), with
 * UV_ECANCELED when the stream was closed meanwhile.
 */
typedef struct mg_wreq_s mg_wreq_t;
typedef void (*mg_wreq_cb)(mg_wreq_t *wr, int status);
struct mg_wreq_s {
    uv_write_t req;
    uv_stream_t *stream;
    mg_wreq_cb cb;
    mg_wreq_t *next_done;
    int status; /* for completions delivered from the check */
};

void mg_worker_write(mg_worker_t *w, uv_stream_t *s, mg_wreq_t *wr,
                     const uv_buf_t *bufs, unsigned n, mg_wreq_cb cb);

/* Runs `cb` from the loop soon (the same check/prepare pass that delivers
 * in-place write completions), outside the caller's stack; status 0. `wr`
 * must stay valid until then. Used by http2.c to batch frames per turn. */
void mg_worker_defer(mg_worker_t *w, mg_wreq_t *wr, mg_wreq_cb cb);

/* The worker's client connections, maintained by http1.c. */
typedef struct {
    mg_conn_t *head;
    unsigned count;
} mg_conn_list_t;

mg_conn_list_t *mg_worker_conns(mg_worker_t *w);

/* Bookkeeping from http1.c: a client connection was closed and freed. */
void mg_worker_conn_closed(mg_worker_t *w);

/*
 * The pooled target for an address, created on first use and kept for the
 * worker's life so a reload keeps warm upstream connections.
 */
mg_target_t *mg_worker_target(mg_worker_t *w, const mg_target_conf_t *tc);

/* --- http1.c, called by the worker ------------------------------------- */

/* Accepts one connection from `server` and starts serving it; over TLS
 * with `tls`'s certificates when it is not NULL (borrowed). `http2`: the
 * listener's `http2` option (ALPN h2 on TLS, h2c prior knowledge on
 * plain). */
void mg_http1_accept(mg_worker_t *w, uv_stream_t *server, mg_tls_t *tls,
                     int http2);

/* Asks every connection to finish: idle ones close now, busy ones after
 * their current response (with Connection: close). */
void mg_http1_drain_all(mg_worker_t *w);

#endif
