"""Benchmark tools for the feed service: entry points in bench/*.py, built from bench/lib/."""
