/*
 * Zone bookkeeping (see zones.h) and the FFI entry points of gw.shared.
 * The FFI wrappers take the clock themselves (CLOCK_MONOTONIC, the same in
 * every process) and seconds for TTLs, so Lua never sees milliseconds.
 */
#include "zones.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <uv.h>

#include "ffi.h"
#include "log.h"

#define MAX_ZONES 64

typedef struct {
    char *name;
    size_t size;
    mg_shdict_t *dict;
} zone_t;

static zone_t zones[MAX_ZONES];
static size_t nzones;

static zone_t *find(const char *name, size_t len)
{
    for (size_t i = 0; i < nzones; i++)
        if (strlen(zones[i].name) == len
            && memcmp(zones[i].name, name, len) == 0)
            return &zones[i];
    return NULL;
}

int mg_zones_same(const mg_config_t *cfg)
{
    if (cfg->nzones != nzones)
        return 0;
    for (size_t i = 0; i < cfg->nzones; i++) {
        zone_t *z = find(cfg->zones[i].name, strlen(cfg->zones[i].name));
        if (!z || z->size != cfg->zones[i].size)
            return 0;
    }
    return 1;
}

int mg_zones_apply(const mg_config_t *cfg)
{
    if (cfg->nzones > MAX_ZONES)
        return -E2BIG;
    zone_t next[MAX_ZONES];
    size_t n = 0;
    for (size_t i = 0; i < cfg->nzones; i++) {
        const mg_zone_conf_t *zc = &cfg->zones[i];
        zone_t *old = find(zc->name, strlen(zc->name));
        if (old && old->size == zc->size) {
            next[n++] = *old;
            old->dict = NULL; /* moved */
            continue;
        }
        void *mem = mmap(NULL, zc->size, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            int e = -errno;
            for (size_t k = 0; k < n; k++) /* undo: put moved ones back */
                find(next[k].name, strlen(next[k].name))->dict = next[k].dict;
            return e;
        }
        next[n].name = mg_strndup(zc->name, strlen(zc->name));
        next[n].size = zc->size;
        next[n].dict = mg_shdict_init(mem, zc->size, zc->name);
        mg_log_info("shared zone %s: %zu bytes", zc->name, (size_t)zc->size);
        n++;
    }
    for (size_t i = 0; i < nzones; i++) {
        if (zones[i].dict)
            munmap(zones[i].dict, zones[i].size);
        int kept = 0;
        for (size_t k = 0; k < n; k++)
            kept |= next[k].name == zones[i].name;
        if (!kept)
            free(zones[i].name);
    }
    memcpy(zones, next, n * sizeof(zone_t));
    nzones = n;
    return 0;
}

mg_shdict_t *mg_zones_find(mg_str_t name)
{
    zone_t *z = find(name.p, name.len);
    return z ? z->dict : NULL;
}

/* ------------------------------------------------------------------ */
/* FFI: gw.shared                                                     */

static uint64_t now_ms(void)
{
    return uv_hrtime() / 1000000;
}

static uint64_t ttl_ms(double seconds)
{
    if (!(seconds > 0)) /* also NaN */
        return 0;
    /* Beyond ~285 million years the cast would be undefined: saturate. */
    if (seconds >= 9e15)
        return (uint64_t)9e18;
    uint64_t ms = (uint64_t)(seconds * 1000.0);
    return ms ? ms : 1; /* 0 would mean "never expires" */
}

mg_shdict_t *mg_ffi_shdict_find(const char *name, size_t len)
{
    return mg_zones_find((mg_str_t){name, len});
}

int mg_ffi_shdict_get(mg_shdict_t *d, const char *k, size_t kl,
                      mg_shdict_value_t *v, char *buf, size_t cap)
{
    return mg_shdict_get(d, (mg_str_t){k, kl}, now_ms(), v, buf, cap);
}

int mg_ffi_shdict_store(mg_shdict_t *d, int op, const char *k, size_t kl,
                        const mg_shdict_value_t *v, double ttl, int *evicted)
{
    mg_str_t key = {k, kl};
    switch (op) {
    case 0: return mg_shdict_set(d, key, v, ttl_ms(ttl), now_ms(), evicted);
    case 1: return mg_shdict_add(d, key, v, ttl_ms(ttl), now_ms(), evicted);
    default:
        return mg_shdict_replace(d, key, v, ttl_ms(ttl), now_ms(), evicted);
    }
}

int mg_ffi_shdict_incr(mg_shdict_t *d, const char *k, size_t kl, double delta,
                       int has_init, double init, double init_ttl, double *out)
{
    return mg_shdict_incr(d, (mg_str_t){k, kl}, delta, has_init, init,
                          ttl_ms(init_ttl), now_ms(), out);
}

int mg_ffi_shdict_window_hit(mg_shdict_t *d, const char *k, size_t kl,
                             double window, int slices, double limit,
                             double *out)
{
    mg_shdict_window_t w;
    if (!(window > 0) || slices < 1)
        return MG_DECLINED;
    int rc = mg_shdict_window_hit(d, (mg_str_t){k, kl}, ttl_ms(window),
                                  (unsigned)slices, limit, now_ms(), &w);
    if (rc == 0) {
        out[0] = w.admitted;
        out[1] = w.count;
        out[2] = (double)w.retry_ms / 1000.0;
        out[3] = (double)w.reset_ms / 1000.0;
        out[4] = (double)w.slice;
    }
    return rc;
}

void mg_ffi_shdict_window_undo(mg_shdict_t *d, const char *k, size_t kl,
                               int slices, double slice)
{
    if (slices >= 1 && slice >= 0)
        mg_shdict_window_undo(d, (mg_str_t){k, kl}, (unsigned)slices,
                              (uint64_t)slice);
}

int mg_ffi_shdict_delete(mg_shdict_t *d, const char *k, size_t kl)
{
    return mg_shdict_delete(d, (mg_str_t){k, kl});
}

int mg_ffi_shdict_ttl(mg_shdict_t *d, const char *k, size_t kl, double *out)
{
    int64_t ms;
    int rc = mg_shdict_ttl(d, (mg_str_t){k, kl}, now_ms(), &ms);
    if (rc == 0)
        *out = (double)ms / 1000.0;
    return rc;
}

int mg_ffi_shdict_expire(mg_shdict_t *d, const char *k, size_t kl, double ttl)
{
    return mg_shdict_expire(d, (mg_str_t){k, kl}, ttl_ms(ttl), now_ms());
}

double mg_ffi_shdict_delete_prefix(mg_shdict_t *d, const char *p, size_t len)
{
    size_t n = 0;
    mg_shdict_delete_prefix(d, (mg_str_t){p, len}, &n);
    return (double)n;
}

void mg_ffi_shdict_flush_all(mg_shdict_t *d)
{
    mg_shdict_flush_all(d);
}

void mg_ffi_shdict_stats(mg_shdict_t *d, double *out)
{
    size_t cap, free_bytes, count;
    mg_shdict_stats(d, &cap, &free_bytes, &count);
    out[0] = (double)cap;
    out[1] = (double)free_bytes;
    out[2] = (double)count;
}
