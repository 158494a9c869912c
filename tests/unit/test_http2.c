/*
 * mg_h2_head_to_nv: the gateway's HTTP/1 response heads (what proxy.c and
 * mg_conn_respond write) turned into HTTP/2 fields.
 */
#include "http2.h"
#include "unit.h"

static int nv_is(const nghttp2_nv *nv, const char *name, const char *value)
{
    return nv->namelen == strlen(name)
           && memcmp(nv->name, name, nv->namelen) == 0
           && nv->valuelen == strlen(value)
           && memcmp(nv->value, value, nv->valuelen) == 0;
}

static void test_status_first_names_lowercased_values_kept(void)
{
    mg_arena_t a;
    mg_arena_init(&a);
    static const char head[] = "HTTP/1.1 201 Created\r\n"
                               "Content-Type: application/JSON\r\n"
                               "X-Request-Id: abc\r\n"
                               "Set-Cookie: a=1\r\n"
                               "Set-Cookie: b=2\r\n"
                               "Content-Length: 12\r\n"
                               "\r\n";
    nghttp2_nv *nv;
    size_t n;
    int status = mg_h2_head_to_nv(&a, head, sizeof(head) - 1, &nv, &n);
    CHECK_INT(status, ==, 201);
    CHECK_INT(n, ==, 6);
    CHECK(nv_is(&nv[0], ":status", "201"));
    CHECK(nv_is(&nv[1], "content-type", "application/JSON"));
    CHECK(nv_is(&nv[2], "x-request-id", "abc"));
    CHECK(nv_is(&nv[3], "set-cookie", "a=1"));
    CHECK(nv_is(&nv[4], "set-cookie", "b=2"));
    CHECK(nv_is(&nv[5], "content-length", "12"));
    mg_arena_free(&a);
}

static void test_connection_specific_headers_dropped(void)
{
    mg_arena_t a;
    mg_arena_init(&a);
    static const char head[] = "HTTP/1.1 200 OK\r\n"
                               "Connection: close\r\n"
                               "Keep-Alive: timeout=5\r\n"
                               "Transfer-Encoding: chunked\r\n"
                               "Upgrade: h2c\r\n"
                               "Proxy-Connection: keep-alive\r\n"
                               "TE: trailers\r\n"
                               "Server:   moongate  \r\n"
                               "\r\n";
    nghttp2_nv *nv;
    size_t n;
    CHECK_INT(mg_h2_head_to_nv(&a, head, sizeof(head) - 1, &nv, &n), ==, 200);
    CHECK_INT(n, ==, 2);
    CHECK(nv_is(&nv[0], ":status", "200"));
    /* Leading whitespace goes; the value is otherwise as written. */
    CHECK(nv_is(&nv[1], "server", "moongate  "));
    mg_arena_free(&a);
}

static void test_malformed_heads_refused(void)
{
    static const char *const bad[] = {
        "HTTP/1.1 20 OK\r\n\r\n",  /* two-digit status */
        "HTTP/1.1 abc OK\r\n\r\n", /* not a number */
        "HTTP/2.0 200 OK\r\n\r\n", /* not an HTTP/1 head */
        "HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        "HTTP/1.1 200 OK\r\n: empty-name\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A: 1", /* no end of line */
        "HTTP/1.1 099 OK\r\n\r\n",   /* below 100 */
        "",
    };
    mg_arena_t a;
    mg_arena_init(&a);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        nghttp2_nv *nv;
        size_t n;
        if (mg_h2_head_to_nv(&a, bad[i], strlen(bad[i]), &nv, &n) != -1)
            FAIL_AT("accepted: %s", bad[i]);
    }
    mg_arena_free(&a);
}

static void test_preface_prefixes(void)
{
    static const char pri[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    CHECK_INT(mg_h2_preface(pri, sizeof(pri) - 1), ==, 1);
    CHECK_INT(mg_h2_preface(pri, 5), ==, 0);
    CHECK_INT(mg_h2_preface("P", 1), ==, 0);
    CHECK_INT(mg_h2_preface("POST / HTTP/1.1\r\n", 17), ==, -1);
    CHECK_INT(mg_h2_preface("PRI * HTTP/1.1\r\n", 16), ==, -1);
}

int main(void)
{
    RUN(test_status_first_names_lowercased_values_kept);
    RUN(test_connection_specific_headers_dropped);
    RUN(test_malformed_heads_refused);
    RUN(test_preface_prefixes);
    UNIT_EXIT();
}
