/*
 * Shared dictionaries: named key/value zones in shared memory, created by the
 * master before it forks and then used by every worker, so N workers keep one
 * set of rate-limit counters, breaker and health state, cache entries and
 * metrics. Each operation is atomic across processes (one process-shared,
 * robust lock per zone). Values are byte strings, numbers (doubles) or
 * booleans, each with 32 user flags and an optional expiry; when a zone is
 * full the least recently used entries are evicted.
 *
 * Pure: no event loop, no Lua, no logging. Time is passed in by the caller
 * as milliseconds of CLOCK_MONOTONIC (one clock for every process on the
 * machine), so tests can drive expiry with a fake clock. Expired entries are
 * removed lazily, when touched or when their memory is needed.
 *
 * Not for: state shared between machines (that is Redis), iteration over
 * keys (only delete_prefix walks them, for purges), or values larger than
 * the zone. Memory layout, allocator and lock policy are described at the
 * top of shdict.c.
 *
 * Usage: the master maps `size` bytes with mmap(MAP_SHARED | MAP_ANONYMOUS)
 * and calls mg_shdict_init once; the zone uses exactly those bytes and
 * nothing else (no malloc, no pointers inside the region). The master keeps
 * the mapping across reloads; workers inherit it through fork. Every
 * function below may be called from any process sharing the mapping.
 */
#ifndef MG_SHDICT_H
#define MG_SHDICT_H

#include "common.h"

/* Zone sizes accepted by mg_shdict_init (bytes). */
#define MG_SHDICT_MIN_SIZE ((size_t)64 * 1024)
#define MG_SHDICT_MAX_SIZE                                                     \
    ((size_t)0x7fffffff * 16) /* offsets are 31 bits                           \
                                 of 16-byte units */
/* Longest key, bytes; longer keys are refused with MG_ETOOLARGE. */
#define MG_SHDICT_MAX_KEY 65535
/* Longest zone name kept; a longer name is truncated. */
#define MG_SHDICT_NAME_MAX 63

typedef struct mg_shdict_s mg_shdict_t; /* lives inside the shared region */

typedef enum {
    MG_SHDICT_NIL = 0,
    MG_SHDICT_NUMBER,
    MG_SHDICT_STRING,
    MG_SHDICT_BOOLEAN
} mg_shdict_type_t;

typedef struct {
    mg_shdict_type_t type;
    double number;   /* NUMBER; BOOLEAN as 0 or 1 */
    const char *str; /* STRING: on set, borrowed for the call; on get, points
                        into the caller's buffer */
    size_t len;      /* STRING: length of str */
    uint32_t flags;  /* user flags, stored and returned as is */
} mg_shdict_value_t;

/*
 * Formats a fresh zone in `mem` (`size` bytes, zeroed or not, 16-byte
 * aligned as mmap memory is). The zone uses all `size` bytes: header, hash
 * table, then entries. `name` (may be NULL) is copied, truncated to
 * MG_SHDICT_NAME_MAX bytes. Returns the handle, which is `mem`, or NULL when
 * size is outside [MG_SHDICT_MIN_SIZE, MG_SHDICT_MAX_SIZE], mem is not
 * aligned, or the platform lacks robust process-shared mutexes. Call once,
 * in the master, before fork; calling it again on a live zone that other
 * processes use is undefined.
 */
mg_shdict_t *mg_shdict_init(void *mem, size_t size, const char *name);

/* The zone's name as given to mg_shdict_init (NUL-terminated). */
const char *mg_shdict_name(const mg_shdict_t *d);

/*
 * Looks `key` up. On 0 (found), v->type, v->flags and v->number are set; a
 * STRING is copied into `buf` (`cap` bytes, may be NULL when cap is 0) and
 * v->str = buf, v->len = its length. If the string does not fit, returns
 * MG_ETOOLARGE with v->type, v->flags and v->len (the size needed) set, so
 * the caller can retry with a bigger buffer. Returns MG_DECLINED (v->type =
 * MG_SHDICT_NIL) when the key is missing or expired. A hit makes the entry
 * the most recently used.
 */
int mg_shdict_get(mg_shdict_t *d, mg_str_t key, uint64_t now_ms,
                  mg_shdict_value_t *v, char *buf, size_t cap);

/*
 * Stores `v` under `key`, replacing any value, type and flags there. ttl_ms
 * 0 = no expiry, else the entry expires at now_ms + ttl_ms. A NIL value
 * deletes the key. When the zone is full, expired then least recently used
 * entries are removed until the new entry fits. *evicted (if non-NULL) is
 * always set: the number of unexpired entries so removed, usually 0.
 * Returns 0; MG_ETOOLARGE if the key is longer than MG_SHDICT_MAX_KEY, the
 * value 4 GiB or more, or the entry could not fit even in an empty zone
 * (the old value, if any, is then left in place); MG_EPROTO for an unknown
 * type. `key` and v->str are borrowed for the call.
 */
int mg_shdict_set(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                  uint64_t ttl_ms, uint64_t now_ms, int *evicted);

/*
 * Like mg_shdict_set, only when the key is absent (or expired); returns
 * MG_DECLINED ("exists") otherwise. A NIL value adds nothing.
 */
int mg_shdict_add(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                  uint64_t ttl_ms, uint64_t now_ms, int *evicted);

/*
 * Like mg_shdict_set, only when the key is present (and unexpired); returns
 * MG_DECLINED ("not found") otherwise. A NIL value deletes it.
 */
int mg_shdict_replace(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                      uint64_t ttl_ms, uint64_t now_ms, int *evicted);

/*
 * Adds `delta` to the NUMBER at `key` and writes the result to *out; the
 * entry keeps its expiry and flags and becomes the most recently used. If
 * the key is missing or expired: with `has_init`, creates it as
 * init + delta, flags 0, expiring after init_ttl_ms (0 = never), evicting
 * as mg_shdict_set does; without, returns MG_DECLINED. Returns MG_EPROTO if
 * the value is not a NUMBER (a BOOLEAN is not), MG_ETOOLARGE if the key is
 * too long or cannot fit. O(1) and allocation-free once the key exists: the
 * rate-limiting hot path.
 */
int mg_shdict_incr(mg_shdict_t *d, mg_str_t key, double delta, int has_init,
                   double init, uint64_t init_ttl_ms, uint64_t now_ms,
                   double *out);

/*
 * Removes `key`. Returns 0 if an entry was removed (even an expired one not
 * yet reclaimed: delete takes no clock), MG_DECLINED if there was none.
 */
int mg_shdict_delete(mg_shdict_t *d, mg_str_t key);

/* The most slices a sliding window may have (mg_shdict_window_hit). */
#define MG_SHDICT_MAX_SLICES 60

typedef struct {
    int admitted;      /* the hit was counted */
    double count;      /* hits in the window before this one */
    uint64_t retry_ms; /* when refused: until one more would fit */
    uint64_t reset_ms; /* until the oldest counted slice leaves */
    uint64_t slice;    /* the slice counted (for mg_shdict_window_undo) */
} mg_shdict_window_t;

/*
 * A sliding-window rate counter under `key` (rate limiting). The window of
 * window_ms is cut into `slices` slices; the key holds the hit count of the
 * newest slices + 1 of them. A hit is counted when the hits of every slice
 * that overlaps the last window_ms (the oldest one whole) plus one are at
 * most `limit`, so no interval of window_ms ever holds more than `limit`
 * counted hits; the price is that up to one slice's worth may be refused
 * early. Atomic across processes. The entry expires a window after its
 * last hit. Returns 0 with *out set; MG_EPROTO when the key holds another
 * kind of value, MG_ETOOLARGE when it cannot be stored, MG_DECLINED for
 * bad arguments (slices 1..MG_SHDICT_MAX_SLICES, window_ms >= slices).
 */
int mg_shdict_window_hit(mg_shdict_t *d, mg_str_t key, uint64_t window_ms,
                         unsigned slices, double limit, uint64_t now_ms,
                         mg_shdict_window_t *out);

/* Takes back a hit counted in `slice` (out->slice of its window_hit), if
 * that slice is still kept: a request another limit refused. */
void mg_shdict_window_undo(mg_shdict_t *d, mg_str_t key, unsigned slices,
                           uint64_t slice);

/*
 * Removes every entry whose key starts with `prefix` (expired or not; an
 * empty prefix removes everything, like flush_all but entry by entry) and
 * sets *removed (if non-NULL) to how many. Returns 0 if at least one entry
 * was removed, MG_DECLINED if none was. Walks every entry of the zone once
 * while holding its lock (O(entries)): meant for cache purges by an
 * operator (the admin listener's DELETE, the cache plugin's PURGE), never
 * for a request's hot path. The cache plugin's key format, which purges
 * rely on, is in docs/plugins/cache.md ("Keys").
 */
int mg_shdict_delete_prefix(mg_shdict_t *d, mg_str_t prefix, size_t *removed);

/*
 * Remaining lifetime of `key` in *remaining_ms (0 = no expiry, else >= 1).
 * Returns 0, or MG_DECLINED if the key is missing or expired.
 */
int mg_shdict_ttl(mg_shdict_t *d, mg_str_t key, uint64_t now_ms,
                  int64_t *remaining_ms);

/*
 * Gives `key` a new lifetime: expires at now_ms + ttl_ms, or never if ttl_ms
 * is 0. Returns 0, or MG_DECLINED if the key is missing or expired.
 */
int mg_shdict_expire(mg_shdict_t *d, mg_str_t key, uint64_t ttl_ms,
                     uint64_t now_ms);

/* Removes every entry at once (O(hash table size), not per entry). */
void mg_shdict_flush_all(mg_shdict_t *d);

/*
 * For /status and metrics: *capacity = the zone size given to init;
 * *free_bytes = bytes available to entries right now (the header and hash
 * table are never free, and free memory may be fragmented); *count =
 * entries held, including expired ones not yet reclaimed. Any pointer may
 * be NULL.
 */
void mg_shdict_stats(mg_shdict_t *d, size_t *capacity, size_t *free_bytes,
                     size_t *count);

/*
 * Debugging and test aids.
 *
 * mg_shdict_check walks the whole zone under the lock and verifies every
 * invariant (block chain, free lists, hash chains, LRU list, counters).
 * Returns 0, or MG_EPROTO at the first violation. O(zone size).
 *
 * mg_shdict_test_lock takes the zone's lock and returns without releasing
 * it; with `mid_write` it also marks the zone as being modified. Only for a
 * test's child process, which then exits, to exercise recovery from a lock
 * holder that died (see shdict.c, "Lock").
 */
int mg_shdict_check(mg_shdict_t *d);
void mg_shdict_test_lock(mg_shdict_t *d, int mid_write);

#endif
