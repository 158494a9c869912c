/*
 * `moongate explain`: runs the request-independent half of the pipeline on
 * a request described on the command line — the same method check, path
 * normalization, router and plugin-chain builder the workers use — and
 * prints the outcome for an operator: the route, the normalized path and
 * its parameters, the plugins per phase in run order with their effective
 * (schema-checked, defaults filled) configs, and the upstream. It does not
 * run plugins or contact anything, so what a plugin decides at run time
 * (auth, limits) is not predicted; this is said in the output.
 */
#include "explain.h"

#include <ctype.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "lua.h"
#include "path.h"
#include "router.h"

/* The methods a worker accepts (http1.c refuses the others with 501). */
static const char *const accepted_methods[] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
};

static int method_number(const char *name, unsigned *out)
{
    for (size_t i = 0; i < MG_ARRAY_SIZE(accepted_methods); i++)
        if (strcmp(name, accepted_methods[i]) == 0)
            for (unsigned k = 0; k < 64; k++)
                if (strcmp(llhttp_method_name((llhttp_method_t)k), name) == 0) {
                    *out = k;
                    return 0;
                }
    return -1;
}

static mg_router_t *build_router(const mg_config_t *cfg)
{
    mg_route_spec_t *specs = mg_calloc(cfg->nroutes + 1, sizeof(*specs));
    mg_str_t **hosts = mg_calloc(cfg->nroutes + 1, sizeof(*hosts));
    for (size_t i = 0; i < cfg->nroutes; i++) {
        const mg_route_conf_t *rc = &cfg->routes[i];
        hosts[i] = mg_calloc(rc->nhosts + 1, sizeof(mg_str_t));
        for (size_t k = 0; k < rc->nhosts; k++)
            hosts[i][k] = mg_str_from_cstr(rc->hosts[k]);
        specs[i] = (mg_route_spec_t){.pattern = mg_str_from_cstr(rc->path),
                                     .methods = rc->methods,
                                     .hosts = hosts[i],
                                     .nhosts = rc->nhosts,
                                     .data = (void *)rc};
    }
    mg_router_t *router = NULL;
    char why[512];
    /* The config was validated, routes included: this cannot fail. */
    if (mg_router_new(specs, cfg->nroutes, &router, why, sizeof(why)))
        fprintf(stderr, "moongate: %s\n", why);
    for (size_t i = 0; i < cfg->nroutes; i++)
        free(hosts[i]);
    free(hosts);
    free(specs);
    return router;
}

/* What becomes of a header the client sends (see DESIGN.md, Routing). */
static const char *header_fate(const mg_config_t *cfg, const char *name,
                               size_t len)
{
    if (memchr(name, '_', len))
        return "dropped: header names with '_' are never forwarded";
    for (size_t i = 0; i < cfg->nidentity_headers; i++)
        if (strlen(cfg->identity_headers[i]) == len
            && strncasecmp(cfg->identity_headers[i], name, len) == 0)
            return "removed before any plugin runs (identity header)";
    return "passed to the plugins and the upstream";
}

/* "Name: value" -> sets *host when it is the Host header. */
static int parse_header(const char *h, const char **host)
{
    const char *colon = strchr(h, ':');
    if (!colon || colon == h)
        return -1;
    for (const char *p = h; p < colon; p++)
        if (!isgraph((unsigned char)*p))
            return -1;
    if (colon - h == 4 && strncasecmp(h, "host", 4) == 0) {
        const char *v = colon + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        *host = v;
    }
    return 0;
}

static void print_upstream(const mg_config_t *cfg, const mg_route_conf_t *rt)
{
    if (rt->upstream < 0) {
        printf("upstream:  none: the route's Lua handler answers\n");
        return;
    }
    const mg_upstream_conf_t *u = &cfg->upstreams[rt->upstream];
    printf("upstream:  %s (balance %s)\n", u->name,
           u->balance ? u->balance : "round_robin");
    for (size_t i = 0; i < u->ntargets; i++)
        printf("  target   %s weight %u\n", u->targets[i].text,
               u->targets[i].weight);
    printf("  timeouts connect %llu ms, send %llu ms, read %llu ms, "
           "tunnel_idle %llu ms\n",
           (unsigned long long)rt->timeouts.connect_ms,
           (unsigned long long)rt->timeouts.send_ms,
           (unsigned long long)rt->timeouts.read_ms,
           (unsigned long long)rt->timeouts.tunnel_idle_ms);
    if (rt->strip_prefix)
        printf("  strip_prefix %s\n", rt->strip_prefix);
    if (rt->rewrite)
        printf("  rewrite  %s\n", rt->rewrite);
}

/* One entry, {"name":"x","priority":N,"config":C}, as "N. x (priority N)
 * C": runtime.describe writes the keys in that order. */
static void print_entry(int n, const char *p, size_t len)
{
    static const char pre[] = "{\"name\":\"";
    const char *name = p + sizeof(pre) - 1;
    const char *prio = strstr(p, "\",\"priority\":");
    const char *conf = prio ? strstr(prio, ",\"config\":") : NULL;
    if (strncmp(p, pre, sizeof(pre) - 1) != 0 || !conf || conf >= p + len) {
        printf("    %d. %.*s\n", n, (int)len, p);
        return;
    }
    const char *pnum = prio + strlen("\",\"priority\":");
    const char *c = conf + strlen(",\"config\":");
    printf("    %d. %.*s (priority %.*s) %.*s\n", n, (int)(prio - name), name,
           (int)(conf - pnum), pnum, (int)(p + len - 1 - c), c);
}

/* Prints one route's chain description (runtime.describe JSON) phase by
 * phase. The JSON is ours, so a line-oriented walk is enough: each plugin
 * entry is {"name":..,"priority":..,"config":..}. */
static void print_chain(const char *json)
{
    static const char *const phases[] = {"rewrite", "access", "header_filter",
                                         "body_filter", "log"};
    printf("plugins (per phase, in run order; configs as checked, defaults "
           "filled):\n");
    for (size_t k = 0; k < MG_ARRAY_SIZE(phases); k++) {
        char key[32];
        snprintf(key, sizeof(key), "\"%s\":[", phases[k]);
        const char *p = strstr(json, key);
        printf("  %s:", phases[k]);
        if (!p || p[strlen(key)] == ']') {
            printf(" (none)\n");
            continue;
        }
        printf("\n");
        p += strlen(key);
        for (int n = 1; *p == '{'; n++) {
            /* Find the entry's end: balance braces, skip strings. */
            const char *e = p;
            int depth = 0, in_str = 0;
            for (; *e; e++) {
                if (in_str) {
                    if (*e == '\\' && e[1])
                        e++;
                    else if (*e == '"')
                        in_str = 0;
                } else if (*e == '"') {
                    in_str = 1;
                } else if (*e == '{') {
                    depth++;
                } else if (*e == '}' && --depth == 0) {
                    break;
                }
            }
            print_entry(n, p, (size_t)(e - p + 1));
            p = *e ? e + 1 : e;
            if (*p == ',')
                p++;
        }
    }
}

int mg_explain_run(const mg_config_t *cfg, int argc, char **argv)
{
    const char *method = NULL, *url = NULL, *host = NULL;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "-H") == 0 && i + 1 < argc) {
            if (parse_header(argv[++i], &host) < 0) {
                fprintf(stderr,
                        "moongate: explain: bad header '%s' (expected "
                        "'Name: value')\n",
                        argv[i]);
                return 2;
            }
        } else if (!method) {
            method = argv[i];
        } else if (!url) {
            url = argv[i];
        } else {
            fprintf(stderr, "moongate: explain: unexpected argument '%s'\n",
                    argv[i]);
            return 2;
        }
    }
    if (!method || !url) {
        fprintf(stderr, "usage: moongate explain [-c FILE] METHOD URL "
                        "[-H 'Name: value']...\n");
        return 2;
    }

    /* URL: "/path?query" or "http(s)://authority/path?query". */
    char authority[256] = "";
    const char *target = url;
    const char *scheme = strstr(url, "://");
    if (scheme && scheme < strchr(url, '/')) {
        const char *a = scheme + 3, *slash = strchr(a, '/');
        size_t alen = slash ? (size_t)(slash - a) : strlen(a);
        snprintf(authority, sizeof(authority), "%.*s", (int)alen, a);
        target = slash ? slash : "/";
    }
    if (!host)
        host = authority;
    size_t plen = strcspn(target, "?#");
    printf("request:   %s %s", method, url);
    printf(*host ? " (Host \"%s\")\n" : " (no Host)\n", host);

    unsigned m;
    if (method_number(method, &m) < 0) {
        printf("refused:   501, method not implemented (accepted: GET, HEAD, "
               "POST, PUT, DELETE, OPTIONS, PATCH, TRACE)\n");
        return 1;
    }
    char *norm = mg_malloc(plen + 1);
    size_t nlen;
    if (mg_path_normalize(target, plen, norm, &nlen)) {
        printf("refused:   400, the path \"%.*s\" cannot be normalized "
               "unambiguously\n",
               (int)plen, target);
        free(norm);
        return 1;
    }
    printf("path:      %.*s%s\n", (int)nlen, norm,
           nlen == plen && memcmp(norm, target, plen) == 0 ? ""
                                                           : " (normalized)");
    if (target[plen] == '?')
        printf("query:     %s\n", target + plen + 1);

    mg_router_t *router = build_router(cfg);
    mg_route_match_t match;
    int rc = router ? mg_router_match(router, m, mg_str_from_cstr(host),
                                      (mg_str_t){norm, nlen}, &match)
                    : MG_DECLINED;
    if (rc) {
        printf("route:     none: the gateway answers 404\n");
        mg_router_free(router);
        free(norm);
        return 1;
    }
    const mg_route_conf_t *rt = match.data;
    size_t idx = (size_t)(rt - cfg->routes);
    printf("route:     routes[%zu] \"%s\" (name \"%s\")\n", idx + 1, rt->path,
           rt->name);
    for (size_t i = 0; i < match.nparams; i++)
        printf("  param    %.*s = %.*s\n", (int)match.param_names[i].len,
               match.param_names[i].p, (int)match.param_values[i].len,
               match.param_values[i].p);
    if (match.wildcard.p)
        printf("  wildcard \"%.*s\"\n", (int)match.wildcard.len,
               match.wildcard.p);
    print_upstream(cfg, rt);
    mg_router_free(router);
    free(norm);

    char **chains = NULL;
    char err[8192];
    if (mg_lua_describe(cfg->file, 1, cfg->nroutes, &chains, err,
                        sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    print_chain(chains[idx]);
    for (size_t i = 0; i < cfg->nroutes; i++)
        free(chains[i]);
    free(chains);

    int first = 1;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "-H") != 0 || i + 1 >= argc)
            continue;
        const char *h = argv[++i];
        size_t nl = (size_t)(strchr(h, ':') - h);
        if (first)
            printf("headers:\n");
        first = 0;
        printf("  %.*s: %s\n", (int)nl, h, header_fate(cfg, h, nl));
    }
    printf("note:      plugins decide at run time (auth, limits): this shows "
           "which run, not what they answer\n");
    return 0;
}
