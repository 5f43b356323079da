"""Benchmarks and bounded load commands (``make bench``, ``make soak``): measurements, not tests."""
