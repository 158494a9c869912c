/*
 * libFuzzer harness: see fuzz_request.h and, for how the gateway runs inside
 * the fuzzer, fuzz_http.h. The body is shared with
 * tests/unit/test_corpus.c, which replays the corpus under make test.
 */
#include "fuzz_request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_request_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_request: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
