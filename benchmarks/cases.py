"""Shared pieces of the benchmark suite: the shape of a case, its inputs, the
implementations under test (ours and the peers), the float64 oracle and the parity check.

Used by the pytest suite (benchmarks/test_*.py, in the pytest process: nothing heavy) and by
the one-case subprocess entry point `python -m benchmarks.tools.run_case` (everything heavy).

Parity follows docs/design.md: relative error ||x - x_ref|| / ||x_ref|| of the loss and of every
gradient against the reference path run in float64 on upcast inputs (the "oracle"); fp32
inputs: loss <= 1e-5, gradients <= 1e-4; bf16: loss <= 1e-2, gradients <= 2e-2; NaN fails.

Peers compute part of our objective; each is compared with the matching piece of the oracle:
- Liger-Kernel's chunked `LigerFusedLinearJSDLoss` (PyTorch, runs on the CPU) with beta = 0
  is the forward KL(p_t || p_s), i.e. our task loss alpha * ce + (1 - alpha) * kd when its
  soft weight is (1 - alpha) * tau^2 (Liger leaves out the tau^2 factor): piece "task".
- Liger's Triton `LigerFusedLinearJSD` with jsd_beta = 0 is KL(p_t || p_s) / n, our kd / tau^2
  (its loss is multiplied by tau^2 here): piece "kd".
- Liger's `LigerFusedLinearCrossEntropyLoss` and Cut Cross-Entropy's `linear_cross_entropy`
  (mean over non-ignored rows) are our ce without teacher and domain head: piece "ce".
None of them has the domain term; ours are compared with "full" = task + dom.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path
from dataclasses import asdict, dataclass, fields, replace

import torch

from prada_fast.common.envinfo import versions
from prada_fast.op.testing import DTYPES, GRAD_NAMES, random_inputs, rel_err, tolerance  # noqa: F401


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One input configuration of the op. N = B * T rows."""
    B: int
    T: int
    H: int
    V: int
    Ht: int = 0            # teacher hidden size; 0: no teacher (unless topk)
    D: int = 4             # domains; 0: no domain head
    dtype: str = "float32"
    bias: bool = False     # student LM-head bias
    ignore_frac: float = 0.0   # fraction of target rows set to ignore_index
    pool_mask: bool = False    # a random 0/1 pooling mask (else all ones)
    packed: bool = False       # several sequences per row (seq_index; with a pool mask, one empty)
    topk: int = 0              # K > 0: the teacher as top-K log-probabilities at tau (Ht = 0)
    tau: float = 1.0
    alpha: float = 0.5
    lam: float = 0.7
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def has_teacher(self) -> bool:
        return bool(self.Ht or self.topk)

    @property
    def id(self) -> str:
        s = f"N{self.N}-H{self.H}-V{self.V}"
        s += f"-Ht{self.Ht}" if self.Ht else (f"-topk{self.topk}" if self.topk else "-noteacher")
        s += "-bf16" if self.dtype == "bfloat16" else ("-fp16" if self.dtype == "float16" else "")
        if self.bias:
            s += "-bias"
        if self.ignore_frac:
            s += f"-ign{self.ignore_frac:g}"
        if self.tau != 1.0:
            s += f"-tau{self.tau:g}"
        if self.packed:
            s += "-packed"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **kw) -> "Case":
        return replace(self, **kw)


def rows_case(N: int, H: int, V: int, Ht: int, dtype: str = "float32", **kw) -> Case:
    """A case of N rows as sequences of (at most) 1024 tokens."""
    T = min(N, 1024)
    while N % T:
        T -= 1
    return Case(B=N // T, T=T, H=H, V=V, Ht=Ht, dtype=dtype, **kw)


def matmul_flops(case: Case, piece: str) -> float:
    """Nominal FLOPs of the LM-head matrix products of one forward + backward over all N
    rows: student logits, grad_h and grad_W (3 x 2NHV) plus the teacher's logits (2NH_tV;
    none for a top-K teacher)."""
    student = 3 * 2.0 * case.N * case.H * case.V
    teacher = 2.0 * case.N * case.Ht * case.V if (case.Ht and piece != "ce") else 0.0
    return student + teacher


# ----------------------------------------------------------------------------- inputs
def make_inputs(case: Case, device: str | torch.device = "cpu") -> dict:
    """Deterministic random inputs (a function of the case and the device type). Leaves with
    a gradient (hidden, lm_weight, lm_bias, domain_weight, domain_bias) require grad."""
    return random_inputs(B=case.B, T=case.T, H=case.H, V=case.V, Ht=case.Ht, D=case.D,
                         dtype=case.dtype, bias=case.bias, ignore_frac=case.ignore_frac,
                         pool_mask=case.pool_mask, seed=case.seed, device=device, packed=case.packed,
                         empty_pool_row=case.packed and case.pool_mask, topk=case.topk, tau=case.tau)


def clear_grads(x: dict) -> None:
    for k in GRAD_NAMES:
        if k in x:
            x[k].grad = None


def grads_of(x: dict, names=GRAD_NAMES) -> dict:
    return {k: x[k].grad for k in names if k in x and x[k].grad is not None}


def _op_kwargs(x: dict, case: Case, *, teacher: bool = True, domain: bool = True,
               alpha: float | None = None, num_valid_tokens=None) -> dict:
    kw = dict(lm_bias=x.get("lm_bias"), temperature=case.tau,
              alpha=case.alpha if alpha is None else alpha, adv_lambda=case.lam,
              num_valid_tokens=num_valid_tokens, pool_mask=x.get("pool_mask"))
    if teacher and "teacher_hidden" in x:
        kw.update(teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"])
    if teacher and "teacher_topk_ids" in x:
        kw.update(teacher_topk_ids=x["teacher_topk_ids"], teacher_topk_logprobs=x["teacher_topk_logprobs"])
    if domain and "domain_weight" in x:
        kw.update(domain_weight=x["domain_weight"], domain_bias=x["domain_bias"],
                  domain_labels=x["domain_labels"], seq_index=x.get("seq_index"))
    return kw


# ----------------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Impl:
    name: str
    kind: str       # "ours" | "peer"
    piece: str      # the oracle piece it computes: "full" | "task" | "ce" | "kd"
    doc: str


IMPLS = {
    "reference": Impl("reference", "ours", "full",
                      "prada_loss(impl='reference'), eager: materialises the logits"),
    "reference_compiled": Impl("reference_compiled", "ours", "full",
                               "prada_loss(impl='reference') under torch.compile (inductor)"),
    "chunked": Impl("chunked", "ours", "full", "prada_loss(impl='chunked'): PyTorch row chunks, never N x V"),
    "triton": Impl("triton", "ours", "full", "prada_loss(impl='triton'): Triton row kernel + cuBLAS"),
    "liger_jsd_chunked": Impl("liger_jsd_chunked", "peer", "task",
                              "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0), compiled"),
    "liger_jsd": Impl("liger_jsd", "peer", "kd",
                      "liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta=0), Triton"),
    "liger_flce": Impl("liger_flce", "peer", "ce",
                       "liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss, Triton"),
    "cce": Impl("cce", "peer", "ce", "cut_cross_entropy.linear_cross_entropy (CUDA only)"),
}
TRITON_IMPLS = ("triton", "liger_jsd", "liger_flce")


def _module_available(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(impl: str, case: Case, device: str, *, mode: str) -> str | None:
    """Why `impl` cannot run `case` on `device` in `mode` ("speed" or "parity"); None: it can."""
    info = IMPLS[impl]
    dev = torch.device(device).type
    if info.piece in ("task", "kd") and not case.Ht:
        return f"{impl} needs a teacher (hidden states + head)"
    if info.kind == "peer" and case.topk:
        return "a top-K teacher (cached log-probabilities): no peer here takes one"
    if impl in TRITON_IMPLS:
        if not _module_available("triton"):
            return "triton is not installed"
        if dev != "cuda" and mode == "speed":
            return ("Triton runs on the CPU only under TRITON_INTERPRET=1 (an interpreter, orders "
                    "of magnitude slower): no meaningful timing; its parity is checked in the parity cases")
    if impl.startswith("liger") and not _module_available("liger_kernel"):
        return "liger-kernel is not installed (pip install liger-kernel)"
    if impl in ("liger_jsd",) and case.bias:
        return "LigerFusedLinearJSD takes no LM-head bias"
    if impl == "cce" and case.bias:
        return "cut_cross_entropy.linear_cross_entropy takes no LM-head bias"
    if info.kind == "peer" and case.ignore_frac >= 1.0:
        return "every target ignored: a peer's mean over 0 rows is not defined"
    if info.kind == "peer" and case.packed:
        return "packed rows change only the domain term, which a peer does not compute"
    if impl == "liger_jsd_chunked" and case.dtype != "float32" and dev != "cuda" and mode == "speed":
        return "Liger's chunked loss on CPU: bf16 products are slow there; fp32 only"
    if impl == "cce":
        if dev != "cuda":
            return "Cut Cross-Entropy needs CUDA (its kernels are Triton/CUDA only)"
        if not _module_available("cut_cross_entropy"):
            return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if impl == "reference_compiled" and dev == "cpu" and mode == "speed" and os.environ.get(
            "PRADA_BENCH_NO_COMPILE") == "1":
        return "PRADA_BENCH_NO_COMPILE=1"
    return None


def build_step(impl: str, case: Case, chunk_rows: int | None = None):
    """A function step(x) -> loss that runs forward + backward of `impl` on the inputs x
    (gradients land in x[...].grad). Built once per process (compiled variants compile on
    their first call). chunk_rows: for "chunked" and "triton" (None: their default)."""
    from prada_fast import prada_loss

    if impl in ("reference", "chunked", "triton", "reference_compiled"):
        name = "reference" if impl == "reference_compiled" else impl
        extra = {"chunk_rows": chunk_rows} if impl in ("chunked", "triton") else {}
        fn = functools.partial(prada_loss, impl=name, **extra)
        if impl == "reference_compiled":
            fn = torch.compile(fn, dynamic=False)

        def step(x):
            loss, _ = fn(x["hidden"], x["lm_weight"], x["targets"], **_op_kwargs(x, case))
            loss.backward()
            return loss
        return step

    N, H = case.N, case.H
    tau2 = case.tau ** 2
    if impl == "liger_jsd_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        # beta = 0: forward KL(p_t || p_s); soft weight (1 - alpha) tau^2 (Liger has no tau^2)
        mod = LigerFusedLinearJSDLoss(weight_hard_loss=case.alpha,
                                      weight_soft_loss=(1 - case.alpha) * tau2, beta=0.0,
                                      ignore_index=-100, temperature=case.tau, compiled=True,
                                      chunk_size=1024)

        def step(x):
            loss = mod(x["hidden"].view(N, H), x["lm_weight"],
                       x["teacher_hidden"].view(N, case.Ht), x["teacher_weight"],
                       x["targets"].view(N), x.get("lm_bias"))
            loss.backward()
            return loss
        return step
    if impl == "liger_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD
        mod = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=case.tau)

        def step(x):
            loss = mod(x["hidden"].view(N, H), x["lm_weight"], x["teacher_hidden"].view(N, case.Ht),
                       x["teacher_weight"], x["targets"].view(N))
            if tau2 != 1.0:
                loss = loss * tau2
            loss.backward()
            return loss
        return step
    if impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

        def step(x):
            loss = mod(x["lm_weight"], x["hidden"].view(N, H), x["targets"].view(N), x.get("lm_bias"))
            loss.backward()
            return loss
        return step
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step(x):
            loss = linear_cross_entropy(x["hidden"].view(N, H), x["lm_weight"], x["targets"].view(N),
                                        ignore_index=-100, reduction="mean")
            loss.backward()
            return loss
        return step
    raise ValueError(f"unknown impl {impl!r}: expected one of {list(IMPLS)}")


def grad_names_of(impl: str) -> tuple:
    """The gradients an implementation produces (the peers have no domain head)."""
    return GRAD_NAMES if IMPLS[impl].kind == "ours" else ("hidden", "lm_weight", "lm_bias")


# ----------------------------------------------------------------------------- oracle
def oracle(x: dict, case: Case, pieces=("task", "dom"), block_elems: int | None = None,
           grads_to: tuple | None = None) -> dict:
    """The reference path in float64 on upcast inputs, split into pieces: "task"
    (alpha * ce + (1 - alpha) * kd), "ce" (no teacher), "kd" (alpha = 0), "dom" (the domain
    term through the GRL). The task pieces run over blocks of rows with the normaliser n of
    the whole batch (as under gradient accumulation), so the float64 logits never exceed
    `block_elems` elements per buffer. Returns {piece: {"loss": float, "grads": {name: t}}};
    `grads_to` (e.g. (torch.float32, "cpu")) moves each piece's gradients as soon as it is done,
    so that big cases do not hold several pieces' float64 gradients on the device."""
    from prada_fast import prada_loss

    f64 = {k: (v.detach().to(torch.float64) if v.is_floating_point() else v) for k, v in x.items()}
    if block_elems is None:  # float64 logits per block: 128 MiB on a CPU, 512 MiB on a GPU
        block_elems = 1 << (26 if f64["hidden"].is_cuda else 24)
    B, T, H = f64["hidden"].shape
    N = B * T
    y = f64["targets"].reshape(N)
    n_valid = int((y != -100).sum())
    out = {}
    for piece in pieces:
        if piece == "dom":
            if "domain_weight" not in f64:
                continue
            h = f64["hidden"].detach().requires_grad_()  # fresh leaves over the float64 copies
            wd = f64["domain_weight"].detach().requires_grad_()
            bd = f64["domain_bias"].detach().requires_grad_()
            # a one-id vocabulary and every target ignored: the task term is exactly 0
            loss, _ = prada_loss(h, h.new_zeros(1, H), torch.full_like(f64["targets"], -100),
                                 pool_mask=f64.get("pool_mask"), domain_weight=wd, domain_bias=bd,
                                 domain_labels=f64["domain_labels"], seq_index=f64.get("seq_index"),
                                 adv_lambda=case.lam, impl="reference")
            loss.backward()
            out[piece] = {"loss": loss.item(), "grads": {"hidden": h.grad, "domain_weight": wd.grad,
                                                         "domain_bias": bd.grad}}
            _move_grads(out[piece], grads_to)
            continue
        teacher = piece in ("task", "kd")
        topk = "teacher_topk_ids" in f64
        if teacher and "teacher_hidden" not in f64 and not topk:
            continue
        alpha = {"task": case.alpha, "ce": 1.0, "kd": 0.0}[piece]
        h = f64["hidden"].reshape(N, H).detach().requires_grad_()
        w = f64["lm_weight"].detach().requires_grad_()
        b = f64["lm_bias"].detach().requires_grad_() if "lm_bias" in f64 else None
        u = f64["teacher_hidden"].reshape(N, -1) if teacher and not topk else None
        if teacher and topk:
            ids, lp = (f64[k].reshape(N, -1) for k in ("teacher_topk_ids", "teacher_topk_logprobs"))
        rows = max(1, block_elems // case.V)
        total = 0.0
        for s in range(0, N, rows):
            e = min(s + rows, N)
            tk = {}
            if teacher and topk:
                tk = dict(teacher_topk_ids=ids[s:e].unsqueeze(0), teacher_topk_logprobs=lp[s:e].unsqueeze(0))
            elif teacher:
                tk = dict(teacher_hidden=u[s:e].unsqueeze(0), teacher_weight=f64["teacher_weight"])
            loss, _ = prada_loss(h[s:e].unsqueeze(0), w, y[s:e].unsqueeze(0), lm_bias=b, **tk,
                                 temperature=case.tau, alpha=alpha, num_valid_tokens=n_valid,
                                 impl="reference")
            loss.backward()
            total += loss.item()
        grads = {"hidden": h.grad.reshape(B, T, H), "lm_weight": w.grad}
        if b is not None:
            grads["lm_bias"] = b.grad
        out[piece] = {"loss": total, "grads": grads}
        _move_grads(out[piece], grads_to)
        del h, w, b, grads
    return out


def _move_grads(piece: dict, to: tuple | None) -> None:
    if to is not None:
        piece["grads"] = {k: g.to(to[1]).to(to[0]) for k, g in piece["grads"].items()}


def expected(orc: dict, piece: str) -> dict:
    """The oracle's loss and gradients for an implementation computing `piece`."""
    if piece != "full":
        return orc[piece]
    task, dom = orc["task"] if "task" in orc else orc["ce"], orc.get("dom")
    if dom is None:
        return task
    grads = dict(task["grads"])
    grads["hidden"] = grads["hidden"] + dom["grads"]["hidden"].to(grads["hidden"].dtype)
    grads["domain_weight"] = dom["grads"]["domain_weight"]
    grads["domain_bias"] = dom["grads"]["domain_bias"]
    return {"loss": task["loss"] + dom["loss"], "grads": grads}


def oracle_pieces(case: Case, impls) -> tuple:
    """The oracle pieces needed to check `impls` on `case`."""
    need = set()
    for name in impls:
        p = IMPLS[name].piece
        if p == "full":
            task = "task" if case.has_teacher else "ce"
            need.update([task, "dom"] if case.D else [task])
        else:
            need.add(p)
    order = ("task", "ce", "kd", "dom")
    return tuple(p for p in order if p in need)


def parity_errors(loss, grads: dict, exp: dict, names) -> dict:
    """Relative errors of the loss and of each expected gradient; a missing gradient is NaN."""
    errs = {"loss": rel_err(loss, exp["loss"])}
    for k in names:
        if k in exp["grads"]:
            g = grads.get(k)
            errs[k] = rel_err(g, exp["grads"][k]) if g is not None else math.nan
    return errs


def check_errors(errs: dict, dtype: str) -> list[str]:
    """Failures against docs/design.md's tolerances (NaN fails)."""
    bad = []
    for k, e in errs.items():
        t = tolerance(dtype, "loss" if k == "loss" else "grad")
        e = float(e)  # "nan" from JSON too
        if not (e <= t):
            bad.append(f"{k}: relative error {e:.3g} > {t:.0e}")
    return bad


# ----------------------------------------------------------------------------- machine
def device_seconds(fn, device: torch.device) -> float:
    """Seconds of one fn() on the device: CUDA events around it, else the host clock."""
    import time
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    fn()
    t1.record()
    t1.synchronize()
    return t0.elapsed_time(t1) / 1e3


def gemm_ceiling(device: str = "cpu", dtype: str = "float32", shape=None) -> dict:
    """Achieved TFLOP/s of a plain matrix product (m, k) @ (k, n) in `dtype` on `device`, on
    random data: the ceiling that the op's matrix products are compared with. CUDA: median
    of 30 products timed with events after ~1 s of warm-up (8192^3 unless `shape`); CPU: best of 3
    by the host clock (an LM-head-shaped 1024 x 512 x 32000)."""
    import time
    dev = torch.device(device)
    dt = DTYPES[dtype]
    on_gpu = dev.type == "cuda"
    m, k, n = shape or ((8192, 8192, 8192) if on_gpu else (1024, 512, 32000))
    a = torch.randn(m, k, device=dev).to(dt)
    b = torch.randn(k, n, device=dev).to(dt)
    flops = 2.0 * m * k * n
    if on_gpu:
        t_end = time.perf_counter() + 1.0  # about a second of products first: clocks ramp up
        while time.perf_counter() < t_end:
            a @ b
            torch.cuda.synchronize(dev)
        sec = statistics.median(device_seconds(lambda: a @ b, dev) for _ in range(30))
    else:
        a @ b  # warm-up
        sec = min(device_seconds(lambda: a @ b, dev) for _ in range(3))
    return {"tflops": flops / sec / 1e12, "shape": [m, k, n], "dtype": dtype, "device": dev.type}


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 31) -> dict:
    """Device-memory bandwidth of a large copy, counting bytes read plus bytes written
    (median of 20, CUDA events): the ceiling of the memory-bound row kernel."""
    dev = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sec = statistics.median(device_seconds(lambda: dst.copy_(src), dev) for _ in range(20))
    return {"tb_per_s": 2 * nbytes / sec / 1e12, "bytes": nbytes, "device": dev.type}


def _jsonable(obj):
    """JSON-safe copy: non-finite floats become strings ("nan", "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def emit_result(res: dict, path: str | None) -> None:
    """A case's result, with the versions, as JSON: to `path`, or to stdout."""
    text = json.dumps(_jsonable({**res, "versions": versions()}), indent=1)
    if path:
        Path(path).write_text(text)
    else:
        print(text)
