/*
 * A tunnel: the two byte streams of a connection that switched protocols
 * (101: WebSocket or any other Upgrade), copied both ways between the
 * client connection (http.h) and its upstream connection (upstream.h)
 * until both sides have ended, one fails, or no byte has moved for the
 * idle timeout. It does not parse anything: the handshake and everything
 * about the request (routing, plugins, logging) belong to proxy.c.
 */
#ifndef MG_TUNNEL_H
#define MG_TUNNEL_H

#include "http.h"
#include "upstream.h"

typedef struct mg_tunnel_s mg_tunnel_t;

/*
 * The tunnel is over; called once, unless mg_tunnel_abort came first.
 * `clean`: both sides ended and every byte was written (the client
 * connection has nothing queued by the tunnel); otherwise it broke
 * (`why`: "idle timeout", "upstream reset", ...) and the client
 * connection should be closed at once. The upstream connection is closed
 * already; the callee must close the client connection before it returns
 * (mg_conn_response_done and/or mg_conn_abort) so that no write callback
 * reaches the tunnel afterwards.
 */
typedef void (*mg_tunnel_end_cb)(void *arg, int clean, const char *why);

/*
 * Creates the tunnel for request `r` (whose 101 head has been queued to
 * the client) over `uc`, which it takes over: owner, callbacks, timer.
 * uc->rbuf[from .. uc->rlen) are bytes of the new protocol the upstream
 * sent with its 101; they go to the client first. Nothing moves until
 * mg_tunnel_run, so the caller can store the result first.
 */
mg_tunnel_t *mg_tunnel_new(mg_req_t *r, mg_upconn_t *uc, size_t from,
                           uint64_t idle_ms, mg_tunnel_end_cb cb, void *arg);

/* Starts the copying (client bytes already buffered go first). */
void mg_tunnel_run(mg_tunnel_t *t);

/*
 * The client connection is going away (mg_proxy_abort): closes the
 * upstream side without calling the end callback. The tunnel frees itself
 * once its upstream connection has closed.
 */
void mg_tunnel_abort(mg_tunnel_t *t);

#endif
