"""`prada_loss`: the one public op. It checks its arguments and dispatches to an
implementation: "reference" (materialises logits), "chunked" (PyTorch, row chunks, no
N x V buffer) or "triton" (fused kernels); "auto" takes triton on CUDA, chunked elsewhere.
"""
from __future__ import annotations

import torch

IMPLS = ("auto", "triton", "chunked", "reference")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"prada_loss: {msg}")


def _resolve_impl(impl: str, device: torch.device) -> str:
    _check(impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return impl


def prada_loss(hidden, lm_weight, targets, *, lm_bias=None, teacher_hidden=None,
               teacher_weight=None, teacher_logits=None, temperature=1.0, alpha=0.5,
               ignore_index=-100, num_valid_tokens=None, pool_mask=None, domain_weight=None,
               domain_bias=None, domain_labels=None, grl_lambda=1.0, impl="auto", chunk_rows=None):
    """PRADA loss: alpha * ce + (1 - alpha) * kd + dom, and its parts (see DESIGN.md).

    hidden (B, T, H) student final hidden states; lm_weight (V, H); targets (B, T) int64
    next-token ids (ignore_index: no loss). The teacher is either teacher_hidden (B, T, H_t)
    with teacher_weight (V, H_t), or teacher_logits (B, T, V); it gets no gradient.
    domain_weight (D, H) [+ domain_bias (D,)] and domain_labels (B,) add the domain term,
    whose gradient into `hidden` is multiplied by -grl_lambda (gradient reversal).
    Returns (loss, parts) with parts "ce", "kd", "dom", "dom_acc", "n_tokens" (detached).
    chunk_rows: rows per chunk of the fused implementations ("chunked", "triton"): their
    logit buffers hold chunk_rows x V; None picks it from V and the device (the reference
    ignores it).
    """
    _check(hidden.dim() == 3, f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    _check(lm_weight.dim() == 2 and lm_weight.shape[1] == H,
           f"lm_weight must be (V, {H}), got {tuple(lm_weight.shape)}")
    V = lm_weight.shape[0]
    _check(tuple(targets.shape) == (B, T), f"targets must be ({B}, {T}), got {tuple(targets.shape)}")
    _check(not targets.is_floating_point(), "targets must be an integer tensor")
    _check(lm_bias is None or tuple(lm_bias.shape) == (V,), f"lm_bias must be ({V},)")
    if teacher_logits is not None:
        _check(teacher_hidden is None and teacher_weight is None,
               "give the teacher as teacher_logits or as teacher_hidden + teacher_weight, not both")
        _check(tuple(teacher_logits.shape) == (B, T, V),
               f"teacher_logits must be ({B}, {T}, {V}), got {tuple(teacher_logits.shape)}")
    if teacher_hidden is not None or teacher_weight is not None:
        _check(teacher_hidden is not None and teacher_weight is not None,
               "teacher_hidden and teacher_weight go together")
        _check(teacher_hidden.dim() == 3 and tuple(teacher_hidden.shape[:2]) == (B, T),
               f"teacher_hidden must be ({B}, {T}, H_t), got {tuple(teacher_hidden.shape)}")
        _check(tuple(teacher_weight.shape) == (V, teacher_hidden.shape[2]),
               f"teacher_weight must be ({V}, {teacher_hidden.shape[2]}) (same vocabulary as the "
               f"student), got {tuple(teacher_weight.shape)}")
    has_teacher = teacher_logits is not None or teacher_hidden is not None
    _check(float(temperature) > 0, f"temperature must be > 0, got {temperature}")
    if not has_teacher:
        alpha = 1.0
    _check(0.0 <= float(alpha) <= 1.0, f"alpha must be in [0, 1], got {alpha}")
    if pool_mask is None:
        pool_mask = torch.ones(B, T, dtype=hidden.dtype, device=hidden.device)
    _check(tuple(pool_mask.shape) == (B, T), f"pool_mask must be ({B}, {T}), got {tuple(pool_mask.shape)}")
    if domain_weight is not None:
        _check(domain_weight.dim() == 2 and domain_weight.shape[1] == H,
               f"domain_weight must be (D, {H}), got {tuple(domain_weight.shape)}")
        D = domain_weight.shape[0]
        _check(domain_bias is None or tuple(domain_bias.shape) == (D,), f"domain_bias must be ({D},)")
        _check(domain_labels is not None and tuple(domain_labels.shape) == (B,),
               f"domain_labels must be ({B},) when domain_weight is given")
    kw = dict(lm_bias=lm_bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
              teacher_logits=teacher_logits, temperature=float(temperature), alpha=float(alpha),
              ignore_index=ignore_index, num_valid_tokens=num_valid_tokens, pool_mask=pool_mask,
              domain_weight=domain_weight, domain_bias=domain_bias, domain_labels=domain_labels,
              grl_lambda=float(grl_lambda))
    _check(chunk_rows is None or int(chunk_rows) >= 1, f"chunk_rows must be >= 1, got {chunk_rows}")
    impl = _resolve_impl(impl, hidden.device)
    if impl == "reference":
        from .reference import reference_prada_loss
        return reference_prada_loss(hidden, lm_weight, targets, **kw)
    if impl == "chunked":
        from .chunked import chunked_prada_loss
        return chunked_prada_loss(hidden, lm_weight, targets, chunk_rows=chunk_rows, **kw)
    from prada_kernels.fused_linear_distill import triton_prada_loss
    return triton_prada_loss(hidden, lm_weight, targets, chunk_rows=chunk_rows, **kw)
