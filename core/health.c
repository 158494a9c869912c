/*
 * The active health checker of health.h. One check_t per checked target,
 * each a small state machine on one timer: idle (the timer waits for the
 * interval) -> probing (a TCP handle exists; the timer is the check's
 * timeout) -> the verdict closes the handle, and its close callback arms
 * the next interval, so a handle is never reused before libuv is done
 * with it.
 *
 * An https target is probed over TLS with the upstream's own client
 * context (a reference on its mg_tls_client_t: same CA, verification, SNI
 * name and client certificate as the proxied traffic): after the TCP
 * connect the handshake runs, then the request goes out encrypted and the
 * status line is decrypted into the same buffer a plain probe reads into.
 * The one timer bounds all of it. The session lives exactly as long as
 * the probe's TCP handle (end_probe frees both).
 */
#include "health.h"

#include <stdio.h>
#include <stdlib.h>

#include "generation.h"
#include "log.h"
#include "peers.h"
#include "tls.h"

#define TLS_IN_LEN 4096 /* ciphertext read size; any size works */

typedef struct check_s check_t;

struct check_s {
    mg_health_t *h;
    check_t *next;
    uv_timer_t timer;
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    uv_write_t write_req;
    mg_peer_t *peer; /* shared memory: outlives generations */
    char *upstream;  /* for logs */
    char *target;
    struct sockaddr_storage addr;
    char *request;
    size_t request_len;
    uint64_t interval_ms, timeout_ms;
    unsigned healthy, unhealthy;
    mg_status_set_t statuses;
    char buf[32]; /* the status line's start */
    size_t blen;
    mg_tls_client_t *tls_ctx; /* https: a reference; NULL: plain */
    char *tls_name;           /* SNI / verified name */
    char *tls_in;             /* ciphertext read buffer (https only) */
    mg_tls_conn_t *tls;       /* the probe's session, while it runs */
    unsigned handles;         /* open libuv handles: free at 0 when stopping */
    unsigned probing : 1;     /* a probe's TCP handle is open */
    unsigned stopping : 1;
    unsigned handshaken : 1; /* the probe's TLS handshake is done */
};

struct mg_health_s {
    uv_loop_t *loop;
    check_t *checks;
};

static void free_check(check_t *c)
{
    mg_tls_conn_free(c->tls);
    mg_tls_client_unref(c->tls_ctx);
    free(c->tls_name);
    free(c->tls_in);
    free(c->upstream);
    free(c->target);
    free(c->request);
    free(c);
}

static void on_handle_closed(uv_handle_t *hd)
{
    check_t *c = hd->data;
    if (--c->handles == 0 && c->stopping)
        free_check(c);
}

static void on_interval(uv_timer_t *t);

static void on_tcp_closed(uv_handle_t *hd)
{
    check_t *c = hd->data;
    c->probing = 0;
    if (!c->stopping)
        uv_timer_start(&c->timer, on_interval, c->interval_ms, 0);
    on_handle_closed(hd);
}

/* Closes the probe's TCP handle and drops its TLS session: every end of a
 * probe (verdict, stop, reload) goes through here. Pending writes are
 * cancelled by libuv and free their buffers in their callbacks. */
static void end_probe(check_t *c, uv_close_cb cb)
{
    mg_tls_conn_free(c->tls);
    c->tls = NULL;
    uv_close((uv_handle_t *)&c->tcp, cb);
}

/* Records one result in the shared state and ends the probe. */
static void verdict(check_t *c, int ok, const char *why)
{
    mg_peer_t *pe = c->peer;
    uv_timer_stop(&c->timer);
    atomic_fetch_add(&pe->checks, 1);
    if (ok) {
        atomic_store(&pe->active_fail, 0);
        uint32_t run = atomic_fetch_add(&pe->active_ok, 1) + 1;
        if (run >= c->healthy && atomic_load(&pe->down)) {
            atomic_store(&pe->fails, 0);
            atomic_store(&pe->down_until_ms, 0);
            atomic_store(&pe->down, 0);
            mg_log_warn("upstream %s: target %s healthy again (%u checks "
                        "passed)",
                        c->upstream, c->target, run);
        }
    } else {
        atomic_store(&pe->active_ok, 0);
        uint32_t run = atomic_fetch_add(&pe->active_fail, 1) + 1;
        if (run >= c->unhealthy && !atomic_load(&pe->down)) {
            atomic_store(&pe->down_until_ms, 0);
            atomic_store(&pe->down, 1);
            mg_log_warn("upstream %s: target %s marked down by health "
                        "checks (%u failed: %s)",
                        c->upstream, c->target, run, why);
        }
    }
    end_probe(c, on_tcp_closed);
}

static void on_check_timeout(uv_timer_t *t)
{
    check_t *c = t->data;
    if (c->probing)
        verdict(c, 0,
                c->tls && !c->handshaken ? "timeout in the TLS handshake"
                                         : "timeout");
}

static void on_alloc(uv_handle_t *hd, size_t hint, uv_buf_t *b)
{
    check_t *c = hd->data;
    *b = uv_buf_init(c->buf + c->blen, (unsigned)(sizeof(c->buf) - c->blen));
}

/* "HTTP/1.x NNN": the status, or -1 while incomplete, -2 when invalid. */
static int status_of(const char *b, size_t n)
{
    if (n < 12)
        return -1;
    if (memcmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ')
        return -2;
    int st = 0;
    for (int i = 9; i < 12; i++) {
        if (b[i] < '0' || b[i] > '9')
            return -2;
        st = st * 10 + (b[i] - '0');
    }
    return st;
}

/* Decides once the status line is in buf (or cannot be). */
static void judge(check_t *c)
{
    int st = status_of(c->buf, c->blen);
    if (st == -1 && c->blen < sizeof(c->buf))
        return;
    if (st < 0) {
        verdict(c, 0, "invalid response");
        return;
    }
    char why[32];
    snprintf(why, sizeof(why), "status %d", st);
    verdict(c, mg_status_set_has(&c->statuses, st), why);
}

static void on_written(uv_write_t *req, int status)
{
    (void)req;
    (void)status; /* a failed write shows as a read error or the timeout */
}

/* ---- TLS: small steps, each with one job ------------------------------ */

typedef struct {
    uv_write_t req;
    /* the ciphertext follows */
} tls_write_t;

static void on_tls_written(uv_write_t *req, int status)
{
    (void)status; /* as on_written */
    free(req);
}

/* Sends the ciphertext the session has produced (handshake records, the
 * encrypted request, alerts). Its own copy: the write may outlive the
 * session (end_probe frees it; the cancelled write frees its copy). */
static void tls_flush(check_t *c)
{
    size_t n = mg_tls_conn_pending(c->tls);
    if (n == 0)
        return;
    tls_write_t *tw = mg_malloc(sizeof(*tw) + n);
    char *p = (char *)(tw + 1);
    uv_buf_t b = uv_buf_init(p, (unsigned)mg_tls_conn_take(c->tls, p, n));
    if (uv_write(&tw->req, (uv_stream_t *)&c->tcp, &b, 1, on_tls_written) < 0)
        free(tw); /* shows as a read error or the timeout */
}

/* A fatal TLS error: a failed check whose reason is OpenSSL's. */
static void tls_fail(check_t *c, const char *stage)
{
    char why[256];
    snprintf(why, sizeof(why), "TLS %s: %s", stage, mg_tls_conn_error(c->tls));
    verdict(c, 0, why);
}

/* Runs the handshake as far as the input allows; once done, sends the
 * request. 1 done, 0 more input needed, -1 the check has failed. */
static int tls_handshake(check_t *c)
{
    int rc = mg_tls_conn_handshake(c->tls);
    tls_flush(c); /* the ClientHello, Finished, or an alert */
    if (rc == 0)
        return 0;
    if (rc < 0) {
        tls_fail(c, "handshake failed");
        return -1;
    }
    c->handshaken = 1;
    if (mg_tls_conn_write(c->tls, c->request, c->request_len) < 0) {
        tls_fail(c, "write");
        return -1;
    }
    tls_flush(c);
    return 1;
}

/* Decrypts what has arrived into buf, then judges the status line. */
static void tls_read_status(check_t *c)
{
    while (c->blen < sizeof(c->buf)) {
        int n = mg_tls_conn_read(c->tls, c->buf + c->blen,
                                 sizeof(c->buf) - c->blen);
        tls_flush(c); /* e.g. a key update's answer */
        if (n == 0)
            break;
        if (n == UV_EOF) {
            verdict(c, 0, "closed");
            return;
        }
        if (n < 0) {
            tls_fail(c, "read");
            return;
        }
        c->blen += (size_t)n;
    }
    judge(c);
}

/* Ciphertext from the socket: handshake first, then the response. */
static void tls_on_data(check_t *c, const char *p, size_t n)
{
    mg_tls_conn_feed(c->tls, p, n);
    if (!c->handshaken && tls_handshake(c) <= 0)
        return;
    tls_read_status(c);
}

static void on_tls_alloc(uv_handle_t *hd, size_t hint, uv_buf_t *b)
{
    check_t *c = hd->data;
    (void)hint;
    *b = uv_buf_init(c->tls_in, TLS_IN_LEN);
}

/* ---- the probe ------------------------------------------------------- */

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    check_t *c = s->data;
    if (c->stopping || nread == 0)
        return;
    if (nread < 0) {
        const char *why = nread == UV_EOF ? "closed" : uv_strerror((int)nread);
        char buf[96];
        if (c->tls && !c->handshaken) {
            snprintf(buf, sizeof(buf), "%s in the TLS handshake", why);
            why = buf;
        }
        verdict(c, 0, why);
        return;
    }
    if (c->tls) {
        tls_on_data(c, b->base, (size_t)nread);
        return;
    }
    c->blen += (size_t)nread;
    judge(c);
}

static void on_connected(uv_connect_t *req, int status)
{
    check_t *c = req->data;
    if (c->stopping || !c->probing || uv_is_closing((uv_handle_t *)&c->tcp))
        return;
    if (status < 0) {
        verdict(c, 0, uv_strerror(status));
        return;
    }
    if (c->tls_ctx) {
        c->tls = mg_tls_conn_new_client(c->tls_ctx, c->tls_name);
        c->handshaken = 0;
        uv_read_start((uv_stream_t *)&c->tcp, on_tls_alloc, on_read);
        tls_handshake(c); /* sends the ClientHello; cannot finish yet */
        return;
    }
    uv_buf_t b = uv_buf_init(c->request, (unsigned)c->request_len);
    uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_interval(uv_timer_t *t)
{
    check_t *c = t->data;
    if (c->stopping || c->probing)
        return;
    c->blen = 0;
    uv_tcp_init(c->h->loop, &c->tcp);
    c->tcp.data = c;
    c->connect_req.data = c;
    c->probing = 1;
    c->handles++;
    int rc = uv_tcp_connect(&c->connect_req, &c->tcp,
                            (const struct sockaddr *)&c->addr, on_connected);
    if (rc < 0) {
        verdict(c, 0, uv_strerror(rc));
        return;
    }
    uv_timer_start(&c->timer, on_check_timeout, c->timeout_ms, 0);
}

mg_health_t *mg_health_new(uv_loop_t *loop)
{
    mg_health_t *h = mg_calloc(1, sizeof(*h));
    h->loop = loop;
    return h;
}

static void stop_all(mg_health_t *h)
{
    check_t *c = h->checks;
    h->checks = NULL;
    while (c) {
        check_t *next = c->next;
        c->stopping = 1;
        uv_timer_stop(&c->timer);
        uv_close((uv_handle_t *)&c->timer, on_handle_closed);
        if (c->probing && !uv_is_closing((uv_handle_t *)&c->tcp))
            end_probe(c, on_handle_closed);
        c = next;
    }
}

static void add_check(mg_health_t *h, const mg_upstream_t *u, size_t i)
{
    const mg_upstream_conf_t *uc = u->conf;
    const mg_health_conf_t *hc = &uc->health;
    const mg_target_conf_t *tc = &uc->targets[i];
    check_t *c = mg_calloc(1, sizeof(*c));
    c->h = h;
    c->peer = u->peers[i];
    c->upstream = mg_strndup(uc->name, strlen(uc->name));
    c->target = mg_strndup(tc->text, strlen(tc->text));
    c->addr = tc->addr;
    c->interval_ms = hc->interval_ms;
    c->timeout_ms = hc->timeout_ms;
    c->healthy = hc->healthy;
    c->unhealthy = hc->unhealthy;
    c->statuses = hc->statuses;
    if (tc->tls) {
        /* The upstream's context itself: probes verify and present
         * exactly what proxied requests do. */
        c->tls_ctx = tc->tls;
        mg_tls_client_ref(c->tls_ctx);
        c->tls_name = mg_strndup(tc->tls_name, strlen(tc->tls_name));
        c->tls_in = mg_malloc(TLS_IN_LEN);
    }
    size_t cap = strlen(hc->path) + strlen(tc->text) + 128;
    c->request = mg_malloc(cap);
    c->request_len = (size_t)snprintf(c->request, cap,
                                      "GET %s HTTP/1.1\r\nHost: %s\r\n"
                                      "User-Agent: moongate-health\r\n"
                                      "Connection: close\r\n\r\n",
                                      hc->path, tc->text);
    uv_timer_init(h->loop, &c->timer);
    c->timer.data = c;
    c->handles = 1;
    /* First check at once: a target that is down at start is found out
     * within one timeout rather than one interval. */
    uv_timer_start(&c->timer, on_interval, 0, 0);
    c->next = h->checks;
    h->checks = c;
}

void mg_health_apply(mg_health_t *h, const mg_gen_t *g)
{
    stop_all(h);
    size_t n = 0;
    for (size_t i = 0; i < g->cfg->nupstreams; i++) {
        const mg_upstream_t *u = &g->upstreams[i];
        if (!u->conf->health.enabled)
            continue;
        for (size_t k = 0; k < u->ntargets; k++, n++)
            add_check(h, u, k);
    }
    if (n)
        mg_log_info("health checks: %zu targets", n);
}

void mg_health_close(mg_health_t *h)
{
    if (!h)
        return;
    stop_all(h);
    free(h);
}
