/*
 * The body of the router fuzz harness, shared by tests/fuzz/fuzz_router.c
 * and tests/unit/test_corpus.c. A fixed router (literals, parameters,
 * wildcards, trailing slashes, methods and hosts) is built once; each input
 * is one request:
 *     byte 0          the llhttp method number (any byte: >= 64 included)
 *     bytes 1..'\n'   the Host header (without the '\n'; no '\n': empty)
 *     the rest        the request target; cut at the first '?' and
 *                     normalized with mg_path_normalize as the gateway does
 *                     (a refused path is not routed)
 * Checks on a match: the data is one of the routes; the route's method set
 * admits the method; the number of parameters is the route's; every value
 * is a non-empty segment (no '/') inside the normalized path; the wildcard
 * is {NULL, 0} on a route without '*', else a suffix of the path that is
 * empty or starts with '/'; matching again gives the same answer.
 * Returns NULL when every invariant holds, else a static message.
 */
#ifndef MG_FUZZ_ROUTER_H
#define MG_FUZZ_ROUTER_H

#include <llhttp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "path.h"
#include "router.h"

typedef struct {
    const char *name;
    size_t nparams;
    int wildcard;
} fuzz_router_label_t;

#define FR_M(m) (1ull << HTTP_##m)
#define FR_ROUTE(pat, methods, hosts, nhosts, np, wc)                          \
    {                                                                          \
        {MG_STR(pat), methods, hosts, nhosts, NULL},                           \
        {                                                                      \
            pat, np, wc                                                        \
        }                                                                      \
    }

static const mg_str_t fuzz_router_cdn[] = {MG_STR("cdn.example.com"),
                                           MG_STR("*.static.example.com")};
static const mg_str_t fuzz_router_local[] = {MG_STR("[::1]"),
                                             MG_STR("api.example.com")};

static struct {
    mg_route_spec_t spec;
    fuzz_router_label_t label;
} fuzz_router_routes[] = {
    FR_ROUTE("/", 0, NULL, 0, 0, 0),
    FR_ROUTE("/*", 0, NULL, 0, 0, 1),
    FR_ROUTE("/users/me", FR_M(GET) | FR_M(HEAD), NULL, 0, 0, 0),
    FR_ROUTE("/users/{id}", 0, NULL, 0, 1, 0),
    FR_ROUTE("/users/{id}/posts/{post}", 0, NULL, 0, 2, 0),
    FR_ROUTE("/users/*", FR_M(DELETE), NULL, 0, 0, 1),
    FR_ROUTE("/static/*", 0, fuzz_router_cdn, 2, 0, 1),
    FR_ROUTE("/static/{file}", 0, NULL, 0, 1, 0),
    FR_ROUTE("/api/v1/{svc}/*", FR_M(POST) | FR_M(PUT), NULL, 0, 1, 1),
    FR_ROUTE("/api/v1/{svc}/*", 0, NULL, 0, 1, 1),
    FR_ROUTE("/api/v1/health", 0, fuzz_router_local, 2, 0, 0),
    FR_ROUTE("/files/{name}/", 0, NULL, 0, 1, 0),
    FR_ROUTE("/a/b/c/d/e/f/g/h", FR_M(GET), NULL, 0, 0, 0),
    FR_ROUTE("/p/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/{m}/{n}/"
             "{o}/{p}",
             0, NULL, 0, 16, 0),
    FR_ROUTE("/~user/{x}/*", 0, NULL, 0, 1, 1),
};

static mg_router_t *fuzz_router_r;

/* Builds the router on first use; aborts if it does not compile (a broken
 * harness, not a finding). Freed by fuzz_router_done (unit test only). */
static mg_router_t *fuzz_router_get(void)
{
    if (fuzz_router_r)
        return fuzz_router_r;
    size_t n = MG_ARRAY_SIZE(fuzz_router_routes);
    mg_route_spec_t specs[MG_ARRAY_SIZE(fuzz_router_routes)];
    for (size_t i = 0; i < n; i++) {
        specs[i] = fuzz_router_routes[i].spec;
        specs[i].data = &fuzz_router_routes[i].label;
    }
    char err[512];
    if (mg_router_new(specs, n, &fuzz_router_r, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_router: the fixed router is invalid: %s\n", err);
        abort();
    }
    return fuzz_router_r;
}

static inline void fuzz_router_done(void)
{
    mg_router_free(fuzz_router_r);
    fuzz_router_r = NULL;
}

static char fuzz_router_msg[256];

static const char *fuzz_router_bad(const char *what, const char *route,
                                   const char *p, size_t n)
{
    snprintf(fuzz_router_msg, sizeof(fuzz_router_msg),
             "%s (route \"%s\", path \"%.*s\")", what, route ? route : "?",
             (int)(n > 100 ? 100 : n), p);
    return fuzz_router_msg;
}

static int fuzz_router_inside(mg_str_t s, const char *p, size_t n)
{
    return s.p >= p && s.len <= n && (size_t)(s.p - p) <= n - s.len;
}

static const char *fuzz_router_check(unsigned method, mg_str_t host,
                                     const char *p, size_t n)
{
    const mg_router_t *r = fuzz_router_get();
    mg_route_match_t m, m2;
    memset(&m, 0xa5, sizeof(m));
    int rc = mg_router_match(r, method, host, (mg_str_t){p, n}, &m);
    if (rc == MG_DECLINED)
        return m.data ? fuzz_router_bad("declined with data", NULL, p, n)
                      : NULL;
    if (rc != 0)
        return fuzz_router_bad("unexpected return code", NULL, p, n);
    const fuzz_router_label_t *l = m.data;
    size_t nroutes = MG_ARRAY_SIZE(fuzz_router_routes), i;
    for (i = 0; i < nroutes; i++)
        if (l == &fuzz_router_routes[i].label)
            break;
    if (i == nroutes)
        return fuzz_router_bad("data is not a route's", NULL, p, n);
    uint64_t methods = fuzz_router_routes[i].spec.methods;
    if (methods && (method >= 64 || !(methods & (1ull << method))))
        return fuzz_router_bad("method not admitted", l->name, p, n);
    if (m.nparams != l->nparams)
        return fuzz_router_bad("wrong number of parameters", l->name, p, n);
    for (size_t k = 0; k < m.nparams; k++) {
        mg_str_t v = m.param_values[k];
        if (!m.param_names[k].p || m.param_names[k].len == 0)
            return fuzz_router_bad("empty parameter name", l->name, p, n);
        if (v.len == 0 || !fuzz_router_inside(v, p, n))
            return fuzz_router_bad("parameter value outside the path", l->name,
                                   p, n);
        if (memchr(v.p, '/', v.len))
            return fuzz_router_bad("parameter value holds '/'", l->name, p, n);
    }
    mg_str_t w = m.wildcard;
    if (!l->wildcard) {
        if (w.p || w.len)
            return fuzz_router_bad("wildcard set on a route without '*'",
                                   l->name, p, n);
    } else {
        if (!w.p || !fuzz_router_inside(w, p, n) || w.p + w.len != p + n)
            return fuzz_router_bad("wildcard is not a suffix of the path",
                                   l->name, p, n);
        if (w.len && w.p[0] != '/')
            return fuzz_router_bad("wildcard does not start with '/'", l->name,
                                   p, n);
    }
    if (mg_router_match(r, method, host, (mg_str_t){p, n}, &m2) != 0
        || m2.data != m.data)
        return fuzz_router_bad("second match differs", l->name, p, n);
    return NULL;
}

static const char *fuzz_router_one(const uint8_t *data, size_t size)
{
    if (size < 1)
        return NULL;
    unsigned method = data[0];
    const char *rest = (const char *)data + 1;
    size_t rlen = size - 1;
    mg_str_t host = {rest, 0};
    const char *nl = memchr(rest, '\n', rlen);
    if (nl) {
        host.len = (size_t)(nl - rest);
        rlen -= host.len + 1;
        rest = nl + 1;
    }
    const char *q = memchr(rest, '?', rlen);
    if (q)
        rlen = (size_t)(q - rest);
    /* Exact-size copies, so ASan sees a read past either end. */
    char *h = malloc(host.len ? host.len : 1);
    char *path = malloc(rlen ? rlen : 1);
    if (host.len)
        memcpy(h, host.p, host.len);
    host.p = h;
    size_t plen;
    const char *bad = NULL;
    if (mg_path_normalize(rest, rlen, path, &plen) == 0)
        bad = fuzz_router_check(method, host, path, plen);
    free(path);
    free(h);
    return bad;
}

#endif
