"""Load-test and benchmark tooling for the feed service (entry point: bench/loadtest.py)."""
