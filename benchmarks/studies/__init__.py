"""One-off studies: each a command that measures one question and prints its table
(benchmarks/RESULTS.md holds what they found)."""
