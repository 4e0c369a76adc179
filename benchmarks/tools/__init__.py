"""Tools around the benchmark suite: the profiler, the one-case runner, the largest-batch
search, reports, the compile report and the GPU session."""
