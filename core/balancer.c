/*
 * The balancers of balancer.h. Each pick is O(n) in the number of targets
 * (upstreams have a handful) except hash, which is a binary search over the
 * ring plus a walk past unusable targets' points.
 */
#include "balancer.h"

#include <stdio.h>
#include <stdlib.h>

#define VNODES_PER_WEIGHT 160
#define VNODES_MAX 16000 /* per target, whatever its weight */

typedef struct {
    uint64_t hash;
    uint32_t target;
} point_t;

struct mg_balancer_s {
    mg_balancer_kind_t kind;
    size_t n;
    unsigned *weights;
    int64_t *current; /* smooth WRR: each target's running score */
    unsigned cursor;  /* round robin, least_conn tie rotation */
    uint64_t rng;     /* p2c: xorshift64* state, never 0 */
    point_t *ring;    /* hash */
    size_t npoints;
};

int mg_balancer_kind_parse(const char *name)
{
    static const char *const names[] = {"round_robin", "weighted", "least_conn",
                                        "hash", "p2c"};
    for (size_t i = 0; i < MG_ARRAY_SIZE(names); i++)
        if (strcmp(name, names[i]) == 0)
            return (int)i;
    return -1;
}

uint64_t mg_balancer_hash(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    /* FNV's low bits are weak for short, similar keys ("t#1", "t#2"):
     * finish with splitmix64's mixer so ring points spread evenly. */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

static int cmp_point(const void *a, const void *b)
{
    const point_t *x = a, *y = b;
    if (x->hash != y->hash)
        return x->hash < y->hash ? -1 : 1;
    return x->target < y->target ? -1 : x->target > y->target;
}

static void build_ring(mg_balancer_t *b, const char *const *names)
{
    size_t total = 0;
    for (size_t i = 0; i < b->n; i++) {
        size_t v = (size_t)b->weights[i] * VNODES_PER_WEIGHT;
        total += v > VNODES_MAX ? VNODES_MAX : v;
    }
    b->ring = mg_calloc(total, sizeof(point_t));
    for (size_t i = 0; i < b->n; i++) {
        size_t v = (size_t)b->weights[i] * VNODES_PER_WEIGHT;
        if (v > VNODES_MAX)
            v = VNODES_MAX;
        for (size_t k = 0; k < v; k++) {
            char buf[300];
            int len = snprintf(buf, sizeof(buf), "%.256s#%zu", names[i], k);
            b->ring[b->npoints++] =
                (point_t){mg_balancer_hash(buf, (size_t)len), (uint32_t)i};
        }
    }
    qsort(b->ring, b->npoints, sizeof(point_t), cmp_point);
}

mg_balancer_t *mg_balancer_new(mg_balancer_kind_t kind, size_t n,
                               const char *const *names,
                               const unsigned *weights, uint64_t seed)
{
    mg_balancer_t *b = mg_calloc(1, sizeof(*b));
    b->kind = kind;
    b->n = n;
    b->weights = mg_calloc(n, sizeof(unsigned));
    b->current = mg_calloc(n, sizeof(int64_t));
    for (size_t i = 0; i < n; i++)
        b->weights[i] = weights && weights[i] ? weights[i] : 1;
    b->rng = seed ? seed : 0x9e3779b97f4a7c15ull;
    if (kind == MG_BALANCE_HASH)
        build_ring(b, names);
    return b;
}

void mg_balancer_free(mg_balancer_t *b)
{
    if (!b)
        return;
    free(b->weights);
    free(b->current);
    free(b->ring);
    free(b);
}

static uint64_t next_random(mg_balancer_t *b)
{
    uint64_t x = b->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b->rng = x;
    return x * 0x2545f4914f6cdd1dull;
}

static int round_robin(mg_balancer_t *b, const uint8_t *usable)
{
    for (size_t k = 0; k < b->n; k++) {
        size_t i = (b->cursor + k) % b->n;
        if (usable[i]) {
            b->cursor = (unsigned)((i + 1) % b->n);
            return (int)i;
        }
    }
    return -1;
}

/*
 * nginx's smooth weighted round robin: every usable target gains its
 * weight, the highest score wins and pays the total back. Unusable targets
 * neither gain nor pay, so the others share their turns.
 */
static int weighted(mg_balancer_t *b, const uint8_t *usable)
{
    int best = -1;
    int64_t total = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (!usable[i])
            continue;
        b->current[i] += b->weights[i];
        total += b->weights[i];
        if (best < 0 || b->current[i] > b->current[best])
            best = (int)i;
    }
    if (best >= 0)
        b->current[best] -= total;
    return best;
}

/*
 * Fewest in-flight requests per unit of weight: a/wa < c/wc compared as
 * a*wc < c*wa. The scan starts at a rotating cursor so that equal targets
 * (all idle, say) take turns instead of the first one taking everything.
 */
static int least_conn(mg_balancer_t *b, const mg_balancer_in_t *in)
{
    int best = -1;
    for (size_t k = 0; k < b->n; k++) {
        size_t i = (b->cursor + k) % b->n;
        if (!in->usable[i])
            continue;
        if (best < 0) {
            best = (int)i;
            continue;
        }
        uint64_t a = in->inflight ? in->inflight[i] : 0;
        uint64_t c = in->inflight ? in->inflight[best] : 0;
        if (a * b->weights[best] < c * b->weights[i])
            best = (int)i;
    }
    b->cursor = (unsigned)((b->cursor + 1) % b->n);
    return best;
}

static int hash_pick(mg_balancer_t *b, const mg_balancer_in_t *in)
{
    size_t lo = 0, hi = b->npoints;
    while (lo < hi) { /* first point with hash >= key */
        size_t mid = lo + (hi - lo) / 2;
        if (b->ring[mid].hash < in->key)
            lo = mid + 1;
        else
            hi = mid;
    }
    /* Clockwise to the first usable target's point: what removing the
     * unusable ones from the ring would give. */
    for (size_t k = 0; k < b->npoints; k++) {
        const point_t *pt = &b->ring[(lo + k) % b->npoints];
        if (in->usable[pt->target])
            return (int)pt->target;
    }
    return -1;
}

static uint64_t p2c_score(const mg_balancer_in_t *in, size_t i)
{
    uint64_t lat = in->ewma_us ? in->ewma_us[i] : 0;
    uint64_t load = (in->inflight ? in->inflight[i] : 0) + 1;
    /* +1 µs so that a target with no latency sample yet still weighs its
     * load, and an unmeasured idle target is tried first. */
    return (lat + 1) * load;
}

static int p2c(mg_balancer_t *b, const mg_balancer_in_t *in)
{
    size_t nusable = 0;
    for (size_t i = 0; i < b->n; i++)
        nusable += in->usable[i] != 0;
    if (nusable == 0)
        return -1;
    /* Draw the r1-th and r2-th usable targets, r1 != r2. */
    size_t r1 = (size_t)(next_random(b) % nusable), r2 = r1;
    if (nusable > 1) {
        r2 = (size_t)(next_random(b) % (nusable - 1));
        if (r2 >= r1)
            r2++;
    }
    int a = -1, c = -1;
    for (size_t i = 0, seen = 0; i < b->n; i++) {
        if (!in->usable[i])
            continue;
        if (seen == r1)
            a = (int)i;
        if (seen == r2)
            c = (int)i;
        seen++;
    }
    return p2c_score(in, (size_t)c) < p2c_score(in, (size_t)a) ? c : a;
}

int mg_balancer_pick(mg_balancer_t *b, const mg_balancer_in_t *in)
{
    switch (b->kind) {
    case MG_BALANCE_WEIGHTED: return weighted(b, in->usable);
    case MG_BALANCE_LEAST_CONN: return least_conn(b, in);
    case MG_BALANCE_HASH: return hash_pick(b, in);
    case MG_BALANCE_P2C: return p2c(b, in);
    case MG_BALANCE_ROUND_ROBIN:
    default: return round_robin(b, in->usable);
    }
}
