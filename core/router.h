/*
 * The router: compiles route patterns once per config generation into a
 * segment trie and matches a normalized request path against it. Pure: no
 * I/O, no Lua. Matching cost depends on the path's depth, not on how many
 * routes exist.
 *
 * Patterns are paths of '/'-separated segments:
 *   /users/me         literal segments: an exact route
 *   /users/{id}       a parameter matches one whole non-empty segment
 *   /users/*          a trailing '*' matches "/users", "/users/" and anything
 *                     below "/users/" (never "/usersX")
 *   /                 the root only; "/*" matches everything
 * '*' may only be the last segment; a parameter is a whole segment.
 *
 * Precedence ("most specific wins", never declaration order): the request
 * path is compared segment by segment; at each segment a literal beats a
 * parameter, which beats the wildcard. So "/users/me" beats "/users/{id}",
 * which beats "/users/*", which beats "/*". Among routes with the same
 * pattern, a route with more conditions (methods, hosts) is tried first; two
 * routes with the same pattern and the same number of conditions that could
 * both match one request are a config error reported by mg_router_new.
 */
#ifndef MG_ROUTER_H
#define MG_ROUTER_H

#include "common.h"

#define MG_ROUTER_MAX_PARAMS 16

typedef struct mg_router_s mg_router_t;

/* One route to compile. The router copies what it keeps; `data` is opaque. */
typedef struct {
    mg_str_t pattern;
    uint64_t methods;     /* bit (1 << llhttp method) set; 0 = any method */
    const mg_str_t *hosts; /* exact "api.example.com" or "*.example.com";
                              compared case-insensitively, port ignored */
    size_t nhosts;        /* 0 = any host */
    void *data;
} mg_route_spec_t;

typedef struct {
    void *data;                 /* the matched spec's data */
    size_t nparams;
    mg_str_t param_names[MG_ROUTER_MAX_PARAMS];  /* borrow the router */
    mg_str_t param_values[MG_ROUTER_MAX_PARAMS]; /* borrow the path */
    mg_str_t wildcard;  /* the part matched by '*', starting with '/' or
                           empty ("/users/a/b" on "/users/*" gives "/a/b");
                           borrows the path */
} mg_route_match_t;

/*
 * Compiles `n` specs. On success *out owns a new router (free with
 * mg_router_free) and 0 is returned. On an invalid pattern or an ambiguous
 * pair, returns MG_ECONFIG and writes a one-line reason naming the
 * pattern(s) into err (always NUL-terminated when errlen > 0).
 */
int mg_router_new(const mg_route_spec_t *specs, size_t n, mg_router_t **out,
                  char *err, size_t errlen);

/*
 * Finds the most specific route for a request. `path` must be normalized.
 * `host` is the Host header (may carry ":port", may be empty). Returns 0 and
 * fills *m, or MG_DECLINED when no route matches.
 */
int mg_router_match(const mg_router_t *r, unsigned method, mg_str_t host,
                    mg_str_t path, mg_route_match_t *m);

void mg_router_free(mg_router_t *r);

#endif
