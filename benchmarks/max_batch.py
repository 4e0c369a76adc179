"""The largest micro-batch of a training step that fits in device memory.

    python -m benchmarks.max_batch --loss-impl triton [--student qwen2.5-0.5b
        --teacher qwen2.5-1.5b --seq 1024 --start 4 --limit 512 --rel-resolution 0.0625]
        [--json out.json]

Each trial is one `python -m benchmarks.train_step` in a fresh process (running out of
memory leaves nothing behind) with one warm-up and one timed step. The batch doubles from
--start until a trial runs out of memory (or --limit is reached), then bisects between the
largest batch that fitted and the smallest that did not, until they are within
--rel-resolution of each other. The result: both bounds and every trial (batch, fits, peak
memory, tokens/s, seconds).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from benchmarks.harness import run_module


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, *,
                    rel_resolution: float = 0.0625) -> tuple[int, int | None, list[int]]:
    """(largest batch b <= limit with fits(b), smallest tried batch that did not fit or None,
    the batches tried in order). Assumes fitting is monotone in the batch; 0 when even
    `start` does not fit. The gap between the two bounds ends <= max(1, rel_resolution * best)."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tried = []

    def trial(b: int) -> bool:
        tried.append(b)
        return fits(b)

    best, bad = 0, None
    b = start
    while True:  # doubling
        if trial(b):
            best = b
            if b == limit:
                return best, None, tried
            b = min(2 * b, limit)
        else:
            bad = b
            break
    while bad - best > max(1, int(rel_resolution * best)):  # bisection
        mid = (best + bad) // 2
        if mid <= best:
            break
        if trial(mid):
            best = mid
        else:
            bad = mid
    return best, bad, tried


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.max_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    p.add_argument("--student", default="qwen2.5-0.5b", help="student preset or local model dir")
    p.add_argument("--teacher", default="qwen2.5-1.5b", help="teacher preset or local model dir")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of the presets (0: theirs)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--start", type=int, default=4, help="first micro-batch tried (sequences)")
    p.add_argument("--limit", type=int, default=512, help="largest micro-batch tried")
    p.add_argument("--rel-resolution", type=float, default=0.0625,
                   help="stop bisecting when the bounds are within this fraction of the best")
    p.add_argument("--trial-timeout", type=float, default=600, help="seconds per trial")
    p.add_argument("--json", help="write the result here (default: stdout)")
    a = p.parse_args(argv)

    trials = []

    def fits(batch: int) -> bool:
        args = ["--loss-impl", a.loss_impl, "--student", a.student, "--teacher", a.teacher,
                "--vocab", str(a.vocab), "--batch", str(batch), "--seq", str(a.seq),
                "--warmup", "1", "--steps", "1"]
        t0 = time.perf_counter()
        res = run_module("benchmarks.train_step", args, timeout=a.trial_timeout)
        row = {"batch": batch, "fits": not res.get("oom"), "seconds": time.perf_counter() - t0}
        if row["fits"]:
            row.update(tokens_per_s=res["tokens_per_s"], peak_total_bytes=res["peak_total_bytes"],
                       peak_extra_bytes=res["peak_extra_bytes"])
        trials.append(row)
        print(f"max_batch {a.loss_impl}: batch {batch}: {'fits' if row['fits'] else 'out of memory'} "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        return row["fits"]

    best, bad, _ = largest_fitting(fits, a.start, a.limit, rel_resolution=a.rel_resolution)
    res = {"mode": "max_batch", "loss_impl": a.loss_impl, "student": a.student, "teacher": a.teacher,
           "seq": a.seq, "largest_fitting": best, "smallest_failing": bad, "limit": a.limit,
           "trials": trials}
    from benchmarks.cases import emit_result
    emit_result(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
