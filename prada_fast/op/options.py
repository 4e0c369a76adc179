"""The keyword arguments of `prada_loss`, as one frozen object.

`LossOptions` is the single place where the op's keyword arguments are named, given their
defaults and checked. `prada_loss` builds one from its keywords, `LossOptions.checked`
validates it against the positional tensors and fills in the defaults that depend on them,
and every implementation (the reference, the chunk driver and its backends) reads its
arguments from that object. A new argument of the op is a new field here plus its check.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, fields, replace

import torch

Tensor = torch.Tensor
IGNORE_INDEX = -100  # the target (label) id that means "no loss here": Hugging Face's, and the data's
ADVERSARIES = ("grl", "confusion")
# keywords of earlier versions -> the field that took their place (accepted, with a DeprecationWarning)
DEPRECATED = {"grl_lambda": "adv_lambda"}  # it scales either adversary, not only gradient reversal


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"prada_loss: {msg}")


@dataclass(frozen=True, eq=False)
class LossOptions:
    """Everything `prada_loss` takes besides (hidden, lm_weight, targets) and `impl`.

    Shapes: B sequences of T positions, H (H_t) student (teacher) hidden size, V vocabulary,
    D domains. See docs/design.md for the objective these define.
    """

    lm_bias: Tensor | None = None            # (V,) student LM head bias
    teacher_hidden: Tensor | None = None     # (B, T, H_t) } the frozen teacher: hidden states
    teacher_weight: Tensor | None = None     # (V, H_t)    } and head weight,
    teacher_logits: Tensor | None = None     # (B, T, V)   } or its logits,
    teacher_topk_ids: Tensor | None = None   # (B, T, K) int64 } or its top-K ids and their
    teacher_topk_logprobs: Tensor | None = None  # (B, T, K) } log-probabilities at temperature
    temperature: float = 1.0                 # distillation temperature tau > 0
    alpha: float = 0.5                       # weight of hard CE vs KD (1 without a teacher)
    ignore_index: int = IGNORE_INDEX         # target id that means "no loss here"
    num_valid_tokens: int | float | Tensor | None = None  # the normaliser n (default: counted)
    pool_mask: Tensor | None = None          # (B, T) 0/1 pooling mask (default: all ones)
    domain_weight: Tensor | None = None      # (D, H) linear domain head (None: no domain term)
    domain_bias: Tensor | None = None        # (D,)
    domain_labels: Tensor | None = None      # (B,) int64 domain ids, or (S,) with seq_index
    seq_index: Tensor | None = None          # (B, T) int64 packed rows: sequence in [0, S), -1: none
    adv_lambda: float = 1.0                  # lambda: scale of the adversary's gradient into h
    adversary: str = "grl"                   # "grl" (reversed L_dom) | "confusion" (towards uniform)
    chunk_rows: int | None = None            # rows per chunk of the fused paths (None: auto)

    @property
    def grl_lambda(self) -> float:
        """Deprecated name of `adv_lambda`."""
        return self.adv_lambda

    @property
    def has_teacher(self) -> bool:
        """A teacher in any form (hidden states + head, logits, or top-k)."""
        return self.has_dense_teacher or self.has_topk_teacher

    @property
    def has_dense_teacher(self) -> bool:
        """A teacher whose logits the op computes or reads (a V-wide teacher row per token)."""
        return self.teacher_logits is not None or self.teacher_hidden is not None

    @property
    def has_topk_teacher(self) -> bool:
        return self.teacher_topk_ids is not None or self.teacher_topk_logprobs is not None

    @property
    def has_domain(self) -> bool:
        return self.domain_weight is not None

    def as_kwargs(self) -> dict:
        """The options as prada_loss keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def checked(self, hidden: Tensor, lm_weight: Tensor, targets: Tensor) -> LossOptions:
        """A copy validated against the positional tensors (ValueError naming the argument
        otherwise), with the defaults that depend on them filled in: alpha = 1 without a
        teacher, an all-ones pool_mask, floats for the scalars."""
        _check(hidden.dim() == 3, f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
        B, T, H = hidden.shape
        _check(lm_weight.dim() == 2 and lm_weight.shape[1] == H,
               f"lm_weight must be (V, {H}), got {tuple(lm_weight.shape)}")
        V = lm_weight.shape[0]
        _check(tuple(targets.shape) == (B, T), f"targets must be ({B}, {T}), got {tuple(targets.shape)}")
        _check(not targets.is_floating_point(), "targets must be an integer tensor")
        _check(self.lm_bias is None or tuple(self.lm_bias.shape) == (V,), f"lm_bias must be ({V},)")
        if self.teacher_logits is not None:
            _check(self.teacher_hidden is None and self.teacher_weight is None,
                   "give the teacher as teacher_logits or as teacher_hidden + teacher_weight, not both")
            _check(tuple(self.teacher_logits.shape) == (B, T, V),
                   f"teacher_logits must be ({B}, {T}, {V}), got {tuple(self.teacher_logits.shape)}")
        if self.teacher_hidden is not None or self.teacher_weight is not None:
            th, tw = self.teacher_hidden, self.teacher_weight
            _check(th is not None and tw is not None, "teacher_hidden and teacher_weight go together")
            _check(th.dim() == 3 and tuple(th.shape[:2]) == (B, T),
                   f"teacher_hidden must be ({B}, {T}, H_t), got {tuple(th.shape)}")
            _check(tuple(tw.shape) == (V, th.shape[2]),
                   f"teacher_weight must be ({V}, {th.shape[2]}) (same vocabulary as the "
                   f"student), got {tuple(tw.shape)}")
        if self.has_topk_teacher:
            _check_topk(self, targets, V)
        _check(float(self.temperature) > 0, f"temperature must be > 0, got {self.temperature}")
        alpha = float(self.alpha) if self.has_teacher else 1.0
        _check(0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        pool_mask = self.pool_mask
        if pool_mask is None:
            pool_mask = torch.ones(B, T, dtype=hidden.dtype, device=hidden.device)
        _check(tuple(pool_mask.shape) == (B, T),
               f"pool_mask must be ({B}, {T}), got {tuple(pool_mask.shape)}")
        if self.has_domain:
            dw = self.domain_weight
            _check(dw.dim() == 2 and dw.shape[1] == H,
                   f"domain_weight must be (D, {H}), got {tuple(dw.shape)}")
            D = dw.shape[0]
            _check(self.domain_bias is None or tuple(self.domain_bias.shape) == (D,),
                   f"domain_bias must be ({D},)")
            _check(self.domain_labels is not None, "domain_labels must be given with domain_weight")
            if self.seq_index is None:
                _check(tuple(self.domain_labels.shape) == (B,),
                       f"domain_labels must be ({B},) when domain_weight is given (or (S,) with "
                       f"seq_index), got {tuple(self.domain_labels.shape)}")
        if self.seq_index is not None:
            _check_seq_index(self.seq_index, B, T, self.domain_labels if self.has_domain else None)
        _check(self.adversary in ADVERSARIES,
               f"adversary={self.adversary!r}: expected one of {ADVERSARIES}")
        _check(self.chunk_rows is None or int(self.chunk_rows) >= 1,
               f"chunk_rows must be >= 1, got {self.chunk_rows}")
        return replace(self, temperature=float(self.temperature), alpha=alpha, pool_mask=pool_mask,
                       adv_lambda=float(self.adv_lambda))


def _check_topk(o: LossOptions, targets: Tensor, V: int) -> None:
    """teacher_topk_ids / teacher_topk_logprobs: given together, alone (no other teacher form),
    (B, T, K) with 1 <= K <= V, int64 ids and floating log-probabilities. On the rows with a
    target the ids must be in [0, V) and distinct within a row (one small reduction and a host
    sync); rows whose target is ignore_index are never read."""
    ids, lp = o.teacher_topk_ids, o.teacher_topk_logprobs
    _check(ids is not None and lp is not None,
           "teacher_topk_ids and teacher_topk_logprobs go together (give both or neither)")
    _check(not o.has_dense_teacher,
           "give the teacher in one form: teacher_topk_ids + teacher_topk_logprobs, or "
           "teacher_hidden + teacher_weight, or teacher_logits, not several")
    B, T = targets.shape
    _check(torch.is_tensor(ids) and ids.dim() == 3 and tuple(ids.shape[:2]) == (B, T),
           f"teacher_topk_ids must be ({B}, {T}, K), got "
           f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids)}")
    K = ids.shape[2]
    _check(torch.is_tensor(lp) and tuple(lp.shape) == (B, T, K),
           f"teacher_topk_logprobs must be ({B}, {T}, {K}) like teacher_topk_ids, got "
           f"{tuple(lp.shape) if torch.is_tensor(lp) else type(lp)}")
    _check(ids.dtype == torch.int64, f"teacher_topk_ids must be int64, got {ids.dtype}")
    _check(lp.is_floating_point(), f"teacher_topk_logprobs must be floating point, got {lp.dtype}")
    _check(1 <= K <= V, f"teacher_topk_ids: K = {K} ids per position, expected 1 <= K <= V = {V}")
    rows = ids[targets != o.ignore_index]  # (M, K): only these are read
    if rows.numel() == 0:
        return
    srt = rows.sort(1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any() if K > 1 else srt.new_zeros((), dtype=torch.bool)
    lo, hi, d = (int(v) for v in torch.stack([srt[:, 0].min(), srt[:, -1].max(), dup.long()]).tolist())
    _check(lo >= 0 and hi < V, f"teacher_topk_ids values must be in [0, {V}) on the rows with a "
                               f"target, got values in [{lo}, {hi}]")
    _check(not d, "teacher_topk_ids must be distinct within each position's K ids (a repeated id "
                  "would count its probability twice)")


def _check_seq_index(seq: Tensor, B: int, T: int, labels: Tensor | None) -> None:
    """seq_index (packed rows): (B, T) int64 with values in [-1, S), S = len(domain_labels).
    The values are checked only when the domain term uses them (one small reduction and a
    host sync); without a domain head seq_index has no effect."""
    _check(torch.is_tensor(seq) and tuple(seq.shape) == (B, T),
           f"seq_index must be ({B}, {T}), got {tuple(seq.shape) if torch.is_tensor(seq) else type(seq)}")
    _check(seq.dtype == torch.int64, f"seq_index must be int64, got {seq.dtype}")
    if labels is None:
        return
    _check(labels.dim() == 1, f"domain_labels must be (S,) (one per sequence) with seq_index, "
                              f"got {tuple(labels.shape)}")
    S = labels.shape[0]
    if seq.numel():
        lo, hi = (int(v) for v in torch.stack([seq.min(), seq.max()]).tolist())
        _check(lo >= -1 and hi < S, f"seq_index values must be in [-1, {S}) (S = len(domain_labels) = "
                                    f"{S}; -1: no sequence), got values in [{lo}, {hi}]")


def renamed_kwargs(kwargs: dict) -> dict:
    """`kwargs` with the DEPRECATED keywords under their new names (a DeprecationWarning
    each; TypeError when both names are given)."""
    out = dict(kwargs)
    for old, new in DEPRECATED.items():
        if old in out:
            if new in out:
                raise TypeError(f"prada_loss() got {old} (deprecated) and {new}: give {new} alone")
            warnings.warn(f"prada_loss: the keyword {old} is deprecated, use {new}", DeprecationWarning,
                          stacklevel=4)
            out[new] = out.pop(old)
    return out


def options_from_kwargs(kwargs: dict) -> LossOptions:
    """LossOptions(**kwargs), with an unknown keyword named as prada_loss's and a
    deprecated one (DEPRECATED) renamed."""
    kwargs = renamed_kwargs(kwargs)
    names = {f.name for f in fields(LossOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"prada_loss() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"expected some of: {', '.join(f.name for f in fields(LossOptions))}, impl")
    return LossOptions(**kwargs)


def keyword_parameters() -> list[inspect.Parameter]:
    """LossOptions' fields as keyword-only parameters (for prada_loss's signature)."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=f.type) for f in fields(LossOptions)]
