/*
 * Load balancers: given an upstream's targets and which of them may be
 * used right now, choose one. Pure: no event loop, no shared memory, no
 * Lua; the caller (upstream.c) supplies the per-target facts (usable,
 * in-flight requests, latency) and the hash key, so every algorithm is
 * unit-testable alone (tests/unit/test_balancer.c).
 *
 * Algorithms (mg_balancer_kind_t):
 *   round_robin  each usable target in turn, weights ignored
 *   weighted     nginx's smooth weighted round robin: over a cycle of
 *                sum(weights) picks each target is chosen exactly `weight`
 *                times, interleaved rather than in bursts
 *   least_conn   fewest in-flight requests relative to weight; ties rotate
 *   hash         consistent hashing on a ring of virtual nodes (160 per
 *                weight unit, placed by hashing "target#i"), so removing one
 *                of N targets moves only the keys it owned (about 1/N)
 *   p2c          power of two choices: two distinct usable targets drawn at
 *                random, the one with the lower EWMA latency times (in-flight
 *                + 1) wins
 *
 * A balancer is built once per generation and upstream, and used by one
 * thread (its cursors and random state are not shared between workers).
 */
#ifndef MG_BALANCER_H
#define MG_BALANCER_H

#include "common.h"

typedef enum {
    MG_BALANCE_ROUND_ROBIN,
    MG_BALANCE_WEIGHTED,
    MG_BALANCE_LEAST_CONN,
    MG_BALANCE_HASH,
    MG_BALANCE_P2C,
} mg_balancer_kind_t;

typedef struct mg_balancer_s mg_balancer_t;

/* What the caller knows about each target at pick time (arrays of n). */
typedef struct {
    const uint8_t *usable;    /* nonzero: may be picked */
    const uint32_t *inflight; /* least_conn, p2c (NULL: all zero) */
    const uint64_t *ewma_us;  /* p2c (NULL: all zero) */
    uint64_t key;             /* hash: mg_balancer_hash() of the key */
} mg_balancer_in_t;

/* Parses "round_robin", "weighted", ...; returns -1 when unknown. */
int mg_balancer_kind_parse(const char *name);

/*
 * Builds a balancer over n targets (n >= 1). `names` (borrowed during the
 * call only) place the hash ring's virtual nodes, so every worker and every
 * generation with the same targets builds the same ring. `weights` >= 1.
 * `seed` seeds p2c's random draws. Free with mg_balancer_free.
 */
mg_balancer_t *mg_balancer_new(mg_balancer_kind_t kind, size_t n,
                               const char *const *names,
                               const unsigned *weights, uint64_t seed);
void mg_balancer_free(mg_balancer_t *b);

/* Index of the chosen target, or -1 when none is usable. */
int mg_balancer_pick(mg_balancer_t *b, const mg_balancer_in_t *in);

/* The 64-bit hash used for keys and the ring (FNV-1a, then mixed). */
uint64_t mg_balancer_hash(const void *data, size_t len);

#endif
