/*
 * Targets and their keep-alive pools. An idle pooled connection is read
 * from so that a close by the upstream (or stray bytes, which make it
 * unusable) is noticed at once and the connection dropped, rather than
 * discovered by the next request.
 */
#include "upstream.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#include "log.h"

#define UC_READ_CHUNK 16384

struct mg_target_s {
    uv_loop_t *loop;
    char *name;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    mg_upconn_t *idle; /* most recently used first */
    unsigned nidle;
    /* A host-name target re-resolves on a timer through libuv's thread
     * pool (uv_getaddrinfo), never blocking the loop. */
    char *host; /* NULL: an IP literal, nothing to resolve */
    char port[8];
    uv_timer_t resolve_timer;
    uv_getaddrinfo_t gai;
    unsigned pending; /* references: the target itself, resolve_timer
                         open, a lookup in flight, each connection */
    unsigned resolving : 1;
    unsigned freeing : 1;
    mg_tls_client_t *tls; /* https: a reference; NULL: plain */
    char *tls_name;       /* SNI / verified name */
};

/* Initial retry tokens: a quiet upstream may still retry a few times. */
#define RETRY_TOKENS_START 10.0
#define RETRY_TOKENS_MAX 100.0

void mg_upstream_init(mg_upstream_t *u, uint64_t seed)
{
    const mg_upstream_conf_t *c = u->conf;
    size_t n = u->ntargets;
    const char **names = mg_calloc(n, sizeof(char *));
    unsigned *weights = mg_calloc(n, sizeof(unsigned));
    u->peers = mg_calloc(n, sizeof(mg_peer_t *));
    for (size_t i = 0; i < n; i++) {
        names[i] = c->targets[i].text;
        weights[i] = c->targets[i].weight;
        u->peers[i] = mg_peers_get(mg_str_from_cstr(c->name),
                                   mg_str_from_cstr(c->targets[i].text));
        /* A target held down for active checks that a reload turned off
         * would stay down for ever: give it the passive time instead. */
        mg_peer_t *pe = u->peers[i];
        if (!c->health.enabled && atomic_load(&pe->down)
            && !atomic_load(&pe->down_until_ms))
            atomic_store(&pe->down_until_ms,
                         mg_monotonic_ms()
                             + (c->passive.enabled ? c->passive.down_ms : 1));
    }
    u->balancer = mg_balancer_new((mg_balancer_kind_t)c->balance_kind, n, names,
                                  weights, seed);
    free(names);
    free(weights);
    u->usable = mg_calloc(n, 1);
    u->load = mg_calloc(n, sizeof(uint32_t));
    u->ewma = mg_calloc(n, sizeof(uint64_t));
    u->retry_tokens = RETRY_TOKENS_START;
}

void mg_upstream_clear(mg_upstream_t *u)
{
    mg_balancer_free(u->balancer);
    free(u->peers);
    free(u->usable);
    free(u->load);
    free(u->ewma);
}

int mg_upstream_usable(mg_upstream_t *u, size_t i, uint64_t now_ms)
{
    mg_peer_t *pe = u->peers[i];
    if (atomic_load(&pe->down)) {
        uint64_t until = atomic_load(&pe->down_until_ms);
        if (!until || now_ms < until)
            return 0;
        /* A passive mark whose time is up (no active checks to decide):
         * the first worker to notice lifts it. */
        uint32_t one = 1;
        if (atomic_compare_exchange_strong(&pe->down, &one, 0)) {
            atomic_store(&pe->fails, 0);
            mg_log_info("upstream %s: target %s back in rotation after %.1fs "
                        "down",
                        u->conf->name, u->conf->targets[i].text,
                        (double)u->conf->passive.down_ms / 1000.0);
        }
    }
    const mg_breaker_conf_t *bc = &u->conf->breaker;
    return !bc->enabled || mg_breaker_usable(&pe->breaker, bc, now_ms);
}

int mg_upstream_choose(mg_upstream_t *u, uint64_t key, const uint8_t *tried,
                       uint64_t now_ms)
{
    for (size_t i = 0; i < u->ntargets; i++) {
        u->usable[i] =
            (!tried || !tried[i]) && mg_upstream_usable(u, i, now_ms);
        u->load[i] = atomic_load(&u->peers[i]->inflight);
        u->ewma[i] = atomic_load(&u->peers[i]->ewma_us);
    }
    mg_balancer_in_t in = {.usable = u->usable,
                           .inflight = u->load,
                           .ewma_us = u->ewma,
                           .key = key};
    return mg_balancer_pick(u->balancer, &in);
}

mg_target_t *mg_upstream_pick(mg_upstream_t *u)
{
    int i = mg_upstream_choose(u, 0, NULL, mg_monotonic_ms());
    if (i >= 0)
        return u->targets[i];
    mg_target_t *t = u->targets[u->next % u->ntargets];
    u->next++;
    return t;
}

int mg_upstream_try_begin(mg_upstream_t *u, int index, uint64_t now_ms,
                          mg_upstream_try_t *t)
{
    mg_peer_t *pe = u->peers[index];
    const mg_breaker_conf_t *bc = &u->conf->breaker;
    t->ticket = (mg_breaker_ticket_t){0, 0};
    if (bc->enabled && !mg_breaker_allow(&pe->breaker, bc, now_ms, &t->ticket))
        return 0;
    t->index = index;
    t->start_ms = now_ms;
    atomic_fetch_add(&pe->inflight, 1);
    atomic_fetch_add(&pe->requests, 1);
    return 1;
}

/* Passive health: a failure in a row too many marks the target down. */
static void passive(mg_upstream_t *u, int index, int failed, uint64_t now_ms)
{
    const mg_passive_conf_t *pc = &u->conf->passive;
    mg_peer_t *pe = u->peers[index];
    if (!pc->enabled)
        return;
    if (!failed) {
        atomic_store(&pe->fails, 0);
        return;
    }
    uint32_t run = atomic_fetch_add(&pe->fails, 1) + 1;
    if (run < pc->failures)
        return;
    /* With active checks, only they bring a target back. */
    atomic_store(&pe->down_until_ms,
                 u->conf->health.enabled ? 0 : now_ms + pc->down_ms);
    atomic_store(&pe->active_ok, 0); /* `healthy` fresh passes to return */
    uint32_t up = 0;
    if (atomic_compare_exchange_strong(&pe->down, &up, 1))
        mg_log_warn("upstream %s: target %s marked down after %u failures "
                    "in a row",
                    u->conf->name, u->conf->targets[index].text, run);
}

void mg_upstream_try_end(mg_upstream_t *u, mg_upstream_try_t *t, int outcome,
                         int status, uint64_t now_ms)
{
    if (t->index < 0)
        return;
    int i = t->index;
    t->index = -1;
    mg_peer_t *pe = u->peers[i];
    const mg_upstream_conf_t *c = u->conf;
    atomic_fetch_sub(&pe->inflight, 1);

    int hard = outcome == MG_TRY_CONNECT || outcome == MG_TRY_ERROR;
    int ok_status = outcome == MG_TRY_OK;
    int breaker_fail =
        hard || outcome == MG_TRY_TIMEOUT
        || (ok_status && mg_status_set_has(&c->breaker.statuses, status));
    int passive_fail =
        hard || (outcome == MG_TRY_TIMEOUT && c->passive.timeouts)
        || (ok_status && mg_status_set_has(&c->passive.statuses, status));
    if (breaker_fail || passive_fail)
        atomic_fetch_add(&pe->failures, 1);
    if (c->breaker.enabled) {
        int before = mg_breaker_state(&pe->breaker);
        mg_breaker_report(&pe->breaker, &c->breaker, now_ms, &t->ticket,
                          !breaker_fail);
        int after = mg_breaker_state(&pe->breaker);
        if (after != before)
            mg_log_warn("upstream %s: target %s: breaker %s", c->name,
                        c->targets[i].text, mg_breaker_state_name(after));
    }
    passive(u, i, passive_fail, now_ms);

    /* Latency EWMA (alpha 0.3) of the time to the head or the failure:
     * a target that times out looks slow to p2c, as it should. Workers
     * race on it; a lost update only delays the average a little. */
    uint64_t sample = (now_ms - t->start_ms) * 1000 + 1;
    uint64_t old = atomic_load(&pe->ewma_us);
    atomic_store(&pe->ewma_us, old ? (old * 7 + sample * 3) / 10 : sample);
}

void mg_upstream_try_cancel(mg_upstream_t *u, mg_upstream_try_t *t)
{
    if (t->index < 0)
        return;
    mg_peer_t *pe = u->peers[t->index];
    atomic_fetch_sub(&pe->inflight, 1);
    if (u->conf->breaker.enabled)
        mg_breaker_cancel(&pe->breaker, &t->ticket);
    t->index = -1;
}

unsigned mg_upstream_retry_after(mg_upstream_t *u, uint64_t now_ms)
{
    const mg_upstream_conf_t *c = u->conf;
    uint64_t best = UINT64_MAX;
    for (size_t i = 0; i < u->ntargets; i++) {
        mg_peer_t *pe = u->peers[i];
        uint64_t wait = 0;
        if (atomic_load(&pe->down)) {
            uint64_t until = atomic_load(&pe->down_until_ms);
            /* Down until active checks pass `healthy` times. */
            wait = until ? (until > now_ms ? until - now_ms : 0)
                         : c->health.interval_ms * c->health.healthy;
        }
        if (c->breaker.enabled
            && mg_breaker_state(&pe->breaker) != MG_BREAKER_CLOSED) {
            uint64_t end =
                atomic_load(&pe->breaker.since_ms) + c->breaker.open_ms;
            uint64_t bw = end > now_ms ? end - now_ms : 0;
            wait = bw > wait ? bw : wait;
        }
        best = wait < best ? wait : best;
    }
    uint64_t s = (best + 999) / 1000;
    return s < 1 ? 1 : s > 3600 ? 3600 : (unsigned)s;
}

/* One target's state, from its shared slot. */
static void target_status(const mg_upstream_conf_t *c, size_t i, mg_peer_t *pe,
                          uint64_t now, mg_target_status_t *out)
{
    int state = mg_breaker_state(&pe->breaker);
    if (state == MG_BREAKER_OPEN && c->breaker.enabled
        && mg_breaker_usable(&pe->breaker, &c->breaker, now))
        state = MG_BREAKER_HALF_OPEN; /* the next request probes */
    *out = (mg_target_status_t){
        .address = c->targets[i].text,
        .weight = c->targets[i].weight,
        .healthy = !atomic_load(&pe->down),
        .breaker = mg_breaker_state_name(state),
        .inflight = atomic_load(&pe->inflight),
        .failures = atomic_load(&pe->fails),
        .requests = atomic_load(&pe->requests),
        .failed = atomic_load(&pe->failures),
        .checks = atomic_load(&pe->checks),
        .latency_ms = (double)atomic_load(&pe->ewma_us) / 1000.0,
    };
}

size_t mg_upstream_status(mg_upstream_t *u, mg_target_status_t *out, size_t cap)
{
    uint64_t now = mg_monotonic_ms();
    for (size_t i = 0; i < u->ntargets && i < cap; i++)
        target_status(u->conf, i, u->peers[i], now, &out[i]);
    return u->ntargets;
}

size_t mg_upstream_conf_status(const mg_upstream_conf_t *c,
                               mg_target_status_t *out, size_t cap)
{
    uint64_t now = mg_monotonic_ms();
    for (size_t i = 0; i < c->ntargets && i < cap; i++) {
        mg_peer_t *pe = mg_peers_get(mg_str_from_cstr(c->name),
                                     mg_str_from_cstr(c->targets[i].text));
        target_status(c, i, pe, now, &out[i]);
    }
    return c->ntargets;
}

const char *mg_target_name(const mg_target_t *t)
{
    return t->name;
}

static void target_release(mg_target_t *t)
{
    if (--t->pending > 0)
        return;
    free(t->host);
    free(t->name);
    mg_tls_client_unref(t->tls);
    free(t->tls_name);
    free(t);
}

static void on_resolve_timer_closed(uv_handle_t *h)
{
    target_release(h->data);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    mg_target_t *t = req->data;
    t->resolving = 0;
    if (t->freeing) {
        uv_freeaddrinfo(res);
        target_release(t);
        return;
    }
    t->pending--;
    if (status < 0 || !res) {
        /* Keep the last good address: a DNS hiccup must not take a
         * working target away. */
        mg_log_warn("target %s: cannot re-resolve %s: %s (keeping the "
                    "last address)",
                    t->name, t->host, uv_strerror(status));
        uv_freeaddrinfo(res);
        return;
    }
    if ((socklen_t)res->ai_addrlen == t->addrlen
        && memcmp(res->ai_addr, &t->addr, t->addrlen) == 0) {
        mg_log_debug("target %s: re-resolved, address unchanged", t->name);
    } else {
        char ip[INET6_ADDRSTRLEN] = "?";
        if (res->ai_family == AF_INET)
            uv_ip4_name((struct sockaddr_in *)res->ai_addr, ip, sizeof(ip));
        else if (res->ai_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, ip, sizeof(ip));
        memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
        t->addrlen = (socklen_t)res->ai_addrlen;
        /* Idle connections go to the old address: drop them. */
        while (t->idle)
            mg_upconn_close(t->idle);
        mg_log_info("target %s: now resolves to %s", t->name, ip);
    }
    uv_freeaddrinfo(res);
}

static void on_resolve_timer(uv_timer_t *timer)
{
    mg_target_t *t = timer->data;
    if (t->resolving || t->freeing)
        return;
    struct addrinfo hints = {0};
    hints.ai_family = AF_UNSPEC; /* as the config loader resolved it */
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    t->gai.data = t;
    if (uv_getaddrinfo(t->loop, &t->gai, on_resolved, t->host, t->port, &hints)
        == 0) {
        t->resolving = 1;
        t->pending++;
    }
}

mg_target_t *mg_target_new(uv_loop_t *loop, const mg_target_conf_t *tc)
{
    mg_target_t *t = mg_calloc(1, sizeof(*t));
    t->loop = loop;
    t->name = mg_strndup(tc->text, strlen(tc->text));
    t->addr = tc->addr;
    t->addrlen = tc->addrlen;
    t->pending = 1; /* the target itself */
    if (tc->tls) {
        t->tls = tc->tls;
        mg_tls_client_ref(t->tls);
        t->tls_name = mg_strndup(tc->tls_name, strlen(tc->tls_name));
    }
    if (tc->host && tc->resolve_ms) {
        const char *colon = strrchr(tc->text, ':');
        t->host = mg_strndup(tc->host, strlen(tc->host));
        snprintf(t->port, sizeof(t->port), "%s", colon ? colon + 1 : "");
        uv_timer_init(loop, &t->resolve_timer);
        t->resolve_timer.data = t;
        uv_timer_start(&t->resolve_timer, on_resolve_timer, tc->resolve_ms,
                       tc->resolve_ms);
        /* The timer must not keep a draining worker's loop alive. */
        uv_unref((uv_handle_t *)&t->resolve_timer);
        t->pending++;
    }
    return t;
}

int mg_target_matches(const mg_target_t *t, const mg_target_conf_t *tc)
{
    /* A host-name target is the name (its address may change); an IP
     * target is the address. TLS targets also need the same context. */
    if (t->tls != tc->tls)
        return 0;
    if (t->host || (tc->host && tc->resolve_ms))
        return t->host && tc->host && tc->resolve_ms
               && strcmp(t->name, tc->text) == 0;
    return t->addrlen == tc->addrlen
           && memcmp(&t->addr, &tc->addr, t->addrlen) == 0;
}

void mg_target_free(mg_target_t *t)
{
    while (t->idle)
        mg_upconn_close(t->idle);
    t->freeing = 1;
    if (t->host) {
        if (t->resolving)
            uv_cancel((uv_req_t *)&t->gai); /* on_resolved releases */
        uv_close((uv_handle_t *)&t->resolve_timer, on_resolve_timer_closed);
    }
    target_release(t);
}

static void unlink_idle(mg_upconn_t *uc)
{
    mg_target_t *t = uc->target;
    if (uc->prev_idle)
        uc->prev_idle->next_idle = uc->next_idle;
    else if (t->idle == uc)
        t->idle = uc->next_idle;
    else
        return; /* not pooled */
    if (uc->next_idle)
        uc->next_idle->prev_idle = uc->prev_idle;
    uc->next_idle = uc->prev_idle = NULL;
    t->nidle--;
}

static void on_timer_closed(uv_handle_t *h)
{
    mg_upconn_t *uc = h->data;
    mg_target_t *t = uc->target;
    mg_tls_conn_free(uc->tls);
    free(uc->tls_in);
    free(uc->rbuf);
    free(uc);
    target_release(t); /* the connection's reference */
}

static void on_tcp_closed(uv_handle_t *h)
{
    mg_upconn_t *uc = h->data;
    if (uc->on_close)
        uc->on_close(uc);
    uv_close((uv_handle_t *)&uc->timer, on_timer_closed);
}

void mg_upconn_close(mg_upconn_t *uc)
{
    if (uc->closing)
        return;
    uc->closing = 1;
    unlink_idle(uc);
    uv_timer_stop(&uc->timer);
    uv_close((uv_handle_t *)&uc->tcp, on_tcp_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    mg_upconn_t *uc = h->data;
    if (uc->rcap - uc->rlen < 1024 && uc->rcap < uc->rmax) {
        uc->rcap = uc->rcap * 2 > uc->rmax ? uc->rmax : uc->rcap * 2;
        uc->rbuf = mg_realloc(uc->rbuf, uc->rcap);
    }
    *b = uv_buf_init(uc->rbuf + uc->rlen, (unsigned)(uc->rcap - uc->rlen));
}

static void tls_read(mg_upconn_t *uc, ssize_t nread, const uv_buf_t *b);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    mg_upconn_t *uc = s->data;
    if (nread == 0 || uc->closing)
        return;
    if (nread == UV_ENOBUFS) {
        mg_upconn_read_pause(uc); /* owner will resume */
        return;
    }
    if (!uc->owner) {
        /* Pooled: EOF, an error, or bytes nobody asked for. */
        mg_upconn_close(uc);
        return;
    }
    if (uc->tls) {
        tls_read(uc, nread, b);
        return;
    }
    if (nread > 0)
        uc->rlen += (size_t)nread;
    uc->on_read(uc, nread);
}

/* ---- TLS to the upstream ------------------------------------------------
 * Ciphertext is read into tls_in and fed to the session; plaintext is
 * decrypted into rbuf exactly where a plain read would have put it, so the
 * owners (proxy.c, client.c) do not know the difference. The handshake
 * runs between the TCP connect and the connect callback, under the same
 * connect timeout. */

#define TLS_IN_LEN 16384

typedef struct {
    uv_write_t req;
    uv_write_t *outer; /* the caller's, NULL for handshake records */
    uv_write_cb cb;
} tls_write_t;

static void on_tls_written(uv_write_t *req, int status)
{
    tls_write_t *tw = (tls_write_t *)req;
    if (tw->cb)
        tw->cb(tw->outer, status);
    free(tw);
}

/* Sends what the session has produced; owner's request optional. */
static int tls_send(mg_upconn_t *uc, uv_write_t *outer, uv_write_cb cb)
{
    size_t n = mg_tls_conn_pending(uc->tls);
    if (n == 0 && !cb)
        return 0;
    tls_write_t *tw = mg_malloc(sizeof(*tw) + n);
    tw->outer = outer;
    tw->cb = cb;
    char *p = (char *)(tw + 1);
    uv_buf_t b = uv_buf_init(p, (unsigned)mg_tls_conn_take(uc->tls, p, n));
    if (outer)
        outer->handle = (uv_stream_t *)&uc->tcp;
    int rc = uv_write(&tw->req, (uv_stream_t *)&uc->tcp, &b, 1, on_tls_written);
    if (rc < 0)
        free(tw);
    return rc;
}

int mg_upconn_write(mg_upconn_t *uc, uv_write_t *req, const uv_buf_t *bufs,
                    unsigned n, uv_write_cb cb)
{
    if (!uc->tls)
        return uv_write(req, (uv_stream_t *)&uc->tcp, bufs, n, cb);
    for (unsigned i = 0; i < n; i++)
        if (mg_tls_conn_write(uc->tls, bufs[i].base, bufs[i].len) < 0)
            return UV_EPROTO;
    return tls_send(uc, req, cb);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    free(req); /* a failure shows as a failed read or write */
}

void mg_upconn_shutdown(mg_upconn_t *uc)
{
    if (uc->closing)
        return;
    if (uc->tls) {
        mg_tls_conn_shutdown(uc->tls); /* close_notify before the FIN */
        tls_send(uc, NULL, NULL);
    }
    uv_shutdown_t *req = mg_malloc(sizeof(*req));
    if (uv_shutdown(req, (uv_stream_t *)&uc->tcp, on_shutdown) < 0)
        free(req);
}

static void tls_connect_done(mg_upconn_t *uc, int status)
{
    mg_upconn_connect_cb cb = uc->on_connect;
    uc->on_connect = NULL;
    uv_timer_stop(&uc->timer);
    if (status < 0)
        mg_upconn_close(uc);
    if (cb)
        cb(uc, status);
}

static void tls_handshake(mg_upconn_t *uc)
{
    int rc = mg_tls_conn_handshake(uc->tls);
    tls_send(uc, NULL, NULL);
    if (rc == 0)
        return;
    if (rc < 0)
        mg_log_warn("upstream %s: TLS handshake failed: %s",
                    mg_target_name(uc->target), mg_tls_conn_error(uc->tls));
    tls_connect_done(uc, rc < 0 ? MG_EPROTO : 0);
}

/* Decrypts into rbuf while the owner reads and there is room; each piece
 * goes to the owner as a read would. */
static void tls_deliver(mg_upconn_t *uc)
{
    while (uc->reading && uc->owner && !uc->closing) {
        uv_buf_t b;
        on_alloc((uv_handle_t *)&uc->tcp, 0, &b);
        if (b.len == 0) {
            mg_upconn_read_pause(uc); /* owner will resume */
            return;
        }
        int n = mg_tls_conn_read(uc->tls, b.base, b.len);
        tls_send(uc, NULL, NULL);
        if (n == 0)
            return;
        if (n > 0) {
            uc->rlen += (size_t)n;
            uc->on_read(uc, n);
            continue;
        }
        if (n != UV_EOF)
            mg_log_warn("upstream %s: TLS: %s", mg_target_name(uc->target),
                        mg_tls_conn_error(uc->tls));
        uc->on_read(uc, n == UV_EOF ? UV_EOF : UV_EPROTO);
        return;
    }
}

static void tls_read(mg_upconn_t *uc, ssize_t nread, const uv_buf_t *b)
{
    if (nread < 0) {
        if (uc->on_connect) {
            mg_log_warn("upstream %s: TLS handshake: %s",
                        mg_target_name(uc->target), uv_strerror((int)nread));
            tls_connect_done(uc, (int)nread);
        } else {
            uc->on_read(uc, nread);
        }
        return;
    }
    mg_tls_conn_feed(uc->tls, b->base, (size_t)nread);
    if (uc->on_connect)
        tls_handshake(uc);
    else
        tls_deliver(uc);
}

static void on_tls_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    mg_upconn_t *uc = h->data;
    if (!uc->tls_in)
        uc->tls_in = mg_malloc(TLS_IN_LEN);
    *b = uv_buf_init(uc->tls_in, TLS_IN_LEN);
}

void mg_upconn_read_resume(mg_upconn_t *uc)
{
    if (!uc->reading && !uc->closing) {
        uc->reading = 1;
        uv_read_start((uv_stream_t *)&uc->tcp,
                      uc->tls ? on_tls_alloc : on_alloc, on_read);
        /* Plaintext the session held back while the buffer was full:
         * delivered now, since no socket read may ever come for it. */
        if (uc->tls && uc->owner && !uc->on_connect
            && mg_tls_conn_has_input(uc->tls))
            tls_deliver(uc);
    }
}

void mg_upconn_read_pause(mg_upconn_t *uc)
{
    if (uc->reading) {
        uc->reading = 0;
        uv_read_stop((uv_stream_t *)&uc->tcp);
    }
}

static void on_connect_timeout(uv_timer_t *t)
{
    mg_upconn_t *uc = t->data;
    mg_upconn_connect_cb cb = uc->on_connect;
    uc->on_connect = NULL;
    mg_upconn_close(uc);
    if (cb)
        cb(uc, MG_ETIMEOUT);
}

static void on_connected(uv_connect_t *req, int status)
{
    mg_upconn_t *uc = req->data;
    mg_upconn_connect_cb cb = uc->on_connect;
    uc->on_connect = NULL;
    if (!cb)
        return; /* timed out and already reported */
    if (status >= 0 && uc->tls) {
        /* The connect callback waits for the handshake (same timer). */
        uc->on_connect = cb;
        uv_tcp_nodelay(&uc->tcp, 1);
        mg_upconn_read_resume(uc);
        tls_handshake(uc);
        return;
    }
    uv_timer_stop(&uc->timer);
    if (status < 0) {
        mg_upconn_close(uc);
    } else {
        uv_tcp_nodelay(&uc->tcp, 1);
        mg_upconn_read_resume(uc);
    }
    cb(uc, status);
}

/*
 * A pooled connection whose close or stray bytes are already in the socket
 * but not yet seen by the loop (they arrived this iteration) must not be
 * reused: stray bytes would be taken as the next request's response. One
 * non-blocking peek per reuse closes that window.
 */
static int still_clean(mg_upconn_t *uc)
{
    uv_os_fd_t fd;
    char byte;
    if (uv_fileno((uv_handle_t *)&uc->tcp, &fd))
        return 0;
    ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

int mg_upconn_get(mg_target_t *t, void *owner, uint64_t connect_ms,
                  mg_upconn_connect_cb cb, mg_upconn_t **out)
{
    while (t->idle) {
        mg_upconn_t *uc = t->idle;
        unlink_idle(uc);
        if (!still_clean(uc)) {
            mg_upconn_close(uc);
            continue;
        }
        /* The idle timer is left to fire (it ignores an owned connection)
         * or to be replaced by the owner's first deadline. */
        uc->owner = owner;
        uc->reused = 1;
        *out = uc;
        return 0;
    }
    mg_upconn_t *uc = mg_calloc(1, sizeof(*uc));
    uc->target = t;
    /* A connection keeps its target alive: a target freed while a request
     * is on it (gw.http from a timer as a worker stops) goes when the
     * connection does. */
    t->pending++;
    uc->owner = owner;
    uc->rcap = uc->rmax = UC_READ_CHUNK;
    uc->rbuf = mg_malloc(uc->rcap);
    if (t->tls)
        uc->tls = mg_tls_conn_new_client(t->tls, t->tls_name);
    uv_tcp_init(t->loop, &uc->tcp);
    uv_timer_init(t->loop, &uc->timer);
    uc->tcp.data = uc->timer.data = uc->connect_req.data = uc;
    int rc = uv_tcp_connect(&uc->connect_req, &uc->tcp,
                            (const struct sockaddr *)&t->addr, on_connected);
    if (rc < 0) {
        mg_upconn_close(uc);
        return rc;
    }
    uc->on_connect = cb;
    uv_timer_start(&uc->timer, on_connect_timeout, connect_ms, 0);
    *out = uc;
    return MG_AGAIN;
}

static void on_idle_timeout(uv_timer_t *t)
{
    mg_upconn_t *uc = t->data;
    if (!uc->owner) /* owned meanwhile: the owner's deadline rules now */
        mg_upconn_close(uc);
}

void mg_upconn_release(mg_upconn_t *uc, unsigned max_idle, uint64_t idle_ms)
{
    mg_target_t *t = uc->target;
    uc->owner = NULL;
    uc->on_close = NULL;
    uc->on_read = NULL;
    uc->rlen = 0;
    uc->rmax = uc->rcap;
    if (uc->closing)
        return;
    /* Over TLS, bytes the session holds now are bytes nobody asked for. */
    if (uc->tls && mg_tls_conn_has_input(uc->tls)) {
        mg_upconn_close(uc);
        return;
    }
    if (t->freeing || t->nidle >= max_idle || idle_ms == 0) {
        mg_upconn_close(uc);
        return;
    }
    uc->next_idle = t->idle;
    uc->prev_idle = NULL;
    if (t->idle)
        t->idle->prev_idle = uc;
    t->idle = uc;
    t->nidle++;
    uv_timer_start(&uc->timer, on_idle_timeout, idle_ms, 0);
    mg_upconn_read_resume(uc); /* watch for a close while idle */
}
