/*
 * The request as the HTTP/1 server hands it to the proxy pipeline, and the
 * few calls the pipeline uses to answer on the client connection. The
 * protocol side (http1.c) owns parsing, framing, limits and keep-alive; the
 * pipeline side (proxy.c) owns routing and the upstream exchange. Neither
 * knows the other's internals beyond this header.
 *
 * Flow control on the request body: body bytes handed to mg_proxy_on_body
 * point into the connection's read buffer and stay valid only while the
 * connection holds (mg_conn_hold / mg_conn_release). The connection reads
 * and parses no further while any hold is taken, so a slow upstream stops
 * the client (bounded buffering, no copies).
 */
#ifndef MG_HTTP_H
#define MG_HTTP_H

#include <uv.h>

#include "arena.h"
#include "common.h"
#include "config.h"

typedef struct mg_conn_s mg_conn_t;
typedef struct mg_req_s mg_req_t;
typedef struct mg_gen_s mg_gen_t;
typedef struct mg_worker_s mg_worker_t;
typedef struct mg_proxy_s mg_proxy_t;

typedef struct {
    mg_str_t name, value;
} mg_header_t;

/*
 * r->conn points either to an HTTP/1 connection (http1.c) or to an HTTP/2
 * stream (http2.c). Both objects start with this kind byte; every mg_conn_*
 * call below looks at it once and hands HTTP/2 streams to http2.c, so the
 * pipeline never knows which protocol it answers on.
 */
enum { MG_CONN_H1 = 0, MG_CONN_H2 = 1 };
#define mg_conn_kind(c) (*(const uint8_t *)(c))

struct mg_req_s {
    mg_conn_t *conn;
    mg_arena_t *arena;  /* request-scoped memory, freed at request end */
    mg_gen_t *gen;      /* config generation, referenced for the
                           request's whole life */
    unsigned method;    /* llhttp method */
    uint8_t http_minor; /* HTTP/1.x */
    mg_str_t method_name;
    mg_str_t target;     /* raw request target as received */
    mg_str_t host;       /* Host header (may be empty on HTTP/1.0) */
    mg_str_t path;       /* normalized path (arena), set by the pipeline */
    mg_str_t request_id; /* X-Request-Id sent upstream and returned */
    mg_str_t upgrade;    /* the client's Upgrade value when it asked to
                            switch protocols (Connection: upgrade) and
                            the gateway will try; empty otherwise */
    const mg_route_conf_t *route; /* matched route, NULL before routing */
    mg_header_t *headers;         /* client headers after identity/underscore
                                     removal; names and values borrow the arena */
    size_t nheaders, headers_cap;
    mg_str_t query; /* raw query string without '?' (arena) */
    size_t nparams; /* route parameters (arena copies) */
    mg_str_t *param_names, *param_values;
    unsigned path_set : 1;     /* a plugin chose the upstream path */
    unsigned req_mutable : 1;  /* rewrite/access/handler may edit the request */
    unsigned resp_mutable : 1; /* header_filter may edit the response head */
    int resp_status;           /* 0 until the response head is known */
    mg_header_t *resp_headers; /* response head as sent to the client */
    size_t nresp_headers, resp_headers_cap;
    int64_t content_length; /* -1: none */
    unsigned chunked : 1;   /* Transfer-Encoding: chunked */
    unsigned expect_continue : 1;
    unsigned client_keepalive : 1; /* client allows keep-alive */
    unsigned body_complete : 1;    /* the whole body has been parsed */
    unsigned response_started : 1; /* status line queued to the client */
    unsigned tls : 1;              /* arrived over TLS (https) */
    unsigned h2 : 1; /* an HTTP/2 stream: the response head carries no
                        chunked coding and no Connection lines */
    uint64_t body_received;
    uint64_t max_body;         /* the route's limit, set by the pipeline */
    char client_ip[46];        /* textual TCP peer address */
    uint64_t bytes_out;        /* written to the client */
    uint64_t upstream_ns;      /* request sent upstream -> response done */
    const char *upstream_name; /* target that answered (worker-owned) */
    mg_str_t consumer;         /* ctx.consumer.id, for the access log */
    int8_t peer_trust;         /* 0 not known yet, 1 trusted, -1 not */
    mg_str_t real_ip;          /* the client as trusted_proxies decide it
                                  (mg_ffi_req_client_ip), computed once */
    uint64_t start_ns;         /* uv_hrtime() when the headers were complete */
    mg_proxy_t *proxy;         /* the pipeline's per-request state */
};

typedef void (*mg_write_cb)(void *arg, int status);

/* --- called by the pipeline ------------------------------------------- */

/*
 * Queues bytes to the client. The buffers are borrowed until `cb` runs (it
 * always runs exactly once, also when the connection fails; status < 0
 * then). `cb` may be NULL. Loop thread only.
 */
void mg_conn_write(mg_conn_t *c, const uv_buf_t *bufs, unsigned n,
                   mg_write_cb cb, void *arg);

/* Bytes queued to the client and not yet written (backpressure). */
size_t mg_conn_write_queue_size(const mg_conn_t *c);

/*
 * Opens the request-body gate: the connection starts (or goes on) parsing
 * the body and passing it to mg_proxy_on_body. Sends "100 Continue" first
 * when the client asked for it. Until the gate opens nothing of the body is
 * read.
 */
void mg_conn_body_open(mg_req_t *r);

/* Pause/resume body parsing while written-out body bytes are in flight. */
void mg_conn_hold(mg_conn_t *c);
void mg_conn_release(mg_conn_t *c);

/* True when this connection must close after the current response (client
 * asked, HTTP/1.0 without keep-alive, draining worker, unread body). */
int mg_conn_should_close(const mg_req_t *r);

/*
 * The response has been fully queued: once the writes finish, the request
 * ends (its arena and generation reference are released) and the
 * connection serves the next request or closes.
 */
void mg_conn_response_done(mg_req_t *r);

/*
 * Answers with a complete response (status, headers, body) and ends the
 * request. Framing headers in `headers` are ignored: the gateway sets
 * Content-Length itself. Same rules as mg_conn_respond_error otherwise.
 */
void mg_conn_respond(mg_req_t *r, int status, const mg_header_t *headers,
                     size_t n, mg_str_t body, int close);

/*
 * Answers with a gateway-generated JSON error ({"error":"<reason>"}) and
 * ends the request. When the response has already started, the connection
 * is closed instead (the client sees a truncated response, never a wrong
 * one). `close` forces Connection: close.
 */
void mg_conn_respond_error(mg_req_t *r, int status, const char *reason,
                           int close);

/* The connection closes after the current response. */
void mg_conn_set_close(mg_conn_t *c);

/* Closes the client connection at once (fatal error mid-response). */
void mg_conn_abort(mg_conn_t *c);

/*
 * The client's bytes after a switch of protocols (101), or n < 0 when no
 * more will come: UV_EOF for the client's half-close. Bytes are borrowed
 * like body bytes: take a hold (mg_conn_hold) to keep them past the call;
 * the connection reads into the rest of its buffer meanwhile and passes
 * the new bytes on at once, and reads nothing once the buffer is full.
 */
typedef void (*mg_conn_data_cb)(void *arg, const char *p, ssize_t n);

/*
 * Turns the connection of an upgrade request (r->upgrade) into a raw byte
 * stream once its 101 head has been queued: every byte the client sent
 * after the request head, and all that follows, goes to `cb`; writes go
 * out as before (encrypted on a TLS connection). The request stays open
 * until mg_conn_response_done, then the connection closes. No timeout of
 * the connection's own runs meanwhile except the send timeout: the caller
 * watches for idleness.
 */
void mg_conn_tunnel(mg_req_t *r, mg_conn_data_cb cb, void *arg);

/* Half-close: no more writes, the client gets an EOF (after a TLS
 * close_notify) once the queued writes are out. Reading goes on. */
void mg_conn_shutdown(mg_conn_t *c);

/* Monotonic request counter for the worker, used in ids and logs. */
mg_worker_t *mg_conn_worker(const mg_conn_t *c);

/* --- implemented by the pipeline (proxy.c) ----------------------------- */

/* Headers are complete and valid: route and proxy the request. */
void mg_proxy_start(mg_req_t *r);

/* A piece of the request body (de-chunked). Borrowed: take a hold on the
 * connection to keep it past this call. */
void mg_proxy_on_body(mg_req_t *r, const char *p, size_t n);

/* One parse of the client's bytes is over and its framing was valid: the
 * body pieces passed since the last flush may go upstream. */
void mg_proxy_flush(mg_req_t *r);

/* The request body is complete (also called for requests without body). */
void mg_proxy_on_body_end(mg_req_t *r);

/* The client connection is going away: drop everything for this request.
 * After this call the pipeline must not touch `r` or the connection. */
void mg_proxy_abort(mg_req_t *r);

/* True when the TCP peer is in trusted_proxies (its X-Forwarded-For and
 * X-Request-Id are believed). */
int mg_proxy_peer_trusted(mg_req_t *r);

/* True when `token` is one of the comma-separated tokens of `list`
 * (case-insensitive), as in Connection and Upgrade values. */
int mg_http_token_listed(mg_str_t list, mg_str_t token);

/* Standard reason phrase, "Unknown" when none. */
const char *mg_http_reason(int status);

/* --- shared by the protocol sides (http1.c implements) ----------------- */

/* True for request headers the gateway drops before the pipeline sees
 * them: configured identity headers and names with '_' (an alias of '-'
 * some upstreams would honour). */
int mg_http_header_dropped(const mg_config_t *cfg, mg_str_t name);

/* True for response headers only the gateway sets (framing, hop-by-hop,
 * X-Request-Id): mg_conn_respond ignores them in a plugin's list. */
int mg_http_gateway_owned(mg_str_t name);

/*
 * A gateway-made response head in r's arena: status line, the headers
 * (minus the gateway-owned ones), X-Request-Id, Content-Length: body_len,
 * then `connection` (a whole "Connection: ...\r\n" line, or "") and the
 * empty line; `room` more bytes are left after it for the caller (a body).
 * Sets *len to the head's length.
 */
char *mg_http_format_head(mg_req_t *r, int status, const mg_header_t *headers,
                          size_t n, size_t body_len, const char *connection,
                          size_t room, size_t *len);

/* True for the methods the gateway proxies (llhttp numbering). */
int mg_http_method_allowed(unsigned method);

#endif
