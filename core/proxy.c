/*
 * The request pipeline: normalize the path, route, rebuild the request for
 * the upstream (canonical framing, hop-by-hop and identity headers removed,
 * X-Forwarded-* set), exchange it over a pooled upstream connection and
 * stream the response back. Plugin phases will be walked from here too;
 * nothing else decides the order of a request's steps.
 *
 * Lifetime. The per-request state (mg_proxy_t) is malloc'd, not taken from
 * the request arena, because upstream write callbacks can outlive the client
 * connection: when the client goes away (mg_proxy_abort) the state is marked
 * dead and freed only after its upstream connection has finished closing,
 * when no callback can reach it any more.
 *
 * Backpressure. Request body bytes are written upstream straight from the
 * client's read buffer while the client connection is held; response body
 * bytes go to the client straight from the upstream connection's buffer and
 * no more is read upstream until those writes complete. Nothing is copied
 * and buffering is bounded by the two read buffers.
 */
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>

#include "deadline.h"
#include "generation.h"
#include "http.h"
#include "lua.h"
#include "log.h"
#include "ffi.h"
#include "path.h"
#include "upstream.h"
#include "worker.h"

#define UP_READ_CHUNK 16384
#define UP_MAX_HEAD 65536 /* upstream response head limit -> 502 */
#define UP_MAX_FIELDS 128

typedef struct {
    uint32_t off, len;
} span_t;

struct mg_proxy_s {
    mg_req_t *r; /* NULL once the client side is gone */
    const mg_route_conf_t *route;
    mg_upstream_t *upstream;
    mg_target_t *target;
    mg_upconn_t *uc;
    mg_lua_task_t *task; /* the request's coroutine, if it has Lua */
    uint8_t mask;        /* MG_LUA_* phases this route runs */
    mg_str_t wildcard;   /* what the route's '*' matched */
    llhttp_t parser;
    uv_buf_t head;          /* request head for the upstream (arena) */
    uv_buf_t client_head;   /* response head not yet written: it goes
                               out with the first body bytes, in one
                               write(2) */
    size_t pos;             /* parsed up to, in uc->rbuf */
    unsigned up_writes;     /* writes queued on the upstream conn */
    unsigned client_writes; /* writes to the client borrowing uc->rbuf */
    char *body;             /* the body read by gw.request.get_body */
    size_t body_len, body_cap;
    mg_lua_task_t *body_waiter; /* the task waiting for it */
    uv_buf_t *pending;          /* body pieces parsed but not yet written,
                                   with two free slots in front and room
                                   for two more behind (see flush) */
    unsigned npending, cpending;
    size_t pending_bytes;
    char *fout; /* body_filter output of one parse pass, waiting to be
                   written; reading pauses while the client takes it */
    size_t fout_len, fout_cap;
    uint64_t fout_total;  /* bytes the filters produced */
    int64_t declared_len; /* the Content-Length sent, or -1 */
    unsigned nfields;
    span_t fields[UP_MAX_FIELDS][2];
    span_t reason;
    int status;
    unsigned dead : 1; /* client side gone; free when uc closed */
    unsigned connected : 1;
    unsigned head_sent : 1;
    unsigned body_end : 1;    /* client body complete (mg_proxy_on_body_end) */
    unsigned end_sent : 1;    /* the last chunk went upstream */
    unsigned buffering : 1;   /* reading the body into `body` */
    unsigned buffered : 1;    /* `body` holds the whole body */
    unsigned reading_now : 1; /* inside mg_ffi_req_read_body: the task is
                                 running, so it is not woken */
    unsigned resp_bytes : 1;  /* any response byte received */
    unsigned resp_complete : 1;
    unsigned chunk_client : 1; /* re-chunk the response to the client */
    unsigned up_keepalive : 1;
    unsigned retried : 1;
    unsigned in_field : 1;
    unsigned interim : 1;       /* current upstream message is a 1xx */
    unsigned counted : 1;       /* counted in upstream->inflight */
    unsigned plugin_failed : 1; /* header_filter or body_filter raised */
    unsigned lua_failed : 1;    /* the request's coroutine died */
    unsigned logged : 1;        /* the log phase ran */
    unsigned conn_fields : 1;   /* the response has a Connection header */
    unsigned filter_body : 1;   /* body_filter runs on the response body */
    unsigned body_plugin_failed : 1;
    unsigned retry_status : 1; /* headers_complete asked for a retry */
    mg_deadline_t deadline;    /* the upstream wait, on uc->timer */
    uint64_t up_start_ns;      /* when the upstream exchange began */
    mg_upstream_try_t try_;    /* the open try (health, breaker) */
    uint8_t *tried;            /* per target: tried already (arena) */
    unsigned tries;            /* tries started, the first included */
    uint64_t first_try_ms;     /* for retries.total_timeout */
};

static llhttp_settings_t up_settings;

static void free_proxy(mg_proxy_t *p)
{
    mg_lua_task_free(p->task);
    free(p->body);
    free(p->pending);
    free(p->fout);
    free(p);
}

static void up_read_start(mg_proxy_t *p);
static void finish(mg_proxy_t *p);
static void run_log_phase(mg_proxy_t *p);

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */

static void append(char **w, const char *s, size_t n)
{
    memcpy(*w, s, n);
    *w += n;
}

#define APPEND_LIT(w, lit) append((w), (lit), sizeof(lit) - 1)

static void append_str(char **w, mg_str_t s)
{
    append(w, s.p, s.len);
}

static int is_hop_by_hop(mg_str_t name)
{
    /* By length first: most names are told apart without a comparison.
     * Content-Length counts here: framing is the gateway's. */
    switch (name.len) {
    case 2: return mg_str_caseeq(name, MG_STR("te"));
    case 7:
        return mg_str_caseeq(name, MG_STR("trailer"))
               || mg_str_caseeq(name, MG_STR("upgrade"));
    case 10:
        return mg_str_caseeq(name, MG_STR("connection"))
               || mg_str_caseeq(name, MG_STR("keep-alive"));
    case 14: return mg_str_caseeq(name, MG_STR("content-length"));
    case 16: return mg_str_caseeq(name, MG_STR("proxy-connection"));
    case 17: return mg_str_caseeq(name, MG_STR("transfer-encoding"));
    case 18: return mg_str_caseeq(name, MG_STR("proxy-authenticate"));
    case 19: return mg_str_caseeq(name, MG_STR("proxy-authorization"));
    default: return 0;
    }
}

/* True when `name` is one of the comma-separated tokens in `list`. */
static int token_listed(mg_str_t list, mg_str_t name)
{
    const char *p = list.p, *end = list.p + list.len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        const char *start = p;
        while (p < end && *p != ',' && *p != ' ' && *p != '\t')
            p++;
        if (p > start
            && mg_str_caseeq((mg_str_t){start, (size_t)(p - start)}, name))
            return 1;
    }
    return 0;
}

static int listed_in_connection(const mg_header_t *hs, size_t n, mg_str_t name)
{
    for (size_t i = 0; i < n; i++)
        if (mg_str_caseeq(hs[i].name, MG_STR("connection"))
            && token_listed(hs[i].value, name))
            return 1;
    return 0;
}

int mg_proxy_peer_trusted(mg_req_t *r)
{
    /* Asked for the request id, X-Forwarded-For and the client IP:
     * parse the peer address once. */
    if (r->peer_trust == 0) {
        const mg_config_t *cfg = r->gen->cfg;
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof(ss));
        int ok =
            cfg->ntrusted_proxies
            && (!uv_ip4_addr(r->client_ip, 0, (struct sockaddr_in *)&ss)
                || !uv_ip6_addr(r->client_ip, 0, (struct sockaddr_in6 *)&ss))
            && mg_cidr_match(cfg->trusted_proxies, cfg->ntrusted_proxies,
                             (const struct sockaddr *)&ss);
        r->peer_trust = ok ? 1 : -1;
    }
    return r->peer_trust > 0;
}

static int idempotent(unsigned method)
{
    return method == HTTP_GET || method == HTTP_HEAD || method == HTTP_PUT
           || method == HTTP_DELETE || method == HTTP_OPTIONS
           || method == HTTP_TRACE;
}

/* ------------------------------------------------------------------ */
/* Failing                                                            */

/*
 * Gives the client a gateway error (or cuts the connection when the
 * response has started) and drops the upstream connection.
 */
static void fail(mg_proxy_t *p, int status, const char *reason)
{
    mg_req_t *r = p->r;
    if (status >= 500 && p->target)
        mg_log_error("%.*s %.*s: upstream %s: %s", (int)r->method_name.len,
                     r->method_name.p, (int)r->target.len, r->target.p,
                     mg_target_name(p->target), reason);
    else if (status >= 500)
        mg_log_error("%.*s %.*s: route %s: %s", (int)r->method_name.len,
                     r->method_name.p, (int)r->target.len, r->target.p,
                     p->route->name, reason);
    /* Log plugins see failed requests too (not when Lua itself failed:
     * its coroutine is gone). */
    if (!p->lua_failed) {
        r->resp_status = status;
        run_log_phase(p);
    }
    /* A head built but not yet written (body_filter failed on the first
     * piece) can still give way to an error response. */
    if (p->client_head.len)
        r->response_started = 0;
    /* Detach first: respond_error would otherwise call mg_proxy_abort. */
    mg_proxy_abort(r);
    if (r->response_started)
        mg_conn_abort(r->conn);
    else
        mg_conn_respond_error(r, status,
                              status == 504   ? "gateway timeout"
                              : status == 503 ? "service unavailable"
                              : status == 500 ? "internal error"
                                              : "bad gateway",
                              0);
}

void mg_proxy_abort(mg_req_t *r)
{
    mg_proxy_t *p = r->proxy;
    r->proxy = NULL;
    if (!p)
        return;
    p->r = NULL;
    p->dead = 1;
    if (p->upstream)
        mg_upstream_try_cancel(p->upstream, &p->try_);
    if (p->counted) {
        p->upstream->inflight--;
        p->counted = 0;
    }
    if (p->uc)
        mg_upconn_close(p->uc); /* frees p from its close callback */
    else
        free_proxy(p);
}

static void on_uc_closed(mg_upconn_t *uc)
{
    mg_proxy_t *p = uc->owner;
    if (p && p->dead)
        free_proxy(p);
}

/* ------------------------------------------------------------------ */
/* Building the upstream request                                      */

/* Applies strip_prefix / rewrite to the normalized path. */
static mg_str_t upstream_path(mg_req_t *r, const mg_route_conf_t *rt,
                              mg_str_t wildcard, mg_str_t path)
{
    if (rt->rewrite) {
        size_t cap = strlen(rt->rewrite) + path.len + 1;
        for (size_t i = 0; i < r->nparams; i++)
            cap += r->param_values[i].len;
        char *out = mg_arena_alloc(r->arena, cap), *w = out;
        for (const char *t = rt->rewrite; *t;) {
            const char *close = *t == '{' ? strchr(t, '}') : NULL;
            if (!close) {
                *w++ = *t++;
                continue;
            }
            mg_str_t name = {t + 1, (size_t)(close - t - 1)};
            if (mg_str_eq(name, MG_STR("*")))
                append_str(&w, wildcard);
            for (size_t i = 0; i < r->nparams; i++)
                if (mg_str_eq(name, r->param_names[i]))
                    append_str(&w, r->param_values[i]);
            t = close + 1;
        }
        return (mg_str_t){out, (size_t)(w - out)};
    }
    if (rt->strip_prefix) {
        mg_str_t pre = mg_str_from_cstr(rt->strip_prefix);
        if (path.len >= pre.len && memcmp(path.p, pre.p, pre.len) == 0
            && (path.len == pre.len || path.p[pre.len] == '/'))
            path = path.len == pre.len
                       ? MG_STR("/")
                       : (mg_str_t){path.p + pre.len, path.len - pre.len};
    }
    return path;
}

static void build_head(mg_proxy_t *p, mg_str_t path, mg_str_t query)
{
    mg_req_t *r = p->r;
    int trusted = mg_proxy_peer_trusted(r);
    size_t xff_len = 0;
    size_t cap = 256 + r->request_id.len + r->method_name.len + path.len
                 + query.len + r->host.len * 2 + 2 * sizeof(r->client_ip)
                 + strlen(mg_target_name(p->target));
    for (size_t i = 0; i < r->nheaders; i++)
        cap += r->headers[i].name.len + r->headers[i].value.len + 4;
    char *out = mg_arena_alloc(r->arena, cap), *w = out;

    append_str(&w, r->method_name);
    APPEND_LIT(&w, " ");
    append_str(&w, path);
    if (query.len) {
        APPEND_LIT(&w, "?");
        append_str(&w, query);
    }
    APPEND_LIT(&w, " HTTP/1.1\r\n");
    int has_connection = 0;
    for (size_t i = 0; i < r->nheaders; i++)
        has_connection |=
            mg_str_caseeq(r->headers[i].name, MG_STR("connection"));
    for (size_t i = 0; i < r->nheaders; i++) {
        const mg_header_t *h = &r->headers[i];
        if (is_hop_by_hop(h->name)
            || (has_connection
                && listed_in_connection(r->headers, r->nheaders, h->name)))
            continue;
        if (mg_str_caseeq(h->name, MG_STR("x-forwarded-for"))) {
            xff_len += trusted ? h->value.len + 2 : 0;
            continue;
        }
        if (mg_str_caseeq(h->name, MG_STR("x-request-id")))
            continue; /* r->request_id, decided at the start */
        if (mg_str_caseeq(h->name, MG_STR("x-forwarded-proto"))
            || mg_str_caseeq(h->name, MG_STR("x-forwarded-host")))
            continue;
        append_str(&w, h->name);
        APPEND_LIT(&w, ": ");
        append_str(&w, h->value);
        APPEND_LIT(&w, "\r\n");
    }
    if (!r->host.len) {
        /* HTTP/1.0 without Host: name the target. */
        APPEND_LIT(&w, "Host: ");
        append(&w, mg_target_name(p->target),
               strlen(mg_target_name(p->target)));
        APPEND_LIT(&w, "\r\n");
    }
    APPEND_LIT(&w, "X-Forwarded-For: ");
    /* A trusted peer's list, all its lines in order, then the peer. */
    for (size_t i = 0; xff_len && i < r->nheaders; i++) {
        if (mg_str_caseeq(r->headers[i].name, MG_STR("x-forwarded-for"))
            && r->headers[i].value.len) {
            append_str(&w, r->headers[i].value);
            APPEND_LIT(&w, ", ");
        }
    }
    append(&w, r->client_ip, strlen(r->client_ip));
    if (r->tls)
        APPEND_LIT(&w, "\r\nX-Forwarded-Proto: https\r\n");
    else
        APPEND_LIT(&w, "\r\nX-Forwarded-Proto: http\r\n");
    if (r->host.len) {
        APPEND_LIT(&w, "X-Forwarded-Host: ");
        append_str(&w, r->host);
        APPEND_LIT(&w, "\r\n");
    }
    APPEND_LIT(&w, "X-Request-Id: ");
    append_str(&w, r->request_id);
    APPEND_LIT(&w, "\r\n");
    if (r->chunked) {
        APPEND_LIT(&w, "Transfer-Encoding: chunked\r\n");
    } else if (r->content_length >= 0
               && (r->content_length > 0 || r->method == HTTP_POST
                   || r->method == HTTP_PUT || r->method == HTTP_PATCH)) {
        w += sprintf(w, "Content-Length: %lld\r\n",
                     (long long)r->content_length);
    }
    APPEND_LIT(&w, "\r\n");
    p->head = uv_buf_init(out, (unsigned)(w - out));
}

/* ------------------------------------------------------------------ */
/* Start                                                              */

/* Splits the raw target into path and query (fragment dropped). */
static void split_target(mg_str_t target, mg_str_t *path, mg_str_t *query)
{
    const char *q = memchr(target.p, '?', target.len);
    const char *f = memchr(target.p, '#', target.len);
    const char *end = target.p + target.len;
    if (f)
        end = f;
    if (q && q < end) {
        *path = (mg_str_t){target.p, (size_t)(q - target.p)};
        *query = (mg_str_t){q + 1, (size_t)(end - q - 1)};
    } else {
        *path = (mg_str_t){target.p, (size_t)(end - target.p)};
        *query = MG_NULL_STR;
    }
}

static void on_connect(mg_upconn_t *uc, int status);
static void attach(mg_proxy_t *p, mg_upconn_t *uc);

/* X-Request-Id: a trusted peer's own, or a fresh one. */
static void set_request_id(mg_req_t *r)
{
    if (mg_proxy_peer_trusted(r))
        for (size_t i = 0; i < r->nheaders; i++)
            if (mg_str_caseeq(r->headers[i].name, MG_STR("x-request-id"))
                && r->headers[i].value.len && r->headers[i].value.len <= 200) {
                r->request_id = r->headers[i].value;
                return;
            }
    char *id = mg_arena_alloc(r->arena, 33);
    mg_worker_request_id(mg_conn_worker(r->conn), id);
    r->request_id = (mg_str_t){id, 32};
}

/* The consistent-hash key of the request, per the upstream's hash_on. A
 * request without the header or consumer hashes on the client address. */
static uint64_t hash_key(mg_req_t *r, const mg_upstream_conf_t *c)
{
    mg_str_t k = MG_NULL_STR;
    if (c->balance_kind != MG_BALANCE_HASH)
        return 0;
    if (c->hash_on == MG_HASH_ON_PATH) {
        k = r->path;
    } else if (c->hash_on == MG_HASH_ON_CONSUMER) {
        k = r->consumer;
    } else if (c->hash_on == MG_HASH_ON_HEADER) {
        for (size_t i = 0; i < r->nheaders; i++)
            if (mg_str_caseeq(r->headers[i].name,
                              mg_str_from_cstr(c->hash_header))) {
                k = r->headers[i].value;
                break;
            }
    }
    if (!k.len)
        k = mg_req_client_ip(r);
    return mg_balancer_hash(k.p, k.len);
}

/* No target is usable: 503 at once, without touching any upstream. */
static void fail_unavailable(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    mg_upstream_t *u = p->upstream;
    char after[16], body[256];
    snprintf(after, sizeof(after), "%u",
             mg_upstream_retry_after(u, mg_monotonic_ms()));
    int n = snprintf(body, sizeof(body),
                     "{\"error\":\"no healthy upstream target\","
                     "\"upstream\":\"%.100s\"}\n",
                     u->conf->name);
    if (n >= (int)sizeof(body))
        n = sizeof(body) - 1;
    mg_header_t h[2] = {{MG_STR("Retry-After"), mg_str_from_cstr(after)},
                        {MG_STR("Content-Type"), MG_STR("application/json")}};
    mg_log_warn("%.*s %.*s: upstream %s: no healthy target, 503",
                (int)r->method_name.len, r->method_name.p, (int)r->target.len,
                r->target.p, u->conf->name);
    r->resp_status = 503;
    if (!p->lua_failed)
        run_log_phase(p);
    mg_proxy_abort(r);
    mg_conn_respond(r, 503, h, 2, (mg_str_t){body, (size_t)n}, 0);
}

/* Starts one try: picks a target not tried yet, connects (or takes a
 * pooled connection) and sends the request. */
static void start_try(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    const mg_route_conf_t *rt = p->route;
    mg_upstream_t *u = p->upstream;
    uint64_t now = mg_monotonic_ms(), key = hash_key(r, u->conf);
    int i;
    /* A half-open breaker may have handed its last probe to another
     * worker between the pick and the ask: pick again without it. */
    while ((i = mg_upstream_choose(u, key, p->tried, now)) >= 0
           && !mg_upstream_try_begin(u, i, now, &p->try_))
        p->tried[i] = 1;
    if (i < 0) {
        if (p->tries == 0)
            fail_unavailable(p);
        else
            fail(p, 502, "no other target to retry on");
        return;
    }
    p->tried[i] = 1;
    p->tries++;
    p->target = u->targets[i];
    r->upstream_name = mg_target_name(p->target);
    p->up_start_ns = uv_hrtime();
    build_head(
        p, r->path_set ? r->path : upstream_path(r, rt, p->wildcard, r->path),
        r->query);
    mg_upconn_t *uc;
    int rc =
        mg_upconn_get(p->target, p, rt->timeouts.connect_ms, on_connect, &uc);
    if (rc == 0 || rc == MG_AGAIN) {
        attach(p, uc);
        if (rc == 0)
            on_connect(uc, 0);
    } else {
        mg_upstream_try_end(u, &p->try_, MG_TRY_CONNECT, 0, mg_monotonic_ms());
        fail(p, 502, mg_strerror(rc));
    }
}

/*
 * After a failed try (outcome MG_TRY_*, or the status a gateway would
 * answer): may the request go to another target? Only when the upstream's
 * retries allow this kind of failure, tries and budget remain, the method
 * is idempotent (or the upstream opted in; a connect failure sent nothing,
 * so it is retried for any method), and the body can be sent again:
 * none, or buffered whole by gw.request.get_body, or not sent at all yet (a
 * connect failure: the body gate opens only once connected). A streamed
 * body is gone, so such a request is never retried.
 */
static int may_retry(mg_proxy_t *p, int outcome, int status)
{
    mg_req_t *r = p->r;
    const mg_retry_conf_t *rc = &p->upstream->conf->retries;
    int wanted = (outcome == MG_TRY_CONNECT && rc->on_connect)
                 || (outcome == MG_TRY_TIMEOUT && rc->on_timeout)
                 || (status && mg_status_set_has(&rc->statuses, status));
    if (!wanted || p->tries > rc->count || r->response_started)
        return 0;
    /* A connect failure sent nothing: safe for any method. */
    if (outcome != MG_TRY_CONNECT && !idempotent(r->method)
        && !rc->non_idempotent)
        return 0;
    int has_body = r->chunked || r->content_length > 0;
    if (has_body && !p->buffered && outcome != MG_TRY_CONNECT)
        return 0;
    if (has_body && !p->buffered && (p->head_sent || r->body_received))
        return 0;
    if (rc->total_timeout_ms
        && mg_monotonic_ms() - p->first_try_ms >= rc->total_timeout_ms)
        return 0;
    /* Nowhere else to go: the client gets this try's answer. */
    mg_upstream_t *u = p->upstream;
    uint64_t now = mg_monotonic_ms();
    size_t left = 0;
    for (size_t i = 0; i < u->ntargets; i++)
        left += !p->tried[i] && mg_upstream_usable(u, i, now);
    if (!left || u->retry_tokens < 1.0)
        return 0;
    u->retry_tokens -= 1.0;
    return 1;
}

/* Drops the current try's connection and starts the next try. */
static void next_try(mg_proxy_t *p)
{
    mg_upconn_t *old = p->uc;
    if (old) {
        old->owner = NULL;
        old->on_close = NULL;
        mg_upconn_close(old);
    }
    p->uc = NULL;
    p->head_sent = p->connected = p->resp_bytes = p->interim = 0;
    p->retry_status = 0;
    p->status = 0;
    p->pos = 0;
    p->parser.data = NULL; /* up_read_start initializes it again */
    mg_deadline_forget_timer(&p->deadline);
    mg_log_info("%.*s %.*s: retrying on another target (try %u)",
                (int)p->r->method_name.len, p->r->method_name.p,
                (int)p->r->target.len, p->r->target.p, p->tries + 1);
    start_try(p);
}

/* Connects (or takes a pooled connection) and sends the request. */
static void go_upstream(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    const mg_route_conf_t *rt = p->route;
    if (rt->upstream < 0) {
        fail(p, 500, "the handler route has no handler result");
        return;
    }
    mg_upstream_t *u = &r->gen->upstreams[rt->upstream];
    p->upstream = u;
    if (u->inflight >= u->conf->max_pending) {
        fail(p, 503, "too many requests waiting for the upstream");
        return;
    }
    u->inflight++;
    p->counted = 1;
    p->try_.index = -1;
    p->tried = mg_arena_alloc(r->arena, u->ntargets);
    memset(p->tried, 0, u->ntargets);
    p->first_try_ms = mg_monotonic_ms();
    /* Each request adds to the retry budget; a retry spends one. */
    u->retry_tokens += u->conf->retries.budget;
    if (u->retry_tokens > 100.0)
        u->retry_tokens = 100.0;
    start_try(p);
}

/* Runs the route's log phase, if any (the response is fully decided), and
 * lets the request's coroutine finish so it can serve another request. */
static void run_log_phase(mg_proxy_t *p)
{
    if (p->task && !p->logged) {
        p->logged = 1;
        mg_lua_task_phase(p->task, (p->mask & MG_LUA_LOG) ? "log" : "finish");
    }
}

/* A phase (or the handler) answered the request itself. */
static void lua_respond(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    int status;
    mg_str_t body;
    mg_header_t *headers;
    size_t n;
    mg_lua_task_response(p->task, r->arena, &status, &body, &headers, &n);
    r->resp_status = status;
    r->resp_headers = headers;
    r->nresp_headers = r->resp_headers_cap = n;
    if (p->mask & MG_LUA_HEADER_FILTER) {
        /* Plugins see a handler's answer as they see an upstream's, its
         * length included (mg_lua_task_response left a free slot). */
        char *len = mg_arena_alloc(r->arena, 24);
        int nlen = snprintf(len, 24, "%zu", body.len);
        r->resp_headers_cap = n + 1;
        r->resp_headers[r->nresp_headers++] =
            (mg_header_t){MG_STR("Content-Length"), {len, (size_t)nlen}};
        r->resp_mutable = 1;
        int what = mg_lua_task_phase(p->task, "header_filter");
        r->resp_mutable = 0;
        if (what == MG_LUA_ERROR) {
            p->lua_failed = 1;
            fail(p, 500, "header_filter failed");
            return;
        }
        /* The length sent is the final body's, whatever was left here. */
        size_t k = 0;
        for (size_t i = 0; i < r->nresp_headers; i++)
            if (!mg_str_caseeq(r->resp_headers[i].name,
                               MG_STR("content-length")))
                r->resp_headers[k++] = r->resp_headers[i];
        r->nresp_headers = k;
    }
    if ((p->mask & MG_LUA_BODY_FILTER) && r->method != HTTP_HEAD) {
        mg_str_t out;
        if (mg_lua_task_body_filter(p->task, body.p, body.len, 1, &out)
            != MG_LUA_NEXT) {
            p->lua_failed = 1;
            fail(p, 500, "body_filter failed");
            return;
        }
        body = mg_arena_strdup(r->arena, out);
    }
    run_log_phase(p);
    r->proxy = NULL;
    free_proxy(p);
    mg_conn_respond(r, r->resp_status, r->resp_headers, r->nresp_headers, body,
                    0);
}

/* What the request's coroutine decided, now or after a wait. */
static void on_lua_decision(mg_lua_task_t *t, int what, void *data)
{
    mg_proxy_t *p = data;
    mg_req_t *r = p->r;
    if (what == MG_LUA_WAIT)
        return;
    r->req_mutable = 0;
    if (what == MG_LUA_PROXY) {
        go_upstream(p);
    } else if (what == MG_LUA_RESPOND) {
        lua_respond(p);
    } else {
        p->lua_failed = 1;
        fail(p, 500, "plugin error");
    }
}

/* Copies what the route matched into the request (plugins read it). */
static void keep_match(mg_req_t *r, const mg_route_match_t *m)
{
    r->nparams = m->nparams;
    if (!m->nparams)
        return;
    r->param_names = mg_arena_alloc(r->arena, m->nparams * sizeof(mg_str_t));
    r->param_values = mg_arena_alloc(r->arena, m->nparams * sizeof(mg_str_t));
    for (size_t i = 0; i < m->nparams; i++) {
        r->param_names[i] = mg_arena_strdup(r->arena, m->param_names[i]);
        r->param_values[i] = m->param_values[i]; /* in r->path: arena */
    }
}

void mg_proxy_start(mg_req_t *r)
{
    mg_str_t raw_path;
    set_request_id(r); /* first: even a refused request is traceable */
    split_target(r->target, &raw_path, &r->query);
    char *norm = mg_arena_alloc(r->arena, raw_path.len + 1);
    size_t norm_len;
    if (mg_path_normalize(raw_path.p, raw_path.len, norm, &norm_len)) {
        mg_conn_respond_error(r, 400, "invalid path", 1);
        return;
    }
    r->path = (mg_str_t){norm, norm_len};

    mg_route_match_t m;
    if (mg_router_match(r->gen->router, r->method, r->host, r->path, &m)) {
        mg_conn_respond_error(r, 404, "no route", 0);
        return;
    }
    const mg_route_conf_t *rt = m.data;
    r->route = rt;
    r->max_body = rt->max_body;
    if (r->content_length > 0 && (uint64_t)r->content_length > r->max_body) {
        /* Refused before a byte of it is read, and without 100 Continue. */
        mg_conn_respond_error(r, 413, "request body too large", 1);
        return;
    }
    keep_match(r, &m);

    mg_proxy_t *p = mg_calloc(1, sizeof(*p));
    p->r = r;
    p->route = rt;
    p->wildcard = m.wildcard;
    p->mask = r->gen->route_masks[mg_gen_route_index(r->gen, rt)];
    r->proxy = p;
    if (!p->mask) {
        go_upstream(p);
        return;
    }
    r->req_mutable = 1;
    int what = mg_lua_request_start(r->gen->lua, r, r->gen->id,
                                    mg_gen_route_index(r->gen, rt),
                                    on_lua_decision, p, &p->task);
    on_lua_decision(p->task, what, p);
}

/* ------------------------------------------------------------------ */
/* Request: head and body to the upstream                             */

static void up_timer(mg_proxy_t *p, uint64_t ms);

/* A write to the upstream; body writes hold the client's read buffer. */
typedef struct {
    mg_wreq_t wr;
    mg_proxy_t *p;
    int body;
    char chunk_size[24]; /* the re-chunked body's size line */
} up_write_t;

static void on_up_write(mg_wreq_t *wr, int status)
{
    mg_proxy_t *p = ((up_write_t *)wr)->p;
    int body = ((up_write_t *)wr)->body;
    free(wr);
    p->up_writes--;
    if (p->dead)
        return;
    if (body && p->r)
        mg_conn_release(p->r->conn);
    if (p->dead || !p->r)
        return;
    if (status < 0) {
        /* The response may still come (an early error from upstream);
         * reading goes on, and a failed read will end the request. */
        mg_log_debug("upstream write failed: %s", uv_strerror(status));
        return;
    }
    if (p->up_writes == 0 && !p->resp_complete)
        up_timer(p, p->route->timeouts.read_ms);
}

/* Over TLS (upstream.c encrypts): the same callback, from libuv. */
static void on_up_tls_write(uv_write_t *req, int status)
{
    on_up_write((mg_wreq_t *)req, status);
}

static void up_write(mg_proxy_t *p, up_write_t *wr, const uv_buf_t *bufs,
                     unsigned n)
{
    wr->p = p;
    if (wr->body)
        mg_conn_hold(p->r->conn);
    p->up_writes++;
    if (!p->uc->tls)
        mg_worker_write(mg_conn_worker(p->r->conn), (uv_stream_t *)&p->uc->tcp,
                        &wr->wr, bufs, n, on_up_write);
    else if (mg_upconn_write(p->uc, &wr->wr.req, bufs, n, on_up_tls_write) < 0)
        /* Only a closing connection fails at once: mg_worker_write then
         * reports UV_ECANCELED from the loop, as it promises. */
        mg_worker_write(mg_conn_worker(p->r->conn), (uv_stream_t *)&p->uc->tcp,
                        &wr->wr, bufs, 0, on_up_write);
    if (p->uc->tcp.write_queue_size > 0)
        up_timer(p, p->route->timeouts.send_ms);
}

/*
 * Connected: a request without a body goes out at once. With a body, the
 * head waits for the first body bytes the client's framing has vouched for
 * (mg_proxy_flush): a request whose chunked framing turns out to be bad is
 * refused before the upstream has seen any of it.
 */
static void on_ready(mg_proxy_t *p)
{
    up_read_start(p);
    if (p->r->body_complete) {
        up_write_t *wr = mg_calloc(1, sizeof(*wr));
        uv_buf_t b[2] = {p->head, uv_buf_init(p->body, (unsigned)p->body_len)};
        p->head_sent = 1;
        up_write(p, wr, b, p->buffered && p->body_len ? 2 : 1);
    } else {
        mg_conn_body_open(p->r);
    }
}

static void on_connect(mg_upconn_t *uc, int status)
{
    mg_proxy_t *p = uc->owner;
    if (p->dead)
        return;
    if (status < 0) {
        p->uc = NULL; /* upstream.c is closing it */
        uc->owner = NULL;
        mg_upstream_try_end(p->upstream, &p->try_, MG_TRY_CONNECT, 0,
                            mg_monotonic_ms());
        if (may_retry(p, MG_TRY_CONNECT, 0)) {
            next_try(p);
            return;
        }
        fail(p, status == MG_ETIMEOUT ? 504 : 502,
             status == MG_ETIMEOUT ? "connect timeout" : mg_strerror(status));
        return;
    }
    p->connected = 1;
    on_ready(p);
}

void mg_proxy_on_body(mg_req_t *r, const char *data, size_t n)
{
    mg_proxy_t *p = r->proxy;
    if (!p || p->resp_complete || n == 0)
        return;
    if (p->buffering) {
        /* Bounded by the route's max_body, which http1 enforces. */
        if (p->body_len + n > p->body_cap) {
            p->body_cap = (p->body_len + n) * 2;
            p->body = mg_realloc(p->body, p->body_cap);
        }
        memcpy(p->body + p->body_len, data, n);
        p->body_len += n;
        return;
    }
    if (p->npending == p->cpending) {
        p->cpending = p->cpending ? p->cpending * 2 : 8;
        p->pending =
            mg_realloc(p->pending, (p->cpending + 4) * sizeof(uv_buf_t));
    }
    /* Slot 0..1 are kept free for the head and the chunk-size line. */
    p->pending[2 + p->npending++] = uv_buf_init((char *)data, (unsigned)n);
    p->pending_bytes += n;
}

void mg_proxy_on_body_end(mg_req_t *r)
{
    mg_proxy_t *p = r->proxy;
    if (!p)
        return;
    p->body_end = 1;
    if (p->buffering) {
        /* gw.request.get_body's wait is over: the body goes upstream, if
         * it does, with a Content-Length. */
        p->buffering = 0;
        p->buffered = 1;
        r->chunked = 0;
        r->content_length = (int64_t)p->body_len;
        mg_lua_task_t *t = p->body_waiter;
        p->body_waiter = NULL;
        if (!p->reading_now) {
            mg_lua_task_prepare_wake(t);
            mg_lua_task_wake(t, 0);
        }
    }
}

/* gw.request.get_body: 0 when the body is at hand, MG_AGAIN when the task
 * must wait for it (woken by mg_proxy_on_body_end), -1 outside the phases
 * that may read it. */
int mg_ffi_req_read_body(mg_lua_task_t *t, mg_req_t *r)
{
    mg_proxy_t *p = r->proxy;
    if (!p || !r->req_mutable || p->connected || p->buffering)
        return -1;
    if (p->buffered || r->body_complete) {
        p->buffered = 1;
        return 0;
    }
    p->buffering = 1;
    p->body_waiter = t;
    p->reading_now = 1;
    mg_conn_body_open(r); /* may read all of it at once */
    p->reading_now = 0;
    if (r->proxy != p)
        return -1; /* refused (413) meanwhile */
    return p->buffered ? 0 : MG_AGAIN;
}

void mg_ffi_req_body(mg_req_t *r, mg_str_t *out)
{
    mg_proxy_t *p = r->proxy;
    *out = p && p->buffered ? (mg_str_t){p->body ? p->body : "", p->body_len}
                            : MG_NULL_STR;
}

/* gw.request.set_body: replaces the body sent upstream (after get_body). */
int mg_ffi_req_set_body(mg_req_t *r, const char *s, size_t len)
{
    mg_proxy_t *p = r->proxy;
    if (!p || !r->req_mutable || !p->buffered)
        return -1;
    p->body = mg_realloc(p->body, len + 1);
    memcpy(p->body, s, len);
    p->body_len = p->body_cap = len;
    r->content_length = (int64_t)len;
    return 0;
}

void mg_proxy_flush(mg_req_t *r)
{
    mg_proxy_t *p = r->proxy;
    if (!p || p->dead || !p->connected || p->resp_complete || p->buffering)
        return;
    int need_end = r->chunked && p->body_end && !p->end_sent;
    if (p->npending == 0 && !need_end)
        return;
    up_write_t *wr = mg_calloc(1, sizeof(*wr));
    uv_buf_t *b = p->pending;
    if (!b) /* body_end with no piece ever: room for head + end */
        b = p->pending = mg_calloc(p->cpending = 4, sizeof(uv_buf_t) * 2);
    unsigned first = 2, n = p->npending;
    wr->body = n > 0;
    if (r->chunked && n > 0) {
        int len = snprintf(wr->chunk_size, sizeof(wr->chunk_size), "%zx\r\n",
                           p->pending_bytes);
        b[--first] = uv_buf_init(wr->chunk_size, (unsigned)len);
        n++;
        b[first + n++] = uv_buf_init("\r\n", 2);
    }
    if (need_end) {
        b[first + n++] = uv_buf_init("0\r\n\r\n", 5);
        p->end_sent = 1;
    }
    if (!p->head_sent) {
        b[--first] = p->head;
        n++;
        p->head_sent = 1;
    }
    up_write(p, wr, b + first, n);
    p->npending = 0;
    p->pending_bytes = 0;
}

/* ------------------------------------------------------------------ */
/* Response: parse the upstream, stream to the client                 */

/*
 * The upstream wait (send, then read) is a lazily moved deadline on the
 * connection's timer (deadline.h): re-arming per read or write would cost
 * a timer-heap operation each.
 */
static void on_up_timeout(uv_timer_t *t)
{
    mg_upconn_t *uc = t->data;
    mg_proxy_t *p = uc->owner;
    if (!p || p->dead || !p->r)
        return;
    if (!mg_deadline_fired(&p->deadline, t, on_up_timeout))
        return;
    mg_upstream_try_end(p->upstream, &p->try_, MG_TRY_TIMEOUT, 0,
                        mg_monotonic_ms());
    if (!p->r->response_started && may_retry(p, MG_TRY_TIMEOUT, 504))
        next_try(p);
    else
        fail(p, 504, "read timeout");
}

static void up_timer(mg_proxy_t *p, uint64_t ms)
{
    if (!p->uc)
        return; /* between tries: the next connect sets its own */
    /* retries.try_timeout caps each wait; retries.total_timeout caps the
     * wait for the response head across all tries. */
    const mg_retry_conf_t *rc = &p->upstream->conf->retries;
    if (rc->try_timeout_ms && ms > rc->try_timeout_ms)
        ms = rc->try_timeout_ms;
    if (rc->total_timeout_ms && !p->status) {
        uint64_t spent = mg_monotonic_ms() - p->first_try_ms;
        uint64_t left =
            spent < rc->total_timeout_ms ? rc->total_timeout_ms - spent : 1;
        ms = ms < left ? ms : left;
    }
    mg_deadline_set(&p->deadline, &p->uc->timer, on_up_timeout, ms);
}

static void up_timer_stop(mg_proxy_t *p)
{
    mg_deadline_clear(&p->deadline);
}

static void on_client_write(void *arg, int status)
{
    mg_proxy_t *p = arg;
    p->client_writes--;
    if (p->dead || !p->r || status < 0)
        return;
    if (p->client_writes == 0) {
        if (p->resp_complete)
            finish(p);
        else
            up_read_start(p); /* the buffer is ours again */
    }
}

static void client_write(mg_proxy_t *p, const uv_buf_t *b, unsigned n)
{
    uv_buf_t all[4];
    if (p->client_head.len) {
        all[0] = p->client_head;
        if (n)
            memcpy(all + 1, b, n * sizeof(*b));
        p->client_head.len = 0;
        b = all;
        n++;
    }
    p->client_writes++;
    mg_conn_write(p->r->conn, b, n, on_client_write, p);
}

static void flush_client_head(mg_proxy_t *p)
{
    if (p->client_head.len)
        client_write(p, NULL, 0);
}

static mg_proxy_t *proxy_of(llhttp_t *parser)
{
    return parser->data;
}

static void extend(mg_proxy_t *p, span_t *s, const char *at, size_t n)
{
    if (s->len == 0)
        s->off = (uint32_t)(at - p->uc->rbuf);
    s->len += (uint32_t)n;
}

static int up_on_message_begin(llhttp_t *parser)
{
    mg_proxy_t *p = proxy_of(parser);
    p->nfields = 0;
    p->in_field = 0;
    p->reason = (span_t){0, 0};
    return 0;
}

static int up_on_status(llhttp_t *parser, const char *at, size_t n)
{
    mg_proxy_t *p = proxy_of(parser);
    extend(p, &p->reason, at, n);
    return 0;
}

static int up_on_header_field(llhttp_t *parser, const char *at, size_t n)
{
    mg_proxy_t *p = proxy_of(parser);
    if (!p->in_field) {
        if (p->nfields == UP_MAX_FIELDS)
            return HPE_USER;
        memset(p->fields[p->nfields++], 0, sizeof(p->fields[0]));
        p->in_field = 1;
    }
    extend(p, &p->fields[p->nfields - 1][0], at, n);
    return 0;
}

static int up_on_header_value(llhttp_t *parser, const char *at, size_t n)
{
    mg_proxy_t *p = proxy_of(parser);
    p->in_field = 0;
    extend(p, &p->fields[p->nfields - 1][1], at, n);
    return 0;
}

static int up_on_header_value_complete(llhttp_t *parser)
{
    proxy_of(parser)->in_field = 0;
    return 0;
}

static mg_str_t field(mg_proxy_t *p, unsigned i, int v)
{
    span_t s = p->fields[i][v];
    mg_str_t out = {p->uc->rbuf + s.off, s.len};
    while (out.len && (out.p[out.len - 1] == ' ' || out.p[out.len - 1] == '\t'))
        out.len--;
    return out;
}

static int field_listed_in_connection(mg_proxy_t *p, mg_str_t name)
{
    if (!p->conn_fields)
        return 0; /* the common case: no Connection header to look through */
    for (unsigned i = 0; i < p->nfields; i++)
        if (mg_str_caseeq(field(p, i, 0), MG_STR("connection"))
            && token_listed(field(p, i, 1), name))
            return 1;
    return 0;
}

/* Whether an upstream response header goes on to the client. */
static int forwarded(mg_proxy_t *p, mg_str_t name)
{
    return !is_hop_by_hop(name) && !field_listed_in_connection(p, name)
           && !mg_str_caseeq(name, MG_STR("x-request-id"));
}

/*
 * Runs header_filter on the response head: the forwarded headers become
 * r->resp_headers, which plugins edit. Returns 0, or -1 if a plugin
 * failed (the client then gets a 500: nothing has been sent yet).
 */
static int filter_head(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    r->resp_headers =
        mg_arena_alloc(r->arena, (p->nfields + 1) * sizeof(mg_header_t));
    r->resp_headers_cap = p->nfields + 1;
    r->nresp_headers = 0;
    for (unsigned i = 0; i < p->nfields; i++) {
        mg_str_t name = field(p, i, 0);
        /* Content-Length is framing, but plugins may read it, and clear
         * it when their body_filter changes the length. */
        if (forwarded(p, name) || mg_str_caseeq(name, MG_STR("content-length")))
            r->resp_headers[r->nresp_headers++] =
                (mg_header_t){name, field(p, i, 1)};
    }
    r->resp_mutable = 1;
    int what = mg_lua_task_phase(p->task, "header_filter");
    r->resp_mutable = 0;
    return what == MG_LUA_ERROR ? -1 : 0;
}

/* Whether header_filter left header `name` in the response. */
static int header_kept(const mg_req_t *r, mg_str_t name)
{
    for (size_t i = 0; i < r->nresp_headers; i++)
        if (mg_str_caseeq(r->resp_headers[i].name, name))
            return 1;
    return 0;
}

/* Writes the client's response head. Returns llhttp's "skip body" hint. */
static int up_on_headers_complete(llhttp_t *parser)
{
    mg_proxy_t *p = proxy_of(parser);
    mg_req_t *r = p->r;
    int status = parser->status_code;
    if (status >= 100 && status < 200) {
        if (status == 101)
            return -1;  /* upgrades are not supported yet: 502 */
        p->interim = 1; /* 100/103: dropped, the final response follows */
        /* A 1xx ends at its head (RFC 9110 15.2): "skip body", or llhttp
         * would pass the bytes after a 1xx with a Content-Length to
         * up_on_body, raw to the client before any head. */
        return 1;
    }
    p->interim = 0;
    mg_upstream_try_end(p->upstream, &p->try_, MG_TRY_OK, status,
                        mg_monotonic_ms());
    if (may_retry(p, MG_TRY_OK, status)) {
        p->retry_status = 1; /* parse_response starts the next try */
        return -1;
    }
    p->status = status;
    r->resp_status = status;
    p->conn_fields = 0;
    for (unsigned i = 0; i < p->nfields; i++)
        if (mg_str_caseeq(field(p, i, 0), MG_STR("connection")))
            p->conn_fields = 1;
    int filtered = p->task && (p->mask & MG_LUA_HEADER_FILTER);
    if (filtered && filter_head(p) < 0) {
        p->plugin_failed = p->lua_failed = 1;
        return -1;
    }
    int head = r->method == HTTP_HEAD;
    int no_body = head || status == 204 || status == 304;
    p->filter_body = p->task && (p->mask & MG_LUA_BODY_FILTER) && !no_body;
    mg_str_t length = MG_NULL_STR, reason = MG_NULL_STR;
    size_t cap = 256 + r->request_id.len + p->reason.len;
    for (unsigned i = 0; i < p->nfields; i++)
        cap += p->fields[i][0].len + p->fields[i][1].len + 4;
    for (size_t i = 0; filtered && i < r->nresp_headers; i++)
        cap += r->resp_headers[i].name.len + r->resp_headers[i].value.len + 4;
    char *out = mg_arena_alloc(r->arena, cap), *w = out;
    if (r->resp_status == status)
        reason = (mg_str_t){p->uc->rbuf + p->reason.off, p->reason.len};
    w += sprintf(w, "HTTP/1.%d %d ", r->http_minor ? 1 : 0, r->resp_status);
    append_str(&w, reason.len
                       ? reason
                       : mg_str_from_cstr(mg_http_reason(r->resp_status)));
    APPEND_LIT(&w, "\r\n");
    for (unsigned i = 0; i < p->nfields; i++) {
        mg_str_t name = field(p, i, 0), value = field(p, i, 1);
        if (mg_str_caseeq(name, MG_STR("content-length")))
            length = value;
        if (filtered || !forwarded(p, name))
            continue;
        append_str(&w, name);
        APPEND_LIT(&w, ": ");
        append_str(&w, value);
        APPEND_LIT(&w, "\r\n");
    }
    for (size_t i = 0; filtered && i < r->nresp_headers; i++) {
        /* Framing stays the gateway's, whatever a plugin set. */
        if (is_hop_by_hop(r->resp_headers[i].name)
            || mg_str_caseeq(r->resp_headers[i].name, MG_STR("x-request-id")))
            continue;
        append_str(&w, r->resp_headers[i].name);
        APPEND_LIT(&w, ": ");
        append_str(&w, r->resp_headers[i].value);
        APPEND_LIT(&w, "\r\n");
    }
    APPEND_LIT(&w, "X-Request-Id: ");
    append_str(&w, r->request_id);
    APPEND_LIT(&w, "\r\n");
    int has_length = (parser->flags & F_CONTENT_LENGTH) != 0;
    if (filtered && !header_kept(r, MG_STR("content-length")))
        length = MG_NULL_STR; /* a plugin cleared it: the body changes */
    p->declared_len = -1;
    if (length.len && (has_length || head)) {
        p->declared_len = has_length ? (int64_t)parser->content_length : -1;
        APPEND_LIT(&w, "Content-Length: ");
        append_str(&w, length);
        APPEND_LIT(&w, "\r\n");
    } else if (!no_body && !r->h2) {
        /* (HTTP/2 frames the body itself: DATA until END_STREAM.) */
        if (r->http_minor == 1) {
            p->chunk_client = 1;
            APPEND_LIT(&w, "Transfer-Encoding: chunked\r\n");
        } else {
            mg_conn_set_close(r->conn); /* HTTP/1.0: the end is the close */
        }
    }
    /* (Never for HTTP/2: should_close is 0 and http_minor 1.) */
    if (mg_conn_should_close(r))
        APPEND_LIT(&w, "Connection: close\r\n");
    else if (r->http_minor == 0)
        APPEND_LIT(&w, "Connection: keep-alive\r\n");
    APPEND_LIT(&w, "\r\n");
    r->response_started = 1;
    p->client_head = uv_buf_init(out, (unsigned)(w - out));
    return head ? 1 : 0;
}

/* Appends body_filter's output to fout (copied: it lives on the Lua
 * stack). Returns 0, or -1 when a plugin failed. */
static int filter_piece(mg_proxy_t *p, const char *at, size_t n, int eof)
{
    mg_str_t out;
    if (mg_lua_task_body_filter(p->task, at, n, eof, &out) != MG_LUA_NEXT) {
        p->plugin_failed = p->lua_failed = p->body_plugin_failed = 1;
        return -1;
    }
    if (p->fout_len + out.len > p->fout_cap) {
        size_t cap = p->fout_cap ? p->fout_cap : UP_READ_CHUNK;
        while (cap < p->fout_len + out.len)
            cap *= 2;
        p->fout = mg_realloc(p->fout, cap);
        p->fout_cap = cap;
    }
    if (out.len)
        memcpy(p->fout + p->fout_len, out.p, out.len);
    p->fout_len += out.len;
    p->fout_total += out.len;
    return 0;
}

/* Writes what the filters made of this parse pass, and the end of a
 * chunked body with it when `last`. */
static void write_filtered(mg_proxy_t *p, int last)
{
    uv_buf_t b[3];
    unsigned n = 0;
    char *size = NULL;
    if (p->fout_len && p->chunk_client) {
        size = mg_arena_alloc(p->r->arena, 24);
        int len = snprintf(size, 24, "%zx\r\n", p->fout_len);
        b[n++] = uv_buf_init(size, (unsigned)len);
    }
    if (p->fout_len)
        b[n++] = uv_buf_init(p->fout, (unsigned)p->fout_len);
    if (p->chunk_client && (p->fout_len || last))
        b[n++] = p->fout_len && last ? uv_buf_init("\r\n0\r\n\r\n", 7)
                 : p->fout_len       ? uv_buf_init("\r\n", 2)
                                     : uv_buf_init("0\r\n\r\n", 5);
    p->fout_len = 0; /* the bytes stay put until the write is done:
                        reading is paused until then */
    if (last && p->declared_len >= 0
        && p->fout_total != (uint64_t)p->declared_len) {
        /* The client was promised another length: this response cannot
         * be framed right any more, the connection ends with it. */
        mg_log_error("%.*s %.*s: route %s: body_filter changed the body's "
                     "length but Content-Length was kept (clear it in "
                     "header_filter)",
                     (int)p->r->method_name.len, p->r->method_name.p,
                     (int)p->r->target.len, p->r->target.p, p->route->name);
        mg_conn_set_close(p->r->conn);
    }
    if (n)
        client_write(p, b, n);
    else
        flush_client_head(p);
}

static int up_on_body(llhttp_t *parser, const char *at, size_t n)
{
    mg_proxy_t *p = proxy_of(parser);
    if (p->filter_body)
        return filter_piece(p, at, n, 0) < 0 ? HPE_USER : 0;
    if (p->chunk_client) {
        char *size = mg_arena_alloc(p->r->arena, 24);
        int len = snprintf(size, 24, "%zx\r\n", n);
        uv_buf_t b[3] = {uv_buf_init(size, (unsigned)len),
                         uv_buf_init((char *)at, (unsigned)n),
                         uv_buf_init("\r\n", 2)};
        client_write(p, b, 3);
    } else {
        uv_buf_t b = uv_buf_init((char *)at, (unsigned)n);
        client_write(p, &b, 1);
    }
    return 0;
}

static int up_on_message_complete(llhttp_t *parser)
{
    mg_proxy_t *p = proxy_of(parser);
    if (p->interim)
        return 0;
    p->resp_complete = 1;
    p->up_keepalive = llhttp_should_keep_alive(parser) ? 1 : 0;
    if (p->filter_body) {
        if (filter_piece(p, "", 0, 1) < 0)
            return HPE_USER;
        write_filtered(p, 1);
    } else if (p->chunk_client) {
        uv_buf_t b = uv_buf_init("0\r\n\r\n", 5);
        client_write(p, &b, 1); /* with the head, if still pending */
    } else {
        flush_client_head(p);
    }
    return HPE_PAUSED;
}

/*
 * The response is complete and every write borrowing the upstream buffer
 * is done: the upstream connection goes back to the pool when it is clean,
 * and the client connection is told the response is over.
 */
static void finish(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    mg_upconn_t *uc = p->uc;
    int reusable = p->up_keepalive && p->body_end && p->up_writes == 0
                   && p->pos == uc->rlen;
    r->upstream_ns = uv_hrtime() - p->up_start_ns;
    run_log_phase(p);
    r->proxy = NULL;
    p->upstream->inflight--;
    p->counted = 0;
    /* No timer stop: the pool re-arms it for the idle timeout, or the
     * close stops it. */
    if (reusable) {
        const mg_upstream_conf_t *uconf = p->upstream->conf;
        mg_upconn_release(uc, uconf->keepalive_max_idle,
                          uconf->keepalive_idle_ms);
        free_proxy(p);
    } else {
        p->dead = 1;
        p->r = NULL;
        mg_upconn_close(uc);
    }
    mg_conn_response_done(r);
}

static void on_up_data(mg_upconn_t *uc, ssize_t nread);

/* Attaches the proxy to a connection it got from mg_upconn_get. */
static void attach(mg_proxy_t *p, mg_upconn_t *uc)
{
    p->uc = uc;
    p->pos = 0;
    /* Whatever the pool set the timer for, the first deadline replaces. */
    mg_deadline_forget_timer(&p->deadline);
    uc->on_close = on_uc_closed;
    uc->on_read = on_up_data;
    uc->rmax = UP_MAX_HEAD; /* the response head may grow the buffer */
}

/* Retries once on a fresh connection: a pooled connection the upstream
 * closed before answering an idempotent request without a body. */
static int retry(mg_proxy_t *p)
{
    mg_req_t *r = p->r;
    if (p->retried || !p->uc->reused || p->resp_bytes || !idempotent(r->method)
        || r->chunked || r->content_length > 0)
        return 0;
    p->retried = 1;
    p->tries++; /* counts against retries.count like any other try */
    mg_upconn_t *old = p->uc;
    old->owner = NULL;
    old->on_close = NULL;
    mg_upconn_close(old);
    p->uc = NULL;
    p->head_sent = p->connected = 0;
    mg_upconn_t *uc;
    int rc = mg_upconn_get(p->target, p, p->route->timeouts.connect_ms,
                           on_connect, &uc);
    if (rc == 0 || rc == MG_AGAIN) {
        attach(p, uc);
        if (rc == 0)
            on_connect(uc, 0);
        return 1;
    }
    fail(p, 502, mg_strerror(rc));
    return 1;
}

/* Parses what the upstream sent; bytes stay in place while the client's
 * writes borrow them. */
static void parse_response(mg_proxy_t *p)
{
    mg_upconn_t *uc = p->uc;
    llhttp_errno_t err =
        llhttp_execute(&p->parser, uc->rbuf + p->pos, uc->rlen - p->pos);
    if (p->dead)
        return;
    if (err == HPE_OK) {
        p->pos = uc->rlen;
    } else if (err == HPE_PAUSED) {
        p->pos = (size_t)(llhttp_get_error_pos(&p->parser) - uc->rbuf);
    } else if (p->retry_status) {
        next_try(p);
        return;
    } else {
        if (!p->plugin_failed)
            mg_upstream_try_end(p->upstream, &p->try_, MG_TRY_ERROR, 0,
                                mg_monotonic_ms());
        fail(p, p->plugin_failed ? 500 : 502,
             !p->plugin_failed       ? "invalid response"
             : p->body_plugin_failed ? "body_filter failed"
                                     : "header_filter failed");
        return;
    }
    if (p->status)
        uc->rmax = uc->rcap; /* head done: borrowed bytes must not move */
    /* With a body filter the head waits for the first filtered bytes, so
     * that a filter failing on the first piece still gets a 500 out. */
    if (p->filter_body && !p->resp_complete && p->fout_len)
        write_filtered(p, 0);
    else if (!p->filter_body)
        flush_client_head(p);
    if (p->resp_complete) {
        if (p->client_writes == 0)
            finish(p);
        return;
    }
    if (p->client_writes == 0 && p->pos == uc->rlen && p->status) {
        uc->rlen = p->pos = 0; /* all passed on: reuse the buffer */
    } else if (p->filter_body && p->client_writes) {
        /* fout is the client's until its write is done. */
        mg_upconn_read_pause(uc);
        up_timer_stop(p);
    } else if (uc->rlen == uc->rcap) {
        if (!p->status) {
            fail(p, 502, "response head too large");
            return;
        }
        /* Full of bytes the client has yet to take: wait for it. */
        mg_upconn_read_pause(uc);
        up_timer_stop(p);
    }
}

static void on_up_data(mg_upconn_t *uc, ssize_t nread)
{
    mg_proxy_t *p = uc->owner;
    if (!p || p->dead)
        return;
    if (nread < 0) {
        /* A close-delimited body ends here; llhttp_finish reports the
         * message complete (HPE_PAUSED: our callback paused it). */
        llhttp_errno_t fin = nread == UV_EOF && p->resp_bytes
                                 ? llhttp_finish(&p->parser)
                                 : HPE_USER;
        if ((fin == HPE_OK || fin == HPE_PAUSED) && p->resp_complete) {
            p->up_keepalive = 0;
            if (p->client_writes == 0)
                finish(p);
            return;
        }
        if (p->resp_bytes && p->r->response_started) {
            fail(p, 502, "upstream closed mid-response");
            return;
        }
        if (retry(p))
            return; /* a stale pooled connection: same target, anew */
        mg_upstream_try_end(p->upstream, &p->try_, MG_TRY_ERROR, 0,
                            mg_monotonic_ms());
        if (!p->r->response_started && may_retry(p, MG_TRY_ERROR, 502)) {
            next_try(p);
            return;
        }
        fail(p, 502,
             nread == UV_EOF ? "connection closed" : uv_strerror((int)nread));
        return;
    }
    p->resp_bytes = 1;
    if (!p->head_sent)
        return; /* nothing asked yet: dropped with the connection later */
    up_timer(p, p->route->timeouts.read_ms);
    parse_response(p);
}

/* Starts (or, after the client caught up, resumes) taking the response. */
static void up_read_start(mg_proxy_t *p)
{
    if (p->dead)
        return;
    if (!p->parser.data) {
        if (!up_settings.on_headers_complete) {
            llhttp_settings_init(&up_settings);
            up_settings.on_message_begin = up_on_message_begin;
            up_settings.on_status = up_on_status;
            up_settings.on_header_field = up_on_header_field;
            up_settings.on_header_value = up_on_header_value;
            up_settings.on_header_value_complete = up_on_header_value_complete;
            up_settings.on_headers_complete = up_on_headers_complete;
            up_settings.on_body = up_on_body;
            up_settings.on_message_complete = up_on_message_complete;
        }
        llhttp_init(&p->parser, HTTP_RESPONSE, &up_settings);
        p->parser.data = p;
    }
    mg_upconn_t *uc = p->uc;
    if (p->pos < uc->rlen) {
        parse_response(p); /* read while the client was busy */
        if (p->dead || p->resp_complete || p->client_writes)
            return;
    } else if (p->status) {
        uc->rlen = p->pos = 0;
    }
    up_timer(p, p->route->timeouts.read_ms);
    mg_upconn_read_resume(uc);
}
