/*
 * A config generation: the immutable, compiled form of one loaded config
 * inside a worker (router, upstream runtime state). New requests start on
 * the worker's current generation and keep a reference to it until they
 * end, so a reload never changes the rules under a request in flight.
 */
#ifndef MG_GENERATION_H
#define MG_GENERATION_H

#include "config.h"
#include "http.h"
#include "lua.h"
#include "router.h"
#include "upstream.h"

struct mg_gen_s {
    unsigned id;              /* 1 for the config a worker starts with */
    unsigned refs;            /* the worker's own + one per request */
    mg_config_t *cfg;         /* owned */
    mg_router_t *router;      /* owned; route data -> mg_route_conf_t */
    mg_upstream_t *upstreams; /* parallel to cfg->upstreams */
    mg_lua_t *lua;            /* borrowed: the worker's VM (NULL: no Lua) */
    uint8_t *route_masks;     /* per route: MG_LUA_* phases with plugins */
};

/*
 * Compiles `cfg` (takes ownership, also on failure) into a new generation
 * with one reference. Returns NULL and writes the reason into err when the
 * routes cannot be compiled.
 */
mg_gen_t *mg_gen_new(mg_worker_t *w, mg_lua_t *lua, mg_config_t *cfg,
                     unsigned id, char *err, size_t errlen);

/*
 * Compiles the routes of `cfg` without building a generation: the
 * validation a master or `moongate check` does beyond mg_config_load.
 * Returns 0 or MG_ECONFIG with the reason in err.
 */
int mg_gen_check(const mg_config_t *cfg, char *err, size_t errlen);

/* Index of a route of g's config (the router's data points into it). */
static inline size_t mg_gen_route_index(const mg_gen_t *g,
                                        const mg_route_conf_t *rt)
{
    return (size_t)(rt - g->cfg->routes);
}

static inline void mg_gen_ref(mg_gen_t *g)
{
    g->refs++;
}

/* Drops a reference; the last one frees the generation. */
void mg_gen_unref(mg_gen_t *g);

#endif
