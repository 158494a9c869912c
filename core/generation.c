/*
 * Builds and frees config generations. Building is the only place a config
 * is turned into run-time structures, so a reload and a start-up take the
 * same path.
 */
#include "generation.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "metrics.h"
#include "worker.h"

/* Compiles the config's routes (the part of validation that needs the
 * router: pattern syntax and ambiguity). */
static int build_router(const mg_config_t *cfg, mg_router_t **out, char *err,
                        size_t errlen)
{
    mg_route_spec_t *specs = mg_calloc(cfg->nroutes + 1, sizeof(*specs));
    mg_str_t **hosts = mg_calloc(cfg->nroutes + 1, sizeof(*hosts));
    for (size_t i = 0; i < cfg->nroutes; i++) {
        mg_route_conf_t *rc = &cfg->routes[i];
        hosts[i] = mg_calloc(rc->nhosts + 1, sizeof(mg_str_t));
        for (size_t k = 0; k < rc->nhosts; k++)
            hosts[i][k] = mg_str_from_cstr(rc->hosts[k]);
        specs[i] = (mg_route_spec_t){.pattern = mg_str_from_cstr(rc->path),
                                     .methods = rc->methods,
                                     .hosts = hosts[i],
                                     .nhosts = rc->nhosts,
                                     .data = rc};
    }
    char why[512];
    int rc = mg_router_new(specs, cfg->nroutes, out, why, sizeof(why));
    for (size_t i = 0; i < cfg->nroutes; i++)
        free(hosts[i]);
    free(hosts);
    free(specs);
    if (rc)
        snprintf(err, errlen, "%s: routes: %s", cfg->file, why);
    return rc;
}

int mg_gen_check(const mg_config_t *cfg, char *err, size_t errlen)
{
    mg_router_t *router;
    int rc = build_router(cfg, &router, err, errlen);
    if (rc)
        return rc;
    mg_router_free(router);
    return mg_lua_check(cfg->file, cfg->nroutes, err, errlen);
}

mg_gen_t *mg_gen_new(mg_worker_t *w, mg_lua_t *lua, mg_config_t *cfg,
                     unsigned id, char *err, size_t errlen)
{
    mg_router_t *router = NULL;
    if (build_router(cfg, &router, err, errlen)) {
        mg_config_free(cfg);
        return NULL;
    }
    uint8_t *masks = mg_calloc(cfg->nroutes + 1, 1);
    if (lua
        && mg_lua_gen_load(lua, id, cfg->file, masks, cfg->nroutes, err,
                           errlen)) {
        free(masks);
        mg_router_free(router);
        mg_config_free(cfg);
        return NULL;
    }

    mg_gen_t *g = mg_calloc(1, sizeof(*g));
    g->id = id;
    g->refs = 1;
    g->cfg = cfg;
    g->router = router;
    g->lua = lua;
    g->route_masks = masks;
    g->upstreams = mg_calloc(cfg->nupstreams + 1, sizeof(mg_upstream_t));
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        mg_upstream_t *u = &g->upstreams[i];
        u->conf = &cfg->upstreams[i];
        u->ntargets = u->conf->ntargets;
        u->targets = mg_calloc(u->ntargets, sizeof(*u->targets));
        for (size_t k = 0; k < u->ntargets; k++)
            u->targets[k] = mg_worker_target(w, &u->conf->targets[k]);
        /* p2c's draws differ per worker and generation. */
        mg_upstream_init(u, ((uint64_t)getpid() << 32) ^ (id * 2654435761u)
                                ^ (uint64_t)(i + 1));
    }
    mg_metrics_add_generations(1);
    return g;
}

void mg_gen_unref(mg_gen_t *g)
{
    if (--g->refs > 0)
        return;
    mg_metrics_add_generations(-1);
    for (size_t i = 0; i < g->cfg->nupstreams; i++) {
        mg_upstream_clear(&g->upstreams[i]);
        free(g->upstreams[i].targets);
    }
    free(g->upstreams);
    mg_router_free(g->router);
    if (g->lua)
        mg_lua_gen_free(g->lua, g->id);
    free(g->route_masks);
    mg_config_free(g->cfg);
    free(g);
}
