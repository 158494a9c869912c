/*
 * libFuzzer harness for mg_router_match (core/router.c) behind
 * mg_path_normalize. The input format and the checks are in fuzz_router.h,
 * shared with tests/unit/test_corpus.c.
 */
#include "fuzz_router.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_router_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_router: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
