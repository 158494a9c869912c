return { listen = env("MG_FUZZ_NOPE", "127.0.0.1:0") }
