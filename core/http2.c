/*
 * HTTP/2 server sessions (see http2.h for the split with http1.c).
 *
 * Reading. http1.c passes the decrypted bytes to nghttp2_session_mem_recv;
 * the callbacks build one mg_req_t per stream in the stream's own arena
 * and start it through mg_proxy_start once its headers are complete.
 * Request DATA is copied into the stream's body buffer and handed to the
 * pipeline from there, with HTTP/1's hold/release rules: while the
 * pipeline holds the bytes nothing new is passed on. Window updates are
 * ours (NGHTTP2_OPT_NO_AUTO_WINDOW_UPDATE): bytes are consumed only once
 * the pipeline let go of them, so a slow upstream closes the client's
 * window and the body buffer never exceeds the 64 KiB stream window.
 *
 * Writing. The pipeline's mg_conn_write on a stream queues its buffers
 * (borrowed, as on HTTP/1); the first bytes are the HTTP/1 head, turned
 * into HEADERS. A data provider copies the body pieces into DATA frames
 * as the client's windows allow, and a write's callback runs once all its
 * bytes went into frames: the pipeline then reads more from the upstream,
 * so buffering stays bounded per stream. Frames leave the session through
 * nghttp2_session_mem_send into the connection's write path, batched, and
 * no more is produced while the socket's queue is long.
 *
 * Sending and write callbacks never run inside nghttp2's or the pipeline's
 * call stack: they are deferred to the loop (mg_worker_defer), which also
 * batches the frames of one loop turn into one write.
 *
 * Limits (SECURITY.md): SETTINGS_MAX_CONCURRENT_STREAMS, 64 KiB stream
 * and 1 MiB connection windows, MAX_HEADER_LIST_SIZE, and nghttp2's
 * guards on: stream reset rate (CVE-2023-44487), CONTINUATION count,
 * outbound ACK queue (PING/SETTINGS floods), SETTINGS entries and the
 * HPACK table size. A header list over the limits is not stored: the
 * stream answers 431 and the connection goes on.
 *
 * Longer than most files: the session, its streams' request and response
 * halves and their flow control are one state machine driven by nghttp2's
 * callbacks, kept together so the order of events reads top to bottom.
 */
#include "http2.h"

#include <ctype.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>

#include "accesslog.h"
#include "generation.h"
#include "log.h"
#include "metrics.h"
#include "worker.h"

#define STREAM_WINDOW 65535
#define CONN_WINDOW (1 << 20)
#define OUT_BATCH 65536      /* bytes of frames per socket write */
#define OUT_HIGH (256 << 10) /* socket queue at which framing pauses */
#define MAX_HEAD 65536       /* a gateway response head, as text */
#define DRAIN_GRACE_MS 1000  /* shutdown notice -> final GOAWAY */
#define RESET_BURST 1000     /* client RST_STREAMs: nghttp2's defaults */
#define RESET_RATE 33

typedef struct out_s out_t;

/* One mg_h2_write: its buffers (borrowed) and callback. */
struct out_s {
    out_t *next;
    mg_write_cb cb;
    void *arg;
    unsigned n, i; /* buffers, the one being copied */
    size_t off;    /* into bufs[i] */
    uv_buf_t bufs[];
};

struct mg_h2_stream_s {
    uint8_t kind; /* MG_CONN_H2: first, see http.h */
    int32_t id;
    mg_h2_t *s;
    mg_h2_stream_t *prev, *next;
    mg_arena_t arena;
    mg_req_t req;
    /* request head, while it is read */
    mg_str_t method, path, scheme, authority, host, cookie;
    size_t head_bytes;
    unsigned fields;
    unsigned too_large : 1; /* header list over the limits: 431 */
    unsigned bad_header : 1;
    unsigned started : 1;    /* a request (mg_req_t) exists */
    unsigned body_open : 1;  /* the pipeline wants the body */
    unsigned end_stream : 1; /* the client's END_STREAM arrived */
    unsigned body_ended : 1; /* mg_proxy_on_body_end was called */
    unsigned discard : 1;    /* the body is no longer wanted */
    /* response */
    unsigned head_done : 1; /* the HTTP/1 head was parsed */
    unsigned submitted : 1; /* HEADERS submitted */
    unsigned no_body : 1;   /* HEAD, 204, 304 */
    unsigned resp_done : 1; /* mg_conn_response_done */
    unsigned deferred : 1;  /* the data provider waits for bytes */
    unsigned aborted : 1;   /* the pipeline let go; frames dropped */
    unsigned holds;
    char *body; /* request body bytes not yet consumed */
    size_t blen, bcap, bgiven;
    char *head; /* response head text gathered so far */
    size_t head_len;
    out_t *out, **out_tail;   /* writes not yet framed */
    out_t *done, **done_tail; /* framed, callbacks to run */
    size_t out_bytes;         /* body bytes not yet framed */
    uint64_t moved_ms;        /* loop time the client last took response bytes
                                 (or the head went out): send_timeout */
};

struct mg_h2_s {
    nghttp2_session *ng;
    mg_conn_t *c;
    mg_worker_t *w;
    mg_wreq_t defer; /* the deferred flush */
    mg_h2_stream_t *streams;
    unsigned nstreams;
    unsigned sending;     /* our writes on the connection, in flight */
    unsigned busy;        /* calls on the stack that use the session */
    unsigned queued : 1;  /* a flush is deferred */
    unsigned dead : 1;    /* the connection closed; free when unqueued */
    unsigned in_recv : 1; /* inside nghttp2_session_mem_recv */
    unsigned flushing : 1;
    unsigned again : 1; /* flush once more */
    unsigned finished : 1;
    unsigned had_request : 1;
    unsigned draining : 1;
    unsigned final_goaway : 1;
    unsigned tls : 1;
    uint64_t read_ms;    /* loop time bytes last arrived: body_timeout */
    double reset_tokens; /* the client's RST_STREAM budget (rapid reset) */
    uint64_t reset_ms;   /* when it was last refilled */
    const char *why;     /* reason of a GOAWAY we send, for the log */
    char peer[46];
};

static nghttp2_session_callbacks *callbacks;
static nghttp2_option *options;

static void schedule(mg_h2_t *s);
static void stream_free(mg_h2_stream_t *st);

static const mg_limits_t *limits(mg_h2_t *s)
{
    return &mg_worker_gen(s->w)->cfg->limits;
}

static uint64_t now_ms(const mg_h2_t *s)
{
    return uv_now(mg_worker_loop(s->w));
}

static mg_h2_stream_t *stream_of(const mg_conn_t *c)
{
    return (mg_h2_stream_t *)c;
}

int mg_h2_preface(const char *p, size_t n)
{
    static const char magic[] = NGHTTP2_CLIENT_MAGIC;
    size_t m = sizeof(magic) - 1;
    if (memcmp(p, magic, n < m ? n : m) != 0)
        return -1;
    return n >= m ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* Response head: HTTP/1 text -> HTTP/2 fields                        */

static int connection_specific(mg_str_t name)
{
    static const mg_str_t names[] = {
        {"connection", 10}, {"keep-alive", 10}, {"transfer-encoding", 17},
        {"upgrade", 7},     {"te", 2},          {"proxy-connection", 16},
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(names); i++)
        if (mg_str_caseeq(name, names[i]))
            return 1;
    return 0;
}

static nghttp2_nv make_nv(const char *n, size_t nl, const char *v, size_t vl)
{
    return (nghttp2_nv){(uint8_t *)n, (uint8_t *)v, nl, vl,
                        NGHTTP2_NV_FLAG_NONE};
}

int mg_h2_head_to_nv(mg_arena_t *a, const char *head, size_t len,
                     nghttp2_nv **nv, size_t *nnv)
{
    const char *end = head + len, *p = head;
    if (len < 16 || memcmp(head, "HTTP/1.", 7) != 0 || head[8] != ' ')
        return -1;
    int status = 0;
    for (p = head + 9; p < head + 12; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        status = status * 10 + (*p - '0');
    }
    if (status < 100)
        return -1;
    size_t lines = 0;
    for (const char *q = head; q < end; q++)
        lines += *q == '\n';
    nghttp2_nv *out = mg_arena_alloc(a, sizeof(*out) * (lines + 1));
    char *st = mg_arena_alloc(a, 3);
    memcpy(st, head + 9, 3);
    size_t k = 0;
    out[k++] = make_nv(":status", 7, st, 3);
    p = memchr(p, '\n', (size_t)(end - p));
    if (!p)
        return -1;
    for (p++; p < end;) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            return -1;
        const char *line_end = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        if (line_end == p)
            break; /* the blank line */
        const char *colon = memchr(p, ':', (size_t)(line_end - p));
        if (!colon || colon == p)
            return -1;
        mg_str_t name = {p, (size_t)(colon - p)};
        const char *v = colon + 1;
        while (v < line_end && (*v == ' ' || *v == '\t'))
            v++;
        p = eol + 1;
        if (connection_specific(name))
            continue;
        char *lower = mg_arena_alloc(a, name.len);
        for (size_t i = 0; i < name.len; i++)
            lower[i] = (char)tolower((unsigned char)name.p[i]);
        out[k++] = make_nv(lower, name.len, v, (size_t)(line_end - v));
    }
    *nv = out;
    *nnv = k;
    return status;
}

/* ------------------------------------------------------------------ */
/* Sending                                                            */

static void finish_session(mg_h2_t *s)
{
    if (!s->finished) {
        s->finished = 1;
        mg_http1_h2_finish(s->c);
    }
}

/* The session lives until its last write, its deferred flush and every
 * call using it are done. Not inlined: the compiler cannot see that
 * `busy` keeps callers' later accesses safe, and would warn. */
__attribute__((noinline)) static void release(mg_h2_t *s)
{
    if (s->dead && !s->queued && s->sending == 0 && s->busy == 0) {
        nghttp2_session_del(s->ng);
        free(s);
    }
}

/* Nothing open and nothing being written: the keep-alive wait (the
 * header wait before the first request). While draining, the grace timer
 * before the final GOAWAY stays. */
static void idle_timer(mg_h2_t *s)
{
    if (s->finished || (s->draining && !s->final_goaway))
        return;
    mg_http1_h2_timer(s->c, s->had_request ? limits(s)->keepalive_timeout_ms
                                           : limits(s)->header_timeout_ms);
}

static void on_sent(void *arg, int status)
{
    mg_h2_t *s = *(mg_h2_t **)arg;
    free(arg);
    s->sending--;
    if (s->dead) {
        release(s);
        return;
    }
    if (status < 0)
        return;
    if (s->sending == 0 && s->nstreams == 0)
        idle_timer(s);
    schedule(s); /* room again: frame what waits */
}

/* Frames what nghttp2 has to send into batched connection writes, as long
 * as the socket's queue is short. Returns -1 on a fatal session error. */
static int send_frames(mg_h2_t *s)
{
    while (mg_conn_write_queue_size(s->c) < OUT_HIGH) {
        /* The batch carries its session pointer in front, for on_sent. */
        char *batch = NULL;
        size_t len = 0, cap = 0;
        for (;;) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(s->ng, &data);
            if (n < 0) {
                free(batch);
                return -1;
            }
            if (n == 0)
                break;
            if (len + (size_t)n > cap) {
                cap = len + (size_t)n > OUT_BATCH ? len + (size_t)n : OUT_BATCH;
                batch = mg_realloc(batch, sizeof(mg_h2_t *) + cap);
            }
            memcpy(batch + sizeof(mg_h2_t *) + len, data, (size_t)n);
            len += (size_t)n;
            if (len >= OUT_BATCH)
                break;
        }
        if (!batch)
            return 0;
        *(mg_h2_t **)batch = s;
        s->sending++;
        uv_buf_t b = uv_buf_init(batch + sizeof(mg_h2_t *), (unsigned)len);
        mg_conn_write(s->c, &b, 1, on_sent, batch);
        if (s->dead)
            return -1;
    }
    return 0;
}

/* Runs the write callbacks of bytes that went into frames. */
static int run_done(mg_h2_t *s)
{
    int ran = 0;
    for (mg_h2_stream_t *st = s->streams; st && !s->dead;) {
        mg_h2_stream_t *next = st->next;
        while (st->done && !st->aborted) {
            out_t *o = st->done;
            st->done = o->next;
            if (!st->done)
                st->done_tail = &st->done;
            if (o->cb) {
                o->cb(o->arg, 0);
                ran = 1;
            }
            free(o);
        }
        st = next;
    }
    return ran;
}

static void flush_now(mg_h2_t *s)
{
    s->flushing = 1;
    do {
        s->again = 0;
        if (send_frames(s) < 0) {
            s->flushing = 0;
            if (!s->dead)
                mg_conn_abort(s->c);
            return;
        }
        if (run_done(s))
            s->again = 1;
    } while (s->again && !s->dead);
    s->flushing = 0;
    if (!s->dead && !nghttp2_session_want_read(s->ng)
        && !nghttp2_session_want_write(s->ng))
        finish_session(s);
}

/* Sends and runs callbacks. The connection may close under it (a failed
 * write): the session then outlives the call and is freed at its end, so
 * callers must not touch `s` after flush() unless they hold `busy`. */
static void flush(mg_h2_t *s)
{
    if (s->flushing) {
        s->again = 1;
        return;
    }
    s->busy++;
    flush_now(s);
    s->busy--;
    release(s);
}

static void on_deferred(mg_wreq_t *wr, int status)
{
    mg_h2_t *s = (mg_h2_t *)((char *)wr - offsetof(mg_h2_t, defer));
    s->queued = 0;
    if (s->dead) {
        release(s);
        return;
    }
    flush(s);
}

/* Frames are sent from the loop, never inside nghttp2 or the pipeline. */
static void schedule(mg_h2_t *s)
{
    if (s->flushing) {
        s->again = 1;
        return;
    }
    if (s->queued || s->dead || s->in_recv)
        return;
    s->queued = 1;
    mg_worker_defer(s->w, &s->defer, on_deferred);
}

/* ------------------------------------------------------------------ */
/* Streams: the response                                              */

static void drop_outs(out_t *o)
{
    while (o) {
        out_t *next = o->next;
        free(o);
        o = next;
    }
}

/* The data provider: body pieces into a DATA frame. */
static ssize_t on_read_data(nghttp2_session *ng, int32_t id, uint8_t *buf,
                            size_t length, uint32_t *flags,
                            nghttp2_data_source *src, void *user)
{
    mg_h2_stream_t *st = src->ptr;
    size_t got = 0;
    while (st->out && got < length) {
        out_t *o = st->out;
        if (o->i < o->n) {
            uv_buf_t *b = &o->bufs[o->i];
            size_t take = b->len - o->off;
            if (take > length - got)
                take = length - got;
            memcpy(buf + got, b->base + o->off, take);
            got += take;
            o->off += take;
            if (o->off == b->len) {
                o->i++;
                o->off = 0;
            }
            continue;
        }
        /* Every byte framed: the callback may run. */
        st->out = o->next;
        if (!st->out)
            st->out_tail = &st->out;
        o->next = NULL;
        *st->done_tail = o;
        st->done_tail = &o->next;
    }
    st->out_bytes -= got;
    if (got)
        st->moved_ms = now_ms(st->s);
    if (!st->out && st->resp_done) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        return (ssize_t)got;
    }
    if (got == 0) {
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)got;
}

static void resume(mg_h2_stream_t *st)
{
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(st->s->ng, st->id);
    }
}

static void reset_stream(mg_h2_stream_t *st, uint32_t code)
{
    nghttp2_submit_rst_stream(st->s->ng, NGHTTP2_FLAG_NONE, st->id, code);
    schedule(st->s);
}

/* The head is complete: HEADERS, with a data provider unless the response
 * has no body. */
static void submit_head(mg_h2_stream_t *st)
{
    mg_req_t *r = &st->req;
    nghttp2_nv *nv;
    size_t n;
    int status = mg_h2_head_to_nv(&st->arena, st->head, st->head_len, &nv, &n);
    if (status < 0 || status < 200) {
        mg_log_error("client %s: HTTP/2 stream %d: bad response head",
                     st->s->peer, st->id);
        reset_stream(st, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    st->no_body = r->method == HTTP_HEAD || status == 204 || status == 304;
    nghttp2_data_provider prd = {.source.ptr = st,
                                 .read_callback = on_read_data};
    int rv = nghttp2_submit_response(st->s->ng, st->id, nv, n,
                                     st->no_body ? NULL : &prd);
    if (rv < 0) {
        reset_stream(st, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    st->submitted = 1;
    st->moved_ms = now_ms(st->s);
}

void mg_h2_write(mg_conn_t *c, const uv_buf_t *bufs, unsigned n, mg_write_cb cb,
                 void *arg)
{
    mg_h2_stream_t *st = stream_of(c);
    if (st->aborted || st->s->dead) {
        if (cb)
            cb(arg, UV_ECANCELED);
        return;
    }
    out_t *o = mg_malloc(sizeof(*o) + n * sizeof(uv_buf_t));
    o->next = NULL;
    o->cb = cb;
    o->arg = arg;
    o->n = o->i = 0;
    o->off = 0;
    for (unsigned i = 0; i < n; i++) {
        const char *p = bufs[i].base;
        size_t len = bufs[i].len;
        st->req.bytes_out += len;
        if (!st->head_done && st->head_len == 0) {
            /* The usual case: the whole head in one buffer, parsed in
             * place (nghttp2 copies the fields). */
            const char *end = memmem(p, len, "\r\n\r\n", 4);
            if (end) {
                st->head = (char *)p;
                st->head_len = (size_t)(end + 4 - p);
                st->head_done = 1;
                p += st->head_len;
                len -= st->head_len;
                submit_head(st);
            }
        }
        if (!st->head_done) {
            /* Gather the head; what follows it in the buffer is body. */
            if (!st->head)
                st->head = mg_arena_alloc(&st->arena, MAX_HEAD);
            size_t take = len;
            if (take > MAX_HEAD - st->head_len)
                take = MAX_HEAD - st->head_len;
            memcpy(st->head + st->head_len, p, take);
            size_t from = st->head_len > 3 ? st->head_len - 3 : 0;
            st->head_len += take;
            char *end =
                memmem(st->head + from, st->head_len - from, "\r\n\r\n", 4);
            if (!end) {
                if (st->head_len == MAX_HEAD) {
                    free(o);
                    if (cb)
                        cb(arg, UV_EPROTO);
                    mg_h2_abort(c);
                    return;
                }
                continue;
            }
            size_t used = (size_t)(end + 4 - st->head) - (st->head_len - take);
            st->head_len = (size_t)(end + 4 - st->head);
            st->head_done = 1;
            p += used;
            len -= used;
            submit_head(st);
        }
        if (len && !st->no_body) {
            o->bufs[o->n++] = uv_buf_init((char *)p, (unsigned)len);
            st->out_bytes += len;
        }
    }
    if (st->no_body || !st->submitted) {
        /* Nothing of it will be framed (HEAD, 204, a refused head). */
        o->n = 0;
    }
    *st->out_tail = o;
    st->out_tail = &o->next;
    if (!st->submitted || st->no_body) {
        /* Straight to the callbacks. */
        while (st->out) {
            out_t *x = st->out;
            st->out = x->next;
            x->next = NULL;
            *st->done_tail = x;
            st->done_tail = &x->next;
        }
        st->out_tail = &st->out;
        st->out_bytes = 0;
    }
    resume(st);
    schedule(st->s);
}

size_t mg_h2_write_queue_size(const mg_conn_t *c)
{
    return stream_of(c)->out_bytes;
}

void mg_h2_response_done(mg_req_t *r)
{
    mg_h2_stream_t *st = stream_of(r->conn);
    st->resp_done = 1;
    if (r->proxy) {
        mg_proxy_abort(r);
        r->proxy = NULL;
    }
    if (!st->submitted && !st->aborted) {
        /* No complete head was ever written. */
        reset_stream(st, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    resume(st);
    schedule(st->s);
}

void mg_h2_respond(mg_req_t *r, int status, const mg_header_t *headers,
                   size_t n, mg_str_t body)
{
    mg_h2_stream_t *st = stream_of(r->conn);
    if (st->aborted || st->resp_done)
        return;
    if (r->response_started || st->head_done) {
        mg_h2_abort(r->conn);
        return;
    }
    /* The same head HTTP/1 would write, minus Connection: one path turns
     * heads into fields. */
    size_t len;
    char *out =
        mg_http_format_head(r, status, headers, n, body.len, "", 0, &len);
    r->resp_status = status;
    r->response_started = 1;
    uv_buf_t b[2] = {uv_buf_init(out, (unsigned)len),
                     uv_buf_init((char *)body.p, (unsigned)body.len)};
    /* The body may live on the caller's stack: copy it. */
    if (body.len) {
        b[1].base = mg_arena_alloc(r->arena, body.len);
        memcpy(b[1].base, body.p, body.len);
    }
    mg_h2_write(r->conn, b, body.len ? 2 : 1, NULL, NULL);
    if (!st->body_ended)
        st->discard = 1; /* the rest of the body is not wanted */
    mg_h2_response_done(r);
}

/* Drops the stream from the pipeline's view at once (the pipeline may not
 * touch it after this), and resets it. */
static void stream_cancel(mg_h2_stream_t *st, uint32_t code);

void mg_h2_abort(mg_conn_t *c)
{
    stream_cancel(stream_of(c), NGHTTP2_INTERNAL_ERROR);
}

/* The stream ends here: the pipeline lets go, queued bytes are dropped
 * and the client gets RST_STREAM(code). */
static void stream_cancel(mg_h2_stream_t *st, uint32_t code)
{
    if (st->aborted)
        return;
    st->aborted = 1;
    st->discard = 1;
    if (st->req.proxy) {
        mg_proxy_abort(&st->req);
        st->req.proxy = NULL;
    }
    drop_outs(st->out);
    drop_outs(st->done);
    st->out = st->done = NULL;
    st->out_tail = &st->out;
    st->done_tail = &st->done;
    if (!st->s->dead)
        reset_stream(st, code);
}

mg_worker_t *mg_h2_worker(const mg_conn_t *c)
{
    return stream_of(c)->s->w;
}

/* ------------------------------------------------------------------ */
/* Streams: the request body                                          */

static void consume(mg_h2_stream_t *st, size_t n)
{
    if (n && !st->s->dead)
        nghttp2_session_consume(st->s->ng, st->id, n);
}

/* Hands buffered body bytes to the pipeline when it holds none. */
static void deliver(mg_h2_stream_t *st)
{
    mg_req_t *r = &st->req;
    while (st->body_open && !st->discard && st->holds == 0) {
        if (st->bgiven) {
            /* The pipeline is done with them: the client may send more. */
            consume(st, st->bgiven);
            memmove(st->body, st->body + st->bgiven, st->blen - st->bgiven);
            st->blen -= st->bgiven;
            st->bgiven = 0;
        }
        int any = 0;
        if (st->blen) {
            st->bgiven = st->blen;
            if (r->proxy)
                mg_proxy_on_body(r, st->body, st->blen);
            any = 1;
        }
        if (st->end_stream && !st->body_ended) {
            st->body_ended = 1;
            r->body_complete = 1;
            if (r->proxy)
                mg_proxy_on_body_end(r);
            any = 1;
        }
        if (any && r->proxy)
            mg_proxy_flush(r);
        if (!any)
            break;
    }
}

void mg_h2_body_open(mg_req_t *r)
{
    mg_h2_stream_t *st = stream_of(r->conn);
    if (st->body_open || st->aborted)
        return;
    if (r->content_length >= 0 && (uint64_t)r->content_length > r->max_body) {
        mg_conn_respond_error(r, 413, "request body too large", 0);
        return;
    }
    st->body_open = 1;
    deliver(st);
}

void mg_h2_hold(mg_conn_t *c)
{
    stream_of(c)->holds++;
}

void mg_h2_release(mg_conn_t *c)
{
    mg_h2_stream_t *st = stream_of(c);
    if (--st->holds == 0 && !st->aborted) {
        deliver(st);
        schedule(st->s); /* window updates */
    }
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t id,
                         const uint8_t *data, size_t len, void *user)
{
    mg_h2_stream_t *st = nghttp2_session_get_stream_user_data(ng, id);
    if (!st || !st->started || st->discard) {
        nghttp2_session_consume(ng, id, len);
        return 0;
    }
    mg_req_t *r = &st->req;
    r->body_received += len;
    if (r->route && r->body_received > r->max_body) {
        nghttp2_session_consume(ng, id, len);
        mg_conn_respond_error(r, 413, "request body too large", 0);
        st->discard = 1;
        return 0;
    }
    if (st->blen + len > st->bcap) {
        /* Bounded by the stream window: bytes are consumed only once the
         * pipeline let go of them. */
        st->bcap = st->bcap ? st->bcap * 2 : 16384;
        while (st->bcap < st->blen + len)
            st->bcap *= 2;
        st->body = mg_realloc(st->body, st->bcap);
    }
    memcpy(st->body + st->blen, data, len);
    st->blen += len;
    deliver(st);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Streams: the request head                                          */

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *frame,
                            void *user)
{
    mg_h2_t *s = user;
    if (frame->hd.type != NGHTTP2_HEADERS
        || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    mg_h2_stream_t *st = mg_calloc(1, sizeof(*st));
    st->kind = MG_CONN_H2;
    st->id = frame->hd.stream_id;
    st->s = s;
    st->out_tail = &st->out;
    st->done_tail = &st->done;
    st->req.content_length = -1;
    mg_arena_init(&st->arena);
    st->next = s->streams;
    if (s->streams)
        s->streams->prev = st;
    s->streams = st;
    s->nstreams++;
    s->had_request = 1;
    nghttp2_session_set_stream_user_data(ng, st->id, st);
    mg_metrics_h2_stream();
    return 0;
}

static void add_header(mg_h2_stream_t *st, mg_str_t name, mg_str_t value)
{
    mg_req_t *r = &st->req;
    if (r->nheaders == r->headers_cap) {
        size_t cap = r->headers_cap ? r->headers_cap * 2 : 16;
        mg_header_t *h = mg_arena_alloc(&st->arena, cap * sizeof(*h));
        if (r->nheaders)
            memcpy(h, r->headers, r->nheaders * sizeof(*h));
        r->headers = h;
        r->headers_cap = cap;
    }
    r->headers[r->nheaders++] = (mg_header_t){name, value};
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *frame,
                     const uint8_t *n, size_t nlen, const uint8_t *v,
                     size_t vlen, uint8_t flags, void *user)
{
    mg_h2_t *s = user;
    mg_h2_stream_t *st =
        nghttp2_session_get_stream_user_data(ng, frame->hd.stream_id);
    if (!st || st->started || st->too_large)
        return 0; /* trailers, or past the limits: not stored */
    const mg_limits_t *l = limits(s);
    /* RFC 9113 6.5.2's size: name, value and 32 per field, pseudo-headers
     * included. Past the limits nothing more is stored: an HPACK bomb
     * costs a few additions per field. */
    st->head_bytes += nlen + vlen + 32;
    if (st->head_bytes > l->max_header_bytes) {
        st->too_large = 1;
        return 0;
    }
    mg_str_t name = {(const char *)n, nlen};
    mg_str_t value =
        mg_arena_strdup(&st->arena, (mg_str_t){(const char *)v, vlen});
    if (nlen && n[0] == ':') {
        if (mg_str_caseeq(name, MG_STR(":method")))
            st->method = value;
        else if (mg_str_caseeq(name, MG_STR(":path")))
            st->path = value;
        else if (mg_str_caseeq(name, MG_STR(":scheme")))
            st->scheme = value;
        else if (mg_str_caseeq(name, MG_STR(":authority")))
            st->authority = value;
        return 0;
    }
    if (++st->fields > l->max_header_fields) {
        st->too_large = 1;
        return 0;
    }
    if (mg_str_caseeq(name, MG_STR("cookie"))) {
        /* Crumbs (RFC 9113 8.2.3) become one HTTP/1 Cookie line. */
        if (st->cookie.len) {
            char *j = mg_arena_alloc(&st->arena, st->cookie.len + 2 + vlen);
            memcpy(j, st->cookie.p, st->cookie.len);
            memcpy(j + st->cookie.len, "; ", 2);
            memcpy(j + st->cookie.len + 2, v, vlen);
            st->cookie = (mg_str_t){j, st->cookie.len + 2 + vlen};
        } else {
            st->cookie = value;
        }
        return 0;
    }
    if (mg_str_caseeq(name, MG_STR("content-length"))) {
        /* nghttp2 checked it is digits and checks it against DATA. */
        int64_t len = 0;
        for (size_t i = 0; i < vlen && i < 18; i++)
            len = len * 10 + (v[i] - '0');
        st->req.content_length = len;
        return 0;
    }
    if (mg_str_caseeq(name, MG_STR("host"))) {
        st->host = value;
        return 0;
    }
    if (mg_str_caseeq(name, MG_STR("expect"))
        || mg_str_caseeq(name, MG_STR("te"))
        || mg_http_header_dropped(mg_worker_gen(s->w)->cfg, name))
        return 0;
    add_header(st, mg_arena_strdup(&st->arena, name), value);
    return 0;
}

static const struct {
    const char *name;
    unsigned method;
} methods[] = {
    {"GET", HTTP_GET},     {"HEAD", HTTP_HEAD},     {"POST", HTTP_POST},
    {"PUT", HTTP_PUT},     {"DELETE", HTTP_DELETE}, {"OPTIONS", HTTP_OPTIONS},
    {"PATCH", HTTP_PATCH}, {"TRACE", HTTP_TRACE},   {"PURGE", HTTP_PURGE},
};

/* Returns 0, or the status to refuse the request with (reason in *why). */
static int build_request(mg_h2_stream_t *st, const char **why)
{
    mg_h2_t *s = st->s;
    mg_req_t *r = &st->req;
    const mg_limits_t *l = limits(s);
    if (st->too_large) {
        *why = "request header fields too large";
        return 431;
    }
    *why = "method not implemented";
    r->method = ~0u;
    for (size_t i = 0; i < MG_ARRAY_SIZE(methods); i++)
        if (mg_str_caseeq(st->method, mg_str_from_cstr(methods[i].name))
            && st->method.p[0] == methods[i].name[0])
            r->method = methods[i].method;
    if (r->method == ~0u || !mg_http_method_allowed(r->method))
        return 501;
    r->method_name = mg_str_from_cstr(llhttp_method_name(r->method));
    if (st->path.len > l->max_uri) {
        *why = "uri too long";
        return 414;
    }
    *why = "invalid request target";
    if (st->path.len == 0 || st->path.p[0] != '/')
        return 400;
    r->target = st->path;
    /* :authority is the Host (RFC 9113 8.3.1); the upstream gets it as
     * Host, and plugins see it as the host header. */
    mg_str_t host = st->authority.len ? st->authority : st->host;
    if (host.len) {
        r->host = host;
        add_header(st, MG_STR("host"), host);
        /* Keep Host first, as HTTP/1 clients send it. */
        mg_header_t h = r->headers[r->nheaders - 1];
        memmove(r->headers + 1, r->headers,
                (r->nheaders - 1) * sizeof(mg_header_t));
        r->headers[0] = h;
    }
    if (st->cookie.len)
        add_header(st, MG_STR("cookie"), st->cookie);
    return 0;
}

/* The HEADERS (and CONTINUATIONs) of a request are complete. */
static void start_request(mg_h2_stream_t *st, int end_stream)
{
    mg_h2_t *s = st->s;
    mg_req_t *r = &st->req;
    /* content_length and the headers were gathered into req already. */
    int64_t content_length = r->content_length;
    r->conn = (mg_conn_t *)st;
    r->arena = &st->arena;
    r->gen = mg_worker_gen(s->w);
    mg_gen_ref(r->gen);
    r->start_ns = uv_hrtime();
    r->http_minor = 1;
    r->h2 = 1;
    r->tls = s->tls;
    r->client_keepalive = 1;
    memcpy(r->client_ip, s->peer, sizeof(r->client_ip));
    st->started = 1;
    const char *why;
    int status = build_request(st, &why);
    r->content_length = content_length;
    st->end_stream = end_stream;
    if (end_stream) {
        r->body_complete = 1;
        if (content_length < 0)
            r->content_length = -1;
    } else if (content_length < 0) {
        r->chunked = 1; /* DATA of unknown length goes up chunked */
    }
    if (status) {
        if (!r->method_name.len)
            r->method_name = st->method;
        if (!r->target.len)
            r->target =
                st->path.len <= limits(s)->max_uri ? st->path : MG_NULL_STR;
        mg_conn_respond_error(r, status, why, 0);
        return;
    }
    int has_body = r->chunked || r->content_length > 0;
    st->body_open = !has_body;
    mg_proxy_start(r);
    if (!st->aborted && st->body_open)
        deliver(st);
}

/*
 * Rapid reset (CVE-2023-44487): the same token bucket as nghttp2's own
 * (burst 1000, 33 per second, which stays on as the backstop), checked
 * first so that the GOAWAY says ENHANCE_YOUR_CALM: nghttp2 1.52's says
 * INTERNAL_ERROR, which would read as the gateway's fault.
 */
static void count_reset(mg_h2_t *s)
{
    uint64_t now = uv_now(mg_worker_loop(s->w));
    s->reset_tokens += (double)(now - s->reset_ms) * RESET_RATE / 1000.0;
    if (s->reset_tokens > RESET_BURST)
        s->reset_tokens = RESET_BURST;
    s->reset_ms = now;
    if (s->reset_tokens >= 1) {
        s->reset_tokens -= 1;
        return;
    }
    s->why = "stream reset rate";
    nghttp2_session_terminate_session(s->ng, NGHTTP2_ENHANCE_YOUR_CALM);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *frame,
                         void *user)
{
    if (frame->hd.type == NGHTTP2_RST_STREAM)
        count_reset(user);
    mg_h2_stream_t *st =
        nghttp2_session_get_stream_user_data(ng, frame->hd.stream_id);
    if (!st)
        return 0;
    int end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !st->started) {
        start_request(st, end);
    } else if ((frame->hd.type == NGHTTP2_DATA
                || frame->hd.type == NGHTTP2_HEADERS)
               && end && st->started && !st->end_stream) {
        st->end_stream = 1;
        if (st->discard)
            return 0;
        deliver(st);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Stream and session end                                             */

static void stream_free(mg_h2_stream_t *st)
{
    mg_h2_t *s = st->s;
    mg_req_t *r = &st->req;
    if (st->started) {
        int status = st->resp_done && r->resp_status ? r->resp_status : 499;
        mg_metrics_record(r, status);
        if (mg_worker_accesslog(s->w)) {
            r->resp_status = status;
            mg_accesslog_write(mg_worker_accesslog(s->w), r);
        }
        if (r->proxy)
            mg_proxy_abort(r);
        r->proxy = NULL;
        if (r->gen)
            mg_gen_unref(r->gen);
    }
    drop_outs(st->out);
    drop_outs(st->done);
    if (st->prev)
        st->prev->next = st->next;
    else
        s->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    s->nstreams--;
    free(st->body);
    mg_arena_free(&st->arena);
    free(st);
}

static int on_stream_close(nghttp2_session *ng, int32_t id, uint32_t code,
                           void *user)
{
    mg_h2_t *s = user;
    mg_h2_stream_t *st = nghttp2_session_get_stream_user_data(ng, id);
    if (!st)
        return 0;
    /* Bytes the pipeline never took still count against the connection
     * window. */
    if (st->blen && !s->dead)
        nghttp2_session_consume_connection(ng, st->blen);
    stream_free(st);
    if (s->nstreams == 0 && s->sending == 0 && !s->dead)
        idle_timer(s);
    return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *frame,
                         void *user)
{
    mg_h2_t *s = user;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        uint32_t code = frame->goaway.error_code;
        mg_metrics_h2_goaway(code);
        if (code != NGHTTP2_NO_ERROR) {
            /* nghttp2 tears a connection down by itself for one reason
             * with this code: the stream reset rate. */
            const char *why = s->why ? s->why
                              : code == NGHTTP2_ENHANCE_YOUR_CALM
                                  ? "stream "
                                    "reset rate"
                                  : nghttp2_http2_strerror(code);
            mg_log_info("client %s: HTTP/2 GOAWAY %s (%s)", s->peer,
                        mg_metrics_h2_code_name(code), why);
            s->why = NULL;
        }
        return 0;
    }
    /* Our END_STREAM went out before the client's: the rest of its body
     * is not wanted (RFC 9113 8.1). */
    if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS)
        && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
        && !nghttp2_session_get_stream_remote_close(ng, frame->hd.stream_id))
        nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                  NGHTTP2_NO_ERROR);
    return 0;
}

static void init_callbacks(void)
{
    if (callbacks)
        return;
    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks,
                                                            on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks,
                                                         on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks,
                                                              on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks,
                                                           on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(callbacks,
                                                         on_frame_send);
    nghttp2_option_new(&options);
    nghttp2_option_set_no_auto_window_update(options, 1);
    /* nghttp2's own defaults, kept explicit (SECURITY.md item 5). */
    nghttp2_option_set_stream_reset_rate_limit(options, 1000, 33);
    nghttp2_option_set_max_continuations(options, 8);
    nghttp2_option_set_max_outbound_ack(options, 1000);
    nghttp2_option_set_max_settings(options, 32);
    nghttp2_option_set_max_deflate_dynamic_table_size(options, 4096);
}

mg_h2_t *mg_h2_new(mg_conn_t *c, mg_worker_t *w, const char *peer, int tls)
{
    init_callbacks();
    mg_h2_t *s = mg_calloc(1, sizeof(*s));
    s->c = c;
    s->w = w;
    s->tls = tls ? 1 : 0;
    snprintf(s->peer, sizeof(s->peer), "%s", peer);
    s->reset_tokens = RESET_BURST;
    s->reset_ms = uv_now(mg_worker_loop(w));
    s->read_ms = s->reset_ms;
    nghttp2_session_server_new2(&s->ng, callbacks, s, options);
    const mg_limits_t *l = limits(s);
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, l->h2_max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)l->max_header_bytes},
    };
    nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, MG_ARRAY_SIZE(iv));
    nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0,
                                          CONN_WINDOW);
    mg_metrics_h2_connection();
    mg_http1_h2_timer(c, l->header_timeout_ms);
    schedule(s);
    return s;
}

static int recv_now(mg_h2_t *s, const char *p, size_t n);

int mg_h2_recv(mg_h2_t *s, const char *p, size_t n)
{
    s->busy++;
    int rc = recv_now(s, p, n);
    s->busy--;
    release(s);
    return rc;
}

static int recv_now(mg_h2_t *s, const char *p, size_t n)
{
    s->in_recv = 1;
    ssize_t rv = nghttp2_session_mem_recv(s->ng, (const uint8_t *)p, n);
    s->in_recv = 0;
    if (s->dead)
        return -1;
    if (rv < 0) {
        uint32_t code = NGHTTP2_PROTOCOL_ERROR;
        if (rv == NGHTTP2_ERR_FLOODED) {
            code = NGHTTP2_ENHANCE_YOUR_CALM;
            s->why = "flood of frames needing an answer";
        } else if (rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS) {
            code = NGHTTP2_ENHANCE_YOUR_CALM;
            s->why = "CONTINUATION flood";
        } else if (rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC) {
            mg_log_info("client %s: HTTP/2: bad connection preface", s->peer);
            return -1;
        } else {
            s->why = nghttp2_strerror((int)rv);
        }
        nghttp2_session_terminate_session(s->ng, code);
    }
    /* While streams are open the timer is the body wait, renewed by
     * every read (deadline.h makes that cheap). */
    s->read_ms = now_ms(s);
    if (s->nstreams > 0 && !s->dead && (!s->draining || s->final_goaway))
        mg_http1_h2_timer(s->c, limits(s)->body_timeout_ms);
    flush(s);
    return s->dead ? -1 : 0;
}

/*
 * The connection's timer fired while streams are open: the client owes
 * bytes or takes none.
 * - Nothing arrived for body_timeout: the streams whose body the client
 *   owes (not held up by us: nothing buffered, no window closed by the
 *   pipeline) end with 408, as on HTTP/1. Streams waiting for an
 *   upstream have the upstream's timeouts.
 * - A stream whose response bytes the client has not taken for
 *   send_timeout (its flow-control window stays shut) is cancelled, with
 *   its upstream exchange: HTTP/1 closes a client that reads nothing for
 *   that long, and a closed window must not hold an upstream connection
 *   forever.
 * Then the timer is set for the earliest next deadline.
 */
static void streams_timeout(mg_h2_t *s)
{
    const mg_limits_t *l = limits(s);
    uint64_t now = now_ms(s);
    int body_due = now - s->read_ms >= l->body_timeout_ms;
    for (mg_h2_stream_t *st = s->streams; st; st = st->next)
        if (!st->started && body_due) {
            /* A header block left unfinished (HEADERS without its
             * CONTINUATIONs): nothing else can go on. */
            s->why = "request head timeout";
            nghttp2_session_terminate_session(s->ng, NGHTTP2_PROTOCOL_ERROR);
            schedule(s);
            return;
        }
    if (body_due)
        s->read_ms = now; /* the next body wait starts now */
    for (mg_h2_stream_t *st = s->streams, *after; st; st = after) {
        after = st->next; /* a 408 or a cancel may free st */
        if (body_due && st->started && st->body_open && !st->end_stream
            && !st->discard && !st->aborted && st->holds == 0
            && st->blen == 0) {
            if (st->req.response_started)
                mg_h2_abort((mg_conn_t *)st);
            else
                mg_conn_respond_error(&st->req, 408, "request timeout", 0);
        } else if (st->submitted && !st->aborted && st->out_bytes
                   && now - st->moved_ms >= l->send_timeout_ms) {
            mg_log_info("client %s: HTTP/2 stream %d took no response byte "
                        "for %llu ms (flow-control window shut); cancelled",
                        s->peer, st->id,
                        (unsigned long long)(now - st->moved_ms));
            stream_cancel(st, NGHTTP2_CANCEL);
        }
    }
    mg_h2_rearm(s);
    schedule(s);
}

/* The connection timer for the earliest deadline: the open streams' body
 * and send waits, else the idle (or drain grace) wait. */
void mg_h2_rearm(mg_h2_t *s)
{
    if (s->dead || s->finished)
        return;
    if (s->draining && !s->final_goaway) {
        mg_http1_h2_timer(s->c, DRAIN_GRACE_MS);
        return;
    }
    if (s->nstreams == 0) {
        idle_timer(s);
        return;
    }
    const mg_limits_t *l = limits(s);
    uint64_t now = now_ms(s), next = s->read_ms + l->body_timeout_ms;
    for (mg_h2_stream_t *st = s->streams; st; st = st->next)
        if (st->submitted && !st->aborted && st->out_bytes
            && st->moved_ms + l->send_timeout_ms < next)
            next = st->moved_ms + l->send_timeout_ms;
    mg_http1_h2_timer(s->c, next > now ? next - now : 1);
}

void mg_h2_timeout(mg_h2_t *s)
{
    if (s->draining && !s->final_goaway) {
        s->final_goaway = 1;
        nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(s->ng),
                              NGHTTP2_NO_ERROR, NULL, 0);
        schedule(s);
        return;
    }
    if (s->nstreams > 0) {
        streams_timeout(s);
        return;
    }
    /* Idle (or never a request): a polite end. */
    nghttp2_session_terminate_session(s->ng, NGHTTP2_NO_ERROR);
    schedule(s);
}

void mg_h2_drain(mg_h2_t *s)
{
    if (s->draining)
        return;
    s->draining = 1;
    nghttp2_submit_shutdown_notice(s->ng);
    mg_http1_h2_timer(s->c, DRAIN_GRACE_MS);
    schedule(s);
}

void mg_h2_free(mg_h2_t *s)
{
    s->dead = 1;
    while (s->streams) {
        mg_h2_stream_t *st = s->streams;
        if (st->req.proxy) {
            mg_proxy_abort(&st->req);
            st->req.proxy = NULL;
        }
        nghttp2_session_set_stream_user_data(s->ng, st->id, NULL);
        stream_free(st);
    }
    release(s);
}
