/*
 * The body of the HTTP/1 request fuzz harness, shared by
 * tests/fuzz/fuzz_request.c and tests/unit/test_corpus.c. The input is the
 * raw bytes a client sends on one connection (one request, several
 * pipelined ones, or garbage); it goes through the real worker
 * (fuzz_http.h), whose upstream answers every proxied request with a fixed
 * small response. Covers core/http1.c (reading, llhttp callbacks, head
 * limits, build_request's framing checks, chunked decoding, max_body,
 * Expect, pipelining, half-close), the proxy's request head rewriting and
 * body forwarding in core/proxy.c, and the routing and plugin code it
 * reaches (request-id, cors on the /p/ route).
 */
#ifndef MG_FUZZ_REQUEST_H
#define MG_FUZZ_REQUEST_H

#include "fuzz_http.h"

static const char fuzz_request_answer[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

static const char *fuzz_request_one(const uint8_t *data, size_t size)
{
    if (size > 16384) /* several heads' worth; more only slows fuzzing */
        return NULL;
    return fuzz_http_one(data, size, (const uint8_t *)fuzz_request_answer,
                         sizeof(fuzz_request_answer) - 1);
}

#endif
