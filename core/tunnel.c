/*
 * The byte pump of an upgraded connection (tunnel.h).
 *
 * Buffers and backpressure. Nothing is copied: client bytes are written
 * upstream straight from the client connection's read buffer, held
 * (mg_conn_hold) until the write is done; upstream bytes go to the client
 * straight from the upstream connection's buffer, which is reused only
 * once every write borrowing it is done. Each side reads into the rest of
 * its buffer while writes are in flight and stops when it is full, so a
 * slow reader on one side stops the other side's sender, and a tunnel
 * holds at most its two read buffers (16 KiB each by default, plus the
 * ciphertext a TLS write encrypts into) whatever the peers do.
 *
 * Half-close. An EOF from one side shuts down writing to the other (after
 * what is queued); the tunnel ends cleanly when both sides have ended and
 * everything is written. An error on either side, or no byte moved either
 * way for the idle timeout, ends it at once.
 *
 * Lifetime. The tunnel is freed when its upstream connection has closed
 * (the upstream write callbacks, which may still be pending then, come
 * before that). Once the end is told, or the tunnel is aborted, it never
 * touches the client connection again.
 */
#include "tunnel.h"

#include <stdlib.h>

#include "deadline.h"
#include "log.h"
#include "metrics.h"
#include "worker.h"

struct mg_tunnel_s {
    mg_req_t *r; /* NULL once ended or aborted: the client side is gone */
    mg_conn_t *c;
    mg_worker_t *w;
    mg_upconn_t *uc;
    mg_tunnel_end_cb end;
    void *arg;
    mg_deadline_t idle; /* on uc->timer */
    uint64_t idle_ms;
    size_t up_pos;          /* uc->rbuf bytes handed to the client */
    unsigned client_writes; /* to the client, borrowing uc->rbuf */
    unsigned up_writes;     /* upstream, each holding the client buffer */
    unsigned client_eof : 1;
    unsigned up_eof : 1;
    unsigned ended : 1;
};

typedef struct {
    mg_wreq_t wr;
    mg_tunnel_t *t;
} up_write_t;

static void on_idle(uv_timer_t *timer);

/* Bytes moved: the idle wait starts again (a lazy deadline: no timer
 * work per read or write). */
static void touch(mg_tunnel_t *t)
{
    if (!t->ended)
        mg_deadline_set(&t->idle, &t->uc->timer, on_idle, t->idle_ms);
}

static void end(mg_tunnel_t *t, int clean, const char *why)
{
    if (t->ended)
        return;
    t->ended = 1;
    t->r = NULL;
    mg_deadline_clear(&t->idle);
    mg_metrics_tunnel(-1);
    mg_upconn_close(t->uc);
    if (t->end)
        t->end(t->arg, clean, why);
}

/* Both sides ended and nothing is in flight: a clean end. */
static void check_done(mg_tunnel_t *t)
{
    if (t->client_eof && t->up_eof && t->client_writes == 0
        && t->up_writes == 0)
        end(t, 1, "closed");
}

static void on_idle(uv_timer_t *timer)
{
    mg_upconn_t *uc = timer->data;
    mg_tunnel_t *t = uc->owner;
    if (!mg_deadline_fired(&t->idle, timer, on_idle) || t->ended)
        return;
    mg_log_info("tunnel %.*s %.*s: idle for %llu ms, closed",
                (int)t->r->method_name.len, t->r->method_name.p,
                (int)t->r->target.len, t->r->target.p,
                (unsigned long long)t->idle_ms);
    end(t, 0, "idle timeout");
}

/* ---- upstream -> client --------------------------------------------- */

static void up_pump(mg_tunnel_t *t);

static void on_client_write(void *arg, int status)
{
    mg_tunnel_t *t = arg;
    t->client_writes--;
    if (t->ended)
        return;
    if (status < 0) {
        end(t, 0, "client write failed");
        return;
    }
    touch(t);
    if (t->client_writes == 0) {
        /* The buffer is free again. */
        mg_upconn_t *uc = t->uc;
        uc->rlen = t->up_pos = 0;
        if (!t->up_eof)
            mg_upconn_read_resume(uc);
    }
    check_done(t);
}

/* Hands what the upstream sent to the client; stops reading when the
 * buffer is full of bytes the client has yet to take. */
static void up_pump(mg_tunnel_t *t)
{
    mg_upconn_t *uc = t->uc;
    if (t->up_pos < uc->rlen) {
        uv_buf_t b =
            uv_buf_init(uc->rbuf + t->up_pos, (unsigned)(uc->rlen - t->up_pos));
        t->up_pos = uc->rlen;
        t->client_writes++;
        mg_conn_write(t->c, &b, 1, on_client_write, t);
        if (t->ended)
            return;
    }
    if (uc->rlen == uc->rcap)
        mg_upconn_read_pause(uc);
}

static void on_up_read(mg_upconn_t *uc, ssize_t nread)
{
    mg_tunnel_t *t = uc->owner;
    if (t->ended || t->up_eof)
        return;
    if (nread >= 0) {
        touch(t);
        up_pump(t);
        return;
    }
    if (nread != UV_EOF) {
        mg_log_info("tunnel to %s: %s", mg_target_name(uc->target),
                    uv_strerror((int)nread));
        end(t, 0, "upstream error");
        return;
    }
    /* The upstream is done sending: so is the client's side, once the
     * queued bytes are out. */
    t->up_eof = 1;
    mg_conn_shutdown(t->c);
    check_done(t);
}

/* ---- client -> upstream --------------------------------------------- */

static void on_up_write(mg_wreq_t *wr, int status)
{
    mg_tunnel_t *t = ((up_write_t *)wr)->t;
    free(wr);
    t->up_writes--;
    if (t->ended)
        return;
    mg_conn_release(t->c); /* may pass on more client bytes at once */
    if (t->ended)
        return;
    if (status < 0) {
        end(t, 0, "upstream write failed");
        return;
    }
    touch(t);
    check_done(t);
}

static void on_up_tls_write(uv_write_t *req, int status)
{
    on_up_write((mg_wreq_t *)req, status);
}

static void on_client_data(void *arg, const char *p, ssize_t n)
{
    mg_tunnel_t *t = arg;
    if (t->ended)
        return;
    if (n < 0) {
        t->client_eof = 1;
        if (n != UV_EOF) {
            end(t, 0, "client error");
            return;
        }
        mg_upconn_shutdown(t->uc);
        check_done(t);
        return;
    }
    touch(t);
    up_write_t *wr = mg_malloc(sizeof(*wr));
    wr->t = t;
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    mg_conn_hold(t->c);
    t->up_writes++;
    mg_upconn_t *uc = t->uc;
    if (!uc->tls)
        mg_worker_write(t->w, (uv_stream_t *)&uc->tcp, &wr->wr, &b, 1,
                        on_up_write);
    else if (mg_upconn_write(uc, &wr->wr.req, &b, 1, on_up_tls_write) < 0) {
        /* A broken session: no callback will come. */
        free(wr);
        t->up_writes--;
        end(t, 0, "upstream TLS write failed");
    }
}

/* ---- life ------------------------------------------------------------ */

static void on_uc_closed(mg_upconn_t *uc)
{
    free(uc->owner);
}

mg_tunnel_t *mg_tunnel_new(mg_req_t *r, mg_upconn_t *uc, size_t from,
                           uint64_t idle_ms, mg_tunnel_end_cb cb, void *arg)
{
    mg_tunnel_t *t = mg_calloc(1, sizeof(*t));
    t->r = r;
    t->c = r->conn;
    t->w = mg_conn_worker(r->conn);
    t->uc = uc;
    t->end = cb;
    t->arg = arg;
    t->idle_ms = idle_ms;
    t->up_pos = from;
    uc->owner = t;
    uc->on_read = on_up_read;
    uc->on_close = on_uc_closed;
    uc->rmax = uc->rcap; /* the buffer no longer grows */
    /* Replaces whatever the timer was set for (the proxy's read wait). */
    mg_deadline_forget_timer(&t->idle);
    touch(t);
    mg_metrics_tunnel(1);
    return t;
}

void mg_tunnel_run(mg_tunnel_t *t)
{
    mg_conn_tunnel(t->r, on_client_data, t);
    if (t->ended)
        return;
    up_pump(t);
    if (!t->ended && t->uc->rlen < t->uc->rcap)
        mg_upconn_read_resume(t->uc);
}

void mg_tunnel_abort(mg_tunnel_t *t)
{
    t->end = NULL;
    end(t, 0, "client gone");
}
