/*
 * The shared-memory zones of this gateway: created by the master before it
 * forks workers, so every worker maps the same memory, and kept across
 * reloads. The set is process-wide by nature (an inherited mapping), so
 * this module keeps it in one static table rather than threading it through
 * every caller; it is written only by the master, before forking.
 */
#ifndef MG_ZONES_H
#define MG_ZONES_H

#include "config.h"
#include "shdict.h"

/*
 * Makes the mapped set match cfg->zones: zones of the same name and size
 * are kept (with their contents), others are created, and zones no longer
 * configured are unmapped in this process (workers forked earlier keep
 * their own mapping until they exit). Master only. Returns 0 or a negative
 * errno (nothing changed then).
 */
int mg_zones_apply(const mg_config_t *cfg);

/* True when cfg->zones is exactly the mapped set (names and sizes). */
int mg_zones_same(const mg_config_t *cfg);

/* The zone named `name`, or NULL. */
mg_shdict_t *mg_zones_find(mg_str_t name);

#endif
