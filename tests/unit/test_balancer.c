/*
 * Unit tests for the balancers (core/balancer.c): exact smooth-WRR
 * distribution over a cycle, least-connections preferring the idle target,
 * consistent-hash remapping when a target goes, p2c preferring the faster
 * target, and every balancer skipping unusable targets.
 */
#include <stdio.h>
#include <stdlib.h>

#include "balancer.h"
#include "unit.h"

static const char *const names[] = {"127.0.0.1:9001", "127.0.0.1:9002",
                                    "127.0.0.1:9003", "127.0.0.1:9004",
                                    "127.0.0.1:9005"};

static void test_kind_parse(void)
{
    CHECK_INT(mg_balancer_kind_parse("round_robin"), ==,
              MG_BALANCE_ROUND_ROBIN);
    CHECK_INT(mg_balancer_kind_parse("weighted"), ==, MG_BALANCE_WEIGHTED);
    CHECK_INT(mg_balancer_kind_parse("least_conn"), ==, MG_BALANCE_LEAST_CONN);
    CHECK_INT(mg_balancer_kind_parse("hash"), ==, MG_BALANCE_HASH);
    CHECK_INT(mg_balancer_kind_parse("p2c"), ==, MG_BALANCE_P2C);
    CHECK_INT(mg_balancer_kind_parse("random"), ==, -1);
}

static void test_round_robin_in_turn(void)
{
    uint8_t usable[3] = {1, 1, 1};
    mg_balancer_t *b =
        mg_balancer_new(MG_BALANCE_ROUND_ROBIN, 3, names, NULL, 1);
    mg_balancer_in_t in = {.usable = usable};
    int seq[6];
    for (int i = 0; i < 6; i++)
        seq[i] = mg_balancer_pick(b, &in);
    mg_balancer_free(b);
    for (int i = 0; i < 6; i++)
        CHECK_INT(seq[i], ==, i % 3);
}

static void test_round_robin_skips_unusable(void)
{
    uint8_t usable[3] = {1, 0, 1};
    mg_balancer_t *b =
        mg_balancer_new(MG_BALANCE_ROUND_ROBIN, 3, names, NULL, 1);
    mg_balancer_in_t in = {.usable = usable};
    int counts[3] = {0};
    for (int i = 0; i < 10; i++)
        counts[mg_balancer_pick(b, &in)]++;
    usable[0] = usable[2] = 0;
    int none = mg_balancer_pick(b, &in);
    mg_balancer_free(b);
    CHECK_INT(counts[0], ==, 5);
    CHECK_INT(counts[1], ==, 0);
    CHECK_INT(counts[2], ==, 5);
    CHECK_INT(none, ==, -1);
}

/* nginx's example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c. */
static void test_weighted_smooth_and_exact(void)
{
    unsigned w[3] = {5, 1, 1};
    uint8_t usable[3] = {1, 1, 1};
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_WEIGHTED, 3, names, w, 1);
    mg_balancer_in_t in = {.usable = usable};
    int expect[7] = {0, 0, 1, 0, 2, 0, 0};
    int got[7];
    for (int i = 0; i < 7; i++)
        got[i] = mg_balancer_pick(b, &in);
    for (int i = 0; i < 7; i++)
        CHECK_INT(got[i], ==, expect[i]);
    /* Exact over any whole number of cycles. */
    int counts[3] = {0};
    for (int i = 0; i < 7 * 100; i++)
        counts[mg_balancer_pick(b, &in)]++;
    mg_balancer_free(b);
    CHECK_INT(counts[0], ==, 500);
    CHECK_INT(counts[1], ==, 100);
    CHECK_INT(counts[2], ==, 100);
}

static void test_weighted_exact_per_cycle(void)
{
    unsigned w[4] = {3, 2, 7, 1};
    uint8_t usable[4] = {1, 1, 1, 1};
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_WEIGHTED, 4, names, w, 1);
    mg_balancer_in_t in = {.usable = usable};
    for (int cycle = 0; cycle < 5; cycle++) {
        int counts[4] = {0};
        for (int i = 0; i < 13; i++)
            counts[mg_balancer_pick(b, &in)]++;
        for (int k = 0; k < 4; k++)
            CHECK_INT(counts[k], ==, (int)w[k]);
    }
    /* Target 2 down: the others share its turns by their weights. */
    usable[2] = 0;
    int counts[4] = {0};
    for (int i = 0; i < 6 * 10; i++)
        counts[mg_balancer_pick(b, &in)]++;
    mg_balancer_free(b);
    CHECK_INT(counts[0], ==, 30);
    CHECK_INT(counts[1], ==, 20);
    CHECK_INT(counts[2], ==, 0);
    CHECK_INT(counts[3], ==, 10);
}

static void test_least_conn_prefers_idle(void)
{
    uint8_t usable[3] = {1, 1, 1};
    uint32_t inflight[3] = {4, 0, 2};
    mg_balancer_t *b =
        mg_balancer_new(MG_BALANCE_LEAST_CONN, 3, names, NULL, 1);
    mg_balancer_in_t in = {.usable = usable, .inflight = inflight};
    for (int i = 0; i < 5; i++)
        CHECK_INT(mg_balancer_pick(b, &in), ==, 1);
    usable[1] = 0;
    int pick = mg_balancer_pick(b, &in);
    /* Equal load: picks rotate rather than stick to the first. */
    uint32_t equal[3] = {1, 1, 1};
    usable[1] = 1;
    in.inflight = equal;
    int counts[3] = {0};
    for (int i = 0; i < 30; i++)
        counts[mg_balancer_pick(b, &in)]++;
    mg_balancer_free(b);
    CHECK_INT(pick, ==, 2);
    CHECK_INT(counts[0], ==, 10);
    CHECK_INT(counts[1], ==, 10);
    CHECK_INT(counts[2], ==, 10);
}

static void test_least_conn_weighs(void)
{
    /* 4 in flight on weight 4 is lighter than 2 on weight 1. */
    unsigned w[2] = {4, 1};
    uint8_t usable[2] = {1, 1};
    uint32_t inflight[2] = {4, 2};
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_LEAST_CONN, 2, names, w, 1);
    mg_balancer_in_t in = {.usable = usable, .inflight = inflight};
    int a = mg_balancer_pick(b, &in), c = mg_balancer_pick(b, &in);
    mg_balancer_free(b);
    CHECK_INT(a, ==, 0);
    CHECK_INT(c, ==, 0);
}

static uint64_t key_hash(int i)
{
    char k[32];
    int n = snprintf(k, sizeof(k), "user-%d", i);
    return mg_balancer_hash(k, (size_t)n);
}

/* Removing one of N targets remaps at most 1/N + 5% of 10,000 keys, and
 * only keys that were on the removed target. */
static void check_remap(size_t n, size_t removed)
{
    const char *rest[5];
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (i != removed)
            rest[m++] = names[i];
    uint8_t usable[5] = {1, 1, 1, 1, 1};
    mg_balancer_t *full = mg_balancer_new(MG_BALANCE_HASH, n, names, NULL, 1);
    mg_balancer_t *less = mg_balancer_new(MG_BALANCE_HASH, m, rest, NULL, 1);
    int moved = 0, wrong = 0, per[5] = {0};
    for (int i = 0; i < 10000; i++) {
        mg_balancer_in_t in = {.usable = usable, .key = key_hash(i)};
        int a = mg_balancer_pick(full, &in), c = mg_balancer_pick(less, &in);
        per[a]++;
        if (strcmp(names[a], rest[c]) != 0) {
            moved++;
            wrong += (size_t)a != removed;
        }
    }
    /* The same through `usable` (a target down) on the full ring. */
    usable[removed] = 0;
    int moved_down = 0;
    for (int i = 0; i < 10000; i++) {
        mg_balancer_in_t in = {.usable = usable, .key = key_hash(i)};
        mg_balancer_in_t all = in;
        uint8_t every[5] = {1, 1, 1, 1, 1};
        all.usable = every;
        moved_down +=
            mg_balancer_pick(full, &in) != mg_balancer_pick(full, &all);
    }
    mg_balancer_free(full);
    mg_balancer_free(less);
    int limit = (int)(10000 / n + 500);
    printf("  hash N=%zu remove %zu: %d of 10000 keys moved (limit %d)\n", n,
           removed, moved, limit);
    CHECK_INT(moved, <=, limit);
    CHECK_INT(moved, >, 0);
    CHECK_INT(wrong, ==, 0);
    CHECK_INT(moved_down, ==, moved);
    /* Spread: no target owns more than twice its share. */
    for (size_t i = 0; i < n; i++)
        CHECK_INT(per[i], <, (int)(2 * 10000 / n));
}

static void test_hash_remaps_little(void)
{
    for (size_t n = 2; n <= 5; n++)
        for (size_t r = 0; r < n; r++) {
            check_remap(n, r);
            if (unit_current_failed)
                return;
        }
}

static void test_hash_stable_and_weighted(void)
{
    unsigned w[2] = {1, 3};
    uint8_t usable[2] = {1, 1};
    mg_balancer_t *a = mg_balancer_new(MG_BALANCE_HASH, 2, names, w, 1);
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_HASH, 2, names, w, 99);
    int same = 1, counts[2] = {0};
    for (int i = 0; i < 10000; i++) {
        mg_balancer_in_t in = {.usable = usable, .key = key_hash(i)};
        int x = mg_balancer_pick(a, &in);
        same &= x == mg_balancer_pick(b, &in);
        counts[x]++;
    }
    usable[0] = usable[1] = 0;
    mg_balancer_in_t in = {.usable = usable, .key = 1};
    int none = mg_balancer_pick(a, &in);
    mg_balancer_free(a);
    mg_balancer_free(b);
    CHECK(same); /* the ring depends on the names only */
    CHECK_INT(counts[1], >, 2 * counts[0]);
    CHECK_INT(none, ==, -1);
}

static void test_p2c_prefers_fast(void)
{
    uint8_t usable[3] = {1, 1, 1};
    uint64_t ewma[3] = {50000, 1000, 50000};
    uint32_t inflight[3] = {0, 0, 0};
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_P2C, 3, names, NULL, 7);
    mg_balancer_in_t in = {
        .usable = usable, .inflight = inflight, .ewma_us = ewma};
    int counts[3] = {0};
    for (int i = 0; i < 3000; i++)
        counts[mg_balancer_pick(b, &in)]++;
    /* The fast target wins whenever drawn: 2 of the 3 pairs hold it. */
    CHECK_INT(counts[1], >, 1800);
    CHECK_INT(counts[0], >, 0); /* the slow ones still get the third pair */
    CHECK_INT(counts[2], >, 0);
    /* Two usable: always the faster; one usable: that one. */
    usable[2] = 0;
    for (int i = 0; i < 50; i++)
        CHECK_INT(mg_balancer_pick(b, &in), ==, 1);
    usable[1] = 0;
    for (int i = 0; i < 50; i++)
        CHECK_INT(mg_balancer_pick(b, &in), ==, 0);
    usable[0] = 0;
    int none = mg_balancer_pick(b, &in);
    mg_balancer_free(b);
    CHECK_INT(none, ==, -1);
}

static void test_p2c_weighs_load(void)
{
    uint8_t usable[2] = {1, 1};
    uint64_t ewma[2] = {1000, 1000};
    uint32_t inflight[2] = {10, 0};
    mg_balancer_t *b = mg_balancer_new(MG_BALANCE_P2C, 2, names, NULL, 7);
    mg_balancer_in_t in = {
        .usable = usable, .inflight = inflight, .ewma_us = ewma};
    for (int i = 0; i < 20; i++)
        CHECK_INT(mg_balancer_pick(b, &in), ==, 1);
    mg_balancer_free(b);
}

int main(void)
{
    RUN(test_kind_parse);
    RUN(test_round_robin_in_turn);
    RUN(test_round_robin_skips_unusable);
    RUN(test_weighted_smooth_and_exact);
    RUN(test_weighted_exact_per_cycle);
    RUN(test_least_conn_prefers_idle);
    RUN(test_least_conn_weighs);
    RUN(test_hash_remaps_little);
    RUN(test_hash_stable_and_weighted);
    RUN(test_p2c_prefers_fast);
    RUN(test_p2c_weighs_load);
    UNIT_EXIT();
}
