"""Latency harness and the benchmark suites that measure edgesmith's performance goals."""
