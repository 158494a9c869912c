/*
 * The router: compiles route patterns once per config generation into a
 * segment trie and matches a normalized request path against it. Pure: no
 * I/O, no Lua. Matching cost depends on the path's depth, not on how many
 * routes exist (router.c states the worst case).
 *
 * (In these comments "/\*" stands for a slash followed by a star, which
 * cannot appear inside a C comment.)
 *
 * Patterns are paths of '/'-separated segments, in normalized form (see
 * path.h: a pattern that normalization would change is refused):
 *   /users/me         literal segments: an exact route
 *   /users/{id}       a parameter matches one whole non-empty segment; its
 *                     name is letters, digits, '_' and '-'
 *   /users/\*         a trailing '*' matches "/users", "/users/" and anything
 *                     below "/users/" (never "/usersX")
 *   /                 the root only; "/\*" matches everything
 * '*' may only be the last segment; a parameter is a whole segment; at most
 * MG_ROUTER_MAX_PARAMS parameters, each name once; no empty segment ("//").
 *
 * A trailing slash is significant: "/users/me" matches "/users/me" but not
 * "/users/me/"; the pattern "/users/me/" matches only "/users/me/". (A path
 * is the text after its leading '/' split at every '/', so "/users/me/" has
 * a third, empty segment; a parameter never matches an empty segment.)
 *
 * Precedence ("most specific wins", never declaration order): the request
 * path is compared segment by segment; at each segment a literal beats a
 * parameter, which beats the wildcard. So "/users/me" beats "/users/{id}",
 * which beats "/users/\*", which beats "/\*". A route whose methods or hosts
 * refuse the request is skipped and the search goes on with the next
 * candidate (a POST-only "/users/me" lets GET fall through to
 * "/users/{id}"). Among routes with the same pattern shape (parameter names
 * do not count), a route with more conditions (methods set: 1, hosts set:
 * 1) is tried first; two routes with the same shape and the same number of
 * conditions that could both match one request are a config error reported
 * by mg_router_new.
 */
#ifndef MG_ROUTER_H
#define MG_ROUTER_H

#include "common.h"

#define MG_ROUTER_MAX_PARAMS 16

typedef struct mg_router_s mg_router_t;

/*
 * One route to compile. The router copies what it keeps (pattern, hosts);
 * the spec may be freed after mg_router_new returns. `data` is opaque and
 * handed back by mg_router_match.
 */
typedef struct {
    mg_str_t pattern;
    uint64_t methods;      /* bit (1 << llhttp method) set; 0 = any method */
    const mg_str_t *hosts; /* exact "api.example.com", "[::1]", or
                              "*.example.com" (one or more labels before
                              ".example.com", never "example.com" itself);
                              compared case-insensitively with the request
                              Host minus its ":port" and one trailing '.';
                              a pattern itself carries no port */
    size_t nhosts;         /* 0 = any host */
    void *data;
} mg_route_spec_t;

typedef struct {
    void *data; /* the matched spec's data */
    size_t nparams;
    mg_str_t param_names[MG_ROUTER_MAX_PARAMS];  /* borrow the router */
    mg_str_t param_values[MG_ROUTER_MAX_PARAMS]; /* borrow the path */
    mg_str_t wildcard; /* the part matched by '*', starting with '/' or
                          empty: on "/users/\*", "/users/a/b" gives "/a/b",
                          "/users/" gives "/" and "/users" gives ""
                          (p non-NULL); on "/\*", "/" gives "/". {NULL, 0}
                          when the route has no '*'. Borrows the path */
} mg_route_match_t;

/*
 * Compiles `n` specs. On success *out owns a new router (free with
 * mg_router_free) and 0 is returned. On an invalid pattern or host, or an
 * ambiguous pair, returns MG_ECONFIG, sets *out to NULL and writes a
 * one-line reason naming the pattern(s) into err (always NUL-terminated
 * when errlen > 0; truncated to fit). Config-load time only.
 */
int mg_router_new(const mg_route_spec_t *specs, size_t n, mg_router_t **out,
                  char *err, size_t errlen);

/*
 * Finds the most specific route for a request. `method` is an llhttp method
 * number (a route with methods set never matches one >= 64). `path` must be
 * normalized (mg_path_normalize). `host` is the Host header (may carry
 * ":port", may be empty: then only routes without hosts match). Returns 0
 * and fills *m, or MG_DECLINED when no route matches (m->data NULL).
 * Reads the router only: any thread may match while none frees it.
 */
int mg_router_match(const mg_router_t *r, unsigned method, mg_str_t host,
                    mg_str_t path, mg_route_match_t *m);

/* Frees the router and everything it copied; NULL is a no-op. */
void mg_router_free(mg_router_t *r);

#endif
