/*
 * The body of the path-normalization fuzz harness, shared by
 * tests/fuzz/fuzz_path.c (libFuzzer) and tests/unit/test_corpus.c (corpus
 * replay under the unit suites). Feeds the input to mg_path_normalize, both
 * out of place and in place, and checks what path.h promises of a result:
 *   - never longer than the input; both modes give the same bytes;
 *   - starts with '/'; no "//"; no "." or ".." segment; no '\\';
 *   - only visible ASCII; every '%' starts an escape with two upper-case
 *     hex digits, never %2F, %5C or %00;
 *   - normalizing the result again returns it unchanged (idempotence).
 * Returns NULL when every invariant holds, else a static message.
 */
#ifndef MG_FUZZ_PATH_H
#define MG_FUZZ_PATH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "path.h"

static char fuzz_path_msg[256];

static const char *fuzz_path_fail(const char *what, const char *p, size_t n)
{
    snprintf(fuzz_path_msg, sizeof(fuzz_path_msg), "%s (output \"%.*s\")", what,
             (int)(n > 120 ? 120 : n), p);
    return fuzz_path_msg;
}

/* Checks the shape of a successful result. */
static const char *fuzz_path_shape(const char *p, size_t n)
{
    if (n == 0 || p[0] != '/')
        return fuzz_path_fail("does not start with '/'", p, n);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f)
            return fuzz_path_fail("byte outside visible ASCII", p, n);
        if (c == '\\')
            return fuzz_path_fail("contains '\\'", p, n);
        if (c == '/' && i + 1 < n && p[i + 1] == '/')
            return fuzz_path_fail("contains \"//\"", p, n);
        if (c == '%') {
            if (i + 2 >= n)
                return fuzz_path_fail("truncated escape", p, n);
            char h = p[i + 1], l = p[i + 2];
            int hx = (h >= '0' && h <= '9') || (h >= 'A' && h <= 'F');
            int lx = (l >= '0' && l <= '9') || (l >= 'A' && l <= 'F');
            if (!hx || !lx)
                return fuzz_path_fail("escape not two upper-case hex digits", p,
                                      n);
            if ((h == '2' && l == 'F') || (h == '5' && l == 'C')
                || (h == '0' && l == '0'))
                return fuzz_path_fail("kept %2F, %5C or %00", p, n);
        }
    }
    /* Segments: the text between slashes (the last one may be empty). */
    size_t s = 1;
    while (s <= n) {
        size_t e = s;
        while (e < n && p[e] != '/')
            e++;
        size_t len = e - s;
        if ((len == 1 && p[s] == '.')
            || (len == 2 && p[s] == '.' && p[s + 1] == '.'))
            return fuzz_path_fail("\".\" or \"..\" segment left", p, n);
        s = e + 1;
    }
    return NULL;
}

static const char *fuzz_path_one(const uint8_t *data, size_t size)
{
    /* Exact-size copies, so ASan sees any read or write past `len`. */
    char *in = malloc(size ? size : 1);
    char *out = malloc(size ? size : 1);
    char *again = NULL;
    const char *bad = NULL;
    if (size)
        memcpy(in, data, size);
    size_t out_len = (size_t)-1;
    int rc = mg_path_normalize(in, size, out, &out_len);
    if (rc != 0 && rc != MG_EBADPATH) {
        snprintf(fuzz_path_msg, sizeof(fuzz_path_msg),
                 "unexpected return code %d", rc);
        bad = fuzz_path_msg;
        goto done;
    }

    /* In place must agree with out of place. */
    size_t inplace_len = (size_t)-1;
    int rc2 = mg_path_normalize(in, size, in, &inplace_len);
    if (rc2 != rc) {
        snprintf(fuzz_path_msg, sizeof(fuzz_path_msg),
                 "in place returned %d, out of place %d", rc2, rc);
        bad = fuzz_path_msg;
        goto done;
    }
    if (rc != 0)
        goto done;
    if (out_len > size) {
        snprintf(fuzz_path_msg, sizeof(fuzz_path_msg),
                 "output longer than input: %zu > %zu", out_len, size);
        bad = fuzz_path_msg;
        goto done;
    }
    if (inplace_len != out_len || memcmp(in, out, out_len) != 0) {
        bad = fuzz_path_fail("in place result differs", out, out_len);
        goto done;
    }
    if ((bad = fuzz_path_shape(out, out_len)) != NULL)
        goto done;

    again = malloc(out_len);
    size_t again_len = (size_t)-1;
    rc = mg_path_normalize(out, out_len, again, &again_len);
    if (rc != 0)
        bad = fuzz_path_fail("result is refused when normalized again", out,
                             out_len);
    else if (again_len != out_len || memcmp(again, out, out_len) != 0)
        bad = fuzz_path_fail("normalizing twice changes the result", out,
                             out_len);
done:
    free(again);
    free(out);
    free(in);
    return bad;
}

#endif
