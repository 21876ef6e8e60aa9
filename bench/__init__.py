"""Benchmark suite for otelprof-middleware: ``python -m bench.run`` (see docs/benchmarks.md)."""
