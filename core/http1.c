/*
 * The HTTP/1.x server side of a client connection: reading, strict parsing
 * with llhttp, the limits and timeouts of SECURITY.md, keep-alive and
 * pipelining, and writing what the pipeline produces. It knows nothing of
 * routes or upstreams: a request whose head is valid goes to mg_proxy_start
 * and its body, de-chunked, to mg_proxy_on_body.
 *
 * Buffering. Each connection has one read buffer. While a request head is
 * being read the buffer only grows (up to the head limits), so llhttp's
 * spans can be kept as offsets and stay contiguous across reads. Once the
 * head is complete, header strings are copied into the request arena and
 * body bytes are passed on in place; the pipeline takes a hold while it
 * writes them upstream, and no further bytes are read or parsed until every
 * hold is released. Pipelined requests wait in the buffer until the current
 * response has been written.
 *
 * TLS. A connection on a TLS listener has c->tls: its socket reads go into
 * the TLS session (on_tls_read), and advance() decrypts into the same read
 * buffer (tls_pump) before parsing, so the parser, limits and holds work
 * unchanged; writes are encrypted into one buffer that travels with the
 * write request. Plain connections only pay the NULL checks. The handshake
 * runs under the header timeout of the idle state.
 *
 * HTTP/2. A connection whose ALPN chose h2, or a plain one that opens with
 * the h2c preface, enters C_H2 and hands every plaintext byte to http2.c;
 * the socket, TLS, timer and write path stay here. The mg_conn_* calls the
 * pipeline makes on an HTTP/2 stream (r->conn is then a stream, see the
 * kind byte in http.h) go to http2.c after one branch.
 *
 * This file is longer than most: it is one state machine, kept in one place
 * so the order of events is readable top to bottom.
 */
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>

#include "accesslog.h"
#include "deadline.h"
#include "generation.h"
#include "http.h"
#include "http2.h"
#include "log.h"
#include "metrics.h"
#include "tls.h"
#include "worker.h"

#define READ_CHUNK 16384
#define LINGER_MS 2000 /* read-and-discard before closing */
#define DRAIN_GRACE_MS                                                         \
    1000 /* an idle connection's last chance to send                           \
            a request once its worker drains */

enum conn_state {
    C_IDLE,   /* between requests */
    C_HEAD,   /* reading a request head */
    C_GATED,  /* head done, body not yet wanted by the pipeline */
    C_BODY,   /* passing the body on */
    C_DONE,   /* request fully read, response in progress */
    C_LINGER, /* final response sent, discarding input before close */
    C_TUNNEL, /* switched protocols: raw bytes to the pipeline */
    C_H2,     /* an HTTP/2 session (http2.c) reads the bytes */
};

typedef struct {
    uint32_t off, len;
} span_t;

typedef struct {
    span_t name, value;
} hspan_t;

typedef struct {
    mg_wreq_t wr;
    mg_conn_t *conn;
    mg_write_cb cb;
    void *arg;
    uint64_t serial; /* request the write belongs to */
    int h2;          /* an HTTP/2 session's write: its callback always runs */
} wreq_t;

struct mg_conn_s {
    uint8_t kind; /* MG_CONN_H1: first, see http.h */
    uv_tcp_t tcp; /* tcp.data == this */
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    mg_worker_t *w;
    mg_conn_t *prev, *next; /* worker's connection list */
    llhttp_t parser;
    char *buf;
    size_t cap, len, pos; /* allocated, filled, parsed */
    enum conn_state state;
    unsigned holds;
    unsigned writes; /* writes queued, not completed */
    size_t write_bytes;
    uint64_t serial;          /* increments per request */
    unsigned active : 1;      /* a request is in progress */
    unsigned resp_done : 1;   /* pipeline queued its last write */
    unsigned close_after : 1; /* close once the response is written */
    unsigned closing : 1;
    unsigned reading : 1;
    unsigned eof : 1;        /* the client will send nothing more */
    unsigned send_timer : 1; /* the deadline is the send timeout */
    mg_deadline_t deadline;  /* the current wait (deadline.h) */
    unsigned parsing : 1;
    unsigned stop_parse : 1; /* a callback ended the request */
    unsigned saw_http : 1;   /* request line had " HTTP/1.x" */
    unsigned in_field : 1;   /* header-span state */
    unsigned error_status;   /* set by callbacks for limit errors */
    const char *error_reason;
    hspan_t *hspans;
    unsigned nhspans, max_hspans;
    uint32_t fields_off; /* where the header fields begin */
    span_t url;
    mg_arena_t arena;
    mg_req_t req;
    char peer[46];
    mg_tls_conn_t *tls;        /* NULL: plain HTTP */
    mg_conn_data_cb tunnel_cb; /* C_TUNNEL: where the client's bytes go */
    void *tunnel_arg;
    unsigned tunnel_eof_told : 1;
    unsigned shut : 1;      /* mg_conn_shutdown done */
    mg_h2_t *h2;            /* in C_H2 */
    unsigned h2_ok : 1;     /* HTTP/2 not yet ruled out for this connection */
    unsigned h2_finish : 1; /* the session is over: close once written */
};

static llhttp_settings_t settings;

static void advance(mg_conn_t *c);
static void conn_close(mg_conn_t *c);
static void tls_queue(mg_conn_t *c, wreq_t *q, size_t n);
static size_t tls_encrypt(mg_conn_t *c, const uv_buf_t *bufs, unsigned n);
static void finish_request(mg_conn_t *c);
static void linger_close(mg_conn_t *c);

/*
 * A request object for an error found before a request head was complete
 * (malformed head, head timeout), so the answer goes through the one
 * error path.
 */
static mg_req_t *bare_request(mg_conn_t *c)
{
    c->serial++;
    memset(&c->req, 0, sizeof(c->req));
    c->req.conn = c;
    c->req.arena = &c->arena;
    c->req.http_minor = 1;
    c->active = 1;
    c->resp_done = 0;
    return &c->req;
}

static const mg_limits_t *limits(mg_conn_t *c)
{
    return &mg_worker_gen(c->w)->cfg->limits;
}

/* ------------------------------------------------------------------ */
/* Timers                                                             */

/*
 * One deadline per connection (deadline.h): header, body, send and
 * keep-alive waits follow each other without timer-heap work per request.
 */
static void on_timeout(mg_conn_t *c)
{
    switch (c->state) {
    case C_IDLE: conn_close(c); break;
    case C_HEAD:
    case C_BODY:
    case C_GATED:
        if (c->writes == 0 && !(c->active && c->req.response_started)) {
            mg_req_t *r = c->active ? &c->req : bare_request(c);
            mg_conn_respond_error(r, 408, "request timeout", 1);
            c->state = C_DONE;
            advance(c);
        } else {
            conn_close(c);
        }
        break;
    case C_DONE:
        conn_close(c); /* the client stopped reading the response */
        break;
    case C_LINGER: conn_close(c); break;
    case C_TUNNEL: conn_close(c); break; /* a client that reads nothing */
    case C_H2:
        if (c->send_timer)
            conn_close(c); /* the client stopped reading */
        else
            mg_h2_timeout(c->h2);
        break;
    }
}

static void on_timer(uv_timer_t *t)
{
    mg_conn_t *c = t->data;
    if (mg_deadline_fired(&c->deadline, t, on_timer))
        on_timeout(c);
}

static void arm_timer(mg_conn_t *c, uint64_t ms)
{
    c->send_timer = 0;
    mg_deadline_set(&c->deadline, &c->timer, on_timer, ms);
}

static void stop_timer(mg_conn_t *c)
{
    mg_deadline_clear(&c->deadline);
}

/* ------------------------------------------------------------------ */
/* Writing                                                            */

static void on_write(mg_wreq_t *wr, int status)
{
    wreq_t *q = (wreq_t *)wr;
    mg_conn_t *c = q->conn;
    c->writes--;
    int current = (c->active && q->serial == c->serial) || q->h2;
    if (q->cb && current)
        q->cb(q->arg, status);
    free(q);
    if (status < 0) {
        if (!c->closing)
            conn_close(c);
        return;
    }
    if (c->closing)
        return;
    if (c->writes == 0) {
        c->write_bytes = 0;
        if (c->send_timer) {
            c->send_timer = 0;
            stop_timer(c);
            if (c->state == C_H2)
                mg_h2_rearm(c->h2);
        }
        if (c->active && c->resp_done)
            finish_request(c);
        else if (c->h2_finish && c->state == C_H2)
            linger_close(c);
    } else if (c->send_timer) {
        arm_timer(c, limits(c)->send_timeout_ms); /* progress: a fresh wait */
        c->send_timer = 1;
    }
}

void mg_conn_write(mg_conn_t *c, const uv_buf_t *bufs, unsigned n,
                   mg_write_cb cb, void *arg)
{
    if (mg_conn_kind(c) != MG_CONN_H1) {
        mg_h2_write(c, bufs, n, cb, arg);
        return;
    }
    if (c->closing) {
        /* Keep the promise of exactly one callback. */
        if (cb)
            cb(arg, UV_ECANCELED);
        return;
    }
    /* Over TLS the ciphertext travels in the same allocation. */
    size_t ct = 0;
    if (c->tls && (ct = tls_encrypt(c, bufs, n)) == SIZE_MAX) {
        if (cb)
            cb(arg, UV_EPROTO);
        conn_close(c);
        return;
    }
    wreq_t *q = mg_malloc(sizeof(*q) + ct);
    q->conn = c;
    q->cb = cb;
    q->arg = arg;
    q->serial = c->serial;
    q->h2 = c->h2 != NULL;
    for (unsigned i = 0; i < n; i++)
        c->write_bytes += bufs[i].len;
    if (c->active)
        for (unsigned i = 0; i < n; i++)
            c->req.bytes_out += bufs[i].len;
    c->writes++;
    if (c->tls)
        tls_queue(c, q, ct);
    else
        mg_worker_write(c->w, (uv_stream_t *)&c->tcp, &q->wr, bufs, n,
                        on_write);
    if (c->tcp.write_queue_size > 0 && c->state != C_BODY) {
        arm_timer(c, limits(c)->send_timeout_ms);
        c->send_timer = 1;
    }
}

size_t mg_conn_write_queue_size(const mg_conn_t *c)
{
    if (mg_conn_kind(c) != MG_CONN_H1)
        return mg_h2_write_queue_size(c);
    return c->tcp.write_queue_size;
}

/* ------------------------------------------------------------------ */
/* Errors generated by the gateway itself                             */

const char *mg_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
    }
}

int mg_http_gateway_owned(mg_str_t name)
{
    static const mg_str_t owned[] = {
        {"content-length", 14}, {"transfer-encoding", 17},
        {"connection", 10},     {"keep-alive", 10},
        {"upgrade", 7},         {"te", 2},
        {"trailer", 7},         {"proxy-connection", 16},
        {"x-request-id", 12},
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(owned); i++)
        if (mg_str_caseeq(name, owned[i]))
            return 1;
    return 0;
}

char *mg_http_format_head(mg_req_t *r, int status, const mg_header_t *headers,
                          size_t n, size_t body_len, const char *connection,
                          size_t room, size_t *len)
{
    size_t cap = 160 + r->request_id.len + room;
    for (size_t i = 0; i < n; i++)
        cap += headers[i].name.len + headers[i].value.len + 4;
    char *out = mg_arena_alloc(r->arena, cap), *w = out;
    w += sprintf(w, "HTTP/1.%d %d %s\r\n", r->http_minor == 0 ? 0 : 1, status,
                 mg_http_reason(status));
    for (size_t i = 0; i < n; i++) {
        /* Framing and hop-by-hop headers are the gateway's: a plugin's
         * Content-Length could smuggle, its X-Request-Id would lie. */
        if (mg_http_gateway_owned(headers[i].name))
            continue;
        w += sprintf(w, "%.*s: %.*s\r\n", (int)headers[i].name.len,
                     headers[i].name.p, (int)headers[i].value.len,
                     headers[i].value.p);
    }
    if (r->request_id.len)
        w += sprintf(w, "X-Request-Id: %.*s\r\n", (int)r->request_id.len,
                     r->request_id.p);
    w += sprintf(w, "Content-Length: %zu\r\n%s\r\n", body_len, connection);
    *len = (size_t)(w - out);
    return out;
}

void mg_conn_respond(mg_req_t *r, int status, const mg_header_t *headers,
                     size_t n, mg_str_t body, int close)
{
    mg_conn_t *c = r->conn;
    if (mg_conn_kind(c) != MG_CONN_H1) {
        mg_h2_respond(r, status, headers, n, body);
        return;
    }
    if (c->closing || !c->active)
        return;
    if (r->response_started || c->resp_done) {
        conn_close(c);
        return;
    }
    if (close || !r->body_complete)
        c->close_after = 1;
    int keep = !mg_conn_should_close(r);
    int head = r->method == HTTP_HEAD && r->method_name.len;
    size_t len;
    char *out = mg_http_format_head(
        r, status, headers, n, body.len,
        keep ? (r->http_minor == 0 ? "Connection: keep-alive\r\n" : "")
             : "Connection: close\r\n",
        body.len, &len);
    char *w = out + len;
    if (!head && body.len) {
        memcpy(w, body.p, body.len);
        w += body.len;
    }
    r->response_started = 1;
    uv_buf_t b = uv_buf_init(out, (unsigned)(w - out));
    mg_conn_write(c, &b, 1, NULL, NULL);
    if (r->proxy) {
        mg_proxy_abort(r);
        r->proxy = NULL;
    }
    mg_conn_response_done(r);
}

void mg_conn_respond_error(mg_req_t *r, int status, const char *reason,
                           int close)
{
    static const mg_header_t json = {{"Content-Type", 12},
                                     {"application/json", 16}};
    char body[256];
    int n = snprintf(body, sizeof(body), "{\"error\":\"%s\"}\n", reason);
    if (n >= (int)sizeof(body))
        n = sizeof(body) - 1;
    r->resp_status = status;
    mg_conn_respond(r, status, &json, 1, (mg_str_t){body, (size_t)n}, close);
}

/* ------------------------------------------------------------------ */
/* Parser callbacks                                                   */

static mg_conn_t *conn_of(llhttp_t *p)
{
    return p->data;
}

static int fail(mg_conn_t *c, unsigned status, const char *reason)
{
    c->error_status = status;
    c->error_reason = reason;
    return HPE_USER;
}

static void extend(mg_conn_t *c, span_t *s, const char *at, size_t n)
{
    if (s->len == 0)
        s->off = (uint32_t)(at - c->buf);
    s->len += (uint32_t)n;
}

static int on_message_begin(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    c->state = C_HEAD;
    c->url = (span_t){0, 0};
    c->nhspans = 0;
    c->in_field = 0;
    c->saw_http = 0;
    c->max_hspans = limits(c)->max_header_fields;
    c->hspans =
        mg_arena_alloc(&c->arena, sizeof(hspan_t) * (c->max_hspans + 1));
    arm_timer(c, limits(c)->header_timeout_ms);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    mg_conn_t *c = conn_of(p);
    extend(c, &c->url, at, n);
    /* llhttp takes "GET /\r\n" as HTTP/0.9 and waits: refuse it as soon
     * as the byte after the target is known not to be a space. */
    if (at + n < c->buf + c->len && at[n] != ' ')
        return fail(c, 400, "bad request");
    if (c->url.len > limits(c)->max_uri)
        return fail(c, 414, "uri too long");
    return 0;
}

static int on_version(llhttp_t *p, const char *at, size_t n)
{
    mg_conn_t *c = conn_of(p);
    /* llhttp also accepts RTSP/ and ICE/ here: only HTTP/ will do. */
    if (at - c->buf >= 5 && memcmp(at - 5, "HTTP/", 5) == 0)
        c->saw_http = 1;
    return 0;
}

/* The header block (after the request line) has its own limit. */
static int header_bytes_ok(mg_conn_t *c, const char *end)
{
    return (size_t)(end - c->buf) - c->fields_off
           <= limits(c)->max_header_bytes;
}

static int on_url_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    /* llhttp takes "GET /\r\n" as an HTTP/0.9 request: refuse it. The
     * byte after the target has been consumed, so it is in the buffer. */
    size_t after = (size_t)c->url.off + c->url.len;
    if (c->url.len == 0 || after >= c->len || c->buf[after] != ' ')
        return fail(c, 400, "bad request");
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    mg_conn_t *c = conn_of(p);
    if (c->nhspans == 0 && !c->in_field)
        c->fields_off = (uint32_t)(at - c->buf);
    if (!header_bytes_ok(c, at + n))
        return fail(c, 431, "request header fields too large");
    if (!c->in_field) {
        if (c->nhspans == c->max_hspans)
            return fail(c, 431, "request header fields too large");
        c->hspans[c->nhspans++] = (hspan_t){{0, 0}, {0, 0}};
        c->in_field = 1;
    }
    extend(c, &c->hspans[c->nhspans - 1].name, at, n);
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    mg_conn_t *c = conn_of(p);
    c->in_field = 0;
    extend(c, &c->hspans[c->nhspans - 1].value, at, n);
    if (!header_bytes_ok(c, at + n))
        return fail(c, 431, "request header fields too large");
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    conn_of(p)->in_field = 0;
    return 0;
}

static mg_str_t span_str(mg_conn_t *c, span_t s)
{
    return (mg_str_t){c->buf + s.off, s.len};
}

static mg_str_t trim_ows(mg_str_t s)
{
    while (s.len && (s.p[0] == ' ' || s.p[0] == '\t')) {
        s.p++;
        s.len--;
    }
    while (s.len && (s.p[s.len - 1] == ' ' || s.p[s.len - 1] == '\t'))
        s.len--;
    return s;
}

static int is_identity_header(const mg_config_t *cfg, mg_str_t name)
{
    for (size_t i = 0; i < cfg->nidentity_headers; i++)
        if (mg_str_caseeq(name, mg_str_from_cstr(cfg->identity_headers[i])))
            return 1;
    return 0;
}

int mg_http_header_dropped(const mg_config_t *cfg, mg_str_t name)
{
    /* Identity headers belong to the gateway; '_' aliases '-'. */
    return memchr(name.p, '_', name.len) || is_identity_header(cfg, name);
}

int mg_http_method_allowed(unsigned m)
{
    switch (m) {
    case HTTP_GET:
    case HTTP_HEAD:
    case HTTP_POST:
    case HTTP_PUT:
    case HTTP_DELETE:
    case HTTP_OPTIONS:
    case HTTP_PATCH:
    case HTTP_TRACE:
    /* Cache purges (Varnish, nginx, Kong style): the cache plugin answers
     * them; on other routes they are proxied like any other method. */
    case HTTP_PURGE: return 1;
    default: return 0;
    }
}

/*
 * A request with Connection: upgrade and Upgrade (llhttp's upgrade flag).
 * Whatever happens, the connection closes after the answer: the bytes
 * after the head belong to the new protocol if the upstream switches, and
 * may not be parsed as the next request if it does not (a refused upgrade
 * would otherwise smuggle them). A body is refused: its end is where the
 * new protocol would begin, which is too fragile to trust. h2c is never
 * passed on (h2c smuggling lets a client talk to the upstream past the
 * gateway's routing and plugins): such a request goes on as a plain
 * HTTP/1.1 request, its Upgrade dropped like any hop-by-hop header, as
 * RFC 9110 lets a server ignore Upgrade. So is an HTTP/1.0 one.
 */
static int check_upgrade(mg_conn_t *c, mg_req_t *r, const char **why)
{
    mg_str_t value = MG_NULL_STR;
    unsigned n = 0;
    c->close_after = 1;
    for (size_t i = 0; i < r->nheaders; i++)
        if (mg_str_caseeq(r->headers[i].name, MG_STR("upgrade"))) {
            value = r->headers[i].value;
            n++;
        }
    if (n != 1 || value.len == 0) {
        *why = "invalid upgrade request";
        return 400;
    }
    if (r->chunked || r->content_length > 0) {
        *why = "upgrade request with a body";
        return 400;
    }
    if (r->http_minor == 1 && !mg_http_token_listed(value, MG_STR("h2c")))
        r->upgrade = value;
    return 0;
}

/*
 * Checks the framing and the headers the gateway must understand, and
 * copies the rest into the request. Returns 0 or an HTTP status to refuse
 * the request with (reason in *why).
 */
static int build_request(mg_conn_t *c, mg_req_t *r, const char **why)
{
    const mg_config_t *cfg = mg_worker_gen(c->w)->cfg;
    unsigned hosts = 0, lengths = 0, encodings = 0;
    *why = "bad request";
    if (!c->saw_http || c->parser.http_major != 1 || c->parser.http_minor > 1)
        return 400;
    if (!mg_http_method_allowed(c->parser.method)) {
        *why = "method not implemented";
        return 501;
    }
    r->method = c->parser.method;
    r->http_minor = c->parser.http_minor;
    r->method_name = mg_str_from_cstr(llhttp_method_name(r->method));
    r->target = mg_arena_strdup(r->arena, span_str(c, c->url));
    if (r->target.len == 0 || r->target.p[0] != '/') {
        *why = "invalid request target";
        return 400;
    }
    r->headers =
        mg_arena_alloc(r->arena, sizeof(mg_header_t) * (c->nhspans + 1));
    r->headers_cap = c->nhspans + 1;
    r->nheaders = 0;
    r->content_length = -1;
    for (unsigned i = 0; i < c->nhspans; i++) {
        mg_str_t name = span_str(c, c->hspans[i].name);
        mg_str_t raw = span_str(c, c->hspans[i].value);
        mg_str_t value = trim_ows(raw);
        if (mg_str_caseeq(name, MG_STR("host"))) {
            if (++hosts > 1 || value.len == 0)
                return 400;
        } else if (mg_str_caseeq(name, MG_STR("content-length"))) {
            /* Digits only: no sign, no list, and no whitespace around them
             * beyond the one customary space after the colon (llhttp would
             * silently accept more; SECURITY.md point 2). */
            const char *colon = name.p + name.len;
            if (++lengths > 1 || value.len == 0 || value.len > 18
                || raw.len != value.len || raw.p[raw.len] != '\r'
                || raw.p - colon > 2 || (raw.p - colon == 2 && colon[1] != ' '))
                return 400;
            int64_t v = 0;
            for (size_t k = 0; k < value.len; k++) {
                if (value.p[k] < '0' || value.p[k] > '9')
                    return 400;
                v = v * 10 + (value.p[k] - '0');
            }
            r->content_length = v;
            continue;
        } else if (mg_str_caseeq(name, MG_STR("transfer-encoding"))) {
            if (++encodings > 1 || !mg_str_caseeq(value, MG_STR("chunked")))
                return 400;
            r->chunked = 1;
            continue;
        } else if (mg_str_caseeq(name, MG_STR("expect"))) {
            if (mg_str_caseeq(value, MG_STR("100-continue")))
                r->expect_continue = 1;
            continue;
        }
        if (mg_http_header_dropped(cfg, name))
            continue;
        mg_header_t *h = &r->headers[r->nheaders++];
        h->name = mg_arena_strdup(r->arena, name);
        h->value = mg_arena_strdup(r->arena, value);
        if (mg_str_caseeq(name, MG_STR("host")))
            r->host = h->value;
    }
    if (lengths && encodings)
        return 400;
    if (hosts == 0 && r->http_minor == 1)
        return 400;
    r->client_keepalive = llhttp_should_keep_alive(&c->parser) ? 1 : 0;
    if (llhttp_get_upgrade(&c->parser))
        return check_upgrade(c, r, why);
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = &c->req;
    c->serial++;
    memset(r, 0, sizeof(*r));
    r->conn = c;
    r->arena = &c->arena;
    r->gen = mg_worker_gen(c->w);
    mg_gen_ref(r->gen);
    r->start_ns = uv_hrtime();
    memcpy(r->client_ip, c->peer, sizeof(r->client_ip));
    r->tls = c->tls != NULL;
    c->active = 1;
    c->resp_done = 0;
    stop_timer(c);

    const char *why;
    int status = build_request(c, r, &why);
    int has_body = r->chunked || r->content_length > 0;
    if (status) {
        mg_conn_respond_error(r, status, why, 1);
        c->stop_parse = 1;
        return -1;
    }
    if (!has_body)
        r->body_complete = 1;
    c->state = has_body ? C_GATED : C_BODY;
    mg_proxy_start(r);
    if (c->stop_parse)
        return -1;
    /* Stop here until the pipeline wants the body (mg_conn_body_open). */
    if (has_body && c->state == C_GATED)
        return HPE_PAUSED;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = &c->req;
    r->body_received += n;
    if (r->body_received > r->max_body) {
        mg_conn_respond_error(r, 413, "request body too large", 1);
        c->stop_parse = 1;
        return HPE_USER;
    }
    if (r->proxy)
        mg_proxy_on_body(r, at, n);
    return c->stop_parse ? HPE_USER : 0;
}

static int on_message_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = &c->req;
    r->body_complete = 1;
    c->state = C_DONE;
    stop_timer(c);
    if (r->proxy)
        mg_proxy_on_body_end(r);
    /* One request at a time: pipelined ones wait in the buffer. */
    return HPE_PAUSED;
}

/* ------------------------------------------------------------------ */
/* Reading and the main loop                                          */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    mg_conn_t *c = h->data;
    if (c->cap - c->len < 1024 && c->state <= C_HEAD) {
        /* Grow while reading a head, up to the head limits. */
        const mg_limits_t *l = limits(c);
        size_t max = l->max_uri + l->max_header_bytes + 1024;
        size_t cap = c->cap * 2 > max ? max : c->cap * 2;
        if (cap > c->cap) {
            c->buf = mg_realloc(c->buf, cap);
            c->cap = cap;
        }
    }
    /* A zero-length buffer makes libuv report UV_ENOBUFS: see on_read. */
    *b = uv_buf_init(c->buf + c->len, (unsigned)(c->cap - c->len));
}

static void read_stop(mg_conn_t *c);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    mg_conn_t *c = s->data;
    if (nread == 0)
        return;
    if (c->state == C_LINGER) {
        if (nread < 0)
            conn_close(c);
        else
            c->len = 0; /* discard */
        return;
    }
    if (nread == UV_ENOBUFS) {
        read_stop(c); /* full; advance() reads again when there is room */
        return;
    }
    if (nread < 0) {
        if (nread == UV_EOF && (c->state != C_IDLE || c->pos < c->len)) {
            /* A half-close: what is buffered may still be a whole request
             * (it is answered, then the connection closes); keep_reading
             * closes once more bytes would be needed. */
            c->eof = 1;
            c->close_after = 1;
            read_stop(c);
            advance(c);
            return;
        }
        conn_close(c);
        return;
    }
    c->len += (size_t)nread;
    if (c->state == C_BODY)
        arm_timer(c, limits(c)->body_timeout_ms);
    advance(c);
}

/* ---- TLS: ciphertext in, plaintext into the read buffer -------------- */

static void on_tls_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    mg_conn_t *c = h->data;
    size_t len;
    char *p = mg_worker_scratch(c->w, &len);
    *b = uv_buf_init(p, (unsigned)len);
}

static void on_tls_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    mg_conn_t *c = s->data;
    if (nread <= 0 || c->state == C_LINGER) {
        on_read(s, nread, b); /* EOF, errors and lingering: as plain */
        return;
    }
    mg_tls_conn_feed(c->tls, b->base, (size_t)nread);
    if (c->state == C_BODY)
        arm_timer(c, limits(c)->body_timeout_ms);
    advance(c);
}

/* Sends whatever ciphertext the session has produced (handshake records,
 * tickets, alerts, close_notify). */
static void tls_flush(mg_conn_t *c)
{
    size_t n = mg_tls_conn_pending(c->tls);
    if (n == 0 || c->closing)
        return;
    wreq_t *q = mg_malloc(sizeof(*q) + n);
    q->conn = c;
    q->cb = NULL;
    q->arg = NULL;
    q->serial = c->serial;
    q->h2 = 0;
    c->writes++;
    tls_queue(c, q, n);
}

/* Writes the n ciphertext bytes pending in the session from q's tail. */
static void tls_queue(mg_conn_t *c, wreq_t *q, size_t n)
{
    char *p = (char *)(q + 1);
    uv_buf_t b = uv_buf_init(p, (unsigned)mg_tls_conn_take(c->tls, p, n));
    mg_worker_write(c->w, (uv_stream_t *)&c->tcp, &q->wr, &b, 1, on_write);
}

/* Encrypts the buffers; returns the ciphertext bytes now pending, or
 * SIZE_MAX on a fatal session error. */
static size_t tls_encrypt(mg_conn_t *c, const uv_buf_t *bufs, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (mg_tls_conn_write(c->tls, bufs[i].base, bufs[i].len) < 0) {
            mg_log_info("client %s: TLS write: %s", c->peer,
                        mg_tls_conn_error(c->tls));
            return SIZE_MAX;
        }
    return mg_tls_conn_pending(c->tls);
}

/*
 * Decrypts what the session holds into the read buffer while it has room
 * (the buffer grows during a head exactly as for a socket read). Returns
 * the bytes added, or -1 when the connection was closed (bad handshake,
 * garbage, refused version: logged at info, never more, since any client
 * can cause it).
 */
static int tls_pump(mg_conn_t *c)
{
    size_t before = c->len;
    for (;;) {
        uv_buf_t b;
        on_alloc((uv_handle_t *)&c->tcp, 0, &b);
        if (b.len == 0)
            break;
        int n = mg_tls_conn_read(c->tls, b.base, b.len);
        if (n > 0) {
            c->len += (size_t)n;
            continue;
        }
        if (n == UV_EOF) {
            /* close_notify: a half-close, handled as a socket EOF. */
            if (c->state == C_IDLE && c->pos == c->len) {
                conn_close(c);
                return -1;
            }
            c->eof = 1;
            c->close_after = 1;
            read_stop(c);
        } else if (n < 0) {
            tls_flush(c); /* the alert, if any */
            mg_log_info("client %s: TLS: %s", c->peer,
                        mg_tls_conn_error(c->tls));
            conn_close(c);
            return -1;
        }
        break;
    }
    tls_flush(c);
    return (int)(c->len - before);
}

static void read_start(mg_conn_t *c)
{
    if (!c->reading && !c->closing && !c->eof) {
        c->reading = 1;
        uv_read_start((uv_stream_t *)&c->tcp, c->tls ? on_tls_alloc : on_alloc,
                      c->tls ? on_tls_read : on_read);
    }
}

/* Reads whenever the buffer has room: while a request waits for its
 * response, pipelined bytes (and an EOF) are taken without an epoll change
 * per request. */
static void keep_reading(mg_conn_t *c)
{
    if (c->eof) {
        /* Nothing more will come: a request still short of bytes never
         * completes. A gated body or a finished request waits. */
        if (c->state == C_IDLE || c->state == C_HEAD || c->state == C_BODY
            || c->state == C_H2)
            conn_close(c);
        return;
    }
    if (c->len < c->cap || c->state <= C_HEAD)
        read_start(c);
    else
        read_stop(c);
}

static void read_stop(mg_conn_t *c)
{
    if (c->reading) {
        c->reading = 0;
        uv_read_stop((uv_stream_t *)&c->tcp);
    }
}

/* Runs llhttp over the unparsed bytes. */
static void parse(mg_conn_t *c)
{
    c->parsing = 1;
    c->stop_parse = 0;
    llhttp_errno_t err =
        llhttp_execute(&c->parser, c->buf + c->pos, c->len - c->pos);
    c->parsing = 0;
    if (c->closing)
        return;
    if (err == HPE_OK || err == HPE_PAUSED) {
        if (err == HPE_OK) {
            c->pos = c->len;
        } else {
            c->pos = (size_t)(llhttp_get_error_pos(&c->parser) - c->buf);
            llhttp_resume(&c->parser);
        }
        if (c->active && c->req.proxy)
            mg_proxy_flush(&c->req);
        return;
    }
    c->state = C_DONE;
    if (c->stop_parse)
        return; /* a callback already answered */
    unsigned status = c->error_status ? c->error_status : 400;
    const char *why = c->error_reason ? c->error_reason : "bad request";
    mg_log_debug("client %s: %s (%s)", c->peer, why,
                 llhttp_get_error_reason(&c->parser));
    mg_conn_respond_error(c->active ? &c->req : bare_request(c), (int)status,
                          why, 1);
}

/* A head that cannot grow further is an error of its own. */
static int head_overflow(mg_conn_t *c)
{
    const mg_limits_t *l = limits(c);
    if (c->len < l->max_uri + l->max_header_bytes)
        return 0;
    if (c->url.len == 0 || c->nhspans == 0)
        c->error_status = 414, c->error_reason = "uri too long";
    else
        c->error_status = 431,
        c->error_reason = "request header fields too large";
    return 1;
}

/*
 * The first bytes of a connection that may speak HTTP/2 decide: ALPN h2
 * over TLS, the client preface on plain. Returns 1 when the connection is
 * now HTTP/2, 0 while the bytes are a prefix of the preface, -1 for
 * HTTP/1.
 */
static int start_h2(mg_conn_t *c)
{
    int h2 = c->tls ? (mg_tls_conn_alpn_h2(c->tls) ? 1 : -1)
                    : mg_h2_preface(c->buf + c->pos, c->len - c->pos);
    if (h2 == 0)
        return 0;
    c->h2_ok = 0;
    if (h2 < 0)
        return -1;
    c->state = C_H2;
    c->h2 = mg_h2_new(c, c->w, c->peer, c->tls != NULL);
    return 1;
}

void mg_http1_h2_timer(mg_conn_t *c, uint64_t ms)
{
    if (c->send_timer)
        return; /* the socket is backed up: its send timeout rules, and
                   mg_h2_rearm follows once it drains */
    if (ms)
        arm_timer(c, ms);
    else
        stop_timer(c);
    c->send_timer = 0;
}

void mg_http1_h2_finish(mg_conn_t *c)
{
    c->h2_finish = 1;
    if (c->writes == 0 && !c->closing && c->state == C_H2)
        linger_close(c);
}

static void advance(mg_conn_t *c)
{
    while (!c->closing && !c->parsing) {
        if (c->tls && c->state != C_LINGER && tls_pump(c) < 0)
            return;
        switch (c->state) {
        case C_IDLE:
            if (c->h2_ok && c->pos < c->len) {
                int h2 = start_h2(c);
                if (h2 == 0) {
                    keep_reading(c); /* a prefix of the preface */
                    return;
                }
                if (h2 > 0)
                    continue;
            }
            /* fall through */
        case C_HEAD:
            if (c->pos < c->len) {
                parse(c);
                continue;
            }
            if (c->state == C_HEAD && head_overflow(c)) {
                mg_conn_respond_error(bare_request(c), (int)c->error_status,
                                      c->error_reason, 1);
                c->state = C_DONE;
                continue;
            }
            keep_reading(c);
            return;
        case C_GATED: keep_reading(c); return;
        case C_BODY:
            if (c->pos < c->len) {
                parse(c);
                continue;
            }
            /* Everything parsed; once nothing borrows the bytes (the head
             * was copied out at headers-complete) the buffer is free. */
            if (c->holds == 0)
                c->len = c->pos = 0;
            /* The session may hold more than the buffer took before. */
            if (c->tls && c->pos == c->len && tls_pump(c) != 0) {
                if (c->closing)
                    return;
                continue;
            }
            keep_reading(c);
            return;
        case C_DONE:
            if (c->active && c->resp_done && c->writes == 0) {
                finish_request(c);
                return;
            }
            keep_reading(c);
            return;
        case C_LINGER: return;
        case C_TUNNEL:
            if (c->pos < c->len) {
                size_t from = c->pos, n = c->len - c->pos;
                c->pos = c->len;
                c->req.body_received += n; /* bytes_in of the access log */
                c->tunnel_cb(c->tunnel_arg, c->buf + from, (ssize_t)n);
                continue;
            }
            if (c->holds == 0)
                c->len = c->pos = 0;
            if (c->tls && c->pos == c->len && tls_pump(c) != 0) {
                if (c->closing)
                    return;
                continue;
            }
            if (c->eof) {
                if (!c->tunnel_eof_told) {
                    c->tunnel_eof_told = 1;
                    c->tunnel_cb(c->tunnel_arg, NULL, UV_EOF);
                }
                return;
            }
            if (c->len < c->cap)
                read_start(c);
            else
                read_stop(c);
            return;
        case C_H2:
            if (c->pos < c->len) {
                /* http2.c copies what it keeps: the buffer is free again
                 * once the call returns. */
                size_t pos = c->pos, n = c->len - c->pos;
                c->parsing = 1;
                int rc = mg_h2_recv(c->h2, c->buf + pos, n);
                c->parsing = 0;
                c->pos = c->len = 0;
                if (rc < 0) {
                    conn_close(c);
                    return;
                }
                continue;
            }
            if (c->h2_finish)
                return;
            keep_reading(c);
            return;
        }
    }
}

void mg_conn_hold(mg_conn_t *c)
{
    if (mg_conn_kind(c) != MG_CONN_H1) {
        mg_h2_hold(c);
        return;
    }
    c->holds++;
}

void mg_conn_release(mg_conn_t *c)
{
    if (mg_conn_kind(c) != MG_CONN_H1) {
        mg_h2_release(c);
        return;
    }
    if (--c->holds == 0 && !c->closing
        && (c->state == C_BODY || c->state == C_TUNNEL))
        advance(c);
}

void mg_conn_body_open(mg_req_t *r)
{
    mg_conn_t *c = r->conn;
    if (r->h2) {
        mg_h2_body_open(r);
        return;
    }
    if (c->state != C_GATED || c->closing)
        return;
    if (r->content_length >= 0 && (uint64_t)r->content_length > r->max_body) {
        /* Refused before reading a byte of it, and without 100 Continue. */
        mg_conn_respond_error(r, 413, "request body too large", 1);
        return;
    }
    if (r->expect_continue && r->http_minor == 1 && r->body_received == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        uv_buf_t b = uv_buf_init((char *)cont, sizeof(cont) - 1);
        mg_conn_write(c, &b, 1, NULL, NULL);
    }
    c->state = C_BODY;
    arm_timer(c, limits(c)->body_timeout_ms);
    advance(c);
}

int mg_conn_should_close(const mg_req_t *r)
{
    mg_conn_t *c = r->conn;
    if (r->h2)
        return 0; /* a draining connection gets GOAWAY instead */
    return c->close_after || !r->client_keepalive || !r->body_complete
           || mg_worker_draining(c->w);
}

mg_worker_t *mg_conn_worker(const mg_conn_t *c)
{
    if (mg_conn_kind(c) != MG_CONN_H1)
        return mg_h2_worker(c);
    return c->w;
}

/* ------------------------------------------------------------------ */
/* Request end, close                                                 */

static void on_shutdown(uv_shutdown_t *req, int status)
{
    mg_conn_t *c = req->data;
    if (status < 0 || c->closing || c->eof) {
        conn_close(c); /* nothing left to drain after the client's EOF */
        return;
    }
    /* Drain what the client still sends so our response is not lost to a
     * reset caused by unread data (lingering close). */
    c->state = C_LINGER;
    c->len = c->pos = 0;
    arm_timer(c, LINGER_MS);
    read_start(c);
}

static void linger_close(mg_conn_t *c)
{
    read_stop(c);
    if (c->tls) {
        mg_tls_conn_shutdown(c->tls); /* close_notify before the FIN */
        tls_flush(c);
    }
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown))
        conn_close(c);
    else
        c->state = C_LINGER;
}

void mg_conn_response_done(mg_req_t *r)
{
    mg_conn_t *c = r->conn;
    if (r->h2) {
        mg_h2_response_done(r);
        return;
    }
    c->resp_done = 1;
    if (!c->parsing && c->writes == 0 && !c->closing)
        finish_request(c);
}

static void finish_request(mg_conn_t *c)
{
    mg_req_t *r = &c->req;
    int close = mg_conn_should_close(r);
    mg_metrics_record(r, r->resp_status);
    if (mg_worker_accesslog(c->w))
        mg_accesslog_write(mg_worker_accesslog(c->w), r);
    if (r->proxy) {
        mg_proxy_abort(r); /* the pipeline should have let go already */
        r->proxy = NULL;
    }
    c->active = 0;
    c->holds = 0; /* holds belong to the request's body writes */
    c->resp_done = 0;
    if (r->gen)
        mg_gen_unref(r->gen);
    r->gen = NULL;
    mg_arena_reset(&c->arena);
    c->hspans = NULL;
    if (close && c->state == C_TUNNEL) {
        /* Both directions are over (or broken): nothing to linger for. */
        conn_close(c);
        return;
    }
    if (close) {
        linger_close(c);
        return;
    }
    /* Keep pipelined bytes, drop the finished request's. */
    if (c->pos < c->len)
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
    c->len -= c->pos;
    c->pos = 0;
    c->state = C_IDLE;
    arm_timer(c, limits(c)->keepalive_timeout_ms);
    advance(c);
}

static void on_timer_closed(uv_handle_t *h)
{
    mg_conn_t *c = h->data;
    mg_worker_t *w = c->w;
    free(c->buf);
    mg_arena_free(&c->arena);
    mg_tls_conn_free(c->tls);
    free(c);
    mg_worker_conn_closed(w);
}

static void on_tcp_closed(uv_handle_t *h)
{
    mg_conn_t *c = h->data;
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
}

static void conn_close(mg_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    /* A tunnel that breaks has still switched protocols: 101. */
    int answered = c->req.resp_status && (c->resp_done || c->state == C_TUNNEL);
    if (c->active && (c->req.method_name.len || c->req.resp_status))
        mg_metrics_record(&c->req, answered ? c->req.resp_status : 499);
    if (c->active && c->req.method_name.len && mg_worker_accesslog(c->w)) {
        /* The client went away first: logged as nginx does, 499. */
        if (!answered)
            c->req.resp_status = 499;
        mg_accesslog_write(mg_worker_accesslog(c->w), &c->req);
    }
    if (c->active) {
        if (c->req.proxy)
            mg_proxy_abort(&c->req);
        c->req.proxy = NULL;
        if (c->req.gen)
            mg_gen_unref(c->req.gen);
        c->req.gen = NULL;
        c->active = 0;
    }
    if (c->h2) {
        mg_h2_free(c->h2); /* aborts its streams */
        c->h2 = NULL;
    }
    mg_conn_list_t *list = mg_worker_conns(c->w);
    if (c->prev)
        c->prev->next = c->next;
    else
        list->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
}

void mg_conn_set_close(mg_conn_t *c)
{
    if (mg_conn_kind(c) == MG_CONN_H1)
        c->close_after = 1; /* HTTP/2 streams end on their own */
}

void mg_conn_abort(mg_conn_t *c)
{
    if (mg_conn_kind(c) != MG_CONN_H1) {
        mg_h2_abort(c); /* the stream, not the connection */
        return;
    }
    conn_close(c);
}

void mg_conn_tunnel(mg_req_t *r, mg_conn_data_cb cb, void *arg)
{
    mg_conn_t *c = r->conn;
    if (c->closing)
        return;
    c->state = C_TUNNEL;
    c->tunnel_cb = cb;
    c->tunnel_arg = arg;
    c->close_after = 1;
    r->body_received = 0; /* from now on: bytes through the tunnel */
    stop_timer(c);
    c->send_timer = 0;
    /* Bytes the client sent after the request head (already read) are
     * the new protocol's: they go first. */
    advance(c);
}

static void on_tunnel_shutdown(uv_shutdown_t *req, int status)
{
    /* Nothing to do: a failed shutdown shows as a failed read or write,
     * and a connection closed meanwhile cancels it. */
}

void mg_conn_shutdown(mg_conn_t *c)
{
    if (c->closing || c->shut)
        return;
    c->shut = 1;
    if (c->tls) {
        mg_tls_conn_shutdown(c->tls); /* close_notify before the FIN */
        tls_flush(c);
    }
    c->shutdown_req.data = c;
    uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_tunnel_shutdown);
}

/* ------------------------------------------------------------------ */
/* Accept, drain                                                      */

static void init_settings(void)
{
    if (settings.on_message_begin)
        return;
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_url = on_url;
    settings.on_url_complete = on_url_complete;
    settings.on_version = on_version;
    settings.on_header_field = on_header_field;
    settings.on_header_value = on_header_value;
    settings.on_header_value_complete = on_header_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
}

static void peer_name(mg_conn_t *c)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    c->peer[0] = '\0';
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len))
        return;
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a6, c->peer, sizeof(c->peer));
        /* ::ffff:1.2.3.4 is an IPv4 client. */
        if (strncmp(c->peer, "::ffff:", 7) == 0 && strchr(c->peer, '.'))
            memmove(c->peer, c->peer + 7, strlen(c->peer + 7) + 1);
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof(c->peer));
    }
}

void mg_http1_accept(mg_worker_t *w, uv_stream_t *server, mg_tls_t *tls,
                     int http2)
{
    init_settings();
    mg_conn_list_t *list = mg_worker_conns(w);
    mg_conn_t *c = mg_calloc(1, sizeof(*c));
    c->w = w;
    uv_tcp_init(mg_worker_loop(w), &c->tcp);
    uv_timer_init(mg_worker_loop(w), &c->timer);
    c->tcp.data = c->timer.data = c;
    mg_arena_init(&c->arena);
    c->next = list->head;
    if (list->head)
        list->head->prev = c;
    list->head = c;
    list->count++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        conn_close(c);
        return;
    }
    if (list->count > limits(c)->max_connections) {
        mg_log_warn("max_connections (%u) reached, closing a new connection",
                    limits(c)->max_connections);
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    peer_name(c);
    llhttp_init(&c->parser, HTTP_REQUEST, &settings);
    c->parser.data = c;
    c->cap = READ_CHUNK;
    c->buf = mg_malloc(c->cap);
    c->state = C_IDLE;
    if (tls)
        c->tls = mg_tls_conn_new(tls);
    c->h2_ok = http2 ? 1 : 0;
    arm_timer(c, limits(c)->header_timeout_ms);
    read_start(c);
}

void mg_http1_drain_all(mg_worker_t *w)
{
    mg_conn_t *c = mg_worker_conns(w)->head;
    /* Idle connections are not cut at once: one just accepted, or a
     * keep-alive one whose client is sending right now, would see a reset.
     * They get a short grace; what arrives in it is answered with
     * Connection: close. */
    for (; c; c = c->next) {
        if (c->h2) {
            if (!c->closing && !c->h2_finish)
                mg_h2_drain(c->h2);
            continue;
        }
        c->close_after = 1;
        if (!c->closing && c->state == C_IDLE && c->pos == c->len)
            arm_timer(c, DRAIN_GRACE_MS);
    }
}
