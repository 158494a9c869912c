/*
 * TLS termination (tls.h): OpenSSL contexts per listener and per-connection
 * sessions over memory BIOs. Not here: sockets, timeouts and HTTP, which
 * stay in http1.c; the config syntax, which is config.c's.
 *
 * SNI: each certificate gets its own SSL_CTX (all configured alike); the
 * servername callback switches a session to the context whose names match
 * the requested host, exact names first, then a one-label wildcard
 * ("*.example.com" matches "a.example.com", not "example.com" nor
 * "a.b.example.com"); no match keeps the first certificate.
 */
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common.h"

/* Mozilla's "intermediate" TLS 1.2 list: ECDHE + AEAD only. TLS 1.3 keeps
 * OpenSSL's default suites (all AEAD). */
#define DEFAULT_CIPHERS                                                        \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"               \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"               \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
#define TICKET_PERIOD_S 3600 /* key rotation; tickets live up to 2 periods */

typedef struct {
    SSL_CTX *ctx;
    char **names; /* lower-case DNS names, "*.x" for wildcards */
    size_t nnames;
} cert_t;

struct mg_tls_s {
    unsigned refs;
    cert_t *certs;
    size_t ncerts;
    int has_secret;
    uint8_t secret[MG_TLS_SECRET_LEN];
    int h2; /* ALPN may choose h2 */
};

struct mg_tls_client_s {
    unsigned refs;
    SSL_CTX *ctx;
    int verify;
};

struct mg_tls_conn_s {
    SSL *ssl; /* owns both BIOs */
    BIO *rbio, *wbio;
    mg_tls_t *tls;           /* server side */
    mg_tls_client_t *client; /* client side */
    char err[160];
};

/* ---- ticket keys ---------------------------------------------------------
 * Keys for period N are HMAC-SHA256(secret, label || N): the same in every
 * worker without any shared state, and a new set every TICKET_PERIOD_S. */

typedef struct {
    unsigned char name[16], aes[32], mac[32];
} ticket_key_t;

static void derive(const uint8_t *secret, uint64_t period, ticket_key_t *k)
{
    static const char *const labels[] = {"name", "aes", "mac"};
    unsigned char *outs[] = {k->name, k->aes, k->mac};
    for (int i = 0; i < 3; i++) {
        unsigned char msg[16], md[32];
        unsigned mdlen = sizeof(md);
        memset(msg, 0, sizeof(msg));
        memcpy(msg, labels[i], strlen(labels[i]));
        for (int b = 0; b < 8; b++)
            msg[8 + b] = (unsigned char)(period >> (56 - 8 * b));
        HMAC(EVP_sha256(), secret, MG_TLS_SECRET_LEN, msg, sizeof(msg), md,
             &mdlen);
        memcpy(outs[i], md, i == 0 ? 16 : 32);
    }
}

static int set_mac_key(EVP_MAC_CTX *hctx, unsigned char *key)
{
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, 32);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                 (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    return EVP_MAC_CTX_set_params(hctx, params) == 1 ? 0 : -1;
}

/* OpenSSL's ticket callback: 1 done, 2 done and renew (decrypt only), 0 no
 * ticket / unknown key (a full handshake follows), -1 error. */
static int on_ticket(SSL *ssl, unsigned char name[16], unsigned char *iv,
                     EVP_CIPHER_CTX *ectx, EVP_MAC_CTX *hctx, int enc)
{
    mg_tls_t *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (!t || !t->has_secret)
        return 0;
    uint64_t now = (uint64_t)time(NULL) / TICKET_PERIOD_S;
    ticket_key_t k;
    if (enc) {
        derive(t->secret, now, &k);
        if (RAND_bytes(iv, 16) != 1)
            return -1;
        memcpy(name, k.name, 16);
        if (EVP_EncryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, k.aes, iv) != 1
            || set_mac_key(hctx, k.mac) < 0)
            return -1;
        return 1;
    }
    for (uint64_t back = 0; back < 2; back++) {
        derive(t->secret, now - back, &k);
        if (memcmp(name, k.name, 16) != 0)
            continue;
        if (set_mac_key(hctx, k.mac) < 0
            || EVP_DecryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, k.aes, iv)
                   != 1)
            return -1;
        return back ? 2 : 1; /* an older key: issue a fresh ticket */
    }
    return 0;
}

/* ---- SNI and ALPN -------------------------------------------------------- */

static int name_matches(const char *pattern, const char *host)
{
    if (pattern[0] != '*')
        return strcasecmp(pattern, host) == 0;
    const char *dot = strchr(host, '.');
    return dot && dot != host && strcasecmp(pattern + 1, dot) == 0;
}

static SSL_CTX *find_ctx(const mg_tls_t *t, const char *host)
{
    for (int wild = 0; wild < 2; wild++)
        for (size_t i = 0; i < t->ncerts; i++)
            for (size_t j = 0; j < t->certs[i].nnames; j++) {
                const char *n = t->certs[i].names[j];
                if ((n[0] == '*') == wild && name_matches(n, host))
                    return t->certs[i].ctx;
            }
    return NULL;
}

static int on_servername(SSL *ssl, int *alert, void *arg)
{
    const mg_tls_t *t = arg;
    const char *host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!host || t->ncerts < 2)
        return SSL_TLSEXT_ERR_OK;
    SSL_CTX *ctx = find_ctx(t, host);
    if (ctx && ctx != SSL_get_SSL_CTX(ssl))
        SSL_set_SSL_CTX(ssl, ctx);
    return SSL_TLSEXT_ERR_OK;
}

/* h2 first when the listener speaks it, then http/1.1 (our preference
 * order). A client offering neither goes on without ALPN (as nginx does)
 * rather than failing. */
static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                   const unsigned char *in, unsigned inlen, void *arg)
{
    static const unsigned char both[] = "\x02h2\x08http/1.1";
    const mg_tls_t *t = arg;
    const unsigned char *ours = t->h2 ? both : both + 3;
    unsigned ourlen = t->h2 ? sizeof(both) - 1 : sizeof(both) - 4;
    unsigned char *sel;
    if (SSL_select_next_proto(&sel, outlen, ours, ourlen, in, inlen)
        != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

/* ---- contexts ------------------------------------------------------------ */

static void ssl_reason(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    snprintf(buf, len, "%s", r ? r : "unknown OpenSSL error");
    ERR_clear_error();
}

static void add_name(cert_t *c, const char *name, size_t len)
{
    if (len == 0 || memchr(name, '\0', len))
        return;
    c->names = mg_realloc(c->names, (c->nnames + 1) * sizeof(char *));
    char *n = mg_strndup(name, len);
    for (char *p = n; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p += 32;
    c->names[c->nnames++] = n;
}

/* DNS names of the leaf: subjectAltName entries, else the subject CN. */
static void index_names(cert_t *c, X509 *x)
{
    GENERAL_NAMES *sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
        if (g->type == GEN_DNS)
            add_name(c, (const char *)ASN1_STRING_get0_data(g->d.dNSName),
                     (size_t)ASN1_STRING_length(g->d.dNSName));
    }
    GENERAL_NAMES_free(sans);
    if (c->nnames)
        return;
    char cn[256];
    int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName,
                                      cn, sizeof(cn));
    if (n > 0)
        add_name(c, cn, (size_t)n);
}

static int readable(const char *what, const char *path, char *err,
                    size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot read %s file \"%s\": %s", what, path,
                 strerror(errno));
        return -1;
    }
    fclose(f);
    return 0;
}

static SSL_CTX *new_ctx(mg_tls_t *t, const mg_tls_conf_t *conf, char *err,
                        size_t errlen)
{
    char why[160];
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        abort(); /* out of memory */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION
                                 | SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Idle keep-alive connections give their record buffers back. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    const char *ciphers = conf->ciphers ? conf->ciphers : DEFAULT_CIPHERS;
    if (SSL_CTX_set_cipher_list(ctx, ciphers) != 1) {
        ssl_reason(why, sizeof(why));
        snprintf(err, errlen, "ciphers: no usable cipher in \"%s\" (%s)",
                 ciphers, why);
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* Stateless tickets only: a server-side cache would be per worker. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"moongate", 8);
    SSL_CTX_set_timeout(ctx, 2 * TICKET_PERIOD_S);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on_ticket);
    SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
    SSL_CTX_set_tlsext_servername_arg(ctx, t);
    SSL_CTX_set_alpn_select_cb(ctx, on_alpn, t);
    SSL_CTX_set_app_data(ctx, t);
    return ctx;
}

/* Loads a certificate chain and its key into ctx; checks they match. */
static int use_cert_key(SSL_CTX *ctx, const mg_tls_cert_conf_t *cc, char *err,
                        size_t errlen)
{
    char why[160];
    if (readable("certificate", cc->cert, err, errlen) < 0
        || readable("key", cc->key, err, errlen) < 0)
        return -1;
    if (SSL_CTX_use_certificate_chain_file(ctx, cc->cert) != 1) {
        ssl_reason(why, sizeof(why));
        snprintf(err, errlen,
                 "certificate file \"%s\": not a valid PEM certificate "
                 "chain (%s)",
                 cc->cert, why);
        return -1;
    }
    /* The key is read on its own first, so that a bad file and a key of
     * another certificate get different messages. */
    EVP_PKEY *pkey = NULL;
    FILE *f = fopen(cc->key, "r");
    if (f) {
        pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
        fclose(f);
    }
    if (!pkey) {
        ssl_reason(why, sizeof(why));
        snprintf(err, errlen,
                 "key file \"%s\": not an unencrypted PEM private key (%s)",
                 cc->key, why);
        return -1;
    }
    int match = X509_check_private_key(SSL_CTX_get0_certificate(ctx), pkey);
    ERR_clear_error();
    if (match != 1) {
        EVP_PKEY_free(pkey);
        snprintf(err, errlen,
                 "key file \"%s\" does not match certificate \"%s\"", cc->key,
                 cc->cert);
        return -1;
    }
    int used = SSL_CTX_use_PrivateKey(ctx, pkey);
    EVP_PKEY_free(pkey);
    if (used != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        ssl_reason(why, sizeof(why));
        snprintf(err, errlen, "key file \"%s\": unusable key (%s)", cc->key,
                 why);
        return -1;
    }
    return 0;
}

static int load_cert(mg_tls_t *t, const mg_tls_conf_t *conf,
                     const mg_tls_cert_conf_t *cc, cert_t *c, char *err,
                     size_t errlen)
{
    if (readable("certificate", cc->cert, err, errlen) < 0
        || readable("key", cc->key, err, errlen) < 0)
        return -1;
    c->ctx = new_ctx(t, conf, err, errlen);
    if (!c->ctx || use_cert_key(c->ctx, cc, err, errlen) < 0)
        return -1;
    index_names(c, SSL_CTX_get0_certificate(c->ctx));
    return 0;
}

mg_tls_t *mg_tls_new(const mg_tls_conf_t *conf, char *err, size_t errlen)
{
    mg_tls_t *t = mg_calloc(1, sizeof(*t));
    t->refs = 1;
    t->h2 = conf->h2;
    t->certs = mg_calloc(conf->ncerts, sizeof(cert_t));
    for (size_t i = 0; i < conf->ncerts; i++) {
        t->ncerts = i + 1;
        if (load_cert(t, conf, &conf->certs[i], &t->certs[i], err, errlen)
            < 0) {
            mg_tls_unref(t);
            return NULL;
        }
    }
    return t;
}

void mg_tls_ref(mg_tls_t *t)
{
    t->refs++;
}

void mg_tls_unref(mg_tls_t *t)
{
    if (!t || --t->refs > 0)
        return;
    for (size_t i = 0; i < t->ncerts; i++) {
        SSL_CTX_free(t->certs[i].ctx);
        for (size_t j = 0; j < t->certs[i].nnames; j++)
            free(t->certs[i].names[j]);
        free(t->certs[i].names);
    }
    free(t->certs);
    OPENSSL_cleanse(t->secret, sizeof(t->secret));
    free(t);
}

void mg_tls_set_ticket_secret(mg_tls_t *t,
                              const uint8_t secret[MG_TLS_SECRET_LEN])
{
    memcpy(t->secret, secret, MG_TLS_SECRET_LEN);
    t->has_secret = 1;
}

int mg_tls_new_secret(uint8_t secret[MG_TLS_SECRET_LEN])
{
    return getrandom(secret, MG_TLS_SECRET_LEN, 0) == MG_TLS_SECRET_LEN ? 0
                                                                        : -1;
}

/* ---- connections --------------------------------------------------------- */

static int fatal(mg_tls_conn_t *tc, int sslerr);

static mg_tls_conn_t *conn_new(SSL_CTX *ctx)
{
    mg_tls_conn_t *tc = mg_calloc(1, sizeof(*tc));
    tc->ssl = SSL_new(ctx);
    tc->rbio = BIO_new(BIO_s_mem());
    tc->wbio = BIO_new(BIO_s_mem());
    if (!tc->ssl || !tc->rbio || !tc->wbio)
        abort(); /* out of memory */
    /* An empty input BIO means "more to come", not end of file. */
    BIO_set_mem_eof_return(tc->rbio, -1);
    SSL_set_bio(tc->ssl, tc->rbio, tc->wbio);
    return tc;
}

mg_tls_conn_t *mg_tls_conn_new(mg_tls_t *t)
{
    mg_tls_conn_t *tc = conn_new(t->certs[0].ctx);
    SSL_set_accept_state(tc->ssl);
    tc->tls = t;
    mg_tls_ref(t);
    return tc;
}

mg_tls_conn_t *mg_tls_conn_new_client(mg_tls_client_t *c, const char *name)
{
    mg_tls_conn_t *tc = conn_new(c->ctx);
    unsigned char ip[16];
    int is_ip =
        inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1;
    if (!is_ip)
        SSL_set_tlsext_host_name(tc->ssl, name);
    if (c->verify) {
        if (is_ip)
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(tc->ssl), name);
        else
            SSL_set1_host(tc->ssl, name);
    }
    SSL_set_connect_state(tc->ssl);
    tc->client = c;
    mg_tls_client_ref(c);
    return tc;
}

int mg_tls_conn_handshake(mg_tls_conn_t *tc)
{
    int rc = SSL_do_handshake(tc->ssl);
    if (rc == 1)
        return 1;
    int e = SSL_get_error(tc->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    long v = SSL_get_verify_result(tc->ssl);
    if (v != X509_V_OK) {
        snprintf(tc->err, sizeof(tc->err), "certificate verify failed: %s",
                 X509_verify_cert_error_string(v));
        ERR_clear_error();
        return MG_EPROTO;
    }
    return fatal(tc, e);
}

int mg_tls_conn_has_input(const mg_tls_conn_t *tc)
{
    return SSL_pending(tc->ssl) > 0 || BIO_ctrl_pending(tc->rbio) > 0;
}

/* ---- client contexts ----------------------------------------------------- */

mg_tls_client_t *mg_tls_client_new(const mg_tls_client_conf_t *conf, char *err,
                                   size_t errlen)
{
    char why[160];
    mg_tls_client_t *c = mg_calloc(1, sizeof(*c));
    c->refs = 1;
    c->verify = conf->verify;
    c->ctx = SSL_CTX_new(TLS_client_method());
    if (!c->ctx)
        abort(); /* out of memory */
    SSL_CTX_set_min_proto_version(c->ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(c->ctx,
                        SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(c->ctx, SSL_MODE_RELEASE_BUFFERS);
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX_set_alpn_protos(c->ctx, alpn, sizeof(alpn) - 1);
    if (conf->verify) {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
        if (conf->ca) {
            if (readable("ca", conf->ca, err, errlen) < 0)
                goto fail;
            if (SSL_CTX_load_verify_locations(c->ctx, conf->ca, NULL) != 1) {
                ssl_reason(why, sizeof(why));
                snprintf(err, errlen,
                         "ca file \"%s\": no PEM certificate in it (%s)",
                         conf->ca, why);
                goto fail;
            }
        } else if (SSL_CTX_set_default_verify_paths(c->ctx) != 1) {
            ssl_reason(why, sizeof(why));
            snprintf(err, errlen, "cannot load the system CA store (%s)", why);
            goto fail;
        }
    }
    if (conf->cert || conf->key) {
        mg_tls_cert_conf_t cc = {(char *)conf->cert, (char *)conf->key};
        if (!conf->cert || !conf->key) {
            snprintf(err, errlen, "client cert and key go together");
            goto fail;
        }
        if (use_cert_key(c->ctx, &cc, err, errlen) < 0)
            goto fail;
    }
    return c;
fail:
    mg_tls_client_unref(c);
    return NULL;
}

void mg_tls_client_ref(mg_tls_client_t *c)
{
    c->refs++;
}

void mg_tls_client_unref(mg_tls_client_t *c)
{
    if (!c || --c->refs > 0)
        return;
    SSL_CTX_free(c->ctx);
    free(c);
}

void mg_tls_conn_free(mg_tls_conn_t *tc)
{
    if (!tc)
        return;
    SSL_free(tc->ssl);
    mg_tls_unref(tc->tls);
    mg_tls_client_unref(tc->client);
    free(tc);
}

void mg_tls_conn_feed(mg_tls_conn_t *tc, const char *p, size_t n)
{
    if (n && BIO_write(tc->rbio, p, (int)n) != (int)n)
        abort(); /* a memory BIO only fails without memory */
}

/* Records why a session failed and empties OpenSSL's error queue, which is
 * per thread and would otherwise leak into the next connection's calls. */
static int fatal(mg_tls_conn_t *tc, int sslerr)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    snprintf(tc->err, sizeof(tc->err), "%s",
             r                             ? r
             : sslerr == SSL_ERROR_SYSCALL ? "unexpected end of stream"
                                           : "protocol error");
    ERR_clear_error();
    return MG_EPROTO;
}

int mg_tls_conn_read(mg_tls_conn_t *tc, char *dst, size_t cap)
{
    if (cap > INT32_MAX)
        cap = INT32_MAX;
    int n = SSL_read(tc->ssl, dst, (int)cap);
    if (n > 0)
        return n;
    int e = SSL_get_error(tc->ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_ZERO_RETURN)
        return UV_EOF;
    return fatal(tc, e);
}

int mg_tls_conn_write(mg_tls_conn_t *tc, const char *p, size_t n)
{
    while (n > 0) {
        int chunk = n > INT32_MAX ? INT32_MAX : (int)n;
        int k = SSL_write(tc->ssl, p, chunk);
        if (k <= 0)
            return fatal(tc, SSL_get_error(tc->ssl, k));
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

void mg_tls_conn_shutdown(mg_tls_conn_t *tc)
{
    if (SSL_is_init_finished(tc->ssl))
        SSL_shutdown(tc->ssl);
    ERR_clear_error();
}

size_t mg_tls_conn_pending(const mg_tls_conn_t *tc)
{
    return BIO_ctrl_pending(tc->wbio);
}

size_t mg_tls_conn_take(mg_tls_conn_t *tc, char *dst, size_t n)
{
    int k = n ? BIO_read(tc->wbio, dst, n > INT32_MAX ? INT32_MAX : (int)n) : 0;
    return k > 0 ? (size_t)k : 0;
}

int mg_tls_conn_alpn_h2(const mg_tls_conn_t *tc)
{
    const unsigned char *p;
    unsigned len;
    SSL_get0_alpn_selected(tc->ssl, &p, &len);
    return len == 2 && memcmp(p, "h2", 2) == 0;
}

const char *mg_tls_conn_error(const mg_tls_conn_t *tc)
{
    return tc->err;
}
