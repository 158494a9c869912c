/*
 * The per-target circuit breaker, shared by every worker: its state lives
 * in shared memory (peers.c) and every change is an atomic operation, so N
 * processes behave as one breaker. Pure: the caller passes the time, so the
 * unit tests (tests/unit/test_breaker.c) drive it without a clock.
 *
 *   closed    -> open       after `failures` consecutive failures, or when
 *                           the failure ratio over the sliding `window`
 *                           reaches `failure_ratio` (once `min_requests`
 *                           were seen in it)
 *   open      -> half-open  when `open_for` has passed (the first request
 *                           after it makes the move)
 *   half-open               admits at most `half_open_probes` requests in
 *                           total, across all workers (one CAS'd word holds
 *                           state, epoch, probes admitted and probes passed)
 *   half-open -> closed     when that many probes succeeded
 *   half-open -> open       on the first probe failure (a new cool-down)
 *
 * Results of requests admitted in an earlier epoch (before the last
 * transition) count in the window but never move the state, so a slow
 * request from before the breaker opened cannot close it.
 */
#ifndef MG_BREAKER_H
#define MG_BREAKER_H

#include <stdatomic.h>

#include "config.h"

#define MG_BREAKER_BUCKETS 20

enum { MG_BREAKER_CLOSED, MG_BREAKER_OPEN, MG_BREAKER_HALF_OPEN };

typedef struct {
    _Atomic uint64_t stamp; /* which bucket-length period it counts */
    _Atomic uint32_t ok, fail;
} mg_breaker_bucket_t;

/* Lives in shared memory, zeroed = closed. */
typedef struct {
    _Atomic uint64_t word;     /* epoch:32 state:2 probes:15 passed:15 */
    _Atomic uint64_t since_ms; /* when the state last changed */
    _Atomic uint32_t consecutive;
    mg_breaker_bucket_t buckets[MG_BREAKER_BUCKETS];
} mg_breaker_t;

/* What a caller got from mg_breaker_allow, handed back with the result. */
typedef struct {
    uint32_t epoch;
    uint8_t probe; /* admitted as a half-open probe */
} mg_breaker_ticket_t;

/*
 * May a request go to this target now? Returns 1 and fills *t (pass it to
 * mg_breaker_report or mg_breaker_cancel exactly once), or 0 when open or
 * when the half-open probes are all taken.
 */
int mg_breaker_allow(mg_breaker_t *b, const mg_breaker_conf_t *c,
                     uint64_t now_ms, mg_breaker_ticket_t *t);

/* Would mg_breaker_allow admit a request now? No side effect (balancers
 * use it to skip open targets). */
int mg_breaker_usable(mg_breaker_t *b, const mg_breaker_conf_t *c,
                      uint64_t now_ms);

/* The outcome of an admitted request. */
void mg_breaker_report(mg_breaker_t *b, const mg_breaker_conf_t *c,
                       uint64_t now_ms, const mg_breaker_ticket_t *t, int ok);

/* An admitted request that never reached a verdict (client gone): gives a
 * probe slot back. */
void mg_breaker_cancel(mg_breaker_t *b, const mg_breaker_ticket_t *t);

/* Current state (MG_BREAKER_*), as the next allow would see it apart from
 * the open -> half-open move. */
int mg_breaker_state(mg_breaker_t *b);

/* "closed", "open", "half_open". */
const char *mg_breaker_state_name(int state);

#endif
