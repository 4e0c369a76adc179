"""Run one benchmark case in this (fresh) process and write its measurements as JSON.

    python -m benchmarks.tools.run_case op --impl chunked --N 4096 --H 512 --V 32000 --Ht 512 \
        [--oracle ORACLE.pt] [--warmup 1] [--repeats 3] [--json out.json]
    python -m benchmarks.tools.run_case oracle --N ... --out ORACLE.pt [--pieces task,dom]
    python -m benchmarks.tools.run_case parity --impl triton --cases CASES.json --json out.json
    python -m benchmarks.tools.run_case ceiling [--dtype bfloat16]

`op`: forward + backward of one implementation, `warmup` untimed calls (compilation
happens there), then `repeats` timed calls: wall time of each. Peak memory above the state
before the calls (inputs present, gradients cleared, so the gradients count): on CUDA
`torch.cuda.max_memory_allocated` minus `memory_allocated` over the timed calls; on the CPU
the growth of the process's resident set over one more, untimed call, read from
/proc/self/status (VmHWM, reset through /proc/self/clear_refs, minus VmRSS) with glibc
switched to exact mode first (every block >= 64 KiB its own mmap, unmapped when freed), so
that the resident set follows the live allocations instead of whatever the allocator kept
from earlier calls (the timed calls run with glibc's defaults). With --oracle the outputs
of the last call are compared with the float64 oracle (relative errors, docs/design.md).

`oracle`: the float64 reference of a case (benchmarks.cases.oracle), saved for the `op`
runs of every implementation of that case (gradients stored in fp32: rounding 6e-8 <<
tolerances).

`ceiling`: TFLOP/s of a plain matrix product on the device (benchmarks.cases.gemm_ceiling).

`rows`: the row op alone on one chunk of logits (--C rows x --V, --dtype, with a teacher
unless --Ht 0): median time of the Triton kernel (autotuned; its choice is reported) and of
the PyTorch twin, and the bandwidth that means: the kernel reads z and z_t twice and writes
dL/dz once, 5 C V elements (3 without a teacher). Timed with CUDA events (the host clock
on a CPU, where the kernel is interpreted: plumbing only).

`parity`: for each case in the list, the oracle and one call of the implementation, in
this process (small shapes); the Triton implementations need TRITON_INTERPRET=1 on a CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.cases import (
    IMPLS,
    Case,
    build_step,
    clear_grads,
    device_seconds,
    emit_result,
    expected,
    gemm_ceiling,
    grad_names_of,
    grads_of,
    make_inputs,
    matmul_flops,
    oracle,
    oracle_pieces,
    parity_errors,
    rows_case,
)


# ----------------------------------------------------------------------------- memory probes
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def hwm_bytes() -> int | None:
    v = _status_bytes("VmHWM")
    if v is None:  # no /proc: the lifetime peak (no reset possible)
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v = kb * (1 if sys.platform == "darwin" else 1024)
    return v


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def malloc_exact() -> bool:
    """glibc: serve every block of 64 KiB or more with its own mmap and unmap it when freed
    (a fixed mmap threshold, and trimming at 64 KiB), so that the resident set follows the
    live allocations: what the memory call measures. False where mallopt is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD
        ok &= libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def measure_cpu_peak(fn):
    """(result of fn(), peak resident-set growth during it, how it was measured), after
    switching glibc to exact mode (malloc_exact) and resetting the high-water mark."""
    gc.collect()
    exact = malloc_exact()
    if not exact:
        malloc_trim()
    reset = reset_peak_rss()
    base = rss_bytes() or 0
    out = fn()
    peak = hwm_bytes() - base
    how = "VmHWM - VmRSS around one extra call"
    how += ", glibc exact mode (mmap >= 64 KiB, trim)" if exact else ""
    how += "" if reset else " [VmHWM not resettable: lifetime peak]"
    return out, peak, how


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- modes
def run_op(impl: str, case: Case, device: str, *, warmup: int, repeats: int,
           oracle_path: str | None, chunk_rows: int | None = None) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    x = make_inputs(case, dev)
    step = build_step(impl, case, chunk_rows)
    _sync(dev)
    warm = []
    for _ in range(warmup):
        clear_grads(x)
        t0 = time.perf_counter()
        step(x)
        _sync(dev)
        warm.append(time.perf_counter() - t0)
    clear_grads(x)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = []
    loss = None
    for _ in range(repeats):
        clear_grads(x)  # the previous call's gradients go before the next call starts
        loss = None
        t0 = time.perf_counter()
        loss = step(x)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        method = "cuda max_memory_allocated - memory_allocated before the timed calls"
    else:  # one more call, untimed, for the memory (glibc in exact mode)
        clear_grads(x)
        loss = None

        def call():
            return step(x)
        loss, peak, method = measure_cpu_peak(call)
        base = None
    res = {
        "mode": "op", "impl": impl, "case": case.to_dict(), "case_id": case.id,
        "device": dev.type, "piece": IMPLS[impl].piece,
        "warmup_s": warm, "times_s": times, "median_s": statistics.median(times),
        "peak_extra_bytes": int(peak), "mem_method": method,
        "flops": matmul_flops(case, IMPLS[impl].piece), "threads": torch.get_num_threads(),
        "loss": float(loss.detach().float()) if loss is not None else None,
        "chunk_rows": chunk_rows,
    }
    if impl == "triton" and dev.type == "cuda":
        from prada_fast.op.driver import accumulate_path
        from prada_kernels import fused_linear_distill as fld
        res["row_kernel_configs"] = fld.autotuned_choices()
        res["fp32_accumulation"] = accumulate_path(dev.type)  # used when grad_W needs > 16 chunks
    res["tflops"] = res["flops"] / res["median_s"] / 1e12
    if oracle_path:
        # memory-mapped: only the pieces this implementation is compared with are read
        orc = torch.load(oracle_path, map_location="cpu", mmap=True, weights_only=True)
        exp = expected(orc, IMPLS[impl].piece)
        res["errors"] = parity_errors(loss, grads_of(x), exp, grad_names_of(impl))
    return res


def run_rows(C: int, V: int, dtype: str, teacher: bool, device: str, repeats: int = 20) -> dict:
    from benchmarks.cases import DTYPES
    from prada_fast.op.torch_backend import torch_rows
    from prada_kernels import fused_linear_distill as fld

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    dt = DTYPES[dtype]
    z0 = (torch.randn(C, V, generator=g, device=dev) * 3).to(dt)
    zt0 = (torch.randn(C, V, generator=g, device=dev) * 3).to(dt) if teacher else None
    y = torch.randint(0, V, (C,), generator=g, device=dev)
    scale = torch.full((C,), 1.0 / C, device=dev)
    opts = dict(temperature=1.0, alpha=0.5, ignore_index=-100)
    n_bytes = (5 if teacher else 3) * C * V * z0.element_size()
    out = {"mode": "rows", "C": C, "V": V, "dtype": dtype, "teacher": teacher, "bytes": n_bytes}
    for name, fn in (("triton", fld.triton_rows), ("torch", torch_rows)):
        z, zt = z0.clone(), (zt0.clone() if teacher else None)
        ws: dict = {}
        times = []
        for i in range(repeats + 2):  # two warm-ups (the first autotunes)
            z.copy_(z0)
            if teacher:
                zt.copy_(zt0)  # torch_rows uses z_t as scratch
            sec = device_seconds(functools.partial(fn, z, zt, y, scale, workspace=ws, **opts), dev)
            if i >= 2:
                times.append(sec)
        med = statistics.median(times)
        out[name] = {"median_s": med, "tb_per_s": n_bytes / med / 1e12}
    out["triton"]["configs"] = fld.autotuned_choices()
    return out


def run_oracle(case: Case, device: str, pieces, out: str) -> dict:
    dev = torch.device(device)
    x = make_inputs(case, dev)
    t0 = time.perf_counter()
    orc = oracle(x, case, pieces, grads_to=(torch.float32, "cpu"))
    tmp = f"{out}.partial"  # a run killed mid-save leaves no truncated oracle behind
    torch.save(orc, tmp)
    os.replace(tmp, out)
    return {"mode": "oracle", "case_id": case.id, "pieces": list(orc), "seconds": time.perf_counter() - t0}


def run_parity(impl: str, cases: list[Case], device: str) -> dict:
    dev = torch.device(device)
    rows = []
    for case in cases:
        x = make_inputs(case, dev)
        orc = oracle(x, case, oracle_pieces(case, [impl]))
        step = build_step(impl, case)
        t0 = time.perf_counter()
        loss = step(x)
        _sync(dev)
        errs = parity_errors(loss, grads_of(x), expected(orc, IMPLS[impl].piece), grad_names_of(impl))
        rows.append({"case_id": case.id, "case": case.to_dict(), "errors": errs,
                     "seconds": time.perf_counter() - t0})
    return {"mode": "parity", "impl": impl, "device": dev.type, "results": rows,
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}


# ----------------------------------------------------------------------------- CLI
def _case_from_args(a) -> Case:
    if a.case:
        return Case.from_dict(json.loads(a.case))
    if not (a.N and a.H and a.V):
        raise SystemExit("give --case JSON or --N, --H and --V")
    if a.topk and a.Ht:
        raise SystemExit("give the teacher as --Ht (hidden states + head) or as --topk, not both")
    return rows_case(a.N, a.H, a.V, a.Ht, a.dtype, D=a.D, tau=a.tau, alpha=a.alpha,
                     ignore_frac=a.ignore_frac, bias=a.bias, topk=a.topk)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.run_case", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("op", "oracle", "parity", "ceiling", "rows"))
    p.add_argument("--impl", choices=list(IMPLS), default="chunked")
    p.add_argument("--case", help="the case as JSON (benchmarks.cases.Case fields)")
    p.add_argument("--cases", help="parity: a JSON file with a list of cases")
    p.add_argument("--N", type=int)
    p.add_argument("--C", type=int, default=2048, help="rows: rows of the chunk")
    p.add_argument("--H", type=int)
    p.add_argument("--V", type=int)
    p.add_argument("--Ht", type=int, default=0, help="teacher hidden size (0: no teacher)")
    p.add_argument("--topk", type=int, default=0,
                   help="op, oracle: the teacher as its top-K log-probabilities at --tau (with --Ht 0)")
    p.add_argument("--D", type=int, default=4, help="domains (0: no domain head)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ignore-frac", type=float, default=0.0)
    p.add_argument("--bias", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls (default: op 3, rows 20)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="op: rows per chunk of chunked/triton (default: theirs)")
    p.add_argument("--oracle", help="op: the oracle file to check parity against")
    p.add_argument("--pieces", default="", help="oracle: comma-separated pieces (default: what "
                                                "every implementation needs)")
    p.add_argument("--out", help="oracle: where to save it")
    p.add_argument("--json", help="write the result here (default: stdout)")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    repeats = a.repeats if a.repeats is not None else (20 if a.mode == "rows" else 3)
    if a.mode == "op":
        case = _case_from_args(a)
        try:
            res = run_op(a.impl, case, a.device, warmup=a.warmup, repeats=repeats,
                         oracle_path=a.oracle, chunk_rows=a.chunk_rows)
        except torch.OutOfMemoryError as e:  # CUDA: recorded, not a crash
            res = {"mode": "op", "impl": a.impl, "case": case.to_dict(), "case_id": case.id,
                   "device": a.device, "oom": True, "error": str(e)[:500]}
    elif a.mode == "ceiling":
        res = {"mode": "ceiling", **gemm_ceiling(a.device, a.dtype)}
    elif a.mode == "rows":
        res = run_rows(a.C, a.V, a.dtype, bool(a.Ht), a.device, repeats=repeats)
    elif a.mode == "oracle":
        case = _case_from_args(a)
        pieces = tuple(s for s in a.pieces.split(",") if s) or oracle_pieces(case, list(IMPLS))
        res = run_oracle(case, a.device, pieces, a.out or f"oracle-{case.id}.pt")
    else:
        cases = [Case.from_dict(d) for d in json.loads(Path(a.cases).read_text())] if a.cases \
            else [_case_from_args(a)]
        res = run_parity(a.impl, cases, a.device)
    res["wall_s"] = time.perf_counter() - t0
    emit_result(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
