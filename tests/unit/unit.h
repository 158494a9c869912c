/*
 * A minimal unit-test harness: each test binary is one process, each test a
 * function registered in main with RUN(). Assertions print both operands and
 * file:line, mark the test failed and return from it. The binary prints one
 * line per test and exits non-zero when any failed; tests/run-unit.sh runs
 * every binary under a timeout and counts the lines.
 */
#ifndef MG_TEST_UNIT_H
#define MG_TEST_UNIT_H

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static int unit_failed_total;
static int unit_current_failed;

#define FAIL_AT(...)                                                           \
    do {                                                                       \
        fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);                      \
        fprintf(stderr, __VA_ARGS__);                                          \
        fputc('\n', stderr);                                                   \
        unit_current_failed = 1;                                               \
        return;                                                                \
    } while (0)

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            FAIL_AT("CHECK(%s) failed", #cond);                                \
    } while (0)

#define CHECK_INT(a, op, b)                                                    \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        if (!(a_ op b_))                                                       \
            FAIL_AT("%s %s %s: %lld vs %lld", #a, #op, #b, a_, b_);            \
    } while (0)

#define CHECK_STR(a, b)                                                        \
    do {                                                                       \
        const char *a_ = (a), *b_ = (b);                                       \
        if (!a_ || !b_ || strcmp(a_, b_) != 0)                                 \
            FAIL_AT("%s == %s: \"%s\" vs \"%s\"", #a, #b, a_ ? a_ : "(null)",  \
                    b_ ? b_ : "(null)");                                       \
    } while (0)

/* Compares an mg_str_t with a C string. */
#define CHECK_MGSTR(s, cstr)                                                   \
    do {                                                                       \
        mg_str_t s_ = (s);                                                     \
        const char *c_ = (cstr);                                               \
        if (s_.len != strlen(c_) || memcmp(s_.p, c_, s_.len) != 0)             \
            FAIL_AT("%s == %s: \"%.*s\" vs \"%s\"", #s, #cstr, (int)s_.len,    \
                    s_.p ? s_.p : "", c_);                                     \
    } while (0)

#define RUN(fn)                                                                \
    do {                                                                       \
        unit_current_failed = 0;                                               \
        fn();                                                                  \
        printf("%s %s\n", unit_current_failed ? "FAIL" : "PASS", #fn);         \
        fflush(stdout);                                                        \
        unit_failed_total += unit_current_failed;                              \
    } while (0)

#define UNIT_EXIT() return unit_failed_total ? 1 : 0

#endif
