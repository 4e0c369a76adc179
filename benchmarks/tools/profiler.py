"""Profile one call of the loss op, or one training step, under torch.profiler.

    python -m benchmarks.tools.profiler op --impl chunked --N 2048 --H 512 --V 32000 [--Ht 512] --out prof/
    python -m benchmarks.tools.profiler step --loss-impl chunked [--student tiny --teacher tiny-teacher
        --vocab 32000 --batch 8 --seq 256] --out prof/

Writes OUT/trace.json (a Chrome trace: chrome://tracing or https://ui.perfetto.dev) and
OUT/top_kernels.md (operators, and on CUDA the kernels, by self time). One untimed call
runs first (compilation, allocator warm-up). --bare runs the calls without torch.profiler,
for Nsight Compute / Nsight Systems: the commands are in benchmarks/README.md.

`op`: forward + backward of `prada_loss` on the benchmark suite's random inputs of N rows
(benchmarks.cases: `rows_case` + `make_inputs`). `step`: the training-step benchmark's
step (benchmarks.train_step.build_train_step: the trainer's engines and micro-step, student
under DeepSpeed (a world of one: ZeRO stage 0 in fp32, as the trainer runs it) + frozen
teacher, on a fixed random batch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.cases import DTYPES, clear_grads, make_inputs, rows_case

IMPL_CHOICES = ("auto", "triton", "chunked", "reference")


# ----------------------------------------------------------------------------- the op
def op_step(x: dict, impl: str, **kw):
    """One forward + backward of prada_loss on x (gradients cleared first); returns the loss."""
    from prada_fast import prada_loss
    clear_grads(x)
    args = {k: v for k, v in x.items() if k not in ("hidden", "lm_weight", "targets")}
    loss, _ = prada_loss(x["hidden"], x["lm_weight"], x["targets"], impl=impl, **args, **kw)
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- profiling
def _attr(ev, *names):
    for n in names:
        v = getattr(ev, n, None)
        if v is not None:
            return v
    return 0


def top_table(prof, device_type: str, rows: int = 30) -> str:
    """Markdown table of the operators / kernels with the most self time."""
    on_gpu = device_type == "cuda"
    events = list(prof.key_averages())
    key_dev = ("self_device_time_total", "self_cuda_time_total")
    key = (lambda e: _attr(e, *key_dev)) if on_gpu else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    events.sort(key=key, reverse=True)
    head = "| # | name | calls | self {0} ms | % | total {0} ms |".format("CUDA" if on_gpu else "CPU")
    lines = [head + (" self CPU ms |" if on_gpu else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if on_gpu else "")]
    for i, e in enumerate(events[:rows], 1):
        tot = _attr(e, "device_time_total", "cuda_time_total") if on_gpu else e.cpu_time_total
        name = e.key.replace("|", "\\|")
        if len(name) > 90:
            name = name[:87] + "..."
        row = (f"| {i} | `{name}` | {e.count} | {key(e) / 1e3:.2f} | {100 * key(e) / total:.1f} "
               f"| {tot / 1e3:.2f} |")
        lines.append(row + (f" {e.self_cpu_time_total / 1e3:.2f} |" if on_gpu else ""))
    return "\n".join(lines)


def profile(fn, out: Path, device: torch.device, title: str, warmup: int = 1) -> dict:
    """Run fn `warmup` times, then once under torch.profiler; write trace.json and
    top_kernels.md into out."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with tprofile(activities=acts, record_shapes=True, profile_memory=True) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    md = [f"# {title}", "", f"- command: `python -m benchmarks.tools.profiler {' '.join(sys.argv[1:])}`",
          f"- device: {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
          f"- wall time of the profiled call (profiler overhead included): {wall:.3f} s", "",
          top_table(prof, device.type), ""]
    (out / "top_kernels.md").write_text("\n".join(md))
    return {"wall_s": wall, "trace": str(out / "trace.json"), "table": str(out / "top_kernels.md")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.profiler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    op = sub.add_parser("op", help="one forward + backward of prada_loss")
    op.add_argument("--impl", default="auto", choices=IMPL_CHOICES)
    op.add_argument("--N", type=int, default=2048, help="rows (batch x sequence)")
    op.add_argument("--H", type=int, default=512)
    op.add_argument("--V", type=int, default=32000)
    op.add_argument("--Ht", type=int, default=512, help="teacher hidden size (0: no teacher)")
    op.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    op.add_argument("--compile", action="store_true", help="run the op under torch.compile")
    st = sub.add_parser("step", help="one ZeRO-3 training step (student + teacher)")
    st.add_argument("--loss-impl", default="auto", choices=IMPL_CHOICES)
    st.add_argument("--student", default="tiny")
    st.add_argument("--teacher", default="tiny-teacher", help="a preset, a directory or 'none'")
    st.add_argument("--vocab", type=int, default=32000, help="vocabulary of the presets (0: theirs)")
    st.add_argument("--batch", type=int, default=8)
    st.add_argument("--seq", type=int, default=256)
    st.add_argument("--ds", default=None, help="DeepSpeed config (default: ds_configs/zero3.json)")
    for s in (op, st):
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--warmup", type=int, default=1, help="unprofiled calls first")
        s.add_argument("--out", default="prof", help="output folder")
        s.add_argument("--bare", action="store_true",
                       help="no torch.profiler: just the warm-up and one call (under ncu / nsys, "
                            "which cannot share CUPTI with torch.profiler)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.what == "op":
        dev = torch.device(a.device)
        dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        x = make_inputs(rows_case(a.N, a.H, a.V, a.Ht, dtype=dtype), dev)

        def fn():
            return op_step(x, a.impl)
        if a.compile:
            fn = torch.compile(fn)
        title = f"prada_loss impl={a.impl}{' (compiled)' if a.compile else ''}: N={a.N} H={a.H} " \
                f"V={a.V} H_t={a.Ht} {dtype}, forward + backward"
    else:
        from benchmarks.train_step import build_train_step
        step, desc = build_train_step(student=a.student, teacher=a.teacher, vocab=a.vocab,
                                      batch=a.batch, seq=a.seq, loss_impl=a.loss_impl, ds_config=a.ds)
        dev = torch.device(desc["device"])
        fn = step
        title = (f"training step, loss impl={a.loss_impl}: student {a.student}, teacher {a.teacher}, "
                 f"V={desc['vocab']}, {a.batch} x {a.seq} tokens, ZeRO-{desc['zero_stage']}")
    if a.bare:
        for _ in range(a.warmup + 1):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        print(f"ran {a.warmup} + 1 call(s) of: {title}")
    else:
        res = profile(fn, out, dev, title, warmup=a.warmup)
        print(f"wrote {res['trace']} and {res['table']} ({res['wall_s']:.2f} s profiled)")
    if a.what == "step":
        from prada_fast.common import distributed as dist_util
        dist_util.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
