"""The fused gradient-reversal domain head of PRADA, in Triton.

For each sequence b: masked-mean pooling f_b = sum_t m_bt h_bt / max(sum_t m_bt, 1), the
linear domain logits c_b = W_d f_b + b_d, CE(c_b, d_b), accuracy (argmax c_b == d_b), and the
gradients in the same pass: dc_b = (softmax(c_b) - onehot(d_b)) / B, the adversarial
gf_b = -lambda * (W_d^T dc_b) / sum_t m_bt (GRL) or +lambda * W_d^T (softmax(c_b) - 1/D) /
(B sum_t m_bt) (domain confusion: towards a uniform head output); the driver adds m_bt * gf_b
into grad_h[b, t]. The head learns from L_dom either way: grad W_d = sum_b dc_b f_b^T and
grad b_d = sum_b dc_b.

Two kernels: the pooling reads the whole B x T x H hidden tensor, so it runs on a
(B, H-tiles) grid to fill the GPU even for small B; the head itself is tiny (B x D x H) and
runs one program per sequence. The kernels write f_b and dc_b; the launcher's reduction of
the per-sequence outer products dc_b f_b^T is one small deterministic GEMM (dc^T f), not a
B x D x H buffer or atomics.

Packed rows (seq_index (B, T): each position's sequence s in [0, S), -1: none; labels (S,)):
the sequences are those of seq_index, not the rows. The launcher lists the pooled positions
(seq >= 0, m != 0) grouped by sequence (a stable sort of their sequence numbers: CSR offsets,
and per position its row, column and mask, O(N) small vectors); the pooling
kernel then runs on an (S, H-tiles) grid, program s gathering the rows of its own positions
(no atomics: deterministic), and stores the clamped sum of m that the head kernel divides
by. A sequence with no pooled position pools to 0, as an empty row does. The head kernel is
the same, one program per sequence, with 1/S.

`triton_domain_head` is the domain op of the chunk driver (`prada_fast.op.driver`), the
twin of `prada_fast.op.torch_backend.torch_domain`. On a machine without a GPU it runs
under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import check_device


@triton.jit
def _masked_pool_kernel(
    h_ptr, m_ptr, f_ptr,
    T, H,
    stride_hb, stride_ht, stride_hh,
    stride_mb, stride_mt,
    stride_fb,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """f[b, tile] = sum_t m[b, t] * h[b, t, tile] / max(sum_t m[b, t], 1); grid (B, cdiv(H, BLOCK_H))."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    msum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        m = tl.load(m_ptr + b * stride_mb + offs_t * stride_mt, mask=t_mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + b * stride_hb + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh,
                    mask=t_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(m[:, None] * h, axis=0)
        msum += m
    denom = tl.maximum(tl.sum(msum, axis=0), 1.0)  # an empty mask row pools to 0
    tl.store(f_ptr + b * stride_fb + offs_h, acc / denom, mask=h_mask)


@triton.jit
def _segment_pool_kernel(
    h_ptr, b_ptr, t_ptr, w_ptr, off_ptr, f_ptr, msum_ptr,
    H,
    stride_hb, stride_ht, stride_hh, stride_fb,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Packed rows: f[s, tile] = sum_p w_p * h[b_p, t_p, tile] / max(sum_p w_p, 1) over the
    pooled positions p in [off[s], off[s + 1]) (b_p, t_p their row and column, w_p their mask);
    grid (S, cdiv(H, BLOCK_H)). Programs of H-tile 0 store the clamped denominator msum[s]."""
    s = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    start = tl.load(off_ptr + s)
    end = tl.load(off_ptr + s + 1)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    msum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < end
        b = tl.load(b_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
        t = tl.load(t_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
        w = tl.load(w_ptr + offs_p, mask=p_mask, other=0.0)
        row = b * stride_hb + t * stride_ht  # strides as arguments: their divisibility is known
        h = tl.load(h_ptr + row[:, None] + offs_h[None, :] * stride_hh,
                    mask=p_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * h, axis=0)
        msum += w
    denom = tl.maximum(tl.sum(msum, axis=0), 1.0)  # a sequence with no pooled position pools to 0
    tl.store(f_ptr + s * stride_fb + offs_h, acc / denom, mask=h_mask)
    if tl.program_id(1) == 0:
        tl.store(msum_ptr + s, denom)


@triton.jit
def _domain_head_kernel(
    f_ptr, w_ptr, bias_ptr, lab_ptr, m_ptr, msum_ptr,
    loss_ptr, correct_ptr, dc_ptr, gf_ptr,
    T, H, D, inv_B, adv_lambda,
    stride_fb, stride_wd, stride_wh, stride_bias, stride_lab,
    stride_mb, stride_mt, stride_dcb, stride_gfb,
    HAS_BIAS: tl.constexpr, CONFUSION: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per sequence: logits, CE, correct flag, dc_b and gf_b. PACKED: the
    sequences of seq_index (inv_B = 1/S), whose clamped sums of m the pooling stored in msum."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    # c_b = W_d f_b (+ b_d), walking H in tiles.
    c = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        f = tl.load(f_ptr + b * stride_fb + offs_h, mask=h_mask, other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_h[None, :] * stride_wh,
                    mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        c += tl.sum(w * f[None, :], axis=1)
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_d * stride_bias, mask=d_mask, other=0.0).to(tl.float32)
    c = tl.where(d_mask, c, float("-inf"))

    # CE, accuracy, dc_b = (softmax(c_b) - onehot(d_b)) / B.
    label = tl.load(lab_ptr + b * stride_lab)
    is_label = offs_d == label
    c_max = tl.max(c, axis=0)
    e = tl.exp(c - c_max)  # 0 on padding lanes
    se = tl.sum(e, axis=0)
    lse = c_max + tl.log(se)
    c_label = tl.sum(tl.where(is_label, c, 0.0), axis=0)
    tl.store(loss_ptr + b, lse - c_label)
    pred = tl.argmax(c, axis=0)  # first maximum, as torch.argmax
    tl.store(correct_ptr + b, (pred == label).to(tl.float32))
    dc = (e / se - is_label.to(tl.float32)) * inv_B
    dc = tl.where(d_mask, dc, 0.0)
    tl.store(dc_ptr + b * stride_dcb + offs_d, dc, mask=d_mask)

    # gf_b = -lambda * W_d^T dc_b / sum_t m_bt (GRL), or, for domain confusion,
    # +lambda * W_d^T (softmax(c_b) - 1/D) / (B sum_t m_bt); sums of m clamped to 1, as the pooling.
    if PACKED:
        coef = adv_lambda / tl.load(msum_ptr + b)  # clamped by the pooling kernel
    else:
        msum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            msum += tl.load(m_ptr + b * stride_mb + offs_t * stride_mt, mask=offs_t < T,
                            other=0.0).to(tl.float32)
        coef = adv_lambda / tl.maximum(tl.sum(msum, axis=0), 1.0)
    if CONFUSION:
        g_c = tl.where(d_mask, (e / se - 1.0 / D) * inv_B, 0.0)
    else:
        g_c = -dc
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_h[None, :] * stride_wh,
                    mask=d_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        gf = tl.sum(w * g_c[:, None], axis=0) * coef
        tl.store(gf_ptr + b * stride_gfb + offs_h, gf, mask=h_mask)


def _block_sizes(device: torch.device, T: int, H: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H for the pooling, BLOCK_H for the head, BLOCK_D)."""
    block_d = max(2, triton.next_power_of_2(D))  # all D logits in one tile (D is small)
    if device.type != "cuda":
        # Interpreter: small tiles, so that tests walk several T and H tiles and remainders.
        return 8, 32, 32, block_d
    # GPU: 32 x 256 pooling tiles (8K elements, 4 warps, coalesced 256-wide rows); the head
    # keeps a BLOCK_D x BLOCK_H weight tile of at most 8K elements in registers.
    block_h_head = max(16, min(triton.next_power_of_2(H), 8192 // block_d))
    return 32, min(256, triton.next_power_of_2(H)), block_h_head, block_d


def _positions_by_sequence(m: torch.Tensor, seq_index: torch.Tensor, S: int):
    """The pooled positions (seq >= 0, m != 0) grouped by sequence (a stable sort of their
    sequence numbers): (rows b (P,) int32, columns t (P,) int32, mask weights (P,) fp32, CSR
    offsets (S + 1,) int64 into them)."""
    b, t = ((seq_index >= 0) & (m != 0)).nonzero(as_tuple=True)
    keys, order = torch.sort(seq_index[b, t], stable=True)
    b, t = b[order], t[order]
    offsets = torch.zeros(S + 1, dtype=torch.int64, device=seq_index.device)
    torch.cumsum(torch.bincount(keys, minlength=S), 0, out=offsets[1:])
    return b.to(torch.int32), t.to(torch.int32), m[b, t].contiguous(), offsets


def triton_domain_head(hidden, mask, weight, bias, labels, adv_lambda, adversary="grl", seq_index=None):
    """Domain op (see prada_fast.op.driver): (dom, dom_acc, gf (B, H), grad_weight (D, H),
    grad_bias (D,)), all fp32, exactly as prada_fast.op.torch_backend.torch_domain. With
    seq_index (packed rows, labels (S,)): one sequence per number of seq_index, gf (S, H)."""
    B, T, H = hidden.shape
    D = weight.shape[0]
    dev = hidden.device
    check_device(hidden, weight)
    packed = seq_index is not None
    n = labels.shape[0] if packed else B  # the sequences
    m = mask.to(torch.float32)  # B x T: small; bool/int masks too
    f = torch.empty(n, H, dtype=torch.float32, device=dev)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    correct = torch.empty(n, dtype=torch.float32, device=dev)
    dc = torch.empty(n, D, dtype=torch.float32, device=dev)
    gf = torch.empty(n, H, dtype=torch.float32, device=dev)
    if n == 0:
        z = torch.zeros((), dtype=torch.float32, device=dev)
        return z, z, gf, torch.zeros(D, H, dtype=torch.float32, device=dev), dc.sum(0)
    block_t, block_h_pool, block_h_head, block_d = _block_sizes(dev, T, H, D)
    msum = m  # unused without packing
    if packed:
        rows, cols, weights, offsets = _positions_by_sequence(m, seq_index, n)
        msum = torch.empty(n, dtype=torch.float32, device=dev)
        _segment_pool_kernel[(n, triton.cdiv(H, block_h_pool))](
            hidden, rows, cols, weights, offsets, f, msum, H,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), f.stride(0),
            BLOCK_P=block_t, BLOCK_H=block_h_pool, num_warps=4,
        )
    else:
        _masked_pool_kernel[(B, triton.cdiv(H, block_h_pool))](
            hidden, m, f, T, H,
            hidden.stride(0), hidden.stride(1), hidden.stride(2),
            m.stride(0), m.stride(1), f.stride(0),
            BLOCK_T=block_t, BLOCK_H=block_h_pool, num_warps=4,
        )
    _domain_head_kernel[(n,)](
        f, weight, bias if bias is not None else weight, labels, m, msum,
        loss, correct, dc, gf,
        T, H, D, 1.0 / n, float(adv_lambda),
        f.stride(0), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, labels.stride(0),
        m.stride(0), m.stride(1), dc.stride(0), gf.stride(0),
        HAS_BIAS=bias is not None, CONFUSION=adversary == "confusion", PACKED=packed,
        BLOCK_D=block_d, BLOCK_H=block_h_head, BLOCK_T=block_t, num_warps=4,
    )
    grad_weight = dc.t() @ f  # sum_b dc_b f_b^T: one small deterministic GEMM
    return loss.mean(), correct.mean(), gf, grad_weight, dc.sum(0)
