/*
 * Targets and their keep-alive pools. An idle pooled connection is read
 * from so that a close by the upstream (or stray bytes, which make it
 * unusable) is noticed at once and the connection dropped, rather than
 * discovered by the next request.
 */
#include "upstream.h"

#include <errno.h>
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
};

mg_target_t *mg_upstream_pick(mg_upstream_t *u)
{
    /* Round robin; weights, health and breakers come with the balancers. */
    mg_target_t *t = u->targets[u->next % u->ntargets];
    u->next++;
    return t;
}

const char *mg_target_name(const mg_target_t *t)
{
    return t->name;
}

mg_target_t *mg_target_new(uv_loop_t *loop, const mg_target_conf_t *tc)
{
    mg_target_t *t = mg_calloc(1, sizeof(*t));
    t->loop = loop;
    t->name = mg_strndup(tc->text, strlen(tc->text));
    t->addr = tc->addr;
    t->addrlen = tc->addrlen;
    return t;
}

int mg_target_matches(const mg_target_t *t, const mg_target_conf_t *tc)
{
    return t->addrlen == tc->addrlen
           && memcmp(&t->addr, &tc->addr, t->addrlen) == 0;
}

void mg_target_free(mg_target_t *t)
{
    while (t->idle)
        mg_upconn_close(t->idle);
    free(t->name);
    free(t);
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
    free(uc->rbuf);
    free(uc);
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
    if (nread > 0)
        uc->rlen += (size_t)nread;
    uc->on_read(uc, nread);
}

void mg_upconn_read_resume(mg_upconn_t *uc)
{
    if (!uc->reading && !uc->closing) {
        uc->reading = 1;
        uv_read_start((uv_stream_t *)&uc->tcp, on_alloc, on_read);
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
    uc->owner = owner;
    uc->rcap = uc->rmax = UC_READ_CHUNK;
    uc->rbuf = mg_malloc(uc->rcap);
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
    if (t->nidle >= max_idle || idle_ms == 0) {
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
