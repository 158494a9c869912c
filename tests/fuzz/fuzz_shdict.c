/*
 * libFuzzer harness for the shared dictionaries (core/shdict.c): an op
 * interpreter over a 64 KiB zone. The input format and the checks are in
 * fuzz_shdict.h, shared with tests/unit/test_corpus.c.
 */
#include "fuzz_shdict.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_shdict_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_shdict: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
