/*
 * The body of the upstream-response fuzz harness, shared by
 * tests/fuzz/fuzz_response.c and tests/unit/test_corpus.c. The first input
 * byte picks the client's request (GET, HEAD, POST with a body, a
 * keep-alive GET followed by a second one, an HTTP/1.0 GET); the rest is
 * what the upstream answers, then it closes. It goes through the real
 * worker (fuzz_http.h). Covers core/proxy.c's response side: llhttp in
 * response mode with the proxy's callbacks, status line, header spans and
 * filtering (hop-by-hop, Connection-listed), framing (Content-Length,
 * chunked, close-delimited, no body for HEAD/1xx/204/304), re-chunking to
 * the client, 502 on a broken response, retries of idempotent requests,
 * and the upstream connection's end (core/upstream.c).
 */
#ifndef MG_FUZZ_RESPONSE_H
#define MG_FUZZ_RESPONSE_H

#include "fuzz_http.h"

static const char *const fuzz_response_requests[] = {
    "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "POST /p/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    "Origin: http://o.example\r\nConnection: close\r\n\r\nhello",
    "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    "GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "GET /a HTTP/1.0\r\n\r\n",
};

static const char *fuzz_response_one(const uint8_t *data, size_t size)
{
    if (size == 0 || size > 16384)
        return NULL;
    size_t pick = data[0] % MG_ARRAY_SIZE(fuzz_response_requests);
    const char *req = fuzz_response_requests[pick];
    return fuzz_http_one((const uint8_t *)req, strlen(req), data + 1, size - 1);
}

#endif
