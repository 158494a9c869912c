/*
 * libFuzzer harness: see fuzz_response.h and, for how the gateway runs inside
 * the fuzzer, fuzz_http.h. The body is shared with
 * tests/unit/test_corpus.c, which replays the corpus under make test.
 */
#include "fuzz_response.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_response_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_response: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
