"""Fused linear + distillation loss (PRADA's task term) with Triton row kernels.

This file is the row op of the never-materialise chunk driver (`prada_fast.op.driver`):
rows of the flattened batch go through in bounded chunks; for each chunk the student
logits z = h W_s^T + b_s (and the teacher's z_t) are one cuBLAS product each, and
`_distill_rows_kernel` turns them into the per-row losses and overwrites z with dL/dz,
which two more products turn into grad_h and grad_W_s (Liger-Kernel's scheme). The domain
term is the other kernel file, `domain_head.py`; `prada_fast.op` plugs both into the
driver (impl="triton").

Per row (one program), the kernel walks the vocabulary in BLOCK_V tiles twice:
  pass 1 (online max / sum-exp): lse(z), lse(z / tau) (sharing max z, as tau > 0) and
      lse(z_t / tau); ce = lse(z) - z[y];
  pass 2: kd = tau^2 * KL(p_t || p_s^tau) and, in place over z,
      dL/dz = scale * (alpha * (softmax(z) - onehot(y)) + (1 - alpha) * tau * (softmax(z / tau) - p_t)).
Ignored rows skip pass 1 and get ce = kd = 0 and dL/dz = 0. Inputs may be fp32, fp16 or
bf16; the math is fp32 and dL/dz is stored in z's dtype.

On a machine without a GPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported); the trainer uses impl="chunked" there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .runtime import check_device


@triton.jit
def _distill_rows_kernel(
    z_ptr, zt_ptr, y_ptr, scale_ptr, ce_ptr, kd_ptr,
    V,
    stride_zr, stride_zv, stride_tr, stride_tv, stride_y, stride_s,
    inv_tau, tau, alpha, ignore_index,
    HAS_TEACHER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: C * V may pass 2^31
    z_row = z_ptr + row * stride_zr
    zt_row = zt_ptr + row * stride_tr
    y = tl.load(y_ptr + row * stride_y)
    valid = y != ignore_index
    n_cols = tl.where(valid, V, 0)  # ignored rows skip the two passes over the vocabulary
    # z[y] is read before pass 1: pass 2 overwrites z in place, and without a teacher it has no
    # block-wide reduction (barrier) that would order this read before other warps' stores.
    yc = tl.where(valid, y, 0)
    z_y = tl.load(z_row + yc * stride_zv, mask=valid, other=0.0).to(tl.float32)

    # Pass 1: online max and sum-exp of z, z / tau (same max) and z_t / tau.
    m = float("-inf")
    s = 0.0
    s_tau = 0.0
    m_t = float("-inf")
    s_t = 0.0
    for v0 in range(0, n_cols, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        msk = offs < V
        z = tl.load(z_row + offs * stride_zv, mask=msk, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        s_tau = s_tau * tl.exp((m - m_new) * inv_tau) + tl.sum(tl.exp((z - m_new) * inv_tau), axis=0)
        m = m_new
        if HAS_TEACHER:
            zt = tl.load(zt_row + offs * stride_tv, mask=msk, other=float("-inf")).to(tl.float32)
            zt = zt * inv_tau
            m_t_new = tl.maximum(m_t, tl.max(zt, axis=0))
            s_t = s_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(zt - m_t_new), axis=0)
            m_t = m_t_new
    # On a valid row s >= 1 (the max term is exp(0)); ignored rows take log(1), never log(0).
    lse = m + tl.log(tl.where(valid, s, 1.0))
    lse_tau = m * inv_tau + tl.log(tl.where(valid, s_tau, 1.0))
    if HAS_TEACHER:
        lse_t = m_t + tl.log(tl.where(valid, s_t, 1.0))

    w = tl.load(scale_ptr + row * stride_s).to(tl.float32)
    g_ce = w * alpha
    g_kd = w * (1.0 - alpha) * tau

    # Pass 2: kd and dL/dz, written over z.
    kd_acc = 0.0
    for v0 in range(0, n_cols, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        msk = offs < V
        z = tl.load(z_row + offs * stride_zv, mask=msk, other=0.0).to(tl.float32)
        grad = g_ce * (tl.exp(z - lse) - (offs == yc).to(tl.float32))
        if HAS_TEACHER:
            log_pt = tl.load(zt_row + offs * stride_tv, mask=msk, other=0.0).to(tl.float32) * inv_tau
            log_pt = log_pt - lse_t
            p_t = tl.exp(log_pt)
            log_ps = z * inv_tau - lse_tau
            # p_t == 0 (a -inf teacher logit) adds 0, not 0 * -inf; a NaN still propagates.
            kd_acc += tl.sum(tl.where(msk & (p_t != 0.0), p_t * (log_pt - log_ps), 0.0), axis=0)
            grad += g_kd * (tl.exp(log_ps) - p_t)
        tl.store(z_row + offs * stride_zv, grad.to(z_ptr.dtype.element_ty), mask=msk)
    # Ignored rows: dL/dz = 0 (this loop is empty on valid rows).
    for v0 in range(0, V - n_cols, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        zeros = tl.zeros((BLOCK_V,), dtype=z_ptr.dtype.element_ty)
        tl.store(z_row + offs * stride_zv, zeros, mask=offs < V)

    tl.store(ce_ptr + row, tl.where(valid, lse - z_y, 0.0))
    tl.store(kd_ptr + row, tl.where(valid, tau * tau * kd_acc, 0.0))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan: (u - 1) * x / log(u) with u = exp(x) as
    rounded, a few ulps); -1 where exp(x) underflows."""
    u = tl.exp(x)
    safe = tl.where((u == 1.0) | (u == 0.0), 2.0, u)  # no 0 / 0 in the lanes not taken
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (safe - 1.0) * x / tl.log(safe)))


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)), -inf when both are (no -inf - -inf)."""
    m = tl.maximum(a, b)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _distill_topk_rows_kernel(
    z_ptr, ids_ptr, q_ptr, zk_ptr, gk_ptr, y_ptr, scale_ptr, ce_ptr, kd_ptr,
    V, K,
    stride_zr, stride_zv, stride_ir, stride_ik, stride_qr, stride_qk, stride_y, stride_s,
    inv_tau, tau, alpha, ignore_index,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The row op with a top-K teacher. The launcher has read the student's logits at the K
    ids into zk (fp32) and set z to -inf there, so the passes over z see the ids outside the K
    alone (their own max: r_s = exp(lse_out - lse) never comes from 1 - sum). The K ids' dL/dz
    goes to gk (fp32), which the launcher writes back over z at the ids."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zr
    ids_row = ids_ptr + row * stride_ir
    q_row = q_ptr + row * stride_qr
    zk_row = zk_ptr + row * K
    gk_row = gk_ptr + row * K
    y = tl.load(y_ptr + row * stride_y)
    valid = y != ignore_index
    yc = tl.where(valid, y, 0)
    n_cols = tl.where(valid, V, 0)
    n_k = tl.where(valid, K, 0)

    # The K ids: online max / sum-exp of zk (at 1 and at tau) and of q; z[y] if y is one of them.
    m_in = float("-inf")
    s_in = 0.0
    s_in_tau = 0.0
    m_q = tl.full([], float("-inf"), tl.float64)  # the teacher's sums in fp64: r_t = 1 - sum p_t is
    s_q = tl.full([], 0.0, tl.float64)            # tiny when the K hold nearly all the mass
    y_in = 0.0
    z_y_in = 0.0
    for k0 in range(0, n_k, BLOCK_K):
        ko = k0 + tl.arange(0, BLOCK_K)
        km = ko < K
        ids = tl.load(ids_row + ko * stride_ik, mask=km, other=-1)
        zk = tl.load(zk_row + ko, mask=km, other=float("-inf"))
        q = tl.load(q_row + ko * stride_qk, mask=km, other=float("-inf")).to(tl.float64)
        m_new = tl.maximum(m_in, tl.max(zk, axis=0))  # finite: a tile holds >= 1 id
        s_in = s_in * tl.exp(m_in - m_new) + tl.sum(tl.exp(zk - m_new), axis=0)
        s_in_tau = (s_in_tau * tl.exp((m_in - m_new) * inv_tau)
                    + tl.sum(tl.exp((zk - m_new) * inv_tau), axis=0))
        m_in = m_new
        mq_new = tl.maximum(m_q, tl.max(q, axis=0))
        mq_safe = tl.where(mq_new == float("-inf"), 0.0, mq_new)  # every q = -inf so far
        s_q = s_q * tl.exp(m_q - mq_safe) + tl.sum(tl.exp(q - mq_safe), axis=0)
        m_q = mq_new
        hit = km & (ids == yc)
        y_in += tl.sum(hit.to(tl.float32), axis=0)
        z_y_in += tl.sum(tl.where(hit, zk, 0.0), axis=0)
    m_in = tl.where(valid, m_in, 0.0)  # ignored rows: finite, unused values below (no log(0))
    # z[y] outside the K is still in z (inside it is -inf there: zk has it)
    z_y = tl.load(z_row + yc * stride_zv, mask=valid & (y_in == 0.0), other=0.0).to(tl.float32)
    z_y = tl.where(y_in > 0.0, z_y_in, z_y)

    # Pass 1 over the ids outside the K (z = -inf at the K; all of them at K = V).
    m = float("-inf")
    s = 0.0
    s_tau = 0.0
    for v0 in range(0, n_cols, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs * stride_zv, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit seen yet
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        s_tau = s_tau * tl.exp((m - m_safe) * inv_tau) + tl.sum(tl.exp((z - m_safe) * inv_tau), axis=0)
        m = m_new
    has_out = s > 0.0  # >= 1 where an id outside the K has a finite logit
    m_o = tl.where(has_out, m, 0.0)
    lse_out = tl.where(has_out, m_o + tl.log(tl.where(has_out, s, 1.0)), float("-inf"))
    lse_out_tau = tl.where(has_out, m_o * inv_tau + tl.log(tl.where(has_out, s_tau, 1.0)), float("-inf"))
    lse_in = m_in + tl.log(tl.where(valid, s_in, 1.0))
    lse_in_tau = m_in * inv_tau + tl.log(tl.where(valid, s_in_tau, 1.0))
    lse = tl.where(has_out, _logaddexp(lse_out, lse_in), lse_in)
    lse_tau = tl.where(has_out, _logaddexp(lse_out_tau, lse_in_tau), lse_in_tau)
    # the teacher's tail r_t = -expm1(lse_q), and the student's r_s = exp(lse_out_tau - lse_tau)
    lse_q = tl.where(s_q > 0.0, m_q + tl.log(tl.where(s_q > 0.0, s_q, 1.0)), float("-inf"))
    r_t = tl.maximum(-_expm1(lse_q), 0.0).to(tl.float32)
    log_r_s = tl.where(has_out, lse_out_tau - tl.where(has_out, lse_tau, 0.0), 0.0)  # no -inf - -inf
    r_s = tl.where(has_out, tl.exp(log_r_s), 0.0)
    tail = tl.where(has_out & (r_t > 0.0), r_t * (tl.log(tl.where(r_t > 0.0, r_t, 1.0)) - log_r_s), 0.0)

    w = tl.load(scale_ptr + row * stride_s).to(tl.float32)
    g_ce = w * alpha
    g_kd = w * (1.0 - alpha) * tau
    # outside the K, the KD part of dL/dz is g_kd * (r_s - r_t) * softmax_out(z / tau)
    c_kd = tl.where(has_out, g_kd * (r_s - r_t) / tl.where(has_out, s_tau, 1.0), 0.0)

    # The K ids: kd's first sum, and their dL/dz into gk.
    kd_in = 0.0
    for k0 in range(0, n_k, BLOCK_K):
        ko = k0 + tl.arange(0, BLOCK_K)
        km = ko < K
        ids = tl.load(ids_row + ko * stride_ik, mask=km, other=-1)
        zk = tl.load(zk_row + ko, mask=km, other=0.0)
        q = tl.load(q_row + ko * stride_qk, mask=km, other=float("-inf")).to(tl.float32)
        p_t = tl.exp(q)
        log_ps = zk * inv_tau - lse_tau
        # p_t == 0 (q = -inf, and the lanes past K) adds 0, not 0 * -inf; a NaN still propagates.
        q_s = tl.where(p_t != 0.0, q, 0.0)
        kd_in += tl.sum(tl.where(km & (p_t != 0.0), p_t * (q_s - log_ps), 0.0), axis=0)
        gk = g_ce * (tl.exp(zk - lse) - (ids == yc).to(tl.float32)) + g_kd * (tl.exp(log_ps) - p_t)
        tl.store(gk_row + ko, gk, mask=km)
    for k0 in range(0, K - n_k, BLOCK_K):  # ignored rows: gk = 0 (empty on valid rows)
        ko = k0 + tl.arange(0, BLOCK_K)
        tl.store(gk_row + ko, tl.zeros((BLOCK_K,), dtype=tl.float32), mask=ko < K)

    # Pass 2 over the ids outside the K: dL/dz over z (at the K ids the launcher overwrites it).
    for v0 in range(0, n_cols, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        msk = offs < V
        z = tl.load(z_row + offs * stride_zv, mask=msk, other=float("-inf")).to(tl.float32)
        grad = g_ce * (tl.exp(z - lse) - (offs == yc).to(tl.float32)) + c_kd * tl.exp((z - m_o) * inv_tau)
        tl.store(z_row + offs * stride_zv, grad.to(z_ptr.dtype.element_ty), mask=msk)
    for v0 in range(0, V - n_cols, BLOCK_V):  # ignored rows: dL/dz = 0
        offs = v0 + tl.arange(0, BLOCK_V)
        tl.store(z_row + offs * stride_zv, tl.zeros((BLOCK_V,), dtype=z_ptr.dtype.element_ty), mask=offs < V)

    tl.store(ce_ptr + row, tl.where(valid, lse - z_y, 0.0))
    tl.store(kd_ptr + row, tl.where(valid, tau * tau * (kd_in + tail), 0.0))


# Interpreter (CPU): 128-wide tiles, so that small test vocabularies walk several tiles and a
# remainder (the interpreter is slow; shapes there are tiny); the top-K kernel's ids in tiles of
# at most 32, so that a test's K walks several too.
INTERPRETER_CONFIG = dict(BLOCK_V=128, num_warps=4)
INTERPRETER_BLOCK_K = 32

# GPU: autotuned per (V, teacher or not) over tiles of 1024-8192 ids and 4-16 warps. The row
# is streamed twice (read z, z_t; then read z, z_t and write dL/dz): memory-bound, so a tile
# must give each thread at least 8 ids (16-byte bf16 loads, several in flight) and at most 32
# (the teacher pass keeps ~6 fp32 vectors live; compiled for sm_90: 105-108 registers at 32
# ids per thread and no spills, python -m benchmarks.tools.compile_report).
GPU_CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=nw)
               for bv in (1024, 2048, 4096, 8192) for nw in (4, 8, 16) if 8 <= bv // (32 * nw) <= 32]


def autotuned(kernel, configs=GPU_CONFIGS, key=("V", "HAS_TEACHER"), **kw):
    """`kernel` autotuned over `configs`, keyed on the vocabulary and the teacher flag (the
    top-K kernel: the vocabulary and K) and the dtypes: the first call of a process with a key
    decides, which in the trainer is a full chunk. The kernel overwrites z in place, so every
    timed trial restores it (restore_value; the top-K kernel's gk is written whole by each)."""
    return triton.autotune(configs=configs, key=list(key), restore_value=["z_ptr"], **kw)(kernel)


_distill_rows_tuned = autotuned(_distill_rows_kernel)
# The top-K kernel: the same tiles over the vocabulary (two passes, no teacher row: lighter
# than the teacher kernel's), the K ids in tiles of at most TOPK_BLOCK_K.
_distill_topk_rows_tuned = autotuned(_distill_topk_rows_kernel, key=("V", "K"))
TOPK_BLOCK_K = 1024  # K = 1024 ids: 3 fp32/int64 vectors of 8 KiB in one tile (K is 20-100 in practice)


def autotuned_choices() -> dict:
    """The configuration the autotuner chose for each key seen in this process."""
    return {str(k): str(v) for t in (_distill_rows_tuned, _distill_topk_rows_tuned)
            for k, v in t.cache.items()}


def pinned_config() -> dict | None:
    """PRADA_ROWS_CONFIG="BLOCK_V,num_warps" (e.g. "4096,8") pins the GPU row kernel's
    configuration instead of autotuning it: for profilers, which should see no trial
    launches, and for timing one configuration inside the whole op."""
    spec = os.environ.get("PRADA_ROWS_CONFIG", "").strip()
    if not spec:
        return None
    try:
        block_v, num_warps = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"PRADA_ROWS_CONFIG={spec!r}: expected 'BLOCK_V,num_warps', e.g. '4096,8'") from None
    if block_v & (block_v - 1) or num_warps & (num_warps - 1):
        raise ValueError(f"PRADA_ROWS_CONFIG={spec!r}: BLOCK_V and num_warps must be powers of 2")
    return dict(BLOCK_V=block_v, num_warps=num_warps)


def triton_rows(z, z_t, y, scale, *, temperature, alpha, ignore_index, workspace=None, kernel=None,
                topk=None):
    """Row op (see prada_fast.op.driver), the twin of prada_fast.op.torch_backend.torch_rows: per-row
    (ce_i, kd_i) in fp32 (0 on ignored rows); z (C, V) is overwritten with dL/dz. `kernel`: an
    autotuned kernel (`autotuned`) to use instead of the default, which is the autotuned one
    on CUDA and the fixed interpreter configuration elsewhere. topk = (ids, logprobs), (C, K)
    each: the teacher as top-K log-probabilities (z_t must be None; `_distill_topk_rows_kernel`)."""
    C, V = z.shape
    ce = torch.empty(C, dtype=torch.float32, device=z.device)
    kd = torch.empty(C, dtype=torch.float32, device=z.device)
    if C == 0:
        return ce, kd
    check_device(z)
    if topk is not None:
        if z_t is not None:
            raise ValueError("triton_rows: give the teacher as z_t or as topk, not both")
        _topk_rows(z, topk[0], topk[1], y, scale, ce, kd, float(temperature), float(alpha),
                   int(ignore_index), kernel)
        return ce, kd
    has_teacher = z_t is not None
    if has_teacher and tuple(z_t.shape) != (C, V):
        raise ValueError(f"triton_rows: z_t must be {(C, V)}, got {tuple(z_t.shape)}")
    zt = z_t if has_teacher else z  # a dummy pointer when there is no teacher
    tau = float(temperature)
    meta = {}
    if kernel is None:
        pinned = pinned_config()
        if not z.is_cuda or pinned:
            kernel, meta = _distill_rows_kernel, pinned or INTERPRETER_CONFIG
        else:
            kernel = _distill_rows_tuned
    kernel[(C,)](
        z, zt, y, scale, ce, kd,
        V,
        z.stride(0), z.stride(1), zt.stride(0), zt.stride(1), y.stride(0), scale.stride(0),
        1.0 / tau, tau, float(alpha), int(ignore_index),
        HAS_TEACHER=has_teacher, **meta,
    )
    return ce, kd


def _topk_rows(z, ids, q, y, scale, ce, kd, tau, alpha, ignore_index, kernel):
    """Launch the top-K row kernel: the logits at the ids read out (zk, fp32) and z set to -inf
    there, the kernel, then the ids' dL/dz (gk) written back over z. Ignored rows' ids (never
    read, they may be anything) become 0..K-1 and their q 0, so that every access is in range."""
    C, V = z.shape
    K = ids.shape[1]
    if tuple(ids.shape) != (C, K) or tuple(q.shape) != (C, K) or not 1 <= K <= V:
        raise ValueError(f"triton_rows: topk ids and logprobs must be ({C}, K) with 1 <= K <= {V}, "
                         f"got {tuple(ids.shape)} and {tuple(q.shape)}")
    valid = (y != ignore_index).unsqueeze(1)
    ids = torch.where(valid, ids, torch.arange(K, device=ids.device))
    q = torch.where(valid, q, 0)
    zk = z.gather(1, ids).float()
    z.scatter_(1, ids, float("-inf"))
    gk = torch.empty(C, K, dtype=torch.float32, device=z.device)
    meta = {"BLOCK_K": min(triton.next_power_of_2(K), TOPK_BLOCK_K if z.is_cuda else INTERPRETER_BLOCK_K)}
    if kernel is None:
        pinned = pinned_config()
        if not z.is_cuda or pinned:
            kernel = _distill_topk_rows_kernel
            meta.update(pinned or INTERPRETER_CONFIG)
        else:
            kernel = _distill_topk_rows_tuned
    kernel[(C,)](
        z, ids, q, zk, gk, y, scale, ce, kd,
        V, K,
        z.stride(0), z.stride(1), ids.stride(0), ids.stride(1), q.stride(0), q.stride(1),
        y.stride(0), scale.stride(0),
        1.0 / tau, tau, alpha, ignore_index, **meta,
    )
    z.scatter_(1, ids, gk.to(z.dtype))


def triton_chunk_rows(n_rows: int, vocab: int, *, n_buffers: int = 2, elem_bytes: int = 2,
                      budget_bytes: int = 1 << 30) -> int:
    """Rows per chunk on a GPU: the most whose `n_buffers` logit buffers (student, teacher) fit
    in `budget_bytes` (1 GiB: 2048 rows at V = 128256 in bf16), a multiple of 256 in
    [256, 8192]. Many rows per chunk matter for the grad_W product, whose inner dimension is
    the chunk: its flops per byte are about rows * H / (2 H + rows) (a bf16 accumulator read
    and written once per chunk), over the H100's ~270 flop/B ridge from ~600 rows at H = 4096;
    at 512 rows it is memory-bound (benchmarks/NOTES.md)."""
    per_row = n_buffers * vocab * elem_bytes
    rows = min(8192, max(256, budget_bytes // max(per_row, 1) // 256 * 256))
    return max(1, min(n_rows, rows))
