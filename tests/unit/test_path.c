/*
 * Unit tests for core/path.c: the table of documented cases, every byte and
 * every escape against the rules, in-place use, exact-size output buffers
 * (so ASan sees any write past `len`), and a differential run against a
 * deliberately different reference implementation on generated paths.
 */
#include "path.h"
#include "unit.h"

#include <stdlib.h>

#define BAD NULL /* expected result: refused with MG_EBADPATH */

typedef struct {
    const char *in;
    const char *want; /* BAD when refused */
} path_case_t;

static const path_case_t cases[] = {
    /* already canonical */
    {"/", "/"},
    {"/users", "/users"},
    {"/users/5", "/users/5"},
    {"/a/b/", "/a/b/"},
    {"/a-b_c~d.e", "/a-b_c~d.e"},
    {"/..a/b..", "/..a/b.."},
    {"/.../x", "/.../x"},
    {"/.a/a.", "/.a/a."},
    {"/a;b=c,d!$&'()*+:@", "/a;b=c,d!$&'()*+:@"},
    /* duplicate slashes */
    {"//users", "/users"},
    {"/users//5", "/users/5"},
    {"///", "/"},
    {"/a///b////", "/a/b/"},
    /* "." segments */
    {"/.", "/"},
    {"/./", "/"},
    {"/a/./b", "/a/b"},
    {"/a/.", "/a/"},
    {"/a/b/.", "/a/b/"},
    {"/./././a", "/a"},
    /* ".." segments */
    {"/a/..", "/"},
    {"/a/../", "/"},
    {"/a/b/..", "/a/"},
    {"/a/b/../", "/a/"},
    {"/a/b/../c", "/a/c"},
    {"/a/b/c/../../d", "/a/d"},
    {"/a/b/c/..", "/a/b/"},
    {"/users/../admin", "/admin"},
    {"/a//..", "/"},
    {"/a/.././b/./..", "/"},
    /* ".." above the root */
    {"/..", BAD},
    {"/../", BAD},
    {"/../a", BAD},
    {"/a/../..", BAD},
    {"/a/../../b", BAD},
    {"/./..", BAD},
    {"//..", BAD},
    /* dot segments that only appear after decoding */
    {"/%2e", "/"},
    {"/a/%2E/b", "/a/b"},
    {"/a/%2e%2e", "/"},
    {"/a/b/%2E%2E/c", "/a/c"},
    {"/a/.%2E/", "/"},
    {"/a/%2e./b", "/b"},
    {"/%2e%2e", BAD},
    {"/.%2E", BAD},
    {"/%2e%2e/etc/passwd", BAD},
    {"/a/%2e%2e%2e", "/a/..."},
    /* decoding of unreserved characters */
    {"/%41", "/A"},
    {"/%7e%7Euser", "/~~user"},
    {"/%61%62%63", "/abc"},
    {"/%30%39%2D%5F%2e", "/09-_."},
    {"/%2d%5f", "/-_"},
    /* other escapes are kept, hex upper-cased */
    {"/a%20b", "/a%20b"},
    {"/%3a", "/%3A"},
    {"/%3A", "/%3A"},
    {"/%25", "/%25"},
    {"/%252e", "/%252e"}, /* no double decoding */
    {"/%3f%23", "/%3F%23"},
    {"/%c3%a9", "/%C3%A9"},
    {"/%ff", "/%FF"},
    {"/%01", "/%01"},
    {"/%7f", "/%7F"},
    /* escapes with no canonical form */
    {"/%2F", BAD},
    {"/%2f", BAD},
    {"/a%2fb", BAD},
    {"/%5C", BAD},
    {"/%5c", BAD},
    {"/%00", BAD},
    /* invalid or truncated escapes */
    {"/%", BAD},
    {"/a%", BAD},
    {"/%4", BAD},
    {"/a%4", BAD},
    {"/%G1", BAD},
    {"/%1G", BAD},
    {"/%%41", BAD},
    {"/% 1", BAD},
    {"/%-1", BAD},
    /* raw bytes that must arrive escaped */
    {"/a\\b", BAD},
    {"/\\", BAD},
    {"/a b", BAD},
    {"/a\tb", BAD},
    {"/a\rb", BAD},
    {"/a\nb", BAD},
    {"/\x7f", BAD},
    {"/\x01", BAD},
    {"/\x80", BAD},
    {"/caf\xc3\xa9", BAD},
    {"/\xff", BAD},
    /* not a path */
    {"", BAD},
    {"users", BAD},
    {"./a", BAD},
    {"%2F", BAD},
    {"*", BAD},
    {"http://x/a", BAD},
};

/* Runs one case with an output buffer of exactly strlen(in) bytes. */
static int run_case(const char *in, char **out, size_t *out_len)
{
    size_t len = strlen(in);
    *out = malloc(len ? len : 1);
    *out_len = (size_t)-1;
    return mg_path_normalize(in, len, *out, out_len);
}

static void test_documented_cases(void)
{
    for (size_t i = 0; i < MG_ARRAY_SIZE(cases); i++) {
        char *out;
        size_t n;
        int rc = run_case(cases[i].in, &out, &n);
        if (cases[i].want == BAD) {
            if (rc != MG_EBADPATH) {
                free(out);
                FAIL_AT("\"%s\": want MG_EBADPATH, got rc %d", cases[i].in, rc);
            }
            /* *out_len is untouched on error */
            CHECK(n == (size_t)-1);
        } else {
            int ok = rc == 0 && n == strlen(cases[i].want)
                     && memcmp(out, cases[i].want, n) == 0;
            if (!ok) {
                free(out);
                FAIL_AT("\"%s\": want \"%s\", got rc %d \"%.*s\"", cases[i].in,
                        cases[i].want, rc, rc == 0 ? (int)n : 0,
                        rc == 0 ? out : "");
            }
        }
        free(out);
    }
    CHECK_INT(MG_ARRAY_SIZE(cases), >=, 40);
}

static void test_result_never_longer_than_input(void)
{
    for (size_t i = 0; i < MG_ARRAY_SIZE(cases); i++) {
        char *out;
        size_t n;
        int rc = run_case(cases[i].in, &out, &n);
        free(out);
        if (rc == 0)
            CHECK_INT(n, <=, strlen(cases[i].in));
    }
}

static void test_normalizing_twice_changes_nothing(void)
{
    char again[256];
    for (size_t i = 0; i < MG_ARRAY_SIZE(cases); i++) {
        if (cases[i].want == BAD)
            continue;
        const char *w = cases[i].want;
        size_t n;
        CHECK_INT(mg_path_normalize(w, strlen(w), again, &n), ==, 0);
        CHECK_INT(n, ==, strlen(w));
        CHECK(memcmp(again, w, n) == 0);
    }
}

static void test_in_place_gives_same_result(void)
{
    char buf[256];
    for (size_t i = 0; i < MG_ARRAY_SIZE(cases); i++) {
        size_t len = strlen(cases[i].in), n;
        memcpy(buf, cases[i].in, len);
        int rc = mg_path_normalize(buf, len, buf, &n);
        if (cases[i].want == BAD) {
            CHECK_INT(rc, ==, MG_EBADPATH);
        } else {
            CHECK_INT(rc, ==, 0);
            buf[n] = '\0';
            CHECK_STR(buf, cases[i].want);
        }
    }
}

static void test_input_is_not_nul_terminated(void)
{
    /* Only `len` bytes count: the rest of the buffer is never read. */
    const char in[] = "/a/b/../c?q=/../../x";
    char out[sizeof(in)];
    size_t n;
    CHECK_INT(mg_path_normalize(in, 9, out, &n), ==, 0);
    out[n] = '\0';
    CHECK_STR(out, "/a/c");

    /* An escape cut by `len` is truncated even if bytes follow. */
    CHECK_INT(mg_path_normalize("/a%41", 4, out, &n), ==, MG_EBADPATH);
}

static void test_embedded_nul_refused(void)
{
    char out[8];
    size_t n;
    CHECK_INT(mg_path_normalize("/a\0b", 4, out, &n), ==, MG_EBADPATH);
}

/* Every raw byte in the middle of a segment: only visible ASCII passes. */
static void test_every_raw_byte(void)
{
    for (int b = 0; b < 256; b++) {
        char in[4] = {'/', 'x', (char)b, 'y'}, out[4];
        size_t n;
        int rc = mg_path_normalize(in, 4, out, &n);
        int want_ok = b > 0x20 && b < 0x7F && b != '\\' && b != '%';
        if (b == '/') {
            CHECK_INT(rc, ==, 0); /* "/x/y" */
            CHECK_INT(n, ==, 4);
            continue;
        }
        if (want_ok != (rc == 0))
            FAIL_AT("byte 0x%02x: rc %d", b, rc);
        if (rc == 0) {
            CHECK_INT(n, ==, 4);
            CHECK(memcmp(out, in, 4) == 0);
        }
    }
}

static int is_unreserved(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'
           || c == '~';
}

/* Every escape, in both hex cases: decoded, kept upper-case, or refused. */
static void test_every_escape(void)
{
    static const char lower[] = "0123456789abcdef";
    static const char upper[] = "0123456789ABCDEF";
    for (int v = 0; v < 256; v++) {
        for (int up = 0; up < 2; up++) {
            const char *hx = up ? upper : lower;
            char in[6] = {'/', 'x', '%', hx[v >> 4], hx[v & 15], 'y'};
            char out[6];
            size_t n;
            int rc = mg_path_normalize(in, 6, out, &n);
            if (v == '/' || v == '\\' || v == 0) {
                CHECK_INT(rc, ==, MG_EBADPATH);
            } else if (is_unreserved(v)) {
                CHECK_INT(rc, ==, 0);
                CHECK_INT(n, ==, 4);
                CHECK(out[2] == (char)v);
            } else {
                CHECK_INT(rc, ==, 0);
                CHECK_INT(n, ==, 6);
                CHECK(out[2] == '%' && out[3] == upper[v >> 4]
                      && out[4] == upper[v & 15]);
            }
        }
    }
}

/*
 * Reference implementation for the differential test: decode each segment
 * on its own, then resolve dot segments with an explicit stack. Different
 * shape from path.c (which rewrites in one pass), same contract.
 */
static int reference(const char *in, size_t len, char *out, size_t *out_len)
{
    char segs[64][64];
    size_t seglen[64], depth = 0, i = 1;
    int trailing = 0;

    if (len == 0 || in[0] != '/')
        return MG_EBADPATH;
    while (i <= len) {
        size_t e = i;
        while (e < len && in[e] != '/')
            e++;
        char d[64];
        size_t dn = 0;
        for (size_t k = i; k < e; k++) {
            unsigned char c = (unsigned char)in[k];
            if (c == '%') {
                unsigned v;
                char hx[3] = {0, 0, 0};
                if (e - k < 3)
                    return MG_EBADPATH;
                hx[0] = in[k + 1];
                hx[1] = in[k + 2];
                char *end;
                if (!strchr("0123456789abcdefABCDEF", hx[0])
                    || !strchr("0123456789abcdefABCDEF", hx[1]) || !hx[0]
                    || !hx[1])
                    return MG_EBADPATH;
                v = (unsigned)strtoul(hx, &end, 16);
                if (v == '/' || v == '\\' || v == 0)
                    return MG_EBADPATH;
                if (is_unreserved((int)v))
                    d[dn++] = (char)v;
                else
                    dn += (size_t)sprintf(d + dn, "%%%02X", v);
                k += 2;
            } else if (c <= 0x20 || c >= 0x7F || c == '\\') {
                return MG_EBADPATH;
            } else {
                d[dn++] = (char)c;
            }
        }
        int last = e == len;
        if (dn == 0 || (dn == 1 && d[0] == '.')) {
            trailing = last;
        } else if (dn == 2 && d[0] == '.' && d[1] == '.') {
            if (depth == 0)
                return MG_EBADPATH;
            depth--;
            trailing = last;
        } else {
            memcpy(segs[depth], d, dn);
            seglen[depth++] = dn;
            trailing = 0;
        }
        i = e + 1;
    }
    size_t w = 0;
    out[w++] = '/';
    for (size_t k = 0; k < depth; k++) {
        memcpy(out + w, segs[k], seglen[k]);
        w += seglen[k];
        if (k + 1 < depth || trailing)
            out[w++] = '/';
    }
    *out_len = w;
    return 0;
}

static void test_agrees_with_reference_on_generated_paths(void)
{
    static const char *const tokens[] = {
        "/",  "/",  "/",   "//",  ".",   "..",  "%2e", "%2E",
        "a",  "bc", "%41", "%7e", "%3a", "%2f", "%",   "%g1",
        "\\", " ",  "~",   "%00", "%5c", "%20",
    };
    uint32_t seed = 12345;
    char in[64], out[64], ref[128];

    for (int iter = 0; iter < 200000; iter++) {
        size_t len = 0;
        seed = seed * 1103515245u + 12345u;
        int ntok = (int)(seed >> 16) % 9;
        if ((seed >> 8) % 16 != 0)
            in[len++] = '/'; /* mostly well-formed starts */
        for (int t = 0; t < ntok; t++) {
            seed = seed * 1103515245u + 12345u;
            const char *tok = tokens[(seed >> 16) % MG_ARRAY_SIZE(tokens)];
            memcpy(in + len, tok, strlen(tok));
            len += strlen(tok);
        }
        size_t n = 0, rn = 0;
        int rc = mg_path_normalize(in, len, out, &n);
        int rrc = reference(in, len, ref, &rn);
        if (rc != rrc || (rc == 0 && (n != rn || memcmp(out, ref, n) != 0)))
            FAIL_AT("\"%.*s\": got %d \"%.*s\", reference %d \"%.*s\"",
                    (int)len, in, rc, rc ? 0 : (int)n, out, rrc,
                    rrc ? 0 : (int)rn, ref);
        if (rc == 0)
            CHECK_INT(n, <=, len);
    }
}

int main(void)
{
    RUN(test_documented_cases);
    RUN(test_result_never_longer_than_input);
    RUN(test_normalizing_twice_changes_nothing);
    RUN(test_in_place_gives_same_result);
    RUN(test_input_is_not_nul_terminated);
    RUN(test_embedded_nul_refused);
    RUN(test_every_raw_byte);
    RUN(test_every_escape);
    RUN(test_agrees_with_reference_on_generated_paths);
    UNIT_EXIT();
}
