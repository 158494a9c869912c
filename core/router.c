/*
 * The router (pattern language and precedence are in router.h). Patterns
 * compile into a trie with one level per path segment. A node has:
 *   - literal children, keyed by the segment text;
 *   - at most one parameter child, shared by every "{name}" at that place
 *     (names belong to routes, not nodes: "/u/{a}" and "/u/{b}" are one
 *     shape and may carry different conditions);
 *   - `exact`: routes whose pattern ends at this node;
 *   - `wild`:  routes whose pattern is this node's path followed by "/\*"
 *              (router.h explains the backslash).
 * Both lists are ordered by condition count, most conditions first.
 *
 * Literal children are a sorted array of node pointers searched by binary
 * search (ordered by length, then bytes). The trie is built once per config
 * generation and then only read, so a sorted array is the simplest thing
 * that gives O(log k) lookup with no hash function to choose, no resizing
 * policy and no way for request bytes to steer collisions; insertion is
 * O(k) per new child, paid at load time only.
 *
 * Segments: the text after the leading '/' split at every '/'. So "/" is
 * one empty segment and "/a/" is "a" plus an empty segment; a trailing
 * slash is therefore significant on both sides: "/users/me" matches
 * "/users/me" but not "/users/me/", and the pattern "/users/me/" matches
 * only the latter. Parameters never match an empty segment.
 *
 * Matching is a depth-first walk that tries, at every segment, the literal
 * child, then the parameter child, then this node's wildcard routes, and
 * stops at the first list holding a route whose methods and hosts accept
 * the request (so a POST-only "/users/me" lets a GET fall through to
 * "/users/{id}"). A trie node is reached by one path only and always
 * compared with the same request segment, so a match visits each node at
 * most once: the worst case is the number of trie nodes whose
 * literal/parameter sequence fits the request, at most 2^depth and at most
 * the size of the trie; it is reached only when the configuration itself
 * declares that many literal/parameter combinations for one prefix. Each
 * visit costs one binary search. Recursion depth is bounded by the deepest
 * pattern, not by the request.
 *
 * Not for: path normalization (path.c, done before matching), header
 * conditions or per-route options (the config layer keeps those in `data`).
 */
#include "router.h"
#include "path.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    char *p; /* owned, NUL-terminated, as configured */
    size_t len;
    int wild; /* "*.example.com": p + 1 is the suffix ".example.com" */
} host_t;

typedef struct {
    char *pattern; /* owned copy; `names` point into it */
    size_t pattern_len;
    uint64_t methods;
    host_t *hosts;
    size_t nhosts;
    unsigned ncond; /* (methods != 0) + (nhosts != 0) */
    void *data;
    size_t nparams;
    mg_str_t names[MG_ROUTER_MAX_PARAMS];
} route_t;

typedef struct {
    route_t **v;
    size_t n, cap;
} list_t;

typedef struct node_s node_t;
struct node_s {
    char *seg; /* owned literal key; NULL for the root and param nodes */
    size_t seglen;
    node_t **kids; /* sorted by (seglen, bytes) */
    size_t nkids, capkids;
    node_t *param;
    list_t exact;
    list_t wild;
};

struct mg_router_s {
    node_t *root;
};

/* Longest pattern text quoted in an error message. */
#define QUOTE_MAX 120

/*
 * Copies s into buf for quoting in a one-line message: non-printable bytes
 * become '?', and long text is cut with "...".
 */
static const char *quote(mg_str_t s, char *buf, size_t size)
{
    size_t n = s.len < size - 4 ? s.len : size - 4, i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        buf[i] = c >= 0x20 && c < 0x7F ? (char)c : '?';
    }
    if (n < s.len) {
        memcpy(buf + i, "...", 3);
        i += 3;
    }
    buf[i] = '\0';
    return buf;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int route_fail(const route_t *rt, char *err, size_t errlen,
                      const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return MG_ECONFIG;
}

/* An error about one route: `route "<pattern>": <what>`. */
static int route_fail(const route_t *rt, char *err, size_t errlen,
                      const char *fmt, ...)
{
    char q[QUOTE_MAX + 4];
    if (errlen == 0)
        return MG_ECONFIG;
    int k =
        snprintf(err, errlen, "route \"%s\": ",
                 quote((mg_str_t){rt->pattern, rt->pattern_len}, q, sizeof(q)));
    if (k >= 0 && (size_t)k < errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + k, errlen - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return MG_ECONFIG;
}

/* ------------------------------------------------------------------ */
/* Building                                                            */
/* ------------------------------------------------------------------ */

/* Index of the '/' ending the segment that starts at s, or len. */
static size_t seg_end(const char *p, size_t len, size_t s)
{
    while (s < len && p[s] != '/')
        s++;
    return s;
}

static int name_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* Validates "{name}" and records the name in rt. */
static int check_param(route_t *rt, const char *s, size_t n, char *err,
                       size_t errlen)
{
    if (n < 2 || s[n - 1] != '}')
        return route_fail(rt, err, errlen,
                          "unbalanced '{' (a parameter is a whole segment "
                          "like \"{id}\")");
    mg_str_t name = {s + 1, n - 2};
    if (name.len == 0)
        return route_fail(rt, err, errlen, "empty parameter name \"{}\"");
    for (size_t i = 0; i < name.len; i++)
        if (!name_char((unsigned char)name.p[i]))
            return route_fail(rt, err, errlen,
                              "invalid parameter name \"%.*s\" (letters, "
                              "digits, '_' and '-' only)",
                              (int)name.len, name.p);
    for (size_t i = 0; i < rt->nparams; i++)
        if (mg_str_eq(rt->names[i], name))
            return route_fail(rt, err, errlen,
                              "duplicate parameter name \"%.*s\"",
                              (int)name.len, name.p);
    if (rt->nparams == MG_ROUTER_MAX_PARAMS)
        return route_fail(rt, err, errlen, "more than %d parameters",
                          MG_ROUTER_MAX_PARAMS);
    rt->names[rt->nparams++] = name;
    return 0;
}

static int check_segment(route_t *rt, const char *s, size_t n, int last,
                         char *err, size_t errlen)
{
    if (n == 0 && !last)
        return route_fail(rt, err, errlen, "empty segment (\"//\")");
    if (memchr(s, '*', n)) {
        if (n != 1)
            return route_fail(rt, err, errlen, "'*' must be a whole segment");
        if (!last)
            return route_fail(rt, err, errlen, "'*' must be the last segment");
        return 0;
    }
    if (n > 0 && s[0] == '{')
        return check_param(rt, s, n, err, errlen);
    if (memchr(s, '{', n) || memchr(s, '}', n))
        return route_fail(rt, err, errlen,
                          "'{' and '}' may only enclose a whole segment");
    return 0;
}

/*
 * Requests are matched after normalization, so a pattern that is not itself
 * normalized ("/a/./b", "/%7euser", "/a%2fb") could never match; saying so
 * at load beats a route that silently never fires.
 */
static int check_normalized(route_t *rt, char *err, size_t errlen)
{
    char nbuf[QUOTE_MAX + 4];
    char *norm = mg_malloc(rt->pattern_len);
    size_t nlen;
    int rc = mg_path_normalize(rt->pattern, rt->pattern_len, norm, &nlen);

    if (rc != 0) {
        rc = route_fail(rt, err, errlen,
                        "not a valid path (bad escape, '\\', %%2F, %%5C, "
                        "%%00, non-ASCII, control byte or \"..\" above "
                        "the root)");
    } else if (nlen != rt->pattern_len
               || memcmp(norm, rt->pattern, nlen) != 0) {
        rc = route_fail(rt, err, errlen,
                        "not in normalized form, so no request could match "
                        "it; write \"%s\"",
                        quote((mg_str_t){norm, nlen}, nbuf, sizeof(nbuf)));
    }
    free(norm);
    return rc;
}

static int check_pattern(route_t *rt, char *err, size_t errlen)
{
    const char *p = rt->pattern;
    size_t len = rt->pattern_len;

    if (len == 0 || p[0] != '/')
        return route_fail(rt, err, errlen, "pattern must start with '/'");
    for (size_t s = 1;;) {
        size_t e = seg_end(p, len, s);
        int rc = check_segment(rt, p + s, e - s, e == len, err, errlen);
        if (rc != 0)
            return rc;
        if (e == len)
            break;
        s = e + 1;
    }
    return check_normalized(rt, err, errlen);
}

/*
 * What is wrong with a host pattern, or NULL. Accepted: a name
 * ("api.example.com"), a bracketed IPv6 literal ("[::1]") or "*." followed
 * by a name. Ports are refused rather than ignored so that
 * "example.com:8080" does not silently mean any port.
 */
static const char *host_problem(mg_str_t h)
{
    size_t i = 0;

    if (h.p[0] == '[') {
        if (h.len < 3 || h.p[h.len - 1] != ']')
            return "an IPv6 literal is \"[...]\", with no port";
        for (i = 1; i < h.len - 1; i++) {
            unsigned char c = (unsigned char)h.p[i];
            if (!isxdigit(c) && c != ':' && c != '.')
                return "an IPv6 literal has hex digits, ':' and '.' only";
        }
        return NULL;
    }
    if (h.len > 2 && h.p[0] == '*' && h.p[1] == '.')
        i = 2;
    for (; i < h.len; i++) {
        unsigned char c = (unsigned char)h.p[i];
        if (c == '*')
            return "'*' only as a leading \"*.\"";
        if (c == ':')
            return "no port (ports are ignored when matching)";
        if (!name_char(c) && c != '.')
            return "letters, digits, '-', '_' and '.' only";
    }
    if (h.p[h.len - 1] == '.')
        return "no trailing '.'";
    return NULL;
}

static int check_host(route_t *rt, mg_str_t h, char *err, size_t errlen)
{
    char hbuf[QUOTE_MAX + 4];
    const char *why;

    if (h.len == 0)
        return route_fail(rt, err, errlen, "empty host");
    if ((why = host_problem(h)) != NULL)
        return route_fail(rt, err, errlen, "invalid host \"%s\": %s",
                          quote(h, hbuf, sizeof(hbuf)), why);
    return 0;
}

static void route_free(route_t *rt)
{
    if (!rt)
        return;
    for (size_t i = 0; i < rt->nhosts; i++)
        free(rt->hosts[i].p);
    free(rt->hosts);
    free(rt->pattern);
    free(rt);
}

/* Copies and validates one spec. On success *out owns a new route. */
static int route_make(const mg_route_spec_t *spec, route_t **out, char *err,
                      size_t errlen)
{
    route_t *rt = mg_calloc(1, sizeof(*rt));
    rt->pattern =
        mg_strndup(spec->pattern.p ? spec->pattern.p : "", spec->pattern.len);
    rt->pattern_len = spec->pattern.len;
    rt->methods = spec->methods;
    rt->data = spec->data;

    int rc = check_pattern(rt, err, errlen);
    if (rc == 0 && spec->nhosts > 0) {
        rt->hosts = mg_calloc(spec->nhosts, sizeof(*rt->hosts));
        for (size_t i = 0; i < spec->nhosts && rc == 0; i++) {
            mg_str_t h = spec->hosts[i];
            rc = check_host(rt, h, err, errlen);
            if (rc == 0) {
                rt->hosts[i].p = mg_strndup(h.p, h.len);
                rt->hosts[i].len = h.len;
                rt->hosts[i].wild = h.p[0] == '*';
                rt->nhosts = i + 1;
            }
        }
    }
    rt->ncond = (rt->methods != 0) + (rt->nhosts != 0);
    if (rc != 0) {
        route_free(rt);
        return rc;
    }
    *out = rt;
    return 0;
}

/* Case-insensitive: does `s` end with `suffix`? */
static int ends_with(mg_str_t s, mg_str_t suffix)
{
    return s.len >= suffix.len
           && mg_str_caseeq((mg_str_t){s.p + s.len - suffix.len, suffix.len},
                            suffix);
}

/* Does host pattern h accept the (port-stripped) request host? */
static int host_match(const host_t *h, mg_str_t host)
{
    if (!h->wild)
        return mg_str_caseeq((mg_str_t){h->p, h->len}, host);
    /* ".example.com" with at least one byte before it. */
    mg_str_t suffix = {h->p + 1, h->len - 1};
    return host.len > suffix.len && ends_with(host, suffix);
}

/*
 * Could one request host satisfy both patterns? Exact against exact is
 * equality; a wildcard against an exact name is a match; two wildcards
 * overlap when one suffix ends with the other ("*.example.com" and
 * "*.api.example.com" both take "x.api.example.com").
 */
static int hosts_overlap(const host_t *a, const host_t *b)
{
    if (a->wild && b->wild) {
        mg_str_t sa = {a->p + 1, a->len - 1}, sb = {b->p + 1, b->len - 1};
        return ends_with(sa, sb) || ends_with(sb, sa);
    }
    if (a->wild)
        return host_match(a, (mg_str_t){b->p, b->len});
    if (b->wild)
        return host_match(b, (mg_str_t){a->p, a->len});
    return mg_str_caseeq((mg_str_t){a->p, a->len}, (mg_str_t){b->p, b->len});
}

/* Could a single request satisfy the conditions of both routes? */
static int conditions_overlap(const route_t *a, const route_t *b)
{
    if (a->methods && b->methods && !(a->methods & b->methods))
        return 0;
    if (a->nhosts == 0 || b->nhosts == 0)
        return 1;
    for (size_t i = 0; i < a->nhosts; i++)
        for (size_t j = 0; j < b->nhosts; j++)
            if (hosts_overlap(&a->hosts[i], &b->hosts[j]))
                return 1;
    return 0;
}

/*
 * Adds rt to a node's list (same shape by construction), refusing it when
 * an existing route with as many conditions could match the same request:
 * then only declaration order could choose, which the design forbids.
 * Keeps the list sorted by ncond, descending; among equal counts order is
 * irrelevant because their conditions are disjoint.
 */
static int list_add(list_t *l, route_t *rt, char *err, size_t errlen)
{
    char qa[QUOTE_MAX + 4], qb[QUOTE_MAX + 4];
    size_t at = l->n;

    for (size_t i = 0; i < l->n; i++) {
        const route_t *o = l->v[i];
        if (o->ncond == rt->ncond && conditions_overlap(o, rt))
            return fail(
                err, errlen,
                "routes \"%s\" and \"%s\" are ambiguous: same "
                "pattern shape and the same number of conditions, "
                "and a request could satisfy both methods and hosts",
                quote((mg_str_t){o->pattern, o->pattern_len}, qa, sizeof(qa)),
                quote((mg_str_t){rt->pattern, rt->pattern_len}, qb,
                      sizeof(qb)));
        if (at == l->n && o->ncond < rt->ncond)
            at = i;
    }
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 2;
        l->v = mg_realloc(l->v, l->cap * sizeof(*l->v));
    }
    memmove(l->v + at + 1, l->v + at, (l->n - at) * sizeof(*l->v));
    l->v[at] = rt;
    l->n++;
    return 0;
}

static int seg_cmp(const char *p, size_t len, const node_t *n)
{
    if (len != n->seglen)
        return len < n->seglen ? -1 : 1;
    return len ? memcmp(p, n->seg, len) : 0;
}

/* Binary search: the index of the child keyed p[0..len), or where it goes. */
static size_t kid_find(const node_t *n, const char *p, size_t len, int *found)
{
    size_t lo = 0, hi = n->nkids;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = seg_cmp(p, len, n->kids[mid]);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    *found = 0;
    return lo;
}

static node_t *kid_get(node_t *n, const char *p, size_t len)
{
    int found;
    size_t at = kid_find(n, p, len, &found);
    if (found)
        return n->kids[at];

    node_t *k = mg_calloc(1, sizeof(*k));
    k->seg = mg_strndup(p, len);
    k->seglen = len;
    if (n->nkids == n->capkids) {
        n->capkids = n->capkids ? n->capkids * 2 : 4;
        n->kids = mg_realloc(n->kids, n->capkids * sizeof(*n->kids));
    }
    memmove(n->kids + at + 1, n->kids + at, (n->nkids - at) * sizeof(*n->kids));
    n->kids[at] = k;
    n->nkids++;
    return k;
}

/* Walks (creating as needed) the nodes of a validated pattern. */
static int insert(mg_router_t *r, route_t *rt, char *err, size_t errlen)
{
    const char *p = rt->pattern;
    size_t len = rt->pattern_len;
    node_t *n = r->root;

    for (size_t s = 1;;) {
        size_t e = seg_end(p, len, s);
        if (e - s == 1 && p[s] == '*')
            return list_add(&n->wild, rt, err, errlen);
        if (e > s && p[s] == '{') {
            if (!n->param)
                n->param = mg_calloc(1, sizeof(*n->param));
            n = n->param;
        } else {
            n = kid_get(n, p + s, e - s);
        }
        if (e == len)
            return list_add(&n->exact, rt, err, errlen);
        s = e + 1;
    }
}

int mg_router_new(const mg_route_spec_t *specs, size_t n, mg_router_t **out,
                  char *err, size_t errlen)
{
    if (errlen > 0)
        err[0] = '\0';
    *out = NULL;

    mg_router_t *r = mg_calloc(1, sizeof(*r));
    r->root = mg_calloc(1, sizeof(*r->root));
    for (size_t i = 0; i < n; i++) {
        route_t *rt;
        int rc = route_make(&specs[i], &rt, err, errlen);
        if (rc == 0) {
            rc = insert(r, rt, err, errlen);
            if (rc != 0)
                route_free(rt);
        }
        if (rc != 0) {
            mg_router_free(r);
            return rc;
        }
    }
    *out = r;
    return 0;
}

static void list_free(list_t *l)
{
    for (size_t i = 0; i < l->n; i++)
        route_free(l->v[i]);
    free(l->v);
}

/* Recursion depth is the deepest pattern's segment count. */
static void node_free(node_t *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->nkids; i++)
        node_free(n->kids[i]);
    free(n->kids);
    node_free(n->param);
    list_free(&n->exact);
    list_free(&n->wild);
    free(n->seg);
    free(n);
}

void mg_router_free(mg_router_t *r)
{
    if (!r)
        return;
    node_free(r->root);
    free(r);
}

/* ------------------------------------------------------------------ */
/* Matching                                                            */
/* ------------------------------------------------------------------ */

typedef struct {
    uint64_t method_bit; /* 1 << method; 0 if out of range */
    mg_str_t host;       /* port and one trailing '.' stripped */
    mg_str_t path;
    mg_str_t wildcard;
    size_t nvalues;
    mg_str_t values[MG_ROUTER_MAX_PARAMS];
} walk_t;

/*
 * The host name part of a Host header: "a.example.com:8080" gives
 * "a.example.com", "[::1]:8080" gives "[::1]". One trailing '.' (an
 * absolute DNS name) is dropped so "api.example.com." cannot dodge a
 * route restricted to "api.example.com".
 */
static mg_str_t host_name(mg_str_t h)
{
    if (h.len == 0)
        return h;
    if (h.p[0] == '[') {
        const char *rb = memchr(h.p, ']', h.len);
        if (rb)
            h.len = (size_t)(rb - h.p) + 1;
        return h;
    }
    const char *colon = memchr(h.p, ':', h.len);
    if (colon)
        h.len = (size_t)(colon - h.p);
    if (h.len > 0 && h.p[h.len - 1] == '.')
        h.len--;
    return h;
}

static int accepts(const route_t *rt, const walk_t *w)
{
    if (rt->methods && !(rt->methods & w->method_bit))
        return 0;
    if (rt->nhosts == 0)
        return 1;
    for (size_t i = 0; i < rt->nhosts; i++)
        if (host_match(&rt->hosts[i], w->host))
            return 1;
    return 0;
}

/* The first route in l accepting the request (l is most-conditions first). */
static const route_t *pick(const list_t *l, const walk_t *w)
{
    for (size_t i = 0; i < l->n; i++)
        if (accepts(l->v[i], w))
            return l->v[i];
    return NULL;
}

/*
 * Matches the rest of the path, path[pos..], at node n. pos is either the
 * end of the path or the index of the '/' that starts the next segment;
 * everything before pos has been consumed by n's ancestors.
 */
static const route_t *walk(const node_t *n, size_t pos, walk_t *w)
{
    const char *p = w->path.p;
    size_t len = w->path.len;
    const route_t *rt;

    if (pos == len) {
        if ((rt = pick(&n->exact, w)) != NULL)
            return rt;
        /* "/users/\*" takes "/users" itself, capturing "". */
        if ((rt = pick(&n->wild, w)) != NULL)
            w->wildcard = (mg_str_t){p + len, 0};
        return rt;
    }

    size_t s = pos + 1, e = seg_end(p, len, s);
    int found;
    size_t at = kid_find(n, p + s, e - s, &found);
    if (found && (rt = walk(n->kids[at], e, w)) != NULL)
        return rt;

    if (n->param && e > s && w->nvalues < MG_ROUTER_MAX_PARAMS) {
        w->values[w->nvalues++] = (mg_str_t){p + s, e - s};
        if ((rt = walk(n->param, e, w)) != NULL)
            return rt;
        w->nvalues--;
    }

    if ((rt = pick(&n->wild, w)) != NULL)
        w->wildcard = (mg_str_t){p + pos, len - pos};
    return rt;
}

int mg_router_match(const mg_router_t *r, unsigned method, mg_str_t host,
                    mg_str_t path, mg_route_match_t *m)
{
    walk_t w;

    m->data = NULL;
    m->nparams = 0;
    m->wildcard = MG_NULL_STR;
    if (path.len == 0 || path.p[0] != '/')
        return MG_DECLINED;

    w.method_bit = method < 64 ? (uint64_t)1 << method : 0;
    w.host = host_name(host);
    w.path = path;
    w.wildcard = MG_NULL_STR;
    w.nvalues = 0;

    const route_t *rt = walk(r->root, 0, &w);
    if (!rt)
        return MG_DECLINED;

    /* The param nodes on the way are exactly the pattern's parameters. */
    m->data = rt->data;
    m->nparams = rt->nparams;
    for (size_t i = 0; i < rt->nparams; i++) {
        m->param_names[i] = rt->names[i];
        m->param_values[i] = w.values[i];
    }
    m->wildcard = w.wildcard;
    return 0;
}
