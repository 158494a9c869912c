/*
 * Per-target state shared by every process of the gateway: health (up or
 * down, from passive and active checks), consecutive failures, the circuit
 * breaker, requests in flight and latency. One fixed table of slots in a
 * MAP_SHARED mapping the master creates before it forks, so every worker,
 * a restarted worker and the health checker see the same numbers. A slot is
 * keyed by upstream name + target address: a reload that keeps a target
 * keeps its state; a slot is never freed (a target dropped by a reload
 * leaves its slot behind, bounded by MG_PEERS_MAX).
 *
 * Like zones.c this is process-wide by nature (an inherited mapping), so
 * the table is one static, written only by claiming free slots atomically.
 */
#ifndef MG_PEERS_H
#define MG_PEERS_H

#include <stdatomic.h>

#include "breaker.h"
#include "common.h"

#define MG_PEERS_MAX 4096
#define MG_PEER_KEY_MAX 192

typedef struct {
    _Atomic uint32_t used; /* 0 free, 1 being claimed, 2 ready */
    uint32_t keylen;
    char key[MG_PEER_KEY_MAX];      /* "upstream\0host:port" (truncated) */
    _Atomic uint32_t down;          /* 1: skipped by the balancers */
    _Atomic uint64_t down_until_ms; /* passive mark without active checks:
                                       up again after this; 0 = until an
                                       active check restores it */
    _Atomic uint32_t fails;         /* passive: consecutive failures */
    _Atomic uint32_t active_ok;     /* active: consecutive passes */
    _Atomic uint32_t active_fail;   /* active: consecutive failures */
    _Atomic uint32_t inflight;      /* requests on it, all workers */
    _Atomic uint64_t ewma_us;       /* response-head latency */
    _Atomic uint64_t requests;      /* tries sent, ever */
    _Atomic uint64_t failures;      /* tries failed, ever */
    _Atomic uint64_t checks;        /* active checks done, ever */
    mg_breaker_t breaker;
} mg_peer_t;

/*
 * Maps the table (zeroed) unless already mapped. Master, before forking;
 * a process that finds it unmapped (unit tests, `moongate lua`) gets a
 * private one. Returns 0 or a negative errno.
 */
int mg_peers_init(void);

/*
 * The slot for (upstream, target), claimed on first use. Never NULL: when
 * the table is full a private, per-process slot is returned (and an error
 * logged once), so the gateway degrades to per-worker state, not to none.
 */
mg_peer_t *mg_peers_get(mg_str_t upstream, mg_str_t target);

#endif
