/*
 * The admin listener: a small HTTP/1.1 server run by the master process
 * (see admin.c for why there), answering GET /status, GET /metrics and
 * POST /reload through callbacks the master provides, and the dashboard
 * page (GET /, GET /dashboard) from a file. It knows nothing of
 * what the answers contain; the master and metrics.c build them.
 */
#ifndef MG_ADMIN_H
#define MG_ADMIN_H

#include <poll.h>

#include "config.h"
#include "strbuf.h"

typedef struct mg_admin_s mg_admin_t;

/* The endpoints. Each appends its body to `out` and returns the HTTP
 * status; bodies are JSON except metrics (Prometheus text). */
typedef struct {
    int (*status)(void *arg, mg_strbuf_t *out);
    int (*metrics)(void *arg, mg_strbuf_t *out);
    int (*reload)(void *arg, mg_strbuf_t *out);
    void *arg;
} mg_admin_handlers_t;

/*
 * Opens the listener of `conf` (admin.listen must be set). The handlers
 * are copied. Returns 0 and *out, or a negative errno.
 */
int mg_admin_open(const mg_admin_conf_t *conf, const mg_admin_handlers_t *h,
                  mg_admin_t **out);

/* True when `conf` listens where `a` already does (the socket is kept). */
int mg_admin_same_address(const mg_admin_t *a, const mg_admin_conf_t *conf);

/* Takes the token of a new config (NULL: none required). */
void mg_admin_set_token(mg_admin_t *a, const char *token);

/*
 * (Re)reads the dashboard page from `path` (borrowed) and computes its
 * Content-Security-Policy. On failure GET / answers 404 with the reason,
 * which is also logged. Returns 0 or a negative errno.
 */
int mg_admin_load_page(mg_admin_t *a, const char *path);

/* Closes the listener and every connection; NULL is a no-op. */
void mg_admin_close(mg_admin_t *a);

/* In a freshly forked worker: closes the inherited descriptors only (the
 * master's copy of the structure stays valid in the master). */
void mg_admin_close_fds(mg_admin_t *a);

/*
 * Poll integration: fills up to `max` pollfds (returns how many) and lowers
 * *timeout_ms to the nearest connection deadline; after poll(), hands the
 * same array back to mg_admin_process, which serves what is ready and
 * closes connections past their deadline. Never blocks.
 */
size_t mg_admin_pollfds(mg_admin_t *a, struct pollfd *fds, size_t max,
                        int *timeout_ms);
void mg_admin_process(mg_admin_t *a, const struct pollfd *fds, size_t n);

#define MG_ADMIN_MAX_POLLFDS 17 /* the listener and 16 connections */

#endif
