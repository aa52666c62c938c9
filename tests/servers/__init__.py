"""Real servers that tests and benchmarks start and stop themselves (all on 127.0.0.1)."""
