"""The trainer subsystem: flags, DeepSpeed config and engines, the loop, batching and packing,
checkpoints, preemption, distributed helpers, the run directory, evaluation and probes."""
