"""The never-materialise chunk driver, shared by the PyTorch backend ("chunked") and the
Triton backend ("triton"): the algorithm lives here once, the backends supply a row op and
a domain op (`RowBackend`).

Rows of the flattened batch are processed in chunks of `chunk_rows`. For each chunk the
student logits z_s = h W_s^T + b_s (and the teacher's z_t) exist only as a bounded
(chunk_rows x V) buffer; a row op turns them into the per-row losses and overwrites z_s
with dL/dz_s, which two matrix products turn into the chunk's grad_h and its share of
grad_W_s. The domain term is computed first (it is small: B x H pooled features), and its
adv_lambda-scaled gradient, broadcast through the pooling mask, is the initial value of each
grad_h chunk, so the GEMM that writes grad_h adds the LM gradient onto it in its epilogue
(`addmm`): no separate N x H pass. Backward only scales the stored gradients.

Buffers, beyond the gradients themselves: 2-3 chunk buffers of chunk_rows x V (student,
teacher, and a temporary in the PyTorch row op). grad_W_s accumulates over the chunks in
the dtype of the products while there are at most LOW_PRECISION_GRAD_W_CHUNKS chunks (each
chunk's product is exact to fp32 inside the GEMM and rounded once when added: measured
relative error 0.26 % at 4 chunks and 0.48 % at 16 in bf16, against a 2 % tolerance), and in
an fp32 accumulator of W_s's size beyond that (the error grows as sqrt(chunks)).

A backend (`RowBackend`) gives the driver a row op, a domain op, the dtype of the matrix
products and the rule for the rows per chunk. A row op has the signature
    rows_fn(z, z_t, y, scale, *, temperature, alpha, ignore_index, workspace, topk=None)
        -> (ce_i, kd_i)
z (C, V) student logits, overwritten in place with
    dL/dz = scale_i * (alpha * (softmax(z) - onehot(y))
                       + (1 - alpha) * tau * (softmax(z/tau) - softmax(z_t/tau)))
(zero on ignored rows); z_t (C, V) teacher logits (scratch: the op may overwrite them) or
None; y (C,) targets; workspace: a dict kept across the chunks of one call; scale (C,) fp32 =
1/n on every row (the op masks ignored rows itself). ce_i, kd_i: (C,) fp32, 0 on ignored rows.
topk = (ids (C, K) int64, logprobs (C, K)): the teacher as top-K log-probabilities at tau
(z_t is None); then p_t above is p_t on the K ids and r_t * softmax(z / tau) restricted to the
ids outside the K and renormalised there (the tail, r_t = 1 - sum exp(logprobs)). This path
has no teacher product and no teacher buffer: three N x V x H products instead of four.

A domain op has the signature
    domain_fn(hidden, mask, weight, bias, labels, adv_lambda, adversary, seq_index=None)
        -> (dom, dom_acc, gf (B, H) fp32, grad_weight, grad_bias)
where gf_b = -adv_lambda * dL_dom/df_b / sum_t m_bt (adversary "grl") or
+adv_lambda * dL_conf/df_b / sum_t m_bt ("confusion"), so that grad_h[b, t] += m_bt * gf_b;
grad_weight and grad_bias are those of L_dom for either adversary. With seq_index (packed
rows, labels (S,)) the sequences are those of seq_index: gf is (S, H), its denominators the
sums of m over each sequence's positions, and grad_h[b, t] += m_bt * gf[seq_bt] (nothing where
seq_bt = -1); the driver writes that broadcast as the seed of grad_h, one N x H pass as without
packing.

Every argument of the op reaches the driver as one `LossOptions` (prada_fast.op.options),
already checked by `prada_loss`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .options import LossOptions


@dataclass(frozen=True)
class RowBackend:
    """What an implementation plugs into the driver (see the module docstring).

    rows: the row op; domain: the domain op; compute_dtype(input dtype) -> dtype of the
    matrix products; chunk_rows(n_rows, vocab, hidden, has_teacher) -> rows per chunk when
    the caller gives none (has_teacher: a teacher logit buffer per chunk, i.e. a teacher given
    as hidden states or logits; a top-K teacher needs none)."""

    name: str
    rows: Callable
    domain: Callable
    compute_dtype: Callable[[torch.dtype], torch.dtype]
    chunk_rows: Callable[[int, int, torch.Tensor, bool], int]


def default_chunk_rows(n_rows: int, vocab: int, budget_elems: int = 1 << 23) -> int:
    """Rows per chunk so that one chunk buffer holds about `budget_elems` logits (32 MiB fp32)."""
    rows = max(16, min(4096, budget_elems // max(vocab, 1)))
    return min(n_rows, rows) if n_rows > 0 else 1


# grad_W_s accumulates in a low-precision products dtype (no fp32 copy of W_s's size) up to
# this many chunks; beyond it in fp32 (see the module docstring).
LOW_PRECISION_GRAD_W_CHUNKS = 16

# How _accumulate_mm adds low-precision products into fp32, per device type: the first path
# that works is remembered, so a backend without out_dtype fails once, not once per chunk.
_ACCUMULATE_PATHS = ("addmm(out_dtype) in place", "mm(out_dtype) temporary", "low-precision temporary")
_ACCUMULATE_PATH: dict[str, int] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, in place where the backend allows (CUDA:
    addmm with out_dtype writes into acc; elsewhere an fp32 temporary of acc's shape)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    dev = acc.device.type
    for i in range(_ACCUMULATE_PATH.get(dev, 0), len(_ACCUMULATE_PATHS)):
        try:
            if i == 0:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            elif i == 1:
                acc += torch.mm(a, b, out_dtype=acc.dtype)
            else:
                acc += (a @ b).to(acc.dtype)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            if i == len(_ACCUMULATE_PATHS) - 1:
                raise
            continue
        _ACCUMULATE_PATH[dev] = i
        return


def accumulate_path(device_type: str) -> str:
    """How _accumulate_mm adds low-precision products into fp32 on this device type."""
    return _ACCUMULATE_PATHS[_ACCUMULATE_PATH.get(device_type, 0)]


def broadcast_per_sequence(gf: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """(N, H) in `dtype`: row (b, t) = m_bt * gf[seq_bt], 0 where seq_bt = -1. One N x H write
    (an embedding bag of one index per position, weighted by m), no gathered temporary."""
    seq = seq_index.reshape(-1)
    S, H = gf.shape
    if S == 0 or seq.numel() == 0:
        return torch.zeros(seq.numel(), H, dtype=dtype, device=gf.device)
    w = torch.where(seq >= 0, mask.reshape(-1).to(dtype), 0).unsqueeze(1)
    idx = seq.clamp_min(0).unsqueeze(1)
    return torch.nn.functional.embedding_bag(idx, gf.to(dtype), per_sample_weights=w, mode="sum")


def loss_and_grads(hidden, lm_weight, targets, opts: LossOptions, backend: RowBackend,
                   needs_grad=(True, True, True, True, True)):
    """Loss parts and the gradients of (hidden, lm_weight, lm_bias, domain_weight, domain_bias)
    for an incoming gradient of 1. Products run in backend.compute_dtype(hidden.dtype);
    accumulation is fp32 (fp64 for fp64 inputs)."""
    B, T, H = hidden.shape
    V = lm_weight.shape[0]
    N = B * T
    dev = hidden.device
    cdt = backend.compute_dtype(hidden.dtype)
    acc = torch.promote_types(hidden.dtype, torch.float32)  # accumulation: fp32 (fp64 for fp64)
    need_h, need_w, need_b, need_dw, need_db = needs_grad
    lm_bias, pool_mask, ignore_index = opts.lm_bias, opts.pool_mask, opts.ignore_index
    teacher_hidden, teacher_logits = opts.teacher_hidden, opts.teacher_logits
    topk_ids, topk_lp = opts.teacher_topk_ids, opts.teacher_topk_logprobs
    domain_weight, domain_bias = opts.domain_weight, opts.domain_bias
    need_b = need_b and lm_bias is not None

    h = hidden.reshape(N, H)
    y = targets.reshape(N)
    w = lm_weight.to(cdt)
    b = None if lm_bias is None else lm_bias.to(cdt)
    u = teacher_hidden.reshape(N, -1) if teacher_hidden is not None else None
    wt = opts.teacher_weight.to(cdt) if teacher_hidden is not None else None
    zt_all = teacher_logits.reshape(N, V) if teacher_logits is not None else None
    if topk_ids is not None:
        topk_ids, topk_lp = topk_ids.reshape(N, -1), topk_lp.reshape(N, -1)

    n_tokens = (y != ignore_index).sum()
    n = n_tokens if opts.num_valid_tokens is None else torch.as_tensor(opts.num_valid_tokens, device=dev)
    inv_n = 1.0 / n.to(acc).clamp_min(1)

    # Domain term first: its gradient seeds grad_h.
    zero = torch.zeros((), dtype=acc, device=dev)
    dom = dom_acc = zero
    gf = gw_d = gb_d = None
    if domain_weight is not None:
        dom, dom_acc, gf, gw_d, gb_d = backend.domain(hidden, pool_mask, domain_weight, domain_bias,
                                                      opts.domain_labels, opts.adv_lambda,
                                                      opts.adversary, seq_index=opts.seq_index)
    # grad_h starts as the domain term's adv_lambda-scaled gradient, broadcast through the mask
    # (zero without a domain head); the LM gradient is then added onto it chunk by chunk.
    grad_h = None
    if need_h and gf is not None and opts.seq_index is not None:  # packed rows: per sequence
        grad_h = broadcast_per_sequence(gf, pool_mask, opts.seq_index, hidden.dtype)
    elif need_h:
        grad_h = torch.zeros(B, T, H, dtype=hidden.dtype, device=dev)
        if gf is not None:
            torch.mul(pool_mask.to(acc).unsqueeze(-1), gf.unsqueeze(1), out=grad_h)
        grad_h = grad_h.view(N, H)
    # Only rows with a target take part in the products: prompt, question, padding and
    # target-domain rows are skipped (they can be half of a PRADA batch).
    valid_rows = (y != ignore_index).nonzero().squeeze(1)
    all_valid = valid_rows.numel() == N
    M = valid_rows.numel()
    C = opts.chunk_rows or backend.chunk_rows(M, V, hidden, opts.has_dense_teacher)
    few_chunks = -(-M // C) <= LOW_PRECISION_GRAD_W_CHUNKS
    gw_dtype = cdt if (cdt == lm_weight.dtype and few_chunks) else acc
    grad_w = torch.zeros(V, H, dtype=gw_dtype, device=dev) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=dev) if need_b else None
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    kd_sum = torch.zeros((), dtype=acc, device=dev)
    zbuf = ztbuf = None  # chunk buffers, allocated once and reused by every chunk
    workspace: dict = {}  # the row op's own reusable buffers
    for s in range(0, M, C):
        e = min(s + C, M)
        r = slice(s, e) if all_valid else valid_rows[s:e]
        h_c = h[r].to(cdt)
        if zbuf is None:
            zbuf = torch.empty(min(C, M), V, dtype=cdt, device=dev)
        z = zbuf[: e - s]
        torch.addmm(b, h_c, w.t(), out=z) if b is not None else torch.mm(h_c, w.t(), out=z)
        z_t = None
        if u is not None:
            if ztbuf is None:
                ztbuf = torch.empty(min(C, M), V, dtype=cdt, device=dev)
            z_t = torch.mm(u[r].to(cdt), wt.t(), out=ztbuf[: e - s])
        elif zt_all is not None:  # the row op may overwrite z_t: never hand it the caller's logits
            z_t = zt_all[r].to(cdt, copy=True) if all_valid else zt_all[r].to(cdt)
        topk = None if topk_ids is None else (topk_ids[r], topk_lp[r])  # (C, K): small copies
        ce_i, kd_i = backend.rows(z, z_t, y[r], inv_n.expand(e - s), temperature=opts.temperature,
                                  alpha=opts.alpha, ignore_index=ignore_index, workspace=workspace,
                                  topk=topk)
        ce_sum += ce_i.sum()
        kd_sum += kd_i.sum()
        del z_t
        dz = z  # the row op overwrote z with dL/dz (compute dtype: zbuf is allocated in it)
        if need_h:
            if all_valid and grad_h.dtype == cdt:
                grad_h[s:e].addmm_(dz, w)  # the GEMM adds onto the domain seed in its epilogue
            else:
                grad_h.index_add_(0, valid_rows[s:e], (dz @ w).to(grad_h.dtype))
        if need_w:
            _accumulate_mm(grad_w, dz.t(), h_c)
        if need_b:
            grad_b += z.sum(0, dtype=acc)
        del dz, z
    zbuf = ztbuf = None  # the chunk buffers go before the gradients' final casts
    workspace.clear()

    ce = ce_sum * inv_n
    kd = kd_sum * inv_n if opts.has_teacher else zero
    loss = opts.alpha * ce + (1 - opts.alpha) * kd + dom  # alpha is 1 without a teacher
    grads = (
        grad_h.view(B, T, H) if need_h else None,
        grad_w.to(lm_weight.dtype) if need_w else None,
        grad_b.to(lm_bias.dtype) if need_b else None,
        gw_d.to(domain_weight.dtype) if (gw_d is not None and need_dw) else None,
        gb_d.to(domain_bias.dtype) if (gb_d is not None and domain_bias is not None and need_db) else None,
    )
    parts = {"ce": ce, "kd": kd, "dom": dom, "dom_acc": dom_acc, "n_tokens": n_tokens}
    return loss, parts, grads


class FusedPradaLoss(torch.autograd.Function):
    """Gradients are computed in forward; backward scales them by the incoming gradient.
    The differentiable tensors come positionally (autograd tracks them); they are the same
    objects as the corresponding fields of `opts`."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, lm_bias, domain_weight, domain_bias, targets, opts, backend):
        needs = tuple(ctx.needs_input_grad[:5])
        loss, parts, grads = loss_and_grads(hidden, lm_weight, targets, opts, backend, needs_grad=needs)
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has = tuple(g is not None for g in grads)
        detached = [parts[k].detach() for k in ("ce", "kd", "dom", "dom_acc", "n_tokens")]
        ctx.mark_non_differentiable(*detached)
        return (loss, *detached)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("prada_loss: backward ran twice through the same loss; the fused op "
                               "scales its stored gradients in place (recompute the loss instead)")
        ctx.consumed = True
        out = []
        for g, has in zip(ctx.saved_tensors, ctx.has):
            out.append(g.mul_(grad_loss.to(g.dtype)) if has else None)  # in place: no 2nd copy
        return (*out, None, None, None)


def fused_prada_loss(hidden, lm_weight, targets, opts: LossOptions, backend: RowBackend):
    """The op through the chunk driver with `backend`: (loss, parts). `opts` is checked."""
    loss, ce, kd, dom, dom_acc, n_tokens = FusedPradaLoss.apply(
        hidden, lm_weight, opts.lm_bias, opts.domain_weight, opts.domain_bias, targets, opts, backend)
    return loss, {"ce": ce, "kd": kd, "dom": dom, "dom_acc": dom_acc, "n_tokens": n_tokens}
