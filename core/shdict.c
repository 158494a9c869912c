/*
 * The shared-dict store (API in shdict.h). One zone is one contiguous
 * region; nothing in it is a pointer, every link is an offset counted in
 * 16-byte units from the zone's start (unit 0 is the header, so 0 means
 * "none"). 31-bit unit offsets cover zones up to 32 GiB.
 *
 * Layout:
 *   [header: lock, geometry, LRU ends, free-list bins]
 *   [hash table: nbuckets uint32 offsets, one bucket per 128 zone bytes]
 *   [heap: blocks ... | 1-unit sentinel block, always "used"]
 *
 * Heap. Every block starts with its size and the size of the block before
 * it (boundary tags), so freeing merges with both neighbours in O(1) and no
 * two free blocks are ever adjacent. A used block holds one entry: a
 * 48-byte header (hash chain link, LRU links, hash, key and value lengths,
 * expiry, flags, type), then the key, then the value (a double for NUMBER
 * and BOOLEAN). Free blocks sit in segregated free lists: bins 3..63 hold
 * blocks of exactly that many units (up to 1 KiB, where rate-limit
 * counters and most cache entries live), bins above hold one power of two
 * each; a two-word bitmap finds the lowest non-empty bin with one ctz. So a
 * small allocation is O(1): exact bin, else the head of the next larger bin,
 * split. A large one first-fits its own power-of-two bin, then takes the
 * next. A general allocator rather than slabs because entry sizes vary
 * (counters next to cached bodies) and a slab design strands memory in size
 * classes that later workloads do not use (memcached's "calcification").
 * The cost is fragmentation, which eviction repairs: when no free block
 * fits, entries are evicted from the LRU tail until one does. That always
 * ends, because an entry is refused up front when it would not fit in the
 * empty heap, and an empty heap is one block.
 *
 * Hash. A fixed chained table sized from the zone (buckets hold the offset
 * of the first entry; entries chain through `hnext`), so it never resizes
 * in shared memory. Keys are hashed with SipHash-1-3 under a random per-zone
 * key: keys carry client-controlled bytes (addresses, API keys, headers),
 * and a fast unkeyed hash would let a client pile them into one chain. The
 * 32-bit hash is kept in the entry to skip most memcmps. get and incr are
 * O(1): hash outside the lock, one chain walk, LRU move, copy.
 *
 * LRU. An intrusive doubly-linked list through the entries, most recent at
 * the head. get, incr and writes move an entry to the head. Expired entries
 * are removed when touched, two at a time from the LRU tail on every
 * insertion, and by eviction (where they do not count as "evicted").
 *
 * Lock. One pthread mutex per zone in the header, PTHREAD_PROCESS_SHARED
 * and PTHREAD_MUTEX_ROBUST: if a worker dies holding it (SIGKILL, crash),
 * the next locker gets EOWNERDEAD instead of hanging forever. The header's
 * `dirty` word is set right after taking the lock and cleared right before
 * releasing it, with compiler barriers around (a process death is observed
 * like an asynchronous signal: every store it executed is visible to the
 * next owner, whose lock acquisition is a full barrier, so only program
 * order matters). On EOWNERDEAD: if `dirty` is clear the holder died
 * outside any change and the zone is intact, so it is simply marked
 * consistent; if set, the zone is flushed (reformatted) before being marked
 * consistent. Flush rather than repair, because a half-done split,
 * coalesce or list splice leaves block sizes and links that cannot be told
 * apart from valid ones; a flush loses counters and cached entries (rate
 * limits restart their window, caches refill), which degrades gracefully,
 * while a corrupt zone would serve wrong answers or crash every worker.
 * The whole operation is marked, not just its stores: marking each store
 * would be easy to get wrong once, and a holder dying is rare.
 *
 * Not for: keys iteration (delete_prefix walks every entry once, for
 * purges only), persistence, or cross-machine state.
 */
#include "shdict.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define UNIT 16u          /* allocation granule and offset unit */
#define USED 0x80000000u  /* in blk_t.size: the block holds an entry */
#define MIN_BLOCK 3u      /* units; an entry with empty key and value */
#define NEXACT 64u        /* bins below this hold one exact size */
#define NBINS 128u        /* two bitmap words; 89 are ever used */
#define BUCKET_BYTES 128u /* zone bytes per hash bucket */
#define REAP 2            /* expired entries freed per insertion */
#define MAGIC UINT64_C(0x317463646873676d) /* "mgshdct1" */

/*
 * A heap block. The union's first member is used while the block is free,
 * the second while it holds an entry; size and psize are always valid.
 */
typedef struct {
    uint32_t size;  /* units, | USED */
    uint32_t psize; /* units of the block before this one; 0 for the first */
    union {
        struct {
            uint32_t fnext, fprev; /* free list of the block's bin */
        };
        struct {
            uint32_t hnext;        /* next entry in the hash chain */
            uint32_t lprev, lnext; /* LRU neighbours, towards head / tail */
            uint32_t hash;
            uint32_t klen, vlen; /* key bytes, then value bytes, follow */
            uint64_t expires;    /* monotonic ms; 0 = never */
            uint32_t flags;
            uint8_t type; /* mg_shdict_type_t */
            uint8_t pad_[3];
        };
    };
} blk_t;

_Static_assert(sizeof(blk_t) == MIN_BLOCK * UNIT, "entry header size");

struct mg_shdict_s {
    uint64_t magic;
    uint64_t size; /* bytes given to init */
    char name[MG_SHDICT_NAME_MAX + 1];
    pthread_mutex_t lock;
    volatile int dirty;        /* the lock holder may be mid-change */
    uint32_t nbuckets;         /* a power of two */
    uint64_t seed[2];          /* SipHash key */
    uint32_t buckets;          /* unit offset of the hash table */
    uint32_t heap_lo, heap_hi; /* first block; the sentinel */
    /* Everything below is reset by format(). */
    uint32_t lru_head, lru_tail;
    uint64_t count; /* entries */
    uint64_t free_units;
    uint64_t binmap[NBINS / 64];
    uint32_t bins[NBINS]; /* head of each free list */
};

static inline blk_t *at(mg_shdict_t *d, uint32_t off)
{
    return (blk_t *)((char *)d + (size_t)off * UNIT);
}

static inline uint32_t off_of(mg_shdict_t *d, const blk_t *b)
{
    return (uint32_t)(((const char *)b - (const char *)d) / UNIT);
}

static inline uint32_t bsize(const blk_t *b)
{
    return b->size & ~USED;
}

static inline blk_t *next_blk(blk_t *b)
{
    return (blk_t *)((char *)b + (size_t)bsize(b) * UNIT);
}

static inline char *key_of(blk_t *e)
{
    return (char *)(e + 1);
}

static inline char *val_of(blk_t *e)
{
    return (char *)(e + 1) + e->klen;
}

static inline uint32_t *bucket(mg_shdict_t *d, uint32_t hash)
{
    uint32_t *table = (uint32_t *)((char *)d + (size_t)d->buckets * UNIT);
    return &table[hash & (d->nbuckets - 1)];
}

/* Units of an entry block; callers bound klen and vlen first. */
static inline uint64_t units_for(uint64_t klen, uint64_t vlen)
{
    return (sizeof(blk_t) + klen + vlen + UNIT - 1) / UNIT;
}

static inline uint32_t max_units(const mg_shdict_t *d)
{
    return d->heap_hi - d->heap_lo;
}

static inline int expired(const blk_t *e, uint64_t now)
{
    return e->expires != 0 && e->expires <= now;
}

/* A TTL so long that now + ttl would wrap means "as late as can be". */
static inline uint64_t deadline(uint64_t ttl_ms, uint64_t now)
{
    if (!ttl_ms)
        return 0;
    return ttl_ms > UINT64_MAX - now ? UINT64_MAX : now + ttl_ms;
}

/* ---- hashing: SipHash-1-3 ---------------------------------------------- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                               \
    do {                                                                       \
        v0 += v1;                                                              \
        v1 = ROTL(v1, 13);                                                     \
        v1 ^= v0;                                                              \
        v0 = ROTL(v0, 32);                                                     \
        v2 += v3;                                                              \
        v3 = ROTL(v3, 16);                                                     \
        v3 ^= v2;                                                              \
        v0 += v3;                                                              \
        v3 = ROTL(v3, 21);                                                     \
        v3 ^= v0;                                                              \
        v2 += v1;                                                              \
        v1 = ROTL(v1, 17);                                                     \
        v1 ^= v2;                                                              \
        v2 = ROTL(v2, 32);                                                     \
    } while (0)

static uint32_t hash(const mg_shdict_t *d, mg_str_t key)
{
    const unsigned char *p = (const unsigned char *)key.p;
    size_t n = key.len;
    uint64_t v0 = UINT64_C(0x736f6d6570736575) ^ d->seed[0];
    uint64_t v1 = UINT64_C(0x646f72616e646f6d) ^ d->seed[1];
    uint64_t v2 = UINT64_C(0x6c7967656e657261) ^ d->seed[0];
    uint64_t v3 = UINT64_C(0x7465646279746573) ^ d->seed[1];
    uint64_t m, b = (uint64_t)n << 56;

    for (; n >= 8; n -= 8, p += 8) {
        memcpy(&m, p, 8); /* little-endian hosts match the reference */
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t i = 0; i < n; i++)
        b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    m = v0 ^ v1 ^ v2 ^ v3;
    return (uint32_t)(m ^ (m >> 32));
}

/* ---- heap: boundary tags and segregated free lists --------------------- */

static uint32_t bin_of(uint32_t units)
{
    if (units < NEXACT)
        return units;
    return NEXACT + (uint32_t)(31 - __builtin_clz(units)) - 6;
}

static void bin_insert(mg_shdict_t *d, blk_t *b)
{
    uint32_t i = bin_of(b->size), off = off_of(d, b);

    b->fprev = 0;
    b->fnext = d->bins[i];
    if (b->fnext)
        at(d, b->fnext)->fprev = off;
    d->bins[i] = off;
    d->binmap[i / 64] |= UINT64_C(1) << (i % 64);
    d->free_units += b->size;
}

static void bin_remove(mg_shdict_t *d, blk_t *b)
{
    uint32_t i = bin_of(b->size);

    if (b->fprev)
        at(d, b->fprev)->fnext = b->fnext;
    else
        d->bins[i] = b->fnext;
    if (b->fnext)
        at(d, b->fnext)->fprev = b->fprev;
    if (!d->bins[i])
        d->binmap[i / 64] &= ~(UINT64_C(1) << (i % 64));
    d->free_units -= b->size;
}

/* The lowest non-empty bin >= i, or NBINS. */
static uint32_t bin_find(const mg_shdict_t *d, uint32_t i)
{
    for (uint32_t w = i / 64; w < NBINS / 64; w++) {
        uint64_t m = d->binmap[w];
        if (w == i / 64)
            m &= ~UINT64_C(0) << (i % 64);
        if (m)
            return w * 64 + (uint32_t)__builtin_ctzll(m);
    }
    return NBINS;
}

/* Frees block b, merging it with free neighbours. */
static void release(mg_shdict_t *d, blk_t *b)
{
    uint32_t size = bsize(b);
    blk_t *n = next_blk(b);

    if (!(n->size & USED)) { /* the sentinel is always used */
        bin_remove(d, n);
        size += n->size;
    }
    if (b->psize) {
        blk_t *p = (blk_t *)((char *)b - (size_t)b->psize * UNIT);
        if (!(p->size & USED)) {
            bin_remove(d, p);
            size += p->size;
            b = p;
        }
    }
    b->size = size;
    next_blk(b)->psize = size;
    bin_insert(d, b);
}

/* Shrinks used block b to `units`, freeing the tail if it can hold a block. */
static void trim(mg_shdict_t *d, blk_t *b, uint32_t units)
{
    uint32_t total = bsize(b);
    if (total - units < MIN_BLOCK)
        return;
    blk_t *r = (blk_t *)((char *)b + (size_t)units * UNIT);
    b->size = units | USED;
    r->size = (total - units) | USED; /* release() clears it */
    r->psize = units;
    next_blk(r)->psize = total - units;
    release(d, r);
}

/* A used block of at least `units`, or NULL if no free block is big enough. */
static blk_t *alloc(mg_shdict_t *d, uint32_t units)
{
    uint32_t i = bin_of(units);
    blk_t *b = NULL;

    if (i >= NEXACT) { /* a power-of-two bin: first fit, then any larger */
        for (uint32_t o = d->bins[i]; o && !b; o = at(d, o)->fnext)
            if (at(d, o)->size >= units)
                b = at(d, o);
        i++;
    }
    if (!b) {
        i = bin_find(d, i);
        if (i == NBINS)
            return NULL;
        b = at(d, d->bins[i]);
    }
    bin_remove(d, b);
    b->size |= USED;
    trim(d, b, units);
    return b;
}

/* ---- entries: hash chains and the LRU list ----------------------------- */

static void lru_unlink(mg_shdict_t *d, blk_t *e)
{
    if (e->lprev)
        at(d, e->lprev)->lnext = e->lnext;
    else
        d->lru_head = e->lnext;
    if (e->lnext)
        at(d, e->lnext)->lprev = e->lprev;
    else
        d->lru_tail = e->lprev;
}

static void lru_push(mg_shdict_t *d, blk_t *e)
{
    uint32_t off = off_of(d, e);

    e->lprev = 0;
    e->lnext = d->lru_head;
    if (d->lru_head)
        at(d, d->lru_head)->lprev = off;
    else
        d->lru_tail = off;
    d->lru_head = off;
}

static void touch(mg_shdict_t *d, blk_t *e)
{
    if (d->lru_head != off_of(d, e)) {
        lru_unlink(d, e);
        lru_push(d, e);
    }
}

static blk_t *find(mg_shdict_t *d, uint32_t h, mg_str_t key)
{
    for (uint32_t o = *bucket(d, h); o;) {
        blk_t *e = at(d, o);
        if (e->hash == h && e->klen == key.len
            && (key.len == 0 || memcmp(key_of(e), key.p, key.len) == 0))
            return e;
        o = e->hnext;
    }
    return NULL;
}

static void remove_entry(mg_shdict_t *d, blk_t *e)
{
    uint32_t off = off_of(d, e), *link = bucket(d, e->hash);

    while (*link != off)
        link = &at(d, *link)->hnext;
    *link = e->hnext;
    lru_unlink(d, e);
    d->count--;
    release(d, e);
}

/* The live entry for key, removing it first if it has expired. */
static blk_t *lookup(mg_shdict_t *d, uint32_t h, mg_str_t key, uint64_t now)
{
    blk_t *e = find(d, h, key);
    if (e && expired(e, now)) {
        remove_entry(d, e);
        e = NULL;
    }
    return e;
}

/*
 * Allocates an entry block, evicting from the LRU tail while nothing fits;
 * adds the unexpired victims to *evicted. NULL only if units exceeds the
 * empty heap.
 */
static blk_t *alloc_evicting(mg_shdict_t *d, uint32_t units, uint64_t now,
                             int *evicted)
{
    blk_t *b;

    for (int i = 0; i < REAP && d->lru_tail; i++) {
        blk_t *t = at(d, d->lru_tail);
        if (!expired(t, now))
            break;
        remove_entry(d, t);
    }
    while ((b = alloc(d, units)) == NULL) {
        if (!d->lru_tail)
            return NULL;
        blk_t *t = at(d, d->lru_tail);
        if (!expired(t, now) && evicted)
            (*evicted)++;
        remove_entry(d, t);
    }
    return b;
}

/* Creates an entry for a key known to be absent; NULL if it cannot fit. */
static blk_t *insert(mg_shdict_t *d, uint32_t h, mg_str_t key, uint8_t type,
                     const void *val, size_t vlen, uint32_t flags,
                     uint64_t expires, uint64_t now, int *evicted)
{
    uint64_t units = units_for(key.len, vlen);
    if (units > max_units(d))
        return NULL;
    blk_t *e = alloc_evicting(d, (uint32_t)units, now, evicted);
    if (!e)
        return NULL;
    e->hash = h;
    e->klen = (uint32_t)key.len;
    e->vlen = (uint32_t)vlen;
    e->expires = expires;
    e->flags = flags;
    e->type = type;
    if (key.len)
        memcpy(key_of(e), key.p, key.len);
    if (vlen)
        memcpy(val_of(e), val, vlen);
    uint32_t *head = bucket(d, h);
    e->hnext = *head;
    *head = off_of(d, e);
    lru_push(d, e);
    d->count++;
    return e;
}

/* ---- the lock ---------------------------------------------------------- */

static void format(mg_shdict_t *d)
{
    memset(at(d, d->buckets), 0, (size_t)d->nbuckets * sizeof(uint32_t));
    d->lru_head = d->lru_tail = 0;
    d->count = d->free_units = 0;
    memset(d->binmap, 0, sizeof(d->binmap));
    memset(d->bins, 0, sizeof(d->bins));

    blk_t *b = at(d, d->heap_lo), *sentinel = at(d, d->heap_hi);
    b->size = max_units(d);
    b->psize = 0;
    sentinel->size = 1 | USED;
    sentinel->psize = b->size;
    bin_insert(d, b);
}

static void lock(mg_shdict_t *d)
{
    int rc = pthread_mutex_lock(&d->lock);
    if (rc == EOWNERDEAD) {
        /* The holder died; see "Lock" at the top for the policy. */
        if (d->dirty)
            format(d);
        pthread_mutex_consistent(&d->lock);
    } else if (rc != 0) {
        /* EINVAL or ENOTRECOVERABLE: only possible if the zone header was
           overwritten or a recovery skipped pthread_mutex_consistent. */
        abort();
    }
    d->dirty = 1;
    atomic_signal_fence(memory_order_seq_cst);
}

static void unlock(mg_shdict_t *d)
{
    atomic_signal_fence(memory_order_seq_cst);
    d->dirty = 0;
    pthread_mutex_unlock(&d->lock);
}

/* ---- public API -------------------------------------------------------- */

mg_shdict_t *mg_shdict_init(void *mem, size_t size, const char *name)
{
    if (!mem || (uintptr_t)mem % UNIT || size < MG_SHDICT_MIN_SIZE
        || size > MG_SHDICT_MAX_SIZE)
        return NULL;

    mg_shdict_t *d = mem;
    memset(d, 0, sizeof(*d));
    d->magic = MAGIC;
    d->size = size;
    if (name) {
        size_t n = strnlen(name, MG_SHDICT_NAME_MAX);
        memcpy(d->name, name, n);
    }

    uint32_t nb = 1;
    while ((uint64_t)nb * 2 * BUCKET_BYTES <= size)
        nb *= 2;
    d->nbuckets = nb;
    d->buckets = (uint32_t)((sizeof(*d) + UNIT - 1) / UNIT);
    d->heap_lo =
        d->buckets + (nb * (uint32_t)sizeof(uint32_t) + UNIT - 1) / UNIT;
    d->heap_hi = (uint32_t)(size / UNIT) - 1;

    if (getrandom(d->seed, sizeof(d->seed), GRND_NONBLOCK)
        != (ssize_t)sizeof(d->seed)) {
        /* No entropy yet (early boot): weaker, but still per-zone. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        d->seed[0] = (uint64_t)ts.tv_nsec * UINT64_C(0x9e3779b97f4a7c15)
                     ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)mem;
        d->seed[1] =
            (uint64_t)getpid() * UINT64_C(0xbf58476d1ce4e5b9) ^ d->seed[0];
    }

    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0) {
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
        if (rc == 0)
            rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
        if (rc == 0)
            rc = pthread_mutex_init(&d->lock, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    if (rc != 0)
        return NULL;
    format(d);
    return d;
}

const char *mg_shdict_name(const mg_shdict_t *d)
{
    return d->name;
}

int mg_shdict_get(mg_shdict_t *d, mg_str_t key, uint64_t now_ms,
                  mg_shdict_value_t *v, char *buf, size_t cap)
{
    memset(v, 0, sizeof(*v));
    if (key.len > MG_SHDICT_MAX_KEY)
        return MG_DECLINED;
    uint32_t h = hash(d, key);
    int rc = 0;

    lock(d);
    blk_t *e = lookup(d, h, key, now_ms);
    if (!e) {
        rc = MG_DECLINED;
    } else {
        touch(d, e);
        v->type = (mg_shdict_type_t)e->type;
        v->flags = e->flags;
        if (e->type != MG_SHDICT_STRING) {
            memcpy(&v->number, val_of(e), sizeof(double));
        } else {
            v->len = e->vlen;
            if (e->vlen > cap) {
                rc = MG_ETOOLARGE;
            } else {
                if (e->vlen)
                    memcpy(buf, val_of(e), e->vlen);
                v->str = buf;
            }
        }
    }
    unlock(d);
    return rc;
}

enum { STORE_SET, STORE_ADD, STORE_REPLACE };

static int store(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                 uint64_t ttl_ms, uint64_t now, int *evicted, int mode)
{
    int scratch, rc = 0;
    double num;
    const void *val = &num;
    size_t vlen = sizeof(num);

    if (!evicted)
        evicted = &scratch;
    *evicted = 0;
    switch (v->type) {
    case MG_SHDICT_NIL: vlen = 0; break;
    case MG_SHDICT_NUMBER: num = v->number; break;
    case MG_SHDICT_BOOLEAN: num = v->number != 0; break;
    case MG_SHDICT_STRING:
        val = v->str;
        vlen = v->len;
        break;
    default: return MG_EPROTO;
    }
    if (key.len > MG_SHDICT_MAX_KEY || vlen > UINT32_MAX)
        return MG_ETOOLARGE;
    uint64_t units = units_for(key.len, vlen);
    uint32_t h = hash(d, key);

    lock(d);
    blk_t *e = lookup(d, h, key, now);
    if ((mode == STORE_ADD && e) || (mode == STORE_REPLACE && !e)) {
        rc = MG_DECLINED;
    } else if (v->type == MG_SHDICT_NIL) {
        if (e)
            remove_entry(d, e);
    } else if (units > max_units(d)) {
        rc = MG_ETOOLARGE; /* checked before the old value goes */
    } else if (e && units <= bsize(e)) {
        /* Same key, and the new value fits in the block: rewrite it. */
        trim(d, e, (uint32_t)units);
        e->type = (uint8_t)v->type;
        e->flags = v->flags;
        e->expires = deadline(ttl_ms, now);
        e->vlen = (uint32_t)vlen;
        if (vlen)
            memcpy(val_of(e), val, vlen);
        touch(d, e);
    } else {
        /* Free the old block first: it may merge into the space needed. */
        if (e)
            remove_entry(d, e);
        if (!insert(d, h, key, (uint8_t)v->type, val, vlen, v->flags,
                    deadline(ttl_ms, now), now, evicted))
            rc = MG_ETOOLARGE; /* unreachable: units <= max_units */
    }
    unlock(d);
    return rc;
}

int mg_shdict_set(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                  uint64_t ttl_ms, uint64_t now_ms, int *evicted)
{
    return store(d, key, v, ttl_ms, now_ms, evicted, STORE_SET);
}

int mg_shdict_add(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                  uint64_t ttl_ms, uint64_t now_ms, int *evicted)
{
    return store(d, key, v, ttl_ms, now_ms, evicted, STORE_ADD);
}

int mg_shdict_replace(mg_shdict_t *d, mg_str_t key, const mg_shdict_value_t *v,
                      uint64_t ttl_ms, uint64_t now_ms, int *evicted)
{
    return store(d, key, v, ttl_ms, now_ms, evicted, STORE_REPLACE);
}

int mg_shdict_incr(mg_shdict_t *d, mg_str_t key, double delta, int has_init,
                   double init, uint64_t init_ttl_ms, uint64_t now_ms,
                   double *out)
{
    if (key.len > MG_SHDICT_MAX_KEY)
        return has_init ? MG_ETOOLARGE : MG_DECLINED;
    uint32_t h = hash(d, key);
    double num = 0;
    int rc = 0;

    lock(d);
    blk_t *e = lookup(d, h, key, now_ms);
    if (e && e->type != MG_SHDICT_NUMBER) {
        rc = MG_EPROTO;
    } else if (e) {
        memcpy(&num, val_of(e), sizeof(num));
        num += delta;
        memcpy(val_of(e), &num, sizeof(num));
        touch(d, e);
    } else if (!has_init) {
        rc = MG_DECLINED;
    } else {
        num = init + delta;
        if (!insert(d, h, key, MG_SHDICT_NUMBER, &num, sizeof(num), 0,
                    deadline(init_ttl_ms, now_ms), now_ms, NULL))
            rc = MG_ETOOLARGE;
    }
    unlock(d);
    if (rc == 0)
        *out = num;
    return rc;
}

/* A sliding window's value: the newest slice's number, then the counts of
 * slices newest - slices .. newest in a ring indexed by slice % (n + 1). */
typedef struct {
    uint64_t magic; /* tells a window from a string someone stored */
    uint64_t newest;
    uint32_t counts[MG_SHDICT_MAX_SLICES + 1];
} window_val_t;

#define WINDOW_MAGIC 0x6d67776e646f7731ULL /* "mgwndow1" */

static size_t window_size(unsigned slices)
{
    return offsetof(window_val_t, counts) + (slices + 1) * sizeof(uint32_t);
}

int mg_shdict_window_hit(mg_shdict_t *d, mg_str_t key, uint64_t window_ms,
                         unsigned slices, double limit, uint64_t now_ms,
                         mg_shdict_window_t *out)
{
    if (key.len > MG_SHDICT_MAX_KEY || slices == 0
        || slices > MG_SHDICT_MAX_SLICES || window_ms < slices)
        return MG_DECLINED;
    uint64_t slice_ms = window_ms / slices, cur = now_ms / slice_ms;
    unsigned ring = slices + 1;
    size_t vlen = window_size(slices);
    uint32_t h = hash(d, key);
    window_val_t w;
    int rc = 0;

    lock(d);
    blk_t *e = lookup(d, h, key, now_ms);
    if (e && (e->type != MG_SHDICT_STRING || e->vlen != vlen)) {
        rc = MG_EPROTO;
        goto done;
    }
    if (e) {
        memcpy(&w, val_of(e), vlen);
        if (w.magic != WINDOW_MAGIC) {
            rc = MG_EPROTO;
            goto done;
        }
    } else {
        memset(&w, 0, sizeof(w));
        w.magic = WINDOW_MAGIC;
        w.newest = cur;
    }
    /* Slices that left the window start again from zero. */
    for (uint64_t s = w.newest + 1; s <= cur && s <= w.newest + ring; s++)
        w.counts[s % ring] = 0;
    if (cur > w.newest)
        w.newest = cur;
    double sum = 0;
    for (unsigned i = 0; i < ring; i++)
        sum += w.counts[i];
    out->count = sum;
    out->admitted = sum + 1 <= limit;
    out->slice = cur;
    if (out->admitted)
        w.counts[cur % ring]++;
    /* Slice cur - slices is the oldest counted; slice j stops counting
     * once slice j + ring begins. */
    double need = out->admitted ? 0 : sum + 1 - limit, freed = 0;
    out->retry_ms = out->reset_ms = 0;
    for (uint64_t j = cur + 1 >= ring ? cur + 1 - ring : 0; j <= cur; j++) {
        uint32_t c = w.counts[j % ring];
        if (!c)
            continue;
        uint64_t leaves = (j + ring) * slice_ms - now_ms;
        if (!out->reset_ms)
            out->reset_ms = leaves;
        freed += c;
        if (need > 0 && !out->retry_ms && freed >= need)
            out->retry_ms = leaves;
    }
    if (need > 0 && !out->retry_ms)
        out->retry_ms = window_ms; /* the limit is below one hit */
    uint64_t expires = now_ms + window_ms + slice_ms;
    if (e) {
        memcpy(val_of(e), &w, vlen);
        e->expires = expires;
        touch(d, e);
    } else if (!insert(d, h, key, MG_SHDICT_STRING, &w, vlen, 0, expires,
                       now_ms, NULL)) {
        rc = MG_ETOOLARGE;
    }
done:
    unlock(d);
    return rc;
}

void mg_shdict_window_undo(mg_shdict_t *d, mg_str_t key, unsigned slices,
                           uint64_t slice)
{
    if (key.len > MG_SHDICT_MAX_KEY || slices == 0
        || slices > MG_SHDICT_MAX_SLICES)
        return;
    size_t vlen = window_size(slices);
    uint32_t h = hash(d, key);
    lock(d);
    blk_t *e = find(d, h, key);
    if (e && e->type == MG_SHDICT_STRING && e->vlen == vlen) {
        window_val_t w;
        memcpy(&w, val_of(e), vlen);
        unsigned ring = slices + 1;
        if (w.magic == WINDOW_MAGIC && slice <= w.newest
            && w.newest - slice < ring && w.counts[slice % ring] > 0) {
            w.counts[slice % ring]--;
            memcpy(val_of(e), &w, vlen);
        }
    }
    unlock(d);
}

int mg_shdict_delete(mg_shdict_t *d, mg_str_t key)
{
    if (key.len > MG_SHDICT_MAX_KEY)
        return MG_DECLINED;
    uint32_t h = hash(d, key);
    int rc = MG_DECLINED;

    lock(d);
    blk_t *e = find(d, h, key);
    if (e) {
        remove_entry(d, e); /* expired or not: delete has no clock */
        rc = 0;
    }
    unlock(d);
    return rc;
}

/*
 * Walks the LRU list once, under the lock, removing every entry whose key
 * starts with the prefix. O(entries) while the lock is held: for purges
 * (rare, operator-driven), not for request paths. The next link is read
 * before an entry is freed; freeing only merges free blocks, so the links
 * of the entries still to visit stay valid.
 */
int mg_shdict_delete_prefix(mg_shdict_t *d, mg_str_t prefix, size_t *removed)
{
    size_t n = 0;

    lock(d);
    for (uint32_t o = d->lru_head; o;) {
        blk_t *e = at(d, o);
        o = e->lnext;
        if (e->klen >= prefix.len
            && (prefix.len == 0
                || memcmp(key_of(e), prefix.p, prefix.len) == 0)) {
            remove_entry(d, e);
            n++;
        }
    }
    unlock(d);
    if (removed)
        *removed = n;
    return n ? 0 : MG_DECLINED;
}

int mg_shdict_ttl(mg_shdict_t *d, mg_str_t key, uint64_t now_ms,
                  int64_t *remaining_ms)
{
    if (key.len > MG_SHDICT_MAX_KEY)
        return MG_DECLINED;
    uint32_t h = hash(d, key);
    int rc = MG_DECLINED;

    lock(d);
    blk_t *e = lookup(d, h, key, now_ms);
    if (e) {
        uint64_t left = e->expires ? e->expires - now_ms : 0;
        *remaining_ms = left > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)left;
        rc = 0;
    }
    unlock(d);
    return rc;
}

int mg_shdict_expire(mg_shdict_t *d, mg_str_t key, uint64_t ttl_ms,
                     uint64_t now_ms)
{
    if (key.len > MG_SHDICT_MAX_KEY)
        return MG_DECLINED;
    uint32_t h = hash(d, key);
    int rc = MG_DECLINED;

    lock(d);
    blk_t *e = lookup(d, h, key, now_ms);
    if (e) {
        e->expires = deadline(ttl_ms, now_ms);
        rc = 0;
    }
    unlock(d);
    return rc;
}

void mg_shdict_flush_all(mg_shdict_t *d)
{
    lock(d);
    format(d);
    unlock(d);
}

void mg_shdict_stats(mg_shdict_t *d, size_t *capacity, size_t *free_bytes,
                     size_t *count)
{
    lock(d);
    if (capacity)
        *capacity = d->size;
    if (free_bytes)
        *free_bytes = d->free_units * UNIT;
    if (count)
        *count = d->count;
    unlock(d);
}

/* ---- consistency check ------------------------------------------------- */

#define BAD(cond)                                                              \
    do {                                                                       \
        if (cond)                                                              \
            return MG_EPROTO;                                                  \
    } while (0)

static int verify_heap(mg_shdict_t *d, uint64_t *nused, uint64_t *nfree)
{
    uint32_t o = d->heap_lo, prev = 0, prev_free = 0;
    uint64_t free_units = 0;

    *nused = *nfree = 0;
    while (o < d->heap_hi) {
        blk_t *b = at(d, o);
        uint32_t s = bsize(b), is_free = !(b->size & USED);
        BAD(s < MIN_BLOCK || s > d->heap_hi - o || b->psize != prev);
        BAD(is_free && prev_free);
        if (is_free) {
            free_units += s;
            ++*nfree;
        } else {
            BAD(b->klen > MG_SHDICT_MAX_KEY || units_for(b->klen, b->vlen) > s);
            BAD(b->type < MG_SHDICT_NUMBER || b->type > MG_SHDICT_BOOLEAN);
            BAD(b->type != MG_SHDICT_STRING && b->vlen != sizeof(double));
            mg_str_t k = {key_of(b), b->klen};
            BAD(hash(d, k) != b->hash);
            ++*nused;
        }
        prev = s;
        prev_free = is_free;
        o += s;
    }
    blk_t *sentinel = at(d, d->heap_hi);
    BAD(o != d->heap_hi || sentinel->size != (1 | USED)
        || sentinel->psize != prev);
    BAD(free_units != d->free_units || *nused != d->count);
    return 0;
}

static int in_heap(mg_shdict_t *d, uint32_t o)
{
    return o >= d->heap_lo && o < d->heap_hi;
}

static int verify_lists(mg_shdict_t *d, uint64_t nused, uint64_t nfree)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < NBINS; i++) {
        uint32_t prev = 0;
        int bit = (d->binmap[i / 64] >> (i % 64)) & 1;
        BAD(bit != (d->bins[i] != 0));
        for (uint32_t o = d->bins[i]; o; prev = o, o = at(d, o)->fnext) {
            BAD(!in_heap(d, o) || ++n > nfree);
            blk_t *b = at(d, o);
            BAD((b->size & USED) || bin_of(b->size) != i || b->fprev != prev);
        }
    }
    BAD(n != nfree);

    n = 0;
    uint32_t *table = (uint32_t *)at(d, d->buckets);
    for (uint32_t i = 0; i < d->nbuckets; i++) {
        for (uint32_t o = table[i]; o; o = at(d, o)->hnext) {
            BAD(!in_heap(d, o) || ++n > nused);
            blk_t *e = at(d, o);
            BAD(!(e->size & USED) || (e->hash & (d->nbuckets - 1)) != i);
        }
    }
    BAD(n != nused);

    n = 0;
    uint32_t prev = 0;
    for (uint32_t o = d->lru_head; o; prev = o, o = at(d, o)->lnext) {
        BAD(!in_heap(d, o) || ++n > nused);
        blk_t *e = at(d, o);
        BAD(!(e->size & USED) || e->lprev != prev);
    }
    BAD(n != nused || d->lru_tail != prev);
    return 0;
}

int mg_shdict_check(mg_shdict_t *d)
{
    uint64_t nused, nfree;
    int rc;

    lock(d);
    rc = d->magic == MAGIC ? verify_heap(d, &nused, &nfree) : MG_EPROTO;
    if (rc == 0)
        rc = verify_lists(d, nused, nfree);
    unlock(d);
    return rc;
}

void mg_shdict_test_lock(mg_shdict_t *d, int mid_write)
{
    lock(d);
    if (!mid_write) {
        atomic_signal_fence(memory_order_seq_cst);
        d->dirty = 0;
    }
}
