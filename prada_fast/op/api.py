"""`prada_loss`, the one public op, and `PradaLoss`, its `nn.Module`.

The op checks its arguments (one `LossOptions`) and dispatches to an implementation:
"reference" (materialises the logits; the parity oracle), or the never-materialise chunk
driver with one of its two row backends, "chunked" (PyTorch) or "triton" (the kernels in
`kernels/`, imported as `prada_kernels`); "auto" takes triton on CUDA, chunked elsewhere.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import nn

from .driver import RowBackend, default_chunk_rows, fused_prada_loss
from .options import LossOptions, keyword_parameters, options_from_kwargs, renamed_kwargs
from .reference import reference_prada_loss

IMPL_NAMES = ("auto", "triton", "chunked", "reference")  # what `impl` may name


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that `impl` names on `device` ("auto": triton on CUDA, else chunked)."""
    if impl not in IMPL_NAMES:
        raise ValueError(f"prada_loss: impl={impl!r}: expected one of {IMPL_NAMES}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return impl


def triton_backend() -> RowBackend:
    """The Triton kernels as a backend of the chunk driver (imports triton on first use)."""
    from prada_kernels.fused_linear_distill import triton_chunk_rows, triton_rows
    from prada_kernels.domain_head import triton_domain_head

    def chunk_rows(n_rows: int, vocab: int, hidden: torch.Tensor, has_teacher: bool) -> int:
        if not hidden.is_cuda:  # the interpreter: the PyTorch backend's small chunks
            return default_chunk_rows(n_rows, vocab)
        return triton_chunk_rows(n_rows, vocab, n_buffers=1 + has_teacher,
                                 elem_bytes=hidden.element_size())

    # products in the input dtype (cuBLAS on CUDA), accumulation in fp32
    return RowBackend(name="triton", rows=triton_rows, domain=triton_domain_head,
                      compute_dtype=lambda dtype: dtype, chunk_rows=chunk_rows)


def _backend(impl: str) -> RowBackend:
    if impl == "chunked":
        from .torch_backend import TORCH_BACKEND
        return TORCH_BACKEND
    return triton_backend()


def prada_loss(hidden, lm_weight, targets, *, impl="auto", **options):
    """PRADA loss: alpha * ce + (1 - alpha) * kd + dom, and its parts (docs/design.md).

    hidden (B, T, H) student final hidden states; lm_weight (V, H); targets (B, T) int64
    next-token ids (ignore_index: no loss). The keyword arguments are the fields of
    `LossOptions` (see its source for shapes and defaults):
    lm_bias (V,); the teacher, frozen, as teacher_hidden (B, T, H_t) with teacher_weight
    (V, H_t), or as teacher_logits (B, T, V), or as teacher_topk_ids (B, T, K) int64 with
    teacher_topk_logprobs (B, T, K), its top-K ids and their log-probabilities at
    `temperature` (a cached teacher: the KD over the K ids plus one bucket for the rest, no
    teacher product; rows without a target are not read); temperature; alpha (taken as 1
    without a teacher); ignore_index; num_valid_tokens (the normaliser n; default: the valid targets
    counted); pool_mask (B, T); domain_weight (D, H) [+ domain_bias (D,)] with domain_labels
    (B,) add the domain term, whose gradient into `hidden` is the adversary's, scaled by
    adv_lambda (-adv_lambda dL_dom/dh for adversary "grl", gradient reversal, or
    +adv_lambda dL_conf/dh for "confusion"; `grl_lambda`, its old name, is still accepted);
    seq_index (B, T) int64, packed rows: each position's sequence in
    [0, S) or -1, domain_labels then (S,) and the domain term per sequence; chunk_rows:
    rows per chunk of the driver's logit buffers (chunk_rows x V; None picks it from V and
    the device; the reference ignores it).
    impl: "auto" | "triton" | "chunked" | "reference".

    Returns (loss, parts): loss a 0-dim tensor; parts "ce", "kd", "dom", "dom_acc",
    "n_tokens" (detached 0-dim tensors). The fused implementations compute the gradients in
    the forward pass; backward scales them by the incoming gradient.
    """
    opts = options_from_kwargs(options).checked(hidden, lm_weight, targets)
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        return reference_prada_loss(hidden, lm_weight, targets, opts)
    return fused_prada_loss(hidden, lm_weight, targets, opts, _backend(impl))


# help(prada_loss) and inspect show every keyword: LossOptions' fields, then impl.
_P = inspect.Parameter
prada_loss.__signature__ = inspect.Signature(
    [_P(n, _P.POSITIONAL_OR_KEYWORD) for n in ("hidden", "lm_weight", "targets")]
    + keyword_parameters() + [_P("impl", _P.KEYWORD_ONLY, default="auto")])


class PradaLoss(nn.Module):
    """The PRADA loss as a module that holds its hyper-parameters (any `prada_loss` keyword
    argument) and the implementation; `forward` takes the tensors.

    Shape:
        - hidden: (B, T, H); lm_weight: (V, H); targets: (B, T) int64
        - keyword tensors as in `prada_loss` (teacher_hidden (B, T, H_t), teacher_topk_ids (B, T, K),
          domain_labels (B,), ...)
        - output: (loss, parts), loss a 0-dim tensor

    Example::

        >>> loss_fn = PradaLoss(temperature=2.0, alpha=0.5, adv_lambda=0.1)
        >>> h = torch.randn(2, 5, 16, requires_grad=True)
        >>> w = torch.randn(50, 16, requires_grad=True)
        >>> y = torch.randint(0, 50, (2, 5))
        >>> loss, parts = loss_fn(h, w, y, teacher_logits=torch.randn(2, 5, 50))
        >>> loss.backward()
        >>> loss_fn.set(adv_lambda=0.5)  # e.g. a schedule's next value
    """

    def __init__(self, *, impl: str = "auto", **options):
        super().__init__()
        self.impl = impl
        self.options = options_from_kwargs(options)

    def set(self, **options) -> None:
        """Change hyper-parameters (e.g. adv_lambda as its schedule moves)."""
        options = renamed_kwargs(options)
        options_from_kwargs(options)  # names checked
        self.options = replace(self.options, **options)

    def forward(self, hidden, lm_weight, targets, **inputs):
        merged = {**self.options.as_kwargs(), **inputs}
        return prada_loss(hidden, lm_weight, targets, impl=self.impl, **merged)

    def extra_repr(self) -> str:
        o = self.options
        return (f"impl={self.impl!r}, temperature={o.temperature}, alpha={o.alpha}, "
                f"ignore_index={o.ignore_index}, adv_lambda={o.adv_lambda}")


__all__ = ["IMPL_NAMES", "LossOptions", "PradaLoss", "prada_loss", "resolve_impl", "triton_backend"]
