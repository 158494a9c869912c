/*
 * A lazily moved timer deadline. The deadline lives in the owner's state;
 * the libuv timer is moved only when a new deadline comes earlier than the
 * one it is set for. A later or cleared deadline is noticed when the timer
 * fires (mg_deadline_fired), so waits that follow each other — header,
 * body, keep-alive; send, read — cost no timer-heap work per request.
 * Loop thread only.
 */
#ifndef MG_DEADLINE_H
#define MG_DEADLINE_H

#include <stdint.h>
#include <uv.h>

typedef struct {
    uint64_t at;  /* loop time the wait ends; 0: no wait */
    uint64_t due; /* what the timer is set for, when armed */
    unsigned armed : 1;
} mg_deadline_t;

/* The timer is now set for something else (or not at all). */
static inline void mg_deadline_forget_timer(mg_deadline_t *d)
{
    d->armed = 0;
}

/* A wait of `ms` from now; `cb` is the timer's callback. */
static inline void mg_deadline_set(mg_deadline_t *d, uv_timer_t *t,
                                   uv_timer_cb cb, uint64_t ms)
{
    d->at = uv_now(t->loop) + ms;
    if (!d->armed || d->due > d->at) {
        d->armed = 1;
        d->due = d->at;
        uv_timer_start(t, cb, ms, 0);
    }
}

static inline void mg_deadline_clear(mg_deadline_t *d)
{
    d->at = 0; /* the timer, if set, fires and finds nothing to do */
}

/*
 * From the timer's callback: 1 when the wait is over (the deadline is then
 * cleared), 0 when nothing is due yet — the timer was re-set for the later
 * deadline — or nothing is waited for.
 */
static inline int mg_deadline_fired(mg_deadline_t *d, uv_timer_t *t,
                                    uv_timer_cb cb)
{
    d->armed = 0;
    if (!d->at)
        return 0;
    uint64_t now = uv_now(t->loop);
    if (now < d->at) {
        d->armed = 1;
        d->due = d->at;
        uv_timer_start(t, cb, d->at - now, 0);
        return 0;
    }
    d->at = 0;
    return 1;
}

#endif
