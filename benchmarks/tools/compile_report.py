"""Compile the Triton row kernels for a GPU without having one, and read what the compiler
made of each configuration: registers per thread, spills (local memory), shared memory,
and how wide the global loads are in the machine code. It costs no device time.

    python -m benchmarks.tools.compile_report [--arch 90] [--json out.json]

Triton's ahead-of-time path (ASTSource + a GPUTarget) turns the kernel into PTX and a cubin
with the ptxas it ships; the cuobjdump it ships reads the cubin's resource usage and SASS.
The row kernel is specialised as the trainer launches it: contiguous rows (unit column
stride), pointers, row strides and V divisible by 16 (true for V = 32000, 128256, 151936,
262144; not for 50257, whose rows then start misaligned). Every configuration the
autotuner may pick (kernels/fused_linear_distill.GPU_CONFIGS) is compiled, with and
without a teacher, in bf16 and fp32, and so is the top-K teacher's row kernel
(`_distill_topk_rows_kernel`, K ids in tiles of BLOCK_K = 64: K = 64, a typical cache); so are
the domain term's pooling and head kernels (kernels/domain_head.py) with the block sizes
they get at H = 4096, with and without packed rows (seq_index).

What to look for: LOCAL / STACK 0 (no spills); the loads of z and z_t 16 bytes wide
(LDG.E.128: 8 bf16 or 4 fp32 per thread per load), not 2- or 4-byte ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _row_kernel_module():
    """kernels/fused_linear_distill.py, imported for its JIT function (never launched)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_report: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton < 3.10's default, as on the GPU
    sys.path.insert(0, str(REPO))
    from prada_kernels import fused_linear_distill
    return fused_linear_distill


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def _compile(fn, sig: dict, consts: dict, aligned, *, num_warps: int, arch: int):
    """triton.compile of `fn` for sm_<arch>: `sig` maps every argument to its type
    ("constexpr" for those in `consts`); `aligned` arguments are divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_row_kernel(fld, *, dtype: str, teacher: bool, block_v: int, num_warps: int, arch: int):
    ptr = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    sig = {"z_ptr": ptr, "zt_ptr": ptr, "y_ptr": "*i64", "scale_ptr": "*fp32", "ce_ptr": "*fp32",
           "kd_ptr": "*fp32", "V": "i32", "stride_zr": "i32", "stride_zv": "constexpr",
           "stride_tr": "i32", "stride_tv": "constexpr", "stride_y": "constexpr", "stride_s": "constexpr",
           "inv_tau": "fp32", "tau": "fp32", "alpha": "fp32", "ignore_index": "i32",
           "HAS_TEACHER": "constexpr", "BLOCK_V": "constexpr"}
    consts = {"stride_zv": 1, "stride_tv": 1, "stride_y": 1, "stride_s": 1, "HAS_TEACHER": teacher,
              "BLOCK_V": block_v}
    aligned = ("z_ptr", "zt_ptr", "y_ptr", "scale_ptr", "ce_ptr", "kd_ptr", "V", "stride_zr", "stride_tr")
    return _compile(fld._distill_rows_kernel, sig, consts, aligned, num_warps=num_warps, arch=arch)


def compile_topk_row_kernel(fld, *, dtype: str, block_v: int, block_k: int, num_warps: int, arch: int):
    """The top-K row kernel as the launcher calls it: contiguous z, fresh contiguous ids, q,
    zk and gk (their row stride K need not be a multiple of 16)."""
    ptr = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    sig = {"z_ptr": ptr, "ids_ptr": "*i64", "q_ptr": ptr, "zk_ptr": "*fp32", "gk_ptr": "*fp32",
           "y_ptr": "*i64", "scale_ptr": "*fp32", "ce_ptr": "*fp32", "kd_ptr": "*fp32", "V": "i32",
           "K": "i32", "stride_zr": "i32", "stride_zv": "constexpr", "stride_ir": "i32",
           "stride_ik": "constexpr", "stride_qr": "i32", "stride_qk": "constexpr", "stride_y": "constexpr",
           "stride_s": "constexpr", "inv_tau": "fp32", "tau": "fp32", "alpha": "fp32", "ignore_index": "i32",
           "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"stride_zv": 1, "stride_ik": 1, "stride_qk": 1, "stride_y": 1, "stride_s": 1,
              "BLOCK_V": block_v, "BLOCK_K": block_k}
    aligned = ("z_ptr", "ids_ptr", "q_ptr", "zk_ptr", "gk_ptr", "y_ptr", "scale_ptr", "ce_ptr", "kd_ptr",
               "V", "stride_zr")
    return _compile(fld._distill_topk_rows_kernel, sig, consts, aligned, num_warps=num_warps, arch=arch)


def compile_domain_kernels(*, dtype: str, H: int, D: int, arch: int, confusion: bool = True) -> dict:
    """The pooling and head kernels with the block sizes the launcher picks on a GPU (the
    head with the confusion adversary, whose gradient keeps one more D-vector live), and
    their packed-rows variants (seq_index): the segment pooling and the head with PACKED."""
    import torch

    from prada_kernels import domain_head as gdh

    bt, bh_pool, bh_head, bd = gdh._block_sizes(torch.device("cuda"), 1024, H, D)
    ptr = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    i32, f32 = "i32", "*fp32"
    pool = _compile(gdh._masked_pool_kernel,
                    {"h_ptr": ptr, "m_ptr": f32, "f_ptr": f32, "T": i32, "H": i32, "stride_hb": i32,
                     "stride_ht": i32, "stride_hh": "constexpr", "stride_mb": i32, "stride_mt": "constexpr",
                     "stride_fb": i32, "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"},
                    {"stride_hh": 1, "stride_mt": 1, "BLOCK_T": bt, "BLOCK_H": bh_pool},
                    ("h_ptr", "m_ptr", "f_ptr", "H", "stride_hb", "stride_ht", "stride_fb"),
                    num_warps=4, arch=arch)
    segment_pool = _compile(
        gdh._segment_pool_kernel,
        {"h_ptr": ptr, "b_ptr": "*i32", "t_ptr": "*i32", "w_ptr": f32, "off_ptr": "*i64", "f_ptr": f32,
         "msum_ptr": f32, "H": i32, "stride_hb": i32, "stride_ht": i32, "stride_hh": "constexpr",
         "stride_fb": i32, "BLOCK_P": "constexpr", "BLOCK_H": "constexpr"},
        {"stride_hh": 1, "BLOCK_P": bt, "BLOCK_H": bh_pool},
        ("h_ptr", "b_ptr", "t_ptr", "w_ptr", "off_ptr", "f_ptr", "H", "stride_hb", "stride_ht", "stride_fb"),
        num_warps=4, arch=arch)

    def head(packed: bool):
        return _compile(
            gdh._domain_head_kernel,
            {"f_ptr": f32, "w_ptr": ptr, "bias_ptr": ptr, "lab_ptr": "*i64", "m_ptr": f32, "msum_ptr": f32,
             "loss_ptr": f32, "correct_ptr": f32, "dc_ptr": f32, "gf_ptr": f32, "T": i32, "H": i32,
             "D": i32, "inv_B": "fp32", "adv_lambda": "fp32", "stride_fb": i32, "stride_wd": i32,
             "stride_wh": "constexpr", "stride_bias": "constexpr", "stride_lab": "constexpr",
             "stride_mb": i32, "stride_mt": "constexpr", "stride_dcb": i32, "stride_gfb": i32,
             "HAS_BIAS": "constexpr", "CONFUSION": "constexpr", "PACKED": "constexpr",
             "BLOCK_D": "constexpr", "BLOCK_H": "constexpr", "BLOCK_T": "constexpr"},
            {"stride_wh": 1, "stride_bias": 1, "stride_lab": 1, "stride_mt": 1, "HAS_BIAS": True,
             "CONFUSION": confusion, "PACKED": packed, "BLOCK_D": bd, "BLOCK_H": bh_head, "BLOCK_T": bt},
            ("f_ptr", "w_ptr", "m_ptr", "msum_ptr", "gf_ptr", "H", "stride_fb", "stride_wd", "stride_gfb"),
            num_warps=4, arch=arch)

    return {"pool": (f"BLOCK_T={bt} BLOCK_H={bh_pool}", pool),
            "head": (f"BLOCK_D={bd} BLOCK_H={bh_head}", head(False)),
            "segment pool (packed)": (f"BLOCK_P={bt} BLOCK_H={bh_pool}", segment_pool),
            "head (packed)": (f"BLOCK_D={bd} BLOCK_H={bh_head}", head(True))}


def read_cubin(cubin: bytes) -> dict:
    """Registers, stack, local and shared bytes (cuobjdump --dump-resource-usage) and the
    global loads by width (SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", usage)
        out[key.lower()] = int(m.group(1)) if m else None
    loads = {}
    for m in re.finditer(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", sass):
        mods = m.group(1)
        width = next((w for w in ("128", "64") if f".{w}" in mods), None)
        if width is None:
            width = "16" if (".U16" in mods or ".S16" in mods) else "32"
        loads[width] = loads.get(width, 0) + 1
    out["loads_by_bits"] = dict(sorted(loads.items(), key=lambda kv: -int(kv[0])))
    out["sass_lines"] = sass.count("\n")
    return out


def report(arch: int = 90) -> list[dict]:
    fld = _row_kernel_module()
    rows = []
    for dtype in ("bf16", "fp32"):
        for teacher in (True, False):
            for cfg in fld.GPU_CONFIGS:
                bv, nw = cfg.kwargs["BLOCK_V"], cfg.num_warps
                c = compile_row_kernel(fld, dtype=dtype, teacher=teacher, block_v=bv, num_warps=nw, arch=arch)
                rows.append({"kernel": "_distill_rows_kernel", "dtype": dtype, "teacher": teacher,
                             "config": f"BLOCK_V={bv} warps={nw} ({bv // (32 * nw)} ids/thread)",
                             **read_cubin(c.asm["cubin"])})
        for cfg in fld.GPU_CONFIGS:
            bv, nw = cfg.kwargs["BLOCK_V"], cfg.num_warps
            c = compile_topk_row_kernel(fld, dtype=dtype, block_v=bv, block_k=64, num_warps=nw, arch=arch)
            rows.append({"kernel": "_distill_topk_rows_kernel", "dtype": dtype, "teacher": "top-K",
                         "config": f"BLOCK_V={bv} BLOCK_K=64 warps={nw} ({bv // (32 * nw)} ids/thread)",
                         **read_cubin(c.asm["cubin"])})
        for name, (config, c) in compile_domain_kernels(dtype=dtype, H=4096, D=4, arch=arch).items():
            rows.append({"kernel": f"domain {name} (H=4096, D=4)", "dtype": dtype, "teacher": None,
                         "config": config + " warps=4", **read_cubin(c.asm["cubin"])})
    return rows


def table(rows: list[dict], arch: int) -> str:
    lines = [f"Triton kernels compiled for sm_{arch} (no GPU needed):", "",
             "| kernel | dtype | teacher | config | registers | local B | stack B | shared B "
             "| global loads by width (bits: count) |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        loads = ", ".join(f"{k}: {v}" for k, v in r["loads_by_bits"].items())
        teacher = r["teacher"] if isinstance(r["teacher"], str) else (
            "–" if r["teacher"] is None else ("yes" if r["teacher"] else "no"))
        lines.append(f"| {r['kernel']} | {r['dtype']} | {teacher} | {r['config']} | {r['reg']} "
                     f"| {r['local']} | {r['stack']} | {r['shared']} | {loads} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    rows = report(a.arch)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows, a.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
