/*
 * HTTP/2 on client connections (nghttp2): one server session per
 * connection, each stream one mg_req_t through the same pipeline as an
 * HTTP/1 request. http1.c keeps the socket, TLS, the connection timer and
 * the write path; it hands the decrypted bytes of a connection that speaks
 * HTTP/2 (ALPN "h2", or the h2c prior-knowledge preface) to this module,
 * and the mg_conn_* calls made on a stream (r->conn) come here.
 *
 * The pipeline writes HTTP/1 response heads (proxy.c builds them as text);
 * a stream turns the head into HEADERS (mg_h2_head_to_nv) and the body
 * pieces into DATA frames under the client's flow control. Upstreams stay
 * HTTP/1.1. Not supported: server push, Upgrade: h2c, extended CONNECT.
 */
#ifndef MG_HTTP2_H
#define MG_HTTP2_H

#include <nghttp2/nghttp2.h>

#include "http.h"

typedef struct mg_h2_s mg_h2_t;
typedef struct mg_h2_stream_s mg_h2_stream_t;

/* --- called by http1.c -------------------------------------------------- */

/* Whether p[0..n) is the client connection preface: 1 it is (it may
 * continue), 0 a prefix of it (wait for more), -1 it is not. */
int mg_h2_preface(const char *p, size_t n);

/*
 * Starts a server session on connection `c` (sends SETTINGS). `peer` is
 * the client address (copied), `tls` whether the connection is TLS.
 * Loop thread only.
 */
mg_h2_t *mg_h2_new(mg_conn_t *c, mg_worker_t *w, const char *peer, int tls);

/* Bytes read from the client (plaintext; borrowed for the call). Returns
 * 0, or -1 when the connection must close now. */
int mg_h2_recv(mg_h2_t *s, const char *p, size_t n);

/* The connection timer fired (header/idle wait, drain grace). */
void mg_h2_timeout(mg_h2_t *s);

/* Sets the connection timer for the session's earliest deadline (http1.c
 * calls it when its send timer, which took the timer over, is done). */
void mg_h2_rearm(mg_h2_t *s);

/* The worker drains: GOAWAY now, open streams finish. */
void mg_h2_drain(mg_h2_t *s);

/* The connection is closing: every stream is aborted, the session freed
 * (possibly later, from the loop). */
void mg_h2_free(mg_h2_t *s);

/* The mg_conn_* calls of http.h, for a stream (`c` is one). */
void mg_h2_write(mg_conn_t *c, const uv_buf_t *bufs, unsigned n, mg_write_cb cb,
                 void *arg);
size_t mg_h2_write_queue_size(const mg_conn_t *c);
void mg_h2_body_open(mg_req_t *r);
void mg_h2_hold(mg_conn_t *c);
void mg_h2_release(mg_conn_t *c);
void mg_h2_response_done(mg_req_t *r);
void mg_h2_respond(mg_req_t *r, int status, const mg_header_t *headers,
                   size_t n, mg_str_t body);
void mg_h2_abort(mg_conn_t *c);
mg_worker_t *mg_h2_worker(const mg_conn_t *c);

/*
 * Turns a gateway-made HTTP/1 response head ("HTTP/1.1 200 OK\r\n...
 * \r\n\r\n", exactly `len` bytes) into HTTP/2 fields: ":status" first,
 * then the headers with lower-case names, without the connection-specific
 * ones (Connection, Keep-Alive, Transfer-Encoding, Upgrade,
 * Proxy-Connection, TE). The array and names are allocated from `a`,
 * values borrow `head`. Returns the status (100..999) or -1 when the head
 * is malformed.
 */
int mg_h2_head_to_nv(mg_arena_t *a, const char *head, size_t len,
                     nghttp2_nv **nv, size_t *nnv);

/* --- implemented by http1.c for this module ----------------------------- */

/* Sets the connection timer (0: stops it). */
void mg_http1_h2_timer(mg_conn_t *c, uint64_t ms);

/* The session is over: close once the queued writes are out. */
void mg_http1_h2_finish(mg_conn_t *c);

#endif
