"""The largest micro-batch of a training step that fits in device memory.

    python -m benchmarks.tools.max_batch --loss-impl triton [--student qwen2.5-0.5b
        --teacher qwen2.5-1.5b --seq 1024 --start 4 --limit 512 --factor 1.125]
        [--json out.json]

One process builds the student and teacher engines once (benchmarks.train_step's
`build_train_step`: the trainer's engines and micro-step), runs a step at --start (the
optimizer state is allocated there), then steps on batches growing by --factor (4, 5, 6,
7, 8, 9, 10, 11, 12, 14, 16, 18, 20, ...) until one runs out of device memory or --limit
is reached: ZeRO-3 does not fix the batch size, so no trial needs a fresh process, and the
search takes one model set-up instead of one per trial.
Cached allocator blocks are released before each trial. The result: the largest batch that
ran and the first that did not (so the answer is within one factor step), and every trial
(batch, seconds, tokens/s, peak memory). The JSON is rewritten after each trial, so a run
cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def batch_sizes(start: int, limit: int, factor: float) -> list[int]:
    """start, then each size times `factor` (at least one more), ending with `limit`."""
    if start < 1 or limit < start or factor <= 1:
        raise ValueError(f"need 1 <= start <= limit and factor > 1, got {start}, {limit}, {factor}")
    out = [start]
    while out[-1] < limit:
        out.append(min(limit, max(out[-1] + 1, round(out[-1] * factor))))
    return out


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA out of memory, also when it surfaces through cuBLAS or another library."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.max_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    p.add_argument("--student", default="qwen2.5-0.5b", help="student preset or local model dir")
    p.add_argument("--teacher", default="qwen2.5-1.5b", help="teacher preset or local model dir")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of the presets (0: theirs)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--start", type=int, default=4, help="first micro-batch (sequences); must fit")
    p.add_argument("--limit", type=int, default=512, help="largest micro-batch tried")
    p.add_argument("--factor", type=float, default=1.125, help="growth from one trial to the next")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no trial after this many seconds (the result says it was cut short)")
    p.add_argument("--ds", default=None, help="DeepSpeed config (default: ds_configs/zero3.json)")
    p.add_argument("--json", help="write the result here (default: stdout at the end)")
    a = p.parse_args(argv)

    from benchmarks.cases import emit_result
    from benchmarks.train_step import build_train_step
    from prada_fast.common import distributed as dist_util
    sizes = batch_sizes(a.start, a.limit, a.factor)
    t0 = time.perf_counter()
    step, desc = build_train_step(student=a.student, teacher=a.teacher, vocab=a.vocab, batch=a.start,
                                  seq=a.seq, loss_impl=a.loss_impl, ds_config=a.ds)
    dev = torch.device(desc["device"])
    cuda = dev.type == "cuda"
    res = {"mode": "max_batch", "loss_impl": a.loss_impl, "student": a.student, "teacher": a.teacher,
           "seq": a.seq, "vocab": desc["vocab"], "attn": desc.get("attn"), "bf16": desc["bf16"],
           "setup_s": time.perf_counter() - t0, "largest_fitting": 0, "smallest_failing": None,
           "limit": a.limit, "factor": a.factor, "trials": [], "complete": False}
    if cuda:
        res["device_memory_bytes"] = torch.cuda.get_device_properties(dev).total_memory
    step()  # the first step allocates the optimizer state; it must fit
    for b in sizes:
        if a.deadline_s and time.perf_counter() - t0 > a.deadline_s:
            res["cut_short"] = f"deadline of {a.deadline_s:.0f} s before batch {b}"
            break
        trial = {"batch": b}
        try:
            s = step.for_batch(b)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            t = time.perf_counter()
            s()
            if cuda:
                torch.cuda.synchronize(dev)
                trial["peak_total_bytes"] = torch.cuda.max_memory_allocated(dev)
            sec = time.perf_counter() - t
            trial.update(fits=True, seconds=sec, tokens_per_s=s.tokens / sec)
            res["largest_fitting"] = b
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            trial.update(fits=False, error=str(e)[:300])
            res["smallest_failing"] = b
        res["trials"].append(trial)
        print(f"max_batch {a.loss_impl}: batch {b}: {'fits' if trial['fits'] else 'out of memory'}",
              file=sys.stderr, flush=True)
        if a.json:
            emit_result(res, a.json)  # kept if the run is cut short
        if not trial["fits"]:
            break  # the engines' state after an out-of-memory error is not to be trusted
    res["complete"] = True
    emit_result(res, a.json)
    if res["smallest_failing"] and cuda:
        # after an out-of-memory error the process group's teardown may hang: leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist_util.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
