/*
 * Request-path normalization: the one place that turns the bytes a client
 * sent as a path into the canonical path that is routed, authorized, cached
 * and proxied. Pure: no I/O, no allocation.
 */
#ifndef MG_PATH_H
#define MG_PATH_H

#include "common.h"

/*
 * Normalizes the path part of a request target (no query string, no
 * fragment; the caller splits at the first '?'). Steps, in order:
 *   - the path must start with '/';
 *   - percent-escapes are validated; escapes of unreserved characters
 *     (ALPHA / DIGIT / '-' / '.' / '_' / '~') are decoded; every other valid
 *     escape is kept, with its hex digits upper-cased;
 *   - runs of '/' collapse to one;
 *   - "." and ".." segments are removed (RFC 3986 section 5.2.4), including
 *     ones that only appear after decoding ("%2e%2e").
 * Refused with MG_EBADPATH: an empty path or no leading '/', an invalid or
 * truncated escape ("%", "%4", "%G1"), an escaped '/' ("%2F"), '\\' ("%5C")
 * or NUL ("%00"), a raw '\\', a raw byte outside visible ASCII (controls,
 * space, DEL and every byte >= 0x80: clients must percent-encode them), and
 * any ".." that would climb above the root ("/..", "/a/../..").
 * A trailing slash is kept ("/a/b/" stays "/a/b/"; "/a/b/." and "/a/b/c/.."
 * become "/a/b/"); "/a/b" never gains one.
 *
 * `out` must have room for `len` bytes (the result is never longer); it may
 * be `in` itself (in-place), but must not otherwise overlap it. On success
 * writes the result to out, its length to *out_len and returns 0; on
 * MG_EBADPATH the contents of out are unspecified and *out_len is untouched.
 */
int mg_path_normalize(const char *in, size_t len, char *out, size_t *out_len);

#endif
