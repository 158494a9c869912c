/*
 * TLS termination with OpenSSL over memory BIOs. The connection code feeds
 * the ciphertext it read from the socket in, takes plaintext out for the
 * HTTP/1 parser, and hands plaintext responses in to get ciphertext to write
 * with libuv: OpenSSL never touches a socket, so the event loop, timeouts and
 * write path stay the connection's own. This module knows nothing of libuv
 * handles, HTTP or the config file; config.c builds one mg_tls_t per TLS
 * listener of a config (so a reload reads the certificates again) and
 * http1.c creates one mg_tls_conn_t per accepted connection.
 *
 * Defaults: TLS 1.2 and 1.3 only, forward-secret AEAD ciphers (Mozilla's
 * "intermediate" list), ALPN h2 (unless the listener turns HTTP/2 off) then
 * http/1.1, no renegotiation, no compression.
 * Session resumption uses stateless tickets whose keys derive from a
 * 32-byte secret the master draws once before forking: every worker (and a
 * replacement worker) decrypts every other's tickets; the derived keys
 * rotate every hour and a ticket is accepted for up to two hours.
 */
#ifndef MG_TLS_H
#define MG_TLS_H

#include <stddef.h>
#include <stdint.h>

#define MG_TLS_SECRET_LEN 32

typedef struct mg_tls_s mg_tls_t;
typedef struct mg_tls_conn_s mg_tls_conn_t;

/* One certificate: PEM chain file (leaf first) and PEM private key file. */
typedef struct {
    char *cert, *key;
} mg_tls_cert_conf_t;

typedef struct {
    mg_tls_cert_conf_t *certs; /* certs[0] is the default (no SNI match) */
    size_t ncerts;
    const char *ciphers; /* TLS 1.2 cipher list; NULL: the default */
    int h2;              /* ALPN offers h2 before http/1.1 */
} mg_tls_conf_t;

/*
 * Builds the server contexts for one listener: loads every certificate and
 * key, checks that each key matches its certificate, and indexes the DNS
 * names (subjectAltName, else the subject CN) for SNI. Returns a new object
 * with one reference, or NULL with a one-line reason naming the file in
 * err. May block (file reads): config load only.
 */
mg_tls_t *mg_tls_new(const mg_tls_conf_t *conf, char *err, size_t errlen);

void mg_tls_ref(mg_tls_t *t);
/* Drops a reference; the last one frees the contexts. NULL is fine. */
void mg_tls_unref(mg_tls_t *t);

/* Sets the session-ticket secret (copied). Without one no ticket is
 * issued; full handshakes still work. */
void mg_tls_set_ticket_secret(mg_tls_t *t,
                              const uint8_t secret[MG_TLS_SECRET_LEN]);

/* Draws a fresh ticket secret from the kernel. Returns 0 or -1. */
int mg_tls_new_secret(uint8_t secret[MG_TLS_SECRET_LEN]);

/* ---- client side (TLS to upstreams) ---------------------------------- */

typedef struct mg_tls_client_s mg_tls_client_t;

typedef struct {
    const char *ca;         /* PEM CA bundle; NULL: the system store */
    int verify;             /* verify the peer's chain and name */
    const char *cert, *key; /* client certificate (mTLS); NULL: none */
} mg_tls_client_conf_t;

/*
 * A client context for one upstream: TLS 1.2+, the CA store, the optional
 * client certificate (checked against its key). NULL with a one-line
 * reason naming the file in err. Config load only.
 */
mg_tls_client_t *mg_tls_client_new(const mg_tls_client_conf_t *conf, char *err,
                                   size_t errlen);
void mg_tls_client_ref(mg_tls_client_t *c);
void mg_tls_client_unref(mg_tls_client_t *c); /* NULL is fine */

/*
 * A client session: SNI `name` (not sent when it is an IP literal) and,
 * when the context verifies, the certificate must be valid for `name` (a
 * DNS name or an IP address). Takes a reference on c.
 */
mg_tls_conn_t *mg_tls_conn_new_client(mg_tls_client_t *c, const char *name);

/* Drives the handshake with the input fed so far: 1 done, 0 more input
 * needed (send mg_tls_conn_pending first), MG_EPROTO failed (reason in
 * mg_tls_conn_error: "certificate verify failed: ..."). */
int mg_tls_conn_handshake(mg_tls_conn_t *tc);

/* True when the session holds input not yet decrypted or read. */
int mg_tls_conn_has_input(const mg_tls_conn_t *tc);

/* A server-side TLS session for one accepted connection; takes a reference
 * on `t` for its life, so a reload does not pull contexts from under a
 * handshake in progress. */
mg_tls_conn_t *mg_tls_conn_new(mg_tls_t *t);
void mg_tls_conn_free(mg_tls_conn_t *tc); /* NULL is fine */

/* Ciphertext read from the socket (copied). */
void mg_tls_conn_feed(mg_tls_conn_t *tc, const char *p, size_t n);

/*
 * Plaintext out: runs the handshake as far as the input allows, then
 * decrypts up to cap bytes into dst. Returns the bytes decrypted, 0 when
 * more input is needed, UV_EOF after the peer's close_notify, or MG_EPROTO
 * on a fatal error (bad handshake, garbage, refused version): the reason is
 * then in mg_tls_conn_error. Check mg_tls_conn_pending afterwards: the
 * handshake (or an alert) may have produced bytes to send.
 */
int mg_tls_conn_read(mg_tls_conn_t *tc, char *dst, size_t cap);

/* Plaintext in, encrypted into the outgoing buffer. 0 or MG_EPROTO. */
int mg_tls_conn_write(mg_tls_conn_t *tc, const char *p, size_t n);

/* Queues a close_notify alert (after a finished handshake only). */
void mg_tls_conn_shutdown(mg_tls_conn_t *tc);

/* Ciphertext waiting to be sent, and taking it out (up to n bytes). */
size_t mg_tls_conn_pending(const mg_tls_conn_t *tc);
size_t mg_tls_conn_take(mg_tls_conn_t *tc, char *dst, size_t n);

/* True when ALPN chose h2 (after the handshake). */
int mg_tls_conn_alpn_h2(const mg_tls_conn_t *tc);

/* The reason of the last fatal error (valid until the next call). */
const char *mg_tls_conn_error(const mg_tls_conn_t *tc);

#endif
