/*
 * Unit tests for the circuit breaker (core/breaker.c): consecutive and
 * ratio trips, the cool-down, exactly K half-open probes (also across
 * processes sharing the breaker through a MAP_SHARED mapping), closing on
 * success, reopening on failure, stale results ignored.
 */
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "breaker.h"
#include "unit.h"

static mg_breaker_conf_t conf(void)
{
    mg_breaker_conf_t c = {.enabled = 1,
                           .failures = 5,
                           .failure_ratio = 0.5,
                           .window_ms = 10000,
                           .min_requests = 20,
                           .open_ms = 30000,
                           .half_open_probes = 3};
    return c;
}

/* One request through the breaker; returns whether it was admitted. */
static int request(mg_breaker_t *b, const mg_breaker_conf_t *c, uint64_t now,
                   int ok)
{
    mg_breaker_ticket_t t;
    if (!mg_breaker_allow(b, c, now, &t))
        return 0;
    mg_breaker_report(b, c, now, &t, ok);
    return 1;
}

static void test_opens_after_consecutive_failures(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    for (int i = 0; i < 4; i++)
        CHECK(request(&b, &c, 1000, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    CHECK(request(&b, &c, 1000, 1)); /* a success resets the run */
    for (int i = 0; i < 4; i++)
        CHECK(request(&b, &c, 1000, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    CHECK(request(&b, &c, 1000, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_OPEN);
    CHECK(!request(&b, &c, 1001, 1));
    CHECK(!mg_breaker_usable(&b, &c, 30999));
    CHECK(mg_breaker_usable(&b, &c, 31000));
}

static void test_opens_on_failure_ratio(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    c.failures = 0; /* ratio only */
    /* Alternating: 50% failures, but only once 20 requests were seen. */
    for (int i = 0; i < 19; i++)
        CHECK(request(&b, &c, 1000 + (uint64_t)i, i % 2));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    CHECK(request(&b, &c, 1019, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_OPEN);
}

static void test_ratio_window_slides(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    c.failures = 0;
    /* 15 failures long ago, then 20 successes and 5 failures now: the old
     * failures have left the 10 s window, so 5/25 < 0.5. */
    for (int i = 0; i < 15; i++)
        CHECK(request(&b, &c, 1000, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    for (int i = 0; i < 20; i++)
        CHECK(request(&b, &c, 20000, 1));
    for (int i = 0; i < 5; i++)
        CHECK(request(&b, &c, 20000, 0));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
}

static void trip(mg_breaker_t *b, const mg_breaker_conf_t *c, uint64_t now)
{
    for (unsigned i = 0; i < c->failures; i++)
        request(b, c, now, 0);
}

static void test_half_open_admits_exactly_k(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    trip(&b, &c, 1000);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_OPEN);
    mg_breaker_ticket_t t[10];
    int admitted = 0;
    for (int i = 0; i < 10; i++)
        admitted += mg_breaker_allow(&b, &c, 31000, &t[admitted]);
    CHECK_INT(admitted, ==, 3);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_HALF_OPEN);
    CHECK(!mg_breaker_usable(&b, &c, 31001));
    /* Two successes: still half-open; the third closes. */
    mg_breaker_report(&b, &c, 31010, &t[0], 1);
    mg_breaker_report(&b, &c, 31010, &t[1], 1);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_HALF_OPEN);
    mg_breaker_report(&b, &c, 31010, &t[2], 1);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    CHECK(request(&b, &c, 31011, 1));
}

static void test_probe_failure_reopens(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    trip(&b, &c, 1000);
    mg_breaker_ticket_t t1, t2;
    CHECK(mg_breaker_allow(&b, &c, 31000, &t1));
    CHECK(mg_breaker_allow(&b, &c, 31000, &t2));
    mg_breaker_report(&b, &c, 31100, &t1, 0);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_OPEN);
    /* The other probe's late success is from the old epoch: ignored. */
    mg_breaker_report(&b, &c, 31200, &t2, 1);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_OPEN);
    CHECK(!request(&b, &c, 61099, 1)); /* a new cool-down from 31100 */
    CHECK(request(&b, &c, 61100, 1));
}

static void test_stale_closed_result_does_not_reopen(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    c.half_open_probes = 1;
    mg_breaker_ticket_t old;
    CHECK(mg_breaker_allow(&b, &c, 500, &old)); /* slow, from before */
    trip(&b, &c, 1000);
    CHECK(request(&b, &c, 31000, 1));
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
    mg_breaker_report(&b, &c, 31001, &old, 0);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
}

static void test_cancel_gives_probe_back(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    c.half_open_probes = 1;
    trip(&b, &c, 1000);
    mg_breaker_ticket_t t;
    CHECK(mg_breaker_allow(&b, &c, 31000, &t));
    mg_breaker_ticket_t again;
    CHECK(!mg_breaker_allow(&b, &c, 31000, &again));
    mg_breaker_cancel(&b, &t);
    CHECK(mg_breaker_allow(&b, &c, 31001, &again));
    CHECK_INT(again.probe, ==, 1);
}

static void test_lost_probes_do_not_wedge(void)
{
    mg_breaker_t b = {0};
    mg_breaker_conf_t c = conf();
    c.half_open_probes = 1;
    trip(&b, &c, 1000);
    mg_breaker_ticket_t t;
    CHECK(mg_breaker_allow(&b, &c, 31000, &t)); /* never reports */
    CHECK(!mg_breaker_allow(&b, &c, 60999, &t));
    CHECK(mg_breaker_allow(&b, &c, 61000, &t));
    mg_breaker_report(&b, &c, 61001, &t, 1);
    CHECK_INT(mg_breaker_state(&b), ==, MG_BREAKER_CLOSED);
}

/* Four processes race for the probes of one shared breaker. */
static void test_exactly_k_probes_across_processes(void)
{
    mg_breaker_conf_t c = conf();
    c.half_open_probes = 3;
    mg_breaker_t *b =
        mmap(NULL, sizeof(mg_breaker_t) + 64, PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(b != MAP_FAILED);
    _Atomic unsigned *admitted = (_Atomic unsigned *)(b + 1);
    trip(b, &c, 1000);
    pid_t kids[4];
    for (int k = 0; k < 4; k++) {
        kids[k] = fork();
        if (kids[k] == 0) {
            for (int i = 0; i < 20000; i++) {
                mg_breaker_ticket_t t;
                if (mg_breaker_allow(b, &c, 31000, &t))
                    atomic_fetch_add(admitted, 1);
            }
            _exit(0);
        }
    }
    for (int k = 0; k < 4; k++)
        waitpid(kids[k], NULL, 0);
    unsigned got = atomic_load(admitted);
    munmap(b, sizeof(mg_breaker_t) + 64);
    CHECK_INT(got, ==, 3);
}

int main(void)
{
    RUN(test_opens_after_consecutive_failures);
    RUN(test_opens_on_failure_ratio);
    RUN(test_ratio_window_slides);
    RUN(test_half_open_admits_exactly_k);
    RUN(test_probe_failure_reopens);
    RUN(test_stale_closed_result_does_not_reopen);
    RUN(test_cancel_gives_probe_back);
    RUN(test_lost_probes_do_not_wedge);
    RUN(test_exactly_k_probes_across_processes);
    UNIT_EXIT();
}
