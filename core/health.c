/*
 * The active health checker of health.h. One check_t per checked target,
 * each a small state machine on one timer: idle (the timer waits for the
 * interval) -> probing (a TCP handle exists; the timer is the check's
 * timeout) -> the verdict closes the handle, and its close callback arms
 * the next interval, so a handle is never reused before libuv is done
 * with it.
 */
#include "health.h"

#include <stdio.h>
#include <stdlib.h>

#include "generation.h"
#include "log.h"
#include "peers.h"

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
    unsigned handles;     /* open libuv handles: free at 0 when stopping */
    unsigned probing : 1; /* a probe's TCP handle is open */
    unsigned stopping : 1;
};

struct mg_health_s {
    uv_loop_t *loop;
    check_t *checks;
};

static void free_check(check_t *c)
{
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
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
}

static void on_check_timeout(uv_timer_t *t)
{
    check_t *c = t->data;
    if (c->probing)
        verdict(c, 0, "timeout");
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

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    check_t *c = s->data;
    if (c->stopping || nread == 0)
        return;
    if (nread < 0) {
        verdict(c, 0, nread == UV_EOF ? "closed" : uv_strerror((int)nread));
        return;
    }
    c->blen += (size_t)nread;
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

static void on_connected(uv_connect_t *req, int status)
{
    check_t *c = req->data;
    if (c->stopping || !c->probing || uv_is_closing((uv_handle_t *)&c->tcp))
        return;
    if (status < 0) {
        verdict(c, 0, uv_strerror(status));
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
            uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
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
