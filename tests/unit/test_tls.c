/*
 * core/tls.c without sockets: a server session and a client session wired
 * together through their memory BIOs. Certificates are made here with the
 * OpenSSL API (self-signed P-256, written to a temp directory).
 */
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdlib.h>
#include <unistd.h>
#include <uv.h>

#include "common.h"
#include "tls.h"
#include "unit.h"

static char dir[64];

/* Writes DIR/name.pem and DIR/name.key: a self-signed cert for `dns`. */
static void make_cert(const char *name, const char *dns)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), (long)getpid() + dns[0]);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, key);
    X509_NAME *n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC,
                               (const unsigned char *)dns, -1, -1, 0);
    X509_set_issuer_name(x, n);
    char san[128];
    snprintf(san, sizeof(san), "DNS:%s", dns);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    X509_EXTENSION *ext =
        X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    X509_sign(x, key, EVP_sha256());
    char path[128];
    snprintf(path, sizeof(path), "%s/%s.pem", dir, name);
    FILE *f = fopen(path, "w");
    PEM_write_X509(f, x);
    fclose(f);
    snprintf(path, sizeof(path), "%s/%s.key", dir, name);
    f = fopen(path, "w");
    PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(key);
}

static char *path_of(const char *name, const char *ext)
{
    static char bufs[8][128];
    static int i;
    char *p = bufs[i++ % 8];
    snprintf(p, 128, "%s/%s.%s", dir, name, ext);
    return p;
}

/* Moves pending bytes from one session to the other. */
static size_t shuttle(mg_tls_conn_t *from, mg_tls_conn_t *to)
{
    char buf[32768];
    size_t moved = 0, n;
    while ((n = mg_tls_conn_take(from, buf, sizeof(buf))) > 0) {
        mg_tls_conn_feed(to, buf, n);
        moved += n;
    }
    return moved;
}

/* Runs both handshakes to the end: 1 done, 0 the client failed. */
static int handshake(mg_tls_conn_t *srv, mg_tls_conn_t *cli)
{
    char dummy[16];
    for (int round = 0; round < 10; round++) {
        int c = mg_tls_conn_handshake(cli);
        if (c < 0)
            return 0;
        shuttle(cli, srv);
        if (mg_tls_conn_read(srv, dummy, sizeof(dummy)) < 0)
            return 0;
        shuttle(srv, cli);
        if (c == 1 && round > 0)
            return 1;
    }
    return 0;
}

static mg_tls_t *two_certs(void)
{
    mg_tls_cert_conf_t certs[2] = {
        {path_of("a", "pem"), path_of("a", "key")},
        {path_of("w", "pem"), path_of("w", "key")},
    };
    mg_tls_conf_t conf = {certs, 2, NULL, 0};
    char err[256];
    mg_tls_t *t = mg_tls_new(&conf, err, sizeof(err));
    if (!t)
        fprintf(stderr, "  mg_tls_new: %s\n", err);
    return t;
}

static mg_tls_client_t *client_trusting(const char *ca)
{
    mg_tls_client_conf_t cc = {.ca = ca, .verify = 1};
    char err[256];
    mg_tls_client_t *c = mg_tls_client_new(&cc, err, sizeof(err));
    if (!c)
        fprintf(stderr, "  mg_tls_client_new: %s\n", err);
    return c;
}

static void sni_chooses_exact_then_wildcard_else_default(void)
{
    mg_tls_t *t = two_certs();
    CHECK(t != NULL);
    static const struct {
        const char *name, *ca;
        int ok;
    } cases[] = {
        {"a.test", "a", 1},       {"x.w.test", "w", 1},   {"X.W.TEST", "w", 1},
        {"nomatch.test", "a", 0}, {"a.b.w.test", "w", 0}, {"w.test", "w", 0},
        {"nomatch.test", "w", 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        /* The client trusts one certificate only and checks the name: the
         * handshake succeeds only when the server picked that one and it
         * is valid for the name. */
        mg_tls_client_t *c = client_trusting(path_of(cases[i].ca, "pem"));
        CHECK(c != NULL);
        mg_tls_conn_t *srv = mg_tls_conn_new(t);
        mg_tls_conn_t *cli = mg_tls_conn_new_client(c, cases[i].name);
        int ok = handshake(srv, cli);
        if (ok != cases[i].ok)
            fprintf(stderr, "  %s: %s\n", cases[i].name,
                    mg_tls_conn_error(cli));
        CHECK_INT(ok, ==, cases[i].ok);
        mg_tls_conn_free(srv);
        mg_tls_conn_free(cli);
        mg_tls_client_unref(c);
    }
    mg_tls_unref(t);
}

static void data_flows_both_ways_after_the_handshake(void)
{
    mg_tls_t *t = two_certs();
    mg_tls_client_t *c = client_trusting(path_of("a", "pem"));
    CHECK(t && c);
    mg_tls_conn_t *srv = mg_tls_conn_new(t);
    mg_tls_conn_t *cli = mg_tls_conn_new_client(c, "a.test");
    CHECK_INT(handshake(srv, cli), ==, 1);
    static char big[100000];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)(i * 7);
    CHECK_INT(mg_tls_conn_write(cli, big, sizeof(big)), ==, 0);
    shuttle(cli, srv);
    /* Read in small pieces: what does not fit stays in the session. */
    static char got[100000];
    size_t have = 0;
    while (have < sizeof(got)) {
        int n = mg_tls_conn_read(srv, got + have,
                                 sizeof(got) - have < 1000 ? sizeof(got) - have
                                                           : 1000);
        CHECK(n > 0);
        have += (size_t)n;
        CHECK(have == sizeof(got) || mg_tls_conn_has_input(srv));
    }
    CHECK(memcmp(big, got, sizeof(big)) == 0);
    CHECK(!mg_tls_conn_has_input(srv));
    CHECK_INT(mg_tls_conn_write(srv, "pong", 4), ==, 0);
    shuttle(srv, cli);
    char four[8];
    CHECK_INT(mg_tls_conn_read(cli, four, sizeof(four)), ==, 4);
    CHECK(memcmp(four, "pong", 4) == 0);
    /* close_notify reads as end of file. */
    mg_tls_conn_shutdown(cli);
    shuttle(cli, srv);
    CHECK_INT(mg_tls_conn_read(srv, four, sizeof(four)), ==, UV_EOF);
    mg_tls_conn_free(srv);
    mg_tls_conn_free(cli);
    mg_tls_client_unref(c);
    mg_tls_unref(t);
}

static void garbage_is_a_protocol_error_with_a_reason(void)
{
    mg_tls_t *t = two_certs();
    CHECK(t != NULL);
    mg_tls_conn_t *srv = mg_tls_conn_new(t);
    static const char req[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    mg_tls_conn_feed(srv, req, sizeof(req) - 1);
    char buf[64];
    CHECK_INT(mg_tls_conn_read(srv, buf, sizeof(buf)), ==, MG_EPROTO);
    CHECK_STR(mg_tls_conn_error(srv), "http request");
    mg_tls_conn_free(srv);
    /* A handshake cut short just needs more input. */
    srv = mg_tls_conn_new(t);
    mg_tls_conn_feed(srv, "\x16\x03\x01\x00", 4);
    CHECK_INT(mg_tls_conn_read(srv, buf, sizeof(buf)), ==, 0);
    mg_tls_conn_free(srv);
    mg_tls_unref(t);
}

static void files_that_do_not_fit_are_refused_with_the_file_named(void)
{
    char err[512];
    mg_tls_cert_conf_t mismatch = {path_of("a", "pem"), path_of("w", "key")};
    mg_tls_conf_t conf = {&mismatch, 1, NULL, 0};
    CHECK(mg_tls_new(&conf, err, sizeof(err)) == NULL);
    CHECK(strstr(err, "w.key\" does not match certificate") != NULL);
    mg_tls_cert_conf_t missing = {path_of("none", "pem"), path_of("a", "key")};
    conf.certs = &missing;
    CHECK(mg_tls_new(&conf, err, sizeof(err)) == NULL);
    CHECK(strstr(err, "cannot read certificate file") != NULL);
    CHECK(strstr(err, "none.pem") != NULL);
    mg_tls_cert_conf_t swapped = {path_of("a", "key"), path_of("a", "pem")};
    conf.certs = &swapped;
    CHECK(mg_tls_new(&conf, err, sizeof(err)) == NULL);
    CHECK(strstr(err, "not a valid PEM certificate chain") != NULL);
    mg_tls_client_conf_t cc = {.ca = path_of("none", "pem"), .verify = 1};
    CHECK(mg_tls_client_new(&cc, err, sizeof(err)) == NULL);
    CHECK(strstr(err, "cannot read ca file") != NULL);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/mg-test-tls-XXXXXX");
    if (!mkdtemp(dir))
        return 2;
    make_cert("a", "a.test");
    make_cert("w", "*.w.test");
    RUN(sni_chooses_exact_then_wildcard_else_default);
    RUN(data_flows_both_ways_after_the_handshake);
    RUN(garbage_is_a_protocol_error_with_a_reason);
    RUN(files_that_do_not_fit_are_refused_with_the_file_named);
    const char *files[] = {"a.pem", "a.key", "w.pem", "w.key"};
    for (size_t i = 0; i < 4; i++) {
        char p[128];
        snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
    UNIT_EXIT();
}
