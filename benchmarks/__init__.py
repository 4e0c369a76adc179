"""The pytest-benchmark suite of prada_fast: parity, speed and memory of every
implementation of `prada_loss` and of its peers, a training-step benchmark, and the
report script. See benchmarks/README.md."""
