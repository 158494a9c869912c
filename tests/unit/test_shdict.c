/*
 * Unit tests for core/shdict.c: each value type and flags, overwrites that
 * grow and shrink, add/replace/incr semantics, expiry driven by a fake
 * clock, LRU eviction (a get refreshes), size limits, stats, 100k keys in
 * 16 MiB, and the cross-process properties: exact counts from 4 forked
 * children, and recovery when a lock holder dies (with alarm() turning a
 * deadlock into a failure). mg_shdict_check, which verifies every internal
 * invariant, runs after each test that changes the zone's shape.
 *
 * Zones are mmap(MAP_SHARED | MAP_ANONYMOUS) as in the master, between two
 * PROT_NONE guard pages so a write outside the zone crashes the test.
 *
 * `test_shdict --bench` prints ns per operation instead (no assertions).
 */
#include "shdict.h"
#include "unit.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KiB ((size_t)1024)
#define MiB (KiB * 1024)

static char buf[256 * 1024];

static size_t page_size(void)
{
    return (size_t)sysconf(_SC_PAGESIZE);
}

/* A fresh zone of `size` bytes (a multiple of the page size). */
static mg_shdict_t *zone(size_t size)
{
    size_t pg = page_size();
    char *m = mmap(NULL, size + 2 * pg, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    mprotect(m, pg, PROT_NONE);
    mprotect(m + pg + size, pg, PROT_NONE);
    memset(m + pg, 0xa5, size); /* init must not rely on zeroed memory */
    return mg_shdict_init(m + pg, size, "test");
}

static void unzone(mg_shdict_t *d)
{
    size_t cap;
    mg_shdict_stats(d, &cap, NULL, NULL);
    munmap((char *)d - page_size(), cap + 2 * page_size());
}

static mg_str_t K(const char *s)
{
    return mg_str_from_cstr(s);
}

static mg_shdict_value_t S(const char *s)
{
    return (mg_shdict_value_t){
        .type = MG_SHDICT_STRING, .str = s, .len = strlen(s)};
}

static mg_shdict_value_t SN(const char *s, size_t n)
{
    return (mg_shdict_value_t){.type = MG_SHDICT_STRING, .str = s, .len = n};
}

static mg_shdict_value_t N(double n)
{
    return (mg_shdict_value_t){.type = MG_SHDICT_NUMBER, .number = n};
}

static mg_shdict_value_t B(int b)
{
    return (mg_shdict_value_t){.type = MG_SHDICT_BOOLEAN, .number = b};
}

static const mg_shdict_value_t NIL = {.type = MG_SHDICT_NIL};

static int set(mg_shdict_t *d, const char *k, mg_shdict_value_t v, uint64_t ttl,
               uint64_t now)
{
    return mg_shdict_set(d, K(k), &v, ttl, now, NULL);
}

/* The string at k, NUL-terminated in buf, or NULL if missing/not a string. */
static const char *gets(mg_shdict_t *d, const char *k, uint64_t now)
{
    mg_shdict_value_t v;
    if (mg_shdict_get(d, K(k), now, &v, buf, sizeof(buf) - 1) != 0
        || v.type != MG_SHDICT_STRING)
        return NULL;
    buf[v.len] = '\0';
    return buf;
}

/* The number at k, or -1 if missing or not a number. */
static double getn(mg_shdict_t *d, const char *k, uint64_t now)
{
    mg_shdict_value_t v;
    if (mg_shdict_get(d, K(k), now, &v, NULL, 0) != 0
        || v.type != MG_SHDICT_NUMBER)
        return -1;
    return v.number;
}

static size_t count_of(mg_shdict_t *d)
{
    size_t n;
    mg_shdict_stats(d, NULL, NULL, &n);
    return n;
}

static size_t free_of(mg_shdict_t *d)
{
    size_t n;
    mg_shdict_stats(d, NULL, &n, NULL);
    return n;
}

/* xorshift64*, so "random" workloads repeat exactly. */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1du;
}

/* ---- basics ------------------------------------------------------------ */

static void test_init_limits(void)
{
    static _Alignas(16) char small[MG_SHDICT_MIN_SIZE];
    CHECK(mg_shdict_init(small, sizeof(small) - 1, "x") == NULL);
    CHECK(mg_shdict_init(small + 8, sizeof(small) - 16, "x") == NULL);
    mg_shdict_t *d = mg_shdict_init(small, sizeof(small), "limits");
    CHECK(d == (void *)small);
    CHECK_STR(mg_shdict_name(d), "limits");
    CHECK_INT(mg_shdict_check(d), ==, 0);
    CHECK_INT(count_of(d), ==, 0);

    char long_name[200];
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    d = mg_shdict_init(small, sizeof(small), long_name);
    CHECK_INT(strlen(mg_shdict_name(d)), ==, MG_SHDICT_NAME_MAX);
    CHECK(mg_shdict_init(small, sizeof(small), NULL) != NULL);
    CHECK_STR(mg_shdict_name(d), "");
}

static void test_string_roundtrip(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_value_t v;
    CHECK_INT(set(d, "greeting", S("hello"), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("greeting"), 0, &v, buf, sizeof(buf)), ==, 0);
    CHECK_INT(v.type, ==, MG_SHDICT_STRING);
    CHECK(v.str == buf);
    CHECK_INT(v.len, ==, 5);
    CHECK(memcmp(v.str, "hello", 5) == 0);

    /* Binary-safe: NUL bytes in keys and values. */
    mg_shdict_value_t bin = SN("a\0b\0", 4);
    CHECK_INT(mg_shdict_set(d, (mg_str_t){"k\0x", 3}, &bin, 0, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_get(d, (mg_str_t){"k\0y", 3}, 0, &v, buf, 100), ==,
              MG_DECLINED);
    CHECK_INT(mg_shdict_get(d, (mg_str_t){"k", 1}, 0, &v, buf, 100), ==,
              MG_DECLINED);
    CHECK_INT(mg_shdict_get(d, (mg_str_t){"k\0x", 3}, 0, &v, buf, 100), ==, 0);
    CHECK_INT(v.len, ==, 4);
    CHECK(memcmp(v.str, "a\0b\0", 4) == 0);

    /* Empty key and empty value are ordinary. */
    CHECK_INT(set(d, "", S(""), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_get(d, K(""), 0, &v, NULL, 0), ==, 0);
    CHECK_INT(v.type, ==, MG_SHDICT_STRING);
    CHECK_INT(v.len, ==, 0);
    CHECK_INT(count_of(d), ==, 3);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_number_and_boolean(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_value_t v;
    CHECK_INT(set(d, "pi", N(3.25), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("pi"), 0, &v, NULL, 0), ==, 0);
    CHECK_INT(v.type, ==, MG_SHDICT_NUMBER);
    CHECK(v.number == 3.25);
    CHECK(v.str == NULL);
    CHECK_INT(set(d, "neg", N(-1e300), 0, 0), ==, 0);
    CHECK(getn(d, "neg", 0) == -1e300);

    CHECK_INT(set(d, "on", B(1), 0, 0), ==, 0);
    CHECK_INT(set(d, "off", B(0), 0, 0), ==, 0);
    CHECK_INT(set(d, "seven", B(7), 0, 0), ==, 0); /* normalized to 1 */
    CHECK_INT(mg_shdict_get(d, K("on"), 0, &v, NULL, 0), ==, 0);
    CHECK_INT(v.type, ==, MG_SHDICT_BOOLEAN);
    CHECK(v.number == 1);
    CHECK_INT(mg_shdict_get(d, K("off"), 0, &v, NULL, 0), ==, 0);
    CHECK_INT(v.type, ==, MG_SHDICT_BOOLEAN);
    CHECK(v.number == 0);
    CHECK_INT(mg_shdict_get(d, K("seven"), 0, &v, NULL, 0), ==, 0);
    CHECK(v.number == 1);

    mg_shdict_value_t bad = {.type = (mg_shdict_type_t)42};
    CHECK_INT(mg_shdict_set(d, K("bad"), &bad, 0, 0, NULL), ==, MG_EPROTO);
    CHECK_INT(mg_shdict_get(d, K("missing"), 0, &v, buf, 10), ==, MG_DECLINED);
    CHECK_INT(v.type, ==, MG_SHDICT_NIL);
    unzone(d);
}

static void test_flags(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_value_t v = S("body"), out;
    v.flags = 0xdeadbeef;
    CHECK_INT(mg_shdict_set(d, K("s"), &v, 0, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("s"), 0, &out, buf, sizeof(buf)), ==, 0);
    CHECK_INT(out.flags, ==, 0xdeadbeef);

    v = N(1);
    v.flags = 7;
    CHECK_INT(mg_shdict_set(d, K("n"), &v, 0, 0, NULL), ==, 0);
    double x;
    CHECK_INT(mg_shdict_incr(d, K("n"), 1, 0, 0, 0, 0, &x), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("n"), 0, &out, NULL, 0), ==, 0);
    CHECK_INT(out.flags, ==, 7); /* incr keeps flags */

    v = S("other");
    CHECK_INT(mg_shdict_set(d, K("s"), &v, 0, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("s"), 0, &out, buf, sizeof(buf)), ==, 0);
    CHECK_INT(out.flags, ==, 0); /* set replaces flags */
    unzone(d);
}

static void test_overwrite_sizes(void)
{
    mg_shdict_t *d = zone(MiB);
    size_t empty = free_of(d);
    static char big[20000];
    memset(big, 'b', sizeof(big));

    CHECK_INT(set(d, "k", S("small"), 0, 0), ==, 0);
    size_t small_used = empty - free_of(d);
    CHECK_INT(set(d, "k", SN(big, sizeof(big)), 0, 0), ==, 0);
    CHECK_INT(strlen(gets(d, "k", 0)), ==, sizeof(big));
    CHECK_INT(empty - free_of(d), >, sizeof(big));
    CHECK_INT(mg_shdict_check(d), ==, 0);

    /* Shrinking gives the slack back. */
    CHECK_INT(set(d, "k", S("tiny"), 0, 0), ==, 0);
    CHECK_STR(gets(d, "k", 0), "tiny");
    CHECK_INT(empty - free_of(d), ==, small_used);
    CHECK_INT(mg_shdict_check(d), ==, 0);

    /* Grow again with a neighbour in the way, and change types. */
    CHECK_INT(set(d, "neighbour", S("n"), 0, 0), ==, 0);
    CHECK_INT(set(d, "k", SN(big, 5000), 0, 0), ==, 0);
    CHECK_INT(strlen(gets(d, "k", 0)), ==, 5000);
    CHECK_STR(gets(d, "neighbour", 0), "n");
    CHECK_INT(set(d, "k", N(12), 0, 0), ==, 0);
    CHECK(getn(d, "k", 0) == 12);
    CHECK_INT(set(d, "k", B(1), 0, 0), ==, 0);
    CHECK(gets(d, "k", 0) == NULL);
    CHECK_INT(set(d, "k", S("str again"), 0, 0), ==, 0);
    CHECK_STR(gets(d, "k", 0), "str again");
    CHECK_INT(count_of(d), ==, 2);
    CHECK_INT(mg_shdict_check(d), ==, 0);

    /* Deleting everything coalesces back to one free block. */
    CHECK_INT(mg_shdict_delete(d, K("k")), ==, 0);
    CHECK_INT(mg_shdict_delete(d, K("neighbour")), ==, 0);
    CHECK_INT(free_of(d), ==, empty);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_nil_deletes(void)
{
    mg_shdict_t *d = zone(MiB);
    CHECK_INT(set(d, "k", S("v"), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_set(d, K("k"), &NIL, 0, 0, NULL), ==, 0);
    CHECK(gets(d, "k", 0) == NULL);
    CHECK_INT(count_of(d), ==, 0);
    CHECK_INT(mg_shdict_set(d, K("k"), &NIL, 0, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_add(d, K("k"), &NIL, 0, 0, NULL), ==, 0);
    CHECK_INT(count_of(d), ==, 0);
    unzone(d);
}

static void test_add(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_value_t v = S("first"), w = S("second");
    CHECK_INT(mg_shdict_add(d, K("k"), &v, 100, 1000, NULL), ==, 0);
    CHECK_INT(mg_shdict_add(d, K("k"), &w, 0, 1000, NULL), ==, MG_DECLINED);
    CHECK_STR(gets(d, "k", 1000), "first");
    /* An expired key counts as absent. */
    CHECK_INT(mg_shdict_add(d, K("k"), &w, 0, 1100, NULL), ==, 0);
    CHECK_STR(gets(d, "k", 1100), "second");
    CHECK_INT(count_of(d), ==, 1);
    unzone(d);
}

static void test_replace(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_value_t v = S("first"), w = S("second");
    CHECK_INT(mg_shdict_replace(d, K("k"), &v, 0, 0, NULL), ==, MG_DECLINED);
    CHECK(gets(d, "k", 0) == NULL);
    CHECK_INT(mg_shdict_set(d, K("k"), &v, 100, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_replace(d, K("k"), &w, 0, 50, NULL), ==, 0);
    CHECK_STR(gets(d, "k", 50), "second");
    CHECK_STR(gets(d, "k", 5000), "second"); /* replace set ttl 0 */
    CHECK_INT(mg_shdict_set(d, K("e"), &v, 100, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_replace(d, K("e"), &w, 0, 100, NULL), ==, MG_DECLINED);
    CHECK_INT(mg_shdict_replace(d, K("k"), &NIL, 0, 0, NULL), ==, 0);
    CHECK_INT(count_of(d), ==, 0);
    unzone(d);
}

static void test_incr(void)
{
    mg_shdict_t *d = zone(MiB);
    double out = -7;
    CHECK_INT(mg_shdict_incr(d, K("c"), 1, 0, 0, 0, 0, &out), ==, MG_DECLINED);
    CHECK(out == -7);
    CHECK_INT(set(d, "c", N(10), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_incr(d, K("c"), 5, 0, 0, 0, 0, &out), ==, 0);
    CHECK(out == 15);
    CHECK_INT(mg_shdict_incr(d, K("c"), -20, 0, 0, 0, 0, &out), ==, 0);
    CHECK(out == -5);
    CHECK_INT(mg_shdict_incr(d, K("c"), 0.5, 0, 0, 0, 0, &out), ==, 0);
    CHECK(out == -4.5);
    CHECK(getn(d, "c", 0) == -4.5);
    CHECK_INT(count_of(d), ==, 1);
    unzone(d);
}

static void test_incr_init(void)
{
    mg_shdict_t *d = zone(MiB);
    double out;
    CHECK_INT(mg_shdict_incr(d, K("c"), 1, 1, 100, 0, 0, &out), ==, 0);
    CHECK(out == 101);
    CHECK_INT(mg_shdict_incr(d, K("c"), 1, 1, 100, 0, 0, &out), ==, 0);
    CHECK(out == 102); /* init applies only when absent */

    /* init_ttl applies to the created entry and is kept by later incrs. */
    CHECK_INT(mg_shdict_incr(d, K("w"), 1, 1, 0, 1000, 5000, &out), ==, 0);
    CHECK(out == 1);
    CHECK_INT(mg_shdict_incr(d, K("w"), 1, 1, 0, 99999, 5500, &out), ==, 0);
    CHECK(out == 2);
    int64_t left;
    CHECK_INT(mg_shdict_ttl(d, K("w"), 5500, &left), ==, 0);
    CHECK_INT(left, ==, 500);
    /* Once expired, the window restarts from init. */
    CHECK_INT(mg_shdict_incr(d, K("w"), 1, 1, 0, 1000, 6000, &out), ==, 0);
    CHECK(out == 1);
    CHECK_INT(mg_shdict_incr(d, K("x"), 1, 0, 0, 0, 6000, &out), ==,
              MG_DECLINED);
    CHECK_INT(count_of(d), ==, 2);
    unzone(d);
}

static void test_incr_not_number(void)
{
    mg_shdict_t *d = zone(MiB);
    double out = 3;
    CHECK_INT(set(d, "s", S("12"), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_incr(d, K("s"), 1, 1, 0, 0, 0, &out), ==, MG_EPROTO);
    CHECK(out == 3);
    CHECK_STR(gets(d, "s", 0), "12");
    CHECK_INT(set(d, "b", B(1), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_incr(d, K("b"), 1, 0, 0, 0, 0, &out), ==, MG_EPROTO);
    unzone(d);
}

static void test_delete(void)
{
    mg_shdict_t *d = zone(MiB);
    CHECK_INT(mg_shdict_delete(d, K("k")), ==, MG_DECLINED);
    CHECK_INT(set(d, "k", S("v"), 0, 0), ==, 0);
    CHECK_INT(set(d, "other", S("v"), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_delete(d, K("k")), ==, 0);
    CHECK_INT(mg_shdict_delete(d, K("k")), ==, MG_DECLINED);
    CHECK(gets(d, "k", 0) == NULL);
    CHECK_STR(gets(d, "other", 0), "v");
    CHECK_INT(count_of(d), ==, 1);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

/* ---- time -------------------------------------------------------------- */

static void test_delete_prefix(void)
{
    mg_shdict_t *d = zone(MiB);
    size_t n = 99;
    CHECK_INT(mg_shdict_delete_prefix(d, K("c:"), &n), ==, MG_DECLINED);
    CHECK_INT(n, ==, 0);
    CHECK_INT(set(d, "c:/a", S("1"), 0, 0), ==, 0);
    CHECK_INT(set(d, "c:/a?x=1", S("2"), 0, 0), ==, 0);
    CHECK_INT(set(d, "c:/b", S("3"), 0, 0), ==, 0);
    CHECK_INT(set(d, "c:", S("4"), 0, 0), ==, 0);
    CHECK_INT(set(d, "c", S("5"), 0, 0), ==, 0);
    CHECK_INT(set(d, "x:/a", N(6), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_delete_prefix(d, K("c:/a"), &n), ==, 0);
    CHECK_INT(n, ==, 2);
    CHECK(gets(d, "c:/a", 0) == NULL);
    CHECK(gets(d, "c:/a?x=1", 0) == NULL);
    CHECK_STR(gets(d, "c:/b", 0), "3");
    CHECK_INT(mg_shdict_delete_prefix(d, K("c:"), &n), ==, 0);
    CHECK_INT(n, ==, 2); /* "c:/b" and "c:" itself, not "c" */
    CHECK_STR(gets(d, "c", 0), "5");
    CHECK_INT(count_of(d), ==, 2);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    /* Many entries, every other one removed: lists stay consistent. */
    char key[32];
    for (int i = 0; i < 2000; i++) {
        snprintf(key, sizeof(key), "%s:%d", i % 2 ? "odd" : "even", i);
        CHECK_INT(set(d, key, S("value"), 0, 0), ==, 0);
    }
    CHECK_INT(mg_shdict_delete_prefix(d, K("odd:"), &n), ==, 0);
    CHECK_INT(n, ==, 1000);
    CHECK_INT(count_of(d), ==, 1002);
    CHECK_STR(gets(d, "even:10", 0), "value");
    CHECK_INT(mg_shdict_check(d), ==, 0);
    CHECK_INT(mg_shdict_delete_prefix(d, K(""), NULL), ==, 0);
    CHECK_INT(count_of(d), ==, 0);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_ttl_expiry(void)
{
    mg_shdict_t *d = zone(MiB);
    CHECK_INT(set(d, "k", S("v"), 500, 1000), ==, 0);
    CHECK_INT(set(d, "forever", S("v"), 0, 1000), ==, 0);
    CHECK_STR(gets(d, "k", 1000), "v");
    CHECK_STR(gets(d, "k", 1499), "v");
    CHECK(gets(d, "k", 1500) == NULL); /* expires at now + ttl exactly */
    CHECK(gets(d, "k", 1499) == NULL); /* and was removed, not hidden */
    CHECK_INT(count_of(d), ==, 1);
    CHECK_STR(gets(d, "forever", UINT64_MAX / 2), "v");

    /* An overwrite restarts the clock; a set without ttl clears it. */
    CHECK_INT(set(d, "k", S("v2"), 100, 2000), ==, 0);
    CHECK_INT(set(d, "k", S("v3"), 100, 2050), ==, 0);
    CHECK_STR(gets(d, "k", 2120), "v3");
    CHECK_INT(set(d, "k", S("v4"), 0, 2120), ==, 0);
    CHECK_STR(gets(d, "k", 100000), "v4");
    unzone(d);
}

static void test_ttl_and_expire(void)
{
    mg_shdict_t *d = zone(MiB);
    int64_t left = -1;
    CHECK_INT(mg_shdict_ttl(d, K("k"), 0, &left), ==, MG_DECLINED);
    CHECK_INT(set(d, "k", N(1), 0, 1000), ==, 0);
    CHECK_INT(mg_shdict_ttl(d, K("k"), 1000, &left), ==, 0);
    CHECK_INT(left, ==, 0);
    CHECK_INT(mg_shdict_expire(d, K("k"), 300, 1000), ==, 0);
    CHECK_INT(mg_shdict_ttl(d, K("k"), 1100, &left), ==, 0);
    CHECK_INT(left, ==, 200);
    CHECK_INT(mg_shdict_ttl(d, K("k"), 1299, &left), ==, 0);
    CHECK_INT(left, ==, 1);
    CHECK_INT(mg_shdict_expire(d, K("k"), 0, 1299), ==, 0); /* persist */
    CHECK_INT(mg_shdict_ttl(d, K("k"), 5000, &left), ==, 0);
    CHECK_INT(left, ==, 0);
    CHECK_INT(mg_shdict_expire(d, K("k"), 10, 5000), ==, 0);
    CHECK_INT(mg_shdict_ttl(d, K("k"), 5010, &left), ==, MG_DECLINED);
    CHECK_INT(mg_shdict_expire(d, K("k"), 10, 5010), ==, MG_DECLINED);
    CHECK_INT(mg_shdict_expire(d, K("none"), 10, 0), ==, MG_DECLINED);
    unzone(d);
}

/* ---- capacity ---------------------------------------------------------- */

/* Sets key "k<i>" to a 1000-byte value; returns the evicted count. */
static int set_big(mg_shdict_t *d, int i)
{
    static char val[1000];
    char key[32];
    int ev = -1;
    memset(val, 'a' + i % 26, sizeof(val));
    snprintf(key, sizeof(key), "k%d", i);
    mg_shdict_value_t v = SN(val, sizeof(val));
    if (mg_shdict_set(d, K(key), &v, 0, 0, &ev) != 0)
        return -1;
    return ev;
}

static int has_big(mg_shdict_t *d, int i)
{
    char key[32];
    snprintf(key, sizeof(key), "k%d", i);
    const char *s = gets(d, key, 0);
    return s && strlen(s) == 1000 && s[999] == 'a' + i % 26;
}

static void test_lru_eviction(void)
{
    /* How many 1000-byte entries fit in a minimum-size zone? */
    mg_shdict_t *d = zone(MG_SHDICT_MIN_SIZE);
    int fit = 0;
    while (set_big(d, fit) == 0)
        fit++;
    CHECK_INT(fit, >, 10);
    unzone(d);

    d = zone(MG_SHDICT_MIN_SIZE);
    for (int i = 0; i < fit; i++)
        CHECK_INT(set_big(d, i), ==, 0);
    CHECK(has_big(d, 0)); /* k0 is now the most recently used */

    CHECK_INT(set_big(d, fit), ==, 1); /* evicts k1, the LRU */
    CHECK(!has_big(d, 1));
    CHECK(has_big(d, 0));
    CHECK_INT(set_big(d, fit + 1), ==, 1); /* then k2 */
    CHECK(!has_big(d, 2));
    for (int i = 3; i < fit + 2; i++)
        CHECK(has_big(d, i));
    CHECK(has_big(d, 0));
    CHECK_INT(count_of(d), ==, fit);

    /* incr refreshes too. */
    double out;
    CHECK_INT(mg_shdict_delete(d, K("k3")), ==, 0);
    CHECK_INT(mg_shdict_incr(d, K("ctr"), 1, 1, 0, 0, 0, &out), ==, 0);
    for (int i = fit + 2; i < 2 * fit; i++) {
        CHECK_INT(mg_shdict_incr(d, K("ctr"), 1, 0, 0, 0, 0, &out), ==, 0);
        CHECK_INT(set_big(d, i), >=, 0);
    }
    CHECK(getn(d, "ctr", 0) == fit - 1);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_expired_not_counted_as_evicted(void)
{
    mg_shdict_t *d = zone(MG_SHDICT_MIN_SIZE);
    static char val[1000];
    mg_shdict_value_t v = SN(val, sizeof(val));
    char key[32];
    int i, ev, total = 0;
    for (i = 0; i < 200; i++) {
        snprintf(key, sizeof(key), "old%d", i);
        CHECK_INT(mg_shdict_set(d, K(key), &v, 100, 0, &ev), ==, 0);
    }
    /* At t=1000 every old entry has expired: reclaiming them is free. */
    for (i = 0; i < 40; i++) {
        snprintf(key, sizeof(key), "new%d", i);
        CHECK_INT(mg_shdict_set(d, K(key), &v, 0, 1000, &ev), ==, 0);
        total += ev;
    }
    CHECK_INT(total, ==, 0);
    for (i = 0; i < 200; i++) {
        snprintf(key, sizeof(key), "more%d", i);
        CHECK_INT(mg_shdict_set(d, K(key), &v, 0, 1000, &ev), ==, 0);
        total += ev;
    }
    CHECK_INT(total, >, 0);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_too_large(void)
{
    mg_shdict_t *d = zone(MG_SHDICT_MIN_SIZE);
    static char big[MG_SHDICT_MIN_SIZE + MG_SHDICT_MAX_KEY + 2];
    memset(big, 'x', sizeof(big));
    for (int i = 0; i < 10; i++)
        CHECK_INT(set_big(d, i), ==, 0);
    CHECK_INT(set(d, "k0", S("old"), 0, 0), ==, 0);

    int ev = -1;
    mg_shdict_value_t v = SN(big, MG_SHDICT_MIN_SIZE);
    CHECK_INT(mg_shdict_set(d, K("k0"), &v, 0, 0, &ev), ==, MG_ETOOLARGE);
    CHECK_INT(ev, ==, 0);
    CHECK_STR(gets(d, "k0", 0), "old"); /* old value kept, nothing evicted */
    CHECK_INT(count_of(d), ==, 10);

    /* Keys: up to MG_SHDICT_MAX_KEY bytes. */
    mg_str_t k = {big, MG_SHDICT_MAX_KEY + 1};
    mg_shdict_value_t one = N(1);
    double out;
    CHECK_INT(mg_shdict_set(d, k, &one, 0, 0, NULL), ==, MG_ETOOLARGE);
    CHECK_INT(mg_shdict_incr(d, k, 1, 1, 0, 0, 0, &out), ==, MG_ETOOLARGE);
    CHECK_INT(mg_shdict_get(d, k, 0, &v, NULL, 0), ==, MG_DECLINED);
    k.len = MG_SHDICT_MAX_KEY; /* legal, but bigger than this zone */
    CHECK_INT(mg_shdict_set(d, k, &one, 0, 0, NULL), ==, MG_ETOOLARGE);
    CHECK_INT(mg_shdict_incr(d, k, 1, 1, 0, 0, 0, &out), ==, MG_ETOOLARGE);
    CHECK_INT(count_of(d), ==, 10);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);

    d = zone(MiB);
    CHECK_INT(mg_shdict_set(d, k, &one, 0, 0, NULL), ==, 0);
    CHECK_INT(mg_shdict_incr(d, k, 1, 0, 0, 0, 0, &out), ==, 0);
    CHECK(out == 2);
    unzone(d);
}

static void test_item_filling_the_zone(void)
{
    mg_shdict_t *d = zone(MG_SHDICT_MIN_SIZE);
    size_t empty = free_of(d);
    static char big[MG_SHDICT_MIN_SIZE];
    memset(big, 'z', sizeof(big));
    for (int i = 0; i < 20; i++)
        CHECK_INT(set_big(d, i), ==, 0);

    /* The largest value that fits: the whole heap minus the entry header
       (48 bytes) and the key. It evicts everything else. */
    int ev = -1;
    mg_shdict_value_t v = SN(big, empty - 48 - 3);
    CHECK_INT(mg_shdict_set(d, K("all"), &v, 0, 0, &ev), ==, 0);
    CHECK_INT(ev, ==, 20);
    CHECK_INT(count_of(d), ==, 1);
    CHECK_INT(free_of(d), ==, 0);
    v.len++;
    CHECK_INT(mg_shdict_set(d, K("all"), &v, 0, 0, &ev), ==, MG_ETOOLARGE);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_get_small_buffer(void)
{
    mg_shdict_t *d = zone(MiB);
    char small[10];
    mg_shdict_value_t v;
    v.flags = 5;
    CHECK_INT(set(d, "k", S("0123456789abcdef"), 0, 0), ==, 0);
    CHECK_INT(mg_shdict_get(d, K("k"), 0, &v, small, sizeof(small)), ==,
              MG_ETOOLARGE);
    CHECK_INT(v.type, ==, MG_SHDICT_STRING);
    CHECK_INT(v.len, ==, 16);
    CHECK_INT(v.flags, ==, 0);
    CHECK_INT(mg_shdict_get(d, K("k"), 0, &v, NULL, 0), ==, MG_ETOOLARGE);
    char *exact = malloc(v.len);
    CHECK_INT(mg_shdict_get(d, K("k"), 0, &v, exact, v.len), ==, 0);
    int same = memcmp(exact, "0123456789abcdef", 16) == 0;
    free(exact);
    CHECK(same);
    unzone(d);
}

static void test_flush_all(void)
{
    mg_shdict_t *d = zone(MiB);
    size_t empty = free_of(d);
    for (int i = 0; i < 200; i++)
        CHECK_INT(set_big(d, i), >=, 0);
    CHECK_INT(count_of(d), >, 100);
    mg_shdict_flush_all(d);
    CHECK_INT(count_of(d), ==, 0);
    CHECK_INT(free_of(d), ==, empty);
    CHECK(!has_big(d, 199));
    CHECK_INT(set_big(d, 1), ==, 0);
    CHECK(has_big(d, 1));
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

static void test_stats(void)
{
    mg_shdict_t *d = zone(16 * MiB);
    size_t cap, fr, n;
    mg_shdict_stats(d, &cap, &fr, &n);
    CHECK_INT(cap, ==, 16 * MiB);
    CHECK_INT(n, ==, 0);
    /* The hash table and header take a few percent, no more. */
    CHECK_INT(fr, >, cap - cap / 20);
    CHECK_INT(fr, <, cap);
    CHECK_INT(set(d, "key", S("value"), 0, 0), ==, 0);
    size_t fr2;
    mg_shdict_stats(d, NULL, &fr2, &n);
    CHECK_INT(n, ==, 1);
    CHECK_INT(fr - fr2, ==, 64); /* 48-byte header + 3 + 5, in 16s */
    mg_shdict_stats(d, NULL, NULL, NULL);
    unzone(d);
}

static void test_many_keys(void)
{
    enum { N_KEYS = 100000 };
    mg_shdict_t *d = zone(16 * MiB);
    char key[32], val[110];
    long evicted = 0;
    for (int i = 0; i < N_KEYS; i++) {
        int n = snprintf(key, sizeof(key), "key:%d", i), ev;
        memset(val, 'a' + i % 26, sizeof(val));
        mg_shdict_value_t v = SN(val, sizeof(val));
        CHECK_INT(mg_shdict_set(d, (mg_str_t){key, (size_t)n}, &v, 0, 0, &ev),
                  ==, 0);
        evicted += ev;
    }
    /* 176 bytes an entry: some do not fit, and those are exactly the
       oldest, since nothing was read. */
    CHECK_INT(evicted, >, 0);
    CHECK_INT(evicted, <, N_KEYS / 5);
    CHECK_INT(count_of(d), ==, N_KEYS - evicted);
    for (int i = 0; i < N_KEYS; i++) {
        snprintf(key, sizeof(key), "key:%d", i);
        const char *s = gets(d, key, 0);
        if (i < evicted) {
            CHECK(s == NULL);
        } else {
            CHECK(s != NULL);
            CHECK_INT(strlen(s), ==, sizeof(val));
            CHECK_INT(s[0], ==, 'a' + i % 26);
        }
    }
    CHECK_INT(mg_shdict_check(d), ==, 0);

    /* Numbers are smaller: 100k counters fit without eviction. */
    mg_shdict_flush_all(d);
    for (int i = 0; i < N_KEYS; i++) {
        double out;
        snprintf(key, sizeof(key), "ip:10.0.%d.%d", i / 256, i % 256);
        CHECK_INT(mg_shdict_incr(d, K(key), 1, 1, i, 0, 0, &out), ==, 0);
    }
    CHECK_INT(count_of(d), ==, N_KEYS);
    for (int i = 0; i < N_KEYS; i += 7) {
        snprintf(key, sizeof(key), "ip:10.0.%d.%d", i / 256, i % 256);
        CHECK(getn(d, key, 0) == i + 1);
    }
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

/* Random sets, overwrites, deletes and expiries of mixed sizes. */
static void test_random_workload(void)
{
    static char val[40000];
    mg_shdict_t *d = zone(256 * KiB);
    char key[32];
    memset(val, 'r', sizeof(val));
    for (int i = 0; i < 30000; i++) {
        uint64_t r = rnd();
        snprintf(key, sizeof(key), "r%u", (unsigned)(r % 500));
        size_t len =
            (r >> 16) % 8 == 0 ? (r >> 24) % sizeof(val) : (r >> 24) % 300;
        double out;
        switch ((r >> 8) % 6) {
        case 0: CHECK_INT(mg_shdict_delete(d, K(key)), >=, 0); break;
        case 1:
            CHECK_INT(mg_shdict_incr(d, K(key), 1, 1, 0, 50, (uint64_t)i, &out),
                      !=, MG_ETOOLARGE);
            break;
        default: {
            mg_shdict_value_t v = SN(val, len);
            CHECK_INT(mg_shdict_set(d, K(key), &v, (r >> 40) % 3 * 100,
                                    (uint64_t)i, NULL),
                      ==, 0);
        }
        }
        if (i % 1000 == 0)
            CHECK_INT(mg_shdict_check(d), ==, 0);
        CHECK_INT(free_of(d), <, 256 * KiB);
    }
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

/* ---- across processes -------------------------------------------------- */

static void test_cross_process_incr(void)
{
    enum { CHILDREN = 4, INCRS = 20000 };
    mg_shdict_t *d = zone(MiB);
    pid_t pids[CHILDREN];
    for (int c = 0; c < CHILDREN; c++) {
        pids[c] = fork();
        CHECK(pids[c] >= 0);
        if (pids[c] == 0) {
            int bad = 0;
            char key[32];
            for (int i = 0; i < INCRS; i++) {
                double out;
                bad |= mg_shdict_incr(d, K("hits"), 1, 1, 0, 0, 0, &out);
                if (i % 16 == 0) {
                    snprintf(key, sizeof(key), "c%d-%d", c, i % 100);
                    bad |= set(d, key, S("some value"), 0, 0);
                    bad |= set(d, "shared", N(i), 0, 0);
                }
            }
            _exit(bad ? 1 : 0);
        }
    }
    for (int c = 0; c < CHILDREN; c++) {
        int status;
        CHECK_INT(waitpid(pids[c], &status, 0), ==, pids[c]);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    CHECK_INT(getn(d, "hits", 0), ==, CHILDREN * INCRS);
    /* hits, shared, and c<c>-<i % 100> for i a multiple of 16: 25 each. */
    CHECK_INT(count_of(d), ==, 2 + CHILDREN * 25);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

/* A child dies holding the lock; the parent must get on (alarm = hang). */
static void owner_dies(int mid_write)
{
    mg_shdict_t *d = zone(MiB);
    CHECK_INT(set(d, "kept", S("yes"), 0, 0), ==, 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        mg_shdict_test_lock(d, mid_write);
        _exit(0);
    }
    int status;
    CHECK_INT(waitpid(pid, &status, 0), ==, pid);
    alarm(10);
    if (mid_write) {
        /* Could have been mid-change: the zone was flushed. */
        CHECK(gets(d, "kept", 0) == NULL);
        CHECK_INT(count_of(d), ==, 0);
    } else {
        /* Died between changes: nothing lost. */
        CHECK_STR(gets(d, "kept", 0), "yes");
    }
    CHECK_INT(set(d, "after", S("ok"), 0, 0), ==, 0);
    CHECK_STR(gets(d, "after", 0), "ok");
    CHECK_INT(mg_shdict_check(d), ==, 0);
    alarm(0);
    unzone(d);
}

static void test_owner_dead_between_changes(void)
{
    owner_dies(0);
}

static void test_owner_dead_mid_change(void)
{
    owner_dies(1);
}

/* Children hammering the zone are SIGKILLed at random moments. */
static void test_sigkill_while_hammering(void)
{
    mg_shdict_t *d = zone(256 * KiB);
    double out;
    alarm(30);
    for (int round = 0; round < 30; round++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            static char val[3000];
            char key[32];
            for (uint64_t i = 0;; i++) {
                snprintf(key, sizeof(key), "h%u", (unsigned)(i * 7919 % 300));
                mg_shdict_value_t v = SN(val, i * 31 % sizeof(val));
                mg_shdict_set(d, K(key), &v, i % 3, i, NULL);
                mg_shdict_incr(d, K("n"), 1, 1, 0, 0, i, &out);
                snprintf(key, sizeof(key), "h%u", (unsigned)(i * 13 % 300));
                mg_shdict_delete(d, K(key));
            }
        }
        usleep((useconds_t)(200 + rnd() % 3000));
        kill(pid, SIGKILL);
        int status;
        CHECK_INT(waitpid(pid, &status, 0), ==, pid);
        CHECK(WIFSIGNALED(status));
        CHECK_INT(mg_shdict_check(d), ==, 0);
        CHECK_INT(mg_shdict_incr(d, K("parent"), 1, 1, 0, 0, 0, &out), ==, 0);
    }
    alarm(0);
    CHECK_INT(mg_shdict_check(d), ==, 0);
    unzone(d);
}

/* ---- benchmark --------------------------------------------------------- */

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void bench(void)
{
    enum { KEYS = 10000, OPS = 2000000, PROCS = 2 };
    mg_shdict_t *d = zone(16 * MiB);
    char key[KEYS][32];
    double out;
    mg_shdict_value_t v;
    for (int i = 0; i < KEYS; i++) {
        snprintf(key[i], sizeof(key[i]), "rl:203.0.113.%d:/api", i);
        mg_shdict_incr(d, K(key[i]), 1, 1, 0, 0, 0, &out);
    }
    double t = now_ns();
    for (int i = 0; i < OPS; i++)
        mg_shdict_get(d, K(key[i % KEYS]), 0, &v, buf, sizeof(buf));
    printf("get   %6.1f ns/op (1 process, %d keys)\n", (now_ns() - t) / OPS,
           KEYS);
    t = now_ns();
    for (int i = 0; i < OPS; i++)
        mg_shdict_incr(d, K(key[i % KEYS]), 1, 0, 0, 0, 0, &out);
    printf("incr  %6.1f ns/op (1 process)\n", (now_ns() - t) / OPS);
    t = now_ns();
    for (int i = 0; i < OPS; i++) {
        mg_shdict_value_t s = S("cached response body of some length");
        mg_shdict_set(d, K(key[i % KEYS]), &s, 0, 0, NULL);
    }
    printf("set   %6.1f ns/op (1 process, same-size overwrite)\n",
           (now_ns() - t) / OPS);

    t = now_ns();
    for (int p = 0; p < PROCS; p++) {
        if (fork() == 0) {
            for (int i = 0; i < OPS; i++)
                mg_shdict_incr(d, K("one-key"), 1, 1, 0, 0, 0, &out);
            _exit(0);
        }
    }
    for (int p = 0; p < PROCS; p++)
        wait(NULL);
    printf("incr  %6.1f ns/op (%d processes, one key, total throughput)\n",
           (now_ns() - t) / (OPS * PROCS), PROCS);
    unzone(d);
}

/* Sliding windows: in no interval of the window's length are more hits
 * counted than the limit, whatever the arrival times (random bursts, and a
 * burst at the end of one window plus one at the start of the next, where a
 * fixed window lets twice the limit through); steady traffic at the limit's
 * rate still gets at least limit - limit/slices per window. */
static void test_window_hit(void)
{
    mg_shdict_t *d = zone(MiB);
    mg_shdict_window_t w;
    const uint64_t window = 1000, base = 1000000;
    const unsigned slices = 10;
    const double limit = 20;

    /* The classic boundary burst. */
    unsigned admitted = 0;
    for (int i = 0; i < 20; i++) {
        CHECK_INT(mg_shdict_window_hit(d, K("b"), window, slices, limit,
                                       base + 950, &w),
                  ==, 0);
        admitted += (unsigned)w.admitted;
    }
    CHECK_INT(admitted, ==, 20);
    CHECK_INT(
        mg_shdict_window_hit(d, K("b"), window, slices, limit, base + 1010, &w),
        ==, 0);
    CHECK(!w.admitted);
    CHECK(w.count == 20);
    /* Refused until the slice holding the burst has left: 1900..2000. */
    CHECK(w.retry_ms > 800 && w.retry_ms <= 1000);
    CHECK_INT(mg_shdict_window_hit(d, K("b"), window, slices, limit,
                                   base + 1010 + w.retry_ms, &w),
              ==, 0);
    CHECK(w.admitted);

    /* Random arrivals: record admitted times, check every interval. */
    uint64_t times[4000];
    unsigned n = 0;
    uint64_t t = base * 3;
    unsigned seed = 12345;
    for (int i = 0; i < 4000; i++) {
        seed = seed * 1103515245u + 12345u;
        t += (seed >> 16) % 7 == 0 ? 300 : (seed >> 16) % 20;
        CHECK_INT(mg_shdict_window_hit(d, K("r"), window, slices, limit, t, &w),
                  ==, 0);
        if (w.admitted)
            times[n++] = t;
    }
    unsigned worst = 0;
    for (unsigned i = 0, j = 0; i < n; i++) {
        while (times[i] - times[j] >= window)
            j++;
        if (i - j + 1 > worst)
            worst = i - j + 1;
    }
    CHECK_INT(worst, <=, 20);
    CHECK_INT(n, >, 100);

    /* Steady traffic at exactly the limit's rate. */
    admitted = 0;
    for (uint64_t k = 0; k < 200; k++) {
        CHECK_INT(mg_shdict_window_hit(d, K("s"), window, slices, limit,
                                       base * 9 + k * 50, &w),
                  ==, 0);
        admitted += (unsigned)w.admitted;
    }
    CHECK_INT(admitted, >=, 200 - 200 / slices - 2);

    /* Another kind of value, bad arguments. */
    CHECK_INT(set(d, "str", S("x"), 0, 0), ==, 0);
    CHECK_INT(
        mg_shdict_window_hit(d, K("str"), window, slices, limit, base, &w), ==,
        MG_EPROTO);
    CHECK_INT(mg_shdict_window_hit(d, K("z"), window, 0, limit, base, &w), ==,
              MG_DECLINED);
    CHECK_INT(mg_shdict_window_hit(d, K("z"), 5, 10, limit, base, &w), ==,
              MG_DECLINED);
    unzone(d);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        bench();
        return 0;
    }
    RUN(test_init_limits);
    RUN(test_string_roundtrip);
    RUN(test_number_and_boolean);
    RUN(test_flags);
    RUN(test_overwrite_sizes);
    RUN(test_nil_deletes);
    RUN(test_add);
    RUN(test_replace);
    RUN(test_incr);
    RUN(test_incr_init);
    RUN(test_incr_not_number);
    RUN(test_delete);
    RUN(test_delete_prefix);
    RUN(test_window_hit);
    RUN(test_ttl_expiry);
    RUN(test_ttl_and_expire);
    RUN(test_lru_eviction);
    RUN(test_expired_not_counted_as_evicted);
    RUN(test_too_large);
    RUN(test_item_filling_the_zone);
    RUN(test_get_small_buffer);
    RUN(test_flush_all);
    RUN(test_stats);
    RUN(test_many_keys);
    RUN(test_random_workload);
    RUN(test_cross_process_incr);
    RUN(test_owner_dead_between_changes);
    RUN(test_owner_dead_mid_change);
    RUN(test_sigkill_while_hammering);
    UNIT_EXIT();
}
