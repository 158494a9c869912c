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
 * Refused with MG_EBADPATH: no leading '/', an invalid or truncated escape,
 * an escaped '/' ("%2F"), '\\' ("%5C") or NUL ("%00"), a raw '\\', a raw
 * control byte or space, and any ".." that would climb above the root.
 * A trailing slash is kept ("/a/b/" stays "/a/b/"; "/a/b/." becomes "/a/b/").
 *
 * `out` must have room for `len` bytes (the result is never longer). On
 * success writes the result to out, its length to *out_len and returns 0.
 */
int mg_path_normalize(const char *in, size_t len, char *out, size_t *out_len);

#endif
