"""Development tools, never part of an image: the local Triton launcher (``visloc-triton``),
``make demo``, and the loopback helpers the tests and benchmarks share."""
