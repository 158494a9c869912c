/*
 * Request-path normalization (the contract is in path.h). One forward pass
 * over the input writes the canonical form: each segment is decoded straight
 * into the output and then inspected; if it turned out to be "." or ".."
 * (possibly spelled "%2e" / "%2E") it is taken back out again, together with
 * its parent for "..". Every output byte stands for at least one input byte
 * and removal only shortens, so the write position never passes the read
 * position: that is why the output is never longer than the input and why
 * normalizing in place (out == in) is safe.
 *
 * Not for query strings (their escaping rules differ) nor for absolute URLs;
 * the caller hands over only the path.
 */
#include "path.h"

static const char hex_upper[] = "0123456789ABCDEF";

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20; /* fold ASCII upper case to lower */
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~". */
static int unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'
           || c == '~';
}

/*
 * Copies the segment at in[*ip] (up to the next '/' or the end) to out[*wp],
 * decoding and validating escapes on the way, and advances both positions.
 * All reads of an escape happen before its writes, which keeps the in-place
 * case correct even when the write position equals the read position.
 */
static int segment(const char *in, size_t len, size_t *ip, char *out,
                   size_t *wp)
{
    size_t i = *ip, w = *wp;

    while (i < len && in[i] != '/') {
        unsigned char c = (unsigned char)in[i];
        if (c == '%') {
            if (len - i < 3)
                return MG_EBADPATH; /* truncated escape */
            int hi = hexval((unsigned char)in[i + 1]);
            int lo = hexval((unsigned char)in[i + 2]);
            if (hi < 0 || lo < 0)
                return MG_EBADPATH;
            unsigned char v = (unsigned char)(hi << 4 | lo);
            /*
             * An escaped '/' or '\' would be one segment to us and two to
             * an upstream that decodes it; NUL truncates C strings
             * downstream. No single canonical form exists, so refuse.
             */
            if (v == '/' || v == '\\' || v == '\0')
                return MG_EBADPATH;
            i += 3;
            if (unreserved(v)) {
                out[w++] = (char)v;
            } else {
                out[w++] = '%';
                out[w++] = hex_upper[hi];
                out[w++] = hex_upper[lo];
            }
            continue;
        }
        /*
         * Space, controls, DEL and non-ASCII bytes must arrive escaped;
         * a raw '\' is a separator on some upstreams (IIS, Windows).
         */
        if (c <= 0x20 || c >= 0x7F || c == '\\')
            return MG_EBADPATH;
        out[w++] = (char)c;
        i++;
    }
    *ip = i;
    *wp = w;
    return 0;
}

/* 1 for ".", 2 for "..", 0 for any other segment. */
static int dots(const char *s, size_t n)
{
    if (n == 1 && s[0] == '.')
        return 1;
    if (n == 2 && s[0] == '.' && s[1] == '.')
        return 2;
    return 0;
}

int mg_path_normalize(const char *in, size_t len, char *out, size_t *out_len)
{
    if (len == 0 || in[0] != '/')
        return MG_EBADPATH;

    size_t i = 1, w = 0;
    out[w++] = '/';
    /* Invariant at the top of the loop: out[0..w) ends with '/'. */
    for (;;) {
        while (i < len && in[i] == '/')
            i++; /* a run of '/' collapses into the one already written */
        if (i == len)
            break;

        size_t seg = w;
        int rc = segment(in, len, &i, out, &w);
        if (rc != 0)
            return rc;

        switch (dots(out + seg, w - seg)) {
        case 1:
            w = seg; /* drop "."; the '/' before it stays */
            break;
        case 2:
            if (seg == 1)
                return MG_EBADPATH; /* ".." directly under the root */
            /* Drop ".." and the parent segment, keep the parent's '/'. */
            w = seg - 1;
            while (out[w - 1] != '/')
                w--;
            break;
        default:
            if (i < len) {
                out[w++] = '/';
                i++;
            }
            break;
        }
        /*
         * After a dot segment at the very end the output still ends with
         * '/', which is the documented trailing-slash rule: "/a/b/." and
         * "/a/b/c/.." both give "/a/b/".
         */
        if (i == len)
            break;
    }
    *out_len = w;
    return 0;
}
