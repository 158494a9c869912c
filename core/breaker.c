/*
 * The circuit breaker of breaker.h. Everything that decides a transition
 * (state, epoch, probes admitted, probes passed) sits in one 64-bit word
 * changed only by compare-and-swap, so two workers can never both win the
 * same transition nor admit more than K probes between them. The sliding
 * window is a ring of time buckets; a bucket is recycled by whoever first
 * sees it stale, and an increment racing with that recycle may be lost:
 * the ratio is an estimate, the transitions are exact.
 */
#include "breaker.h"

#define PROBES_SHIFT 15
#define STATE_SHIFT 30
#define EPOCH_SHIFT 32
#define FIELD_MASK ((1u << 15) - 1)

typedef struct {
    uint32_t epoch;
    unsigned state, probes, passed;
} word_t;

static word_t unpack(uint64_t w)
{
    return (word_t){
        (uint32_t)(w >> EPOCH_SHIFT), (unsigned)(w >> STATE_SHIFT) & 3,
        (unsigned)(w >> PROBES_SHIFT) & FIELD_MASK, (unsigned)w & FIELD_MASK};
}

static uint64_t pack(word_t v)
{
    return (uint64_t)v.epoch << EPOCH_SHIFT
           | (uint64_t)(v.state & 3) << STATE_SHIFT
           | (uint64_t)(v.probes & FIELD_MASK) << PROBES_SHIFT
           | (uint64_t)(v.passed & FIELD_MASK);
}

static uint64_t bucket_ms(const mg_breaker_conf_t *c)
{
    uint64_t ms = c->window_ms / MG_BREAKER_BUCKETS;
    return ms ? ms : 1;
}

static void window_reset(mg_breaker_t *b)
{
    for (int i = 0; i < MG_BREAKER_BUCKETS; i++)
        atomic_store(&b->buckets[i].stamp, 0);
}

static void window_add(mg_breaker_t *b, const mg_breaker_conf_t *c,
                       uint64_t now_ms, int ok)
{
    /* Periods start at 1 so that stamp 0 means "empty". */
    uint64_t period = now_ms / bucket_ms(c) + 1;
    mg_breaker_bucket_t *k = &b->buckets[period % MG_BREAKER_BUCKETS];
    uint64_t seen = atomic_load(&k->stamp);
    if (seen != period
        && atomic_compare_exchange_strong(&k->stamp, &seen, period)) {
        atomic_store(&k->ok, 0);
        atomic_store(&k->fail, 0);
    }
    atomic_fetch_add(ok ? &k->ok : &k->fail, 1);
}

static void window_sum(mg_breaker_t *b, const mg_breaker_conf_t *c,
                       uint64_t now_ms, uint64_t *total, uint64_t *fails)
{
    uint64_t period = now_ms / bucket_ms(c) + 1;
    *total = *fails = 0;
    for (int i = 0; i < MG_BREAKER_BUCKETS; i++) {
        mg_breaker_bucket_t *k = &b->buckets[i];
        uint64_t stamp = atomic_load(&k->stamp);
        if (!stamp || stamp > period || period - stamp >= MG_BREAKER_BUCKETS)
            continue;
        uint32_t f = atomic_load(&k->fail);
        *fails += f;
        *total += f + atomic_load(&k->ok);
    }
}

/* Moves from `from` (the word seen) to a fresh epoch in `state`. */
static int transition(mg_breaker_t *b, uint64_t from, unsigned state,
                      unsigned probes, uint64_t now_ms)
{
    word_t v = unpack(from);
    word_t next = {v.epoch + 1, state, probes, 0};
    if (!atomic_compare_exchange_strong(&b->word, &from, pack(next)))
        return 0;
    /* A reader seeing the new state with the old time at worst waits
     * one cool-down too few microseconds; nothing else reads it. */
    atomic_store(&b->since_ms, now_ms);
    atomic_store(&b->consecutive, 0);
    if (state == MG_BREAKER_CLOSED)
        window_reset(b);
    return 1;
}

int mg_breaker_allow(mg_breaker_t *b, const mg_breaker_conf_t *c,
                     uint64_t now_ms, mg_breaker_ticket_t *t)
{
    for (;;) {
        uint64_t w = atomic_load(&b->word);
        word_t v = unpack(w);
        uint64_t since = atomic_load(&b->since_ms);
        int cooled = now_ms >= since + c->open_ms;
        switch (v.state) {
        case MG_BREAKER_CLOSED:
            *t = (mg_breaker_ticket_t){v.epoch, 0};
            return 1;
        case MG_BREAKER_OPEN:
            if (!cooled)
                return 0;
            /* The first request after the cool-down is the first probe. */
            if (transition(b, w, MG_BREAKER_HALF_OPEN, 1, now_ms)) {
                *t = (mg_breaker_ticket_t){v.epoch + 1, 1};
                return 1;
            }
            continue;
        default: /* half-open */
            if (v.probes >= c->half_open_probes) {
                /* Probes that never report (lost) must not wedge the
                 * breaker: after another cool-down, start over. */
                if (cooled
                    && transition(b, w, MG_BREAKER_HALF_OPEN, 1, now_ms)) {
                    *t = (mg_breaker_ticket_t){v.epoch + 1, 1};
                    return 1;
                }
                if (cooled)
                    continue;
                return 0;
            }
            v.probes++;
            if (atomic_compare_exchange_strong(&b->word, &w, pack(v))) {
                *t = (mg_breaker_ticket_t){v.epoch, 1};
                return 1;
            }
            continue;
        }
    }
}

int mg_breaker_usable(mg_breaker_t *b, const mg_breaker_conf_t *c,
                      uint64_t now_ms)
{
    word_t v = unpack(atomic_load(&b->word));
    int cooled = now_ms >= atomic_load(&b->since_ms) + c->open_ms;
    switch (v.state) {
    case MG_BREAKER_CLOSED: return 1;
    case MG_BREAKER_OPEN: return cooled;
    default: return v.probes < c->half_open_probes || cooled;
    }
}

static void report_probe(mg_breaker_t *b, const mg_breaker_conf_t *c,
                         uint64_t now_ms, const mg_breaker_ticket_t *t, int ok)
{
    for (;;) {
        uint64_t w = atomic_load(&b->word);
        word_t v = unpack(w);
        if (v.epoch != t->epoch || v.state != MG_BREAKER_HALF_OPEN)
            return; /* a stale probe: the breaker moved on */
        if (!ok) {
            if (transition(b, w, MG_BREAKER_OPEN, 0, now_ms))
                return;
            continue;
        }
        if (v.passed + 1 >= c->half_open_probes) {
            if (transition(b, w, MG_BREAKER_CLOSED, 0, now_ms))
                return;
            continue;
        }
        v.passed++;
        if (atomic_compare_exchange_strong(&b->word, &w, pack(v)))
            return;
    }
}

void mg_breaker_report(mg_breaker_t *b, const mg_breaker_conf_t *c,
                       uint64_t now_ms, const mg_breaker_ticket_t *t, int ok)
{
    window_add(b, c, now_ms, ok);
    if (t->probe) {
        report_probe(b, c, now_ms, t, ok);
        return;
    }
    uint64_t w = atomic_load(&b->word);
    word_t v = unpack(w);
    if (v.state != MG_BREAKER_CLOSED || v.epoch != t->epoch)
        return;
    if (ok) {
        atomic_store(&b->consecutive, 0);
        return;
    }
    uint32_t run = atomic_fetch_add(&b->consecutive, 1) + 1;
    int trip = c->failures && run >= c->failures;
    if (!trip && c->failure_ratio > 0) {
        uint64_t total, fails;
        window_sum(b, c, now_ms, &total, &fails);
        trip = total >= c->min_requests
               && (double)fails >= c->failure_ratio * (double)total;
    }
    if (trip)
        transition(b, w, MG_BREAKER_OPEN, 0, now_ms);
}

void mg_breaker_cancel(mg_breaker_t *b, const mg_breaker_ticket_t *t)
{
    if (!t->probe)
        return;
    for (;;) {
        uint64_t w = atomic_load(&b->word);
        word_t v = unpack(w);
        if (v.epoch != t->epoch || v.state != MG_BREAKER_HALF_OPEN
            || v.probes == 0)
            return;
        v.probes--;
        if (atomic_compare_exchange_strong(&b->word, &w, pack(v)))
            return;
    }
}

int mg_breaker_state(mg_breaker_t *b)
{
    return (int)unpack(atomic_load(&b->word)).state;
}

const char *mg_breaker_state_name(int state)
{
    switch (state) {
    case MG_BREAKER_OPEN: return "open";
    case MG_BREAKER_HALF_OPEN: return "half_open";
    default: return "closed";
    }
}
