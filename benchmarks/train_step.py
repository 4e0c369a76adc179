"""One training-step benchmark case in this (fresh) process: student + frozen teacher
under DeepSpeed ZeRO-3 (a world of one), the trainer's own forward (PradaModel, the loss op
with --loss-impl) and teacher pass, on a fixed random batch.

    python -m benchmarks.train_step --loss-impl chunked [--student tiny --teacher tiny-teacher
        --vocab 32000 --batch 8 --seq 256 --warmup 2 --steps 3] [--json out.json]

`warmup` steps first (allocator, optimizer state), then `steps` timed steps: tokens per
second (input tokens of the batch / median step time), and the peak memory of a step above
the state after warm-up (weights, optimizer state, ZeRO buffers) and in total, measured as
in benchmarks.run_case (CUDA: max_memory_allocated over the timed steps; CPU: the resident
set over one more, untimed step with glibc in exact mode). Running out of CUDA memory is a
result, not a crash: {"oom": true, ...} (benchmarks.max_batch searches on it).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from benchmarks.run_case import hwm_bytes, measure_cpu_peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    p.add_argument("--student", default="tiny")
    p.add_argument("--teacher", default="tiny-teacher")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the presets (0: theirs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ds", default=None, help="DeepSpeed config (default: ds_configs/zero3.json)")
    p.add_argument("--json", help="write the result here (default: stdout)")
    a = p.parse_args(argv)
    from benchmarks.cases import emit_result

    try:
        res = measure(a)
    except torch.OutOfMemoryError as e:  # CUDA: recorded, not a crash
        res = {"mode": "train_step", "oom": True, "loss_impl": a.loss_impl, "student": a.student,
               "teacher": a.teacher, "batch": a.batch, "seq": a.seq, "error": str(e)[:500]}
    emit_result(res, a.json)
    return 0


def measure(a) -> dict:
    from prada_fast import distributed as dist_util
    from prada_fast.profile import build_train_step

    t_setup = time.perf_counter()
    step, desc = build_train_step(student=a.student, teacher=a.teacher, vocab=a.vocab,
                                  batch=a.batch, seq=a.seq, loss_impl=a.loss_impl, ds_config=a.ds)
    dev = torch.device(desc["device"])
    setup_s = time.perf_counter() - t_setup

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = []

    def timed_steps(n: int) -> list[float]:
        nonlocal tokens
        seconds = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss, tokens = step()
            sync()
            seconds.append(time.perf_counter() - t0)
            losses.append(loss)
        return seconds

    tokens = None
    warm = timed_steps(a.warmup)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = timed_steps(a.steps)
    if dev.type == "cuda":
        peak_total = torch.cuda.max_memory_allocated(dev)
        method = "cuda max_memory_allocated over the timed steps"
    else:  # one more step, untimed, for the memory (glibc in exact mode)
        (loss, tokens), extra, method = measure_cpu_peak(step)
        losses.append(loss)
        peak_total = hwm_bytes()
        base = peak_total - extra
    med = statistics.median(times)
    res = {"mode": "train_step", **desc, "warmup_s": warm, "times_s": times, "median_s": med,
           "tokens_per_s": desc["tokens_per_step"] / med, "losses": losses,
           "peak_extra_bytes": int(peak_total - base), "peak_total_bytes": int(peak_total),
           "mem_baseline_bytes": int(base), "mem_method": method,
           "setup_s": setup_s, "threads": torch.get_num_threads(), "oom": False}
    dist_util.teardown()
    return res


if __name__ == "__main__":
    sys.exit(main())
