/*
 * libFuzzer harness for mg_config_load (core/config.c). What it skips and
 * checks is in fuzz_config.h, shared with tests/unit/test_corpus.c.
 */
#include "fuzz_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_config_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_config: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
