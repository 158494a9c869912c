/*
 * The body of the upstream-response fuzz harness, shared by
 * tests/fuzz/fuzz_response.c and tests/unit/test_corpus.c. The first input
 * byte picks the client's request (GET, HEAD, POST with a body, a
 * keep-alive GET followed by a second one, an HTTP/1.0 GET, a WebSocket
 * handshake); the rest is
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

/* Picked by a first byte of 255 only, so that the corpus made before it
 * keeps its requests: a WebSocket handshake with a frame behind it, which
 * a 101 turns into a tunnel (core/tunnel.c) until both sides close. */
static const char fuzz_response_upgrade[] =
    "GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
    "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";

static const char *fuzz_response_one(const uint8_t *data, size_t size)
{
    if (size == 0 || size > 16384)
        return NULL;
    size_t pick = data[0] % MG_ARRAY_SIZE(fuzz_response_requests);
    const char *req = fuzz_response_requests[pick];
    size_t len = strlen(req);
    if (data[0] == 255) {
        req = fuzz_response_upgrade;
        len = sizeof(fuzz_response_upgrade) - 1;
    }
    return fuzz_http_one((const uint8_t *)req, len, data + 1, size - 1);
}

#endif
